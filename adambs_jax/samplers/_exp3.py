"""AdamBS Algorithm 2 as pure functions: EXP3 with multiple plays over the n examples.

The state keeps the unnormalized weights u_j (in log space and as the leaves of a prefix-sum
tree, ``_sumtree``); the distribution is p_j = u_j / root (lazy normalization).
One ``update`` with draws I = (i_1..i_K) and feedback f (K,) runs the numbered steps of
Algorithm 2 (Liu, Wu, Mozafari, NeurIPS 2020), each a module-level function here:

  1. ``clean_feedback``          drop negative / NaN / inf feedback and out-of-range indices
  2. ``bound_for_update``        ratio_k = min(f_k, L) / L with L fixed, the running max
                                 (``clip_to_bound``) or a running quantile (``quantile_bound``)
  3. ``group_duplicate_draws``   the draws of one arm, found without a sort
                                 (``merge_duplicate_draws``: the sorted equivalent)
  4. ``shifted_loss_estimate``   alpha_p h_j, from l_j = L^2/p_min^2 - f_j^2/p_j^2
  5. ``project_and_write``       exact KL projection onto {q >= p_min}, write the K leaves

and, every ``Exp3Config.renormalize_every`` updates (a static count), ``renormalize`` scales
the root back to 2^100 (O(n)), so that no leaf ever underflows (no data-dependent branch).

``exp3_config`` validates the arguments of ``exp3_sampler`` into a frozen ``Exp3Config``
(n, K, p_min, eta0, the bound's mode, the tree's layout, the static renormalization period
``renormalization_period``); ``init``, ``sample``, ``update`` and ``renormalize`` take it as
their first argument, and the factory ``exp3_sampler`` binds it. ``check_state_finite`` is
the host-side health check a restore runs on a state that came from outside.

Per step: O(K log K + K B log_B n) (B the tree's arity); only the sampled leaves change.
Nothing here is a ``while_loop`` or ``cond``: a skipped
update (``apply=False``) rewrites the K leaves with their old values.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 and Lemma 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from adambs_jax._checks import (
    check_bool,
    check_int,
    check_key,
    check_number,
    check_per_draw,
    check_state_size,
)
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._base import Sampler, SamplerStateBase
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
    "impute_dropped",
    "clip_to_bound",
    "clip_ratio",
    "quantile_bound",
    "order_statistic",
    "bound_for_update",
    "clipped_fraction",
    "BOUND_MODES",
    "DEFAULT_BOUND_QUANTILE",
    "DEFAULT_BOUND_LEARNING_RATE",
    "MergedDraws",
    "merge_duplicate_draws",
    "group_duplicate_draws",
    "shifted_loss_estimate",
    "projected_log_weights",
    "project_and_write",
    "count_dropped",
    "renormalize",
    "update",
    "tree_layout",
    "EXP3_PRESETS",
    "preset_options",
    "bound_metrics",
    "exp3_sampler",
]


# --- the configuration: validated, static -----------------------------------------------

INITIAL_LOG_ROOT = 100 * math.log(2.0)
"""log of the root after ``init`` and after every ``renormalize`` (p is scale-free)."""

LEAF_FLOOR_LOG = -100 * math.log(2.0)
"""No leaf may fall below 2^-100 (far above float32's smallest normal number, 1.2e-38)."""

MIN_RENORMALIZATION_BUDGET = 20.0
"""The smallest budget log(2^100 p_min / 2^-100) (nats of root shrinkage) ``p_min`` may leave."""


BOUND_MODES = ("fixed", "running_max", "quantile")
"""How L is kept: a fixed number, the running max of the valid feedback (the paper), or a
running tau-quantile of it (the default: one outlier cannot set L for good)."""

DEFAULT_BOUND_QUANTILE = 0.9
"""tau of the default "quantile" bound: clipping at the 90th percentile of the feedback
lowers the variance term V(p) (docs/algorithm.md, ``experiments/demo_sampler``)."""

DEFAULT_BOUND_LEARNING_RATE = 0.01
"""eta_L of the "quantile" bound: log L moves by at most eta_L per update."""


EXP3_PRESETS = {
    "paper": {"p_min_times_n": 0.1, "grad_norm_bound": "running_max"},
    "low_variance": {"p_min_times_n": 0.5, "grad_norm_bound": "quantile"},
}
"""Named settings of ``exp3_sampler(..., preset=NAME)``: p_min = ``p_min_times_n`` / n and
the bound L's mode. ``"paper"``: Algorithm 2 as published (p_min = 0.1/n, L = the running
max of the feedback). ``"low_variance"``: p_min = 0.5/n and the clipped bound (L = the
running 0.9-quantile, ``DEFAULT_BOUND_QUANTILE``), the settings docs/algorithm.md found to
lower V(p)/V(uniform) from 1.61 (the paper's settings) to 0.69 (docs/algorithm.md)."""


def preset_options(preset: str | None, num_examples: int, p_min, grad_norm_bound):
    """``(p_min, grad_norm_bound)`` of ``preset`` (``EXP3_PRESETS``) where the caller gave
    None; an explicit value wins. ``preset`` None: both as given.

    Raises:
      ValueError: an unknown preset (the message lists ``EXP3_PRESETS``).
    """
    if preset is None:
        return p_min, grad_norm_bound
    if not isinstance(preset, str) or preset not in EXP3_PRESETS:
        raise ValueError(f"preset must be None or one of {tuple(EXP3_PRESETS)}, got {preset!r}")
    settings = EXP3_PRESETS[preset]
    num_examples = check_int("num_examples", num_examples)
    if p_min is None:
        p_min = settings["p_min_times_n"] / num_examples
    if grad_norm_bound is None:
        grad_norm_bound = settings["grad_norm_bound"]
    return p_min, grad_norm_bound


class Exp3Config(NamedTuple):
    """The validated, static configuration of an ``exp3_sampler`` (see ``exp3_config``).

    Attributes:
      num_examples: n >= 1.
      batch_size: K >= 1.
      p_min: the probability floor, 0 < p_min <= 1/n.
      step_size: eta0 > 0; alpha_p = eta0 p_min^2 / L^2.
      grad_norm_bound: the fixed L > 0 ("fixed" mode), else None (L is kept in the state).
      bound_mode: one of ``BOUND_MODES``.
      bound_quantile: tau in (0, 1) of the "quantile" mode.
      bound_learning_rate: eta_L > 0 of the "quantile" mode (log L moves by <= eta_L).
      stratified: one draw per slice of the mass (True) or i.i.d. draws (False).
      layout: the tree's static ``sumtree.TreeLayout`` (its arity B and level sizes).
      renormalize_every: M >= 1, renormalize at least every M updates; 0: ``update``
        renormalizes itself on every call (the root could shrink too fast for any M).
    """

    num_examples: int
    batch_size: int
    p_min: float
    step_size: float
    grad_norm_bound: float | None
    stratified: bool
    layout: sumtree.TreeLayout
    renormalize_every: int
    bound_mode: str = "running_max"
    bound_quantile: float = DEFAULT_BOUND_QUANTILE
    bound_learning_rate: float = DEFAULT_BOUND_LEARNING_RATE

    @property
    def adaptive_bound(self) -> bool:
        """Whether L is learned from the feedback (no fixed ``grad_norm_bound``)."""
        return self.bound_mode != "fixed"

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


def _checked_p_min(num_examples: int, p_min) -> float:
    p_min = check_number("p_min", 0.1 / num_examples if p_min is None else p_min, positive=True)
    if p_min * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_min * num_examples must be <= 1 (a distribution cannot give every example "
            f"more than 1/n), got p_min={p_min} with num_examples={num_examples}"
        )
    smallest = math.exp(MIN_RENORMALIZATION_BUDGET + LEAF_FLOOR_LOG - INITIAL_LOG_ROOT)
    if p_min < smallest:
        raise ValueError(
            f"p_min={p_min} is too small: a floored leaf p_min x root must stay far above "
            f"float32's smallest number between renormalizations; the smallest allowed p_min "
            f"is {smallest:.3g}"
        )
    return p_min


def renormalization_period(
    num_examples: int, batch_size: int, p_min: float, step_size: float
) -> int:
    """M: how many updates may run between two ``renormalize`` calls (0: every update).

    The root S only shrinks, by the projection's normalizer Z per update, and
    Z >= R + sum_I w_j >= 1 - eta0 (w_j >= p_j (1 - alpha_p h_j), sum_j alpha_p h_j p_j <=
    eta0) and Z >= R >= (n - K) p_min (the unsampled mass), so per update log S falls by at
    most drift = -log max(1 - eta0, (n - K) p_min). A leaf is >= p_min S, and S starts at
    2^100 after each renormalization, so leaves stay >= 2^-100 for budget / drift updates,
    budget = log(2^100 p_min / 2^-100). M takes half of that (and 1% for rounding), so that a
    caller whose count restarts mid-period (a restored checkpoint, a new ``TrainStep``) is
    still safe after M more updates.
    """
    floor = max(1.0 - step_size, (num_examples - batch_size) * p_min)
    if floor <= 0:
        return 0  # the root could fall without bound in one update
    drift = -math.log(min(floor, 1.0))
    budget = INITIAL_LOG_ROOT + math.log(p_min) - LEAF_FLOOR_LOG
    if drift == 0:
        return 2**31 - 1
    return min(int(budget / (2.02 * drift)), 2**31 - 1)


def _checked_bound(grad_norm_bound, bound_quantile, bound_learning_rate) -> dict:
    """The bound's fields of ``Exp3Config``: ``grad_norm_bound`` None means "quantile"."""
    if grad_norm_bound is None:
        grad_norm_bound = "quantile"
    if isinstance(grad_norm_bound, str):
        if grad_norm_bound not in BOUND_MODES[1:]:
            raise ValueError(
                f'grad_norm_bound must be a number > 0 (a fixed L), "running_max" or '
                f'"quantile" (or None: "quantile"), got {grad_norm_bound!r}'
            )
        mode, fixed = grad_norm_bound, None
    else:
        mode, fixed = "fixed", check_number("grad_norm_bound", grad_norm_bound, positive=True)
    quantile = check_number("bound_quantile", bound_quantile)
    if not 0 < quantile < 1:
        raise ValueError(f"bound_quantile must be in (0, 1), got {bound_quantile!r}")
    return dict(
        grad_norm_bound=fixed,
        bound_mode=mode,
        bound_quantile=quantile,
        bound_learning_rate=check_number("bound_learning_rate", bound_learning_rate, positive=True),
    )


def exp3_config(
    num_examples,
    batch_size,
    *,
    p_min,
    step_size,
    num_steps,
    grad_norm_bound,
    stratified,
    arity=None,
    bound_quantile=DEFAULT_BOUND_QUANTILE,
    bound_learning_rate=DEFAULT_BOUND_LEARNING_RATE,
    preset=None,
) -> Exp3Config:
    """Validates the arguments of ``exp3_sampler`` into an ``Exp3Config`` (same meaning; the
    factory's defaults are the only ones), filling in p_min = 0.1 / n, eta0, the tree's
    arity (``sumtree.default_arity()``) and the bound mode ("quantile") where None; a
    ``preset`` (``EXP3_PRESETS``) first fills ``p_min`` and ``grad_norm_bound`` where None.

    Raises:
      ValueError: an argument out of range, named in the message (a tree too large for
        int32 indices names ``num_examples`` and the limit; a ``p_min`` too small for the
        float32 leaves names the smallest allowed; ``grad_norm_bound``, ``bound_quantile``,
        ``bound_learning_rate`` out of range).
      TypeError: ``stratified`` is not a bool.
    """
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    p_min, grad_norm_bound = preset_options(preset, num_examples, p_min, grad_norm_bound)
    p_min = _checked_p_min(num_examples, p_min)
    step_size = _checked_step_size(num_examples, step_size, num_steps)
    bound = _checked_bound(grad_norm_bound, bound_quantile, bound_learning_rate)
    arity = sumtree.default_arity() if arity is None else arity
    return Exp3Config(
        num_examples=num_examples,
        batch_size=batch_size,
        p_min=p_min,
        step_size=step_size,
        stratified=check_bool("stratified", stratified),
        layout=tree_layout(num_examples, arity),
        renormalize_every=renormalization_period(num_examples, batch_size, p_min, step_size),
        **bound,
    )


@functools.lru_cache(maxsize=64)
def tree_layout(num_examples: int, arity: int) -> sumtree.TreeLayout:
    """``sumtree.layout_for`` (cached: the static layout of a state's tree)."""
    return sumtree.layout_for(num_examples, arity)


# --- step 2: the bound L that the feedback is clipped to ----------------------------------


def clip_to_bound(feedback, stored_bound, adaptive: bool):
    """Step 2: ``(L, ratio)`` with L = max(stored L, max f) if ``adaptive`` else the stored
    L, and ratio_k = min(f_k, L) / L in [0, 1] (0 while L = 0: every loss is the maximum)."""
    if adaptive:
        bound = jnp.maximum(stored_bound, jnp.max(feedback))
    else:
        bound = stored_bound
    return bound, clip_ratio(feedback, bound)


def clip_ratio(feedback, bound):
    """ratio_k = min(f_k, L) / L in [0, 1]; 0 while L = 0 (every loss is the maximum)."""
    return jnp.where(bound > 0, jnp.minimum(feedback, bound) / jnp.where(bound > 0, bound, 1), 0.0)


# log L stays where exp(log L) and L^2 / L are normal float32 numbers, whatever the feedback
_LOG_BOUND_RANGE = (-80.0, 80.0)


def quantile_bound(feedback, valid, stored_bound, *, quantile: float, learning_rate: float):
    """Step 2, "quantile" mode: L_t tracks the tau-quantile of the valid feedback by
    stochastic approximation in log space (Robbins-Monro on the quantile's defining equation
    P(f > L) = 1 - tau):

        log L_t = log L_{t-1} + eta_L (#{valid k: f_k > L_{t-1}} / #valid - (1 - tau)),

    so one update moves log L by at most eta_L (one outlier by eta_L / #valid), whatever
    its size. While L = 0 (no valid feedback yet) L is the batch's tau-quantile (nearest
    rank) of the valid feedback instead; without valid feedback L is unchanged. log L is
    kept in [-80, 80]."""
    num_valid = jnp.sum(valid)
    above = jnp.sum(valid & (feedback > stored_bound)) / jnp.maximum(num_valid, 1)
    log_bound = jnp.log(stored_bound) + learning_rate * (above - (1.0 - quantile))
    moved = jnp.exp(jnp.clip(log_bound, *_LOG_BOUND_RANGE))
    rank = jnp.clip(jnp.ceil(quantile * num_valid).astype(jnp.int32) - 1, 0, feedback.shape[0] - 1)
    first = jnp.clip(order_statistic(feedback, valid, rank), 0.0, math.exp(_LOG_BOUND_RANGE[1]))
    bound = jnp.where(stored_bound > 0, moved, first)
    return jnp.where(num_valid > 0, bound, stored_bound).astype(jnp.float32)


def order_statistic(values, valid, rank):
    """The ``rank``-th smallest (0-based) of the ``valid`` entries of ``values`` (K,): what
    ``jnp.sort(where(valid, values, inf))[rank]`` gives (inf where ``rank`` >= #valid).
    For K <= ``sumtree.SORT_FREE_MAX_BATCH`` without a sort: entry i's rank among the valid
    ones is #{valid j: v_j < v_i, or v_j = v_i and j < i} (K x K compares), and exactly
    one valid entry has each rank below #valid."""
    k = values.shape[0]
    if k > sumtree.SORT_FREE_MAX_BATCH:
        return jnp.sort(jnp.where(valid, values, jnp.inf))[rank]
    positions = jnp.arange(k)
    before = (values[None, :] < values[:, None]) | (
        (values[None, :] == values[:, None]) & (positions[None, :] < positions[:, None])
    )
    ranks = jnp.sum(before & valid[None, :], axis=1)
    hit = valid & (ranks == rank)
    return jnp.where(jnp.any(hit), jnp.max(jnp.where(hit, values, -jnp.inf)), jnp.inf)


def clipped_fraction(feedback, grad_norm_bound) -> jax.Array:
    """float32 scalar: the fraction of the valid (finite, >= 0) entries of ``feedback`` (K,)
    above ``grad_norm_bound`` (the L of the update that used them), i.e. clipped; 0 without
    valid feedback. A metric for the bound: ~1 - tau in "quantile" mode, 0 for the running
    max."""
    feedback = jnp.asarray(feedback, jnp.float32)
    valid = jnp.isfinite(feedback) & (feedback >= 0)
    clipped = jnp.sum(valid & (feedback > grad_norm_bound))
    return (clipped / jnp.maximum(jnp.sum(valid), 1)).astype(jnp.float32)


# --- the state and the steps of Algorithm 2 -----------------------------------------------


@struct.dataclass
class Exp3SamplerState(SamplerStateBase):
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
        structure (``arity``: the tree's number of children per node, ``_sumtree``;
        ``bound_mode``: one of ``BOUND_MODES``, what a restore compares L's mode with).

    Restored from a checkpoint (``restored``), the state keeps what was learned (the
    log-weights, the counters, and the adaptive L when the new sampler keeps L the same
    way) and takes the hyperparameters from the sampler configured now: a fixed L overrides
    the stored one, a changed bound mode restarts L (0, learned again from the next
    feedback), and a tree of another ``arity`` is rebuilt from the log-weights. Another
    ``num_examples`` or ``p_min`` is refused by the checkpoint's comparison (every stored
    weight obeys the floor of the sampler that wrote it). A non-finite state is refused.
    """

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ("arity", "bound_mode")
    rebuilt_fields: ClassVar[tuple[str, ...]] = ("tree",)

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

    def healthy(self) -> jax.Array:
        root = sumtree.total(self.tree)
        return jnp.isfinite(root) & (root > 0) & jnp.isfinite(self.grad_norm_bound)

    def probabilities(self) -> jax.Array:
        return distribution(self)

    def restored(self, like: Exp3SamplerState, saved_config: dict, where: str):
        saved_arity = saved_config.get("arity", like.arity)
        check_state_finite(self.replace(arity=saved_arity), where=where)
        bound = _restored_bound(self, like, saved_config.get("bound_mode", "running_max"))
        new = self.replace(grad_norm_bound=bound)
        layout = tree_layout(like.num_examples, like.arity)
        if new.tree.shape != (layout.size,) or saved_arity != like.arity:
            tree = sumtree.rebuilt_for_restore(
                jnp.exp(new.log_weights), like.num_examples, like.arity, like.tree
            )
            new = new.replace(tree=tree)
        return new


def _restored_bound(restored: Exp3SamplerState, like: Exp3SamplerState, saved_mode: str):
    """L after a restore: the new fixed L, the stored L (same adaptive mode) or 0 (restart)."""
    if like.bound_mode == "fixed":
        if isinstance(like.grad_norm_bound, jax.ShapeDtypeStruct):
            return restored.grad_norm_bound  # abstract `like`: the first update sets it
        return jnp.asarray(like.grad_norm_bound, jnp.float32)
    if like.bound_mode == saved_mode:
        return restored.grad_norm_bound
    return jnp.zeros_like(restored.grad_norm_bound)


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
    in_range: jax.Array  # (K,) bool, False where the index is outside [0, n)


def clean_feedback(indices, feedback, num_examples: int) -> CleanFeedback:
    """Step 1: a draw's feedback is dropped when its index is outside [0, n) or the value is
    negative, NaN or infinite; dropped feedback is replaced by 0 (and, for a draw of an
    example in range, by the batch's typical value in the update: ``impute_dropped``). The
    range is
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
    return CleanFeedback(indices, feedback, valid, in_range)


def impute_dropped(values, clean: CleanFeedback):
    """``(values, takes_part)``: a draw of an example in range whose feedback was dropped
    takes the mean of the batch's valid ``values`` (K,), and takes part in the update.

    Why: the update moves only the drawn arms, by losses >= 0 (the shift L^2/p_min^2), and the
    projection hands the mass they lose to everyone else. An arm that took no part when it was
    drawn would look like an arm with loss 0, the best of all, and an example whose feedback
    is always invalid (NaN, inf, negative) would take over the distribution (measured: 10 of
    1,000 such examples held 90% of the mass after 20,000 updates). With the batch's mean it
    moves like a typical draw: it neither gains nor loses mass systematically. A batch with
    no valid feedback updates nothing (``takes_part`` all False); out-of-range indices never
    take part. The dropped entries are still counted in ``num_dropped_feedback``.
    """
    num_valid = jnp.sum(clean.valid)
    mean = jnp.sum(jnp.where(clean.valid, values, 0.0)) / jnp.maximum(num_valid, 1)
    values = jnp.where(clean.valid, values, mean)
    return values, clean.in_range & (num_valid > 0)


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
    """The draws grouped by arm (step 3): sorted by index (``merge_duplicate_draws``) or in
    draw order (``group_duplicate_draws``); ``run`` names the arm."""

    indices: jax.Array  # (K,) int32
    ratio: jax.Array  # (K,) float32, in the same order
    valid: jax.Array  # (K,) bool, in the same order: the draw takes part in the update
    is_first: jax.Array  # (K,) bool, True at the first draw of each distinct arm
    run: jax.Array  # (K,) int in [0, K), equal exactly for the draws of one arm


def merge_duplicate_draws(indices, ratio, valid) -> MergedDraws:
    """Step 3: sorts the draws (stably) so that copies of one arm are adjacent."""
    order = jnp.argsort(indices, stable=True)
    idx = indices[order]
    ratio, valid = ratio[order], valid[order]
    is_first = jnp.concatenate([jnp.array([True]), idx[1:] != idx[:-1]])
    run = jnp.cumsum(is_first) - 1
    return MergedDraws(idx, ratio, valid, is_first, run)


def group_duplicate_draws(indices, ratio, valid) -> MergedDraws:
    """Step 3 without a sort: the draws stay in draw order, ``run`` is the position of the
    arm's first draw (``sumtree.first_copies``: K x K compares for K <= 256, one kernel on
    a GPU, instead of a sort) and ``is_first`` marks that draw. What ``update`` uses; every
    later step treats the copies of an arm alike, so the result is the same as with
    ``merge_duplicate_draws`` up to the order of float additions within an arm."""
    run = sumtree.first_copies(indices)
    is_first = run == jnp.arange(indices.shape[0], dtype=run.dtype)
    return MergedDraws(indices, ratio, valid, is_first, run)


def shifted_loss_estimate(
    p, draws: MergedDraws, *, p_min: float, step_size: float, batch_size: int
):
    """Step 4: alpha_p h_j (K,), the same for every copy of arm j, where

        alpha_p l_k / (K p) = eta0 (p_min^2/L^2)(L^2/p_min^2 - f^2/p^2) / (K p)
                            = eta0 (1 - (p_min f / (L p))^2) / (K p)

    summed over the draws of arm j that take part (h_j = l_j c_j / (K p_j) for agreeing
    feedback), in units that never overflow float32 (L^2 / p_min^2 can be ~1e14 L^2 on its
    own)."""
    shortfall = jnp.clip(1.0 - jnp.square(p_min * draws.ratio / p), 0.0, 1.0)
    per_draw = jnp.where(draws.valid, step_size * shortfall / (batch_size * p), 0.0)
    return jax.ops.segment_sum(per_draw, draws.run, num_segments=batch_size)[draws.run]


def projected_log_weights(
    config: Exp3Config,
    draws: MergedDraws,
    p,
    log_scaled_w,
    log_root,
    apply: bool | jax.Array = True,
) -> tuple[jax.Array, jax.Array]:
    """Step 5's projection: ``(new_log_weights (K,), written)`` of the K sampled arms.

    ``log_scaled_w`` = log(S w_j) with S the root; u'_j = p'_j S Z with p'_j =
    max(p_min, w_j / Z) (``project_onto_floored_simplex``), so unsampled leaves keep u_j and
    the new root is S Z. ``written`` is False when the result is not finite or ``apply`` is
    False: then the caller writes the old values back. Only K values and the root enter, so
    a sampler whose tree is split over devices (``_sharded``) runs the same step."""
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
    return new_log_weights, written


def project_and_write(
    config: Exp3Config,
    state: Exp3SamplerState,
    draws: MergedDraws,
    p,
    log_scaled_w,
    log_root,
    apply: bool | jax.Array = True,
):
    """Step 5: the exact KL projection (``projected_log_weights``) and the write of the K
    sampled leaves: ``(log_weights (n,), tree, written)``. When ``written`` is False the K
    old leaves are written back instead: O(K B log_B n), not an O(n) select, and the tree
    stays bitwise the same (every parent is recomputed from the same children in the same
    order).
    """
    new_log_weights, written = projected_log_weights(
        config, draws, p, log_scaled_w, log_root, apply
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
    ratio, takes_part = impute_dropped(ratio, clean)
    draws = group_duplicate_draws(clean.indices, ratio, takes_part)
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
        + jnp.where(apply, count_dropped(clean.valid), 0),
    )
    if config.renormalize_every == 0:  # static: the root may shrink without bound
        renormalized = renormalize(config, new_state)
        new_state = jax.tree.map(lambda a, b: jnp.where(apply, a, b), renormalized, state)
    return new_state


# --- host-side health check of a state (used at restore) ----------------------------------


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)  # replicated over hosts: the local copy
    return np.asarray(value)


def _refuse(where: str, field: str, problem: str) -> None:
    raise ValueError(
        f"{where}: the exp3 sampler state's {field} {problem}; it cannot be sampled from "
        f"(a damaged checkpoint or arrays set by hand?). Restore an earlier checkpoint or "
        f"start the sampler afresh with sampler.init()"
    )


def check_state_finite(state: Any, where: str = "state") -> None:
    """Raises ValueError (naming ``where`` and the field) unless the exp3 state ``state`` has
    finite ``log_weights``, a finite ``tree`` with no negative node, positive leaves for the
    n examples and a positive finite root, and a finite ``grad_norm_bound`` >= 0.

    Host side (copies the state to the host, O(n)): call it outside ``jit``.
    """
    log_weights = _host(state.log_weights)
    if not np.all(np.isfinite(log_weights)):
        _refuse(where, "log_weights", f"has {np.sum(~np.isfinite(log_weights))} non-finite entries")
    tree = _host(state.tree)
    if not np.all(np.isfinite(tree)) or np.any(tree < 0):
        bad = np.sum(~np.isfinite(tree) | (tree < 0))
        _refuse(where, "tree", f"has {bad} non-finite or negative nodes")
    layout = sumtree.layout_for(state.num_examples, state.arity)
    root = float(tree[0]) if tree.size else 0.0
    if not root > 0:
        _refuse(where, "tree root", f"is {root} (must be > 0)")
    leaves = np.asarray(sumtree.leaf_values(tree, layout))
    if not np.all(leaves > 0):
        _refuse(where, "tree", f"has {np.sum(~(leaves > 0))} leaves <= 0 (every p_j >= p_min > 0)")
    bound = float(_host(state.grad_norm_bound))
    if not np.isfinite(bound) or bound < 0:
        _refuse(where, "grad_norm_bound", f"is {bound} (must be finite and >= 0)")


def bound_metrics(state: Exp3SamplerState, feedback) -> dict:
    """The sampler's scalars in the train step's metrics: ``grad_norm_bound`` (L after the
    update) and ``clipped_fraction`` (the share of this step's valid feedback above L)."""
    bound = jnp.asarray(state.grad_norm_bound, jnp.float32)
    return {"grad_norm_bound": bound, "clipped_fraction": clipped_fraction(feedback, bound)}


# --- the factory --------------------------------------------------------------------------


def exp3_sampler(
    num_examples: int,
    batch_size: int,
    *,
    p_min: float | None = None,
    step_size: float | None = None,
    num_steps: int | None = None,
    grad_norm_bound: float | str | None = None,
    stratified: bool = False,
    arity: int | None = None,
    bound_quantile: float = DEFAULT_BOUND_QUANTILE,
    bound_learning_rate: float = DEFAULT_BOUND_LEARNING_RATE,
    preset: str | None = None,
) -> Sampler:
    """The AdamBS bandit sampler (Algorithm 2 of Liu, Wu, Mozafari, NeurIPS 2020).

    Each ``update(state, I, f)`` with draws I = (i_1..i_K) and feedback f_k >= 0 (the
    per-example gradient norm ||g_{i_k}||, or an upper bound of it) does, for every distinct
    drawn arm j with count c_j:

      loss      l_j = L^2 / p_min^2 - min(f_j, L)^2 / p_j^2                (>= 0)
      estimate  h_j = l_j c_j / (K p_j)       (h_j = 0 for arms not drawn)
      step      w_j = p_j exp(-alpha_p h_j),  alpha_p = eta0 p_min^2 / L^2
      project   p'  = argmin_{q >= p_min, sum q = 1} KL(q || w)    (exact, O(K log K))

    If one arm is drawn several times with different feedback, h_j sums l over its draws,
    which is l_j c_j / (K p_j) when the feedback agrees. In expectation over the draws the
    step is mirror descent on sum_j f_j^2 / p_j, whose minimizer is p_j proportional to f_j
    (clipped at p_min): the variance-optimal sampling distribution (paper §4.2). The steps
    are the functions of this module, bound to a validated ``Exp3Config``.

    Bad feedback: an entry that is negative, NaN or infinite, or whose index is outside
    [0, n) (checked in the indices' own dtype), is dropped (treated as if that draw had not
    happened: it adds nothing to h) and counted in ``state.num_dropped_feedback``; float
    indices are a TypeError. If an update would still produce a non-finite weight,
    the whole update is skipped and the state returned unchanged (except ``step``).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1 (K > n is fine: draws are with replacement).
      p_min: the probability floor; default 0.1 / n. Must satisfy 0 < p_min <= 1/n.
      step_size: eta0 (dimensionless); default sqrt(2 log(n) / (n T)) (Lemma 1 with
        R^2 = log n), which needs ``num_steps``.
      num_steps: T, the planned number of training steps; only used for the default eta0.
      grad_norm_bound: L, the bound feedback is clipped to (so l_j >= 0), kept in
        ``state.grad_norm_bound``: a number > 0 (fixed); ``"running_max"``, the max of all
        valid feedback seen (the paper's choice: one outlier, e.g. 1e30, then sets L for
        good and every ratio f/L is ~0, so the sampler stops learning); or ``"quantile"``
        (the default, also for None): a running ``bound_quantile``-quantile of the valid
        feedback, learned by stochastic approximation in log space (``quantile_bound``;
        one update moves log L by at most ``bound_learning_rate``), started at the first
        batch's quantile. ``clipped_fraction(feedback, L)`` is the clipped share.
      bound_quantile: tau in (0, 1) of the "quantile" bound; default 0.9 (clipping at the
        90th percentile lowers V(p), docs/algorithm.md).
      bound_learning_rate: eta_L > 0 of the "quantile" bound, the largest move of log L per
        update; default 0.01 (L follows a change of the feedback's scale by a factor e in
        about 1 / (eta_L (1 - tau)) = 1000 updates at worst).
      stratified: draw one index in each of K equal slices of the probability mass
        (lower variance, still marginally p); default i.i.d. with replacement.
      arity: B, children per node of the prefix-sum tree (2, 4, ..., 128); default
        ``sumtree.default_arity()``: 32 on GPU/TPU, 16 on CPU (docs/performance.md). The
        largest n is about 2^31 (B - 1) / B (int32 node indices); larger is refused.
      preset: named settings of ``p_min`` and ``grad_norm_bound`` (``ab.samplers.EXP3_PRESETS``),
        used where those arguments are None (an explicit value overrides the preset):
        ``"paper"`` (p_min = 0.1/n, ``"running_max"``: Algorithm 2 as published) or
        ``"low_variance"`` (p_min = 0.5/n, ``"quantile"``: the clipped bound; the settings
        docs/algorithm.md found to reduce the variance term V(p)). None (default): the
        defaults above.

    Renormalization: the tree's root shrinks with every update, so the state must be
    ``sampler.renormalize``-d (O(n)) at least every ``sampler.renormalize_every`` updates (a
    static count from the configuration, usually millions; ``renormalization_period``).
    ``make_train_step``'s jitted step does it; call it yourself when you drive
    ``sampler.update`` (or a ``jit=False`` step) in your own loop. ``update(..., apply=False)``
    returns the state bitwise unchanged (the train step's non-finite guard).

    Returns:
      A ``Sampler`` whose ``probabilities(state)`` is p = leaves / root, with
      ``renormalize_every`` (None when ``update`` renormalizes itself, for a configuration
      whose root could shrink without bound in one update) and ``renormalize``.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2 and Lemma 1; Auer et al., "The Nonstochastic Multiarmed Bandit Problem",
      SIAM J. Comput. 2002 (EXP3); Namkoong et al., "Adaptive Sampling Probabilities for
      Non-Smooth Optimization", ICML 2017 (the floored projection on a tree).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.exp3_sampler(100, 8, num_steps=1000)
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> indices.shape, indices.dtype, probs.dtype
      ((8,), dtype('int32'), dtype('float32'))
      >>> state = sampler.update(state, indices, jnp.ones(8))
      >>> p = sampler.probabilities(state)
      >>> p.shape, round(float(p.sum()), 5), int(state.step)
      ((100,), 1.0, 1)
    """
    config = exp3_config(
        num_examples,
        batch_size,
        p_min=p_min,
        step_size=step_size,
        num_steps=num_steps,
        grad_norm_bound=grad_norm_bound,
        stratified=stratified,
        arity=arity,
        bound_quantile=bound_quantile,
        bound_learning_rate=bound_learning_rate,
        preset=preset,
    )
    init_fn = functools.partial(init, config)
    sample_fn = functools.partial(sample, config)
    update_fn = functools.partial(update, config)
    return Sampler(
        init_fn,
        sample_fn,
        update_fn,
        config.num_examples,
        config.batch_size,
        distribution,
        renormalize_every=config.renormalize_every or None,
        renormalize=functools.partial(renormalize, config),
        metrics=bound_metrics,
    )
