"""What a training step carries from one call to the next, and the step itself.

``TrainState`` is the pytree a step updates (parameters, optimizer state, sampler state,
counters, an optional key). ``TrainStep`` is what ``make_train_step`` returns: the step
function bound to the optimizer and sampler it was built with, so that they are given once,
as flax's ``TrainState`` keeps its ``tx``:

    step = ab.make_train_step(loss_fn, optax.adam(1e-3), ab.exp3_sampler(n, K, num_steps=T))
    state = step.init(params)               # = TrainState.create(params=..., optimizer=...,
    state, metrics = step(state, data, key) #                       sampler=...)

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1 (the state of AdamBS: theta, Adam's moments, the sampler's distribution).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core  # jax imports it; named here so type checkers see jax.core
import jax.numpy as jnp
import optax

from adambs_jax._checks import check_key
from adambs_jax.samplers import AnySampler, check_healthy

__all__ = [
    "TrainState",
    "TrainStep",
    "as_gradient_transformation",
    "RenormalizationSchedule",
    "run_first_call_check",
]


def as_gradient_transformation(optimizer: Any) -> optax.GradientTransformation:
    """``optimizer`` as an optax transformation: an ``optax.MultiSteps`` (which flax's
    ``TrainState`` also accepts) becomes its ``gradient_transformation()``.

    Raises:
      TypeError: neither an optax transformation nor an ``optax.MultiSteps``.
    """
    if isinstance(optimizer, optax.MultiSteps):
        return optimizer.gradient_transformation()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    return optimizer


class TrainState(NamedTuple):
    """Everything a training step updates; a pytree (checkpoint it with
    ``ab.save_checkpoint`` / ``ab.restore_checkpoint``, which use orbax).

    Attributes:
      params: the model parameters (any pytree).
      opt_state: the optax state of ``optimizer.init(params)``.
      sampler_state: the sampler's state (``sampler.init()``).
      step: int32 scalar, number of steps taken, skipped ones included (see
        ``make_train_step``'s ``skip_non_finite``).
      key: optional PRNG key; used (and advanced) by a step called without a key.
      skipped_steps: int32 scalar, cumulative number of steps whose update was skipped
        because the loss, gradient or update was not finite; ``TrainState.create`` sets it to
        0. None (a state built by hand without it): the step keeps it None and reports only
        the per-step ``metrics["skipped"]``.
      model_state: any pytree the model carries besides ``params`` (linen ``batch_stats``,
        NNX non-``Param`` state, EMA parameters, a loader position), None by default. A step
        whose loss states ``model_state=True`` (``ab.Loss``, ``ab.ModelLoss``) passes it to the
        loss and keeps the loss's new one (``adambs_jax.feedback._model_state``); other steps
        leave it unchanged.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 1. The layout follows ``flax.training.train_state.TrainState``.
    """

    params: Any
    opt_state: Any
    sampler_state: Any
    step: jax.Array
    key: jax.Array | None = None
    skipped_steps: jax.Array | None = None
    model_state: Any = None

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        optimizer: optax.GradientTransformation,
        sampler: AnySampler,
        key: jax.Array | None = None,
        model_state: Any = None,
    ) -> TrainState:
        """A fresh state: ``optimizer.init(params)``, ``sampler.init()``, step 0, no
        skipped steps, ``model_state`` (default None).

        ``params`` (``key``, ``model_state``) are copied: the train step donates its state, and the
        caller's arrays must survive that.

        Raises:
          TypeError: ``optimizer`` is not an optax transformation, or ``sampler`` has no
            ``init``.
          ValueError: ``key`` is not a PRNG key (a typed key of shape () from
            ``jax.random.key`` or a raw uint32 key of shape (m,) from ``jax.random.PRNGKey``).
        """
        optimizer = as_gradient_transformation(optimizer)
        if not callable(getattr(sampler, "init", None)):
            raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}")
        if key is not None:
            check_key(key, name="key")
        params = jax.tree.map(jnp.copy, params)
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            sampler_state=sampler.init(),
            step=jnp.zeros((), jnp.int32),
            key=None if key is None else jnp.copy(key),
            skipped_steps=jnp.zeros((), jnp.int32),
            model_state=jax.tree.map(jnp.copy, model_state),
        )


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A train step bound to its optimizer and sampler: ``make_train_step``'s result.

    ``step(state, data, key=None) -> (state, metrics)`` calls ``step_fn`` (the jitted step,
    or the pure one with ``jit=False``); ``step.init(params, key=None)`` is
    ``TrainState.create(params=params, optimizer=step.optimizer, sampler=step.sampler,
    key=key)``. Any other attribute is ``step_fn``'s, so a jitted step keeps ``lower``,
    ``trace`` and the like, and ``jax.jit(step)`` of a pure step sees the function named
    ``step_fn.__name__``.

    Renormalization: a sampler with ``renormalize_every`` M (exp3: its tree's root shrinks
    with every update; InfoBatch: its epochs) must be renormalized at least every M updates.
    With ``renormalize`` set (the jitted steps of ``make_train_step``), this object runs
    ``renormalize`` (one jitted, donated O(n) call) before each call whose steps reach a
    multiple of M, counted from the state's own ``step`` (``RenormalizationSchedule``): the
    schedule is a function of the state, so it survives a checkpoint and a restart, and the
    count is kept in Python between calls (no device sync; one host read of ``state.step``
    when the state is not the one this object returned last, e.g. a restored one).

    Attributes:
      step_fn: ``(state, data, key=None) -> (state, metrics)``.
      optimizer: the optax optimizer the step applies.
      sampler: the sampler the step draws from and updates.
      renormalize: ``state -> state`` renormalizing ``state.sampler_state``, or None (the
        sampler needs none, or ``jit=False``: the caller renormalizes).
      steps_per_call: steps one call of ``step_fn`` takes (``make_train_step``'s
        ``steps_per_call``; metrics then have a leading axis of that size).
      first_call_check: ``(state, data) -> None``, run once, on the first call with
        concrete arrays, before the step (raises what the step cannot compute correctly,
        e.g. a batch-coupled model under per-example feedback); None: nothing to check.
    """

    step_fn: Callable[..., tuple[TrainState, dict]]
    optimizer: optax.GradientTransformation
    sampler: AnySampler
    renormalize: Callable[[TrainState], TrainState] | None = None
    steps_per_call: int = 1
    first_call_check: Callable[[TrainState, Any], None] | None = None
    _schedule: RenormalizationSchedule = dataclasses.field(
        default_factory=lambda: RenormalizationSchedule(), compare=False, repr=False
    )
    _checked: list = dataclasses.field(default_factory=lambda: [False], compare=False, repr=False)

    def __call__(self, state: TrainState, data: Any, key: jax.Array | None = None):
        run_first_call_check(self.first_call_check, self._checked, state, data)
        every = self.sampler.renormalize_every
        if self.renormalize is None or not every:
            return self._call_step(state, data, key)
        calls = self.steps_per_call
        state = self._schedule.before(self.renormalize, every, state, calls)
        state, metrics = self._call_step(state, data, key)
        self._schedule.after(state, calls)
        return state, metrics

    def _call_step(self, state, data, key):
        return self._call(self.step_fn, state, data, key)

    @staticmethod
    def _call(function, state, *args):
        """``function(state, *args)``; a state whose buffers were donated to an earlier call
        gets an error that says so, instead of XLA's "Buffer has been deleted or donated"."""
        try:
            return function(state, *args)
        except (ValueError, RuntimeError) as error:
            if "deleted or donated" not in str(error) and "has been deleted" not in str(error):
                raise
            raise ValueError(
                "state: its arrays were donated to an earlier step call (the jitted step "
                "reuses the input state's buffers); pass the state that call returned, e.g. "
                "`state, metrics = step(state, data, key)`, or build the step with jit=False "
                "to keep inputs alive"
            ) from error

    def init(
        self, params: Any, *, key: jax.Array | None = None, model_state: Any = None
    ) -> TrainState:
        """A fresh ``TrainState`` for ``params`` with this step's optimizer and sampler (the
        arguments and errors of ``TrainState.create``)."""
        return TrainState.create(
            params=params,
            optimizer=self.optimizer,
            sampler=self.sampler,
            key=key,
            model_state=model_state,
        )

    def __getattr__(self, name: str) -> Any:
        # only called for names the dataclass does not have; dunder names other than the
        # function's name stay unresolved so that copy and pickle see a plain object
        step_fn = self.__dict__.get("step_fn")
        if step_fn is None or name.startswith("__") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        return getattr(step_fn, name)


def run_first_call_check(check, checked: list, state: TrainState, data: Any) -> None:
    """Runs ``check(state, data)`` once per step object, at the first call whose arrays are
    concrete (a step traced inside the caller's own ``jit`` is checked at its first
    concrete call, if any)."""
    if check is None or checked[0]:
        return
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((state, data))):
        return
    check(state, data)
    checked[0] = True


