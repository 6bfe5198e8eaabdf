"""The sampler contract, typed like optax's ``base.py`` types ``init``/``update``.

A sampler is a NamedTuple of pure functions plus its static sizes:

    state = sampler.init()
    indices, probs = sampler.sample(state, key)          # (K,) int32, (K,) p[indices]
    state = sampler.update(state, indices, feedback)     # feedback (K,) >= 0
    state = sampler.update(state, indices, feedback, apply=ok)   # unchanged if not ok
    if sampler.renormalize_every and t % sampler.renormalize_every == 0:
        state = sampler.renormalize(state)               # O(n), every M updates

A ``ScoringSampler``'s ``sample`` also takes a ``score_fn`` over the current model and
returns its new state (``adambs_jax.scoring``). A sampler whose state holds a full
distribution p over the n examples gives ``probabilities: state -> (n,)`` (O(n); for
metrics, tests and plots); ``None`` when it has none (e.g. Adam-impt, whose marginal
distribution is not computed). A sampler whose weights shrink with every update (exp3: the
tree's root) gives ``renormalize_every`` M and ``renormalize: state -> state``: the caller
(``TrainStep`` does it) runs ``renormalize`` at least every M updates, a static count, so
that no update needs a data-dependent branch; None and None for the others. Nothing in the library inspects a state's attributes to
find out what kind of sampler made it: it asks the sampler.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, Union

import jax

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


class SampleFn(Protocol):
    def __call__(self, state: SamplerState, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(indices (K,) int32, probs (K,) float32)``, probs = p[indices]."""


class ScoreFn(Protocol):
    def __call__(self, indices: jax.Array) -> jax.Array:
        """``indices (M,) int32 -> scores (M,) float32`` at the current parameters."""


class ScoringSampleFn(Protocol):
    def __call__(
        self, state: SamplerState, key: jax.Array, score_fn: ScoreFn
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        """``(indices (K,), probs (K,), state)``: 1 / (n probs) is each draw's weight."""


class UpdateFn(Protocol):
    def __call__(
        self, state: SamplerState, indices: jax.Array, feedback: jax.Array, *, apply=True
    ) -> SamplerState:
        """Learns from the feedback (K,) of the draws ``indices`` (K,); with ``apply`` False
        (a bool scalar, may be traced) returns ``state`` bitwise unchanged, without a
        branch. A user sampler may omit ``apply``: the train step then selects."""


class RenormalizeFn(Protocol):
    def __call__(self, state: SamplerState) -> SamplerState:
        """Rescales the state's internal weights (O(n)); its distribution is unchanged."""


class ProbabilitiesFn(Protocol):
    def __call__(self, state: SamplerState) -> jax.Array:
        """The full distribution p (n,) of ``state`` (O(n))."""


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
    """

    init: InitFn
    sample: SampleFn
    update: UpdateFn
    num_examples: int
    batch_size: int
    probabilities: ProbabilitiesFn | None = None
    renormalize_every: int | None = None
    renormalize: RenormalizeFn | None = None


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
      renormalize_every, renormalize: as ``Sampler``'s.
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


AnySampler = Union[Sampler, ScoringSampler]


def accepts_apply(update) -> bool:
    """Whether ``update`` takes the ``apply`` keyword of the contract (every library sampler
    does; a user's may not, and its caller then selects between the old and new state)."""
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: assume the old contract
        return False
    return any(p.name == "apply" or p.kind is p.VAR_KEYWORD for p in parameters)
