"""Drawing in proportion to model scores: the steps the scoring baselines share.

Adam-impt (Katharopoulos & Fleuret, ICML 2018) resamples K of a scored presample of B
examples, and p^GN (Lahire) draws K of all n examples, each with probabilities proportional
to per-example scores s >= 0 that a ``score_fn`` (``ab.samplers.ScoreFn``) computes at
the current parameters. Both need the same steps: call ``score_fn`` and check its shape
(``scores_of``), normalize the scores with a uniform fallback for degenerate ones
(``normalized_scores``), and draw by inverse CDF without ever returning a zero-probability
position (``draw_proportional``, ``resample_proportional``).

References:
  Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with Importance
  Sampling", ICML 2018, Algorithm 1; Lahire, "Non-Uniform Sampling and Adaptive Optimizers
  in Deep Learning", §2.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adambs_jax.samplers._base import ScoreFn

__all__ = [
    "check_score_feedback",
    "scores_of",
    "valid_scores",
    "normalized_scores",
    "draw_proportional",
    "resample_proportional",
]


def check_score_feedback(score_feedback) -> None:
    """TypeError unless ``score_feedback`` is a feedback kind (a str, checked against the
    loss by the train step) or a callable ``(params, batch, losses) -> (M,)``."""
    if not (isinstance(score_feedback, str) or callable(score_feedback)):
        raise TypeError(
            f"score_feedback must be 'grad_norm', 'logit_grad_norm', 'loss' or a callable, "
            f"got {type(score_feedback).__name__}"
        )


def scores_of(score_fn: ScoreFn, indices: jax.Array) -> jax.Array:
    """``score_fn(indices)`` as float32, checked to give one score per index (M,)."""
    scores = score_fn(indices)
    if jnp.shape(scores) != indices.shape:
        raise ValueError(
            f"score_fn must return one score per index, shape {indices.shape}, "
            f"got {jnp.shape(scores)}"
        )
    return jnp.asarray(scores, jnp.float32)


def valid_scores(scores: jax.Array) -> jax.Array:
    """bool scalar: every score finite and >= 0, and their sum > 0."""
    finite_nonnegative = jnp.isfinite(scores) & (scores >= 0)
    return jnp.all(finite_nonnegative) & (jnp.sum(jnp.where(finite_nonnegative, scores, 0.0)) > 0)


def normalized_scores(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(g = s / sum(s) (M,), valid); g = uniform 1/M where the scores are degenerate.

    The scores are divided by their max first, so huge finite scores do not overflow.
    """
    scores = jnp.asarray(scores, jnp.float32)
    valid = valid_scores(scores)
    safe = jnp.where(valid, scores, 1.0)
    scaled = safe / jnp.max(safe)
    return scaled / jnp.sum(scaled), valid


def draw_proportional(key: jax.Array, p: jax.Array, num_draws: int) -> jax.Array:
    """(num_draws,) int32 positions i.i.d. from p (M,) (nonnegative, positive sum): inverse
    CDF, O(M + num_draws log M).

    A float32 prefix sum need not be exactly flat across a zero entry (XLA may associate
    it differently for neighbouring outputs), so a draw that lands on p_i = 0 is moved to
    the next entry with p > 0 (the previous one at the end): a zero-probability position is
    never returned, and so never gets an infinite weight.
    """
    size = p.shape[0]
    cumulative = jnp.cumsum(p)
    targets = cumulative[-1] * (1.0 - jax.random.uniform(key, (num_draws,), jnp.float32))
    positions = jnp.clip(jnp.searchsorted(cumulative, targets), 0, size - 1)
    arange = jnp.arange(size)
    next_positive = jax.lax.cummin(jnp.where(p > 0, arange, size), reverse=True)
    previous_positive = jax.lax.cummax(jnp.where(p > 0, arange, -1))
    fixed = jnp.where(
        next_positive[positions] < size, next_positive[positions], previous_positive[positions]
    )
    return jnp.where(p[positions] > 0, positions, fixed).astype(jnp.int32)


def resample_proportional(
    key: jax.Array, scores: jax.Array, num_draws: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws ``num_draws`` positions i.i.d. with replacement from q = s / sum(s).

    The resampling step of Adam-impt ([K&F] Algorithm 1; their code draws with
    ``np.random.choice(B, K, p=q)``, with replacement). For any values v_i with v_i = 0
    where s_i = 0 (a zero logit-gradient bound means a zero gradient),

        E[(1/K) sum_k v_{pos_k} / (B q_{pos_k})] = (1/B) sum_i v_i,

    the mean over the M = B scored examples. Degenerate scores (all zero, or any NaN,
    infinite or negative) give q = uniform 1/M.

    Args:
      key: PRNG key.
      scores: (M,) scores s >= 0.
      num_draws: K.

    Returns:
      ``(positions (K,) int32, q (M,) float32, valid bool scalar)``; ``valid`` is False
      where the scores were degenerate and q is uniform.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (M,) with M >= 1, got {scores.shape}")
    q, valid = normalized_scores(scores)
    return draw_proportional(key, q, num_draws), q, valid
