"""One jitted training step with bandit sampling: sample, gather, loss, reweighted gradient,
optimizer update, sampler update — no host round-trip.

    step = make_train_step(loss_fn, optax.adam(1e-3), exp3_sampler(n, K, num_steps=T))
    state = step.init(params)       # or TrainState.create(params=, optimizer=, sampler=)
    for t in range(T):
        state, metrics = step(state, data, jax.random.fold_in(key, t))

With ``optax.adam`` and ``exp3_sampler`` this is AdamBS (Liu, Wu, Mozafari, "Adam with Bandit
Sampling for Deep Learning", NeurIPS 2020, Algorithm 1); with ``uniform_sampler`` it is plain
mini-batch training. Per step, with K the batch size and n the dataset size, the stages of
``adambs_jax.step_stages``:

    key            sample_key, model_key, score_key = jax.random.split(key, 3)
    draw           I, p_I = sampler.sample(sampler_state, sample_key); w = 1 / (n p_I);
                   batch = data[I] (gathered on device)
    estimate       G_hat = (1/K) sum_k w_k grad loss_k(params) (unbiased, eq. 1) and the
                   feedback f (K,), together (``adambs_jax.estimators``)
    guarded apply  params = params + optimizer(G_hat); sampler_state = sampler.update(
                   sampler_state, I, f) — neither if the losses, G_hat or update are not finite
    new state      the counters, the key and the metrics

Faults: a skipped step is counted in ``metrics["skipped"]`` and ``state.skipped_steps``
(``skip_non_finite=True``, the default). Scale-out: with ``mesh=``, the gathered batch is split
over the devices of a ``jax.sharding.Mesh`` and everything else is replicated
(``adambs_jax.sharding``). Checkpoints: ``adambs_jax.checkpoint``. Small models:
``steps_per_call=N`` runs N steps in one jitted ``lax.scan`` (``adambs_jax.train_loop``).
The step has no ``while_loop`` or ``cond`` of its own (a skipped sampler update is masked,
the sampler's renormalization runs every ``sampler.renormalize_every`` steps from the
``TrainStep``), so on a GPU nothing in it waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adambs_jax._checks import check_bool, check_int, check_key
from adambs_jax.feedback import ghost
from adambs_jax.feedback._kinds import FeedbackFn, feedback_kind
from adambs_jax.feedback._losses import PerExampleLoss, with_explicit_key
from adambs_jax.feedback._model_state import check_model_state_options
from adambs_jax.feedback._scoring import ScoringSampler
from adambs_jax.samplers import Sampler
from adambs_jax.samplers._base import ProbabilitiesFn
from adambs_jax.sharding import DEFAULT_DATA_AXIS, check_mesh, replicated_sharding
from adambs_jax.step._loop import run_steps
from adambs_jax.step._stages import StepConfig, run_step
from adambs_jax.step._state import TrainState, TrainStep, as_gradient_transformation

# TrainState and TrainStep live in adambs_jax.train_state, check_key in adambs_jax.checks;
# they stay importable from here.
__all__ = [
    "TrainState",
    "TrainStep",
    "make_train_step",
    "check_key",
    "step_config",
    "renormalize_fn",
    "FULL_DIAGNOSTICS_MAX_EXAMPLES",
]

FULL_DIAGNOSTICS_MAX_EXAMPLES = 65_536
"""With ``diagnostics=None``, the O(n) metrics are computed only for n up to this size."""


def _diagnostics_probabilities(sampler, diagnostics) -> ProbabilitiesFn | None:
    """The distribution the diagnostics read, or None when the step reports none."""
    if diagnostics is False or (
        diagnostics is None and sampler.num_examples > FULL_DIAGNOSTICS_MAX_EXAMPLES
    ):
        return None
    if diagnostics and sampler.probabilities is None:
        raise ValueError(
            "diagnostics=True needs a sampler with a full distribution (sampler.probabilities, "
            f"as ab.probabilities gives); this {type(sampler).__name__} has none"
        )
    return sampler.probabilities  # None (by default): a sampler without a distribution


def _extra_args_fn(optimizer, optimizer_extra_args) -> Callable[[dict], dict] | None:
    """The ``optimizer_extra_args`` option resolved: by default an optimizer that takes extra
    arguments (``optax.GradientTransformationExtraArgs``) gets ``value`` = the step's
    unbiased loss estimate, ``loss`` (for ``optax.contrib.reduce_on_plateau``)."""
    if optimizer_extra_args is None:
        if isinstance(optimizer, optax.GradientTransformationExtraArgs):
            return lambda losses: {"value": losses["loss"]}
        return None
    if not callable(optimizer_extra_args):
        raise TypeError(
            f"optimizer_extra_args must be None or a callable (dict of the step's losses) -> "
            f"dict of keyword arguments, got {type(optimizer_extra_args).__name__}"
        )

    def extra_args(losses):
        args = optimizer_extra_args(losses)
        if not isinstance(args, dict):
            raise TypeError(f"optimizer_extra_args must return a dict, got {type(args).__name__}")
        return args

    return extra_args


def _check_grad_norm_method(grad_norm_method) -> str:
    if grad_norm_method not in ghost.METHODS:
        raise ValueError(
            f"grad_norm_method must be one of {ghost.METHODS}, got {grad_norm_method!r}"
        )
    return grad_norm_method


def step_config(loss_fn, optimizer, sampler, options: dict) -> StepConfig:
    """Validates ``make_train_step``'s arguments (its Raises) and binds them."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    optimizer = as_gradient_transformation(optimizer)
    if not isinstance(sampler, (Sampler, ScoringSampler)):
        raise TypeError(
            f"sampler must be a Sampler or ScoringSampler, got {type(sampler).__name__}"
        )
    loss_fn = with_explicit_key(loss_fn, options["loss_takes_key"])
    feedback, diagnostics, mesh = options["feedback"], options["diagnostics"], options["mesh"]
    kind = feedback_kind(feedback, loss_fn)
    check_bool("reuse_per_example_grads", options["reuse_per_example_grads"])
    if diagnostics is not None and not isinstance(diagnostics, bool):
        raise TypeError(f"diagnostics must be a bool or None, got {diagnostics!r}")
    check_bool("skip_non_finite", options["skip_non_finite"])
    check_bool("jit", options["jit"])
    if mesh is not None:
        check_mesh(mesh, options["data_axis"], sampler.batch_size)
    check_model_state_options(
        loss_fn,
        feedback if isinstance(feedback, str) else None,
        options["has_aux"],
        options["model_state"],
        isinstance(sampler, ScoringSampler),
        per_example_feedback=getattr(kind, "per_example_evaluation", False),
    )
    score_feedback = feedback
    if isinstance(sampler, ScoringSampler) and sampler.score_feedback is not None:
        feedback_kind(sampler.score_feedback, loss_fn, name="sampler.score_feedback")
        score_feedback = sampler.score_feedback
    estimate = kind.estimator(
        options["reuse_per_example_grads"], _check_grad_norm_method(options["grad_norm_method"])
    )
    return StepConfig(
        loss_fn,
        optimizer,
        sampler,
        estimate,
        score_feedback,
        _diagnostics_probabilities(sampler, diagnostics),
        options["skip_non_finite"],
        mesh,
        options["data_axis"],
        _extra_args_fn(optimizer, options["optimizer_extra_args"]),
        options["has_aux"],
        options["model_state"],
    )


