"""Adam-impt: Katharopoulos & Fleuret's importance sampling with a presample, step by step.

``adam_impt_config`` validates the arguments of ``adam_impt_sampler`` into a frozen
``AdamImptConfig``; ``init``, ``sample`` and ``update`` take it as their first argument and
the factory binds it. One ``sample``: while the moving average tau_hat of the estimated
variance reduction is at most tau_th, a uniform draw (``uniform_draw``); above it, a scored
uniform presample of B (``scored_presample``) resampled K proportionally to the scores
(``importance_draw``); then tau_hat moves towards this step's estimate
(``variance_reduction``, ``moving_average``).

Reference: Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
Importance Sampling", ICML 2018, Algorithm 1.
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
from adambs_jax.samplers._base import FeedbackFn, SamplerStateBase, ScoreFn, ScoringSampler
from adambs_jax.samplers._scored_draws import (
    check_score_feedback,
    normalized_scores,
    resample_proportional,
    scores_of,
)

__all__ = [
    "UNIFORM_PHASE_SCORES",
    "AdamImptState",
    "AdamImptConfig",
    "adam_impt_config",
    "variance_reduction",
    "moving_average",
    "init",
    "scored_presample",
    "importance_draw",
    "uniform_draw",
    "sample",
    "update",
    "adam_impt_sampler",
]

UNIFORM_PHASE_SCORES = ("batch", "presample")
"""Where ``adam_impt_sampler`` takes the scores of the moving average from while it samples
uniformly: the train step's feedback of the K drawn examples (``"batch"``, what K&F's code
does) or a scored presample of B examples (``"presample"``)."""


@struct.dataclass
class AdamImptState(SamplerStateBase):
    """State of ``adam_impt_sampler``.

    Attributes:
      variance_reduction_ema: float32 scalar, the moving average tau_hat of the estimated
        variance reduction; importance sampling is on while it exceeds tau_th. Starts at 0
        (as in K&F's code).
      variance_reduction: float32 scalar, the latest single-step estimate tau (1 before any).
      importance_sampling_on: bool scalar, whether the latest draw (``sample``) used
        importance sampling (False before the first draw).
      step: int32 scalar, number of updates seen.
      num_fallbacks: int32 scalar, cumulative number of importance-sampling draws whose
        presample scores were degenerate (all zero, or any NaN, infinite or negative), which
        were drawn uniformly from the presample instead.
      num_examples: static, n.
    """

    variance_reduction_ema: jax.Array
    variance_reduction: jax.Array
    importance_sampling_on: jax.Array
    step: jax.Array
    num_fallbacks: jax.Array
    num_examples: int = struct.field(pytree_node=False)


class AdamImptConfig(NamedTuple):
    """The validated, static configuration of an ``adam_impt_sampler`` (its arguments, with
    ``presample_size`` B = int(presample K) and the default tau_th filled in)."""

    num_examples: int
    batch_size: int
    presample_size: int
    momentum: float
    tau_threshold: float
    score_feedback: str | FeedbackFn
    uniform_phase_scores: str
    score_chunk_size: int | None

    @property
    def score_presample_always(self) -> bool:
        """Whether a presample is scored every step, also while sampling uniformly."""
        return self.uniform_phase_scores == "presample"


def _checked_presample_size(presample, batch_size: int) -> int:
    presample = check_number("presample", presample)
    if presample < 1:
        raise ValueError(
            f"presample must be a finite number >= 1 (B = presample * K >= K), got {presample!r}"
        )
    return int(presample * batch_size)


def adam_impt_config(
    num_examples,
    batch_size,
    *,
    presample,
    momentum,
    tau_threshold,
    score_feedback,
    uniform_phase_scores,
    score_chunk_size,
) -> AdamImptConfig:
    """Validates the arguments of ``adam_impt_sampler`` (same meaning; the factory's defaults
    are the only ones), filling in tau_th = (B + 3K) / (3K) where None.

    Raises:
      ValueError / TypeError: an argument out of range, named in the message.
    """
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    presample_size = _checked_presample_size(presample, batch_size)
    momentum = check_number("momentum", momentum, nonnegative=True)
    if momentum >= 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if tau_threshold is None:
        tau_threshold = (presample_size + 3 * batch_size) / (3 * batch_size)
    tau_threshold = check_number("tau_threshold", tau_threshold, positive=True)
    check_score_feedback(score_feedback)
    if uniform_phase_scores not in UNIFORM_PHASE_SCORES:
        raise ValueError(
            f"uniform_phase_scores must be one of {UNIFORM_PHASE_SCORES}, got "
            f"{uniform_phase_scores!r}"
        )
    score_chunk_size = check_optional_int("score_chunk_size", score_chunk_size)
    return AdamImptConfig(
        num_examples,
        batch_size,
        presample_size,
        momentum,
        tau_threshold,
        score_feedback,
        uniform_phase_scores,
        score_chunk_size,
    )


def variance_reduction(scores: jax.Array) -> jax.Array:
    """Katharopoulos & Fleuret's estimate of the variance reduction of importance sampling.

    With g = s / sum(s) the M normalized scores and u = 1/M the uniform distribution
    (Katharopoulos & Fleuret, ICML 2018; ``VarianceReductionCondition`` of their code),

        tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2) = sqrt(M ||g||^2) = sqrt(mean(s^2)) / mean(s)

    (since sum g = 1, ||g - u||^2 = ||g||^2 - 1/M). 1 <= tau <= sqrt(M); tau = 1 for equal
    scores. Computed in the last form, which has no cancellation. Degenerate scores (all
    zero, or any NaN, infinite or negative) give tau = 1, K&F's value for all-zero scores.

    Args:
      scores: (M,) nonnegative scores.

    Returns:
      float32 scalar tau.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (M,) with M >= 1, got {scores.shape}")
    g, valid = normalized_scores(scores)
    tau = jnp.sqrt(scores.shape[0] * jnp.sum(jnp.square(g)))
    return jnp.where(valid, tau, 1.0)


