"""Tests for experiments.diagnostics: what each kind of sampler reports it has learned, and the
Spearman / variance-ratio formulas against numpy and scipy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from experiments.diagnostics import (
    GradNormProbe,
    average_ranks,
    distribution_diagnostics,
    optimal_variance_ratio,
    probe_indices,
    sampler_diagnostics,
    sampler_probe,
    score_diagnostics,
    spearman,
    variance_ratio,
)
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
    np.testing.assert_allclose(
        [d["effective_sample_size"], d["max_prob_times_n"], d["min_prob_times_n"]], 1.0, rtol=1e-5
    )  # starts uniform
    indices = jnp.arange(4, dtype=jnp.int32)
    state = method.sampler.update(state, indices, jnp.asarray([10.0, 0.0, 0.0, 0.0]))
    assert sampler_diagnostics(method, state)["effective_sample_size"] < 1.0


def test_adam_impt_reports_its_switch():
    method = built("adam-impt")
    assert sampler_diagnostics(method, method.sampler.init()) == {
        "importance_sampling_on": 0.0,
        "variance_reduction_ema": 0.0,
    }


# --------------------------------------------------------------------------- score diagnostics


def test_average_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    np.testing.assert_allclose(average_ranks(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.ones(5), y[:5]))  # a constant p (uniform) has no ranks


def test_variance_ratio_formulas():
    rng = np.random.default_rng(1)
    n = 50
    g = rng.gamma(0.5, size=n)
    second_moment = lambda p: np.sum(g**2 / (n**2 * p))  # V(p) of the module docstring
    uniform = np.full(n, 1.0 / n)
    assert variance_ratio(uniform, g, n) == pytest.approx(1.0)
    optimum = g / g.sum()
    assert variance_ratio(optimum, g, n) == pytest.approx(optimal_variance_ratio(g))
    assert optimal_variance_ratio(g) == pytest.approx(
        second_moment(optimum) / second_moment(uniform)
    )
    p = rng.dirichlet(np.ones(n))
    assert variance_ratio(p, g, n) == pytest.approx(second_moment(p) / second_moment(uniform))
    assert variance_ratio(p, g, n) >= optimal_variance_ratio(g)  # p* is the minimum
    d = score_diagnostics(optimum, g, n)
    assert d["spearman_p_vs_grad_norm"] == pytest.approx(1.0)
    assert d["variance_ratio"] == pytest.approx(d["variance_ratio_optimal"])
    # p^GN gives an example with g_j = 0 the probability 0: it adds nothing (not NaN)
    g[:5] = 0.0
    optimum = g / g.sum()
    assert variance_ratio(optimum, g, n) == pytest.approx(optimal_variance_ratio(g))
    assert variance_ratio(np.where(g > 0, 0.0, 1.0 / 5), g, n) == np.inf  # biased: g > 0, p = 0


def test_probe_indices():
    np.testing.assert_array_equal(probe_indices(5, 10), np.arange(5))
    np.testing.assert_array_equal(probe_indices(5, None), np.arange(5))
    subset = probe_indices(1000, 64)
    assert subset.shape == (64,) and len(set(subset.tolist())) == 64
    assert np.all(np.diff(subset) > 0) and subset.max() < 1000
    np.testing.assert_array_equal(subset, probe_indices(1000, 64))  # fixed for the run


def test_grad_norm_probe_is_exact_and_feeds_the_sampler_diagnostics():
    """The probe equals per-example norms by hand; p^GN's p against them reports ratio < 1."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(12, 3)), jnp.float32)
    data = {"x": x, "y": jnp.arange(12) % 2}
    loss = ab.ModelLoss(
        lambda params, batch: batch["x"] @ params,
        lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
    )
    params = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2)), jnp.float32)
    probe = GradNormProbe(loss, data, 12, max_examples=8)

    def norm_of(i):  # ||d loss_i / d params|| by hand, one example at a time
        example = {"x": x[i : i + 1], "y": data["y"][i : i + 1]}
        return np.linalg.norm(jax.grad(lambda p: loss(p, example)[0])(params))

    expected = [norm_of(i) for i in probe.indices]
    np.testing.assert_allclose(probe(params), expected, rtol=1e-5)
    method = build_method("adambs", num_examples=12, batch_size=4, num_steps=10, learning_rate=0.1)
    d = sampler_diagnostics(method, method.sampler.init(), params, probe)
    assert d["variance_ratio"] == pytest.approx(1.0, rel=1e-5)  # exp3 starts uniform
    assert np.isnan(d["spearman_p_vs_grad_norm"])
    assert 0 < d["variance_ratio_optimal"] <= 1
    assert sampler_diagnostics(method, method.sampler.init()).keys() == {
        "effective_sample_size",
        "max_prob_times_n",
        "min_prob_times_n",
    }  # no params: no scores


def test_priority_reports_its_mix_and_the_share_on_corrupted_examples():
    built = build_method(
        "adam-priority-fixed", num_examples=10, batch_size=4, num_steps=10, learning_rate=0.1
    )
    state = built.sampler.update(built.sampler.init(), jnp.arange(4), jnp.array([9.0, 1, 1, 1]))
    corrupted = np.zeros(10, bool)
    corrupted[:2] = True
    out = sampler_probe(built, None, jit=False, corrupted=corrupted)(state, None)
    p = np.asarray(built.sampler.probabilities(state), np.float64)
    assert out["uniform_mix"] == pytest.approx(0.1)
    assert out["corrupted_share"] == pytest.approx(p[:2].sum(), rel=1e-6)