def make_train_step(
    loss_fn: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    sampler: Sampler | ScoringSampler,
    *,
    feedback: str | FeedbackFn = "grad_norm",
    diagnostics: bool | None = None,
    reuse_per_example_grads: bool = False,
    skip_non_finite: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = DEFAULT_DATA_AXIS,
    jit: bool = True,
    steps_per_call: int = 1,
    grad_norm_method: str = "auto",
    loss_takes_key: bool | None = None,
    optimizer_extra_args: Callable[[dict], dict] | None = None,
    has_aux: bool = False,
    model_state: bool = False,
) -> TrainStep:
    """Builds ``step(state, data, key=None) -> (state, metrics)``, one jitted call, bound to
    ``optimizer`` and ``sampler`` (a ``TrainStep``; ``step.init(params)`` makes its state).

    Args:
      loss_fn: per-example loss, ``(params, batch) -> (K,)`` or ``(params, batch, key) ->
        (K,)`` (then called with a fresh key each step, for dropout), or a
        ``ModelLoss(apply_fn, loss_from_outputs)`` (needed for ``"logit_grad_norm"``).
        ``batch`` is ``data`` gathered at the sampled indices (leaves (K, ...)).
      optimizer: any optax optimizer or wrapper (``optax.adam``: AdamBS; ``optax.sgd``,
        ``optax.adamw``, ``optax.chain(optax.clip_by_global_norm(1.0), ...)``,
        ``inject_hyperparams``, ``apply_if_finite``, ``masked``, ``contrib.schedule_free``,
        ``optax.MultiSteps`` ...), including ``ab.adambs`` / ``ab.amsgradbs`` /
        ``ab.with_importance_weighting(...)`` however wrapped. The importance weights enter
        the loss: the optimizer only ever gets the averaged unbiased gradient G_hat,
        ``optimizer.update(G_hat, opt_state, params, **extra_args)``, never ``weights``.
      sampler: ``exp3_sampler``, ``uniform_sampler``, or a ``ScoringSampler`` (its ``sample``
        gets a ``score_fn`` over the current model; see ``adambs_jax.scoring``).
      feedback: per-example score for ``sampler.update``: ``"grad_norm"`` (exact, via
        vmap), ``"logit_grad_norm"`` (Katharopoulos–Fleuret bound), ``"loss"``,
        ``"preconditioned_grad_norm"`` (||g_k / (sqrt(v_hat) + eps)|| with Adam's/RMSProp's
        v_hat from the optimizer state, ``adambs_jax.preconditioner``), or a callable
        ``(params, batch, losses) -> (K,)``. NaN, infinite or negative entries are dropped by
        the sampler and counted in ``metrics["num_dropped_feedback"]``.
      diagnostics: add the O(n) metrics ``effective_sample_size`` = 1 / (n sum_j p_j^2),
        ``max_prob``, ``min_prob`` of the sampler's distribution after the update. None
        (default): only when n <= ``FULL_DIAGNOSTICS_MAX_EXAMPLES`` (65,536), so that a step
        at large n stays O(K log n), and only for a sampler with a full distribution
        (``sampler.probabilities`` not None); True with a sampler that has none is an error.
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
        move on to a fresh batch). Costs one O(params) reduction. The sampler update gets
        ``apply=finite`` (exp3 then rewrites its K touched leaves with their old values: no
        branch, O(K log n)); a sampler whose ``update`` has no ``apply`` is selected.
        False: the update is applied whatever it is (as before; ``metrics["skipped"]`` is 0).
      mesh: a ``jax.sharding.Mesh`` for data parallelism (see ``adambs_jax.sharding``): the
        gathered batch is split along ``data_axis`` (``with_sharding_constraint``), the state,
        the dataset, the key and the metrics are replicated, and XLA inserts the all-reduce
        of the gradient and the all-gather of the feedback. ``sampler.batch_size`` must be a
        multiple of the size of ``data_axis``. Pass the state and data through
        ``ab.replicate(tree, mesh)``. None (default): no sharding annotations.
      data_axis: the mesh axis that splits the batch (default ``"data"``).
      jit: the step calls ``jax.jit(step, donate_argnums=0)`` (default; the input state's
        buffers are reused, do not touch it after the call; with ``mesh``, with replicated in
        and out shardings); False: the pure function, to compose in your own
        ``jit``/``lax.scan`` (the batch constraint of ``mesh`` is applied inside it); then
        call ``state.sampler_state = sampler.renormalize(...)`` at least every
        ``sampler.renormalize_every`` steps yourself (the jitted step's ``TrainStep`` does).
      steps_per_call: N >= 1 (default 1): one call runs N steps in one jitted ``lax.scan``
        with the keys ``jax.random.split(key, N)`` (or, with no key, the state's own key
        advanced each step) and returns every metric stacked with a leading axis N. Use it
        for small models, where dispatching a call per step costs as much as the step
        (``adambs_jax.train_loop``); results equal N single steps with those keys.

      grad_norm_method: for ``feedback="grad_norm"``: ``"auto"`` (default: ghost norms,
        ``adambs_jax.ghost``, where a layer rule covers a parameter, else ``vmap``),
        ``"ghost"`` (forced; uncovered parameters get per-example copies, with a warning) or
        ``"vmap"`` (per-example gradients by ``jax.vmap``). All are exact: the same step to
        float32 rounding.
      loss_takes_key: whether ``loss_fn`` (a ``ModelLoss``'s ``apply_fn``) takes the key as
        its third argument. None (default): guessed from the signature, counting positional
        parameters without a default (and one named ``key``/``rng``), so ``lambda p, b,
        model=model: ...`` gets no key; True/False: stated.
      optimizer_extra_args: keyword arguments for ``optimizer.update``, a callable of the
        dict ``{"loss", "sampled_loss", "losses" (K,), "weights" (K,)}`` returning a dict.
        None (default): an ``optax.GradientTransformationExtraArgs`` gets ``value=`` the
        unbiased loss estimate ``loss`` (what ``optax.contrib.reduce_on_plateau``
        needs; other optax transformations ignore it); a plain one gets none.
      has_aux: the loss returns ``(losses (K,), aux)``; ``aux`` (a pytree of arrays, of the
        batched forward at the step's parameters and model key) is ``metrics["aux"]``.
      model_state: the loss is ``(params, batch, key, model_state) -> (losses,
        new_model_state)`` (with ``has_aux``: ``-> (losses, aux, new_model_state)``; a
        ``ModelLoss``'s ``apply_fn(params, batch, key, model_state) -> (outputs,
        new_model_state)``): ``state.model_state`` goes in, the new one is kept (not on a
        skipped step). G_hat comes from one batched forward/backward (batch statistics over
        the batch); ``feedback="grad_norm"`` (per-example evaluation) and scoring samplers
        are refused (``adambs_jax.model_state``).

    Returns:
      A ``TrainStep``: ``step.init(params, key=None)`` is ``TrainState.create(params=params,
      optimizer=optimizer, sampler=sampler, key=key)``, and
      ``step(state: TrainState, data, key=None) -> (TrainState, metrics)``. ``data`` is a
      pytree of arrays with leading axis n (on device). ``key`` is split as
      ``sample_key, model_key, score_key = jax.random.split(key, 3)``; if None, the state's
      own key is split and advanced. ``metrics`` is a dict of scalars:
      ``loss`` ((1/K) sum_k w_k loss_k, unbiased for the full-data mean loss),
      ``sampled_loss`` (the plain mean of the sampled batch's losses: under a non-uniform
      sampler it is not the training loss), ``mean_feedback`` (over valid entries), ``num_dropped_feedback``
      (int32, this step), ``max_weight``/``min_weight`` (of w = 1/(n p) in the batch),
      ``skipped`` (int32, 1 if this step's update was skipped), ``skipped_steps`` (int32,
      cumulative; absent if ``state.skipped_steps`` is None), ``grad_norm_bound`` (the
      sampler's L, if it has one) and ``clipped_fraction`` (exp3: the share of this step's
      valid feedback above L), the diagnostics above, and ``aux`` (with ``has_aux``).

    Raises:
      TypeError / ValueError: bad ``loss_fn``, ``optimizer``, ``sampler``, ``feedback``,
        ``diagnostics``, ``mesh`` or ``data_axis`` at build time; bad ``state``, ``data``,
        ``key``, draws of the sampler, losses or feedback of the wrong shape at the first
        (tracing) call.

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
    options = dict(
        feedback=feedback,
        diagnostics=diagnostics,
        mesh=mesh,
        data_axis=data_axis,
        jit=jit,
        reuse_per_example_grads=reuse_per_example_grads,
        skip_non_finite=skip_non_finite,
        grad_norm_method=grad_norm_method,
        loss_takes_key=loss_takes_key,
        optimizer_extra_args=optimizer_extra_args,
        has_aux=has_aux,
        model_state=model_state,
    )
    config = step_config(loss_fn, optimizer, sampler, options)
    optimizer = config.optimizer

    steps_per_call = check_int("steps_per_call", steps_per_call)

    def step(state: TrainState, data: Any, key: jax.Array | None = None):
        if steps_per_call == 1:
            return run_step(config, state, data, key)
        return run_steps(config, steps_per_call, state, data, key)

    if not jit:
        return TrainStep(step, optimizer, sampler, steps_per_call=steps_per_call)
    return TrainStep(
        _jitted(step, mesh), optimizer, sampler, renormalize_fn(sampler, mesh), steps_per_call
    )


def _jitted(fn, mesh):
    """``jax.jit(fn, donate_argnums=0)``, with replicated shardings under ``mesh``."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    replicated = replicated_sharding(mesh)
    return jax.jit(fn, donate_argnums=0, in_shardings=replicated, out_shardings=replicated)


def renormalize_fn(sampler, mesh):
    """The jitted, donated ``state -> state`` that renormalizes ``state.sampler_state``, or
    None when the sampler needs no renormalization."""
    if not sampler.renormalize_every or sampler.renormalize is None:
        return None

    def renormalize(state: TrainState) -> TrainState:
        return state._replace(sampler_state=sampler.renormalize(state.sampler_state))

    return _jitted(renormalize, mesh)
