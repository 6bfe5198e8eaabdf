"""How a step runs, as one typed value shared by both step factories, and the one place that
validates a step's arguments into its ``StepConfig``.

What is computed is described by the arguments themselves: the loss says how it is called
(``ab.Loss`` / ``ab.ModelLoss``: key, aux, model state), the feedback carries its settings
(``ab.feedback.GradNorm(method=...)``), the sampler owns its schedules. What is left, how the
step runs, is ``StepOptions``:

    step = ab.make_train_step(loss, optax.adam(1e-3), sampler, feedback="loss",
                              options=ab.StepOptions(steps_per_call=8, diagnostics=False))
    step = ab.make_train_step(loss, optax.adam(1e-3), sampler, steps_per_call=8)  # the same

Every option applies to every loss, feedback and sampler, or the combination is refused
when the step is built: nothing is silently ignored.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adambs_jax._checks import check_bool, check_int
from adambs_jax._tree_utils import gather
from adambs_jax.feedback._kinds import Feedback, GradNorm, PreconditionedGradNorm, as_feedback
from adambs_jax.feedback._losses import AnyLoss, Loss, ModelLoss, as_loss, loss_callable
from adambs_jax.feedback._model_state import (
    check_examples_independent,
    check_model_state_options,
    loss_parts,
)
from adambs_jax.samplers import ProbabilitiesFn, Sampler, ScoringSampler
from adambs_jax.sharding import DEFAULT_DATA_AXIS, check_mesh
from adambs_jax.step._stages import StepConfig
from adambs_jax.step._state import as_gradient_transformation

__all__ = [
    "StepOptions",
    "FULL_DIAGNOSTICS_MAX_EXAMPLES",
    "build_step_config",
    "first_call_check",
]

FULL_DIAGNOSTICS_MAX_EXAMPLES = 65_536
"""With ``diagnostics=None``, the O(n) metrics are computed only for n up to this size."""


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a step runs (``make_train_step`` and ``make_host_train_step`` take the same).

    Attributes:
      diagnostics: add the O(n) metrics ``effective_sample_size`` = 1 / (n sum_j p_j^2),
        ``max_prob``, ``min_prob`` of the sampler's distribution after the update. None
        (default): only when n <= ``FULL_DIAGNOSTICS_MAX_EXAMPLES`` (65,536), so that a step
        at large n stays O(K log n), and only for a sampler with a full distribution; True
        with a sampler that has none is refused.
      skip_non_finite: (default True) if any per-example loss, any entry of G_hat or of the
        optimizer's update is NaN or infinite, the step changes neither the parameters, nor
        the optimizer, sampler or model state (like ``optax.apply_if_finite``), reports
        ``metrics["skipped"] = 1`` and adds 1 to ``state.skipped_steps``; ``step`` still
        advances. One O(params) reduction, no branch. False: every update is applied.
      mesh: a ``jax.sharding.Mesh`` for data parallelism (``adambs_jax.sharding``): the
        gathered batch is split along ``data_axis``, everything else replicated; the batch
        size must be a multiple of that axis. None (default): no sharding annotations.
      data_axis: the mesh axis that splits the batch (default ``"data"``).
      jit: (default True) the step is ``jax.jit(step, donate_argnums=0)`` (the input state's
        buffers are reused); False: the pure function, to compose in your own
        ``jit``/``lax.scan`` (then call the sampler's ``renormalize`` yourself).
      donate: (default True) the jitted step reuses the input state's buffers (the state
        passed in is dead after the call); False keeps them, at the cost of a copy of the
        state per step: for code that still holds the old arrays, e.g. an NNX module the
        state was written back to (``nnx.update``) and that an eval hook reads between
        steps.
      steps_per_call: N >= 1 (default 1): one call runs N steps in one jitted ``lax.scan``
        and returns every metric stacked with a leading axis N (for small models, where
        dispatch costs as much as the step). ``make_train_step`` only.
      optimizer_extra_args: keyword arguments for ``optimizer.update``, a callable of the
        dict ``{"loss", "sampled_loss", "losses" (K,), "weights" (K,)}`` returning a dict.
        None (default): an ``optax.GradientTransformationExtraArgs`` gets ``value=`` the
        unbiased loss estimate (what ``optax.contrib.reduce_on_plateau`` needs).

    Raises:
      TypeError / ValueError: an option of the wrong type or range, naming it.
    """

    diagnostics: bool | None = None
    skip_non_finite: bool = True
    mesh: jax.sharding.Mesh | None = None
    data_axis: str = DEFAULT_DATA_AXIS
    jit: bool = True
    donate: bool = True
    steps_per_call: int = 1
    optimizer_extra_args: Callable[[dict], dict] | None = None

    def __post_init__(self):
        if self.diagnostics is not None and not isinstance(self.diagnostics, bool):
            raise TypeError(f"diagnostics must be a bool or None, got {self.diagnostics!r}")
        check_bool("skip_non_finite", self.skip_non_finite)
        check_bool("jit", self.jit)
        check_bool("donate", self.donate)
        check_int("steps_per_call", self.steps_per_call)
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {self.mesh!r}")
        if not isinstance(self.data_axis, str):
            raise TypeError(f"data_axis must be a str, got {self.data_axis!r}")
        if self.optimizer_extra_args is not None and not callable(self.optimizer_extra_args):
            raise TypeError(
                f"optimizer_extra_args must be None or a callable (dict of the step's losses) "
                f"-> dict of keyword arguments, got {type(self.optimizer_extra_args).__name__}"
            )


_OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(StepOptions))
_LOSS_KEYWORDS = {"loss_takes_key": "takes_key", "has_aux": "has_aux", "model_state": "model_state"}
_GRAD_NORM_KEYWORDS = {
    "grad_norm_method": "method",
    "reuse_per_example_grads": "reuse_per_example_grads",
}


def _deprecated(keyword: str, instead: str) -> None:
    warnings.warn(
        f"the step keyword {keyword}= is deprecated and will be removed in the next release; "
        f"{instead}",
        DeprecationWarning,
        stacklevel=4,
    )


def _loss_with_keywords(loss: Any, keywords: dict) -> Any:
    """The old loss keywords (``loss_takes_key``, ``has_aux``, ``model_state``) folded into
    the loss, with a warning: the loss now says how it is called."""
    stated = {_LOSS_KEYWORDS[k]: keywords.pop(k) for k in list(keywords) if k in _LOSS_KEYWORDS}
    if not stated:
        return loss
    for keyword in stated:
        _deprecated(
            next(old for old, new in _LOSS_KEYWORDS.items() if new == keyword),
            f"describe the loss instead: ab.Loss(fn, {keyword}=...) or ab.ModelLoss(..., "
            f"{keyword}=...)",
        )
    stated = {k: v for k, v in stated.items() if v is not None and (k, v) != ("has_aux", False)}
    if isinstance(loss, (Loss, ModelLoss)):
        return loss._replace(**stated)
    return Loss(loss, **stated)


def _feedback_with_keywords(feedback: Any, keywords: dict) -> Any:
    """The old ``grad_norm_method`` / ``reuse_per_example_grads`` keywords folded into a
    ``GradNorm`` feedback, with a warning; with any other feedback they are refused (they
    used to be ignored)."""
    stated = {
        _GRAD_NORM_KEYWORDS[k]: keywords.pop(k) for k in list(keywords) if k in _GRAD_NORM_KEYWORDS
    }
    if not stated:
        return feedback
    for keyword in stated:
        _deprecated(
            next(old for old, new in _GRAD_NORM_KEYWORDS.items() if new == keyword),
            f"use feedback=ab.feedback.GradNorm({keyword}=...)",
        )
    if feedback == "grad_norm":
        feedback = GradNorm()
    if not isinstance(feedback, GradNorm):
        names = ", ".join(old for old, new in _GRAD_NORM_KEYWORDS.items() if new in stated)
        raise ValueError(
            f"{names}: only the grad_norm feedback has these settings, and feedback is "
            f"{getattr(feedback, 'name', feedback)!r}; pass feedback=ab.feedback.GradNorm(...)"
        )
    return dataclasses.replace(feedback, **stated)


def resolve_options(options: StepOptions | None, keywords: dict) -> StepOptions:
    """``options`` with the option keywords of a factory call applied (a keyword that is no
    option is a ``TypeError`` naming it)."""
    if options is None:
        options = StepOptions()
    elif not isinstance(options, StepOptions):
        raise TypeError(f"options must be an ab.StepOptions or None, got {options!r}")
    unknown = sorted(set(keywords) - _OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}: a step takes the loss, the "
            f"optimizer, the sampler, feedback= and the fields of ab.StepOptions "
            f"({', '.join(sorted(_OPTION_NAMES))})"
        )
    return dataclasses.replace(options, **keywords) if keywords else options


def _diagnostics_probabilities(sampler, diagnostics) -> ProbabilitiesFn | None:
    """The distribution the diagnostics read, or None when the step reports none."""
    if diagnostics is False or (
        diagnostics is None and sampler.num_examples > FULL_DIAGNOSTICS_MAX_EXAMPLES
    ):
        return None
    if diagnostics and sampler.probabilities is None:
        raise ValueError(
            "diagnostics=True needs a sampler with a full distribution (sampler.probabilities); "
            f"this {type(sampler).__name__} has none"
        )
    return sampler.probabilities  # None (by default): a sampler without a distribution


def _extra_args_fn(optimizer, optimizer_extra_args) -> Callable[[dict], dict] | None:
    """The ``optimizer_extra_args`` option resolved: by default an optimizer that takes extra
    arguments (``optax.GradientTransformationExtraArgs``) gets ``value`` = the step's
    unbiased loss estimate, ``loss`` (for ``optax.contrib.reduce_on_plateau``)."""
    if optimizer_extra_args is None:
        if isinstance(optimizer, optax.GradientTransformationExtraArgs):
            return lambda losses: {"value": losses["loss"]}
        return None

    def extra_args(losses):
        args = optimizer_extra_args(losses)
        if not isinstance(args, dict):
            raise TypeError(f"optimizer_extra_args must return a dict, got {type(args).__name__}")
        return args

    return extra_args


