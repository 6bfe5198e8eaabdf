"""Per-example feedback: the scores f_k >= 0 from which a sampler learns p.

AdamBS (Liu, Wu, Mozafari, NeurIPS 2020, Algorithm 2) feeds the bandit the norm of each
sampled example's gradient, f_k = ||g_{i_k}||, or an upper bound of it; in expectation the
sampler then drives p_j proportional to f_j, the variance-minimizing distribution. The kinds:

* ``GradNorm(method="auto", reuse_per_example_grads=False)`` (``"grad_norm"``) — the exact
  per-example gradient norm ||d loss_k / d params||_2 over all parameters: ghost norms from
  one backward pass (``adambs_jax.feedback.ghost``) or ``vmap`` per-example gradients.
* ``LogitGradNorm()`` (``"logit_grad_norm"``) — the bound of Katharopoulos & Fleuret ("Not
  all samples are created equal", ICML 2018): ||d loss_k / d z_k||_2 with z_k the model
  outputs (logits) of example k. ||g_k|| <= C ||d loss_k / d z_k|| for a C that depends on
  the parameters only, so the bound is proportional to an upper bound of the gradient norm.
  It costs one forward pass and a backward pass through the loss only; it needs a
  ``ModelLoss``.
* ``LossValue()`` (``"loss"``) — the per-example loss itself (for losses >= 0).
* ``PreconditionedGradNorm()`` (``"preconditioned_grad_norm"``) — the norm of the
  per-example gradient preconditioned by the optimizer, ||g_k / (sqrt(v_hat) + eps)||_2,
  with v_hat Adam's/RMSProp's second moment read from the optimizer state
  (``_preconditioner``): the step an adaptive optimizer would take for example k (Lahire:
  p^GN is optimal for SGD, not for Adam). Exact ``vmap`` per-example gradients (ghost norms
  cannot apply a diagonal preconditioner). The train step's feedback only (a scoring
  sampler's ``score_fn`` has no optimizer state).
* ``CustomFeedback(fn)`` (or ``fn`` itself) — ``fn(params, batch, losses) -> (K,)`` of your
  own.

Samplers ignore feedback that is NaN, infinite or negative (``exp3_sampler`` counts it in
``state.num_dropped_feedback``; the train step reports the per-step count).

Each kind is an object that carries its own settings (options compose instead of step flags
that apply to one kind only) and knows how to score any examples (``scores``, for scoring
samplers) and how the train step computes it together with the gradient estimate
(``estimator``, ``_estimators``). The names of ``FEEDBACK_KINDS`` are shorthand for the
default object of each kind (``as_feedback``). A new kind is a ``Feedback`` subclass and,
if it has a shorthand, a name in ``FEEDBACK_KINDS``.

Every function here takes a batch (a pytree with leading axis K) and returns arrays with
leading axis K; all are jittable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

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
from adambs_jax.feedback.ghost import METHODS as GRAD_NORM_METHODS
from adambs_jax.feedback.ghost import per_example_grad_norms
from adambs_jax.samplers import FeedbackFn

__all__ = [
    "FEEDBACK_KINDS",
    "Feedback",
    "GradNorm",
    "LogitGradNorm",
    "LossValue",
    "PreconditionedGradNorm",
    "CustomFeedback",
    "as_feedback",
    "FeedbackFn",
    "tree_norms",
    "per_example_losses_and_grads",
    "per_example_losses",
    "per_example_grad_norms",
    "losses_and_output_grads",
    "logit_grad_norms",
    "preconditioned_grad_norms",
    "feedback_function",
]


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
    ``opt_state`` (``_preconditioner``: eps, b2 from ``inject_hyperparams`` where
    present, else 1e-8 and 0.999); the plain ||g_k|| before the optimizer's first update.

    Raises:
      ValueError: ``opt_state`` has no second moment (e.g. ``optax.sgd``'s).

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"; Kingma, Ba,
      "Adam", ICLR 2015.
    """
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return preconditioned_norms(grads, params, opt_state)


