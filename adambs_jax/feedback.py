"""Per-example feedback: the scores f_k >= 0 from which a sampler learns p.

AdamBS (Liu, Wu, Mozafari, NeurIPS 2020, Algorithm 2) feeds the bandit the norm of each
sampled example's gradient, f_k = ||g_{i_k}||, or an upper bound of it; in expectation the
sampler then drives p_j proportional to f_j, the variance-minimizing distribution. The kinds:

* ``"grad_norm"`` — the exact per-example gradient norm ||d loss_k / d params||_2 over all
  parameters, from ``jax.vmap(jax.grad(...))``: K per-example gradients (memory K x params).
* ``"logit_grad_norm"`` — the bound of Katharopoulos & Fleuret ("Not all samples are created
  equal", ICML 2018): ||d loss_k / d z_k||_2 with z_k the model outputs (logits) of example
  k. ||g_k|| <= C ||d loss_k / d z_k|| for a C that depends on the parameters only, so the
  bound is proportional to an upper bound of the gradient norm. It costs one forward pass
  and a backward pass through the loss only; it needs a ``ModelLoss``.
* ``"loss"`` — the per-example loss itself (for losses >= 0).
* a callable ``feedback(params, batch, losses) -> (K,)`` of your own.

Samplers ignore feedback that is NaN, infinite or negative (``exp3_sampler`` counts it in
``state.num_dropped_feedback``; the train step reports the per-step count).

Every function here takes a batch (a pytree with leading axis K) and returns arrays with
leading axis K; all are jittable.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from adambs_jax.losses import ModelLoss, PerExampleLoss, check_losses, with_key_argument

__all__ = [
    "FEEDBACK_KINDS",
    "FeedbackFn",
    "batch_size_of",
    "tree_norms",
    "per_example_losses_and_grads",
    "per_example_losses",
    "per_example_grad_norms",
    "losses_and_output_grads",
    "logit_grad_norms",
    "feedback_function",
    "check_feedback_kind",
]

FEEDBACK_KINDS = ("grad_norm", "logit_grad_norm", "loss")

FeedbackFn = Callable[[Any, Any, jax.Array], jax.Array]
"""A user feedback: ``(params, batch, losses (K,)) -> scores (K,)``."""


def batch_size_of(batch: Any, *, name: str = "batch") -> int:
    """K, the common leading axis of every leaf of ``batch``.

    Raises:
      ValueError: ``batch`` has no array leaves, a scalar leaf, or leaves of different K.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError(
            f"{name} must be a pytree of arrays with a leading batch axis, got no leaves"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) < 1:
            raise ValueError(
                f"{name}: every leaf needs a leading batch axis; leaf "
                f"{jax.tree_util.keystr(path)} is a scalar"
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        raise ValueError(f"{name}: leaves have different leading axes {sorted(sizes)} ({sizes})")
    return next(iter(sizes))


def tree_norms(per_example_tree: Any) -> jax.Array:
    """(K,) L2 norms over all leaves of a per-example pytree (every leaf (K, ...)).

    norms_k = sqrt(sum_leaves sum_{non-leading axes} leaf[k]^2), accumulated in float32 (or
    the leaves' dtype if wider).
    """
    leaves = jax.tree.leaves(per_example_tree)
    batch_size = batch_size_of(per_example_tree, name="per_example_tree")

    def squared_norms(leaf):
        dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        return jnp.sum(jnp.square(leaf.astype(dtype)).reshape(batch_size, -1), axis=1)

    return jnp.sqrt(sum(squared_norms(leaf) for leaf in leaves))


def per_example_losses_and_grads(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: Optional[jax.Array] = None
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
    losses, grads = jax.vmap(
        jax.value_and_grad(single_example_loss), in_axes=(None, 0, key_axis)
    )(params, batch, keys)
    return losses, grads


def per_example_losses(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: Optional[jax.Array] = None
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


def per_example_grad_norms(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: Optional[jax.Array] = None
) -> jax.Array:
    """(K,) exact per-example gradient norms ||d loss_k / d params||_2 over all parameters.

    The ``"grad_norm"`` feedback of AdamBS (Algorithm 2). See
    ``per_example_losses_and_grads`` for the arguments.
    """
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return tree_norms(grads)


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


def logit_grad_norms(
    model_loss: ModelLoss, params: Any, batch: Any, key: Optional[jax.Array] = None
) -> jax.Array:
    """(K,) Katharopoulos–Fleuret bound ||d loss_k / d z_k||_2, z = ``model_loss.apply_fn``.

    For softmax cross-entropy on logits z this is ||softmax(z_k) - onehot(y_k)||_2. The
    ``"logit_grad_norm"`` feedback; cost: one forward pass plus the loss's backward pass.

    Args:
      model_loss: a ``ModelLoss(apply_fn, loss_from_outputs)``.
      params, batch, key: as for ``per_example_losses_and_grads``.
    """
    if not isinstance(model_loss, ModelLoss):
        raise TypeError(
            f"model_loss must be a ModelLoss(apply_fn, loss_from_outputs) (the bound needs the "
            f"model outputs), got {type(model_loss).__name__}"
        )
    outputs = model_loss.outputs(params, batch, key)
    _, output_grads = losses_and_output_grads(model_loss, outputs, batch)
    return tree_norms(output_grads)


def check_feedback_kind(
    feedback: Union[str, FeedbackFn], loss_fn: PerExampleLoss, *, name: str = "feedback"
) -> None:
    """Validates a feedback kind against the loss it will be computed from.

    Raises:
      ValueError: unknown name, or ``"logit_grad_norm"`` without a ``ModelLoss``.
      TypeError: neither a string nor a callable.
    """
    if isinstance(feedback, str):
        if feedback not in FEEDBACK_KINDS:
            raise ValueError(
                f"{name} must be one of {FEEDBACK_KINDS} or a callable, got {feedback!r}"
            )
        if feedback == "logit_grad_norm" and not isinstance(loss_fn, ModelLoss):
            raise ValueError(
                f"{name}='logit_grad_norm' needs the model outputs: pass the loss as "
                f"ab.ModelLoss(apply_fn, loss_from_outputs) instead of a plain callable"
            )
    elif not callable(feedback):
        raise TypeError(
            f"{name} must be one of {FEEDBACK_KINDS} or a callable "
            f"(params, batch, losses) -> (K,), got {type(feedback).__name__}"
        )


def feedback_function(
    feedback: Union[str, FeedbackFn], loss_fn: PerExampleLoss
) -> Callable[[Any, Any, Optional[jax.Array]], jax.Array]:
    """The feedback of a kind as one function ``(params, batch, key) -> scores (K,)``.

    Used to score arbitrary examples (e.g. a sampler's ``score_fn``); the train step fuses
    the feedback with the gradient computation instead.

    Args:
      feedback: ``"grad_norm"``, ``"logit_grad_norm"``, ``"loss"`` or a callable
        ``(params, batch, losses) -> (K,)``.
      loss_fn: the per-example loss (a ``ModelLoss`` for ``"logit_grad_norm"``).
    """
    check_feedback_kind(feedback, loss_fn)
    loss = with_key_argument(loss_fn)

    if isinstance(feedback, str) and feedback == "grad_norm":
        return lambda params, batch, key=None: per_example_grad_norms(loss_fn, params, batch, key)
    if isinstance(feedback, str) and feedback == "logit_grad_norm":
        return lambda params, batch, key=None: logit_grad_norms(loss_fn, params, batch, key)
    if isinstance(feedback, str) and feedback == "loss":
        return lambda params, batch, key=None: check_losses(
            loss(params, batch, key), batch_size_of(batch)
        )

    def user_feedback(params, batch, key=None):
        losses = check_losses(loss(params, batch, key), batch_size_of(batch))
        return feedback(params, batch, losses)

    return user_feedback
