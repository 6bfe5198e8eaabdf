"""Tests of adambs_jax.scored_draws: scores, their normalization and proportional draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _scored_draws as scored_draws


def test_scores_of_checks_one_score_per_index():
    indices = jnp.arange(4, dtype=jnp.int32)
    scores = scored_draws.scores_of(lambda i: 2 * i, indices)
    assert scores.dtype == jnp.float32
    np.testing.assert_array_equal(scores, [0, 2, 4, 6])
    with pytest.raises(ValueError, match="score_fn"):
        scored_draws.scores_of(lambda i: jnp.ones(3), indices)


def test_check_score_feedback_accepts_kinds_and_callables():
    scored_draws.check_score_feedback("loss")
    scored_draws.check_score_feedback(lambda params, batch, losses: losses)
    with pytest.raises(TypeError, match="score_feedback"):
        scored_draws.check_score_feedback(3)


def test_normalized_scores_and_their_uniform_fallback():
    g, valid = scored_draws.normalized_scores(jnp.asarray([1.0, 3.0, 0.0, 4.0]))
    assert bool(valid)
    np.testing.assert_allclose(g, [0.125, 0.375, 0.0, 0.5], rtol=1e-7)
    g, valid = scored_draws.normalized_scores(jnp.full((100,), 1e37))  # sum 1e39: no overflow
    assert bool(valid)
    np.testing.assert_allclose(g, np.full(100, 0.01), rtol=1e-6)
    for bad in ([0.0, 0.0], [1.0, -1.0], [1.0, np.nan], [np.inf, 1.0]):
        assert not bool(scored_draws.valid_scores(jnp.asarray(bad, jnp.float32)))
        g, valid = scored_draws.normalized_scores(jnp.asarray(bad, jnp.float32))
        assert not bool(valid)
        np.testing.assert_allclose(g, [0.5, 0.5])


def test_draw_proportional_never_returns_zero_probability_positions():
    p = jnp.asarray([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    positions = scored_draws.draw_proportional(jax.random.key(0), p, 4000)
    assert positions.dtype == jnp.int32
    counts = np.bincount(np.asarray(positions), minlength=6)
    assert counts[[0, 2, 3, 5]].sum() == 0
    assert abs(counts[1] / 4000 - 0.5) < 0.05


def test_resample_weights_are_unbiased_over_the_presample():
    """(1/K) sum_k v_{pos_k} / (B q_{pos_k}) has mean (1/B) sum_i v_i over the presample."""
    presample_size, num_draws, num_estimates = 24, 8, 20_000
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=presample_size).astype(np.float32) + 0.05
    values = rng.normal(size=(presample_size, 3)).astype(np.float32) * scores[:, None]

    @jax.jit
    def estimates(keys):
        def one(key):
            positions, q, valid = ab.samplers.resample_proportional(key, scores, num_draws)
            weights = 1.0 / (presample_size * q[positions])
            return jnp.mean(weights[:, None] * jnp.asarray(values)[positions], axis=0), valid

        return jax.vmap(one)(keys)

    draws, valid = estimates(jax.random.split(jax.random.key(2), num_estimates))
    assert bool(jnp.all(valid))
    q = scores.astype(np.float64) / scores.sum()
    target = values.mean(axis=0, dtype=np.float64)
    # exact per-coordinate variance of one weighted draw X = v_i / (B q_i), i ~ q
    second_moment = np.sum(values.astype(np.float64) ** 2 / (presample_size**2 * q[:, None]), 0)
    estimator_std = np.sqrt((second_moment - target**2) / num_draws)
    error = np.abs(np.asarray(draws, np.float64).mean(axis=0) - target)
    assert np.all(error <= 5 * estimator_std / np.sqrt(num_estimates)), (error, estimator_std)


def test_resample_never_draws_zero_scores_and_falls_back_to_uniform():
    key = jax.random.key(3)
    resample = jax.jit(ab.samplers.resample_proportional, static_argnums=2)
    scores = jnp.asarray([0.0, 2.0, 0.0, 0.0, 1.0, 0.0])
    positions, q, valid = resample(key, scores, 5000)
    assert bool(valid)
    assert set(np.unique(np.asarray(positions)).tolist()) == {1, 4}
    np.testing.assert_allclose(q, [0, 2 / 3, 0, 0, 1 / 3, 0], rtol=1e-6)
    for bad in ([0.0] * 6, [1.0, np.nan, 1.0, 1.0, 1.0, 1.0], [1.0, np.inf, 0, 0, 0, 0]):
        positions, q, valid = resample(key, jnp.asarray(bad, jnp.float32), 64)
        assert not bool(valid)
        np.testing.assert_allclose(q, np.full(6, 1 / 6), rtol=1e-6)
        assert np.all((np.asarray(positions) >= 0) & (np.asarray(positions) < 6))
