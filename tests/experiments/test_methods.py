"""Tests for experiments.methods: the method registry and what a built method holds."""

from __future__ import annotations

import json
import math

import pytest

import adambs_jax as ab
from adambs_jax.feedback._kinds import FEEDBACK_KINDS, as_feedback
from experiments.methods import BANDIT_FEEDBACKS, build_method, list_methods, method_available


def test_every_available_method_builds():
    for name in list_methods():
        if not method_available(name):
            continue
        built = build_method(name, num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
        assert built.name == name and built.label
        assert built.sampler.num_examples == 50 and built.sampler.batch_size == 4
        json.dumps(built.settings)
    tuned = build_method(
        "adambs-tuned", num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1
    )
    assert tuned.settings["p_min"] == pytest.approx(0.5 / 50)
    paper = build_method("adambs", num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
    assert paper.settings["p_min"] == pytest.approx(0.1 / 50)
    assert paper.feedback == "logit_grad_norm"
    assert (
        build_method(
            "adam", num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1
        ).feedback
        == "loss"
    )
    with pytest.raises(KeyError):
        build_method("nope", num_examples=5, batch_size=1, num_steps=1, learning_rate=0.1)


@pytest.mark.parametrize("feedback", FEEDBACK_KINDS)
def test_bandit_methods_learn_from_every_library_feedback_kind(feedback):
    built = build_method(
        "adambs", num_examples=20, batch_size=4, num_steps=10, learning_rate=0.1, feedback=feedback
    )
    # "preconditioned_grad_norm" as the object stating the optimizer's hyperparameters
    assert as_feedback(built.feedback).name == built.settings["feedback"] == feedback
    assert built.sampling == "exp3"
    assert feedback in BANDIT_FEEDBACKS


def test_unknown_feedback_is_refused():
    with pytest.raises(ValueError, match="feedback must be one of"):
        build_method(
            "adambs",
            num_examples=20,
            batch_size=4,
            num_steps=10,
            learning_rate=0.1,
            feedback="bogus",
        )


def _build(name, **kwargs):
    return build_method(
        name, num_examples=50, batch_size=4, num_steps=80, learning_rate=0.1, **kwargs
    )


def test_the_sampler_comparison_methods_are_registered():
    names = set(list_methods())
    assert {
        "adambs-lowvar",
        "adambs-lowvar-precond",
        "adam-priority",
        "adam-priority-precond",
        "infobatch",
    } <= names
    for name in ("adam", "adambs", "adam-impt", "adam-gn", "adambs-tuned"):
        assert name in names  # the existing methods stay


def test_adambs_lowvar_is_the_low_variance_preset():
    built = _build("adambs-lowvar")
    assert (
        built.sampler.sample.args[0]
        == ab.exp3_sampler(50, 4, num_steps=80, preset="low_variance").sample.args[0]
    )
    assert built.settings["p_min"] == pytest.approx(0.5 / 50)
    assert built.settings["grad_norm_bound"] == "quantile"
    assert built.settings["preset"] == "low_variance" and built.feedback == "logit_grad_norm"
    # a configuration's option overrides the preset
    paper_floor = _build("adambs-lowvar", options={"p_min_times_n": 0.1})
    assert paper_floor.settings["p_min"] == pytest.approx(0.1 / 50)
    assert paper_floor.settings["grad_norm_bound"] == "quantile"
    # the paper's method keeps the paper's bound
    assert _build("adambs").settings["grad_norm_bound"] == "running_max"


def test_adam_priority_builds_the_priority_sampler_with_the_configuration_feedback():
    built = _build("adam-priority", feedback="grad_norm")
    assert built.sampling == "priority" and built.feedback == "grad_norm"
    assert isinstance(built.sampler.init(), ab.samplers.PrioritySamplerState)
    assert built.settings["uniform_mix"] == "auto" and built.settings["alpha"] == 1.0
    mixed = _build("adam-priority", options={"uniform_mix": 0.5})
    assert mixed.settings["uniform_mix"] == 0.5
    json.dumps(mixed.settings)


def test_priority_fixed_and_refresh_methods():
    fixed = _build("adam-priority-fixed")
    assert fixed.settings["uniform_mix"] == 0.1 and isinstance(fixed.sampler, ab.Sampler)
    refreshed = _build("adam-priority-refresh")
    assert isinstance(refreshed.sampler, ab.ScoringSampler)
    n, k = 50, 4  # _build's sizes
    assert refreshed.settings["refresh_every"] == -(-n // k)
    assert refreshed.sampler.update.args[0].refresh_chunk == -(-n // -(-n // k))


@pytest.mark.parametrize("name", ["adam-priority-precond", "adambs-lowvar-precond"])
def test_precond_methods_always_use_the_preconditioned_feedback(name):
    built = _build(name, feedback="loss")
    assert built.feedback.name == built.settings["feedback"] == "preconditioned_grad_norm"
    # stating Adam's hyperparameters, which the step checks against the optimizer
    assert built.feedback == ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8)
    ab.make_train_step(lambda p, b: b * p, built.optimizer, built.sampler, feedback=built.feedback)
    assert "preconditioned_grad_norm" in FEEDBACK_KINDS


def test_infobatch_method_learns_from_the_loss_and_epochs_of_n_over_k_steps():
    built = _build("infobatch", feedback="grad_norm")
    assert built.sampling == "infobatch" and built.feedback == "loss"
    assert built.sampler.renormalize_every == math.ceil(50 / 4)
    assert built.settings["prune_ratio"] == 0.5 and built.settings["anneal_fraction"] == 0.125
    assert built.settings["sampler_options"]["num_steps"] == 80
