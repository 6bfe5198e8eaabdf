"""Tests for experiments.diagnostics: what each kind of sampler reports it has learned."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.diagnostics import distribution_diagnostics, sampler_diagnostics
from experiments.methods import build_method


def built(name):
    return build_method(name, num_examples=20, batch_size=4, num_steps=10, learning_rate=0.1)


def test_distribution_diagnostics():
    d = distribution_diagnostics(jnp.asarray([0.5, 0.25, 0.25]))
    assert d["effective_sample_size"] == pytest.approx(1 / (3 * 0.375))
    assert d["max_prob_times_n"] == pytest.approx(1.5)
    assert d["min_prob_times_n"] == pytest.approx(0.75)


def test_uniform_sampler_reports_nothing():
    method = built("adam")
    assert sampler_diagnostics(method, method.sampler.init()) == {}


def test_exp3_sampler_reports_its_distribution():
    method = built("adambs")
    state = method.sampler.init()
    d = sampler_diagnostics(method, state)
    np.testing.assert_allclose([d["effective_sample_size"], d["max_prob_times_n"],
                                d["min_prob_times_n"]], 1.0, rtol=1e-5)  # starts uniform
    indices = jnp.arange(4, dtype=jnp.int32)
    state = method.sampler.update(state, indices, jnp.asarray([10.0, 0.0, 0.0, 0.0]))
    assert sampler_diagnostics(method, state)["effective_sample_size"] < 1.0


def test_adam_impt_reports_its_switch():
    method = built("adam-impt")
    assert sampler_diagnostics(method, method.sampler.init()) == {
        "importance_sampling_on": 0.0, "variance_reduction_ema": 0.0}
