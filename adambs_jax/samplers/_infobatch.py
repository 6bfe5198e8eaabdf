"""InfoBatch as an importance sampler with exact weights.

InfoBatch (Qin et al., ICLR 2024) keeps each example's latest loss s_j; at every epoch
boundary it prunes each example whose score is below the mean with probability r (the
prune ratio) and multiplies the gradients of the kept below-mean examples by 1 / (1 - r),
so that, in expectation over the pruning, each example contributes as in full training;
over the last ``anneal_fraction`` of training it prunes nothing.

Here the pruning is replaced by its expectation. Over an epoch, InfoBatch visits a
below-mean example (1 - r) times as often as another, with a weight 1 / (1 - r) relative to
the others; this sampler draws (i.i.d., with replacement, from a sum tree) with

    p_j = c (1 - r)   if s_j < mean(s)  (j is "pruned with probability r"),
    p_j = c           otherwise,        c = 1 / ((1 - r) n_below + n_above),

the same relative frequencies and relative weights, and returns the exact probs, so the
weights w = 1 / (n p) give (1/K) sum_k w_k g_{i_k} unbiased for the mean gradient *at every
step* (random pruning is unbiased only on average over the pruning, and within an epoch the
parameters already depend on which examples were kept). The weights are
1 / (n c) for the others and 1 / (n c (1 - r)) for below-mean examples: InfoBatch's
rescaling 1 / (1 - r), times n_kept / n in expectation (a step of the size of a full-data
step, where InfoBatch instead takes fewer steps per epoch).

Epochs: p changes only at an epoch boundary, every ``renormalize_every`` = ceil(n / K) steps,
through the sampler's ``renormalize`` hook (O(n)), which ``make_train_step``'s ``TrainStep``
calls at that static period (so no step branches; call it yourself in your own loop).
``update`` only writes the K drawn examples' scores (O(K log K)). Before an example has been
drawn its score is unknown: it is never down-weighted and is left out of the mean. From the
first boundary at or after step (1 - ``anneal_fraction``) T (T = ``num_steps``; steps counted
by ``update``s applied) p is uniform (InfoBatch's annealing).

Reference: Qin, Wang, Zheng, Gu, Peng, Xu, Zhou, Shang, Sun, Xie, Zhou, You, "InfoBatch:
Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR 2024 (Algorithm 1).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import check_int, check_key, check_number, check_per_draw, check_state_size
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._base import Sampler, SamplerStateBase
from adambs_jax.samplers._exp3 import clean_feedback, count_dropped, tree_layout

__all__ = [
    "InfobatchSamplerState",
    "InfobatchConfig",
    "infobatch_config",
    "init",
    "check_state",
    "sample",
    "update",
    "epoch_probabilities",
    "new_epoch",
    "distribution",
    "infobatch_sampler",
]


@struct.dataclass
class InfobatchSamplerState(SamplerStateBase):
    """State of ``infobatch_sampler``.

    Attributes:
      tree: (layout.size,) float32 sum tree whose leaves are this epoch's unnormalized
        p_j: 1 - r for a down-weighted (below-mean) example, 1 for the others.
      scores: (n,) float32, each example's loss when it was last drawn.
      seen: (n,) bool, whether the example has been drawn (with valid feedback) yet.
      step: int32 scalar, number of updates applied.
      num_dropped_feedback: int32 scalar, cumulative count of invalid feedback entries.
      num_examples, arity: static.
    """

    tree: jax.Array
    scores: jax.Array
    seen: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ("arity",)
    rebuilt_fields: ClassVar[tuple[str, ...]] = ("tree",)

    def healthy(self) -> jax.Array:
        root = sumtree.total(self.tree)
        return jnp.isfinite(root) & (root > 0)

    def probabilities(self) -> jax.Array:
        return distribution(self)

    def restored(self, like: InfobatchSamplerState, saved_config: dict, where: str):
        """This epoch's probabilities, in a tree of the new sampler's arity (rebuilt from the
        stored tree's leaves where the arity differs)."""
        del where
        saved_arity = saved_config.get("arity", like.arity)
        tree = sumtree.restored_tree(
            self.tree, like.num_examples, saved_arity, like.arity, like.tree
        )
        return self.replace(tree=tree)


class InfobatchConfig(NamedTuple):
    """The validated, static configuration of an ``infobatch_sampler``."""

    num_examples: int
    batch_size: int
    prune_ratio: float
    anneal_fraction: float
    num_steps: int
    epoch_steps: int
    anneal_start: int
    layout: sumtree.TreeLayout


def infobatch_config(
    num_examples, batch_size, *, prune_ratio, anneal_fraction, num_steps, arity=None
) -> InfobatchConfig:
    """Validates the arguments of ``infobatch_sampler`` (ValueError naming the argument)."""
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    prune_ratio = check_number("prune_ratio", prune_ratio, nonnegative=True)
    if prune_ratio >= 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    anneal_fraction = check_number("anneal_fraction", anneal_fraction, nonnegative=True)
    if anneal_fraction > 1:
        raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction!r}")
    if num_steps is None:
        raise ValueError("num_steps (T) is needed: the anneal starts at (1 - anneal_fraction) T")
    num_steps = check_int("num_steps", num_steps)
    layout = tree_layout(num_examples, sumtree.default_arity() if arity is None else arity)
    return InfobatchConfig(
        num_examples,
        batch_size,
        prune_ratio,
        anneal_fraction,
        num_steps,
        epoch_steps=math.ceil(num_examples / batch_size),
        anneal_start=math.floor((1.0 - anneal_fraction) * num_steps),
        layout=layout,
    )


