"""Tests of adambs_jax.gradient_norm: Lahire's p^GN oracle, step by step (the
exact per-example norms of a real model are tested in test_baselines.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers import _gradient_norm as gns
from tests.helpers import config_with_factory_defaults


def config_of(num_examples, batch_size, **options):
    """The config of gradient_norm_sampler(num_examples, batch_size, **options) (its defaults)."""
    return config_with_factory_defaults(
        ab.gradient_norm_sampler, gns.gradient_norm_config, num_examples, batch_size, **options
    )


def _table_score_fn(table):
    """A score_fn whose score of example j is ``table[j]``."""
    table = jnp.asarray(table, jnp.float32)
    return lambda indices: table[indices]


def test_floored_distribution_is_proportional_plus_floor():
    config = config_of(4, 2, p_floor=0.05)
    assert config.proportional_mass == pytest.approx(0.8)
    p, valid = gns.floored_distribution(config, jnp.asarray([1.0, 0.0, 3.0, 4.0]))
    assert bool(valid)
    np.testing.assert_allclose(p, 0.8 * np.array([1, 0, 3, 4]) / 8 + 0.05, rtol=1e-6)
    p, valid = gns.floored_distribution(config, jnp.zeros(4))
    assert not bool(valid)
    np.testing.assert_allclose(p, np.full(4, 0.25))


def test_sampler_probabilities_is_the_stored_distribution():
    sampler = ab.gradient_norm_sampler(5, 3)
    _, _, state = sampler.sample(sampler.init(), jax.random.key(0), _table_score_fn(np.arange(5.0)))
    np.testing.assert_allclose(sampler.probabilities(state), np.arange(5.0) / 10, rtol=1e-6)
    np.testing.assert_array_equal(ab.samplers.probabilities(state), state.distribution)
    state = sampler.update(state, jnp.arange(3), jnp.ones(3))
    assert int(state.step) == 1
    with pytest.raises(ValueError, match="feedback"):
        sampler.update(state, jnp.arange(3), jnp.ones(2))
    with pytest.raises(ValueError, match="num_examples=5"):
        ab.gradient_norm_sampler(6, 3).sample(state, jax.random.key(0), _table_score_fn(np.ones(6)))


def test_gradient_norm_draws_follow_the_distribution():
    """Chi-square goodness of fit of 6400 draws against p = norms / sum(norms)."""
    n, batch_size, num_batches = 12, 16, 400
    norms = np.asarray([0.1, 0.5, 1, 2, 3, 0.2, 0.05, 4, 1.5, 0.7, 0.3, 2.5], np.float32)
    sampler = ab.gradient_norm_sampler(n, batch_size)
    score_fn = _table_score_fn(norms)

    @jax.jit
    def draws(keys):
        return jax.vmap(lambda key: sampler.sample(sampler.init(), key, score_fn)[:2])(keys)

    indices, probs = draws(jax.random.split(jax.random.key(8), num_batches))
    p = norms.astype(np.float64) / norms.sum()
    np.testing.assert_allclose(probs, p.astype(np.float32)[np.asarray(indices)], rtol=1e-5)
    counts = np.bincount(np.asarray(indices).ravel(), minlength=n)
    expected = p * counts.sum()
    _, p_value = stats.chisquare(counts, f_exp=expected * counts.sum() / expected.sum())
    assert p_value > 1e-3, (counts, p_value)


def test_gradient_norm_degenerate_norms_give_uniform():
    n = 10
    sampler = ab.gradient_norm_sampler(n, 4)
    sample = jax.jit(lambda state, key, norms: sampler.sample(state, key, lambda i: norms[i]))
    for bad in (np.zeros(n), np.r_[np.ones(n - 1), np.nan]):
        _, probs, state = sample(sampler.init(), jax.random.key(0), jnp.asarray(bad, jnp.float32))
        np.testing.assert_allclose(state.distribution, np.full(n, 1 / n), rtol=1e-6)
        np.testing.assert_allclose(probs, np.full(4, 1 / n), rtol=1e-6)
        assert int(state.num_fallbacks) == 1


def test_gradient_norm_size_limit_and_floor_errors():
    with pytest.raises(ValueError, match=r"num_examples=10001.*max_examples=10000"):
        ab.gradient_norm_sampler(10_001, 8)
    sampler = ab.gradient_norm_sampler(10_001, 8, max_examples=20_000)
    assert sampler.num_examples == 10_001
    with pytest.raises(ValueError, match="p_floor"):
        ab.gradient_norm_sampler(100, 8, p_floor=0.011)
    with pytest.raises(ValueError, match="p_floor"):
        ab.gradient_norm_sampler(100, 8, p_floor=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ab.gradient_norm_sampler(100, 8, chunk_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        ab.gradient_norm_sampler(100, 8, max_examples=0)
    uniform = ab.gradient_norm_sampler(100, 8, p_floor=0.01)  # p_floor = 1/n: uniform
    _, probs, _ = uniform.sample(
        uniform.init(), jax.random.key(0), _table_score_fn(np.arange(100, dtype=np.float32))
    )
    np.testing.assert_allclose(probs, np.full(8, 0.01), rtol=1e-5)


def test_update_with_apply_false_keeps_the_state():
    sampler = ab.gradient_norm_sampler(5, 3)
    _, _, state = sampler.sample(sampler.init(), jax.random.key(0), _table_score_fn(np.arange(5.0)))
    kept = jax.jit(sampler.update)(state, jnp.arange(3), jnp.ones(3), apply=jnp.asarray(False))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert int(sampler.update(state, jnp.arange(3), jnp.ones(3), apply=True).step) == 1
