"""Per-example losses and gradients: the building blocks of the feedback and of the step.

Bandit sampling needs, for each example k of a batch, its own loss loss_k and either its own
gradient g_k = d loss_k / d params (the ``"grad_norm"`` feedback, ||g_k||_2) or the gradient of
its loss with respect to its own model outputs z_k (the ``"logit_grad_norm"`` bound of
Katharopoulos & Fleuret, ICML 2018, ||d loss_k / d z_k||_2). Both come from one batched
computation:

* per-example gradients: ``jax.vmap(jax.value_and_grad(loss of one example))``, with example k
  getting ``jax.random.split(key, K)[k]`` (its own dropout mask);
* output gradients: one ``jax.vjp`` through ``loss_from_outputs`` with cotangent ones(K); since
  loss_k depends on row k of the outputs only, row k of the result is d loss_k / d z_k.

``_kinds`` turns them into scores; ``_estimators`` fuses them with the gradient estimate of
the train step.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 (the feedback f_k = ||g_{i_k}||).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adambs_jax._tree_utils import batch_size_of
from adambs_jax.feedback._losses import ModelLoss, PerExampleLoss, check_losses, with_key_argument

__all__ = [
    "per_example_losses_and_grads",
    "per_example_losses",
    "losses_and_output_grads",
    "vmap_grads_and_weighted_grad",
]


def per_example_losses_and_grads(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: jax.Array | None = None
) -> tuple[jax.Array, Any]:
    """Per-example losses (K,) and gradients g_k = d loss_k / d params (leaves (K, ...)).

    Uses ``jax.vmap(jax.value_and_grad(...))`` over the examples: ``loss_fn`` is called on
    batches of one example (leaves (1, ...)) and must return shape (1,). If ``loss_fn`` takes
    a key, example k gets ``jax.random.split(key, K)[k]`` (independent dropout per example).

    Args:
      loss_fn: ``(params, batch[, key]) -> (K,)`` or a ``ModelLoss``.
      params: the parameters (any pytree).
      batch: a pytree with leading axis K.
      key: optional PRNG key for a stochastic model.

    Returns:
      ``(losses (K,), grads)`` with grads a pytree like params with a leading K axis.
    """
    single_example_loss, keys, key_axis = _single_example_loss(loss_fn, batch, key)
    losses, grads = jax.vmap(jax.value_and_grad(single_example_loss), in_axes=(None, 0, key_axis))(
        params, batch, keys
    )
    return losses, grads


def per_example_losses(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: jax.Array | None = None
) -> jax.Array:
    """(K,) losses evaluated one example at a time under ``jax.vmap``, with the same
    per-example keys as ``per_example_losses_and_grads`` (so the same dropout masks)."""
    single_example_loss, keys, key_axis = _single_example_loss(loss_fn, batch, key)
    return jax.vmap(single_example_loss, in_axes=(None, 0, key_axis))(params, batch, keys)


def _single_example_loss(loss_fn, batch, key):
    """``(params, example, example_key) -> scalar``, the per-example keys and their vmap axis."""
    batch_size = batch_size_of(batch)
    loss = with_key_argument(loss_fn)

    def single_example_loss(p, example, example_key):
        one = jax.tree.map(lambda leaf: leaf[None], example)
        losses = check_losses(loss(p, one, example_key), 1)
        return losses[0]

    keys = None if key is None else jax.random.split(key, batch_size)
    return single_example_loss, keys, None if key is None else 0


def losses_and_output_grads(
    model_loss: ModelLoss, outputs: Any, batch: Any
) -> tuple[jax.Array, Any]:
    """Per-example losses (K,) and d loss_k / d outputs_k (same shape as ``outputs``).

    One backward pass through ``loss_from_outputs`` only (a vjp with cotangent ones(K)):
    since loss k depends on row k of the outputs only, row k of the result is
    d loss_k / d outputs_k.
    """
    if not isinstance(model_loss, ModelLoss):
        raise TypeError(f"model_loss must be a ModelLoss, got {type(model_loss).__name__}")
    batch_size = batch_size_of(batch)
    losses, pullback = jax.vjp(lambda z: model_loss.loss_from_outputs(z, batch), outputs)
    check_losses(losses, batch_size, name="loss_from_outputs")
    (output_grads,) = pullback(jnp.ones_like(losses))
    return losses, output_grads


def vmap_grads_and_weighted_grad(loss_fn, params, batch, weights, key):
    """``(losses (K,), G_hat, per-example grads)``: the per-example gradients by ``vmap`` and
    G_hat = grad of (1/K) sum_k w_k loss_k from one more backward pass of the weighted loss
    (the same per-example keys). The vmap path of the exact ``"grad_norm"`` feedback, shared
    by the estimators and by ghost norms' fallback."""
    # the per-example gradients only feed the norms, so XLA can reduce them as they are
    # produced instead of materializing K x params; G_hat is one more (cheap) backward pass
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)

    def weighted_loss(p):
        losses = per_example_losses(loss_fn, p, batch, key)  # same per-example keys
        return jnp.mean(weights.astype(losses.dtype) * losses), losses

    (_, losses), gradient = jax.value_and_grad(weighted_loss, has_aux=True)(params)
    return losses, gradient, grads
