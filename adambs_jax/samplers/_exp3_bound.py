"""Step 2 of AdamBS Algorithm 2: the bound L that the feedback is clipped to.

The loss l_j = L^2/p_min^2 - min(f_j, L)^2/p_j^2 is >= 0 only for f_j <= L, so feedback is
clipped to L and enters the update as ratio_k = min(f_k, L) / L (``clip_ratio``). L is
either fixed, the running max of the valid feedback (the paper's choice, ``clip_to_bound``:
one outlier, e.g. 1e30, then sets L for good, every ratio is ~0 and the sampler ignores all
later feedback), or a running tau-quantile of it (``quantile_bound``, the library's default:
one outlier moves log L by at most eta_L). ``clipped_fraction`` measures the clipped share.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2; Robbins, Monro, "A Stochastic Approximation Method", Ann. Math. Stat. 1951
(the quantile recursion).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["clip_ratio", "clip_to_bound", "quantile_bound", "clipped_fraction"]


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
    ordered = jnp.sort(jnp.where(valid, feedback, jnp.inf))
    rank = jnp.clip(jnp.ceil(quantile * num_valid).astype(jnp.int32) - 1, 0, feedback.shape[0] - 1)
    first = jnp.clip(ordered[rank], 0.0, math.exp(_LOG_BOUND_RANGE[1]))
    bound = jnp.where(stored_bound > 0, moved, first)
    return jnp.where(num_valid > 0, bound, stored_bound).astype(jnp.float32)


def clipped_fraction(feedback, grad_norm_bound) -> jax.Array:
    """float32 scalar: the fraction of the valid (finite, >= 0) entries of ``feedback`` (K,)
    above ``grad_norm_bound`` (the L of the update that used them), i.e. clipped; 0 without
    valid feedback. A metric for the bound: ~1 - tau in "quantile" mode, 0 for the running
    max."""
    feedback = jnp.asarray(feedback, jnp.float32)
    valid = jnp.isfinite(feedback) & (feedback >= 0)
    clipped = jnp.sum(valid & (feedback > grad_norm_bound))
    return (clipped / jnp.maximum(jnp.sum(valid), 1)).astype(jnp.float32)