def moving_average(momentum: float, average: jax.Array, tau: jax.Array) -> jax.Array:
    """tau_hat <- momentum tau_hat + (1 - momentum) tau."""
    return momentum * average + (1.0 - momentum) * tau


def init(config: AdamImptConfig) -> AdamImptState:
    """tau_hat = 0 (as in K&F's code), tau = 1, importance sampling off."""
    return AdamImptState(
        variance_reduction_ema=jnp.zeros((), jnp.float32),
        variance_reduction=jnp.ones((), jnp.float32),
        importance_sampling_on=jnp.zeros((), jnp.bool_),
        step=jnp.zeros((), jnp.int32),
        num_fallbacks=jnp.zeros((), jnp.int32),
        num_examples=config.num_examples,
    )


def scored_presample(config: AdamImptConfig, presample_key: jax.Array, score_fn: ScoreFn):
    """B indices i.i.d. uniform and their scores: ``(indices (B,), scores (B,))``."""
    presample_indices = jax.random.randint(
        presample_key, (config.presample_size,), 0, config.num_examples, dtype=jnp.int32
    )
    return presample_indices, scores_of(score_fn, presample_indices)


def importance_draw(config: AdamImptConfig, resample_key: jax.Array, presample_indices, scores):
    """K of the presample, drawn from q = s / sum(s): ``(indices, probs = B q / n, valid)``,
    so that the step's weight 1 / (n probs) is 1 / (B q)."""
    positions, q, valid = resample_proportional(resample_key, scores, config.batch_size)
    probs = (config.presample_size / config.num_examples) * q[positions]
    return presample_indices[positions], probs, valid


def uniform_draw(config: AdamImptConfig, uniform_key: jax.Array):
    """K indices i.i.d. uniform on {0..n-1}, probs 1/n."""
    n, num_draws = config.num_examples, config.batch_size
    indices = jax.random.randint(uniform_key, (num_draws,), 0, n, dtype=jnp.int32)
    return indices, jnp.full((num_draws,), 1.0 / n, jnp.float32)


def _draw_scoring_always(config: AdamImptConfig, keys, on, score_fn: ScoreFn):
    """``uniform_phase_scores="presample"``: both draws every step, ``on`` selects one; tau
    always comes from the presample. ``(indices, probs, tau, fallback, update_average)``."""
    presample_key, resample_key, uniform_key = keys
    presample_indices, scores = scored_presample(config, presample_key, score_fn)
    is_indices, is_probs, valid = importance_draw(config, resample_key, presample_indices, scores)
    uniform_indices, uniform_probs = uniform_draw(config, uniform_key)
    indices = jnp.where(on, is_indices, uniform_indices)
    probs = jnp.where(on, is_probs, uniform_probs)
    tau = variance_reduction(scores)
    fallback = on & ~valid
    return indices, probs, tau, fallback, jnp.asarray(True)


