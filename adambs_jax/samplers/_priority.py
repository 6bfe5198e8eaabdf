"""A stale-score priority sampler: prioritized replay applied to supervised training.

The tree (``_sumtree``) holds one priority per example, computed from the score
s_j the example got the last time it was drawn (``initial_score`` before that):

    u_j = clip((s_j + eps)^alpha, MIN_PRIORITY, max_priority(n))
    p_j = (1 - lambda) u_j / sum_i u_i + lambda / n,        lambda = uniform_mix in (0, 1]

so p_j >= lambda / n > 0 and the importance weight 1 / (n p_j) <= 1 / lambda is bounded.
``sample`` draws each of the K indices independently: with probability lambda uniformly,
else from the tree (u_j / sum u); the probs it returns are the exact mixture p_{i_k}, so the
weighted mean (1/K) sum_k g_{i_k} / (n p_{i_k}) is unbiased for the mean gradient.
``update`` sets s_j = f_k for the drawn examples with valid feedback (the last valid one
wins for a duplicated index); nothing else changes, so the scores of examples not drawn
recently are stale. Priorities are absolute (not relative to a root that shrinks, as in
exp3), so no renormalization is needed.

Optional refresh (``refresh_every`` M): the sampler becomes a ``ScoringSampler`` whose
``sample`` first re-scores the next ceil(n / M) examples (cyclically) with the current model
(``refresh``), so every score is at most M steps old, for ceil(n / M) more scored examples
per step.

Numerics: (s + eps)^alpha is clipped to [MIN_PRIORITY, max_priority(n)] =
[1e-30, min(1e30, 1e37 / n)], so the root sum u stays positive (a tree draw needs it) and
finite in float32 (at most 1e37 < 3.4e38) whatever the feedback; an infinite power becomes
the cap. Priorities of ratio beyond that range are compressed to it.

Steps, as in ``_exp3``: ``priority_config`` (validation), ``init``, ``sample``,
``priorities``, ``mixture_probabilities``, ``refresh``, ``update`` (feedback cleaning reuses
``_exp3.clean_feedback``), ``distribution``; ``priority_sampler`` binds them into a
``Sampler``. Per step O(K log K + K B log_B n), B the tree's arity.

References:
  Schaul, Quan, Antonoglou, Silver, "Prioritized Experience Replay", ICLR 2016 (priorities
  (s + eps)^alpha, the sum tree); Katharopoulos, Fleuret, "Not All Samples Are Created
  Equal: Deep Learning with Importance Sampling", ICML 2018 (importance sampling of
  training examples by a score, mixed with uniform); Liu, Wu, Mozafari, "Adam with Bandit
  Sampling for Deep Learning", NeurIPS 2020, eq. (1) (the weights 1 / (n p)).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import (
    check_int,
    check_key,
    check_number,
    check_optional_int,
    check_per_draw,
    check_state_size,
)
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._base import Sampler, SamplerStateBase, ScoringSampler
from adambs_jax.samplers._exp3 import clean_feedback, count_dropped, impute_dropped

__all__ = [
    "MIN_PRIORITY",
    "MAX_PRIORITY",
    "PrioritySamplerState",
    "PriorityConfig",
    "priority_config",
    "max_priority",
    "init",
    "check_state",
    "priorities",
    "mixture_probabilities",
    "sample",
    "refresh",
    "update",
    "distribution",
    "state_distribution",
    "priority_sampler",
]

MIN_PRIORITY = 1e-30
"""Smallest priority u_j (a normal float32): keeps the root > 0 even for eps^alpha ~ 0."""

MAX_PRIORITY = 1e30
"""Largest priority u_j for n <= 10^7 (``max_priority``): (s + eps)^alpha may overflow."""

_ROOT_LIMIT = 1e37  # n u_max <= 1e37 < float32's 3.4e38: the root never overflows


@struct.dataclass
class PrioritySamplerState(SamplerStateBase):
    """State of ``priority_sampler``.

    Attributes:
      tree: (layout.size,) float32 prefix-sum tree whose leaves are the priorities u_j.
      step: int32 scalar, number of updates applied.
      num_dropped_feedback: int32 scalar, cumulative count of feedback entries that were
        negative, NaN or infinite (or had an out-of-range index) and so were ignored.
      cursor: int32 scalar, the first example the next refresh scores (``refresh_every``;
        0 and unused without refresh).
      num_examples, arity: static (part of the pytree structure).
      uniform_mix: static, lambda: with the tree it gives the full distribution
        (``ab.samplers.probabilities(state)`` needs no sampler).
      alpha, eps: static, the scheme of the priorities the tree holds, (s + eps)^alpha:
        recorded so that a checkpoint restored into a sampler of another ``alpha`` or ``eps``
        is refused (the scores are not stored, so the tree cannot be converted; its old
        priorities would mix with the new scheme's).
    """

    tree: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    cursor: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)
    uniform_mix: float = struct.field(pytree_node=False, default=1.0)
    alpha: float = struct.field(pytree_node=False, default=1.0)
    eps: float = struct.field(pytree_node=False, default=1e-6)

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ("arity",)
    rebuilt_fields: ClassVar[tuple[str, ...]] = ("tree",)

    def probabilities(self) -> jax.Array:
        return state_distribution(self)

    def restored(self, like: PrioritySamplerState, saved_config: dict, where: str):
        """The stored priorities, in a tree of the new sampler's arity (rebuilt from the
        stored tree's leaves where the arity differs)."""
        del where
        saved_arity = saved_config.get("arity", like.arity)
        tree = sumtree.restored_tree(
            self.tree, like.num_examples, saved_arity, like.arity, like.tree
        )
        return self.replace(tree=tree)


class PriorityConfig(NamedTuple):
    """The validated, static configuration of a ``priority_sampler``."""

    num_examples: int
    batch_size: int
    alpha: float
    uniform_mix: float
    eps: float
    initial_score: float
    layout: sumtree.TreeLayout
    refresh_chunk: int | None = None


def max_priority(num_examples: int) -> float:
    """The cap on u_j: min(1e30, 1e37 / n), so that the root stays finite in float32."""
    return min(MAX_PRIORITY, _ROOT_LIMIT / num_examples)


def priority_config(
    num_examples,
    batch_size,
    *,
    alpha,
    uniform_mix,
    eps,
    initial_score,
    arity=None,
    refresh_every=None,
) -> PriorityConfig:
    """Validates the arguments of ``priority_sampler`` (ValueError naming the argument);
    ``refresh_every`` M becomes ``refresh_chunk`` = ceil(n / M) examples scored per step."""
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    alpha = check_number("alpha", alpha, nonnegative=True)
    uniform_mix = check_number("uniform_mix", uniform_mix, positive=True)
    if uniform_mix > 1:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix!r}")
    eps = check_number("eps", eps, positive=True)
    initial_score = check_number("initial_score", initial_score, nonnegative=True)
    layout = sumtree.layout_for(num_examples, sumtree.default_arity() if arity is None else arity)
    refresh_every = check_optional_int("refresh_every", refresh_every)
    chunk = None if refresh_every is None else math.ceil(num_examples / refresh_every)
    return PriorityConfig(
        num_examples, batch_size, alpha, uniform_mix, eps, initial_score, layout, chunk
    )


