"""The baselines AdamBS is compared against, as samplers of the same train step.

Every method is a sampler for ``make_train_step``, so an experiment switches method by
name and measures all of them the same way (Liu, Wu, Mozafari, "Adam with Bandit Sampling
for Deep Learning", NeurIPS 2020, §5; Lahire, "Non-Uniform Sampling and Adaptive
Optimizers in Deep Learning"):

* uniform (plain Adam, SGD, RMSProp, ...): ``ab.uniform_sampler``;
* AdamBS: ``ab.exp3_sampler`` in front of ``optax.adam``;
* Adam-impt (Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
  Importance Sampling", ICML 2018; the AdamBS paper's baseline): ``adam_impt_sampler``, a
  uniform presample of B = presample K examples scored with the logit-gradient bound and
  resampled K proportionally to the scores, switched on by a moving average of the
  estimated variance reduction;
* p^GN (Lahire's oracle): ``gradient_norm_sampler``, the exact gradient norm of every
  training example each step, K drawn proportionally.

Both are ``ScoringSampler`` s: their ``sample(state, key, score_fn)`` scores examples with
the current model through ``score_fn`` inside the one jitted step, and returns probs such
that 1 / (n probs) is each draw's unbiased importance weight (``adambs_jax.scoring``).

    sampler = ab.adam_impt_sampler(n, K)                     # or ab.gradient_norm_sampler(n, K)
    step = ab.make_train_step(model_loss, optax.adam(1e-3), sampler,
                              feedback="logit_grad_norm")   # K&F's training-pass scores
    state = ab.TrainState.create(params=params, optimizer=optax.adam(1e-3), sampler=sampler)
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax.feedback import FeedbackFn
from adambs_jax.scoring import ScoreFn, ScoringSampler

__all__ = [
    "AdamImptState",
    "GradientNormSamplerState",
    "UNIFORM_PHASE_SCORES",
    "adam_impt_sampler",
    "gradient_norm_sampler",
    "variance_reduction",
    "resample_proportional",
]

UNIFORM_PHASE_SCORES = ("batch", "presample")
"""Where ``adam_impt_sampler`` takes the scores of the moving average from while it samples
uniformly: the train step's feedback of the K drawn examples (``"batch"``, what K&F's code
does) or a scored presample of B examples (``"presample"``)."""


@struct.dataclass
class AdamImptState:
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


@struct.dataclass
class GradientNormSamplerState:
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


def _valid_scores(scores: jax.Array) -> jax.Array:
    """bool scalar: every score finite and >= 0, and their sum > 0."""
    finite_nonnegative = jnp.isfinite(scores) & (scores >= 0)
    return jnp.all(finite_nonnegative) & (jnp.sum(jnp.where(finite_nonnegative, scores, 0.0)) > 0)


def _normalized(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(g = s / sum(s) (M,), valid); g = uniform 1/M where the scores are degenerate.

    The scores are divided by their max first, so huge finite scores do not overflow.
    """
    scores = jnp.asarray(scores, jnp.float32)
    valid = _valid_scores(scores)
    safe = jnp.where(valid, scores, 1.0)
    scaled = safe / jnp.max(safe)
    return scaled / jnp.sum(scaled), valid


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
    g, valid = _normalized(scores)
    tau = jnp.sqrt(scores.shape[0] * jnp.sum(jnp.square(g)))
    return jnp.where(valid, tau, 1.0)


def _draw_proportional(key: jax.Array, p: jax.Array, num_draws: int) -> jax.Array:
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
    q, valid = _normalized(scores)
    return _draw_proportional(key, q, num_draws), q, valid


def _check_sizes(num_examples, batch_size):
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_batch(name: str, value, batch_size: int):
    if jnp.ndim(value) != 1 or jnp.shape(value)[0] != batch_size:
        raise ValueError(
            f"{name} must have shape ({batch_size},) (one entry per draw), got {jnp.shape(value)}"
        )


def _check_chunk_size(name: str, chunk_size):
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"{name} must be an int >= 1 or None, got {chunk_size!r}")


def _check_score_feedback(score_feedback):
    if not (isinstance(score_feedback, str) or callable(score_feedback)):
        raise TypeError(
            f"score_feedback must be 'grad_norm', 'logit_grad_norm', 'loss' or a callable, "
            f"got {type(score_feedback).__name__}"
        )


def _scores_of(score_fn: ScoreFn, indices: jax.Array) -> jax.Array:
    scores = score_fn(indices)
    if jnp.shape(scores) != indices.shape:
        raise ValueError(
            f"score_fn must return one score per index, shape {indices.shape}, "
            f"got {jnp.shape(scores)}"
        )
    return jnp.asarray(scores, jnp.float32)


