"""p^GN, Lahire's oracle: sampling proportional to the exact gradient norm of every example.

``gradient_norm_config`` validates the arguments of ``gradient_norm_sampler`` into a frozen
``GradientNormConfig``; ``init``, ``sample`` and ``update`` take it as their first argument
and the factory binds it. ``sample`` scores all n examples through ``score_fn``, turns the
norms into a distribution with a floor (``floored_distribution``) and draws K from it
(``_scored_draws``).

Reference: Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning", §2.1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import (
    check_int,
    check_number,
    check_optional_int,
    check_per_draw,
    check_state_size,
)
from adambs_jax.samplers import _scored_draws as scored_draws
from adambs_jax.samplers._base import FeedbackFn, SamplerStateBase, ScoreFn, ScoringSampler

__all__ = [
    "GradientNormSamplerState",
    "GradientNormConfig",
    "gradient_norm_config",
    "init",
    "floored_distribution",
    "sample",
    "update",
    "distribution",
    "gradient_norm_sampler",
]


@struct.dataclass
class GradientNormSamplerState(SamplerStateBase):
    """State of ``gradient_norm_sampler``.

    Attributes:
      distribution: (n,) float32, the distribution p of the latest draw (computed from the
        parameters before that step's update); uniform before the first draw.
      step: int32 scalar, number of updates seen.
      num_fallbacks: int32 scalar, cumulative number of draws whose norms were degenerate
        (all zero, or any NaN, infinite or negative) and which were drawn uniformly.
      num_examples: static, n.
    """

    distribution: jax.Array
    step: jax.Array
    num_fallbacks: jax.Array
    num_examples: int = struct.field(pytree_node=False)

    def probabilities(self) -> jax.Array:
        return distribution(self)


class GradientNormConfig(NamedTuple):
    """The validated, static configuration of a ``gradient_norm_sampler``.

    Attributes:
      num_examples: n, 1 <= n <= max_examples.
      batch_size: K >= 1.
      p_floor: the floor, 0 <= p_floor <= 1/n.
      chunk_size: examples per chunk of the all-n scoring, or None (all at once).
      score_feedback: the kind of norms (a feedback kind or a callable).
    """

    num_examples: int
    batch_size: int
    p_floor: float
    chunk_size: int | None
    score_feedback: str | FeedbackFn

    @property
    def proportional_mass(self) -> float:
        """1 - n p_floor: the mass shared in proportion to the norms."""
        return max(0.0, 1.0 - self.num_examples * self.p_floor)


def gradient_norm_config(
    num_examples, batch_size, *, p_floor, chunk_size, max_examples, score_feedback
) -> GradientNormConfig:
    """Validates the arguments of ``gradient_norm_sampler`` (same meaning; the factory's
    defaults are the only ones).

    Raises:
      ValueError: n > ``max_examples`` (naming both), p_floor outside [0, 1/n], or another
        argument out of range, named in the message.
      TypeError: ``score_feedback`` is neither a str nor a callable.
    """
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    max_examples = check_int("max_examples", max_examples)
    if num_examples > max_examples:
        raise ValueError(
            f"num_examples={num_examples} exceeds max_examples={max_examples}: "
            f"gradient_norm_sampler computes the gradient norm of every one of the n examples "
            f"every step (an O(n) oracle for small data sets); pass a larger max_examples to "
            f"do it anyway"
        )
    p_floor = check_number("p_floor", p_floor, nonnegative=True)
    if p_floor * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_floor * num_examples must be <= 1 (p_floor = 1/n is uniform), got "
            f"p_floor={p_floor} with num_examples={num_examples}"
        )
    chunk_size = check_optional_int("chunk_size", chunk_size)
    scored_draws.check_score_feedback(score_feedback)
    return GradientNormConfig(num_examples, batch_size, p_floor, chunk_size, score_feedback)


def init(config: GradientNormConfig) -> GradientNormSamplerState:
    """Uniform p = 1/n before the first draw; no fallbacks yet."""
    n = config.num_examples
    return GradientNormSamplerState(
        distribution=jnp.full((n,), 1.0 / n, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        num_fallbacks=jnp.zeros((), jnp.int32),
        num_examples=n,
    )


def floored_distribution(config: GradientNormConfig, norms: jax.Array):
    """``(p (n,), valid)``: p_j = (1 - n p_floor) norms_j / sum norms + p_floor, or uniform
    1/n where the norms are degenerate (``valid`` False)."""
    proportional, valid = scored_draws.normalized_scores(norms)
    p = jnp.where(
        valid, config.proportional_mass * proportional + config.p_floor, 1.0 / config.num_examples
    )
    return p, valid


def sample(
    config: GradientNormConfig, state: GradientNormSamplerState, key: jax.Array, score_fn: ScoreFn
):
    """Scores all n examples, draws K i.i.d. from p: ``(indices, p[indices], state)``."""
    check_state_size(state, config.num_examples)
    norms = scored_draws.scores_of(score_fn, jnp.arange(config.num_examples, dtype=jnp.int32))
    p, valid = floored_distribution(config, norms)
    indices = scored_draws.draw_proportional(key, p, config.batch_size)
    new_state = state.replace(
        distribution=p, num_fallbacks=state.num_fallbacks + (~valid).astype(jnp.int32)
    )
    return indices, p[indices], new_state


def update(
    config: GradientNormConfig, state: GradientNormSamplerState, indices, feedback, *, apply=True
):
    """Checks the shapes of the draws and counts the step (if ``apply``, a bool scalar that
    may be traced); the feedback is not used."""
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    return state.replace(step=state.step + jnp.asarray(apply, bool).astype(jnp.int32))


def distribution(state: GradientNormSamplerState) -> jax.Array:
    """The (n,) p of the latest draw (uniform before the first)."""
    return state.distribution


def gradient_norm_sampler(
    num_examples: int,
    batch_size: int,
    *,
    p_floor: float = 0.0,
    chunk_size: int | None = 256,
    max_examples: int = 10_000,
    score_feedback: str | FeedbackFn = "grad_norm",
) -> ScoringSampler:
    """p^GN: sampling proportional to the exact per-example gradient norms (Lahire's oracle).

    The variance-optimal distribution for SGD (and SGD with momentum) of Lahire, "Non-Uniform
    Sampling and Adaptive Optimizers in Deep Learning", §2.1 and Appendix A (also Needell et
    al.; Wang et al.; Alain et al., "Variance reduction in SGD by distributed importance
    sampling"), recomputed from scratch every step at the current parameters:

        norms_j = ||d loss_j / d params||_2                    for all j = 1..n
        p_j     = (1 - n p_floor) norms_j / sum_i norms_i + p_floor

    so p_j >= p_floor and sum p = 1; p_floor = 0 (default) is exactly Lahire's p^GN, and
    p_floor = 1/n is uniform. K indices are drawn i.i.d. with replacement from p (inverse
    CDF, O(n + K log n)); probs = p[indices], so the step's weight is 1 / (n p). Lahire
    shows p^GN is optimal for SGD but not for RMSProp or Adam.

    Degenerate norms (all zero, or any NaN, infinite or negative): p = uniform 1/n for that
    step, counted in ``num_fallbacks``. An example with norm 0 and p_floor = 0 has p = 0 and
    is never drawn (its gradient is 0, so the estimate stays unbiased).

    **Only sensible for small n.** Every step computes n per-example gradients (a forward and
    a backward pass over the whole training set, in chunks of ``chunk_size`` examples under
    ``jax.lax.map`` of ``jax.vmap``, so memory is chunk_size x params, not n x params): the
    cost per step is O(n) full per-example gradient evaluations, about n / K times a plain
    step's backward work. It is an oracle for toy problems (Lahire: Iris and Wine), not a
    practical method; hence ``max_examples``.

    Args:
      num_examples: n, 1 <= n <= ``max_examples``.
      batch_size: K >= 1.
      p_floor: the floor, 0 <= p_floor <= 1/n. Default 0.
      chunk_size: examples per chunk of the all-n scoring (default 256); None: all n at once.
      max_examples: the largest n accepted (default 10,000); raise it knowingly.
      score_feedback: the norms: ``"grad_norm"`` (default, exact), ``"logit_grad_norm"``
        (K&F's bound over all n, cheaper), ``"loss"``, or a callable.

    Returns:
      A ``ScoringSampler``; its state is a ``GradientNormSamplerState`` whose
      ``distribution`` is the (n,) p of the latest draw (also its ``probabilities``).
      ``update`` ignores the feedback.

    References:
      Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning", §2.1 and
      Appendix A; Needell, Srebro, Ward, "Stochastic Gradient Descent, Weighted Sampling, and
      the Randomized Kaczmarz Algorithm", NeurIPS 2014; Alain et al., "Variance Reduction in
      SGD by Distributed Importance Sampling", 2015.

    Raises:
      ValueError: n > ``max_examples`` (naming both), p_floor outside [0, 1/n], or another
        argument out of range, named in the message.
    """
    config = gradient_norm_config(
        num_examples,
        batch_size,
        p_floor=p_floor,
        chunk_size=chunk_size,
        max_examples=max_examples,
        score_feedback=score_feedback,
    )
    init_fn = functools.partial(init, config)
    sample_fn = functools.partial(sample, config)
    update_fn = functools.partial(update, config)
    return ScoringSampler(
        init_fn,
        sample_fn,
        update_fn,
        config.num_examples,
        config.batch_size,
        config.score_feedback,
        config.chunk_size,
        probabilities=distribution,
    )
