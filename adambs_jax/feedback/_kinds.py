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
* ``"preconditioned_grad_norm"`` — the norm of the per-example gradient preconditioned by
  the optimizer, ||g_k / (sqrt(v_hat) + eps)||_2, with v_hat Adam's/RMSProp's second moment
  read from the optimizer state (``adambs_jax.preconditioner``): the step an adaptive
  optimizer would take for example k (Lahire: p^GN is optimal for SGD, not for Adam). Exact
  ``vmap`` per-example gradients (ghost norms cannot apply a diagonal preconditioner). The
  train step's feedback only (a scoring sampler's ``score_fn`` has no optimizer state).
* a callable ``feedback(params, batch, losses) -> (K,)`` of your own.

Samplers ignore feedback that is NaN, infinite or negative (``exp3_sampler`` counts it in
``state.num_dropped_feedback``; the train step reports the per-step count).

Every kind is one entry of one table, ``FEEDBACK_REGISTRY``: how to score any examples with it
(``feedback_function``, for scoring samplers) and how the train step computes it together with
the gradient estimate (``adambs_jax.estimators``). A new kind is a name in ``FEEDBACK_KINDS``
and an entry in the table.

Every function here takes a batch (a pytree with leading axis K) and returns arrays with
leading axis K; all are jittable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from adambs_jax._tree_utils import batch_size_of
from adambs_jax._tree_utils import per_example_norms as tree_norms
from adambs_jax.feedback._estimators import (
    EstimateFn,
    estimate_with_forced_ghost_norms,
    estimate_with_ghost_norms,
    estimate_with_logit_bound,
    estimate_with_loss,
    estimate_with_per_example_grads,
    estimate_with_preconditioned_norms,
    estimate_with_vmap_norms,
    estimator_with_user_feedback,
)
from adambs_jax.feedback._losses import ModelLoss, PerExampleLoss, check_losses, with_key_argument
from adambs_jax.feedback._per_example import (
    losses_and_output_grads,
    per_example_losses,
    per_example_losses_and_grads,
)
from adambs_jax.feedback._preconditioner import preconditioned_norms
from adambs_jax.feedback.ghost import per_example_grad_norms
from adambs_jax.samplers import FeedbackFn

__all__ = [
    "FEEDBACK_KINDS",
    "FEEDBACK_REGISTRY",
    "FeedbackFn",
    "FeedbackKind",
    "batch_size_of",
    "tree_norms",
    "per_example_losses_and_grads",
    "per_example_losses",
    "per_example_grad_norms",
    "losses_and_output_grads",
    "logit_grad_norms",
    "preconditioned_grad_norms",
    "feedback_kind",
    "feedback_function",
    "check_feedback_kind",
]

FEEDBACK_KINDS = ("grad_norm", "logit_grad_norm", "loss", "preconditioned_grad_norm")
"""The names of the built-in feedback kinds (the keys of ``FEEDBACK_REGISTRY``)."""


def logit_grad_norms(
    model_loss: ModelLoss, params: Any, batch: Any, key: jax.Array | None = None
) -> jax.Array:
    """(K,) Katharopoulos–Fleuret bound ||d loss_k / d z_k||_2, z = ``model_loss.apply_fn``.

    For softmax cross-entropy on logits z this is ||softmax(z_k) - onehot(y_k)||_2. The
    ``"logit_grad_norm"`` feedback; cost: one forward pass plus the loss's backward pass.

    Args:
      model_loss: a ``ModelLoss(apply_fn, loss_from_outputs)``.
      params, batch, key: as for ``per_example_losses_and_grads``.

    References:
      Katharopoulos, Fleuret, "Not All Samples Are Created Equal: Deep Learning with
      Importance Sampling", ICML 2018, §3.3 (the upper bound of the gradient norm).
    """
    if not isinstance(model_loss, ModelLoss):
        raise TypeError(
            f"model_loss must be a ModelLoss(apply_fn, loss_from_outputs) (the bound needs the "
            f"model outputs), got {type(model_loss).__name__}"
        )
    outputs = model_loss.outputs(params, batch, key)
    _, output_grads = losses_and_output_grads(model_loss, outputs, batch)
    return tree_norms(output_grads)


