"""Tests for experiments.models.transformer: the byte LM is causal and ghost norms cover it
(exactly: the same norms as vmap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adambs_jax as ab
from experiments.models import get_model, init_params
from experiments.tasks import make_model_loss

LENGTH, VOCAB = 6, 11


def tiny():
    model = get_model(
        "byte-transformer", VOCAB, max_length=LENGTH, width=8, num_heads=2, num_layers=2
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, LENGTH)), jnp.int32)
    # traced init + numpy values: Flax's compiled initializers cost seconds on this CPU
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(1), tokens))
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype), shapes
    )
    return model, params, tokens


def test_is_causal():
    model, params, tokens = tiny()
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % VOCAB)
    apply = jax.jit(jax.vmap(lambda x: model.apply({"params": params}, x)))  # one compilation
    a, b = apply(jnp.stack([tokens, changed]))
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-6, atol=1e-6)  # the past
    assert not np.allclose(a[:, 3:], b[:, 3:])  # the position itself and the future


def test_refuses_bad_sizes():
    model, params, tokens = tiny()
    with pytest.raises(ValueError, match="max_length"):
        model.apply({"params": params}, jnp.zeros((1, LENGTH + 1), jnp.int32))
    bad = get_model("byte-transformer", VOCAB, max_length=LENGTH, width=8, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        jax.eval_shape(lambda: init_params(bad, jax.random.key(0), tokens))


def loss_and_batch():
    model, params, tokens = tiny()
    return make_model_loss(model, "next_token"), params, {"x": tokens, "y": tokens[:, ::-1]}


def test_ghost_norms_cover_every_parameter():
    loss, params, batch = loss_and_batch()
    coverage = ab.feedback.ghost.ghost_coverage(loss, params, batch)
    assert coverage.fallback == ()  # every parameter by a layer rule or directly
    assert all("LayerNorm" in name or "final_norm" in name for name in coverage.direct)
    assert len(coverage.ghost) == len(jax.tree.leaves(params)) - len(coverage.direct)


@pytest.mark.slow  # two compilations of a transformer's per-example pass (~1 min on 2 cores)
def test_ghost_norms_equal_vmap():
    loss, params, batch = loss_and_batch()
    ghost = ab.feedback.per_example_grad_norms(loss, params, batch, method="ghost")
    vmap = ab.feedback.per_example_grad_norms(loss, params, batch, method="vmap")
    np.testing.assert_allclose(ghost, vmap, rtol=1e-4)
