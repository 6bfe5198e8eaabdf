"""Tests of adambs_jax.ghost.nnx: Flax NNX models, intercepted without changing their code."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adambs_jax.feedback import _kinds as feedback
from adambs_jax.feedback import ghost

K = 5


class _CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.3)
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x, key):
        x = self.norm(nnx.relu(self.conv(x))).mean(axis=(1, 2))
        x = self.dropout(nnx.relu(self.hidden(x)), deterministic=False, rngs=key)
        return self.out(x)


class _TokenModel(nnx.Module):
    def __init__(self, rngs, tied=False):
        self.tied = tied
        self.embed = nnx.Embed(13, 6, rngs=rngs)
        self.linear = nnx.Linear(6, 6, rngs=rngs)
        self.gain = nnx.Param(jnp.ones(6))  # a raw parameter: falls back

    def __call__(self, tokens, key):
        del key
        x = self.embed(tokens)
        x = self.linear(jnp.tanh(x)) * self.gain[...]
        if self.tied:  # an output layer sharing the embedding table
            return self.embed.attend(x).mean(axis=1)[:, :4]
        return x.mean(axis=1)[:, :4]


def _problem(model, inputs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = jnp.arange(K) % 4

    def loss_fn(p, batch, key):
        logits = nnx.merge(graphdef, p, rest)(batch["x"], key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params, {"x": inputs, "y": labels}


@pytest.mark.parametrize("name", [pytest.param("cnn", marks=pytest.mark.slow), "tokens"])
def test_nnx_norms_and_gradient_match_vmap(name):
    if name == "cnn":
        model, inputs = _CNN(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (K, 7, 7, 3))
    else:
        model, inputs = (
            _TokenModel(nnx.Rngs(0)),
            jax.random.randint(jax.random.key(1), (K, 6), 0, 13),
        )
    loss_fn, params, batch = _problem(model, inputs)
    key, weights = jax.random.key(2), jnp.linspace(0.5, 2.0, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses, grad, norms = ghost.ghost_losses_grad_and_norms(
            loss_fn, params, batch, weights, key
        )
    expected = feedback.per_example_grad_norms(loss_fn, params, batch, key, method="vmap")
    np.testing.assert_allclose(np.asarray(norms), np.asarray(expected), rtol=1e-4)
    expected_grad = jax.grad(
        lambda p: jnp.mean(weights * feedback.per_example_losses(loss_fn, p, batch, key))
    )(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, expected_grad
    )
    coverage = ghost.ghost_coverage(loss_fn, params, batch, key)
    if name == "cnn":
        assert len(coverage.ghost) == 6 and len(coverage.direct) == 2 and not coverage.fallback
    else:
        assert len(coverage.ghost) == 3 and coverage.fallback == ("['gain'].value",)


def test_classes_are_restored_after_interception():
    original = nnx.Linear.__call__
    model = _CNN(nnx.Rngs(0))
    loss_fn, params, batch = _problem(model, jnp.ones((K, 7, 7, 3)))
    ghost.per_example_grad_norms(loss_fn, params, batch, jax.random.key(0))
    assert nnx.Linear.__call__ is original


def test_tied_embedding_attend_falls_back():
    tokens = jax.random.randint(jax.random.key(1), (K, 6), 0, 13)
    loss_fn, params, batch = _problem(_TokenModel(nnx.Rngs(0), tied=True), tokens)
    coverage = ghost.ghost_coverage(loss_fn, params, batch, jax.random.key(0))
    assert coverage.fallback == ("['embed']['embedding'].value", "['gain'].value")
    with pytest.warns(UserWarning, match="embedding"):
        norms = ghost.per_example_grad_norms(
            loss_fn, params, batch, jax.random.key(0), method="ghost"
        )
    expected = feedback.per_example_grad_norms(loss_fn, params, batch, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(norms), np.asarray(expected), rtol=1e-4)
