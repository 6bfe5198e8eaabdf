"""Tests of adambs_jax.step._sampled_batch: the batch that carries its weights into a step
and its feedback out (a jax.Ref), read like its data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from adambs_jax.step import SampledBatch
from adambs_jax.step._sampled_batch import UNWRITTEN, find_sampled_batch, unwritten_feedback

K = 4


def _batch(data=None, k=K):
    data = {"x": jnp.arange(k * 3.0).reshape(k, 3), "y": jnp.arange(k)} if data is None else data
    return SampledBatch(
        data, jnp.linspace(0.5, 2.0, k), jnp.arange(k), jax.new_ref(unwritten_feedback(k))
    )


def test_it_reads_like_its_data():
    batch = _batch()
    np.testing.assert_array_equal(batch["y"], jnp.arange(K))
    assert len(batch) == 2 and "x" in batch and set(batch) == {"x", "y"}
    assert set(batch.keys()) == {"x", "y"} and dict(batch.items())["y"].shape == (K,)
    assert len(list(batch.values())) == 2 and dict(batch)["x"].shape == (K, 3)
    pair = _batch((jnp.ones((K, 2)), jnp.zeros(K)))
    x, y = pair
    assert x.shape == (K, 2) and pair[1].shape == (K,)
    with pytest.raises(TypeError, match="not a mapping"):
        pair.keys()
    assert "batch_size=4" in repr(batch)


def test_the_slot_starts_unwritten():
    np.testing.assert_array_equal(_batch().feedback[...], np.full(K, UNWRITTEN))
    assert UNWRITTEN < 0  # feedback is never negative: a sampler drops such entries


def test_it_is_a_pytree_with_named_leaves():
    batch = _batch()
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(batch)]
    assert paths == [".data['x']", ".data['y']", ".weights", ".indices", ".feedback"]
    again = jax.tree.unflatten(jax.tree.structure(batch), jax.tree.leaves(batch))
    assert isinstance(again, SampledBatch) and again.feedback is batch.feedback


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 17), width=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_what_a_jitted_step_writes_stays_written(k, width, seed):
    """The property the whole loop rests on: a write into the batch's slot inside jax.jit (and
    nnx.jit) is what the slot holds after the call, for any batch shape."""
    x = jax.random.normal(jax.random.key(seed), (k, width))
    batch = _batch({"x": x}, k)

    @jax.jit
    def step(b):
        b.feedback[...] = jnp.sum(b["x"] ** 2, axis=1) * b.weights
        return jnp.sum(b["x"])

    step(batch)
    np.testing.assert_allclose(
        batch.feedback[...], jnp.sum(x**2, axis=1) * batch.weights, rtol=1e-6
    )

    @nnx.jit
    def nnx_step(b):
        b.feedback[...] = b.weights + 1.0

    nnx_step(batch)
    np.testing.assert_allclose(batch.feedback[...], batch.weights + 1.0)


def test_find_gives_the_one_batch_and_the_arguments_with_its_plain_data():
    batch = _batch()
    found, args, kwargs = find_sampled_batch(None, (1.0, batch), {"extra": batch.weights})
    assert found is batch and args[1] is batch.data and kwargs["extra"] is batch.weights
    found, args, _ = find_sampled_batch(batch, (1.0,), {})
    assert found is batch and args == (1.0,)
    assert find_sampled_batch(None, (1.0, {"x": 1}), {})[0] is None
    with pytest.raises(TypeError, match="2 SampledBatch"):
        find_sampled_batch(batch, (batch,), {})
