"""Tests of adambs_jax.uniform: the uniform sampler's config and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax.samplers import _uniform as uniform


def test_config_is_validated_and_frozen():
    config = uniform.uniform_config(12, 3)
    assert config == (12, 3)
    with pytest.raises(AttributeError):
        config.batch_size = 4
    with pytest.raises(ValueError, match="num_examples"):
        uniform.uniform_config(True, 3)
    with pytest.raises(ValueError, match="batch_size"):
        uniform.uniform_config(12, 0)


def test_steps_draw_uniformly_and_count_updates():
    config = uniform.uniform_config(12, 3)
    state = uniform.init(config)
    assert state.num_examples == 12 and int(state.step) == 0
    indices, probs = uniform.sample(config, state, jax.random.key(0))
    assert indices.dtype == jnp.int32 and indices.shape == (3,)
    assert np.all((np.asarray(indices) >= 0) & (np.asarray(indices) < 12))
    np.testing.assert_allclose(probs, np.full(3, 1 / 12), rtol=1e-7)
    state = uniform.update(config, state, indices, jnp.ones(3))
    assert int(state.step) == 1
    with pytest.raises(ValueError, match="indices"):
        uniform.update(config, state, jnp.arange(4), jnp.ones(3))
    p = uniform.distribution(state)
    assert p.shape == (12,) and p.dtype == jnp.float32
    np.testing.assert_allclose(p, np.full(12, 1 / 12), rtol=1e-7)


def test_apply_false_keeps_the_state_and_float_indices_are_refused():
    config = uniform.uniform_config(12, 3)
    state = uniform.init(config)
    kept = uniform.update(config, state, jnp.arange(3), jnp.ones(3), apply=jnp.asarray(False))
    assert int(kept.step) == 0
    with pytest.raises(TypeError, match="indices"):
        uniform.update(config, state, jnp.array([1.0, 2.0, 3.0]), jnp.ones(3))
    with pytest.raises(ValueError, match="key"):
        uniform.sample(config, state, jnp.ones(3))


def test_more_than_int32_examples_need_x64_and_draw_over_the_whole_range():
    n = 3 * 2**31  # a regression: n > 2^31 with int64 indices
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"num_examples=6442450944.*jax_enable_x64"):
            uniform.uniform_config(n, 4)
    with jax.enable_x64(True):
        config = uniform.uniform_config(n, 4096)
        indices, probs = uniform.sample(config, uniform.init(config), jax.random.key(0))
        assert indices.dtype == jnp.int64
        indices = np.asarray(indices)
        assert indices.min() >= 0 and indices.max() < n
        assert (indices >= 2**31).mean() > 0.5  # about 2/3 of the mass lies above int32
        np.testing.assert_allclose(probs, 1 / n, rtol=1e-6)