def adam_impt_sampler(
    num_examples: int,
    batch_size: int,
    *,
    presample: float = 3,
    momentum: float = 0.9,
    tau_threshold: Optional[float] = None,
    score_feedback: Union[str, FeedbackFn] = "logit_grad_norm",
    uniform_phase_scores: str = "batch",
    score_chunk_size: Optional[int] = None,
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
      ``TrainState``). ``ab.probabilities`` does not apply: the marginal distribution of a
      draw over the n examples is not computed.

    Raises:
      ValueError / TypeError: an argument out of range, named in the message.
    """
    _check_sizes(num_examples, batch_size)
    if isinstance(presample, bool) or not isinstance(presample, (int, float)) or not (
        math.isfinite(presample) and presample >= 1
    ):
        raise ValueError(
            f"presample must be a finite number >= 1 (B = presample * K >= K), got {presample!r}"
        )
    presample_size = int(presample * batch_size)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
        0 <= momentum < 1
    ):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    momentum = float(momentum)
    if tau_threshold is None:
        tau_threshold = (presample_size + 3 * batch_size) / (3 * batch_size)
    if isinstance(tau_threshold, bool) or not isinstance(tau_threshold, (int, float)) or not (
        math.isfinite(tau_threshold) and tau_threshold > 0
    ):
        raise ValueError(
            f"tau_threshold must be a finite number > 0 or None, got {tau_threshold!r}"
        )
    tau_threshold = float(tau_threshold)
    _check_score_feedback(score_feedback)
    if uniform_phase_scores not in UNIFORM_PHASE_SCORES:
        raise ValueError(
            f"uniform_phase_scores must be one of {UNIFORM_PHASE_SCORES}, got "
            f"{uniform_phase_scores!r}"
        )
    _check_chunk_size("score_chunk_size", score_chunk_size)
    score_presample_always = uniform_phase_scores == "presample"
    n, num_draws, size = num_examples, batch_size, presample_size

    def init():
        return AdamImptState(
            variance_reduction_ema=jnp.zeros((), jnp.float32),
            variance_reduction=jnp.ones((), jnp.float32),
            importance_sampling_on=jnp.zeros((), jnp.bool_),
            step=jnp.zeros((), jnp.int32),
            num_fallbacks=jnp.zeros((), jnp.int32),
            num_examples=num_examples,
        )

    def scored_presample(presample_key, score_fn):
        presample_indices = jax.random.randint(presample_key, (size,), 0, n, dtype=jnp.int32)
        return presample_indices, _scores_of(score_fn, presample_indices)

    def importance_draw(resample_key, presample_indices, scores):
        positions, q, valid = resample_proportional(resample_key, scores, num_draws)
        probs = (size / n) * q[positions]
        return presample_indices[positions], probs, valid

    def uniform_draw(uniform_key):
        indices = jax.random.randint(uniform_key, (num_draws,), 0, n, dtype=jnp.int32)
        return indices, jnp.full((num_draws,), 1.0 / n, jnp.float32)

    def sample(state: AdamImptState, key: jax.Array, score_fn: ScoreFn):
        if state.num_examples != n:
            raise ValueError(
                f"state: built for num_examples={state.num_examples}, but this sampler has "
                f"num_examples={n}"
            )
        presample_key, resample_key, uniform_key = jax.random.split(key, 3)
        on = state.variance_reduction_ema > tau_threshold

        if score_presample_always:
            presample_indices, scores = scored_presample(presample_key, score_fn)
            is_indices, is_probs, valid = importance_draw(resample_key, presample_indices, scores)
            uniform_indices, uniform_probs = uniform_draw(uniform_key)
            indices = jnp.where(on, is_indices, uniform_indices)
            probs = jnp.where(on, is_probs, uniform_probs)
            tau = variance_reduction(scores)
            fallback = on & ~valid
            update_average = jnp.asarray(True)
        else:

            def importance_branch(_):
                presample_indices, scores = scored_presample(presample_key, score_fn)
                indices, probs, valid = importance_draw(resample_key, presample_indices, scores)
                return indices, probs, variance_reduction(scores), ~valid

            def uniform_branch(_):  # tau_hat is updated from the batch feedback in update
                indices, probs = uniform_draw(uniform_key)
                return indices, probs, state.variance_reduction, jnp.asarray(False)

            indices, probs, tau, fallback = jax.lax.cond(
                on, importance_branch, uniform_branch, None
            )
            update_average = on

        ema = jnp.where(
            update_average,
            momentum * state.variance_reduction_ema + (1.0 - momentum) * tau,
            state.variance_reduction_ema,
        )
        new_state = state.replace(
            variance_reduction_ema=ema.astype(jnp.float32),
            variance_reduction=jnp.asarray(tau, jnp.float32),
            importance_sampling_on=on,
            num_fallbacks=state.num_fallbacks + fallback.astype(jnp.int32),
        )
        return indices.astype(jnp.int32), probs.astype(jnp.float32), new_state

    def update(state: AdamImptState, indices: jax.Array, feedback: jax.Array):
        _check_batch("indices", indices, num_draws)
        _check_batch("feedback", feedback, num_draws)
        if score_presample_always:
            return state.replace(step=state.step + 1)
        # K&F: while uniform, the condition learns from the training pass's scores
        uniform_phase = ~state.importance_sampling_on
        tau = variance_reduction(jnp.asarray(feedback, jnp.float32))
        ema = momentum * state.variance_reduction_ema + (1.0 - momentum) * tau
        return state.replace(
            variance_reduction_ema=jnp.where(uniform_phase, ema, state.variance_reduction_ema),
            variance_reduction=jnp.where(uniform_phase, tau, state.variance_reduction),
            step=state.step + 1,
        )

    return ScoringSampler(
        init=init,
        sample=sample,
        update=update,
        num_examples=num_examples,
        batch_size=batch_size,
        score_feedback=score_feedback,
        score_chunk_size=score_chunk_size,
    )


def gradient_norm_sampler(
    num_examples: int,
    batch_size: int,
    *,
    p_floor: float = 0.0,
    chunk_size: Optional[int] = 256,
    max_examples: int = 10_000,
    score_feedback: Union[str, FeedbackFn] = "grad_norm",
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
      ``distribution`` is the (n,) p of the latest draw. ``update`` ignores the feedback.

    Raises:
      ValueError: n > ``max_examples`` (naming both), p_floor outside [0, 1/n], or another
        argument out of range, named in the message.
    """
    _check_sizes(num_examples, batch_size)
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an int >= 1, got {max_examples!r}")
    if num_examples > max_examples:
        raise ValueError(
            f"num_examples={num_examples} exceeds max_examples={max_examples}: "
            f"gradient_norm_sampler computes the gradient norm of every one of the n examples "
            f"every step (an O(n) oracle for small data sets); pass a larger max_examples to "
            f"do it anyway"
        )
    if isinstance(p_floor, bool) or not isinstance(p_floor, (int, float)) or not (
        math.isfinite(p_floor) and p_floor >= 0
    ):
        raise ValueError(f"p_floor must be a finite number >= 0, got {p_floor!r}")
    p_floor = float(p_floor)
    if p_floor * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_floor * num_examples must be <= 1 (p_floor = 1/n is uniform), got "
            f"p_floor={p_floor} with num_examples={num_examples}"
        )
    _check_chunk_size("chunk_size", chunk_size)
    _check_score_feedback(score_feedback)
    n, num_draws = num_examples, batch_size
    proportional_mass = max(0.0, 1.0 - n * p_floor)

    def init():
        return GradientNormSamplerState(
            distribution=jnp.full((n,), 1.0 / n, jnp.float32),
            step=jnp.zeros((), jnp.int32),
            num_fallbacks=jnp.zeros((), jnp.int32),
            num_examples=num_examples,
        )

    def sample(state: GradientNormSamplerState, key: jax.Array, score_fn: ScoreFn):
        if state.num_examples != n:
            raise ValueError(
                f"state: built for num_examples={state.num_examples}, but this sampler has "
                f"num_examples={n}"
            )
        norms = _scores_of(score_fn, jnp.arange(n, dtype=jnp.int32))
        proportional, valid = _normalized(norms)
        p = jnp.where(valid, proportional_mass * proportional + p_floor, 1.0 / n)
        indices = _draw_proportional(key, p, num_draws)
        new_state = state.replace(
            distribution=p, num_fallbacks=state.num_fallbacks + (~valid).astype(jnp.int32)
        )
        return indices, p[indices], new_state

    def update(state: GradientNormSamplerState, indices: jax.Array, feedback: jax.Array):
        _check_batch("indices", indices, num_draws)
        _check_batch("feedback", feedback, num_draws)
        return state.replace(step=state.step + 1)

    return ScoringSampler(
        init=init,
        sample=sample,
        update=update,
        num_examples=num_examples,
        batch_size=batch_size,
        score_feedback=score_feedback,
        score_chunk_size=chunk_size,
    )