class Feedback:
    """The base of the feedback kinds: the per-example scores f_k >= 0 a sampler learns from.

    Attributes:
      name: the kind's shorthand (``FEEDBACK_KINDS``), for messages and records.
      needs_model_loss: the kind needs the model outputs, so a ``ModelLoss``.
      per_example_evaluation: the kind evaluates the model one example at a time (exact
        per-example gradients), so batch statistics would be per-example: refused with a
        ``model_state`` loss.
    """

    name: ClassVar[str] = "feedback"
    needs_model_loss: ClassVar[bool] = False
    per_example_evaluation: ClassVar[bool] = False

    def scores(self, loss_fn: PerExampleLoss, params: Any, batch: Any, key=None) -> jax.Array:
        """The (K,) feedback of any examples (a scoring sampler's ``score_fn``)."""
        raise NotImplementedError

    def estimator(self) -> EstimateFn:
        """The train step's estimator of G_hat and this feedback together."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class GradNorm(Feedback):
    """``"grad_norm"``: the exact per-example gradient norm ||g_k||_2 (AdamBS Algorithm 2).

    Attributes:
      method: ``"auto"`` (default: ghost norms, ``adambs_jax.feedback.ghost``, where a layer
        rule covers a parameter, else ``vmap``), ``"ghost"`` (forced; uncovered parameters
        get per-example copies, with a warning) or ``"vmap"`` (per-example gradients by
        ``jax.vmap``). All are exact: the same step to float32 rounding.
      reuse_per_example_grads: G_hat as the weighted mean of the K ``vmap`` per-example
        gradients that give the norms (no second gradient computation, but K x params floats
        are materialized); False (default): one more ``jax.grad`` of the weighted loss.
        Needs the ``vmap`` gradients: ``method`` ``"auto"`` or ``"vmap"``.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2; Goodfellow, "Efficient Per-Example Gradient Computations", 2015.
    """

    method: str = "auto"
    reuse_per_example_grads: bool = False
    name: ClassVar[str] = "grad_norm"
    per_example_evaluation: ClassVar[bool] = True

    def __post_init__(self):
        if self.method not in GRAD_NORM_METHODS:
            raise ValueError(f"method must be one of {GRAD_NORM_METHODS}, got {self.method!r}")
        if not isinstance(self.reuse_per_example_grads, bool):
            raise TypeError(
                f"reuse_per_example_grads must be a bool, got {self.reuse_per_example_grads!r}"
            )
        if self.reuse_per_example_grads and self.method == "ghost":
            raise ValueError(
                "reuse_per_example_grads=True reuses the vmap per-example gradients: it cannot "
                'be combined with method="ghost" (use method="auto" or "vmap")'
            )

    def scores(self, loss_fn, params, batch, key=None):
        return per_example_grad_norms(loss_fn, params, batch, key, method=self.method)

    def estimator(self) -> EstimateFn:
        if self.reuse_per_example_grads:
            return estimate_with_per_example_grads
        return {
            "auto": estimate_with_ghost_norms,
            "ghost": estimate_with_forced_ghost_norms,
            "vmap": estimate_with_vmap_norms,
        }[self.method]


@dataclasses.dataclass(frozen=True)
class LogitGradNorm(Feedback):
    """``"logit_grad_norm"``: the Katharopoulos–Fleuret bound ||d loss_k / d z_k||_2 of the
    gradient norm, z the model outputs; about the cost of one plain step. Needs a
    ``ModelLoss``.

    References:
      Katharopoulos, Fleuret, "Not All Samples Are Created Equal: Deep Learning with
      Importance Sampling", ICML 2018, §3.3.
    """

    name: ClassVar[str] = "logit_grad_norm"
    needs_model_loss: ClassVar[bool] = True

    def scores(self, loss_fn, params, batch, key=None):
        return logit_grad_norms(loss_fn, params, batch, key)

    def estimator(self) -> EstimateFn:
        return estimate_with_logit_bound


@dataclasses.dataclass(frozen=True)
class LossValue(Feedback):
    """``"loss"``: the per-example loss itself (for losses >= 0); costs nothing extra."""

    name: ClassVar[str] = "loss"

    def scores(self, loss_fn, params, batch, key=None):
        return _losses_as_scores(loss_fn, params, batch, key)

    def estimator(self) -> EstimateFn:
        return estimate_with_loss


@dataclasses.dataclass(frozen=True)
class PreconditionedGradNorm(Feedback):
    """``"preconditioned_grad_norm"``: ||g_k / (sqrt(v_hat) + eps)||_2 with v_hat the
    optimizer's second moment read from its state (exact ``vmap`` per-example gradients).
    The train step's feedback only: a scoring sampler's ``score_fn`` has no optimizer state.

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"; Kingma, Ba,
      "Adam", ICLR 2015.
    """

    name: ClassVar[str] = "preconditioned_grad_norm"
    per_example_evaluation: ClassVar[bool] = True

    def scores(self, loss_fn, params, batch, key=None):
        raise ValueError(
            'feedback "preconditioned_grad_norm" reads the optimizer state, which a scoring '
            "sampler's score_fn does not have: use it as the train step's feedback of a "
            "sampler that learns from it (exp3, priority, infobatch), or give the scoring "
            "sampler another score_feedback"
        )

    def estimator(self) -> EstimateFn:
        return estimate_with_preconditioned_norms


@dataclasses.dataclass(frozen=True)
class CustomFeedback(Feedback):
    """A feedback of your own: ``fn(params, batch, losses (K,)) -> scores (K,)``, computed
    from the per-example losses of the step's batch (G_hat from the weighted loss)."""

    fn: FeedbackFn
    name: ClassVar[str] = "custom"

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")

    def scores(self, loss_fn, params, batch, key=None):
        return self.fn(params, batch, _losses_as_scores(loss_fn, params, batch, key))

    def estimator(self) -> EstimateFn:
        return estimator_with_user_feedback(self.fn)


