"""Samplers: a distribution p over the n training examples, drawn from and learned online.

A sampler is a NamedTuple of pure functions, in the style of ``optax.GradientTransformation``:

    sampler = exp3_sampler(num_examples, batch_size, num_steps=T)
    state = sampler.init()
    indices, probs = sampler.sample(state, key)           # (K,) int32, (K,) p[indices]
    state = sampler.update(state, indices, feedback)       # feedback (K,) >= 0

All three work under ``jax.jit`` and compile once for a fixed n and K.

``exp3_sampler`` is AdamBS Algorithm 2 (Liu, Wu, Mozafari, NeurIPS 2020): EXP3 with multiple
plays on the n arms, with loss l_j = L^2/p_min^2 - f_j^2/p_j^2, an importance-weighted loss
estimate, a multiplicative step and an exact KL projection onto {q >= p_min, sum q = 1}.
Per step it costs O(K log K + K log n): only the sampled leaves of a prefix-sum tree change,
and normalization is lazy (p = leaf / root).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax import sumtree
from adambs_jax.projection import project_onto_floored_simplex

__all__ = [
    "Sampler",
    "Exp3SamplerState",
    "UniformSamplerState",
    "exp3_sampler",
    "uniform_sampler",
    "probabilities",
    "importance_weights",
    "default_step_size",
    "RESCALE_LOG_THRESHOLD",
]

# When log(root) falls below -RESCALE_LOG_THRESHOLD the log-weights are shifted by -log(root)
# and the tree rebuilt (O(n)). The root only shrinks (Z <= 1), by a factor Z per step close
# to 1, so this happens rarely; between rescales every leaf stays >= p_min e^-40 (n <= 2^31:
# > 1e-27), far above float32's smallest normal number (1.2e-38).
RESCALE_LOG_THRESHOLD = 40.0


class Sampler(NamedTuple):
    """A mini-batch sampler: pure ``init``, ``sample`` and ``update`` functions.

    Attributes:
      init: ``() -> state``.
      sample: ``(state, key) -> (indices (K,) int32, probs (K,) float32)``, probs = p[indices].
      update: ``(state, indices (K,), feedback (K,)) -> state``.
      num_examples: n.
      batch_size: K.
    """

    init: Callable[[], Any]
    sample: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    update: Callable[[Any, jax.Array, jax.Array], Any]
    num_examples: int
    batch_size: int


@struct.dataclass
class UniformSamplerState:
    """State of ``uniform_sampler``: nothing is learned; p_j = 1/n.

    ``num_examples`` is static (part of the pytree structure), so a state of another
    dataset size does not fit a compiled step or a checkpoint of this one.
    """

    step: jax.Array  # int32 scalar, number of updates seen
    num_examples: int = struct.field(pytree_node=False)


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


def probabilities(state) -> jax.Array:
    """The full distribution p (n,) of a sampler state. O(n): for tests, metrics, plots."""
    if isinstance(state, UniformSamplerState):
        n = state.num_examples
        return jnp.full((n,), 1.0 / n, jnp.float32)
    if isinstance(state, Exp3SamplerState):
        leaves = sumtree.leaf_values(state.tree, state.num_examples)
        return leaves / sumtree.total(state.tree)
    if hasattr(state, "distribution"):  # samplers that recompute all of p each step (p^GN)
        return state.distribution
    if hasattr(state, "sampler_state"):  # states of composite samplers
        return probabilities(state.sampler_state)
    raise TypeError(f"state: not a sampler state: {type(state).__name__}")


def importance_weights(probs: jax.Array, num_examples: int) -> jax.Array:
    """w = 1 / (n p): the weights that make (1/K) sum_k w_k g_{i_k} unbiased for the mean
    gradient (AdamBS eq. 1). With p uniform, w = 1."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if jnp.ndim(probs) != 1:
        raise ValueError(f"probs must have shape (K,), got {jnp.shape(probs)}")
    return 1.0 / (num_examples * probs)


def default_step_size(num_examples: int, num_steps: int) -> float:
    """eta0 = sqrt(2 log(n) / (n T)): Lemma 1's alpha_p = sqrt(2 R^2 p_min^4 / (n T L^4))
    with R^2 = log n, written as alpha_p = eta0 p_min^2 / L^2."""
    return math.sqrt(2.0 * math.log(max(num_examples, 2)) / (num_examples * num_steps))


def _check_sizes(num_examples, batch_size):
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_batch(name: str, value: jax.Array, batch_size: int):
    if jnp.ndim(value) != 1 or jnp.shape(value)[0] != batch_size:
        raise ValueError(
            f"{name} must have shape ({batch_size},) (one entry per draw), got {jnp.shape(value)}"
        )