def priorities(config: PriorityConfig, scores) -> jax.Array:
    """u = clip((s + eps)^alpha, MIN_PRIORITY, max_priority(n)), float32, for scores >= 0."""
    power = jnp.power(jnp.asarray(scores, jnp.float32) + config.eps, config.alpha)
    return jnp.clip(power, MIN_PRIORITY, max_priority(config.num_examples))


def init(config: PriorityConfig) -> PrioritySamplerState:
    """Every score is ``initial_score``: equal priorities, so p is uniform."""
    scores = jnp.full((config.num_examples,), config.initial_score, jnp.float32)
    return PrioritySamplerState(
        tree=sumtree.build(priorities(config, scores), config.layout),
        step=jnp.zeros((), jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        num_examples=config.num_examples,
        arity=config.layout.arity,
        uniform_mix=config.uniform_mix,
        alpha=config.alpha,
        eps=config.eps,
    )


def check_state(config: PriorityConfig, state) -> None:
    """TypeError unless ``state`` is a ``PrioritySamplerState``; ValueError if it was built
    for another n, arity or uniform_mix."""
    if not isinstance(state, PrioritySamplerState):
        raise TypeError(
            f"state must be a PrioritySamplerState (sampler.init()), got {type(state).__name__}"
        )
    check_state_size(state, config.num_examples)
    sumtree.check_state_tree(state.tree, state.arity, config.layout)
    if state.uniform_mix != config.uniform_mix:
        raise ValueError(
            f"state: built with uniform_mix={state.uniform_mix}, but this sampler has "
            f"uniform_mix={config.uniform_mix}"
        )


def mixture_probabilities(config: PriorityConfig, tree, leaves) -> jax.Array:
    """p = (1 - lambda) u / root + lambda / n for the priorities ``leaves`` of ``tree``."""
    return _mixture(config.uniform_mix, config.num_examples, tree, leaves)


def _mixture(lam: float, num_examples: int, tree, leaves) -> jax.Array:
    return (1.0 - lam) * (leaves / sumtree.total(tree)) + lam / num_examples


def sample(config: PriorityConfig, state: PrioritySamplerState, key: jax.Array):
    """K independent draws from the mixture: ``(indices (K,) int32, probs (K,) = p[indices])``.

    Draw k is uniform with probability lambda (a Bernoulli per draw), else a tree draw from
    u / root. With lambda = 1 (static) the tree is not walked."""
    check_state(config, state)
    check_key(key, name="key")
    mix_key, uniform_key, tree_key = jax.random.split(key, 3)
    shape = (config.batch_size,)
    indices = jax.random.randint(uniform_key, shape, 0, config.num_examples, jnp.int32)
    if config.uniform_mix < 1.0:
        from_uniform = jax.random.bernoulli(mix_key, config.uniform_mix, shape)
        uniforms = jax.random.uniform(tree_key, shape, jnp.float32)
        targets = sumtree.uniforms_to_targets(uniforms, sumtree.total(state.tree), stratified=False)
        from_tree = sumtree.draw(state.tree, targets, config.layout)
        indices = jnp.where(from_uniform, indices, from_tree)
    leaves = sumtree.get_leaves(state.tree, indices, config.layout)
    return indices, mixture_probabilities(config, state.tree, leaves)


def refresh(config: PriorityConfig, state: PrioritySamplerState, key: jax.Array, score_fn):
    """The ``sample`` of a sampler with ``refresh_every`` M (a ``ScoringSampler``): scores the
    next C = ceil(n / M) examples in order (cyclically, from ``state.cursor``) with the current
    model, sets their scores, then draws as ``sample``: ``(indices, probs, state)``. Every
    score is at most M steps old; the cost is C more scored examples per step. A refreshed
    score that is NaN, infinite or negative keeps the old priority."""
    check_state(config, state)
    chunk, n = config.refresh_chunk, config.num_examples
    assert chunk is not None  # priority_sampler binds refresh only with refresh_every set
    idx = (state.cursor + jnp.arange(chunk, dtype=jnp.int32)) % n
    scores = jnp.asarray(score_fn(idx), jnp.float32)
    valid = jnp.isfinite(scores) & (scores >= 0)
    old = sumtree.get_leaves(state.tree, idx, config.layout)
    new = jnp.where(valid, priorities(config, jnp.where(valid, scores, 0.0)), old)
    state = state.replace(
        tree=sumtree.set_leaves(state.tree, idx, new, config.layout),
        cursor=(state.cursor + chunk) % n,
    )
    indices, probs = sample(config, state, key)
    return indices, probs, state


def update(
    config: PriorityConfig, state: PrioritySamplerState, indices, feedback, *, apply=True
) -> PrioritySamplerState:
    """Sets s_j = f_k for every valid draw k of example j (finite, >= 0, index in [0, n)).

    An invalid entry (NaN, infinite, negative) of an example in range is counted in
    ``num_dropped_feedback`` and sets the score to the mean valid feedback of the batch
    (``impute_dropped``): an example that never reports would otherwise keep its first,
    stale score while the others' fall as training goes on, and gain mass. With no valid
    entry in the batch nothing changes; out-of-range indices never write. For a
    duplicated index the last valid entry wins: one stable sort by (index, valid)
    (``sumtree.dedupe_last`` with ``keep``) gives every copy its value. ``apply`` (a bool
    scalar, may be traced) False rewrites the K old leaves (O(K B log_B n), no branch), so
    the state is bitwise unchanged: every parent is recomputed from the same children.

    Raises:
      TypeError: ``indices`` are not integers.
    """
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    check_state(config, state)
    apply = jnp.asarray(apply, bool)
    clean = clean_feedback(indices, feedback, config.num_examples)
    scores, writes = impute_dropped(clean.feedback, clean)
    old = sumtree.get_leaves(state.tree, clean.indices, config.layout)
    new = jnp.where(writes & apply, priorities(config, scores), old)
    # one sort by (index, valid, writes): of the copies of an index, the last valid one
    # wins, then the last imputed one
    keep = clean.valid.astype(jnp.int32) * 2 + writes.astype(jnp.int32)
    idx, new = sumtree.dedupe_last(clean.indices, new, keep=keep)
    return state.replace(
        tree=sumtree.set_leaves(state.tree, idx, new, config.layout, duplicates_agree=True),
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback
        + jnp.where(apply, count_dropped(clean.valid), 0),
    )


def distribution(config: PriorityConfig, state: PrioritySamplerState) -> jax.Array:
    """The full mixture p (n,) (with ``config``'s lambda). O(n): for tests, metrics, plots."""
    check_state(config, state)
    leaves = sumtree.leaf_values(state.tree, config.layout)
    return mixture_probabilities(config, state.tree, leaves)


def state_distribution(state: PrioritySamplerState) -> jax.Array:
    """The full mixture p (n,) from the state alone (its static n, arity and lambda): what
    ``ab.samplers.probabilities(state)`` gives. O(n)."""
    if not isinstance(state, PrioritySamplerState):
        raise TypeError(f"state must be a PrioritySamplerState, got {type(state).__name__}")
    leaves = sumtree.leaf_values(state.tree, sumtree.layout_for(state.num_examples, state.arity))
    return _mixture(state.uniform_mix, state.num_examples, state.tree, leaves)


def priority_sampler(
    num_examples: int,
    batch_size: int,
    *,
    alpha: float = 1.0,
    uniform_mix: float = 0.1,
    eps: float = 1e-6,
    initial_score: float = 1.0,
    arity: int | None = None,
    refresh_every: int | None = None,
    score_feedback=None,
    score_chunk_size: int | None = None,
) -> Sampler | ScoringSampler:
    """A stale-score priority sampler with exact importance weights.

    p_j = (1 - lambda) u_j / sum_i u_i + lambda / n with u_j = (s_j + eps)^alpha, s_j the
    feedback example j got when it was last drawn (``initial_score`` until then). Each draw
    is uniform with probability lambda, else from u / sum u; probs are the exact p_{i_k},
    so the weights 1 / (n p) <= 1 / lambda make the batch gradient unbiased. ``update``
    writes the drawn examples' new scores (invalid feedback: dropped and counted in
    ``state.num_dropped_feedback``; duplicates: the last valid one wins; ``apply=False``:
    bitwise unchanged). The priority is clipped to [1e-30, min(1e30, 1e37 / n)] so the tree
    stays finite in float32 (module docstring).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1 (draws are with replacement).
      alpha: the exponent >= 0 (0: uniform; 1: proportional to the score).
      uniform_mix: lambda in (0, 1], the uniform share (1: exactly uniform).
      eps: > 0, added to every score (a score of 0 still gets a priority).
      initial_score: the score >= 0 of an example never drawn.
      arity: B of the prefix-sum tree; default ``sumtree.default_arity()``.
      refresh_every: M: also re-score all n examples with the current model once every M
        steps, in chunks of ceil(n / M) per step (``refresh``), so no score is older than M
        steps; None (default): scores change only when drawn.
      score_feedback, score_chunk_size: with ``refresh_every``, the kind the refresh scores
        with (None: the step's ``feedback``; ``"preconditioned_grad_norm"`` cannot score) and
        the ``ScoringSampler``'s chunking (``ab.feedback.make_score_fn``).

    Returns:
      A ``Sampler`` with ``probabilities`` (O(n)); no renormalization is needed. With
      ``refresh_every``, a ``ScoringSampler`` (its ``sample`` refreshes, then draws).

    References:
      Schaul et al., "Prioritized Experience Replay", ICLR 2016; Katharopoulos, Fleuret,
      "Not All Samples Are Created Equal", ICML 2018; Liu, Wu, Mozafari, "Adam with Bandit
      Sampling for Deep Learning", NeurIPS 2020, eq. (1).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from adambs_jax.samplers._priority import priority_sampler
      >>> sampler = priority_sampler(4, 3, uniform_mix=0.2)
      >>> state = sampler.update(sampler.init(), jnp.array([0, 1, 2]), jnp.array([1., 2., 5.]))
      >>> [round(float(p), 3) for p in sampler.probabilities(state)]
      [0.139, 0.228, 0.494, 0.139]
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> bool(jnp.allclose(probs, sampler.probabilities(state)[indices]))
      True
    """
    config = priority_config(
        num_examples,
        batch_size,
        alpha=alpha,
        uniform_mix=uniform_mix,
        eps=eps,
        initial_score=initial_score,
        arity=arity,
        refresh_every=refresh_every,
    )
    init_fn = functools.partial(init, config)
    sample_fn = functools.partial(sample, config)
    update_fn = functools.partial(update, config)
    probabilities_fn = functools.partial(distribution, config)
    refresh_fn = functools.partial(refresh, config)
    if config.refresh_chunk is not None:
        return ScoringSampler(
            init_fn,
            refresh_fn,
            update_fn,
            config.num_examples,
            config.batch_size,
            score_feedback,
            score_chunk_size,
            probabilities_fn,
        )
    if score_feedback is not None or score_chunk_size is not None:
        raise ValueError("score_feedback and score_chunk_size need refresh_every (a refresh)")
    return Sampler(
        init_fn,
        sample_fn,
        update_fn,
        config.num_examples,
        config.batch_size,
        probabilities_fn,
        renormalize_every=None,
        renormalize=None,
    )
