"""The sampler contract, typed like optax's ``base.py`` types ``init``/``update``.

A sampler is a NamedTuple of pure functions plus its static sizes:

    state = sampler.init()
    indices, probs = sampler.sample(state, key)          # (K,) int32, (K,) p[indices]
    state = sampler.update(state, indices, feedback)     # feedback (K,) >= 0
    state = sampler.update(state, indices, feedback, apply=ok)   # unchanged if not ok
    if sampler.renormalize_every and t % sampler.renormalize_every == 0:
        state = sampler.renormalize(state)               # O(n), every M updates

A ``ScoringSampler``'s ``sample`` also takes a ``score_fn`` over the current model and
returns its new state (``adambs_jax.feedback.make_score_fn``). A sampler whose state holds a full
distribution p over the n examples gives ``probabilities: state -> (n,)`` (O(n); for
metrics, tests and plots); ``None`` when it has none (e.g. Adam-impt, whose marginal
distribution is not computed). A sampler whose weights shrink with every update (exp3: the
tree's root) gives ``renormalize_every`` M and ``renormalize: state -> state``: the caller
(``TrainStep`` does it) runs ``renormalize`` at least every M updates, a static count, so
that no update needs a data-dependent branch; None and None for the others. A sampler with
scalars worth logging gives ``metrics: (state, feedback) -> dict`` (exp3: its bound L).

Nothing outside a sampler tests what kind of sampler made a state: the step asks the
sampler (``metrics``, ``renormalize``), checkpoints ask the state (``SamplerStateBase``:
which fields a restore may rebuild or take from the new sampler, and how to reconcile).

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Self

import jax
import jax.numpy as jnp

__all__ = [
    "SamplerState",
    "FeedbackFn",
    "InitFn",
    "SampleFn",
    "ScoreFn",
    "ScoringSampleFn",
    "UpdateFn",
    "ProbabilitiesFn",
    "RenormalizeFn",
    "MetricsFn",
    "SamplerStateBase",
    "probabilities",
    "check_healthy",
    "importance_weights",
    "Sampler",
    "ScoringSampler",
    "AnySampler",
    "accepts_apply",
]

SamplerState = Any
"""A sampler's state: a pytree (a flax struct dataclass in this library)."""

FeedbackFn = Callable[[Any, Any, jax.Array], jax.Array]
"""A user feedback: ``(params, batch, losses (K,)) -> scores (K,)`` (a ``ScoringSampler``'s
``score_feedback`` may be one)."""


class InitFn(Protocol):
    def __call__(self) -> SamplerState:
        """The initial state."""
        ...