def _draw_scoring_when_on(
    config: AdamImptConfig, state: AdamImptState, keys, on, score_fn: ScoreFn
):
    """``uniform_phase_scores="batch"``: the presample is scored only in the branch of a
    ``lax.cond`` that runs while importance sampling is on; tau_hat then moves in ``sample``,
    and while uniform in ``update`` (from the batch feedback)."""
    presample_key, resample_key, uniform_key = keys

    def importance_branch(_):
        presample_indices, scores = scored_presample(config, presample_key, score_fn)
        indices, probs, valid = importance_draw(config, resample_key, presample_indices, scores)
        return indices, probs, variance_reduction(scores), ~valid

    def uniform_branch(_):
        indices, probs = uniform_draw(config, uniform_key)
        return indices, probs, state.variance_reduction, jnp.asarray(False)

    indices, probs, tau, fallback = jax.lax.cond(on, importance_branch, uniform_branch, None)
    return indices, probs, tau, fallback, on


def sample(config: AdamImptConfig, state: AdamImptState, key: jax.Array, score_fn: ScoreFn):
    """One draw of K: ``(indices (K,) int32, probs (K,) float32, state)``."""
    check_state_size(state, config.num_examples)
    keys = tuple(jax.random.split(key, 3))  # presample, resample, uniform
    on = state.variance_reduction_ema > config.tau_threshold
    if config.score_presample_always:
        drawn = _draw_scoring_always(config, keys, on, score_fn)
    else:
        drawn = _draw_scoring_when_on(config, state, keys, on, score_fn)
    indices, probs, tau, fallback, update_average = drawn
    ema = jnp.where(
        update_average,
        moving_average(config.momentum, state.variance_reduction_ema, tau),
        state.variance_reduction_ema,
    )
    new_state = state.replace(
        variance_reduction_ema=ema.astype(jnp.float32),
        variance_reduction=jnp.asarray(tau, jnp.float32),
        importance_sampling_on=on,
        num_fallbacks=state.num_fallbacks + fallback.astype(jnp.int32),
    )
    return indices.astype(jnp.int32), probs.astype(jnp.float32), new_state


def update(
    config: AdamImptConfig, state: AdamImptState, indices, feedback, *, apply=True
) -> AdamImptState:
    """Counts the step; with ``uniform_phase_scores="batch"`` and importance sampling off,
    tau_hat learns from the training pass's scores (``feedback``), as in K&F's code.
    ``apply`` False (a bool scalar, may be traced) returns ``state`` unchanged, without a
    branch (the train step passes "the step is finite")."""
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    apply = jnp.asarray(apply, bool)
    step = state.step + apply.astype(jnp.int32)
    if config.score_presample_always:
        return state.replace(step=step)
    learn = apply & ~state.importance_sampling_on  # the uniform phase learns from the batch
    tau = variance_reduction(jnp.asarray(feedback, jnp.float32))
    ema = moving_average(config.momentum, state.variance_reduction_ema, tau)
    return state.replace(
        variance_reduction_ema=jnp.where(learn, ema, state.variance_reduction_ema),
        variance_reduction=jnp.where(learn, tau, state.variance_reduction),
        step=step,
    )


