"""Tests for experiments.methods: the method registry and what a built method holds."""
from __future__ import annotations

import json

import pytest

from adambs_jax.feedback import FEEDBACK_KINDS
from experiments.methods import BANDIT_FEEDBACKS, build_method, list_methods, method_available


def test_every_available_method_builds():
    for name in list_methods():
        if not method_available(name):
            continue
        built = build_method(name, num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
        assert built.name == name and built.label
        assert built.sampler.num_examples == 50 and built.sampler.batch_size == 4
        json.dumps(built.settings)
    tuned = build_method("adambs-tuned", num_examples=50, batch_size=4, num_steps=10,
                         learning_rate=0.1)
    assert tuned.settings["p_min"] == pytest.approx(0.5 / 50)
    paper = build_method("adambs", num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
    assert paper.settings["p_min"] == pytest.approx(0.1 / 50)
    assert paper.feedback == "logit_grad_norm"
    assert build_method("adam", num_examples=50, batch_size=4, num_steps=10,
                        learning_rate=0.1).feedback == "loss"
    with pytest.raises(KeyError):
        build_method("nope", num_examples=5, batch_size=1, num_steps=1, learning_rate=0.1)


@pytest.mark.parametrize("feedback", FEEDBACK_KINDS)
def test_bandit_methods_learn_from_every_library_feedback_kind(feedback):
    built = build_method("adambs", num_examples=20, batch_size=4, num_steps=10,
                         learning_rate=0.1, feedback=feedback)
    assert built.feedback == built.settings["feedback"] == feedback
    assert built.sampling == "exp3"
    assert feedback in BANDIT_FEEDBACKS


def test_unknown_feedback_is_refused():
    with pytest.raises(ValueError, match="feedback must be one of"):
        build_method("adambs", num_examples=20, batch_size=4, num_steps=10, learning_rate=0.1,
                     feedback="bogus")
