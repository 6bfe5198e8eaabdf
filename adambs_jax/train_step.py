"""One jitted training step with bandit sampling: sample, gather, loss, reweighted gradient,
optimizer update, sampler update — no host round-trip.

    step = make_train_step(loss_fn, optax.adam(1e-3), exp3_sampler(n, K, num_steps=T))
    state = TrainState.create(params=params, optimizer=optax.adam(1e-3), sampler=sampler)
    for t in range(T):
        state, metrics = step(state, data, jax.random.fold_in(key, t))

With ``optax.adam`` and ``exp3_sampler`` this is AdamBS (Liu, Wu, Mozafari, "Adam with Bandit
Sampling for Deep Learning", NeurIPS 2020, Algorithm 1); with ``uniform_sampler`` it is plain
mini-batch training. Per step, with K the batch size and n the dataset size:

    sample_key, model_key, score_key = jax.random.split(key, 3)
    I, p_I  = sampler.sample(sampler_state, sample_key)       # (K,), (K,)
    w       = 1 / (n p_I)                                      # importance weights
    batch   = data[I]                                          # gathered on device
    G_hat   = (1/K) sum_k w_k grad loss_k(params)              # unbiased (eq. 1)
    params  = params + optimizer(G_hat)
    sampler_state = sampler.update(sampler_state, I, f)        # f: per-example feedback

The gradient and the feedback are computed together, once:

* ``"grad_norm"``: per-example gradients by ``vmap(grad)`` for the norms, and G_hat from one
  more ``jax.grad`` of the weighted loss (faster or equal on CPU: XLA reduces each
  per-example gradient to its norm without storing K x params floats);
  ``reuse_per_example_grads=True`` instead averages the stored per-example gradients;
* ``"logit_grad_norm"``: one forward pass, d loss_k / d logits by a backward pass through the
  loss only, then one backward pass through the model with cotangent (w_k / K) d loss_k /
  d logits_k, which is G_hat — about the cost of one plain step;
* ``"loss"`` and callables: G_hat = grad of (1/K) sum_k w_k loss_k (one ``jax.grad``), and the
  feedback from the per-example losses.

Faults: a step whose losses, G_hat or update are not finite changes nothing (params,
optimizer and sampler state) and is counted in ``metrics["skipped"]`` and
``state.skipped_steps`` (``skip_non_finite=True``, the default). Scale-out: with
``mesh=``, the gathered batch is split over the devices of a ``jax.sharding.Mesh`` and
everything else is replicated (``adambs_jax.sharding``). Checkpoints: ``adambs_jax.checkpoint``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from adambs_jax.feedback import (
    FeedbackFn,
    batch_size_of,
    check_feedback_kind,
    losses_and_output_grads,
    per_example_losses,
    per_example_losses_and_grads,
    tree_norms,
)
from adambs_jax.losses import ModelLoss, PerExampleLoss, check_losses, with_key_argument
from adambs_jax.samplers import Sampler, importance_weights, probabilities
from adambs_jax.scoring import ScoringSampler, gather, make_score_fn
from adambs_jax.sharding import DEFAULT_DATA_AXIS, check_mesh, constrain_batch, replicated_sharding
from adambs_jax.transforms import ImportanceWeightedTransformation, weighted_mean

__all__ = ["TrainState", "make_train_step", "check_key", "FULL_DIAGNOSTICS_MAX_EXAMPLES"]

FULL_DIAGNOSTICS_MAX_EXAMPLES = 65_536
"""With ``diagnostics=None``, the O(n) metrics are computed only for n up to this size."""


class TrainState(NamedTuple):
    """Everything a training step updates; a pytree (checkpoint it with
    ``ab.save_checkpoint`` / ``ab.restore_checkpoint``, which use orbax).

    Attributes:
      params: the model parameters (any pytree).
      opt_state: the optax state of ``optimizer.init(params)``.
      sampler_state: the sampler's state (``sampler.init()``).
      step: int32 scalar, number of steps taken, skipped ones included (see
        ``make_train_step``'s ``skip_non_finite``).
      key: optional PRNG key; used (and advanced) by a step called without a key.
      skipped_steps: int32 scalar, cumulative number of steps whose update was skipped
        because the loss, gradient or update was not finite; ``TrainState.create`` sets it to
        0. None (a state built by hand without it): the step keeps it None and reports only
        the per-step ``metrics["skipped"]``.
    """

    params: Any
    opt_state: Any
    sampler_state: Any
    step: jax.Array
    key: Optional[jax.Array] = None
    skipped_steps: Optional[jax.Array] = None

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        optimizer: optax.GradientTransformation,
        sampler: Union[Sampler, ScoringSampler],
        key: Optional[jax.Array] = None,
    ) -> "TrainState":
        """A fresh state: ``optimizer.init(params)``, ``sampler.init()``, step 0, no
        skipped steps.

        ``params`` (and ``key``) are copied: the train step donates its state, and the
        caller's arrays must survive that.

        Raises:
          TypeError: ``optimizer`` is not an optax transformation, or ``sampler`` has no
            ``init``.
          ValueError: ``key`` is not a PRNG key (a typed key of shape () from
            ``jax.random.key`` or a raw uint32 key of shape (m,) from ``jax.random.PRNGKey``).
        """
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
            )
        if not callable(getattr(sampler, "init", None)):
            raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}")
        if key is not None:
            check_key(key, name="key")
        params = jax.tree.map(jnp.copy, params)
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            sampler_state=sampler.init(),
            step=jnp.zeros((), jnp.int32),
            key=None if key is None else jnp.copy(key),
            skipped_steps=jnp.zeros((), jnp.int32),
        )


def check_key(key: Any, *, name: str = "key") -> None:
    """Raises ValueError (naming ``name``) unless ``key`` is a PRNG key: a typed key array of
    shape () (``jax.random.key``) or a raw uint32 key of shape (m,) (``jax.random.PRNGKey``)."""
    shape, dtype = jnp.shape(key), getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"{name} must be a single PRNG key of shape (), got a key array of shape {shape}"
            )
        return
    if dtype != jnp.uint32 or len(shape) != 1:
        raise ValueError(
            f"{name} must be a PRNG key (jax.random.key(seed), or a raw uint32 key of shape "
            f"(m,) from jax.random.PRNGKey), got shape {shape} and dtype {dtype}"
        )


class _Estimate(NamedTuple):
    """The gradient and feedback of one batch (internal).

    losses: (K,). gradient: G_hat (per_example=False) or the per-example gradients with a
    leading K axis (per_example=True). feedback: (K,).
    """

    losses: jax.Array
    gradient: Any
    feedback: jax.Array
    per_example: bool


def _estimate_with_per_example_grads(loss_fn, params, batch, weights, key):
    losses, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
    return _Estimate(losses, grads, tree_norms(grads), per_example=True)


def _estimate_with_grad_norms_and_weighted_loss(loss_fn, params, batch, weights, key):
    # the per-example gradients only feed the norms, so XLA can reduce them as they are
    # produced instead of materializing K x params; G_hat is one more (cheap) backward pass
    _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)

    def weighted_loss(p):
        losses = per_example_losses(loss_fn, p, batch, key)  # same per-example keys
        return jnp.mean(weights.astype(losses.dtype) * losses), losses

    (_, losses), gradient = jax.value_and_grad(weighted_loss, has_aux=True)(params)
    return _Estimate(losses, gradient, tree_norms(grads), per_example=False)


def _estimate_with_logit_bound(model_loss: ModelLoss, params, batch, weights, key):
    outputs, model_pullback = jax.vjp(lambda p: model_loss.outputs(p, batch, key), params)
    losses, output_grads = losses_and_output_grads(model_loss, outputs, batch)
    scale = weights.astype(jnp.float32) / weights.shape[0]

    def weighted_cotangent(g):  # row k scaled by w_k / K
        return g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

    (gradient,) = model_pullback(jax.tree.map(weighted_cotangent, output_grads))
    return _Estimate(losses, gradient, tree_norms(output_grads), per_example=False)


def _estimator_with_weighted_loss(feedback: Union[str, FeedbackFn]):
    def estimate(loss_fn, params, batch, weights, key):
        loss = with_key_argument(loss_fn)
        batch_size = weights.shape[0]

        def weighted_loss(p):
            losses = check_losses(loss(p, batch, key), batch_size)
            return jnp.mean(weights.astype(losses.dtype) * losses), losses

        (_, losses), gradient = jax.value_and_grad(weighted_loss, has_aux=True)(params)
        if isinstance(feedback, str):  # "loss"
            scores = losses
        else:
            scores = feedback(params, batch, losses)
        return _Estimate(losses, gradient, scores, per_example=False)

    return estimate


def _estimator(feedback, reuse_per_example_grads):
    if isinstance(feedback, str) and feedback == "grad_norm":
        if reuse_per_example_grads:
            return _estimate_with_per_example_grads
        return _estimate_with_grad_norms_and_weighted_loss
    if isinstance(feedback, str) and feedback == "logit_grad_norm":
        return _estimate_with_logit_bound
    return _estimator_with_weighted_loss(feedback)


def _optimizer_update(optimizer, estimate: _Estimate, weights, opt_state, params):
    """Feeds G_hat to a plain optimizer, or per-example grads + weights to an
    ``ImportanceWeightedTransformation`` (``adambs``, ``with_importance_weighting(...)``)."""
    if isinstance(optimizer, ImportanceWeightedTransformation):
        if estimate.per_example:
            per_example, batch_weights = estimate.gradient, weights
        else:  # G_hat already averaged: a batch of one with weight 1 leaves it unchanged
            per_example = jax.tree.map(lambda g: g[None], estimate.gradient)
            batch_weights = jnp.ones((1,), weights.dtype)
        return optimizer.update(per_example, opt_state, params, weights=batch_weights)
    gradient = estimate.gradient
    if estimate.per_example:
        gradient = weighted_mean(gradient, weights)
    return optimizer.update(gradient, opt_state, params)


def _check_data(data, num_examples):
    size = batch_size_of(data, name="data")
    if size != num_examples:
        raise ValueError(
            f"data: every leaf must have leading axis n = sampler.num_examples = "
            f"{num_examples}, got {size}"
        )


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


def _metrics(estimate, weights, feedback, sampler_state, full_diagnostics, explicit):
    losses = estimate.losses.astype(jnp.float32)
    valid = jnp.isfinite(feedback) & (feedback >= 0)
    num_valid = jnp.sum(valid)
    metrics = {
        "loss": jnp.mean(losses),
        "weighted_loss": jnp.mean(weights * losses),
        "mean_feedback": jnp.sum(jnp.where(valid, feedback, 0.0)) / jnp.maximum(num_valid, 1),
        "num_dropped_feedback": (feedback.shape[0] - num_valid).astype(jnp.int32),
        "max_weight": jnp.max(weights),
        "min_weight": jnp.min(weights),
    }
    bound = getattr(sampler_state, "grad_norm_bound", None)
    if bound is not None:
        metrics["grad_norm_bound"] = jnp.asarray(bound, jnp.float32)
    if full_diagnostics:
        try:
            p = probabilities(sampler_state)
        except TypeError:
            if explicit:
                raise ValueError(
                    "diagnostics=True needs a sampler state with a full distribution "
                    f"(ab.probabilities); {type(sampler_state).__name__} has none"
                ) from None
            return metrics
        metrics["effective_sample_size"] = 1.0 / (p.shape[0] * jnp.sum(jnp.square(p)))
        metrics["max_prob"] = jnp.max(p)
        metrics["min_prob"] = jnp.min(p)
    return metrics


def _all_finite(*trees) -> jax.Array:
    """True iff every floating-point entry of every leaf is finite (O(size), one reduction)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not checks:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(checks))


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(pred, on_true, on_false)`` (typed PRNG keys via their data)."""

    def select(new, old):
        if jax.dtypes.issubdtype(jnp.result_type(new), jax.dtypes.prng_key):
            data = jnp.where(pred, jax.random.key_data(new), jax.random.key_data(old))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
        return jnp.where(pred, new, old)

    return jax.tree.map(select, on_true, on_false)


def _update_sampler_if(apply, update, state, sampled_state, indices, scores, scoring):
    """``update(sampled_state, indices, scores)`` if ``apply``, else ``state`` unchanged.

    A ``lax.while_loop`` that runs once or not at all, not ``jnp.where`` (which would read
    and write the whole (n,)-sized sampler state every step) nor ``lax.cond`` (XLA copies
    buffers through a conditional's branches): the loop's carry is updated in place, so the
    guard adds no O(n) work (docs/performance.md, "Sampler" and "Non-finite guard").
    """

    def body(carry):
        current, _ = carry
        source = sampled_state if scoring else current  # a plain sampler's sample keeps it
        return update(source, indices, scores), jnp.asarray(False)

    new_state, _ = jax.lax.while_loop(lambda carry: carry[1], body, (state, apply))
    return new_state


def _check_state(state, num_examples):
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
    state_examples = getattr(state.sampler_state, "num_examples", None)
    if isinstance(state_examples, int) and state_examples != num_examples:
        raise ValueError(
            f"state.sampler_state: built for num_examples={state_examples}, but the step's "
            f"sampler has num_examples={num_examples}"
        )


def make_train_step(
    loss_fn: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    sampler: Union[Sampler, ScoringSampler],
    *,
    feedback: Union[str, FeedbackFn] = "grad_norm",
    diagnostics: Optional[bool] = None,
    reuse_per_example_grads: bool = False,
    skip_non_finite: bool = True,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: str = DEFAULT_DATA_AXIS,
    jit: bool = True,
) -> Callable[..., tuple[TrainState, dict]]:
    """Builds ``step(state, data, key=None) -> (state, metrics)``, one jitted call.

    Args:
      loss_fn: per-example loss, ``(params, batch) -> (K,)`` or ``(params, batch, key) ->
        (K,)`` (then called with a fresh key each step, for dropout), or a
        ``ModelLoss(apply_fn, loss_from_outputs)`` (needed for ``"logit_grad_norm"``).
        ``batch`` is ``data`` gathered at the sampled indices (leaves (K, ...)).
      optimizer: any optax optimizer of the averaged gradient (``optax.adam``: AdamBS;
        ``optax.sgd``, ``optax.rmsprop``, ``optax.amsgrad``, ``optax.adamw``, ...), or one
        that takes per-example gradients and ``weights`` (``adambs``, ``amsgradbs``,
        ``with_importance_weighting(...)``); both give the same step.
      sampler: ``exp3_sampler``, ``uniform_sampler``, or a ``ScoringSampler`` (its ``sample``
        gets a ``score_fn`` over the current model; see ``adambs_jax.scoring``).
      feedback: per-example score for ``sampler.update``: ``"grad_norm"`` (exact, via
        vmap), ``"logit_grad_norm"`` (Katharopoulos–Fleuret bound), ``"loss"``, or a callable
        ``(params, batch, losses) -> (K,)``. NaN, infinite or negative entries are dropped by
        the sampler and counted in ``metrics["num_dropped_feedback"]``.
      diagnostics: add the O(n) metrics ``effective_sample_size`` = 1 / (n sum_j p_j^2),
        ``max_prob``, ``min_prob`` of the sampler's distribution after the update. None
        (default): only when n <= ``FULL_DIAGNOSTICS_MAX_EXAMPLES`` (65,536), so that a step
        at large n stays O(K log n).
      reuse_per_example_grads: only for ``feedback="grad_norm"``. False (default): G_hat
        is one more ``jax.grad`` of the weighted loss, and XLA reduces the per-example
        gradients to their norms without storing them. True: G_hat is the weighted mean of
        the K per-example gradients that give the norms (no second gradient computation,
        but the K x params gradients are materialized). Which is faster depends on the
        model and device: on CPU, False was 1.8x faster for an MLP and the same for a small
        CNN (docs/performance.md).
      skip_non_finite: (default True) if any per-example loss, any entry of the gradient
        G_hat or of the optimizer's update is NaN or infinite, the step changes neither
        ``params`` nor ``opt_state`` nor ``sampler_state`` (like ``optax.apply_if_finite``),
        reports ``metrics["skipped"] = 1`` and adds 1 to ``state.skipped_steps``; ``step``
        still advances by 1 (it counts calls, so keys derived from it and the state's own key
        move on to a fresh batch). Costs one O(params) reduction. The sampler update is
        skipped by a zero-or-one-iteration ``lax.while_loop``, so it stays O(K log n).
        False: the update is applied whatever it is (as before; ``metrics["skipped"]`` is 0).
      mesh: a ``jax.sharding.Mesh`` for data parallelism (see ``adambs_jax.sharding``): the
        gathered batch is split along ``data_axis`` (``with_sharding_constraint``), the state,
        the dataset, the key and the metrics are replicated, and XLA inserts the all-reduce
        of the gradient and the all-gather of the feedback. ``sampler.batch_size`` must be a
        multiple of the size of ``data_axis``. Pass the state and data through
        ``ab.replicate(tree, mesh)``. None (default): no sharding annotations.
      data_axis: the mesh axis that splits the batch (default ``"data"``).
      jit: return ``jax.jit(step, donate_argnums=0)`` (default; the input state's buffers
        are reused, do not touch it after the call; with ``mesh``, with replicated in and
        out shardings); False returns the pure function, to compose in your own
        ``jit``/``lax.scan`` (the batch constraint of ``mesh`` is applied inside it).

    Returns:
      ``step(state: TrainState, data, key=None) -> (TrainState, metrics)``. ``data`` is a
      pytree of arrays with leading axis n (on device). ``key`` is split as
      ``sample_key, model_key, score_key = jax.random.split(key, 3)``; if None, the state's
      own key is split and advanced. ``metrics`` is a dict of scalars:
      ``loss`` (batch mean of the losses), ``weighted_loss`` ((1/K) sum_k w_k loss_k, unbiased
      for the full-data loss), ``mean_feedback`` (over valid entries), ``num_dropped_feedback``
      (int32, this step), ``max_weight``/``min_weight`` (of w = 1/(n p) in the batch),
      ``skipped`` (int32, 1 if this step's update was skipped), ``skipped_steps`` (int32,
      cumulative; absent if ``state.skipped_steps`` is None), ``grad_norm_bound`` (the
      sampler's L, if it has one), and the diagnostics above.

    Raises:
      TypeError / ValueError: bad ``loss_fn``, ``optimizer``, ``sampler``, ``feedback``,
        ``mesh`` or ``data_axis`` at build time; bad ``state``, ``data``, ``key``, draws of
        the sampler, losses or feedback of the wrong shape at the first (tracing) call.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    if not isinstance(sampler, (Sampler, ScoringSampler)):
        raise TypeError(
            f"sampler must be a Sampler or ScoringSampler, got {type(sampler).__name__}"
        )
    check_feedback_kind(feedback, loss_fn)
    if not isinstance(reuse_per_example_grads, bool):
        raise TypeError(f"reuse_per_example_grads must be a bool, got {reuse_per_example_grads!r}")
    if diagnostics is not None and not isinstance(diagnostics, bool):
        raise TypeError(f"diagnostics must be a bool or None, got {diagnostics!r}")
    if not isinstance(skip_non_finite, bool):
        raise TypeError(f"skip_non_finite must be a bool, got {skip_non_finite!r}")
    if not isinstance(jit, bool):
        raise TypeError(f"jit must be a bool, got {jit!r}")
    if mesh is not None:
        check_mesh(mesh, data_axis, sampler.batch_size)
    scoring = isinstance(sampler, ScoringSampler)
    score_feedback = feedback
    if scoring and sampler.score_feedback is not None:
        check_feedback_kind(sampler.score_feedback, loss_fn, name="sampler.score_feedback")
        score_feedback = sampler.score_feedback
    num_examples = sampler.num_examples
    full_diagnostics = (
        diagnostics if diagnostics is not None else num_examples <= FULL_DIAGNOSTICS_MAX_EXAMPLES
    )
    estimate_fn = _estimator(feedback, reuse_per_example_grads)

    def step(state: TrainState, data: Any, key: Optional[jax.Array] = None):
        _check_state(state, num_examples)
        _check_data(data, num_examples)
        state_key = state.key
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
        sample_key, model_key, score_key = jax.random.split(key, 3)

        if scoring:
            score_fn = make_score_fn(
                loss_fn, score_feedback, state.params, data, score_key,
                chunk_size=sampler.score_chunk_size,
            )
            indices, probs, sampled_state = sampler.sample(
                state.sampler_state, sample_key, score_fn
            )
        else:
            indices, probs = sampler.sample(state.sampler_state, sample_key)
            sampled_state = state.sampler_state
        _check_draws(indices, probs, sampler.batch_size)
        weights = jax.lax.stop_gradient(importance_weights(probs, num_examples))
        batch = gather(data, indices)
        if mesh is not None:  # per-example work split over the devices; the rest replicated
            batch = constrain_batch(batch, mesh, data_axis)

        estimate = estimate_fn(loss_fn, state.params, batch, weights, model_key)
        updates, opt_state = _optimizer_update(
            optimizer, estimate, weights, state.opt_state, state.params
        )
        params = optax.apply_updates(state.params, updates)

        scores = jax.lax.stop_gradient(estimate.feedback)
        if jnp.shape(scores) != indices.shape:
            raise ValueError(
                f"feedback must give one score per example, shape {indices.shape}, "
                f"got {jnp.shape(scores)}"
            )
        scores = scores.astype(jnp.float32)
        finite = _all_finite(estimate.losses, estimate.gradient, updates)
        if skip_non_finite:
            params = _select(finite, params, state.params)
            opt_state = _select(finite, opt_state, state.opt_state)
            apply_update = finite
        else:
            # always True, yet neither a constant (XLA would inline the loop) nor independent
            # of the gradient: see below
            apply_update = finite | jax.lax.optimization_barrier(jnp.asarray(True))
            finite = jnp.asarray(True)
        # The sampler update runs in a loop whose predicate depends on the whole gradient
        # computation. Besides skipping, this orders the in-place write of the sampler's tree
        # after every read of it; a bare update made XLA copy the (2 capacity,) tree twice
        # per step (2 x 8 MB at n = 10^6; docs/performance.md, "Non-finite guard").
        sampler_state = _update_sampler_if(
            apply_update, sampler.update, state.sampler_state, sampled_state, indices, scores,
            scoring,
        )
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        metrics = _metrics(
            estimate, weights, scores, sampler_state, full_diagnostics, diagnostics is True
        )
        metrics["skipped"] = skipped
        skipped_steps = state.skipped_steps
        if skipped_steps is not None:
            skipped_steps = skipped_steps + skipped
            metrics["skipped_steps"] = skipped_steps
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            sampler_state=sampler_state,
            step=state.step + 1,
            key=state_key,
            skipped_steps=skipped_steps,
        )
        return new_state, metrics

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = replicated_sharding(mesh)
    return jax.jit(
        step, donate_argnums=0, in_shardings=replicated, out_shardings=replicated
    )
