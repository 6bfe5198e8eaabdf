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
import jax.numpy as jnp
import optax

from adambs_jax._checks import check_key
from adambs_jax.samplers._base import AnySampler

__all__ = [
    "TrainState",
    "TrainStep",
    "as_gradient_transformation",
    "renormalize_if_due",
    "count_renormalization_steps",
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
    with every update) must be renormalized at least every M updates. With ``renormalize``
    set (the jitted steps of ``make_train_step``), this object counts in Python the steps
    taken since the last renormalization (no device sync) and, before a call that would take
    that count past M, runs ``renormalize`` (one jitted, donated O(n) call). So use one
    ``TrainStep`` per training state. A restored checkpoint or a new ``TrainStep`` starts
    counting at 0; M is half of what the sampler tolerates, so that is still safe.

    Attributes:
      step_fn: ``(state, data, key=None) -> (state, metrics)``.
      optimizer: the optax optimizer the step applies.
      sampler: the sampler the step draws from and updates.
      renormalize: ``state -> state`` renormalizing ``state.sampler_state``, or None (the
        sampler needs none, or ``jit=False``: the caller renormalizes).
      steps_per_call: steps one call of ``step_fn`` takes (``make_train_step``'s
        ``steps_per_call``; metrics then have a leading axis of that size).
    """

    step_fn: Callable[..., tuple[TrainState, dict]]
    optimizer: optax.GradientTransformation
    sampler: AnySampler
    renormalize: Callable[[TrainState], TrainState] | None = None
    steps_per_call: int = 1
    _pending: list = dataclasses.field(default_factory=lambda: [0], compare=False, repr=False)

    def __call__(self, state: TrainState, data: Any, key: jax.Array | None = None):
        every = self.sampler.renormalize_every
        if self.renormalize is None or not every:
            return self._call_step(state, data, key)
        calls = self.steps_per_call
        state = renormalize_if_due(self.renormalize, every, self._pending, state, calls)
        state, metrics = self._call_step(state, data, key)
        count_renormalization_steps(self._pending, calls, every)
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


def renormalize_if_due(
    renormalize, every: int, pending: list, state: TrainState, calls: int = 1
) -> TrainState:
    """``state``, first renormalized (``renormalize``, one jitted call) if a call of
    ``calls`` steps would take ``pending[0]``, the steps since the last renormalization,
    past ``every`` = M; then ``pending[0]`` is 0. The schedule of ``TrainStep`` and
    ``adambs_jax.host.HostTrainStep``, counted in Python (no device sync)."""
    if pending[0] + min(calls, every) > every:
        state = TrainStep._call(renormalize, state)
        pending[0] = 0
    return state


def count_renormalization_steps(pending: list, calls: int, every: int) -> None:
    """Adds a call's ``calls`` steps to ``pending[0]``; a call of more than M steps
    renormalizes after each M of them itself (``_loop``)."""
    pending[0] = pending[0] + calls if calls <= every else calls % every