class SampleFn(Protocol):
    def __call__(self, state: SamplerState, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(indices (K,) int32, probs (K,) float32)``, probs = p[indices]."""
        ...


class ScoreFn(Protocol):
    def __call__(self, indices: jax.Array) -> jax.Array:
        """``indices (M,) int32 -> scores (M,) float32`` at the current parameters."""
        ...


class ScoringSampleFn(Protocol):
    def __call__(
        self, state: SamplerState, key: jax.Array, score_fn: ScoreFn
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        """``(indices (K,), probs (K,), state)``: 1 / (n probs) is each draw's weight."""
        ...


class UpdateFn(Protocol):
    def __call__(
        self, state: SamplerState, indices: jax.Array, feedback: jax.Array, *, apply=True
    ) -> SamplerState:
        """Learns from the feedback (K,) of the draws ``indices`` (K,); with ``apply`` False
        (a bool scalar, may be traced) returns ``state`` bitwise unchanged, without a
        branch. A user sampler may omit ``apply``: the train step then selects."""
        ...


class RenormalizeFn(Protocol):
    def __call__(self, state: SamplerState) -> SamplerState:
        """Rescales the state's internal weights (O(n)); its distribution is unchanged."""
        ...


class MetricsFn(Protocol):
    def __call__(self, state: SamplerState, feedback: jax.Array) -> dict:
        """The sampler's own scalars for the step's metrics, after an update with the (K,)
        ``feedback`` (exp3: its bound L and the share of the feedback it clipped)."""
        ...


class ProbabilitiesFn(Protocol):
    def __call__(self, state: SamplerState) -> jax.Array:
        """The full distribution p (n,) of ``state`` (O(n))."""
        ...


class Sampler(NamedTuple):
    """A mini-batch sampler: pure ``init``, ``sample`` and ``update`` functions.

    Attributes:
      init: ``() -> state``.
      sample: ``(state, key) -> (indices (K,) int32, probs (K,) float32)``, probs = p[indices].
      update: ``(state, indices (K,), feedback (K,), *, apply=True) -> state``.
      num_examples: n.
      batch_size: K.
      probabilities: ``state -> p (n,)``, or None if the sampler has no full distribution.
      renormalize_every: M: call ``renormalize`` at least every M updates; None: never needed.
      renormalize: ``state -> state`` (O(n)), or None.
      metrics: ``(state, feedback (K,)) -> dict`` of scalars the train step adds to its
        metrics, or None.
    """

    init: InitFn
    sample: SampleFn
    update: UpdateFn
    num_examples: int
    batch_size: int
    probabilities: ProbabilitiesFn | None = None
    renormalize_every: int | None = None
    renormalize: RenormalizeFn | None = None
    metrics: MetricsFn | None = None


class ScoringSampler(NamedTuple):
    """A sampler whose ``sample`` scores examples with the model through ``score_fn``.

    Attributes:
      init: ``() -> state``.
      sample: ``(state, key, score_fn) -> (indices (K,) int32, probs (K,), state)``.
      update: ``(state, indices (K,), feedback (K,), *, apply=True) -> state``.
      num_examples: n.
      batch_size: K.
      score_feedback: which scores ``score_fn`` returns: a feedback kind
        (``adambs_jax.feedback.FEEDBACK_KINDS``) or a callable ``(params, batch, losses) ->
        (K,)``; None: the train step's own ``feedback``.
      score_chunk_size: compute scores in chunks of this many examples (``jax.lax.map``), to
        bound memory when scoring many examples (e.g. all n); None: all at once.
      probabilities: ``state -> p (n,)``, or None if the sampler has no full distribution.
      renormalize_every, renormalize, metrics: as ``Sampler``'s.
    """

    init: InitFn
    sample: ScoringSampleFn
    update: UpdateFn
    num_examples: int
    batch_size: int
    score_feedback: Any = None
    score_chunk_size: int | None = None
    probabilities: ProbabilitiesFn | None = None
    renormalize_every: int | None = None
    renormalize: RenormalizeFn | None = None
    metrics: MetricsFn | None = None


AnySampler = Sampler | ScoringSampler


def accepts_apply(update) -> bool:
    """Whether ``update`` takes the ``apply`` keyword of the contract (every library sampler
    does; a user's may not, and its caller then selects between the old and new state)."""
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: assume the old contract
        return False
    return any(p.name == "apply" or p.kind is p.VAR_KEYWORD for p in parameters)


class SamplerStateBase:
    """The base class of the library's sampler states (flax struct dataclasses): what code
    outside a sampler may ask a state, so that nothing outside the samplers tests a state's
    type. A sampler of your own needs none of it: its state may be any pytree (it is then
    checkpointed as it is and has no ``probabilities``).

    Checkpoints (``adambs_jax.checkpoint``) restore a state in three steps: the arrays are
    read with the stored shapes where a field is in ``rebuilt_fields``; the static fields in
    ``reconfigurable_fields`` are not compared with the checkpoint's (the sampler configured
    now decides them; every other static field must agree); then ``restored`` reconciles.

    Attributes:
      reconfigurable_fields: static fields a restore takes from the sampler configured now.
      rebuilt_fields: array fields whose stored shape may differ from the new state's
        (a prefix-sum tree of another arity), rebuilt by ``restored``.
    """

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ()
    rebuilt_fields: ClassVar[tuple[str, ...]] = ()

    if TYPE_CHECKING:
        # flax's struct.dataclass gives each state class ``replace`` (dataclasses.replace), which
        # type checkers do not see: declared here, for them only, with its return type.
        def replace(self, **updates: Any) -> Self: ...

    def restored(self, like: Any, saved_config: dict, where: str) -> Any:
        """The state to resume from: ``self`` as read from a checkpoint, reconciled with
        ``like`` (the state of the sampler configured now; may be abstract) and checked.
        ``saved_config`` holds this state's static fields as the checkpoint recorded them;
        ``where`` names the checkpoint in errors. The default: ``self`` unchanged."""
        del like, saved_config, where
        return self

    def healthy(self) -> jax.Array:
        """A bool scalar: the state can still be sampled from (its numbers are finite). O(1);
        the step objects read it after each renormalization, so that a state gone bad (a
        NaN written by hand, an underflowed tree) is reported instead of every later step
        being skipped in silence. Default True."""
        return jnp.asarray(True)

    def probabilities(self) -> jax.Array:
        """The full distribution p (n,) this state samples from (O(n)).

        Raises:
          TypeError: the sampler keeps no full distribution (e.g. Adam-impt's).
        """
        raise TypeError(
            f"state: a {type(self).__name__} has no full distribution over the examples"
        )


def check_healthy(state: Any, where: str) -> None:
    """Raises RuntimeError (naming ``where``) when a library sampler state reports that it
    cannot be sampled from any more (``SamplerStateBase.healthy``); one host read."""
    if isinstance(state, SamplerStateBase) and not bool(state.healthy()):
        raise RuntimeError(
            f"{where}: the sampler state is not finite any more (its tree's total is NaN, "
            f"infinite or 0): every draw would have an undefined probability and every step "
            f"would be skipped. Restore an earlier checkpoint; if you drive sampler.update "
            f"yourself, renormalize every sampler.renormalize_every updates (ab.Sampling does)"
        )


def probabilities(state: Any) -> jax.Array:
    """The full distribution p (n,) of a sampler state, O(n), for tests, metrics and plots:
    asks the state (``SamplerStateBase.probabilities``). ``sampler.probabilities(state)`` is
    the same where the sampler has one (None where it has none).

    Raises:
      TypeError: the state has no full distribution (the message names its type).
    """
    if not isinstance(state, SamplerStateBase):
        raise TypeError(
            f"state: not a sampler state of this library (no full distribution to ask for): "
            f"{type(state).__name__}"
        )
    return state.probabilities()


def importance_weights(probs: jax.Array, num_examples: int) -> jax.Array:
    """w = 1 / (n p): the weights that make (1/K) sum_k w_k g_{i_k} unbiased for the mean
    gradient (AdamBS eq. 1). With p uniform, w = 1.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. (1).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if jnp.ndim(probs) != 1:
        raise ValueError(f"probs must have shape (K,), got {jnp.shape(probs)}")
    return 1.0 / (num_examples * probs)
