"""Tests of adambs_jax.estimators: each estimator gives G_hat = (1/K) sum_k w_k g_k (AdamBS eq. 1)
and the feedback of its kind, checked against per-example gradients computed one at a time."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.feedback import _estimators as estimators

BATCH_SIZE = 5


def _linear(params, batch):
    return batch["x"] @ params["w"] + params["b"]


def _cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


MODEL_LOSS = ab.ModelLoss(_linear, _cross_entropy)


def _problem():
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(BATCH_SIZE, 3)), jnp.float32),
        "y": jnp.asarray([0, 1, 2, 1, 0], jnp.int32),
    }
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "b": jnp.asarray([0.1, -0.2, 0.0], jnp.float32),
    }
    weights = jnp.asarray([0.5, 1.0, 2.0, 1.5, 0.25], jnp.float32)
    return params, batch, weights


def _one_at_a_time(params, batch, weights):
    """Losses, G_hat and gradient norms from K separate jax.grad calls (numpy float64)."""
    grad_of_one = jax.grad(lambda p, one: MODEL_LOSS(p, one)[0])
    grads = [
        grad_of_one(params, jax.tree.map(lambda leaf, k=k: leaf[k : k + 1], batch))
        for k in range(BATCH_SIZE)
    ]
    g_hat = jax.tree.map(
        lambda *rows: (
            sum(float(w) * np.asarray(r, np.float64) for w, r in zip(weights, rows)) / BATCH_SIZE
        ),
        *grads,
    )
    norms = [
        np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(g)))
        for g in grads
    ]
    return np.asarray(MODEL_LOSS(params, batch)), g_hat, np.asarray(norms)


def _logit_bound(params, batch):
    logits = _linear(params, batch)
    return np.linalg.norm(jax.nn.softmax(logits) - jax.nn.one_hot(batch["y"], 3), axis=1)


@pytest.mark.parametrize(
    "estimate, feedback",
    [
        (estimators.estimate_with_vmap_norms, "grad_norm"),
        (estimators.estimate_with_per_example_grads, "grad_norm"),
        (estimators.estimate_with_logit_bound, "logit_grad_norm"),
        (estimators.estimate_with_loss, "loss"),
        (estimators.estimator_with_user_feedback(lambda p, b, losses: 2.0 * losses), "2 loss"),
    ],
)
def test_estimate_is_the_weighted_mean_gradient_and_the_feedback(estimate, feedback):
    params, batch, weights = _problem()
    result = jax.jit(lambda p, b, w: estimate(MODEL_LOSS, p, b, w, None))(params, batch, weights)
    losses, g_hat, norms = _one_at_a_time(params, batch, weights)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    gradient = result.gradient
    if result.per_example:  # the optimizer stage averages them with the weights
        assert estimate is estimators.estimate_with_per_example_grads
        gradient = ab.transforms.weighted_mean(gradient, weights)
    chex.assert_trees_all_close(gradient, g_hat, rtol=1e-5, atol=1e-6)
    expected_feedback = {
        "grad_norm": norms,
        "logit_grad_norm": _logit_bound(params, batch),
        "loss": losses,
        "2 loss": 2.0 * losses,
    }[feedback]
    np.testing.assert_allclose(result.feedback, expected_feedback, rtol=1e-5)


def test_only_the_reusing_estimator_keeps_per_example_gradients():
    params, batch, weights = _problem()
    kept = estimators.estimate_with_per_example_grads(MODEL_LOSS, params, batch, weights, None)
    assert kept.per_example
    chex.assert_shape(kept.gradient["w"], (BATCH_SIZE, 3, 3))
    recomputed = estimators.estimate_with_vmap_norms(MODEL_LOSS, params, batch, weights, None)
    assert not recomputed.per_example
    chex.assert_shape(recomputed.gradient["w"], (3, 3))


def test_a_stochastic_loss_gets_the_same_per_example_keys_for_norms_and_gradient():
    """With dropout, G_hat must be the weighted mean of the same per-example gradients whose
    norms are the feedback: both passes use example k's key split(key, K)[k]."""
    params, batch, weights = _problem()

    def dropout_loss(p, b, key):
        keep = jax.random.bernoulli(key, 0.5, b["x"].shape)
        return _cross_entropy(_linear(p, {**b, "x": jnp.where(keep, 2.0 * b["x"], 0.0)}), b)

    key = jax.random.key(7)
    fused = estimators.estimate_with_vmap_norms(dropout_loss, params, batch, weights, key)
    kept = estimators.estimate_with_per_example_grads(dropout_loss, params, batch, weights, key)
    chex.assert_trees_all_close(
        fused.gradient, ab.transforms.weighted_mean(kept.gradient, weights), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(fused.feedback, kept.feedback, rtol=1e-6)
    np.testing.assert_allclose(fused.losses, kept.losses, rtol=1e-6)


def test_loss_estimator_checks_the_shape_of_the_losses():
    params, batch, weights = _problem()
    mean_loss = lambda p, b: jnp.mean(MODEL_LOSS(p, b))
    with pytest.raises(ValueError, match="per-example losses of shape"):
        estimators.estimate_with_loss(mean_loss, params, batch, weights, None)


def test_importance_weighted_grad_is_the_weighted_mean_and_carries_aux():
    params, batch = _problem()[:2]
    weights = jnp.linspace(0.5, 2.0, BATCH_SIZE)
    losses, g_hat = estimators.importance_weighted_grad(MODEL_LOSS, params, batch, weights)
    want_losses, stack = ab.feedback.per_example_losses_and_grads(MODEL_LOSS, params, batch)
    chex.assert_trees_all_close(
        g_hat, ab.transforms.weighted_mean(stack, weights), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)

    def loss_with_aux(p, b):
        logits = _linear(p, b)
        return _cross_entropy(logits, b), {"logits": logits}

    (aux_losses, aux), aux_grad = estimators.importance_weighted_grad(
        loss_with_aux, params, batch, weights, has_aux=True
    )
    chex.assert_trees_all_close(aux_grad, g_hat)
    np.testing.assert_allclose(aux_losses, losses)
    assert aux["logits"].shape == (BATCH_SIZE,) + params["b"].shape
