"""The exact KL projection of AdamBS Algorithm 2, line 5, restricted to the sampled arms.

Problem: given the current distribution p (sum p = 1, p >= p_min) and the multiplicative
weights w_j = p_j exp(-alpha_p h_j) with h_j = 0 off the sampled set I, find

    p' = argmin_{q : sum q = 1, q >= p_min} KL(q || w).

The KKT conditions give p'_j = max(p_min, w_j / Z) for one normalizer Z > 0. Off I we have
w_j = p_j >= p_min and, since w_j <= p_j on I, Z <= 1; so arms off I are never clipped and
p'_j = p_j / Z. Writing R = 1 - sum_{j in I} p_j (the mass off I), Z solves

    R / Z + sum_{j in I} max(p_min, w_j / Z) = 1.                               (*)

If the k smallest sampled weights are the clipped ones, (*) is linear in 1/Z:

    Z_k = (R + sum_{i >= k} w_(i)) / (1 - k p_min),    w_(0) <= w_(1) <= ... (sorted).

Any k that is consistent (w_(k-1) <= p_min Z_k <= w_(k)) solves (*), and the left side
of (*) is strictly decreasing in Z, so that Z_k is the unique solution. The k-th smallest
arm is found by its rank (#{arms below it}) from K x K compares for K <= 256 (no sort: a
sort of 128 keys costs ~12 µs on XLA:CPU), by sorting above; nothing of size n is touched.

(*) is invariant under (w, R, Z) -> (c w, c R, c Z), so it is solved for weights shifted
by M = max(log w_j, log R) in log space: nothing underflows even when every arm was sampled
(R = 0) and all w_j are below float32's range.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2; Namkoong et al., ICML 2017 (same projection with p_min and a tree).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ProjectionResult", "project_onto_floored_simplex", "SORT_FREE_MAX_ARMS"]

SORT_FREE_MAX_ARMS = 256
"""Up to this many entries Z is found from K x K compares (one fused kernel) instead of a
sort (``_sumtree.SORT_FREE_MAX_BATCH`` explains the choice); above, by the O(K log K)
sort."""


class ProjectionResult(NamedTuple):
    """log_normalizer: log Z (scalar); num_clipped: how many sampled arms sit at p_min."""

    log_normalizer: jax.Array
    num_clipped: jax.Array


def project_onto_floored_simplex(
    log_weights: jax.Array,
    is_arm: jax.Array,
    rest_mass: jax.Array,
    p_min: float,
) -> ProjectionResult:
    """Solves (*) for Z given the sampled arms' weights.

    Args:
      log_weights: (K,) log w_j of the sampled arms (duplicates masked out by ``is_arm``).
      is_arm: (K,) bool, True for the entries of ``log_weights`` that are distinct arms.
      rest_mass: scalar R = 1 - sum_{j in I} p_j, the probability of the unsampled arms.
      p_min: the floor.

    Returns:
      ``ProjectionResult``; the projected probabilities are p'_j = max(p_min, w_j / Z) on
      the sampled arms and p_j / Z elsewhere.
    """
    k_max = log_weights.shape[0]
    dtype = log_weights.dtype
    inf = jnp.array(jnp.inf, dtype)
    num_arms = jnp.sum(is_arm)
    log_rest = jnp.log(jnp.maximum(jnp.asarray(rest_mass, dtype), 0))  # rounding can give -1e-8
    shift = jnp.maximum(jnp.max(jnp.where(is_arm, log_weights, -inf)), log_rest)
    weights = jnp.exp(log_weights - shift)
    rest_mass = jnp.exp(log_rest - shift)
    if k_max <= SORT_FREE_MAX_ARMS:
        z, violation, k = _candidates_by_rank(weights, is_arm, num_arms, rest_mass, p_min)
    else:
        z, violation, k = _candidates_sorted(weights, is_arm, num_arms, rest_mass, p_min)
    # in exact arithmetic exactly the consistent k have zero violation; with rounding the
    # least violated one is the answer (the candidates then differ only by rounding); ties
    # go to the smallest k
    least = jnp.min(violation)
    best = jnp.argmin(jnp.where(violation == least, k, k_max + 2))
    return ProjectionResult(log_normalizer=jnp.log(z[best]) + shift, num_clipped=k[best])


def _candidates_sorted(weights, is_arm, num_arms, rest_mass, p_min):
    """``(Z_k, violation_k, k)`` for k = 0..K from the sorted weights: O(K log K)."""
    k_max, dtype = weights.shape[0], weights.dtype
    inf = jnp.array(jnp.inf, dtype)
    w_sorted = jnp.sort(jnp.where(is_arm, weights, inf))  # distinct arms first, ascending
    w_finite = jnp.where(jnp.isfinite(w_sorted), w_sorted, 0)
    # suffix[k] = sum_{i >= k} w_(i), for k = 0..K
    suffix = jnp.concatenate([jnp.cumsum(w_finite[::-1])[::-1], jnp.zeros((1,), dtype)])
    k = jnp.arange(k_max + 1)
    denom = 1 - k.astype(dtype) * p_min
    z = jnp.where(denom > 0, (rest_mass + suffix) / jnp.where(denom > 0, denom, 1), inf)
    threshold = p_min * z
    below = jnp.concatenate([jnp.full((1,), -inf, dtype), w_finite])  # w_(k-1), -inf at k=0
    above = jnp.concatenate([w_sorted, jnp.full((1,), inf, dtype)])  # w_(k), +inf at k=K
    above = jnp.where(k < num_arms, above, inf)
    violation = jnp.maximum(below - threshold, 0) + jnp.maximum(threshold - above, 0)
    violation = jnp.where((k <= num_arms) & jnp.isfinite(z), violation, inf)
    return z, violation, k


def _candidates_by_rank(weights, is_arm, num_arms, rest_mass, p_min):
    """The candidates of ``_candidates_sorted`` without a sort, one per arm and one with
    every arm clipped: ``(Z, violation, k)`` of length K + 1 (entries of non-arms have
    violation inf). Arm i is w_(k) for k = its rank, #{arms j: w_j < w_i, or w_j = w_i and
    j < i}; sum_{i' >= k} w_(i') is the sum of the arms not ranked before i, and w_(k-1)
    the largest weight ranked before it: K x K compares and three reductions, for
    ``SORT_FREE_MAX_ARMS`` or fewer entries."""
    k_max, dtype = weights.shape[0], weights.dtype
    inf = jnp.array(jnp.inf, dtype)
    positions = jnp.arange(k_max)
    w_i, w_j = weights[:, None], weights[None, :]
    # ranked_before[i, j]: arm j comes before entry i in the sorted order
    ranked_before = is_arm[None, :] & (
        (w_j < w_i) | ((w_j == w_i) & (positions[None, :] < positions[:, None]))
    )
    rank = jnp.sum(ranked_before, axis=1)
    suffix = jnp.sum(jnp.where(is_arm[None, :] & ~ranked_before, w_j, 0), axis=1)
    below = jnp.max(jnp.where(ranked_before, w_j, -inf), axis=1)  # w_(k-1); -inf at k = 0
    largest = jnp.max(jnp.where(is_arm, weights, -inf))  # w_(num_arms - 1): all clipped
    k = jnp.concatenate([jnp.where(is_arm, rank, k_max + 1), num_arms[None]])
    suffix = jnp.concatenate([suffix, jnp.zeros((1,), dtype)])
    below = jnp.concatenate([below, largest[None]])
    above = jnp.concatenate([jnp.where(is_arm, weights, inf), inf[None]])
    denom = 1 - k.astype(dtype) * p_min
    z = jnp.where(denom > 0, (rest_mass + suffix) / jnp.where(denom > 0, denom, 1), inf)
    threshold = p_min * z
    violation = jnp.maximum(below - threshold, 0) + jnp.maximum(threshold - above, 0)
    violation = jnp.where((k <= num_arms) & jnp.isfinite(z), violation, inf)
    return z, violation, k