def adam_impt_sampler(
    num_examples: int,
    batch_size: int,
    *,
    presample: float = 3,
    momentum: float = 0.9,
    tau_threshold: float | None = None,
    score_feedback: str | FeedbackFn = "logit_grad_norm",
    uniform_phase_scores: str = "batch",
    score_chunk_size: int | None = None,
) -> ScoringSampler:
    """Adam-impt: Katharopoulos & Fleuret's importance sampling with a presample.

    The AdamBS paper's baseline (Liu, Wu, Mozafari, NeurIPS 2020, §5), from Katharopoulos &
    Fleuret, "Not All Samples Are Created Equal: Deep Learning with Importance Sampling",
    ICML 2018 (Algorithm 1; ``ImportanceTraining`` of their Keras library). With
    B = int(presample K), each step:

    * while tau_hat <= tau_th (default tau_th = (B + 3K) / (3K), [K&F] eq. 29 as cited in
      their code: with a backward pass costing two forward passes, a step that scores B and
      trains on K costs (B + 3K) / (3K) times a uniform step, so importance sampling pays
      when the variance reduction exceeds that ratio): draw K examples i.i.d. uniformly
      from {0..n-1}; probs = 1/n (weights 1: plain training);
    * once tau_hat > tau_th: draw a presample P of B examples i.i.d. uniformly, score them
      with ``score_fn`` (default the bound s_i = ||d loss_i / d logits_i||: a forward pass and
      a backward pass through the loss only), draw K positions i.i.d. with replacement from
      q = s / sum(s), and return probs = B q / n, so that the step's weight 1/(n probs) is
      1 / (B q_i): (1/K) sum_k g_{P_k} / (B q_k) is unbiased for the presample mean, hence
      for the full mean;
    * update the moving average tau_hat <- momentum tau_hat + (1 - momentum) tau with the
      variance-reduction estimate tau = 1/sqrt(1 - ||g - u||^2/||g||^2) of this step's scores
      (``variance_reduction``), g = scores / sum, u = uniform. Exactly one update per step;
      the switch is re-evaluated every step (it can switch off again).

    Which scores feed tau_hat while sampling uniformly (``uniform_phase_scores``):

    * ``"batch"`` (default; what K&F's code does: ``ConditionalStartSampler`` updates the
      condition in ``update`` with the training pass's scores of the K drawn examples): the
      train step's ``feedback`` of the batch, through ``update``. No presample is scored
      until importance sampling is on (the scoring sits in a ``lax.cond`` branch that does
      not run), so the uniform phase costs one ordinary step. Use the step with
      ``feedback="logit_grad_norm"``, the same kind as ``score_feedback``, so that both
      phases average the same quantity (tau = sqrt(mean s^2)/mean s is an estimate of a
      ratio that does not depend on the number of scores);
    * ``"presample"``: a presample of B is scored every step, also while uniform, and tau_hat
      always comes from presample scores; costs B scored examples per step throughout.

    Degenerate scores (all zero, or any NaN, infinite or negative): the resample falls back
    to uniform over the presample (q = 1/B, probs = 1/n), counted in ``num_fallbacks``, and
    tau = 1. A presample example with score 0 (and so a zero gradient, for the logit bound)
    is never drawn.

    Cost per step (n examples, K batch, B presample, C = cost of one example's forward pass
    plus its backward pass to the logits): uniform phase, O(K) draws plus the ordinary step;
    importance phase, B C more (the scoring of the presample) plus O(B + K log B) for the
    resample. The step's own forward/backward on the K drawn examples is not shared with
    the scoring (the presample is scored at the same parameters, then the K drawn examples
    are evaluated again by the step).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1.
      presample: B / K, a number >= 1; B = int(presample * K) (as in K&F's code). Default 3.
      momentum: of the moving average tau_hat, in [0, 1). Default 0.9.
      tau_threshold: tau_th > 0; importance sampling is on while tau_hat > tau_th. Default
        (B + 3K) / (3K) (= 2 with presample 3).
      score_feedback: the presample scores: ``"logit_grad_norm"`` (default, K&F's bound; the
        step's loss must be an ``ab.ModelLoss``), ``"grad_norm"`` (exact, K&F's
        ``score="full_gnorm"``), ``"loss"``, or a callable ``(params, batch, losses) -> (M,)``.
      uniform_phase_scores: ``"batch"`` (default) or ``"presample"``, see above.
      score_chunk_size: score the presample in chunks of this many examples (bounded memory,
        K&F's ``forward_batch_size``); None (default): all B at once.

    Returns:
      A ``ScoringSampler``; its state is an ``AdamImptState`` (read
      ``state.sampler_state.variance_reduction_ema`` and ``.importance_sampling_on`` from a
      ``TrainState``). Its ``probabilities`` is None (and ``ab.samplers.probabilities`` raises): the
      marginal distribution of a draw over the n examples is not computed.

    References:
      Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
      Importance Sampling", ICML 2018, Algorithm 1 and eq. 29; Liu, Wu, Mozafari, "Adam with
      Bandit Sampling for Deep Learning", NeurIPS 2020, §5 (Adam-impt as the baseline).

    Raises:
      ValueError / TypeError: an argument out of range, named in the message.
    """
    config = adam_impt_config(
        num_examples,
        batch_size,
        presample=presample,
        momentum=momentum,
        tau_threshold=tau_threshold,
        score_feedback=score_feedback,
        uniform_phase_scores=uniform_phase_scores,
        score_chunk_size=score_chunk_size,
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
        config.score_chunk_size,
        probabilities=None,
    )
