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
* ``PreconditionedGradNorm(b2=..., eps=...)`` (``"preconditioned_grad_norm"``) — the norm
  of the per-example gradient preconditioned by the optimizer, e.g. Adam's
  ||g_k / (sqrt(v_hat) + eps)||_2 with v_hat its second moment read from the optimizer state
  (``_preconditioner``): the step an adaptive optimizer would take for example k (Lahire:
  p^GN is optimal for SGD, not for Adam). The hyperparameters the state does not record are
  stated on the object (or read from an ``optax.inject_hyperparams`` state), and checked
  against the optimizer when the step is built; none is assumed. Exact ``vmap``
  per-example gradients (ghost norms cannot apply a diagonal preconditioner). The train
  step's feedback only (a scoring sampler's ``score_fn`` has no optimizer state).
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
from typing import Any, ClassVar, cast

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
    preconditioned_estimator,
)
from adambs_jax.feedback._losses import ModelLoss, PerExampleLoss, check_losses, with_key_argument
from adambs_jax.feedback._per_example import (
    losses_and_output_grads,
    per_example_losses,
    per_example_losses_and_grads,
)
from adambs_jax.feedback._preconditioner import (
    NOTHING_STATED,
    Stated,
    check_against_optimizer,
    check_stated,
    inspect_optimizer,
    preconditioned_norms,
)
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
    *,
    optimizer: Any = None,
    b2: float | None = None,
    eps: float | None = None,
    eps_root: float | None = None,
    eps_in_sqrt: bool | None = None,
    kind: str | None = None,
) -> jax.Array:
    """(K,) f_k = ||P * g_k||_2: the per-example gradients (``vmap``) scaled by the
    optimizer's diagonal preconditioner P, e.g. Adam's 1 / (sqrt(v_hat) + eps) with v_hat its
    bias-corrected second moment in ``opt_state``; the plain ||g_k|| before the optimizer's
    first update. What ``PreconditionedGradNorm`` gives the train step, for any examples.

    Args:
      loss_fn, params, batch, key: as for ``per_example_losses_and_grads``.
      opt_state: the optimizer's state.
      optimizer: the optimizer of ``opt_state``, to check the stated hyperparameters against
        and to tell Adam's ``ScaleByAdamState`` from Adamax's (without it, ``kind="adam"``
        must be stated for one).
      b2, eps, eps_root, eps_in_sqrt, kind: the hyperparameters, as for
        ``PreconditionedGradNorm``; those an ``optax.inject_hyperparams`` state holds are read
        from it.

    Raises:
      ValueError: as ``PreconditionedGradNorm``: no second moment (``optax.sgd``),
        hyperparameters neither injected nor stated (naming the fix), stated ones that differ
        from the optimizer's, Adamax / Yogi.

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"; Kingma, Ba,
      "Adam", ICLR 2015.
    """
    feedback = PreconditionedGradNorm(b2, eps, eps_root, eps_in_sqrt, kind)
    facts = None
    if optimizer is not None:
        facts = inspect_optimizer(optimizer)
        check_against_optimizer(feedback.stated, facts)
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return preconditioned_norms(grads, params, opt_state, feedback.stated, facts)


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
        # a ModelLoss: as_feedback checks it (needs_model_loss), logit_grad_norms again
        return logit_grad_norms(cast(ModelLoss, loss_fn), params, batch, key)

    def estimator(self) -> EstimateFn:
        # called with the step's ModelLoss only (as_feedback checks needs_model_loss)
        return cast(EstimateFn, estimate_with_logit_bound)


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
    """``"preconditioned_grad_norm"``: f_k = ||P * g_k||_2, the per-example gradient g_k
    (exact, ``vmap``) scaled by the optimizer's diagonal preconditioner P, the step an
    adaptive optimizer would take for example k (``_preconditioner``):

    * Adam (AdamW, NAdam, LAMB, RAdam): P = 1 / (sqrt(v_hat + eps_root) + eps),
      v_hat = v_t / (1 - b2^t), v_t = b2 v_{t-1} + (1 - b2) g_t^2;
    * AMSGrad: the same with optax's running maximum of v_hat (no b2 needed);
    * RMSProp: P = 1 / sqrt(v + eps) (``eps_in_sqrt=True``, optax's default) or
      1 / (sqrt(v) + eps) (``False``, PyTorch's); v bias-corrected with b2 = ``decay`` where
      the optimizer does (``bias_correction=True``); centered: v - m^2.

    The state holds v but not the hyperparameters, and none is assumed: those an
    ``optax.inject_hyperparams`` state holds are read from it at every step; the others must
    be stated here, with the values the optimizer was built with::

        tx = optax.adam(1e-3, b2=0.95)
        feedback = ab.feedback.PreconditionedGradNorm(b2=0.95, eps=1e-8)
        rms = ab.feedback.PreconditionedGradNorm(eps=1e-8, eps_in_sqrt=True)  # optax.rmsprop

    When the step is built they are checked against the optimizer, where it shows them
    (optax's own transforms, through ``chain``, ``masked``, ``multi_transform``,
    ``inject_hyperparams``, ...): a value that differs from the optimizer's is refused,
    naming both; so are Adamax, Yogi and ADOPT (no Adam second moment in their
    ``ScaleByAdamState``), and, when the step is traced, an optimizer without a second
    moment (``optax.sgd``) or a parameter under more than one. The train step's feedback
    only: a scoring sampler's ``score_fn`` has no optimizer state.

    Attributes:
      b2: the decay of the second moment's moving average (Adam's ``b2``, RMSProp's
        ``decay``), for the bias correction; needed by Adam and bias-corrected RMSProp.
      eps: the eps of the preconditioner; always needed.
      eps_root: the eps inside Adam's and AMSGrad's square root; None: 0 (optax's default,
        checked against the optimizer's where it shows it).
      eps_in_sqrt: RMSProp's eps inside (True) or outside (False) the square root; needed
        by RMSProp.
      kind: ``"adam"``, ``"amsgrad"`` or ``"rmsprop"``: the optimizer's second moment; None:
        read from the state and the optimizer. Needed only for a ``ScaleByAdamState`` the
        optimizer does not show to be Adam's (an ``inject_hyperparams`` of a factory of your
        own): optax keeps Adamax's infinity norm in the same state type.

    Raises:
      ValueError / TypeError: a value out of range or of the wrong type, naming it.

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning"; Kingma, Ba,
      "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 1; Reddi, Kale,
      Kumar, "On the Convergence of Adam and Beyond", ICLR 2018; Tieleman, Hinton, "RMSProp",
      COURSERA Lecture 6.5, 2012.
    """

    b2: float | None = None
    eps: float | None = None
    eps_root: float | None = None
    eps_in_sqrt: bool | None = None
    kind: str | None = None
    name: ClassVar[str] = "preconditioned_grad_norm"
    per_example_evaluation: ClassVar[bool] = True

    def __post_init__(self):
        checked = check_stated(
            Stated(self.kind, self.b2, self.eps, self.eps_root, self.eps_in_sqrt)
        )
        for field, value in checked._asdict().items():
            object.__setattr__(self, field, value)  # numbers as floats

    @property
    def stated(self) -> Stated:
        """The stated hyperparameters (None: not stated)."""
        return Stated(self.kind, self.b2, self.eps, self.eps_root, self.eps_in_sqrt)

    def scores(self, loss_fn, params, batch, key=None):
        raise ValueError(
            'feedback "preconditioned_grad_norm" reads the optimizer state, which a scoring '
            "sampler's score_fn does not have: use it as the train step's feedback of a "
            "sampler that learns from it (exp3, priority, infobatch), or give the scoring "
            "sampler another score_feedback"
        )

    def estimator(self) -> EstimateFn:
        """The estimator without the optimizer: only the state is checked, when traced
        (a ``ScaleByAdamState`` needs ``kind="adam"``). The train step uses
        ``estimator_for``."""
        if self.stated == NOTHING_STATED:
            return estimate_with_preconditioned_norms
        return preconditioned_estimator(self.stated)

    def estimator_for(self, optimizer: Any) -> EstimateFn:
        """The train step's estimator for ``optimizer``, checked against it now (the step's
        build): what it shows is compared with what is stated (``_preconditioner``).

        Raises:
          ValueError: Adamax, Yogi or ADOPT in the optimizer; a stated value that differs
            from the optimizer's (naming both); a hyperparameter of one of its second
            moments neither injected nor stated (naming the fix).
        """
        facts = inspect_optimizer(optimizer)
        check_against_optimizer(self.stated, facts)
        return preconditioned_estimator(self.stated, facts)


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
        # a user's callable, trusted to be (params, batch, losses) -> (K,)
        feedback = CustomFeedback(cast(FeedbackFn, feedback))
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
