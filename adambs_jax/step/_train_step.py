"""One jitted training step with bandit sampling: sample, gather, loss, reweighted gradient,
optimizer update, sampler update — no host round-trip.

    step = make_train_step(loss_fn, optax.adam(1e-3), exp3_sampler(n, K, num_steps=T))
    state = step.init(params)       # or TrainState.create(params=, optimizer=, sampler=)
    for t in range(T):
        state, metrics = step(state, data, jax.random.fold_in(key, t))

With ``optax.adam`` and ``exp3_sampler`` this is AdamBS (Liu, Wu, Mozafari, "Adam with Bandit
Sampling for Deep Learning", NeurIPS 2020, Algorithm 1); with ``uniform_sampler`` it is plain
mini-batch training. Per step, with K the batch size and n the dataset size, the stages of
``_stages``:

    key            sample_key, model_key, score_key = jax.random.split(key, 3)
    draw           I, p_I = sampler.sample(sampler_state, sample_key); w = 1 / (n p_I);
                   batch = data[I] (gathered on device)
    estimate       G_hat = (1/K) sum_k w_k grad loss_k(params) (unbiased, eq. 1) and the
                   feedback f (K,), together (the feedback's estimator)
    guarded apply  params = params + optimizer(G_hat); sampler_state = sampler.update(
                   sampler_state, I, f) — neither if the losses, G_hat or update are not finite
    new state      the counters, the key and the metrics

How the step runs is one ``StepOptions`` value (``_options``): faults (a skipped step is
counted in ``metrics["skipped"]`` and ``state.skipped_steps``, ``skip_non_finite=True``),
scale-out (``mesh=``: the gathered batch is split over the devices of a
``jax.sharding.Mesh``, everything else replicated), small models (``steps_per_call=N``: N
steps in one jitted ``lax.scan``, ``_loop``). Checkpoints: ``adambs_jax.checkpoint``.
The step has no ``while_loop`` or ``cond`` of its own (a skipped sampler update is masked,
the sampler's renormalization runs every ``sampler.renormalize_every`` steps from the
``TrainStep``), so on a GPU nothing in it waits for the host.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from adambs_jax.feedback._kinds import Feedback
from adambs_jax.feedback._losses import AnyLoss, PerExampleLoss
from adambs_jax.samplers import FeedbackFn, Sampler, ScoringSampler
from adambs_jax.sharding import replicated_sharding
from adambs_jax.step._loop import run_steps
from adambs_jax.step._options import StepOptions, build_step_config, first_call_check
from adambs_jax.step._stages import run_step
from adambs_jax.step._state import TrainState, TrainStep

__all__ = ["make_train_step", "renormalize_fn"]


def make_train_step(
    loss_fn: AnyLoss | PerExampleLoss,
    optimizer: optax.GradientTransformation,
    sampler: Sampler | ScoringSampler,
    *,
    feedback: Feedback | str | FeedbackFn = "grad_norm",
    options: StepOptions | None = None,
    **option_fields: Any,
) -> TrainStep:
    """Builds ``step(state, data, key=None) -> (state, metrics)``, one jitted call, bound to
    ``optimizer`` and ``sampler`` (a ``TrainStep``; ``step.init(params)`` makes its state).

    Args:
      loss_fn: the per-example loss, which says how it is called: an ``ab.Loss(fn,
        takes_key=..., has_aux=..., model_state=...)``, an ``ab.ModelLoss(apply_fn,
        loss_from_outputs, ...)`` (needed for ``"logit_grad_norm"``), or a plain callable
        ``(params, batch[, key]) -> (K,)`` (``Loss(fn)``: the key read from its signature).
        ``batch`` is ``data`` gathered at the sampled indices (leaves (K, ...)).
      optimizer: any optax optimizer or wrapper (``optax.adam``: AdamBS; ``optax.sgd``,
        ``optax.adamw``, ``optax.chain(optax.clip_by_global_norm(1.0), ...)``,
        ``inject_hyperparams``, ``apply_if_finite``, ``masked``, ``contrib.schedule_free``,
        ``optax.MultiSteps`` ...), including ``ab.adambs`` / ``ab.amsgradbs`` /
        ``ab.with_importance_weighting(...)`` however wrapped. The importance weights enter
        the loss: the optimizer only ever gets the averaged unbiased gradient G_hat,
        ``optimizer.update(G_hat, opt_state, params, **extra_args)``, never ``weights``.
      sampler: any sampler of ``ab.samplers`` (or your own ``Sampler``), or a
        ``ScoringSampler`` (its ``sample`` gets a ``score_fn`` over the current model).
      feedback: the per-example score ``sampler.update`` learns from, an object of
        ``ab.feedback`` that carries its settings: ``GradNorm(method="auto",
        reuse_per_example_grads=False)`` (exact norms: ghost norms or ``vmap``),
        ``LogitGradNorm()`` (Katharopoulos–Fleuret bound), ``LossValue()``,
        ``PreconditionedGradNorm()`` (||g_k / (sqrt(v_hat) + eps)|| with the optimizer's
        v_hat), ``CustomFeedback(fn)``; or their shorthand names (``"grad_norm"``, the
        default, ``"logit_grad_norm"``, ``"loss"``, ``"preconditioned_grad_norm"``), or a
        callable ``(params, batch, losses) -> (K,)``. NaN, infinite or negative entries are
        dropped by the sampler and counted in ``metrics["num_dropped_feedback"]``.
      options: how the step runs, an ``ab.StepOptions`` (diagnostics, skip_non_finite, mesh,
        data_axis, jit, steps_per_call, optimizer_extra_args); None: the defaults.
      **option_fields: fields of ``StepOptions`` given as keywords, applied over ``options``
        (``make_train_step(..., steps_per_call=8)``); any other keyword is a ``TypeError``.
        The keywords of earlier releases that described the loss (``loss_takes_key``,
        ``has_aux``, ``model_state``) or the grad-norm feedback (``grad_norm_method``,
        ``reuse_per_example_grads``) still work and warn (``DeprecationWarning``); the
        latter with another feedback are refused.

    Returns:
      A ``TrainStep``: ``step.init(params, key=None)`` is ``TrainState.create(params=params,
      optimizer=optimizer, sampler=sampler, key=key)``, and
      ``step(state: TrainState, data, key=None) -> (TrainState, metrics)``. ``data`` is a
      pytree of arrays with leading axis n (on device). ``key`` is split as
      ``sample_key, model_key, score_key = jax.random.split(key, 3)``; if None, the state's
      own key is split and advanced. ``metrics`` is a dict of scalars:
      ``loss`` ((1/K) sum_k w_k loss_k, unbiased for the full-data mean loss), ``sampled_loss`` (the
      plain mean of the sampled batch's losses: under a non-uniform sampler it is not the training
      loss), ``mean_feedback`` (over valid entries), ``num_dropped_feedback`` (int32, this step),
      ``max_weight``/``min_weight`` (of w = 1/(n p) in the batch), ``skipped`` (int32, 1 if this
      step's update was skipped), ``skipped_steps`` (int32, cumulative; absent if
      ``state.skipped_steps`` is None), ``grad_norm_bound`` (the sampler's L, if it has one) and
      ``clipped_fraction`` (exp3: the share of this step's valid feedback above L; the
      sampler's ``metrics``), the diagnostics (``StepOptions.diagnostics``), and ``aux`` (a
      loss with ``has_aux``).

    Raises:
      TypeError / ValueError: bad ``loss``, ``optimizer``, ``sampler``, ``feedback``, options,
        or a combination that cannot be computed (a ``model_state`` loss with per-example
        feedback, ``"logit_grad_norm"`` without a ``ModelLoss``, ``diagnostics=True`` without
        a distribution) at build time, naming the argument; bad ``state``, ``data``, ``key``,
        draws of the sampler, losses or feedback of the wrong shape at the first (tracing)
        call.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 1 (the step), eq. 1 (G_hat) and Algorithm 2 (the feedback); Katharopoulos,
      Fleuret, "Not All Samples Are Created Equal: Deep Learning with Importance Sampling",
      ICML 2018 (``"logit_grad_norm"``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adambs_jax as ab
      >>> x = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
      >>> data = {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32)}
      >>> loss = ab.ModelLoss(lambda params, batch: batch["x"] @ params,
      ...     lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
      ...         logits, batch["y"]))
      >>> step = ab.make_train_step(loss, optax.adam(0.1), ab.exp3_sampler(8, 4, num_steps=10))
      >>> state = step.init(jnp.zeros((2, 2)))
      >>> state, metrics = step(state, data, jax.random.key(0))
      >>> int(state.step), round(float(metrics["loss"]), 4)  # log 2 at params = 0
      (1, 0.6931)
    """
    config, options, feedback = build_step_config(
        loss_fn, optimizer, sampler, feedback, options, option_fields
    )
    steps_per_call, mesh = options.steps_per_call, options.mesh

    def step(state: TrainState, data: Any, key: jax.Array | None = None):
        if steps_per_call == 1:
            return run_step(config, state, data, key)
        return run_steps(config, steps_per_call, state, data, key)

    check = first_call_check(config, feedback, gathered=False)
    if not options.jit:
        return TrainStep(
            step, config.optimizer, sampler, steps_per_call=steps_per_call, first_call_check=check
        )
    return TrainStep(
        _jitted(step, mesh, options.donate, sampler),
        config.optimizer,
        sampler,
        renormalize_fn(sampler, mesh),
        steps_per_call,
        check,
    )


def _jitted(fn, mesh, donate: bool = True, sampler=None, *, with_metrics: bool = True):
    """``jax.jit(fn, donate_argnums=0)`` (no donation with ``donate`` False), with replicated
    shardings under ``mesh``; a sampler whose ``init`` carries a ``state_sharding``
    (``ab.samplers.sharded``) keeps its state split along the mesh instead."""
    donate_argnums = 0 if donate else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    replicated = replicated_sharding(mesh)
    sampler_sharding = getattr(getattr(sampler, "init", None), "state_sharding", None)
    if sampler_sharding is None:
        return jax.jit(
            fn, donate_argnums=donate_argnums, in_shardings=replicated, out_shardings=replicated
        )
    fields = {name: replicated for name in TrainState._fields}
    state = TrainState(**{**fields, "sampler_state": sampler_sharding})
    # inputs keep their placement (replicate all but the sampler state); outputs:
    # (state, metrics) of a step, the state of a renormalization
    return jax.jit(
        fn,
        donate_argnums=donate_argnums,
        out_shardings=(state, replicated) if with_metrics else state,
    )


def renormalize_fn(sampler, mesh):
    """The jitted, donated ``state -> state`` that renormalizes ``state.sampler_state``, or
    None when the sampler needs no renormalization."""
    if not sampler.renormalize_every or sampler.renormalize is None:
        return None

    def renormalize(state: TrainState) -> TrainState:
        return state._replace(sampler_state=sampler.renormalize(state.sampler_state))

    return _jitted(renormalize, mesh, sampler=sampler, with_metrics=False)