FEEDBACK_KINDS = ("grad_norm", "logit_grad_norm", "loss", "preconditioned_grad_norm")
"""The shorthand names of the built-in kinds: each stands for the default object."""

_SHORTHANDS: dict[str, type[Feedback]] = {
    kind.name: kind for kind in (GradNorm, LogitGradNorm, LossValue, PreconditionedGradNorm)
}


def as_feedback(feedback: Any, loss: Any = None, *, name: str = "feedback") -> Feedback:
    """``feedback`` as a ``Feedback`` object: a name of ``FEEDBACK_KINDS`` is its default
    object, a plain callable a ``CustomFeedback``; checked against the ``loss`` it will be
    computed from, when given (the one dispatch on feedback kinds).

    Raises:
      ValueError: unknown name, or a kind that needs the model outputs (``"logit_grad_norm"``)
        without a ``ModelLoss``.
      TypeError: neither a ``Feedback``, a name nor a callable.
    """
    if isinstance(feedback, str):
        if feedback not in _SHORTHANDS:
            raise ValueError(
                f"{name} must be one of {FEEDBACK_KINDS}, a Feedback object or a callable, "
                f"got {feedback!r}"
            )
        feedback = _SHORTHANDS[feedback]()
    elif not isinstance(feedback, Feedback):
        if not callable(feedback):
            raise TypeError(
                f"{name} must be one of {FEEDBACK_KINDS}, a Feedback object "
                f"(ab.feedback.GradNorm(...), ...) or a callable (params, batch, losses) -> "
                f"(K,), got {type(feedback).__name__}"
            )
        feedback = CustomFeedback(feedback)
    if loss is not None and feedback.needs_model_loss and not isinstance(loss, ModelLoss):
        raise ValueError(
            f"{name}={feedback.name!r} needs the model outputs: pass the loss as "
            f"ab.ModelLoss(apply_fn, loss_from_outputs) instead of a plain callable"
        )
    return feedback


def feedback_function(
    feedback: Any, loss_fn: PerExampleLoss
) -> Callable[[Any, Any, jax.Array | None], jax.Array]:
    """The feedback of a kind as one function ``(params, batch, key) -> scores (K,)``.

    Used to score arbitrary examples (e.g. a sampler's ``score_fn``); the train step fuses
    the feedback with the gradient computation instead.

    Args:
      feedback: a ``Feedback``, a name of ``FEEDBACK_KINDS`` or a callable ``(params, batch,
        losses) -> (K,)``.
      loss_fn: the per-example loss (a ``ModelLoss`` for ``"logit_grad_norm"``).
    """
    kind = as_feedback(feedback, loss_fn)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return lambda params, batch, key=None: kind.scores(loss_fn, params, batch, key)
