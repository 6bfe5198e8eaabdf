"""AdamBS Algorithm 2 as pure functions: EXP3 with multiple plays over the n examples.

The state keeps the unnormalized weights u_j (in log space and as the leaves of a prefix-sum
tree, ``adambs_jax.sumtree``); the distribution is p_j = u_j / root (lazy normalization).
One ``update`` with draws I = (i_1..i_K) and feedback f (K,) runs the numbered steps of
Algorithm 2 (Liu, Wu, Mozafari, NeurIPS 2020), each a module-level function here:

  1. ``clean_feedback``          drop negative / NaN / inf feedback and out-of-range indices
  2. ``bound_for_update``        ratio_k = min(f_k, L) / L with L fixed, the running max
                                 (``clip_to_bound``) or a running quantile (``quantile_bound``)
  3. ``merge_duplicate_draws``   sort the draws; runs of equal indices are one arm
  4. ``shifted_loss_estimate``   alpha_p h_j, from l_j = L^2/p_min^2 - f_j^2/p_j^2
  5. ``project_and_write``       exact KL projection onto {q >= p_min}, write the K leaves

and, every ``Exp3Config.renormalize_every`` updates (a static count), ``renormalize`` scales
the root back to 2^100 (O(n)), so that no leaf ever underflows (no data-dependent branch).

``exp3_config`` validates the arguments of ``adambs_jax.exp3_sampler`` into a frozen
``Exp3Config``; ``init``, ``sample``, ``update`` and ``renormalize`` take it as their first
argument, and the factory binds it. Per step: O(K log K + K B log_B n) (B the tree's arity);
only the sampled leaves change. Nothing here is a ``while_loop`` or ``cond``: a skipped
update (``apply=False``) rewrites the K leaves with their old values.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 and Lemma 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import check_key, check_per_draw, check_state_size
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._exp3_bound import (  # re-exported: step 2's bound L
    clip_ratio,
    clip_to_bound,
    clipped_fraction,
    quantile_bound,
)
from adambs_jax.samplers._exp3_config import (  # re-exported: the configuration of this module's steps
    BOUND_MODES,
    DEFAULT_BOUND_LEARNING_RATE,
    DEFAULT_BOUND_QUANTILE,
    INITIAL_LOG_ROOT,
    LEAF_FLOOR_LOG,
    MIN_RENORMALIZATION_BUDGET,
    Exp3Config,
    default_step_size,
    exp3_config,
    renormalization_period,
    tree_layout,
)
from adambs_jax.samplers._exp3_health import check_state_finite
from adambs_jax.samplers._projection import project_onto_floored_simplex

__all__ = [
    "INITIAL_LOG_ROOT",
    "LEAF_FLOOR_LOG",
    "MIN_RENORMALIZATION_BUDGET",
    "Exp3SamplerState",
    "Exp3Config",
    "exp3_config",
    "renormalization_period",
    "default_step_size",
    "init",
    "check_state",
    "check_state_finite",
    "sample",
    "distribution",
    "CleanFeedback",
    "clean_feedback",
    "clip_to_bound",
    "clip_ratio",
    "quantile_bound",
    "bound_for_update",
    "clipped_fraction",
    "BOUND_MODES",
    "DEFAULT_BOUND_QUANTILE",
    "DEFAULT_BOUND_LEARNING_RATE",
    "MergedDraws",
    "merge_duplicate_draws",
    "shifted_loss_estimate",
    "project_and_write",
    "count_dropped",
    "renormalize",
    "update",
    "tree_layout",
]


@struct.dataclass
class Exp3SamplerState:
    """State of ``exp3_sampler``.

    Attributes:
      log_weights: (n,) float32, log of the unnormalized weights u_j; the source of truth.
      tree: (layout.size,) float32 B-ary prefix-sum tree whose leaves are exp(log_weights); the
        distribution is p_j = u_j / root (lazy normalization).
      grad_norm_bound: float32 scalar L, the feedback clip: the fixed bound, the running max
        of all valid feedback ("running_max") or a running quantile of it ("quantile", the
        default); 0 until the first valid feedback in the two adaptive modes.
      step: int32 scalar, number of updates applied.
      num_dropped_feedback: int32 scalar, cumulative count of feedback entries that were
        negative, NaN or infinite (or had an out-of-range index) and so were ignored.
      num_rescales: int32 scalar, how many O(n) renormalizations (``renormalize``) ran.
      num_examples, p_min, arity, bound_mode: static configuration, part of the pytree
        structure (``arity``: the tree's number of children per node, ``adambs_jax.sumtree``;
        ``bound_mode``: one of ``BOUND_MODES``, what a restore compares L's mode with).
    """

    log_weights: jax.Array
    tree: jax.Array
    grad_norm_bound: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    num_rescales: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    p_min: float = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)
    bound_mode: str = struct.field(pytree_node=False, default="running_max")


def init(config: Exp3Config) -> Exp3SamplerState:
    """Uniform p = 1/n with root 2^100; L = 0 until feedback arrives (adaptive modes) or the
    fixed bound."""
    n = config.num_examples
    log_weights = jnp.full((n,), INITIAL_LOG_ROOT - math.log(n), jnp.float32)
    bound = 0.0 if config.adaptive_bound else config.grad_norm_bound
    return Exp3SamplerState(
        log_weights=log_weights,
        tree=sumtree.build(jnp.exp(log_weights), config.layout),
        grad_norm_bound=jnp.asarray(bound, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        num_rescales=jnp.zeros((), jnp.int32),
        num_examples=config.num_examples,
        p_min=config.p_min,
        arity=config.layout.arity,
        bound_mode=config.bound_mode,
    )


def check_state(config: Exp3Config, state) -> None:
    """TypeError unless ``state`` is an ``Exp3SamplerState``; ValueError if it was built for
    another n (its tree then has another shape)."""
    if not isinstance(state, Exp3SamplerState):
        raise TypeError(
            f"state must be an Exp3SamplerState (sampler.init()), got {type(state).__name__}"
        )
    check_state_size(state, config.num_examples)
    sumtree.check_state_tree(
        state.tree,
        state.arity,
        config.layout,
        owner=f"this sampler (num_examples={config.num_examples})",
    )


def sample(config: Exp3Config, state: Exp3SamplerState, key: jax.Array):
    """K draws from p = leaves / root: ``(indices (K,) int32, probs (K,) = p[indices])``."""
    check_state(config, state)
    check_key(key, name="key")
    root = sumtree.total(state.tree)
    uniforms = jax.random.uniform(key, (config.batch_size,), jnp.float32)
    targets = sumtree.uniforms_to_targets(uniforms, root, stratified=config.stratified)
    indices = sumtree.draw(state.tree, targets, config.layout)
    probs = sumtree.get_leaves(state.tree, indices, config.layout) / root
    return indices, probs


def distribution(state: Exp3SamplerState) -> jax.Array:
    """p = leaves / root (n,). O(n): for tests, metrics and plots."""
    layout = tree_layout(state.num_examples, state.arity)
    return sumtree.leaf_values(state.tree, layout) / sumtree.total(state.tree)


class CleanFeedback(NamedTuple):
    """The draws with bad entries neutralized (step 1)."""

    indices: jax.Array  # (K,) int32, clipped into [0, n)
    feedback: jax.Array  # (K,) float32, 0 where dropped
    valid: jax.Array  # (K,) bool, False where dropped


def clean_feedback(indices, feedback, num_examples: int) -> CleanFeedback:
    """Step 1: a draw is dropped (counts as not drawn) when its index is outside [0, n) or its
    feedback is negative, NaN or infinite; dropped feedback is replaced by 0. The range is
    checked in the indices' own integer dtype, before the cast to int32 (an int64 index
    2^32 + 3 is dropped, not wrapped to 3).

    Raises:
      TypeError: ``indices`` are not integers (floats would be silently truncated).
    """
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    largest = min(num_examples - 1, int(jnp.iinfo(indices.dtype).max))
    in_range = (indices >= 0) & (indices <= largest)
    indices = jnp.clip(indices, 0, largest).astype(jnp.int32)
    feedback = jnp.asarray(feedback).astype(jnp.float32)
    valid = in_range & jnp.isfinite(feedback) & (feedback >= 0)
    feedback = jnp.where(valid, feedback, 0.0)
    return CleanFeedback(indices, feedback, valid)


def bound_for_update(config: Exp3Config, clean: CleanFeedback, stored_bound):
    """Step 2: ``(L, ratio)``, ratio_k = min(f_k, L) / L in [0, 1], with L per
    ``config.bound_mode``: the configured fixed L (not the stored one: after a restore the
    new sampler's L rules), the running max (``clip_to_bound``) or the running quantile
    (``quantile_bound``)."""
    if config.bound_mode == "quantile":
        bound = quantile_bound(
            clean.feedback,
            clean.valid,
            stored_bound,
            quantile=config.bound_quantile,
            learning_rate=config.bound_learning_rate,
        )
        return bound, clip_ratio(clean.feedback, bound)
    if config.bound_mode == "fixed":
        stored_bound = jnp.asarray(config.grad_norm_bound, jnp.float32)
    return clip_to_bound(clean.feedback, stored_bound, config.adaptive_bound)


class MergedDraws(NamedTuple):
    """The draws sorted by index (step 3); a run of equal indices is one arm."""

    indices: jax.Array  # (K,) int32, ascending
    ratio: jax.Array  # (K,) float32, in the same order
    valid: jax.Array  # (K,) bool, in the same order
    is_first: jax.Array  # (K,) bool, True at the first draw of each distinct arm
    run: jax.Array  # (K,) int, the arm's number 0..(distinct arms - 1)


def merge_duplicate_draws(indices, ratio, valid) -> MergedDraws:
    """Step 3: sorts the draws (stably) so that copies of one arm are adjacent."""
    order = jnp.argsort(indices, stable=True)
    idx = indices[order]
    ratio, valid = ratio[order], valid[order]
    is_first = jnp.concatenate([jnp.array([True]), idx[1:] != idx[:-1]])
    run = jnp.cumsum(is_first) - 1
    return MergedDraws(idx, ratio, valid, is_first, run)


def shifted_loss_estimate(
    p, draws: MergedDraws, *, p_min: float, step_size: float, batch_size: int
):
    """Step 4: alpha_p h_j (K,), the same for every copy of arm j, where

        alpha_p l_k / (K p) = eta0 (p_min^2/L^2)(L^2/p_min^2 - f^2/p^2) / (K p)
                            = eta0 (1 - (p_min f / (L p))^2) / (K p)

    summed over the valid draws of arm j (h_j = l_j c_j / (K p_j) for agreeing feedback), in
    units that never overflow float32 (L^2 / p_min^2 can be ~1e14 L^2 on its own)."""
    shortfall = jnp.clip(1.0 - jnp.square(p_min * draws.ratio / p), 0.0, 1.0)
    per_draw = jnp.where(draws.valid, step_size * shortfall / (batch_size * p), 0.0)
    return jax.ops.segment_sum(per_draw, draws.run, num_segments=batch_size)[draws.run]


def project_and_write(
    config: Exp3Config,
    state: Exp3SamplerState,
    draws: MergedDraws,
    p,
    log_scaled_w,
    log_root,
    apply=True,
):
    """Step 5: the exact KL projection (``project_onto_floored_simplex``) and the write of
    the K sampled leaves: ``(log_weights (n,), tree, written)``.

    ``log_scaled_w`` = log(S w_j) with S the root; u'_j = p'_j S Z with p'_j =
    max(p_min, w_j / Z), so unsampled leaves keep u_j and the new root is S Z. When the
    result is not finite or ``apply`` is False (``written`` False), the K old leaves are
    written back instead: O(K B log_B n), not an O(n) select, and the tree stays bitwise the
    same (every parent is recomputed from the same children in the same order).
    """
    # R = mass of the unsampled arms, each >= p_min; exactly 0 when every arm was drawn
    # (else float32 rounding of 1 - sum, ~1e-7, could dwarf tiny sampled weights)
    num_unsampled = config.num_examples - jnp.sum(draws.is_first)
    rest_mass = jnp.where(
        num_unsampled > 0,
        jnp.maximum(1.0 - jnp.sum(jnp.where(draws.is_first, p, 0.0)), num_unsampled * config.p_min),
        0.0,
    )
    log_z = project_onto_floored_simplex(
        log_scaled_w - log_root, draws.is_first, rest_mass, config.p_min
    ).log_normalizer
    new_log_weights = jnp.maximum(log_scaled_w, log_root + log_z + config.log_p_min)
    # the leaves written are exp(new_log_weights): both must be finite (never NaN, inf or a
    # log-weight of -inf), else the old leaves are written back
    written = (
        jnp.all(jnp.isfinite(new_log_weights) & jnp.isfinite(jnp.exp(new_log_weights)))
        & jnp.isfinite(log_z)
        & apply
    )
    old_log_weights = state.log_weights[draws.indices]
    # read every old value before the scatters below may reuse the buffers in place
    old_log_weights, new_log_weights, log_weights, tree = jax.lax.optimization_barrier(
        (old_log_weights, new_log_weights, state.log_weights, state.tree)
    )
    new_log_weights = jnp.where(written, new_log_weights, old_log_weights)
    log_weights = log_weights.at[draws.indices].set(new_log_weights)
    # copies of an arm carry one value (merged draws): set_leaves need not sort them again
    tree = sumtree.set_leaves(
        tree, draws.indices, jnp.exp(new_log_weights), config.layout, duplicates_agree=True
    )
    return log_weights, tree, written


def count_dropped(valid) -> jax.Array:
    """int32 scalar: how many draws step 1 dropped."""
    return jnp.sum(~valid).astype(jnp.int32)


def renormalize(config: Exp3Config, state: Exp3SamplerState) -> Exp3SamplerState:
    """Scales every weight so that the root is 2^100 again and rebuilds the tree, O(n); p is
    unchanged up to rounding. Run it at least every ``config.renormalize_every`` updates
    (``renormalization_period``): between two runs no leaf falls below 2^-100."""
    check_state(config, state)
    shift = jnp.log(sumtree.total(state.tree)) - INITIAL_LOG_ROOT
    log_weights = state.log_weights - shift
    return state.replace(
        log_weights=log_weights,
        tree=sumtree.build(jnp.exp(log_weights), config.layout),
        num_rescales=state.num_rescales + 1,
    )


def update(
    config: Exp3Config, state: Exp3SamplerState, indices, feedback, *, apply=True
) -> Exp3SamplerState:
    """One step of Algorithm 2: steps 1-5 for the draws ``indices`` (K,) and ``feedback`` (K,).

    The multiplicative step w_j = p_j exp(-alpha_p h_j) is exact in log space (S w_j has
    log u_j - alpha_p h_j) and identical for all copies of a duplicated arm. ``apply`` (a
    bool scalar, may be traced): False returns ``state`` bitwise unchanged, without a branch
    (the train step passes "the step is finite"). With ``config.renormalize_every`` 0 the
    update also renormalizes, every time.
    """
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    check_state(config, state)
    apply = jnp.asarray(apply, bool)
    clean = clean_feedback(indices, feedback, config.num_examples)
    bound, ratio = bound_for_update(config, clean, state.grad_norm_bound)
    draws = merge_duplicate_draws(clean.indices, ratio, clean.valid)
    root = sumtree.total(state.tree)
    leaves = sumtree.get_leaves(state.tree, draws.indices, config.layout)
    p = leaves / root  # one rounding, not exp(lw - log S)
    alpha_h = shifted_loss_estimate(
        p, draws, p_min=config.p_min, step_size=config.step_size, batch_size=config.batch_size
    )
    log_scaled_w = state.log_weights[draws.indices] - alpha_h
    log_weights, tree, written = project_and_write(
        config, state, draws, p, log_scaled_w, jnp.log(root), apply
    )
    new_state = state.replace(
        log_weights=log_weights,
        tree=tree,
        grad_norm_bound=jnp.where(written, bound, state.grad_norm_bound),
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback
        + jnp.where(apply, count_dropped(draws.valid), 0),
    )
    if config.renormalize_every == 0:  # static: the root may shrink without bound
        renormalized = renormalize(config, new_state)
        new_state = jax.tree.map(lambda a, b: jnp.where(apply, a, b), renormalized, state)
    return new_state