def _losses_as_scores(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: jax.Array | None = None
) -> jax.Array:
    """The ``"loss"`` feedback: the (K,) per-example losses themselves."""
    return check_losses(with_key_argument(loss_fn)(params, batch, key), batch_size_of(batch))


def preconditioned_grad_norms(
    loss_fn: PerExampleLoss,
    params: Any,
    batch: Any,
    opt_state: Any,
    key: jax.Array | None = None,
) -> jax.Array:
    """(K,) ||g_k / (sqrt(v_hat) + eps)||_2: the per-example gradients (``vmap``) scaled by
    the optimizer's diagonal preconditioner, v_hat its (bias-corrected) second moment in
    ``opt_state`` (``adambs_jax.preconditioner``: eps, b2 from ``inject_hyperparams`` where
    present, else 1e-8 and 0.999); the plain ||g_k|| before the optimizer's first update.

    Raises:
      ValueError: ``opt_state`` has no second moment (e.g. ``optax.sgd``'s).

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"; Kingma, Ba,
      "Adam", ICLR 2015.
    """
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return preconditioned_norms(grads, params, opt_state)


def _refuse_scoring_without_optimizer_state(loss_fn, params, batch, key=None):
    raise ValueError(
        'feedback "preconditioned_grad_norm" reads the optimizer state, which a scoring '
        "sampler's score_fn does not have: use it as the train step's feedback of a sampler "
        "that learns from it (exp3, priority, infobatch), or give the scoring sampler another "
        "score_feedback"
    )


class FeedbackKind(NamedTuple):
    """How one kind of feedback is computed, alone and fused with the gradient estimate.

    Attributes:
      scores: ``(loss_fn, params, batch, key=None) -> (K,)``, the feedback of any examples
        (``feedback_function``; a scoring sampler's ``score_fn``).
      estimate: the train step's estimator of G_hat and this feedback together
        (``adambs_jax.estimators``).
      estimate_reusing_grads: the estimator for ``reuse_per_example_grads=True`` (G_hat as
        the weighted mean of stored per-example gradients); None if the kind has no
        per-example gradients to reuse (the option then changes nothing).
      needs_model_loss: the kind needs the model outputs, so a ``ModelLoss``.
      estimate_by_vmap: the estimator for ``grad_norm_method="vmap"``; None if the kind has
        no other way.
      estimate_by_ghost: the estimator for ``grad_norm_method="ghost"``; None likewise.
      per_example_evaluation: the kind evaluates the model one example at a time (exact
        per-example gradients), so batch statistics would be per-example: refused with
        model state (``adambs_jax.model_state``).
    """

    scores: Callable[..., jax.Array]
    estimate: EstimateFn
    estimate_reusing_grads: EstimateFn | None = None
    needs_model_loss: bool = False
    estimate_by_vmap: EstimateFn | None = None
    estimate_by_ghost: EstimateFn | None = None
    per_example_evaluation: bool = False

    def estimator(
        self, reuse_per_example_grads: bool, grad_norm_method: str = "auto"
    ) -> EstimateFn:
        """The train step's estimator for the given ``reuse_per_example_grads`` and, for
        ``"grad_norm"``, ``grad_norm_method`` (``"vmap"`` selects ``estimate_by_vmap``,
        ``"ghost"`` ``estimate_by_ghost``)."""
        if reuse_per_example_grads and self.estimate_reusing_grads is not None:
            return self.estimate_reusing_grads
        if grad_norm_method == "vmap" and self.estimate_by_vmap is not None:
            return self.estimate_by_vmap
        if grad_norm_method == "ghost" and self.estimate_by_ghost is not None:
            return self.estimate_by_ghost
        return self.estimate


