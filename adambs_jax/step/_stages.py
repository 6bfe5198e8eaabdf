"""The stages of one train step, as functions of the step's configuration and state.

``make_train_step`` validates its arguments into a ``StepConfig`` and binds ``run_step`` to it;
a step runs, with K the batch size and n the dataset size:

    key            ``step_key``: this step's key (the state's own key, split and advanced, if
                   the call gives none); sample_key, model_key, score_key = split(key, 3)
    draw           ``draw_batch``: I, p_I = sampler.sample(sampler_state, sample_key) (a
                   scoring sampler first scores examples with the current model);
                   w = 1 / (n p_I); batch = data[I], gathered on device
    estimate       ``config.estimate``: G_hat = (1/K) sum_k w_k grad loss_k(params) (unbiased,
                   eq. 1) and the feedback f (K,), together (``adambs_jax.feedback._estimators``;
                   only ``"preconditioned_grad_norm"``'s estimator also gets the optimizer
                   state, ``_estimator_extras``);
                   the loss's ``aux`` and new model state from the batched forward
                   (``adambs_jax.feedback._model_state``)
    guarded apply  ``guarded_apply``: params + optimizer(G_hat) (the optimizer never gets
                   the weights), sampler.update(state, I, f), both (and the new model state)
                   kept only if the losses, G_hat and the update are finite
    new state      ``step_metrics`` and ``next_state``: the metrics, counters and next key

Every stage is pure and traceable; the checks run in Python at trace time.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from adambs_jax._checks import check_key, check_state_size
from adambs_jax._tree_utils import all_finite, batch_size_of, gather, select
from adambs_jax.feedback._estimators import Estimate, EstimateFn, OptimizerAwareEstimator
from adambs_jax.feedback._losses import AnyLoss, Loss, PerExampleLoss
from adambs_jax.feedback._model_state import batch_extras, loss_parts
from adambs_jax.feedback._scoring import make_score_fn
from adambs_jax.samplers import (
    ProbabilitiesFn,
    Sampler,
    ScoringSampler,
    accepts_apply,
    importance_weights,
)
from adambs_jax.sharding import constrain_batch
from adambs_jax.step._state import TrainState
from adambs_jax.transforms import weighted_mean

__all__ = [
    "StepConfig",
    "Draw",
    "Applied",
    "step_key",
    "check_train_state",
    "draw_batch",
    "draws_valid",
    "draw_weights",
    "place_batch",
    "guarded_apply",
    "step_metrics",
    "next_state",
    "learn_from_draw",
    "run_step",
]


class StepConfig(NamedTuple):
    """Everything ``make_train_step`` fixed at build time, validated.

    ``loss``: the loss as described (``Loss`` / ``ModelLoss``); ``loss_fn``: what the estimators
    call (the losses alone, set per step by ``loss_parts``); ``estimate``: the estimator of the
    feedback kind; ``score_feedback``: what a scoring sampler scores with; ``probabilities``: the
    sampler's
    ``probabilities`` if the step reports the O(n) diagnostics, else None; ``extra_args``:
    ``{"loss", "sampled_loss", "losses", "weights"} -> dict`` of keyword arguments for
    ``optimizer.update``, or None (none).
    """

    loss_fn: PerExampleLoss
    optimizer: optax.GradientTransformation
    sampler: Sampler | ScoringSampler
    estimate: EstimateFn
    score_feedback: Any
    probabilities: ProbabilitiesFn | None
    skip_non_finite: bool
    mesh: jax.sharding.Mesh | None
    data_axis: str
    extra_args: Callable[[dict], dict] | None = None
    loss: AnyLoss | None = None

    @property
    def scoring(self) -> bool:
        return isinstance(self.sampler, ScoringSampler)

    @property
    def described_loss(self) -> AnyLoss:
        """The loss as described (its ``has_aux``, ``model_state``): ``loss``, or a plain
        ``Loss`` of ``loss_fn`` when none was given."""
        return Loss(self.loss_fn) if self.loss is None else self.loss

    @property
    def has_aux(self) -> bool:
        return self.described_loss.has_aux


def check_train_state(state, num_examples):
    """Raises TypeError / ValueError unless ``state`` is a ``TrainState`` with scalar
    counters and a sampler state of ``num_examples`` examples."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"state must be an ab.TrainState (TrainState.create(...)), got {type(state).__name__}"
        )
    if jnp.shape(state.step) != ():
        raise ValueError(f"state.step must be a scalar, got shape {jnp.shape(state.step)}")
    if state.skipped_steps is not None and jnp.shape(state.skipped_steps) != ():
        raise ValueError(
            f"state.skipped_steps must be a scalar or None, got shape "
            f"{jnp.shape(state.skipped_steps)}"
        )
    check_state_size(
        state.sampler_state, num_examples, name="state.sampler_state", owner="the step's sampler"
    )
    _check_float_params(state.params)


