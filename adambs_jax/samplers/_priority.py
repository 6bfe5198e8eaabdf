"""A stale-score priority sampler: prioritized replay applied to supervised training.

The tree (``_sumtree``) holds one priority per example, computed from the score
s_j the example got the last time it was drawn (``initial_score`` before that):

    u_j = clip((s_j + eps)^alpha, MIN_PRIORITY, max_priority(n))
    p_j = (1 - lambda) u_j / sum_i u_i + lambda / n,        lambda = uniform_mix in (0, 1]

so p_j >= lambda / n > 0 and the importance weight 1 / (n p_j) <= 1 / lambda is bounded.
``sample`` draws each of the K indices independently: with probability lambda uniformly,
else from the tree (u_j / sum u); the probs it returns are the exact mixture p_{i_k}, so the
weighted mean (1/K) sum_k g_{i_k} / (n p_{i_k}) is unbiased for the mean gradient.

Adaptive mixing (``uniform_mix="auto"``, the default): lambda is chosen every step from a
grid lambda_1 = ``min_uniform_mix`` < ... < lambda_C = 1 (geometric, C = 6) by the
variance it is estimated to give. Write q = u / sum u and p^(c) = (1 - lambda_c) q + lambda_c / n.
With f_j the current score (the feedback), the part of the variance of the weighted mean
that depends on the distribution is V(p) = sum_j f_j^2 / (n^2 p_j) (uniform: V(u) =
sum_j f_j^2 / n). From the K draws i_k ~ p of this step (p = p^(current)) and their fresh
feedback f_k, importance weighting estimates every candidate's at once:

    rho_c = sum_k f_k^2 / (n p_k  n p^(c)_k)  /  sum_k f_k^2 / (n p_k)   ~  V(p^(c)) / V(u)

(both sums are unbiased for n^2 V(p^(c)) / K and n V(u) / K; each term of rho_c is at most
1 / lambda_c, and rho_C = 1). ``update`` keeps an exponential moving average R_c of rho_c
(decay ``mix_decay``, R_c = 1 at init) and sets lambda for the next draw to lambda_{c*},
c* = argmin_c R_c (ties: the larger lambda). The estimate uses the fresh feedback against
the tree's stale scores, so it sees exactly what staleness costs: when stale scores would
make sampling worse than uniform, R_c > 1 for the small lambdas and lambda goes to 1
(uniform draws, while the tree keeps learning). lambda depends only on past steps, so
given it the draw is from a known p and the estimate stays unbiased. The variance is
measured in the units of the feedback: for ``"grad_norm"`` (or a bound of it) it is the
gradient's; for ``"loss"`` it is the loss estimate's, a proxy.
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
``priorities``, ``mixture_probabilities``, ``refresh``, ``mix_ratios`` (the rho_c of a
batch), ``update`` (feedback cleaning reuses
``_exp3.clean_feedback``), ``distribution``; ``priority_sampler`` binds them into a
``Sampler``. Per step O(K log K + K B log_B n), B the tree's arity.

References:
  Schaul, Quan, Antonoglou, Silver, "Prioritized Experience Replay", ICLR 2016 (priorities
  (s + eps)^alpha, the sum tree); Katharopoulos, Fleuret, "Not All Samples Are Created
  Equal: Deep Learning with Importance Sampling", ICML 2018 (importance sampling of
  training examples by a score, mixed with uniform; its variance reduction estimated from
  the batch, which decides whether to sample by importance at all); Owen, Zhou, "Safe and
  Effective Importance Sampling", JASA 2000 (defensive mixtures with uniform: the weight
  bound 1 / lambda); Liu, Wu, Mozafari, "Adam with Bandit
  Sampling for Deep Learning", NeurIPS 2020, eq. (1) (the weights 1 / (n p)).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, NamedTuple, cast

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
    "mix_candidates",
    "mix_ratios",
    "variance_ratios",
    "next_mix",
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

AUTO = "auto"
"""``uniform_mix="auto"``: lambda chosen every step by the estimated variance."""

NUM_MIX_CANDIDATES = 6
"""C, the number of candidate mixes of ``"auto"`` (geometric from min_uniform_mix to 1)."""


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
      mix: float32 scalar, lambda of the next draw: with the tree it gives the full
        distribution (``ab.samplers.probabilities(state)`` needs no sampler). Constant for
        a fixed ``uniform_mix``; chosen by ``update`` for ``"auto"``.
      mix_ratios: (C,) float32, the moving averages R_c of the estimated variance ratios
        V(p^(c)) / V(u) of the candidate mixes (``"auto"``; (1,) ones for a fixed mix).
      num_examples, arity: static (part of the pytree structure).
      uniform_mix: static, the setting: a float lambda, or ``"auto"``.
      min_uniform_mix: static, lambda_1, the smallest candidate of ``"auto"`` (equal to
        ``uniform_mix`` for a fixed mix).
      alpha, eps: static, the scheme of the priorities the tree holds, (s + eps)^alpha:
        recorded so that a checkpoint restored into a sampler of another ``alpha`` or ``eps``
        is refused (the scores are not stored, so the tree cannot be converted; its old
        priorities would mix with the new scheme's).
    """

    tree: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    cursor: jax.Array
    mix: jax.Array
    mix_ratios: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)
    uniform_mix: float | str = struct.field(pytree_node=False, default=1.0)
    min_uniform_mix: float = struct.field(pytree_node=False, default=1.0)
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
    uniform_mix: float | str
    eps: float
    initial_score: float
    layout: sumtree.TreeLayout
    refresh_chunk: int | None = None
    min_uniform_mix: float = 0.1
    mix_decay: float = 0.95

    @property
    def adaptive(self) -> bool:
        """Whether lambda is chosen by ``update`` (``uniform_mix="auto"``)."""
        return self.uniform_mix == AUTO


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
    min_uniform_mix=0.1,
    mix_decay=0.95,
) -> PriorityConfig:
    """Validates the arguments of ``priority_sampler`` (ValueError naming the argument);
    ``refresh_every`` M becomes ``refresh_chunk`` = ceil(n / M) examples scored per step."""
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    alpha = check_number("alpha", alpha, nonnegative=True)
    min_uniform_mix = _check_mix("min_uniform_mix", min_uniform_mix)
    mix_decay = check_number("mix_decay", mix_decay, nonnegative=True)
    if mix_decay >= 1:
        raise ValueError(f"mix_decay must be in [0, 1), got {mix_decay!r}")
    if isinstance(uniform_mix, str):
        if uniform_mix != AUTO:
            raise ValueError(
                f"uniform_mix must be 'auto' or a number in (0, 1], got {uniform_mix!r}"
            )
    else:
        uniform_mix = _check_mix("uniform_mix", uniform_mix)
        min_uniform_mix = uniform_mix
    eps = check_number("eps", eps, positive=True)
    initial_score = check_number("initial_score", initial_score, nonnegative=True)
    layout = sumtree.layout_for(num_examples, sumtree.default_arity() if arity is None else arity)
    refresh_every = check_optional_int("refresh_every", refresh_every)
    chunk = None if refresh_every is None else math.ceil(num_examples / refresh_every)
    return PriorityConfig(
        num_examples,
        batch_size,
        alpha,
        uniform_mix,
        eps,
        initial_score,
        layout,
        chunk,
        min_uniform_mix,
        mix_decay,
    )