def _refuse_lookahead(optimizer) -> None:
    """``optax.lookahead`` (anywhere in the optimizer) needs ``LookaheadParams`` (fast and
    slow copies) as the parameters and a loss of the fast ones: the step's parameters are
    the model's own, so it would fail at the first call with a raw pytree error. Found by
    initializing the optimizer on a stand-in parameter (an optimizer that cannot initialize
    on one, a fixed ``masked`` mask say, is not probed)."""
    probe = {"probe": jax.ShapeDtypeStruct((), jnp.float32)}
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # lookahead warns that the probe has no `fast`
    try:
        state = jax.eval_shape(optimizer.init, probe)
    except Exception:  # noqa: BLE001  (any optimizer that cannot take the stand-in)
        return
    finally:
        absl_logger.setLevel(level)
    is_lookahead = lambda node: isinstance(node, optax.LookaheadState)  # noqa: E731
    if any(is_lookahead(n) for n in jax.tree.leaves(state, is_leaf=is_lookahead)):
        raise ValueError(
            "optimizer: optax.lookahead keeps fast and slow parameters (optax.LookaheadParams) "
            "and needs the loss of the fast ones; the step trains the model's own parameters, "
            "so it is not supported here. Use it in your own loop: ab.value_and_grad(loss)"
            "(params.fast, batch, weights=...) and tx.update(grads, opt_state, params)"
        )


def _score_feedback(sampler, feedback, loss: AnyLoss):
    """What a scoring sampler scores with: its own ``score_feedback``, else the step's."""
    if isinstance(sampler, ScoringSampler) and sampler.score_feedback is not None:
        return as_feedback(sampler.score_feedback, loss, name="sampler.score_feedback")
    return feedback


def _estimator(feedback, optimizer):
    """The feedback's estimator; ``PreconditionedGradNorm``'s is resolved against the
    optimizer now, so a hyperparameter it needs and a value that contradicts the optimizer's
    are refused when the step is built (``_preconditioner``)."""
    if isinstance(feedback, PreconditionedGradNorm):
        return feedback.estimator_for(optimizer)
    return feedback.estimator()


def build_step_config(
    loss: Any,
    optimizer: Any,
    sampler: Any,
    feedback: Any,
    options: StepOptions | None,
    keywords: dict,
) -> tuple[StepConfig, StepOptions, Feedback]:
    """Validates a step factory's arguments (``make_train_step``'s Raises) into the step's
    ``StepConfig``, its ``StepOptions`` and the resolved ``Feedback``; the old keywords warn
    and are folded in."""
    keywords = dict(keywords)
    loss = as_loss(_loss_with_keywords(loss, keywords))
    feedback = as_feedback(_feedback_with_keywords(feedback, keywords), loss)
    options = resolve_options(options, keywords)
    optimizer = as_gradient_transformation(optimizer)
    _refuse_lookahead(optimizer)
    if not isinstance(sampler, (Sampler, ScoringSampler)):
        raise TypeError(
            f"sampler must be a Sampler or ScoringSampler, got {type(sampler).__name__}"
        )
    if options.mesh is not None:
        check_mesh(options.mesh, options.data_axis, sampler.batch_size)
    check_model_state_options(
        loss,
        feedback.name,
        isinstance(sampler, ScoringSampler),
        per_example_feedback=feedback.per_example_evaluation,
    )
    config = StepConfig(
        loss_callable(loss),
        optimizer,
        sampler,
        _estimator(feedback, optimizer),
        _score_feedback(sampler, feedback, loss),
        _diagnostics_probabilities(sampler, options.diagnostics),
        options.skip_non_finite,
        options.mesh,
        options.data_axis,
        _extra_args_fn(optimizer, options.optimizer_extra_args),
        loss,
    )
    return config, options, feedback


def first_call_check(config: StepConfig, feedback, *, gathered: bool) -> Callable | None:
    """The check a step runs at its first concrete call, or None: with a feedback that
    evaluates examples one at a time, or a scoring sampler, the per-example losses must not
    depend on the rest of the batch (``check_examples_independent``). ``gathered``: the
    step's ``data`` is the batch itself (the host step), not the dataset."""
    scoring = isinstance(config.sampler, ScoringSampler)
    if not (feedback.per_example_evaluation or scoring):
        return None
    why = f"feedback={feedback.name!r}" if feedback.per_example_evaluation else "a ScoringSampler"
    batch_size = config.sampler.batch_size

    def check(state, data):
        batch = data
        if not gathered:
            n = config.sampler.num_examples
            batch = gather(data, jnp.arange(batch_size) % n)
        losses_fn = loss_parts(config.described_loss, state.model_state).losses_only
        check_examples_independent(losses_fn, state.params, batch, jax.random.key(0), why=why)

    return check