def uniform_sampler(num_examples: int, batch_size: int) -> Sampler:
    """Draws K indices i.i.d. uniformly from {0..n-1}; probs = 1/n, so the importance
    weights are 1 and training is plain mini-batch training. ``update`` learns nothing."""
    _check_sizes(num_examples, batch_size)

    def init():
        return UniformSamplerState(step=jnp.zeros((), jnp.int32), num_examples=num_examples)

    def sample(state, key):
        del state
        indices = jax.random.randint(key, (batch_size,), 0, num_examples, dtype=jnp.int32)
        return indices, jnp.full((batch_size,), 1.0 / num_examples, jnp.float32)

    def update(state, indices, feedback):
        _check_batch("indices", indices, batch_size)
        _check_batch("feedback", feedback, batch_size)
        return state.replace(step=state.step + 1)

    return Sampler(init, sample, update, num_examples, batch_size)


def exp3_sampler(
    num_examples: int,
    batch_size: int,
    *,
    p_min: Optional[float] = None,
    step_size: Optional[float] = None,
    num_steps: Optional[int] = None,
    grad_norm_bound: Optional[float] = None,
    stratified: bool = False,
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
    (clipped at p_min): the variance-optimal sampling distribution (paper §4.2).

    Bad feedback: an entry that is negative, NaN or infinite is dropped (treated as if that
    draw had not happened: it adds nothing to h) and counted in
    ``state.num_dropped_feedback``. If an update would still produce a non-finite weight,
    the whole update is skipped and the state returned unchanged (except ``step``).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1 (K > n is fine: draws are with replacement).
      p_min: the probability floor; default 0.1 / n. Must satisfy 0 < p_min <= 1/n.
      step_size: eta0 (dimensionless); default sqrt(2 log(n) / (n T)) (Lemma 1 with
        R^2 = log n), which needs ``num_steps``.
      num_steps: T, the planned number of training steps; only used for the default eta0.
      grad_norm_bound: L, a fixed bound on the feedback (feedback is clipped to it);
        default: the running max of all feedback seen, kept in the state (so l_j >= 0).
      stratified: draw one index in each of K equal slices of the probability mass
        (lower variance, still marginally p); default i.i.d. with replacement.

    Returns:
      A ``Sampler``.
    """
    _check_sizes(num_examples, batch_size)
    if p_min is None:
        p_min = 0.1 / num_examples
    p_min = float(p_min)
    if not (p_min > 0) or math.isinf(p_min):
        raise ValueError(f"p_min must be > 0, got {p_min}")
    if p_min * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_min * num_examples must be <= 1 (a distribution cannot give every example "
            f"more than 1/n), got p_min={p_min} with num_examples={num_examples}"
        )
    if step_size is None:
        if num_steps is None:
            raise ValueError(
                "exp3_sampler needs step_size (eta0) or num_steps (T), from which the "
                "default eta0 = sqrt(2 log(n) / (n T)) of the paper's Lemma 1 is computed"
            )
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        step_size = default_step_size(num_examples, num_steps)
    step_size = float(step_size)
    if not (step_size > 0) or math.isinf(step_size):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
    if grad_norm_bound is not None:
        grad_norm_bound = float(grad_norm_bound)
        if not (grad_norm_bound > 0) or math.isinf(grad_norm_bound):
            raise ValueError(f"grad_norm_bound must be a finite number > 0, got {grad_norm_bound}")
    adaptive_bound = grad_norm_bound is None
    capacity = sumtree.capacity_for(num_examples)
    log_p_min = math.log(p_min)

    def init():
        log_weights = jnp.full((num_examples,), -math.log(num_examples), jnp.float32)
        return Exp3SamplerState(
            log_weights=log_weights,
            tree=sumtree.build(jnp.exp(log_weights)),
            grad_norm_bound=jnp.asarray(0.0 if adaptive_bound else grad_norm_bound, jnp.float32),
            step=jnp.zeros((), jnp.int32),
            num_dropped_feedback=jnp.zeros((), jnp.int32),
            num_rescales=jnp.zeros((), jnp.int32),
            num_examples=num_examples,
            p_min=p_min,
        )

    def check_state(state):
        if not isinstance(state, Exp3SamplerState):
            raise TypeError(f"state must be an Exp3SamplerState (sampler.init()), got {type(state).__name__}")
        if state.tree.shape != (2 * capacity,) or state.num_examples != num_examples:
            raise ValueError(
                f"state: built for num_examples={state.num_examples}, but this sampler has "
                f"num_examples={num_examples}"
            )

    def sample(state, key):
        check_state(state)
        root = sumtree.total(state.tree)
        uniforms = jax.random.uniform(key, (batch_size,), jnp.float32)
        targets = sumtree.uniforms_to_targets(uniforms, root, stratified=stratified)
        indices = sumtree.draw(state.tree, targets)
        probs = sumtree.get_leaves(state.tree, indices) / root
        return indices, probs

    def update(state, indices, feedback):
        _check_batch("indices", indices, batch_size)
        _check_batch("feedback", feedback, batch_size)
        check_state(state)
        indices = jnp.asarray(indices).astype(jnp.int32)
        feedback = jnp.asarray(feedback).astype(jnp.float32)
        in_range = (indices >= 0) & (indices < num_examples)
        valid = in_range & jnp.isfinite(feedback) & (feedback >= 0)
        indices = jnp.clip(indices, 0, num_examples - 1)
        feedback = jnp.where(valid, feedback, 0.0)

        if adaptive_bound:
            bound = jnp.maximum(state.grad_norm_bound, jnp.max(feedback))
        else:
            bound = state.grad_norm_bound
        # f / L in [0, 1]; with L = 0 (all feedback so far is 0) every loss is the maximum
        ratio = jnp.where(bound > 0, jnp.minimum(feedback, bound) / jnp.where(bound > 0, bound, 1), 0.0)

        # aggregate duplicate draws: sort, then sum within runs of equal indices
        order = jnp.argsort(indices, stable=True)
        idx = indices[order]
        ratio, valid = ratio[order], valid[order]
        is_first = jnp.concatenate([jnp.array([True]), idx[1:] != idx[:-1]])
        run = jnp.cumsum(is_first) - 1

        root = sumtree.total(state.tree)
        log_root = jnp.log(root)
        old_log_weights = state.log_weights[idx]
        p = sumtree.get_leaves(state.tree, idx) / root  # one rounding; exp(lw - log S) has more
        # alpha_p * l_k / (K p) = eta0 (p_min^2/L^2)(L^2/p_min^2 - f^2/p^2) / (K p)
        #                       = eta0 (1 - (p_min f / (L p))^2) / (K p), in units that
        # never overflow float32 (L^2 / p_min^2 can be ~1e14 L^2 on its own).
        shortfall = jnp.clip(1.0 - jnp.square(p_min * ratio / p), 0.0, 1.0)
        per_draw = jnp.where(valid, step_size * shortfall / (batch_size * p), 0.0)
        alpha_h = jax.ops.segment_sum(per_draw, run, num_segments=batch_size)[run]
        # log of S w_j = S p_j exp(-alpha_p h_j): the multiplicative step is exact in log
        # space, and identical for all copies of a duplicated arm
        log_scaled_w = old_log_weights - alpha_h

        # R = mass of the unsampled arms, each >= p_min; exactly 0 when every arm was drawn
        # (else float32 rounding of 1 - sum, ~1e-7, could dwarf tiny sampled weights)
        num_unsampled = num_examples - jnp.sum(is_first)
        rest_mass = jnp.where(
            num_unsampled > 0,
            jnp.maximum(1.0 - jnp.sum(jnp.where(is_first, p, 0.0)), num_unsampled * p_min),
            0.0,
        )
        log_z = project_onto_floored_simplex(
            log_scaled_w - log_root, is_first, rest_mass, p_min
        ).log_normalizer
        # u'_j = p'_j * (S Z) with p'_j = max(p_min, w_j / Z): unsampled leaves keep u_j and
        # the new root is S Z, so only the sampled leaves are written
        new_log_weights = jnp.maximum(log_scaled_w, log_root + log_z + log_p_min)

        # a non-finite result skips the update; selecting among the K touched leaves (not
        # the n-sized arrays) keeps this O(K log n): rewriting old leaves recomputes the
        # same parent sums exactly
        ok = jnp.all(jnp.isfinite(new_log_weights)) & jnp.isfinite(log_z)
        new_log_weights = jnp.where(ok, new_log_weights, state.log_weights[idx])
        log_weights = state.log_weights.at[idx].set(new_log_weights)
        tree = sumtree.set_leaves(state.tree, idx, jnp.exp(new_log_weights))
        new_state = state.replace(
            log_weights=log_weights,
            tree=tree,
            grad_norm_bound=jnp.where(ok, bound, state.grad_norm_bound),
            step=state.step + 1,
            num_dropped_feedback=state.num_dropped_feedback
            + jnp.sum(~valid).astype(jnp.int32),
        )
        return _maybe_rescale(new_state)

    return Sampler(init, sample, update, num_examples, batch_size)


def _maybe_rescale(state: Exp3SamplerState) -> Exp3SamplerState:
    """Shifts log-weights by -log(root) and rebuilds the tree, O(n), but only when the root
    has drifted below e^-RESCALE_LOG_THRESHOLD (rarely): amortized O(1) per step."""

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