def _check_mix(name: str, value) -> float:
    value = check_number(name, value, positive=True)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def mix_candidates(config: PriorityConfig) -> tuple[float, ...]:
    """The candidate lambdas: ``"auto"``: C = 6 geometric from ``min_uniform_mix`` to 1
    (one if that is 1); a fixed mix: ``(uniform_mix,)``."""
    low = config.min_uniform_mix
    if not config.adaptive or low == 1.0:
        return (low,)
    c = NUM_MIX_CANDIDATES
    return tuple(low ** (1 - i / (c - 1)) for i in range(c - 1)) + (1.0,)


def priorities(config: PriorityConfig, scores) -> jax.Array:
    """u = clip((s + eps)^alpha, MIN_PRIORITY, max_priority(n)), float32, for scores >= 0."""
    power = jnp.power(jnp.asarray(scores, jnp.float32) + config.eps, config.alpha)
    return jnp.clip(power, MIN_PRIORITY, max_priority(config.num_examples))


def init(config: PriorityConfig) -> PrioritySamplerState:
    """Every score is ``initial_score``: equal priorities, so p is uniform (and ``"auto"``
    starts at lambda = 1)."""
    scores = jnp.full((config.num_examples,), config.initial_score, jnp.float32)
    return PrioritySamplerState(
        tree=sumtree.build(priorities(config, scores), config.layout),
        step=jnp.zeros((), jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        # "auto" starts uniform (lambda = 1: every R_c = 1, ties go to the larger lambda)
        mix=jnp.asarray(1.0 if config.adaptive else config.uniform_mix, jnp.float32),
        mix_ratios=jnp.ones((len(mix_candidates(config)),), jnp.float32),
        num_examples=config.num_examples,
        arity=config.layout.arity,
        uniform_mix=config.uniform_mix,
        min_uniform_mix=config.min_uniform_mix,
        alpha=config.alpha,
        eps=config.eps,
    )


def check_state(config: PriorityConfig, state) -> None:
    """TypeError unless ``state`` is a ``PrioritySamplerState``; ValueError if it was built
    for another n, arity, uniform_mix or min_uniform_mix."""
    if not isinstance(state, PrioritySamplerState):
        raise TypeError(
            f"state must be a PrioritySamplerState (sampler.init()), got {type(state).__name__}"
        )
    check_state_size(state, config.num_examples)
    sumtree.check_state_tree(state.tree, state.arity, config.layout)
    for name in ("uniform_mix", "min_uniform_mix"):
        if getattr(state, name) != getattr(config, name):
            raise ValueError(
                f"state: built with {name}={getattr(state, name)!r}, but this sampler has "
                f"{name}={getattr(config, name)!r}"
            )


def mixture_probabilities(config: PriorityConfig, state: PrioritySamplerState, leaves):
    """p = (1 - lambda) u / root + lambda / n for the priorities ``leaves`` of the state's
    tree, lambda = ``state.mix``."""
    return _mixture(state.mix, config.num_examples, state.tree, leaves)


def _mixture(lam, num_examples: int, tree, leaves) -> jax.Array:
    return (1.0 - lam) * (leaves / sumtree.total(tree)) + lam / num_examples


def sample(config: PriorityConfig, state: PrioritySamplerState, key: jax.Array):
    """K independent draws from the mixture: ``(indices (K,) int32, probs (K,) = p[indices])``.

    Draw k is uniform with probability lambda = ``state.mix`` (a Bernoulli per draw), else a
    tree draw from u / root. With a fixed ``uniform_mix`` of 1 the tree is not walked."""
    check_state(config, state)
    check_key(key, name="key")
    mix_key, uniform_key, tree_key = jax.random.split(key, 3)
    shape = (config.batch_size,)
    indices = jax.random.randint(uniform_key, shape, 0, config.num_examples, jnp.int32)
    # not adaptive: uniform_mix is a float (pyright does not narrow through the property)
    if config.adaptive or cast(float, config.uniform_mix) < 1.0:
        from_uniform = jax.random.bernoulli(mix_key, state.mix, shape)
        uniforms = jax.random.uniform(tree_key, shape, jnp.float32)
        targets = sumtree.uniforms_to_targets(uniforms, sumtree.total(state.tree), stratified=False)
        from_tree = sumtree.draw(state.tree, targets, config.layout)
        indices = jnp.where(from_uniform, indices, from_tree)
    leaves = sumtree.get_leaves(state.tree, indices, config.layout)
    return indices, mixture_probabilities(config, state, leaves)


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


def mix_ratios(
    config: PriorityConfig, state: PrioritySamplerState, clean, leaves=None, total=None
) -> tuple:
    """``(rho (C,), informative)`` of the batch against ``state``'s tree and mix
    (``variance_ratios``); ``leaves``, ``total``: the drawn leaves and the root when already
    read (else read from ``state.tree``)."""
    if leaves is None:
        leaves = sumtree.get_leaves(state.tree, clean.indices, config.layout)
    total = sumtree.total(state.tree) if total is None else total
    return variance_ratios(config, state.mix, clean, leaves, total)


def variance_ratios(config: PriorityConfig, mix, clean, leaves, total) -> tuple:
    """``(rho (C,), informative)``: the batch's estimates rho_c of V(p^(c)) / V(u) for the
    candidates (module docstring), from the draws' fresh feedback against the tree the batch
    was drawn from (its drawn ``leaves`` (K,) and root ``total``, mixed with ``mix``).
    ``informative`` is False when no valid draw has a nonzero score (then rho is meaningless
    and not used).

    rho_c = sum_k f_k^2 / (n p_k n p^(c)_k) / sum_k f_k^2 / (n p_k) over the valid draws,
    p = the mixture with ``mix``. f is divided by its batch maximum first (rho does not
    change), and n p >= lambda_1, so every term stays in float32's range."""
    n = config.num_examples
    q_times_n = leaves / total * n
    p_times_n = (1.0 - mix) * q_times_n + mix
    f = jnp.where(clean.valid, clean.feedback, 0.0)
    f = f / jnp.maximum(jnp.max(f), jnp.finfo(jnp.float32).tiny)
    weighted = jnp.square(f) / p_times_n  # (K,) f_k^2 / (n p_k)
    lams = jnp.asarray(mix_candidates(config), jnp.float32)[:, None]  # (C, 1)
    candidates = (1.0 - lams) * q_times_n[None, :] + lams  # (C, K) n p^(c)_k
    denominator = jnp.sum(weighted)
    informative = denominator > 0
    rho = jnp.sum(weighted[None, :] / candidates, axis=1) / jnp.where(informative, denominator, 1.0)
    return rho, informative


def next_mix(config: PriorityConfig, mix, ratios, clean, apply, leaves, total) -> tuple:
    """``(mix, mix_ratios)`` after this batch: R_c <- beta R_c + (1 - beta) rho_c and lambda =
    lambda_{argmin R} (ties: the larger); unchanged for a fixed mix, without an informative
    draw, or with ``apply`` False. ``leaves``, ``total``: the drawn leaves and the root the
    batch was drawn from (the sharded sampler gives them from their owners)."""
    if not config.adaptive:
        return mix, ratios
    rho, informative = variance_ratios(config, mix, clean, leaves, total)
    beta = config.mix_decay
    new_ratios = jnp.where(apply & informative, beta * ratios + (1.0 - beta) * rho, ratios)
    lams = jnp.asarray(mix_candidates(config), jnp.float32)
    best = new_ratios.shape[0] - 1 - jnp.argmin(new_ratios[::-1])  # the last of the minima
    return jnp.where(apply, lams[best], mix), new_ratios


def update(
    config: PriorityConfig, state: PrioritySamplerState, indices, feedback, *, apply=True
) -> PrioritySamplerState:
    """Sets s_j = f_k for every valid draw k of example j (finite, >= 0, index in [0, n)).

    An invalid entry (NaN, infinite, negative) of an example in range is counted in
    ``num_dropped_feedback`` and sets the score to the mean valid feedback of the batch
    (``impute_dropped``): an example that never reports would otherwise keep its first,
    stale score while the others' fall as training goes on, and gain mass. With no valid
    entry in the batch nothing changes; out-of-range indices never write. For a
    duplicated index the last valid entry wins: ``sumtree.last_copy_values`` with ``keep``
    (K x K compares, no sort) gives every copy its value. ``apply`` (a bool
    scalar, may be traced) False rewrites the K old leaves (O(K B log_B n), no branch), so
    the state is bitwise unchanged: every parent is recomputed from the same children.

    With ``uniform_mix="auto"`` it also updates the moving averages R_c of the candidates'
    estimated variance ratios from this batch (``mix_ratios``, against the tree the batch
    was drawn from) and sets ``state.mix`` to the best candidate's lambda (O(C K)).

    Raises:
      TypeError: ``indices`` are not integers.
    """
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    check_state(config, state)
    apply = jnp.asarray(apply, bool)
    clean = clean_feedback(indices, feedback, config.num_examples)
    old = sumtree.get_leaves(state.tree, clean.indices, config.layout)
    scores, writes = impute_dropped(clean.feedback, clean)
    new = jnp.where(writes & apply, priorities(config, scores), old)
    # by (valid, writes): of the copies of an index, the last valid one wins, then the
    # last imputed one
    keep = clean.valid.astype(jnp.int32) * 2 + writes.astype(jnp.int32)
    new = sumtree.last_copy_values(clean.indices, new, keep=keep)
    tree = sumtree.set_leaves(state.tree, clean.indices, new, config.layout, duplicates_agree=True)
    # the mix needs the root the batch was drawn from: taken from the new root minus the
    # changes of the distinct written leaves, so nothing reads the old tree after its
    # in-place write (a read of the old root there made XLA copy the O(n) tree twice a step)
    first = sumtree.first_copies(clean.indices) == jnp.arange(config.batch_size)
    old_total = sumtree.total(tree) - jnp.sum(jnp.where(first, new - old, 0.0))
    mix, ratios = next_mix(config, state.mix, state.mix_ratios, clean, apply, old, old_total)
    return state.replace(
        tree=tree,
        mix=mix,
        mix_ratios=ratios,
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback
        + jnp.where(apply, count_dropped(clean.valid), 0),
    )


def distribution(config: PriorityConfig, state: PrioritySamplerState) -> jax.Array:
    """The full mixture p (n,) (with the state's lambda). O(n): for tests, metrics, plots."""
    check_state(config, state)
    leaves = sumtree.leaf_values(state.tree, config.layout)
    return mixture_probabilities(config, state, leaves)


def state_distribution(state: PrioritySamplerState) -> jax.Array:
    """The full mixture p (n,) from the state alone (its static n and arity, its lambda): what
    ``ab.samplers.probabilities(state)`` gives. O(n)."""
    if not isinstance(state, PrioritySamplerState):
        raise TypeError(f"state must be a PrioritySamplerState, got {type(state).__name__}")
    leaves = sumtree.leaf_values(state.tree, sumtree.layout_for(state.num_examples, state.arity))
    return _mixture(state.mix, state.num_examples, state.tree, leaves)


def priority_sampler(
    num_examples: int,
    batch_size: int,
    *,
    alpha: float = 1.0,
    uniform_mix: float | str = "auto",
    min_uniform_mix: float = 0.1,
    mix_decay: float = 0.95,
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
    so the weights 1 / (n p) <= 1 / lambda make the batch gradient unbiased.

    By default (``uniform_mix="auto"``) lambda adapts: ``update`` estimates, from the
    batch's fresh feedback against the stale scores it was drawn with, the variance ratio
    V(p^(c)) / V(u) of each candidate lambda_c in a geometric grid from ``min_uniform_mix``
    to 1, keeps a moving average of each, and draws the next batch with the best one
    (module docstring). It starts uniform (lambda = 1) and stays there while the stale
    scores would make sampling worse than uniform, so it is a plain ``Sampler`` that needs
    no model and is never much worse than uniform in the feedback's variance; a fixed
    ``uniform_mix`` (e.g. 0.1, the default before adaptive mixing) keeps lambda constant.
    ``update``
    writes the drawn examples' new scores (invalid feedback: dropped and counted in
    ``state.num_dropped_feedback``; duplicates: the last valid one wins; ``apply=False``:
    bitwise unchanged). The priority is clipped to [1e-30, min(1e30, 1e37 / n)] so the tree
    stays finite in float32 (module docstring).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1 (draws are with replacement).
      alpha: the exponent >= 0 (0: uniform; 1: proportional to the score).
      uniform_mix: ``"auto"`` (default: lambda chosen every step by the estimated
        variance), or a fixed lambda in (0, 1], the uniform share (1: exactly uniform).
      min_uniform_mix: lambda_1 in (0, 1], the smallest lambda ``"auto"`` may choose (the
        weights stay <= 1 / lambda_1); ignored for a fixed ``uniform_mix``.
      mix_decay: beta in [0, 1), the decay of ``"auto"``'s moving averages (about
        1 / (1 - beta) batches of memory).
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
      "Not All Samples Are Created Equal", ICML 2018; Owen, Zhou, "Safe and Effective
      Importance Sampling", JASA 2000 (defensive mixtures); Liu, Wu, Mozafari, "Adam with
      Bandit Sampling for Deep Learning", NeurIPS 2020, eq. (1).

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
        min_uniform_mix=min_uniform_mix,
        mix_decay=mix_decay,
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
