"""The train step's estimators: the gradient estimate G_hat and the feedback of one batch,
computed together.

A batch of K draws i_1..i_K with importance weights w_k = 1 / (n p_{i_k}) gives the unbiased
estimate of the mean gradient (Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep
Learning", NeurIPS 2020, eq. 1)

    G_hat = (1/K) sum_k w_k g_{i_k} = grad of (1/K) sum_k w_k loss_k,

and the sampler needs one score f_k per draw (Algorithm 2). Each feedback kind has its own
cheapest way of producing both:

* ``"grad_norm"``: by default ghost norms (``estimate_with_ghost_norms``): the exact norms
  and G_hat from one forward and one backward pass, layer by layer (``adambs_jax.feedback.ghost``);
  or the per-example gradients (``vmap(grad)``) for the norms and G_hat from one more
  ``jax.grad`` of the weighted loss (``estimate_with_vmap_norms``; XLA reduces each
  per-example gradient to its norm without storing K x params floats), or the weighted mean
  of the stored per-example gradients (``estimate_with_per_example_grads``);
* ``"logit_grad_norm"``: one forward pass, d loss_k / d z_k by a backward pass through the
  loss only, then one backward pass through the model with cotangent (w_k / K) d loss_k / d z_k,
  which is G_hat (``estimate_with_logit_bound``) — about the cost of one plain step;
* ``"preconditioned_grad_norm"``: the per-example gradients (``vmap(grad)``), scaled by the
  optimizer's preconditioner, e.g. Adam's 1 / (sqrt(v_hat) + eps) (``_preconditioner``),
  for the norms, and G_hat from one more ``jax.grad`` of the weighted loss
  (``preconditioned_estimator``: an ``OptimizerAwareEstimator``, the one kind that also
  reads the optimizer state, carrying the hyperparameters stated on the feedback);
* ``"loss"`` and callables: G_hat = grad of the weighted loss (one ``jax.grad``) and the
  feedback from the per-example losses (``estimate_with_loss``, ``estimator_with_user_feedback``).

Every estimator is ``(loss_fn, params, batch, weights (K,), key) -> Estimate`` (an
``OptimizerAwareEstimator`` also takes ``opt_state=``). Which one a kind
uses is the kind's own choice: ``Feedback.estimator()`` of its object (``_kinds``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp

from adambs_jax._tree_utils import per_example_norms
from adambs_jax.feedback import ghost
from adambs_jax.feedback._losses import (
    Loss,
    ModelLoss,
    PerExampleLoss,
    check_losses,
    with_key_argument,
)
from adambs_jax.feedback._per_example import (
    losses_and_output_grads,
    per_example_losses_and_grads,
    vmap_grads_and_weighted_grad,
)
from adambs_jax.feedback._preconditioner import (
    NOTHING_STATED,
    OptimizerFacts,
    Stated,
    preconditioned_norms,
)

__all__ = [
    "Estimate",
    "EstimateFn",
    "estimate_with_ghost_norms",
    "estimate_with_forced_ghost_norms",
    "estimate_with_per_example_grads",
    "estimate_with_vmap_norms",
    "estimate_with_logit_bound",
    "estimate_with_loss",
    "OptimizerAwareEstimator",
    "estimate_with_preconditioned_norms",
    "preconditioned_estimator",
    "importance_weighted_grad",
    "estimator_with_user_feedback",
]


class Estimate(NamedTuple):
    """The gradient and feedback of one batch.

    Attributes:
      losses: (K,) per-example losses.
      gradient: G_hat (``per_example=False``) or the per-example gradients with a leading K
        axis (``per_example=True``; the optimizer stage averages them with the weights).
      feedback: (K,) the scores for the sampler.
      per_example: which of the two ``gradient`` is.
    """

    losses: jax.Array
    gradient: Any
    feedback: jax.Array
    per_example: bool


EstimateFn = Callable[[PerExampleLoss, Any, Any, jax.Array, jax.Array | None], Estimate]
"""``(loss_fn, params, batch, weights (K,), key) -> Estimate``."""


def estimate_with_per_example_grads(loss_fn, params, batch, weights, key) -> Estimate:
    """``GradNorm(reuse_per_example_grads=True)``: the K per-example gradients are
    kept (``per_example=True``) and their norms are the feedback."""
    losses, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return Estimate(losses, grads, per_example_norms(grads), per_example=True)


def estimate_with_ghost_norms(loss_fn, params, batch, weights, key) -> Estimate:
    """``"grad_norm"`` (default, ``GradNorm(method="auto")``): the exact norms and G_hat from
    one backward pass (``adambs_jax.feedback.ghost``: per-layer ghost norms, per-example
    copies for the parameters no layer rule covers; the vmap path when no layer is covered)."""
    losses, gradient, norms = ghost.ghost_losses_grad_and_norms(
        loss_fn, params, batch, weights, key, method="auto"
    )
    return Estimate(losses, gradient, norms, per_example=False)


def estimate_with_forced_ghost_norms(loss_fn, params, batch, weights, key) -> Estimate:
    """``GradNorm(method="ghost")``: ghost norms even where no layer rule
    covers a parameter (those get per-example copies, with a warning naming them)."""
    losses, gradient, norms = ghost.ghost_losses_grad_and_norms(
        loss_fn, params, batch, weights, key, method="ghost"
    )
    return Estimate(losses, gradient, norms, per_example=False)


def estimate_with_vmap_norms(loss_fn, params, batch, weights, key) -> Estimate:
    """``"grad_norm"`` by ``vmap``: the norms from per-example gradients, G_hat from the
    weighted loss."""
    losses, gradient, grads = vmap_grads_and_weighted_grad(loss_fn, params, batch, weights, key)
    return Estimate(losses, gradient, per_example_norms(grads), per_example=False)


class OptimizerAwareEstimator(NamedTuple):
    """An estimator whose feedback reads the optimizer state: the train step calls it as
    ``estimate(loss_fn, params, batch, weights, key, opt_state=state.opt_state)`` (and only
    this kind of estimator gets ``opt_state``, so every other step compiles as before)."""

    estimate: Callable[..., Estimate]

    def __call__(self, loss_fn, params, batch, weights, key, opt_state=None) -> Estimate:
        if opt_state is None:
            raise ValueError("opt_state: this feedback reads the optimizer state; pass it")
        return self.estimate(loss_fn, params, batch, weights, key, opt_state)


def preconditioned_estimator(
    stated: Stated = NOTHING_STATED, facts: OptimizerFacts | None = None
) -> OptimizerAwareEstimator:
    """The estimator of ``PreconditionedGradNorm``: f_k = ||P * g_k|| from the ``vmap``
    per-example gradients and the optimizer's preconditioner P (``_preconditioner``: its
    second moment with the hyperparameters injected in the state, else ``stated``; the
    plain ||g_k|| before its first update), G_hat from the weighted loss.

    Args:
      stated: the hyperparameters stated on the feedback.
      facts: ``inspect_optimizer`` of the step's optimizer (None: a ``ScaleByAdamState``
        needs ``kind="adam"`` stated).

    What the state shows is refused when the step is traced, naming the fix: an optimizer
    without a second moment (``optax.sgd``), hyperparameters neither injected nor stated.
    """

    def estimate(loss_fn, params, batch, weights, key, opt_state) -> Estimate:
        losses, gradient, grads = vmap_grads_and_weighted_grad(loss_fn, params, batch, weights, key)
        feedback = preconditioned_norms(grads, params, opt_state, stated, facts)
        return Estimate(losses, gradient, feedback, per_example=False)

    return OptimizerAwareEstimator(estimate)


estimate_with_preconditioned_norms = preconditioned_estimator()
"""The estimator of ``PreconditionedGradNorm()`` with nothing stated: every hyperparameter
read from an ``optax.inject_hyperparams`` state, or refused (``preconditioned_estimator``)."""


def estimate_with_logit_bound(model_loss: ModelLoss, params, batch, weights, key) -> Estimate:
    """``"logit_grad_norm"``: G_hat by one backward pass through the model whose cotangent is
    the output gradients scaled by w_k / K; their norms are the feedback."""
    outputs, model_pullback = jax.vjp(lambda p: model_loss.outputs(p, batch, key), params)
    losses, output_grads = losses_and_output_grads(model_loss, outputs, batch)
    scale = weights.astype(jnp.float32) / weights.shape[0]

    def weighted_cotangent(g):  # row k scaled by w_k / K
        return g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

    (gradient,) = model_pullback(jax.tree.map(weighted_cotangent, output_grads))
    return Estimate(losses, gradient, per_example_norms(output_grads), per_example=False)


def _weighted_loss_and_grad(loss_fn, params, batch, weights, key):
    """The (K,) losses and G_hat = grad of (1/K) sum_k w_k loss_k (one ``jax.grad``)."""
    return importance_weighted_grad(loss_fn, params, batch, weights, key)


@overload
def importance_weighted_grad(
    loss_fn: PerExampleLoss | Loss,
    params,
    batch,
    weights: jax.Array,
    key: jax.Array | None = None,
    *,
    has_aux: Literal[False] = False,
) -> tuple[jax.Array, Any]: ...


@overload
def importance_weighted_grad(
    loss_fn: PerExampleLoss | Loss,
    params,
    batch,
    weights: jax.Array,
    key: jax.Array | None = None,
    *,
    has_aux: bool,
) -> tuple[Any, Any]: ...


def importance_weighted_grad(
    loss_fn: PerExampleLoss | Loss,
    params,
    batch,
    weights: jax.Array,
    key: jax.Array | None = None,
    *,
    has_aux: bool = False,
):
    """``(losses (K,), G_hat)``: the importance-weighted gradient of a hand-written loop.

    G_hat = grad of (1/K) sum_k w_k loss_k(params) = (1/K) sum_k w_k g_{i_k} (Liu, Wu,
    Mozafari, NeurIPS 2020, eq. 1), from one batched ``jax.grad`` (batch statistics, if the
    model has any, are those of the batch). Give G_hat to any optax optimizer without
    ``weights`` (``tx.update(G_hat, opt_state, params)``); wrappers and clipping then see the
    averaged gradient, as in ``make_train_step``.

    Args:
      loss_fn: ``(params, batch[, key]) -> (K,)``, or with ``has_aux`` ``-> ((K,), aux)``;
        or an ``ab.Loss`` (its ``has_aux`` counts as the argument's).
      params: the parameters; batch: leaves (K, ...); weights: (K,) = 1 / (n p_I).
      key: passed to a loss that takes one.
      has_aux: the loss returns ``(losses, aux)``; then the result is
        ``((losses, aux), G_hat)``.
    """
    if isinstance(loss_fn, Loss):
        has_aux = has_aux or loss_fn.has_aux
        loss_fn = loss_fn._replace(has_aux=False)  # the stated call, aux and all
    loss = with_key_argument(loss_fn)
    batch_size = weights.shape[0]

    def weighted_loss(p):
        out = loss(p, batch, key)
        losses, aux = out if has_aux else (out, None)
        losses = check_losses(losses, batch_size)
        return jnp.mean(weights.astype(losses.dtype) * losses), (losses, aux)

    (_, (losses, aux)), gradient = jax.value_and_grad(weighted_loss, has_aux=True)(params)
    return ((losses, aux) if has_aux else losses), gradient


def estimate_with_loss(loss_fn, params, batch, weights, key) -> Estimate:
    """``"loss"``: G_hat from the weighted loss; the losses themselves are the feedback."""
    losses, gradient = _weighted_loss_and_grad(loss_fn, params, batch, weights, key)
    return Estimate(losses, gradient, losses, per_example=False)


def estimator_with_user_feedback(
    feedback: Callable[[Any, Any, jax.Array], jax.Array],
) -> EstimateFn:
    """The estimator of a callable feedback ``(params, batch, losses) -> (K,)``: G_hat from the
    weighted loss, the feedback from the user's function of the losses."""

    def estimate(loss_fn, params, batch, weights, key) -> Estimate:
        losses, gradient = _weighted_loss_and_grad(loss_fn, params, batch, weights, key)
        return Estimate(losses, gradient, feedback(params, batch, losses), per_example=False)

    return estimate