@dataclasses.dataclass
class RenormalizationSchedule:
    """When a step object renormalizes its sampler: before each call whose steps
    ``[t, t + calls)`` hold a multiple of M = ``sampler.renormalize_every`` (t > 0 the state's
    ``step``): for one step per call, before steps M, 2M, ...; between two renormalizations at
    most M + calls - 1 < 2M updates (M is half of what the sampler tolerates; a call of more
    than M steps also renormalizes inside its scan, ``_loop``).

    The rule reads only the state's own ``step``, so a restart resumes it exactly: a run
    restored at step 0.9 M renormalizes at M, as the uninterrupted run does (a count kept
    in the step object alone started at 0 in every process, and runs restarted every 0.9 M
    steps never renormalized). ``step`` is tracked in Python: it is read from the device
    only when the state passed in is not the one returned by the last call (a restored or
    new state), once.
    """

    _step: int = 0
    _last: Any = None  # the ``step`` array of the state returned by the last call

    def before(self, renormalize, every: int, state: TrainState, calls: int) -> TrainState:
        """``state``, renormalized first (one jitted call) if this call is due."""
        if state.step is not self._last and not isinstance(state.step, jax.core.Tracer):
            self._step = _host_int(state.step)  # a restored or new state (traced: counted)
        t = self._step
        if t > 0 and (t - 1) // every < (t + calls - 1) // every:
            state = TrainStep._call(renormalize, state)
            if not isinstance(state.step, jax.core.Tracer):  # one read every M steps
                check_healthy(state.sampler_state, where=f"step {t}")
        return state

    def after(self, state: TrainState, calls: int) -> None:
        """Records the ``calls`` steps taken and the state returned."""
        self._step += calls
        self._last = state.step


def _host_int(value) -> int:
    """A scalar array's value on the host (a replicated array spanning hosts: its local
    copy)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return int(value)