def init(config: InfobatchConfig) -> InfobatchSamplerState:
    """No example seen: p uniform until the first epoch boundary."""
    n = config.num_examples
    return InfobatchSamplerState(
        tree=sumtree.build(jnp.ones((n,), jnp.float32), config.layout),
        scores=jnp.zeros((n,), jnp.float32),
        seen=jnp.zeros((n,), bool),
        step=jnp.zeros((), jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        num_examples=n,
        arity=config.layout.arity,
    )


def check_state(config: InfobatchConfig, state) -> None:
    """TypeError unless ``state`` is an ``InfobatchSamplerState``; ValueError if it was
    built for another n or arity."""
    if not isinstance(state, InfobatchSamplerState):
        raise TypeError(
            f"state must be an InfobatchSamplerState (sampler.init()), got {type(state).__name__}"
        )
    check_state_size(state, config.num_examples)
    sumtree.check_state_tree(state.tree, state.arity, config.layout)


def sample(config: InfobatchConfig, state: InfobatchSamplerState, key: jax.Array):
    """K i.i.d. draws from the tree: ``(indices (K,) int32, probs (K,) = p[indices])``."""
    check_state(config, state)
    check_key(key, name="key")
    uniforms = jax.random.uniform(key, (config.batch_size,), jnp.float32)
    root = sumtree.total(state.tree)
    indices = sumtree.draw(
        state.tree, sumtree.uniforms_to_targets(uniforms, root, stratified=False), config.layout
    )
    return indices, sumtree.get_leaves(state.tree, indices, config.layout) / root


def update(
    config: InfobatchConfig, state: InfobatchSamplerState, indices, feedback, *, apply=True
) -> InfobatchSamplerState:
    """Sets s_j = f_k (the loss) for every valid draw k of example j; p is unchanged until
    the next epoch boundary. Invalid feedback is dropped and counted; for a duplicated index
    the last valid entry wins (only that one is written, so the scatter is deterministic);
    ``apply`` (a bool scalar, may be traced) False writes nothing: the state is bitwise
    unchanged, without a branch."""
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    check_state(config, state)
    apply = jnp.asarray(apply, bool)
    clean = clean_feedback(indices, feedback, config.num_examples)
    n = config.num_examples
    written = jnp.where(clean.valid & apply, clean.indices, n)  # n: out of range, dropped
    # every copy of a duplicated index carries its last draw's loss: the writes agree
    target, scores = sumtree.dedupe_last(written, clean.feedback)
    return state.replace(
        scores=state.scores.at[target].set(scores, mode="drop"),
        seen=state.seen.at[target].set(True, mode="drop"),
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback
        + jnp.where(apply, count_dropped(clean.valid), 0),
    )


def epoch_probabilities(config: InfobatchConfig, scores, seen, annealing) -> jax.Array:
    """The unnormalized p (n,) of a new epoch: 1 - r where s_j < mean of the seen scores
    (and below their max, so that rounding of the mean cannot down-weight every example),
    1 elsewhere; all 1 when ``annealing`` or nothing was seen."""
    num_seen = jnp.sum(seen)
    mean = jnp.sum(jnp.where(seen, scores / jnp.maximum(num_seen, 1), 0.0))
    top = jnp.max(jnp.where(seen, scores, -jnp.inf))
    below = seen & (scores < mean) & (scores < top) & jnp.logical_not(annealing)
    return jnp.where(below, 1.0 - config.prune_ratio, 1.0).astype(jnp.float32)


def new_epoch(config: InfobatchConfig, state: InfobatchSamplerState) -> InfobatchSamplerState:
    """The epoch boundary (the sampler's ``renormalize``, O(n)): rebuilds the tree from the
    scores (``epoch_probabilities``); uniform from ``config.anneal_start`` updates on."""
    check_state(config, state)
    annealing = state.step >= config.anneal_start
    leaves = epoch_probabilities(config, state.scores, state.seen, annealing)
    return state.replace(tree=sumtree.build(leaves, config.layout))


def distribution(state: InfobatchSamplerState) -> jax.Array:
    """The full p (n,) = leaves / root. O(n)."""
    layout = tree_layout(state.num_examples, state.arity)
    return sumtree.leaf_values(state.tree, layout) / sumtree.total(state.tree)


def infobatch_sampler(
    num_examples: int,
    batch_size: int,
    *,
    prune_ratio: float = 0.5,
    anneal_fraction: float = 0.125,
    num_steps: int | None = None,
    arity: int | None = None,
) -> Sampler:
    """InfoBatch (Qin et al., ICLR 2024) as importance sampling with exact weights.

    Each epoch (every ceil(n / K) steps, at ``renormalize``), an example whose last seen loss
    is below the mean gets p_j proportional to 1 - r, the others 1 (InfoBatch prunes it with
    probability r and rescales the kept ones by 1 / (1 - r): the same relative frequencies
    and weights, in expectation); draws are i.i.d. from p and the weights 1 / (n p) are exact,
    so the step's gradient is unbiased at every step. No down-weighting from the first epoch
    boundary at or after step (1 - ``anneal_fraction``) T. ``update`` records the drawn
    examples' losses: train with ``feedback="loss"``. See the module docstring.

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1.
      prune_ratio: r in [0, 1) (0: uniform).
      anneal_fraction: in [0, 1], the final share of the T steps trained uniformly.
      num_steps: T, the planned number of steps (required).
      arity: B of the sum tree; default ``sumtree.default_arity()``.

    Returns:
      A ``Sampler`` with ``probabilities``, ``renormalize_every`` = ceil(n / K) and
      ``renormalize`` = the epoch boundary.

    References:
      Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
      ICLR 2024; Liu, Wu, Mozafari, NeurIPS 2020, eq. (1) (the weights 1 / (n p)).

    Examples:
      >>> import jax.numpy as jnp
      >>> from adambs_jax.samplers._infobatch import infobatch_sampler
      >>> sampler = infobatch_sampler(4, 4, prune_ratio=0.5, num_steps=100)
      >>> state = sampler.update(sampler.init(), jnp.arange(4), jnp.array([1., 1., 3., 3.]))
      >>> [round(float(p), 3) for p in sampler.probabilities(sampler.renormalize(state))]
      [0.167, 0.167, 0.333, 0.333]
    """
    config = infobatch_config(
        num_examples,
        batch_size,
        prune_ratio=prune_ratio,
        anneal_fraction=anneal_fraction,
        num_steps=num_steps,
        arity=arity,
    )
    init_fn = functools.partial(init, config)
    sample_fn = functools.partial(sample, config)
    update_fn = functools.partial(update, config)
    new_epoch_fn = functools.partial(new_epoch, config)
    return Sampler(
        init_fn,
        sample_fn,
        update_fn,
        config.num_examples,
        config.batch_size,
        distribution,
        renormalize_every=config.epoch_steps,
        renormalize=new_epoch_fn,
    )
