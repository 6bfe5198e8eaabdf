"""AdamBS Algorithm 2 as pure functions: EXP3 with multiple plays over the n examples.

The state keeps the unnormalized weights u_j (in log space and as the leaves of a prefix-sum
tree, ``adambs_jax.sumtree``); the distribution is p_j = u_j / root (lazy normalization).
One ``update`` with draws I = (i_1..i_K) and feedback f (K,) runs the numbered steps of
Algorithm 2 (Liu, Wu, Mozafari, NeurIPS 2020), each a module-level function here:

  1. ``clean_feedback``          drop negative / NaN / inf feedback and out-of-range indices
  2. ``clip_to_bound``           ratio_k = min(f_k, L) / L with L fixed or the running max
  3. ``merge_duplicate_draws``   sort the draws; runs of equal indices are one arm
  4. ``shifted_loss_estimate``   alpha_p h_j, from l_j = L^2/p_min^2 - f_j^2/p_j^2
  5. ``project_and_write``       exact KL projection onto {q >= p_min}, write the K leaves
  6. ``maybe_rescale``           shift the log-weights when the root drifts towards 0

``exp3_config`` validates the arguments of ``adambs_jax.exp3_sampler`` into a frozen
``Exp3Config``; ``init``, ``sample`` and ``update`` take it as their first argument, and the
factory binds it. Per step: O(K log K + K log n); only the sampled leaves change.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 and Lemma 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax import sumtree
from adambs_jax.checks import check_bool, check_int, check_number, check_per_draw, check_state_size
from adambs_jax.projection import project_onto_floored_simplex

__all__ = [
    "RESCALE_LOG_THRESHOLD",
    "Exp3SamplerState",
    "Exp3Config",
    "exp3_config",
    "default_step_size",
    "init",
    "check_state",
    "sample",
    "distribution",
    "CleanFeedback",
    "clean_feedback",
    "clip_to_bound",
    "MergedDraws",
    "merge_duplicate_draws",
    "shifted_loss_estimate",
    "project_and_write",
    "count_dropped",
    "maybe_rescale",
    "update",
]

# When log(root) falls below -RESCALE_LOG_THRESHOLD the log-weights are shifted by -log(root)
# and the tree rebuilt (O(n)). The root only shrinks (Z <= 1), by a factor Z per step close
# to 1, so this happens rarely; between rescales every leaf stays >= p_min e^-40 (n <= 2^31:
# > 1e-27), far above float32's smallest normal number (1.2e-38).
RESCALE_LOG_THRESHOLD = 40.0


@struct.dataclass
class Exp3SamplerState:
    """State of ``exp3_sampler``.

    Attributes:
      log_weights: (n,) float32, log of the unnormalized weights u_j; the source of truth.
      tree: (2 * capacity,) float32 prefix-sum tree whose leaves are exp(log_weights); the
        distribution is p_j = u_j / root (lazy normalization).
      grad_norm_bound: float32 scalar L, the feedback clip; the running max of all valid
        feedback seen when the sampler was built without a fixed bound.
      step: int32 scalar, number of updates applied.
      num_dropped_feedback: int32 scalar, cumulative count of feedback entries that were
        negative, NaN or infinite (or had an out-of-range index) and so were ignored.
      num_rescales: int32 scalar, how many O(n) renormalizations of the tree have happened.
      num_examples, p_min: static configuration, part of the pytree structure.
    """

    log_weights: jax.Array
    tree: jax.Array
    grad_norm_bound: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    num_rescales: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    p_min: float = struct.field(pytree_node=False)


class Exp3Config(NamedTuple):
    """The validated, static configuration of an ``exp3_sampler`` (see ``exp3_config``).

    Attributes:
      num_examples: n >= 1.
      batch_size: K >= 1.
      p_min: the probability floor, 0 < p_min <= 1/n.
      step_size: eta0 > 0; alpha_p = eta0 p_min^2 / L^2.
      grad_norm_bound: a fixed L > 0, or None for the running max kept in the state.
      stratified: one draw per slice of the mass (True) or i.i.d. draws (False).
      capacity: the leaf slots of the tree, the smallest power of two >= n.
    """

    num_examples: int
    batch_size: int
    p_min: float
    step_size: float
    grad_norm_bound: Optional[float]
    stratified: bool
    capacity: int

    @property
    def adaptive_bound(self) -> bool:
        """Whether L is the running max of the feedback (no fixed ``grad_norm_bound``)."""
        return self.grad_norm_bound is None

    @property
    def log_p_min(self) -> float:
        """log p_min: the floor of the log-weights relative to log(root Z)."""
        return math.log(self.p_min)


def default_step_size(num_examples: int, num_steps: int) -> float:
    """eta0 = sqrt(2 log(n) / (n T)): Lemma 1's alpha_p = sqrt(2 R^2 p_min^4 / (n T L^4))
    with R^2 = log n, written as alpha_p = eta0 p_min^2 / L^2."""
    return math.sqrt(2.0 * math.log(max(num_examples, 2)) / (num_examples * num_steps))


def _checked_step_size(num_examples: int, step_size, num_steps) -> float:
    if step_size is None:
        if num_steps is None:
            raise ValueError(
                "exp3_sampler needs step_size (eta0) or num_steps (T), from which the "
                "default eta0 = sqrt(2 log(n) / (n T)) of the paper's Lemma 1 is computed"
            )
        step_size = default_step_size(num_examples, check_int("num_steps", num_steps))
    return check_number("step_size", step_size, positive=True)


def exp3_config(num_examples, batch_size, *, p_min, step_size, num_steps, grad_norm_bound,
                stratified) -> Exp3Config:
    """Validates the arguments of ``exp3_sampler`` into an ``Exp3Config`` (same meaning; the
    factory's defaults are the only ones), filling in p_min = 0.1 / n and eta0 where None.

    Raises:
      ValueError: an argument out of range, named in the message.
      TypeError: ``stratified`` is not a bool.
    """
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    p_min = check_number("p_min", 0.1 / num_examples if p_min is None else p_min, positive=True)
    if p_min * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_min * num_examples must be <= 1 (a distribution cannot give every example "
            f"more than 1/n), got p_min={p_min} with num_examples={num_examples}"
        )
    step_size = _checked_step_size(num_examples, step_size, num_steps)
    if grad_norm_bound is not None:
        grad_norm_bound = check_number("grad_norm_bound", grad_norm_bound, positive=True)
    return Exp3Config(
        num_examples=num_examples,
        batch_size=batch_size,
        p_min=p_min,
        step_size=step_size,
        grad_norm_bound=grad_norm_bound,
        stratified=check_bool("stratified", stratified),
        capacity=sumtree.capacity_for(num_examples),
    )


def init(config: Exp3Config) -> Exp3SamplerState:
    """Uniform p = 1/n; L = 0 until feedback arrives (adaptive) or the fixed bound."""
    log_weights = jnp.full((config.num_examples,), -math.log(config.num_examples), jnp.float32)
    bound = 0.0 if config.adaptive_bound else config.grad_norm_bound
    return Exp3SamplerState(
        log_weights=log_weights,
        tree=sumtree.build(jnp.exp(log_weights)),
        grad_norm_bound=jnp.asarray(bound, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        num_rescales=jnp.zeros((), jnp.int32),
        num_examples=config.num_examples,
        p_min=config.p_min,
    )


def check_state(config: Exp3Config, state) -> None:
    """TypeError unless ``state`` is an ``Exp3SamplerState``; ValueError if it was built for
    another n (its tree then has another shape)."""
    if not isinstance(state, Exp3SamplerState):
        raise TypeError(
            f"state must be an Exp3SamplerState (sampler.init()), got {type(state).__name__}"
        )
    check_state_size(state, config.num_examples)
    if state.tree.shape != (2 * config.capacity,):
        raise ValueError(
            f"state: tree of shape {state.tree.shape}, but this sampler (num_examples="
            f"{config.num_examples}) has a tree of shape ({2 * config.capacity},)"
        )


def sample(config: Exp3Config, state: Exp3SamplerState, key: jax.Array):
    """K draws from p = leaves / root: ``(indices (K,) int32, probs (K,) = p[indices])``."""
    check_state(config, state)
    root = sumtree.total(state.tree)
    uniforms = jax.random.uniform(key, (config.batch_size,), jnp.float32)
    targets = sumtree.uniforms_to_targets(uniforms, root, stratified=config.stratified)
    indices = sumtree.draw(state.tree, targets)
    probs = sumtree.get_leaves(state.tree, indices) / root
    return indices, probs


def distribution(state: Exp3SamplerState) -> jax.Array:
    """p = leaves / root (n,). O(n): for tests, metrics and plots."""
    leaves = sumtree.leaf_values(state.tree, state.num_examples)
    return leaves / sumtree.total(state.tree)


class CleanFeedback(NamedTuple):
    """The draws with bad entries neutralized (step 1)."""

    indices: jax.Array  # (K,) int32, clipped into [0, n)
    feedback: jax.Array  # (K,) float32, 0 where dropped
    valid: jax.Array  # (K,) bool, False where dropped


def clean_feedback(indices, feedback, num_examples: int) -> CleanFeedback:
    """Step 1: a draw is dropped (counts as not drawn) when its index is outside [0, n) or its
    feedback is negative, NaN or infinite; dropped feedback is replaced by 0."""
    indices = jnp.asarray(indices).astype(jnp.int32)
    feedback = jnp.asarray(feedback).astype(jnp.float32)
    in_range = (indices >= 0) & (indices < num_examples)
    valid = in_range & jnp.isfinite(feedback) & (feedback >= 0)
    indices = jnp.clip(indices, 0, num_examples - 1)
    feedback = jnp.where(valid, feedback, 0.0)
    return CleanFeedback(indices, feedback, valid)


def clip_to_bound(feedback, stored_bound, adaptive: bool):
    """Step 2: ``(L, ratio)`` with L = max(stored L, max f) if ``adaptive`` else the stored
    L, and ratio_k = min(f_k, L) / L in [0, 1] (0 while L = 0: every loss is the maximum)."""
    if adaptive:
        bound = jnp.maximum(stored_bound, jnp.max(feedback))
    else:
        bound = stored_bound
    ratio = jnp.where(bound > 0, jnp.minimum(feedback, bound) / jnp.where(bound > 0, bound, 1), 0.0)
    return bound, ratio


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


def shifted_loss_estimate(p, draws: MergedDraws, *, p_min: float, step_size: float,
                          batch_size: int):
    """Step 4: alpha_p h_j (K,), the same for every copy of arm j, where

        alpha_p l_k / (K p) = eta0 (p_min^2/L^2)(L^2/p_min^2 - f^2/p^2) / (K p)
                            = eta0 (1 - (p_min f / (L p))^2) / (K p)

    summed over the valid draws of arm j (h_j = l_j c_j / (K p_j) for agreeing feedback), in
    units that never overflow float32 (L^2 / p_min^2 can be ~1e14 L^2 on its own)."""
    shortfall = jnp.clip(1.0 - jnp.square(p_min * draws.ratio / p), 0.0, 1.0)
    per_draw = jnp.where(draws.valid, step_size * shortfall / (batch_size * p), 0.0)
    return jax.ops.segment_sum(per_draw, draws.run, num_segments=batch_size)[draws.run]


def project_and_write(config: Exp3Config, state: Exp3SamplerState, draws: MergedDraws, p,
                      log_scaled_w, log_root):
    """Step 5: the exact KL projection (``project_onto_floored_simplex``) and the write of
    the K sampled leaves: ``(log_weights (n,), tree, ok)``.

    ``log_scaled_w`` = log(S w_j) with S the root; u'_j = p'_j S Z with p'_j =
    max(p_min, w_j / Z), so unsampled leaves keep u_j and the new root is S Z. A non-finite
    result (``ok`` False) rewrites the old leaves instead: O(K log n), not O(n).
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
    # rewriting old leaves recomputes the same parent sums exactly
    ok = jnp.all(jnp.isfinite(new_log_weights)) & jnp.isfinite(log_z)
    new_log_weights = jnp.where(ok, new_log_weights, state.log_weights[draws.indices])
    log_weights = state.log_weights.at[draws.indices].set(new_log_weights)
    tree = sumtree.set_leaves(state.tree, draws.indices, jnp.exp(new_log_weights))
    return log_weights, tree, ok


def count_dropped(valid) -> jax.Array:
    """int32 scalar: how many draws step 1 dropped."""
    return jnp.sum(~valid).astype(jnp.int32)


def maybe_rescale(state: Exp3SamplerState) -> Exp3SamplerState:
    """Step 6: shifts log-weights by -log(root) and rebuilds the tree, O(n), but only when the
    root has drifted below e^-RESCALE_LOG_THRESHOLD (rarely): amortized O(1) per step."""

    def rescale(s):
        log_weights = s.log_weights - jnp.log(sumtree.total(s.tree))
        return s.replace(
            log_weights=log_weights,
            tree=sumtree.build(jnp.exp(log_weights)),
            num_rescales=s.num_rescales + 1,
        )

    def needs_rescale(s):
        return jnp.log(sumtree.total(s.tree)) < -RESCALE_LOG_THRESHOLD

    # A while loop (which runs zero times, or once: afterwards the root is 1) rather than
    # lax.cond: XLA updates a while loop's carry in place, whereas both branches of a cond
    # produce fresh buffers, i.e. an O(n) copy of the state on every step.
    return jax.lax.while_loop(needs_rescale, rescale, state)


def update(config: Exp3Config, state: Exp3SamplerState, indices, feedback) -> Exp3SamplerState:
    """One step of Algorithm 2: steps 1-6 for the draws ``indices`` (K,) and ``feedback`` (K,).

    The multiplicative step w_j = p_j exp(-alpha_p h_j) is exact in log space (S w_j has
    log u_j - alpha_p h_j) and identical for all copies of a duplicated arm.
    """
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    check_state(config, state)
    clean = clean_feedback(indices, feedback, config.num_examples)
    bound, ratio = clip_to_bound(clean.feedback, state.grad_norm_bound, config.adaptive_bound)
    draws = merge_duplicate_draws(clean.indices, ratio, clean.valid)
    root = sumtree.total(state.tree)
    log_root = jnp.log(root)
    old_log_weights = state.log_weights[draws.indices]
    p = sumtree.get_leaves(state.tree, draws.indices) / root  # one rounding, not exp(lw - log S)
    alpha_h = shifted_loss_estimate(
        p, draws, p_min=config.p_min, step_size=config.step_size, batch_size=config.batch_size
    )
    log_weights, tree, ok = project_and_write(
        config, state, draws, p, old_log_weights - alpha_h, log_root
    )
    new_state = state.replace(
        log_weights=log_weights,
        tree=tree,
        grad_norm_bound=jnp.where(ok, bound, state.grad_norm_bound),
        step=state.step + 1,
        num_dropped_feedback=state.num_dropped_feedback + count_dropped(draws.valid),
    )
    return maybe_rescale(new_state)