FEEDBACK_REGISTRY: dict[str, FeedbackKind] = {
    "grad_norm": FeedbackKind(
        per_example_grad_norms,
        estimate_with_ghost_norms,
        estimate_reusing_grads=estimate_with_per_example_grads,
        estimate_by_vmap=estimate_with_vmap_norms,
        estimate_by_ghost=estimate_with_forced_ghost_norms,
        per_example_evaluation=True,
    ),
    "logit_grad_norm": FeedbackKind(
        logit_grad_norms, estimate_with_logit_bound, needs_model_loss=True
    ),
    "loss": FeedbackKind(_losses_as_scores, estimate_with_loss),
    "preconditioned_grad_norm": FeedbackKind(
        _refuse_scoring_without_optimizer_state,
        estimate_with_preconditioned_norms,
        per_example_evaluation=True,
    ),
}
"""Every built-in feedback kind (``FEEDBACK_KINDS``) and how it is computed."""


def _user_feedback_kind(feedback: FeedbackFn) -> FeedbackKind:
    """A callable ``(params, batch, losses) -> (K,)`` as a kind: scores of the losses."""

    def scores(loss_fn, params, batch, key=None):
        return feedback(params, batch, _losses_as_scores(loss_fn, params, batch, key))

    return FeedbackKind(scores, estimator_with_user_feedback(feedback))


def feedback_kind(
    feedback: str | FeedbackFn, loss_fn: PerExampleLoss, *, name: str = "feedback"
) -> FeedbackKind:
    """The ``FeedbackKind`` of a kind name or a callable, validated against the loss it will
    be computed from (the one dispatch on feedback kinds).

    Raises:
      ValueError: unknown name, or a kind that needs the model outputs (``"logit_grad_norm"``)
        without a ``ModelLoss``.
      TypeError: neither a string nor a callable.
    """
    if isinstance(feedback, str):
        if feedback not in FEEDBACK_KINDS:
            raise ValueError(
                f"{name} must be one of {FEEDBACK_KINDS} or a callable, got {feedback!r}"
            )
        kind = FEEDBACK_REGISTRY[feedback]
        if kind.needs_model_loss and not isinstance(loss_fn, ModelLoss):
            raise ValueError(
                f"{name}={feedback!r} needs the model outputs: pass the loss as "
                f"ab.ModelLoss(apply_fn, loss_from_outputs) instead of a plain callable"
            )
        return kind
    if not callable(feedback):
        raise TypeError(
            f"{name} must be one of {FEEDBACK_KINDS} or a callable "
            f"(params, batch, losses) -> (K,), got {type(feedback).__name__}"
        )
    return _user_feedback_kind(feedback)


def check_feedback_kind(
    feedback: str | FeedbackFn, loss_fn: PerExampleLoss, *, name: str = "feedback"
) -> None:
    """Validates a feedback kind against the loss it will be computed from.

    Raises:
      ValueError: unknown name, or ``"logit_grad_norm"`` without a ``ModelLoss``.
      TypeError: neither a string nor a callable.
    """
    feedback_kind(feedback, loss_fn, name=name)


def feedback_function(
    feedback: str | FeedbackFn, loss_fn: PerExampleLoss
) -> Callable[[Any, Any, jax.Array | None], jax.Array]:
    """The feedback of a kind as one function ``(params, batch, key) -> scores (K,)``.

    Used to score arbitrary examples (e.g. a sampler's ``score_fn``); the train step fuses
    the feedback with the gradient computation instead.

    Args:
      feedback: a kind of ``FEEDBACK_KINDS`` or a callable ``(params, batch, losses) ->
        (K,)``.
      loss_fn: the per-example loss (a ``ModelLoss`` for ``"logit_grad_norm"``).
    """
    kind = feedback_kind(feedback, loss_fn)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return lambda params, batch, key=None: kind.scores(loss_fn, params, batch, key)