def _check_float_params(params):
    """Gradients need floating-point parameters: name the first integer (or bool) leaf
    instead of letting ``jax.grad`` fail without one."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"state.params: leaf {jax.tree_util.keystr(path)} has dtype {dtype}; gradients "
                f"need floating-point parameters. Keep integer state (counters, indices) out of "
                f"params, e.g. in the model state (ab.Loss(fn, model_state=True))"
            )


def _check_data(data, num_examples):
    size = batch_size_of(data, name="data")
    if size != num_examples:
        raise ValueError(
            f"data: every leaf must have leading axis n = sampler.num_examples = "
            f"{num_examples}, got {size}"
        )


def step_key(
    state_key: jax.Array | None, key: jax.Array | None
) -> tuple[jax.Array | None, jax.Array]:
    """Stage "key": ``(the state's next key, this step's key)``; the state's own key is split
    and advanced when the step gets none."""
    if key is None:
        if state_key is None:
            raise ValueError(
                "key: pass a PRNG key to the step, or create the state with "
                "TrainState.create(..., key=...)"
            )
        check_key(state_key, name="state.key")
        state_key, key = jax.random.split(state_key)
    else:
        check_key(key, name="key")
    # a key in both branches (pyright types the items of split's Array as Any, so key stays
    # Array | None)
    return state_key, cast(jax.Array, key)


class Draw(NamedTuple):
    """The batch of one step: indices I (K,), weights w = 1 / (n p_I) (K,), ``data[I]``, and
    the sampler state after ``sample`` (a scoring sampler's may have changed)."""

    indices: jax.Array
    weights: jax.Array
    batch: Any
    sampled_state: Any


def _check_draws(indices, probs, batch_size):
    if jnp.shape(indices) != (batch_size,) or jnp.shape(probs) != (batch_size,):
        raise ValueError(
            f"sampler.sample must return indices and probs of shape ({batch_size},) "
            f"(sampler.batch_size), got {jnp.shape(indices)} and {jnp.shape(probs)}"
        )
    if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
        raise TypeError(
            f"sampler.sample must return integer indices, got {jnp.result_type(indices)}"
        )


def draw_batch(config: StepConfig, state: TrainState, data, sample_key, score_key) -> Draw:
    """Stage "draw": sample (a scoring sampler scores with the current model), weigh, gather."""
    sampler = config.sampler
    if isinstance(sampler, ScoringSampler):  # config.scoring, narrowing the sampler's type
        score_fn = make_score_fn(
            config.loss_fn,
            config.score_feedback,
            state.params,
            data,
            score_key,
            chunk_size=sampler.score_chunk_size,
        )
        indices, probs, sampled_state = sampler.sample(state.sampler_state, sample_key, score_fn)
    else:
        indices, probs = sampler.sample(state.sampler_state, sample_key)
        sampled_state = state.sampler_state
    weights = draw_weights(config, indices, probs)
    batch = place_batch(config, gather(data, indices))
    return Draw(indices, weights, batch, sampled_state)


def draws_valid(indices, probs, num_examples: int) -> jax.Array:
    """On the device: a bool scalar, every index in [0, n) and every p in (0, 1] (the
    weight 1/(n p) of a draw is defined only then; a sampler state gone bad gives NaN p)."""
    in_range = (indices >= 0) & (indices < num_examples)
    return jnp.all(in_range) & jnp.all((probs > 0) & (probs <= 1))


def draw_weights(config: StepConfig, indices, probs) -> jax.Array:
    """The importance weights w = 1 / (n p_I) (K,) of draws ``indices`` made with the
    probabilities ``probs``, after checking their shapes; no gradient flows into them."""
    _check_draws(indices, probs, config.sampler.batch_size)
    return jax.lax.stop_gradient(importance_weights(probs, config.sampler.num_examples))


def place_batch(config: StepConfig, batch):
    """The gathered batch, split over the mesh's data axis when the step has a mesh."""
    if config.mesh is not None:  # per-example work split over the devices; the rest replicated
        batch = constrain_batch(batch, config.mesh, config.data_axis)
    return batch


def _optimizer_update(config: StepConfig, estimate: Estimate, weights, opt_state, params):
    """``(updates, opt_state, G_hat)``: the optimizer gets only the averaged gradient G_hat
    (never ``weights``; the per-example gradients of ``reuse_per_example_grads`` are averaged
    here), so every optax wrapper sees G_hat, and ``config.extra_args`` of the losses (the
    ``value=`` of ``optax.contrib.reduce_on_plateau``)."""
    gradient = estimate.gradient
    if estimate.per_example:
        gradient = weighted_mean(gradient, weights)
    extra_args = {}
    if config.extra_args is not None:
        losses = estimate.losses
        extra_args = config.extra_args(
            {
                "loss": jnp.mean(weights.astype(losses.dtype) * losses),
                "sampled_loss": jnp.mean(losses),
                "losses": losses,
                "weights": weights,
            }
        )
    updates, opt_state = config.optimizer.update(gradient, opt_state, params, **extra_args)
    return updates, opt_state, gradient


def _feedback_scores(estimate: Estimate, indices) -> jax.Array:
    """The (K,) float32 feedback for ``sampler.update`` (no gradient flows into it)."""
    scores = jax.lax.stop_gradient(estimate.feedback)
    if jnp.shape(scores) != indices.shape:
        raise ValueError(
            f"feedback must give one score per example, shape {indices.shape}, "
            f"got {jnp.shape(scores)}"
        )
    return scores.astype(jnp.float32)


def _update_sampler(config: StepConfig, state, draw: Draw, scores, apply, finite):
    """``sampler.update(..., apply=apply)``: the state bitwise unchanged when ``apply`` is
    False, with no ``while_loop`` or ``cond`` (a data-dependent branch makes XLA:GPU copy its
    predicate to the host every step, docs/performance.md). A plain sampler masks its own update
    (exp3 rewrites the K touched leaves, O(K log n)); a scoring sampler's ``sample`` already
    changed its state, so the step selects between the updated and the step's input state
    (O(state): the library's scoring samplers hold O(n) at most and score n examples anyway).

    Every read of the tree (the draws, p_I, the weights) must be scheduled before its
    in-place write, or XLA copies the O(n) tree every step. What orders them is that
    ``apply`` depends on the whole gradient computation (with ``skip_non_finite=False`` it
    is ``finite | optimization_barrier(True)``: a constant True brought two tree copies back,
    docs/performance.md, "Non-finite guard"); the sampler state also enters the update
    through an ``optimization_barrier`` with ``finite``, to keep that order explicit (no
    copies either way in the measurement; ``test_the_compiled_step_does_not_copy_the_tree``).
    """
    sampler = config.sampler
    sampler_state, apply, _ = jax.lax.optimization_barrier((state.sampler_state, apply, finite))
    state = state._replace(sampler_state=sampler_state)
    if not config.scoring and accepts_apply(sampler.update):
        return sampler.update(state.sampler_state, draw.indices, scores, apply=apply)
    source = draw.sampled_state if config.scoring else state.sampler_state
    return select(apply, sampler.update(source, draw.indices, scores), state.sampler_state)


class Applied(NamedTuple):
    """The guarded updates of one step and its feedback; ``skipped``: int32, 1 if the
    updates were not applied."""

    params: Any
    opt_state: Any
    sampler_state: Any
    scores: jax.Array
    skipped: jax.Array


def guarded_apply(config: StepConfig, state: TrainState, draw: Draw, estimate) -> Applied:
    """Stage "guarded apply": the optimizer and sampler updates, kept only if the losses,
    G_hat and the optimizer's update are all finite (``skip_non_finite``)."""
    updates, opt_state, gradient = _optimizer_update(
        config, estimate, draw.weights, state.opt_state, state.params
    )
    params = optax.apply_updates(state.params, updates)
    scores = _feedback_scores(estimate, draw.indices)
    finite = all_finite(estimate.losses, gradient, updates)
    if config.skip_non_finite:
        params = select(finite, params, state.params)
        opt_state = select(finite, opt_state, state.opt_state)
        apply = finite
    else:  # always True, but not a constant XLA could fold (see _update_sampler)
        apply = finite | jax.lax.optimization_barrier(jnp.asarray(True))
    sampler_state = _update_sampler(config, state, draw, scores, apply, finite)
    finite = finite if config.skip_non_finite else jnp.asarray(True)
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    return Applied(params, opt_state, sampler_state, scores, skipped)


def step_metrics(
    estimate: Estimate, weights, feedback, sampler_state, probabilities, sampler_metrics=None
) -> dict:
    """The step's metrics (``make_train_step``'s Returns), diagnostics from ``probabilities``
    and the sampler's own scalars from ``sampler_metrics`` (``Sampler.metrics``)."""
    losses = estimate.losses.astype(jnp.float32)
    valid = jnp.isfinite(feedback) & (feedback >= 0)
    num_valid = jnp.sum(valid)
    metrics = {
        # the headline loss is unbiased for the full-data mean loss; the raw mean of the
        # sampled batch overstates it under a non-uniform sampler
        "loss": jnp.mean(weights * losses),
        "sampled_loss": jnp.mean(losses),
        "mean_feedback": jnp.sum(jnp.where(valid, feedback, 0.0)) / jnp.maximum(num_valid, 1),
        "num_dropped_feedback": (feedback.shape[0] - num_valid).astype(jnp.int32),
        "max_weight": jnp.max(weights),
        "min_weight": jnp.min(weights),
    }
    if sampler_metrics is not None:  # the sampler's own scalars (exp3: its bound L)
        metrics.update(sampler_metrics(sampler_state, feedback))
    if probabilities is not None:
        p = probabilities(sampler_state)
        metrics["effective_sample_size"] = 1.0 / (p.shape[0] * jnp.sum(jnp.square(p)))
        metrics["max_prob"] = jnp.max(p)
        metrics["min_prob"] = jnp.min(p)
    return metrics


def next_state(state: TrainState, applied: Applied, state_key, metrics: dict, model_state=None):
    """Stage "new state": the counters (``step``, ``skipped_steps``), the next key and the
    model state (``model_state``: the step's new one, or None to keep the state's)."""
    metrics["skipped"] = applied.skipped
    skipped_steps = state.skipped_steps
    if skipped_steps is not None:
        skipped_steps = skipped_steps + applied.skipped
        metrics["skipped_steps"] = skipped_steps
    if model_state is None:
        model_state = state.model_state
    else:  # kept only with the update: a skipped step leaves the model state too
        model_state = select(applied.skipped == 0, model_state, state.model_state)
    new_state = TrainState(
        params=applied.params,
        opt_state=applied.opt_state,
        sampler_state=applied.sampler_state,
        step=state.step + 1,
        key=state_key,
        skipped_steps=skipped_steps,
        model_state=model_state,
    )
    return new_state, metrics


def _estimator_extras(config: StepConfig, state: TrainState) -> dict:
    """``opt_state=`` for an estimator that reads the optimizer state
    (``"preconditioned_grad_norm"``); nothing for the others, whose programs are unchanged."""
    if isinstance(config.estimate, OptimizerAwareEstimator):
        return {"opt_state": state.opt_state}
    return {}


def learn_from_draw(config: StepConfig, state: TrainState, draw: Draw, parts, model_key, state_key):
    """Stages estimate, guarded apply, metrics and new state, for a drawn batch: shared by
    the step over the whole dataset (``run_step``) and the step on a gathered batch
    (``adambs_jax.host``). ``parts``: ``_model_state.loss_parts`` of the step's loss."""
    estimate = config.estimate(
        config.loss_fn,
        state.params,
        draw.batch,
        draw.weights,
        model_key,
        **_estimator_extras(config, state),
    )
    aux, model_state = batch_extras(parts, state.params, draw.batch, model_key)
    applied = guarded_apply(config, state, draw, estimate)
    metrics = step_metrics(
        estimate,
        draw.weights,
        applied.scores,
        applied.sampler_state,
        config.probabilities,
        config.sampler.metrics,
    )
    if config.has_aux:
        metrics["aux"] = aux
    return next_state(state, applied, state_key, metrics, model_state)


def run_step(config: StepConfig, state: TrainState, data: Any, key: jax.Array | None):
    """One step: key, draw, estimate, guarded apply, new state."""
    num_examples = config.sampler.num_examples
    check_train_state(state, num_examples)
    _check_data(data, num_examples)
    state_key, key = step_key(state.key, key)
    sample_key, model_key, score_key = jax.random.split(key, 3)
    parts = loss_parts(config.described_loss, state.model_state)
    config = config._replace(loss_fn=parts.losses_only)
    draw = draw_batch(config, state, data, sample_key, score_key)
    new_state, metrics = learn_from_draw(config, state, draw, parts, model_key, state_key)
    # a sampler state gone bad draws NaN or 0 probabilities: the step is skipped, and says why
    valid = jnp.all(jnp.isfinite(draw.weights) & (draw.weights > 0))
    metrics["invalid_draws"] = jnp.logical_not(valid).astype(jnp.int32)
    return new_state, metrics
