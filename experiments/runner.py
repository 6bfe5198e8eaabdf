"""Runs an :class:`~experiments.configs.ExperimentConfig` and writes ``results/<run>/``.

For every method the training steps run in timed chunks of ``ab.make_train_step(...,
jit=False)``: a ``jax.lax.scan`` of about ``chunk_steps`` steps that keeps a copy of the
parameters every ``eval_every`` steps, or, on CPU for models with convolutions, a Python loop
of ``eval_every`` calls of one jitted step (see :func:`choose_loop`). The chunk (or step) is
compiled once per method, ahead of time (``jit(...).lower(...).compile()``, reported as
``compile_s``), and reused for every seed: seeds change the initial state and keys, not
shapes. All methods are compiled first; then, seed after seed, every method runs in turn
(interleaved, so slow drifts of the machine's speed hit all methods alike). Every method of
a seed starts from the same parameters, and step t of a run uses the key
``fold_in(train_key(seed), t)`` whichever way it is chunked. After each timed chunk, a
separate jitted function evaluates the kept parameters (training loss and error on the
training set, test loss and error), untimed.

**What the wall-clock means.** Each chunk call is timed with ``time.perf_counter`` around
the call and ``jax.block_until_ready`` of its output state; the time per step is chunk time /
chunk length, and a run's wall-clock at step t is the sum of the per-step times of steps
1..t (inside a chunk, time is attributed to its steps evenly). It counts everything a
training step does on the device (sampling, gathering, forward/backward passes, the
feedback, the optimizer and sampler updates) plus the dispatch of the chunk (of every step,
in the Python loop). It excludes compilation, two untimed warm-up chunks per method,
evaluation (and the sampler diagnostics, which are O(n)), and Python between chunks. A scan
pays Python dispatch once per chunk, not once per step, so absolute times are lower than an
eager step-by-step loop's (e.g. Lahire's PyTorch timings); compare methods by ratios.

Outputs (:func:`write_outputs`): ``metrics.jsonl`` (one line per method x seed x evaluation
point), ``summary.json``, ``table.md``, ``loss_vs_time.png``, ``loss_vs_steps.png``,
``error_vs_steps.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adambs_jax as ab
from experiments import aggregate
from experiments.machine import machine_info, versions
from experiments.configs import ExperimentConfig
from experiments.methods import build_method, method_available, method_spec

# ----------------------------------------------------------------------------- losses


def uses_dropout(model) -> bool:
    """Whether a Flax module has a positive ``*dropout*`` field (then it needs a key)."""
    for field in dataclasses.fields(model):
        if "dropout" in field.name:
            value = getattr(model, field.name, 0)
            if isinstance(value, (int, float)) and value > 0:
                return True
    return False


def per_example_loss_from_outputs(task: str) -> Callable:
    """``(outputs, batch) -> (K,)``: softmax CE with integer labels, or sigmoid BCE."""
    if task == "classification":
        return lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"])
    if task == "binary":
        return lambda logits, batch: optax.sigmoid_binary_cross_entropy(
            logits, batch["y"].astype(logits.dtype))
    raise ValueError(f"unknown task {task!r}")


def make_model_loss(model, task: str) -> ab.ModelLoss:
    """The per-example training loss split at the logits (so ``logit_grad_norm`` works).

    ``apply_fn(params, batch[, key])`` runs the model in training mode; models with dropout
    get ``rngs={"dropout": key}`` (the step passes a fresh key every step).
    """
    if uses_dropout(model):
        def apply_fn(params, batch, key):
            return model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": key})
    else:
        def apply_fn(params, batch):
            return model.apply({"params": params}, batch["x"], train=True)
    return ab.ModelLoss(apply_fn, per_example_loss_from_outputs(task))


def make_evaluator(model, task: str, batch_size: int) -> Callable:
    """``evaluate(params, x, y) -> (mean loss, error rate)``, jitted, in eval mode.

    Runs over ``x`` in batches of ``batch_size`` (``lax.map``; the last batch padded and
    masked), so the memory stays bounded on large datasets.
    """
    loss_from_outputs = per_example_loss_from_outputs(task)

    def per_example(params, x, y):
        logits = model.apply({"params": params}, x, train=False)
        losses = loss_from_outputs(logits, {"y": y})
        if task == "classification":
            wrong = jnp.argmax(logits, axis=-1) != y
        else:
            wrong = (logits > 0).astype(jnp.int32) != y
        return losses.astype(jnp.float32), wrong.astype(jnp.float32)

    @jax.jit
    def evaluate(params, x, y):
        num = x.shape[0]
        if num <= batch_size:
            losses, wrong = per_example(params, x, y)
            return jnp.mean(losses), jnp.mean(wrong)
        num_batches = math.ceil(num / batch_size)
        pad = num_batches * batch_size - num
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
        mask = (jnp.arange(num_batches * batch_size) < num).astype(jnp.float32)
        xs = xs.reshape(num_batches, batch_size, *x.shape[1:])
        ys = ys.reshape(num_batches, batch_size)
        losses, wrong = jax.lax.map(lambda b: per_example(params, *b), (xs, ys))
        mask = mask.reshape(num_batches, batch_size)
        return jnp.sum(losses * mask) / num, jnp.sum(wrong * mask) / num

    return evaluate


@jax.jit
def _distribution_stats(p):
    n = p.shape[0]
    return {
        "effective_sample_size": 1.0 / (n * jnp.sum(jnp.square(p))),
        "max_prob_times_n": jnp.max(p) * n,
        "min_prob_times_n": jnp.min(p) * n,
    }


def sampler_diagnostics(sampler_state) -> dict:
    """What a sampler has learned, for ``metrics.jsonl`` (computed at chunk ends, untimed).

    exp3 (AdamBS) and p^GN: the effective sample size 1/(n sum p^2) (1 = uniform) and n max p,
    n min p of the full distribution (O(n)); Adam-impt: whether importance sampling is on and
    the moving average of the variance-reduction estimate. {} for the uniform sampler.
    """
    if isinstance(sampler_state, ab.Exp3SamplerState):
        p = ab.probabilities(sampler_state)
    elif hasattr(sampler_state, "distribution"):  # gradient_norm_sampler
        p = sampler_state.distribution
    elif hasattr(sampler_state, "importance_sampling_on"):  # adam_impt_sampler
        return {
            "importance_sampling_on": float(sampler_state.importance_sampling_on),
            "variance_reduction_ema": float(sampler_state.variance_reduction_ema),
        }
    else:
        return {}
    return {k: float(v) for k, v in _distribution_stats(p).items()}


# ----------------------------------------------------------------------------- chunks


def make_chunk(step: Callable, interval: int, num_intervals: int) -> Callable:
    """``chunk(state, data, run_key) -> (state, params_stack, metrics_stack)``.

    ``num_intervals * interval`` training steps in one nested ``lax.scan``; after every
    ``interval`` steps the parameters are kept (``params_stack``: every leaf gets a leading
    ``num_intervals`` axis), to be evaluated after the timed call. Step t uses the key
    ``fold_in(run_key, t)`` (t = ``state.step``), so a run's keys do not depend on how it is
    cut into chunks. ``metrics_stack[name]`` is ``(num_intervals,)``: the mean of the step's
    metric over each interval (the max for ``max_weight``, the sum for
    ``num_dropped_feedback``).
    """
    def chunk(state, data, run_key):
        def one_step(state, _):
            return step(state, data, jax.random.fold_in(run_key, state.step))

        def one_interval(state, _):
            state, metrics = jax.lax.scan(one_step, state, None, length=interval)
            out = {name: jnp.mean(value.astype(jnp.float32)) for name, value in metrics.items()}
            if "max_weight" in metrics:
                out["max_weight"] = jnp.max(metrics["max_weight"])
            if "num_dropped_feedback" in metrics:
                out["num_dropped_feedback"] = jnp.sum(
                    metrics["num_dropped_feedback"]).astype(jnp.float32)
            return state, (state.params, out)

        state, (params_stack, metrics_stack) = jax.lax.scan(
            one_interval, state, None, length=num_intervals)
        return state, params_stack, metrics_stack

    return chunk


def chunk_plan(num_steps: int, eval_every: int, chunk_steps: int) -> list[tuple[int, int]]:
    """The chunks of a run as ``(interval, num_intervals)`` pairs.

    Evaluation points fall every ``eval_every`` steps (and at the last step). A chunk holds
    ``num_intervals`` intervals of ``eval_every`` steps, the largest divisor of the number
    of full intervals that is <= ``chunk_steps // eval_every`` (so all full chunks have one
    shape: one compilation); a remainder of fewer than ``eval_every`` steps is a last chunk
    of its own.
    """
    num_steps, eval_every = int(num_steps), int(eval_every)
    full, rest = divmod(num_steps, eval_every)
    plan = []
    if full:
        target = max(1, min(full, int(chunk_steps) // eval_every))
        per_chunk = max(d for d in range(1, target + 1) if full % d == 0)
        plan += [(eval_every, per_chunk)] * (full // per_chunk)
    if rest:
        plan.append((rest, 1))
    return plan


def eval_points(plan: Sequence[tuple[int, int]]) -> list[int]:
    """Step 0 and the step after every interval of ``plan``."""
    steps = [0]
    for interval, count in plan:
        for _ in range(count):
            steps.append(steps[-1] + interval)
    return steps


LOOPS = ("auto", "scan", "python")


def has_convolution(loss, params, batch) -> bool:
    """Whether the gradient of ``loss`` contains a convolution (from its jaxpr)."""
    key = jax.random.key(0)
    jaxpr = jax.make_jaxpr(lambda p: jax.grad(lambda q: jnp.sum(loss(q, batch, key)))(p))(params)
    return "conv_general_dilated" in str(jaxpr)


def choose_loop(loop: str, loss, params, batch) -> str:
    """``"scan"`` or ``"python"`` for ``loop="auto"``.

    XLA's CPU backend runs the *backward pass of a convolution* inside a while loop (a
    ``lax.scan``) about 20x slower than outside one (measured here: digits-cnn, 195 ms vs
    9 ms per step; forward convolutions and dense layers are unaffected). So on CPU a model
    whose gradient contains a convolution runs its chunks as a Python loop of one jitted
    step per call (``"python"``, one dispatch per step, included in the timed time);
    everything else runs as a ``lax.scan`` (``"scan"``).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if loop != "auto":
        return loop
    if jax.default_backend() != "cpu":
        return "scan"
    return "python" if has_convolution(loss, params, batch) else "scan"


def compile_chunks(step: Callable, plan, loop: str, example_args) -> dict:
    """``{(interval, count): chunk}`` with ``chunk(state, data, run_key) -> (state,
    params_stack or None, metrics)``, compiled ahead of time.

    ``"scan"``: one compiled ``make_chunk`` per distinct shape; ``metrics`` is a dict of
    ``(count,)`` arrays. ``"python"``: one compiled step (key ``fold_in(run_key, t)`` as in
    the scan), called ``interval * count`` times; ``params_stack`` is None (the caller
    takes the final parameters) and ``metrics`` the list of the steps' metric dicts.
    """
    if loop == "scan":
        return {
            shape: jax.jit(make_chunk(step, *shape), donate_argnums=0)
            .lower(*example_args).compile()
            for shape in sorted(set(plan))
        }

    def keyed_step(state, data, run_key):
        return step(state, data, jax.random.fold_in(run_key, state.step))

    compiled_step = jax.jit(keyed_step, donate_argnums=0).lower(*example_args).compile()

    def python_chunk(num_steps):
        def chunk(state, data, run_key):
            metrics = []
            for _ in range(num_steps):
                state, step_metrics = compiled_step(state, data, run_key)
                metrics.append(step_metrics)
            return state, None, metrics

        return chunk

    return {shape: python_chunk(shape[0] * shape[1]) for shape in sorted(set(plan))}


def reduce_step_metrics(metrics_list: list[dict]) -> dict:
    """The per-interval reduction of ``make_chunk`` for a list of per-step metric dicts."""
    values = jax.device_get(metrics_list)
    out = {}
    for name in values[0]:
        column = np.asarray([v[name] for v in values], dtype=np.float64)
        if name == "max_weight":
            out[name] = [column.max()]
        elif name == "num_dropped_feedback":
            out[name] = [column.sum()]
        else:
            out[name] = [column.mean()]
    return out


def make_stack_evaluator(evaluate: Callable) -> Callable:
    """``evaluate_stack(params_stack, x, y) -> (losses (k,), errors (k,))``, one call for the
    k parameter snapshots of a chunk (``lax.map``: one snapshot at a time in memory)."""
    @jax.jit
    def evaluate_stack(params_stack, x, y):
        return jax.lax.map(lambda params: evaluate(params, x, y), params_stack)

    return evaluate_stack


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class MethodResult:
    name: str
    label: str
    settings: dict
    compile_s: float
    warmup_s: float
    steps: list[int]
    times: np.ndarray        # (S, P) cumulative training seconds at each eval point
    train_loss: np.ndarray   # (S, P)
    train_error: np.ndarray
    test_loss: np.ndarray
    test_error: np.ndarray
    step_times: np.ndarray   # (S,) seconds per step (mean over the run)
    chunk_times: list        # per seed: the timed chunk durations
    final_diagnostics: list = dataclasses.field(default_factory=list)  # per seed, at the end


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="chunk", dynamic_ncols=True, file=sys.stderr)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


@dataclasses.dataclass
class Setup:
    """Everything the methods of a run share (built once by :func:`prepare`)."""

    config: ExperimentConfig
    dataset: Any
    num_steps: int
    loss: ab.ModelLoss
    data: dict
    initial_params: dict      # seed -> params (the same for every method)
    loop: str                 # "scan" or "python"
    plan: list                # [(interval, count)] per chunk
    steps_at: list            # evaluation steps, 0 first
    eval_sets: dict           # split -> (x, y) on device
    evaluate_stack: Callable
    initial_eval: dict        # seed -> evaluation at step 0
    eval_compile_s: float

    @property
    def seeds(self) -> list[int]:
        return list(range(self.config.num_seeds))

    def train_key(self, seed: int) -> jax.Array:
        return jax.random.split(jax.random.key(seed))[1]

    def evaluate_all(self, params_stack) -> dict:
        """``{train,test}_{loss,error}``: numpy arrays, one entry per parameter snapshot."""
        out = {}
        for split, (x, y) in self.eval_sets.items():
            losses, errors = jax.device_get(self.evaluate_stack(params_stack, x, y))
            out[f"{split}_loss"], out[f"{split}_error"] = losses, errors
        return out


def prepare(config: ExperimentConfig, data_dir=None) -> Setup:
    """Loads the data, builds the model and loss, the initial parameters of every seed,
    the chunk plan and the (compiled) evaluation."""
    from experiments.data import load_dataset
    from experiments.models import get_model, init_params

    dataset = load_dataset(config.dataset, data_dir=data_dir, subset=config.subset,
                           seed=config.dataset_seed, **dict(config.dataset_options))
    n = dataset.num_train
    num_steps = config.steps_for(n)
    model = get_model(config.model, dataset.num_classes, **dict(config.model_options))
    loss = make_model_loss(model, dataset.task)
    data = {"x": jnp.asarray(dataset.x_train), "y": jnp.asarray(dataset.y_train)}
    example = jnp.asarray(dataset.x_train[:2])
    initial_params = {}
    for seed in range(config.num_seeds):  # the same initialization for every method of a seed
        init_key, _ = jax.random.split(jax.random.key(seed))
        initial_params[seed] = init_params(model, init_key, example)
    loop = choose_loop(config.loop, loss, initial_params[0],
                       jax.tree.map(lambda leaf: leaf[:2], data))
    # python loop: one chunk per evaluation interval (its parameters are evaluated between)
    plan = chunk_plan(num_steps, config.eval_every,
                      config.chunk_steps if loop == "scan" else config.eval_every)

    num_eval_train = n if config.eval_train_examples is None else min(n, config.eval_train_examples)
    eval_sets = {
        "train": (dataset.x_train[:num_eval_train], dataset.y_train[:num_eval_train]),
        "test": (dataset.x_test, dataset.y_test),
    }
    if config.eval_informative_only:  # drop all-zero feature vectors (constant loss)
        eval_sets = {split: (x[keep], y[keep]) for split, (x, y) in eval_sets.items()
                     for keep in [np.any(x.reshape(len(x), -1) != 0, axis=1)]}
    eval_sets = {split: (jnp.asarray(x), jnp.asarray(y)) for split, (x, y) in eval_sets.items()}
    evaluate_stack = make_stack_evaluator(
        make_evaluator(model, dataset.task, config.eval_batch_size))
    setup = Setup(
        config=config, dataset=dataset, num_steps=num_steps, loss=loss, data=data,
        initial_params=initial_params, loop=loop, plan=plan, steps_at=eval_points(plan),
        eval_sets=eval_sets, evaluate_stack=evaluate_stack, initial_eval={}, eval_compile_s=0.0,
    )
    started = time.perf_counter()  # the first evaluation compiles it
    setup.initial_eval = {
        seed: setup.evaluate_all(jax.tree.map(lambda leaf: leaf[None], params))
        for seed, params in initial_params.items()
    }
    setup.eval_compile_s = time.perf_counter() - started
    return setup


WARMUP_CHUNKS = 2  # untimed chunk calls per method before its timed runs


class MethodRun:
    """One method of a run: built and compiled once (``__init__``), then run seed by seed
    (``run_seed``), its curves and rows accumulated for :meth:`result`."""

    def __init__(self, setup: Setup, name: str):
        config, seeds = setup.config, setup.seeds
        self.setup, self.name = setup, name
        self.built = build_method(
            name, num_examples=setup.dataset.num_train, batch_size=config.batch_size,
            num_steps=setup.num_steps, learning_rate=config.learning_rate,
            feedback=config.feedback, options=config.method_options.get(name),
        )
        step = ab.make_train_step(setup.loss, self.built.optimizer, self.built.sampler,
                                  feedback=self.built.feedback, diagnostics=False, jit=False)
        example_args = (self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0]))
        started = time.perf_counter()
        self.compiled = compile_chunks(step, setup.plan, setup.loop, example_args)
        self.compile_s = time.perf_counter() - started
        started = time.perf_counter()  # untimed calls: first-execution costs (allocations, ...)
        for _ in range(WARMUP_CHUNKS):
            jax.block_until_ready(self.compiled[setup.plan[0]](
                self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0])))
        self.warmup_s = time.perf_counter() - started
        shape = (len(seeds), len(setup.steps_at))
        self.curves = {key: np.zeros(shape) for key in
                       ("time_s", "train_loss", "train_error", "test_loss", "test_error")}
        self.step_times = np.zeros(len(seeds))
        self.chunk_times, self.final_diagnostics, self.rows = [], [], []

    def new_state(self, seed: int) -> ab.TrainState:
        return ab.TrainState.create(params=self.setup.initial_params[seed],
                                    optimizer=self.built.optimizer, sampler=self.built.sampler)

    def run_seed(self, seed: int, bar=None) -> None:
        """Trains one seed from the shared initialization; records curves and rows."""
        setup, name, curves = self.setup, self.name, self.curves
        s_i, steps_at = setup.seeds.index(seed), setup.steps_at
        state, key = self.new_state(seed), setup.train_key(seed)
        first = setup.initial_eval[seed]
        for k, v in first.items():
            curves[k][s_i, 0] = v[0]
        self.rows.append({"method": name, "seed": seed, "step": 0, "time_s": 0.0,
                          **{k: _round(v[0]) for k, v in first.items()}})
        elapsed, point, chunk_times, diagnostics = 0.0, 1, [], {}
        for interval, count in setup.plan:
            t0 = time.perf_counter()
            state, params_stack, metrics = self.compiled[(interval, count)](state, setup.data, key)
            jax.block_until_ready(state)
            dt = time.perf_counter() - t0
            # --- untimed from here on
            chunk_times.append(dt)
            if params_stack is None:  # python loop: one interval per chunk
                params_stack = jax.tree.map(lambda leaf: leaf[None], state.params)
                metrics = reduce_step_metrics(metrics)
            evals = setup.evaluate_all(params_stack)
            metrics = jax.device_get(metrics)
            diagnostics = sampler_diagnostics(state.sampler_state)
            for j in range(count):
                elapsed += dt / count  # time attributed evenly to the chunk's steps
                curves["time_s"][s_i, point] = elapsed
                for k, v in evals.items():
                    curves[k][s_i, point] = v[j]
                row = {"method": name, "seed": seed, "step": steps_at[point],
                       "time_s": _round(elapsed),
                       **{k: _round(v[j]) for k, v in evals.items()},
                       **{f"batch_{k}": _round(v[j]) for k, v in metrics.items()}}
                if j == count - 1:  # the sampler's state exists at chunk ends only
                    row["chunk_time_s"] = _round(dt)
                    row.update({k: _round(v) for k, v in diagnostics.items()})
                self.rows.append(row)
                point += 1
            if bar is not None:
                bar.update(1)
        self.step_times[s_i] = sum(chunk_times) / setup.num_steps
        self.chunk_times.append(chunk_times)
        self.final_diagnostics.append(diagnostics)

    def result(self) -> MethodResult:
        c = self.curves
        return MethodResult(
            name=self.name, label=self.built.label, settings=self.built.settings,
            compile_s=self.compile_s, warmup_s=self.warmup_s, steps=list(self.setup.steps_at),
            times=c["time_s"], train_loss=c["train_loss"], train_error=c["train_error"],
            test_loss=c["test_loss"], test_error=c["test_error"], step_times=self.step_times,
            chunk_times=self.chunk_times, final_diagnostics=self.final_diagnostics,
        )


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs ``config`` and writes its results under ``out_dir``; returns the summary dict.

    Raises:
      FileNotFoundError: the dataset's files are missing (from ``load_dataset``).
      RuntimeError: a method's sampler is missing from the installed ``adambs_jax``.
    """
    for name in config.methods:
        method_spec(name)  # KeyError early on a typo
        if not method_available(name):
            raise RuntimeError(
                f"method {name!r} needs ab.{method_spec(name).requires}, which the installed "
                "adambs_jax does not have"
            )
    started = time.perf_counter()
    setup = prepare(config, data_dir)
    n, plan = setup.dataset.num_train, setup.plan
    log(f"[{config.name}] {config.dataset}: n = {n} train / {setup.dataset.num_test} test, "
        f"model {config.model}, K = {config.batch_size}, lr = {config.learning_rate:g}, "
        f"{setup.num_steps} steps x {config.num_seeds} seeds x {len(config.methods)} methods, "
        f"eval every {config.eval_every} steps, {plan[0][0] * plan[0][1]} steps per timed "
        f"chunk ({'one lax.scan' if setup.loop == 'scan' else 'a Python loop of jitted steps'}); "
        f"device {jax.devices()[0].device_kind}")

    # all methods compiled first, then seeds outer and methods inner: the methods of a seed
    # run back to back, so slow drifts of the machine's speed hit every method alike
    method_runs = []
    for name in config.methods:
        log(f"  compiling {name} ...")
        method_runs.append(MethodRun(setup, name))
    bar = _progress(len(config.methods) * config.num_seeds * len(plan), progress)
    try:
        for seed in setup.seeds:
            for method_run in method_runs:
                if bar is not None:
                    bar.set_description(f"seed {seed} {method_run.name}")
                method_run.run_seed(seed, bar)
    finally:
        if bar is not None:
            bar.close()
    results = [method_run.result() for method_run in method_runs]
    rows = [row for method_run in method_runs for row in method_run.rows]
    resolved = {
        "num_train": n, "num_test": setup.dataset.num_test,
        "num_eval_train": int(setup.eval_sets["train"][0].shape[0]),
        "num_eval_test": int(setup.eval_sets["test"][0].shape[0]),
        "num_classes": setup.dataset.num_classes, "task": setup.dataset.task,
        "num_steps": setup.num_steps, "loop": setup.loop,
        "chunk_plan": [list(c) for c in sorted(set(plan))], "num_chunks": len(plan),
        "eval_steps": list(setup.steps_at), "seeds": setup.seeds,
        "dataset_description": setup.dataset.description,
        "eval_compile_s": setup.eval_compile_s,
        "train_and_eval_wall_s": time.perf_counter() - started,
    }
    summary = build_summary(config, resolved, results)
    write_outputs(Path(out_dir), config, summary, rows, results)
    summary["total_wall_s"] = time.perf_counter() - started
    return summary


# ----------------------------------------------------------------------------- outputs

TIMING_NOTE = (
    "Wall-clock at step t = sum of the per-step times of steps 1..t; per-step time = "
    "(perf_counter time around one timed chunk + block_until_ready) / chunk length. A chunk "
    "is one jitted lax.scan of about chunk_steps steps (resolved.loop = 'scan'), or a Python "
    "loop of eval_every calls of one jitted step ('python': chosen on CPU for models with "
    "convolutions, whose backward pass XLA:CPU runs ~20x slower inside a loop). Excluded: "
    "compilation (compile_s, ahead of time, once per method, reused for all seeds), two "
    "untimed warm-up chunks per method, evaluation, Python between chunks. With 'scan' the "
    "Python dispatch is paid once per chunk, so absolute times are below those of an eager "
    "step-by-step loop; compare methods by the ratios measured here."
)


def build_summary(config: ExperimentConfig, resolved: dict, results: Sequence[MethodResult]) -> dict:
    methods = {}
    for r in results:
        agg = aggregate.method_aggregates(
            steps=r.steps, times=r.times, train_loss=r.train_loss, test_error=r.test_error,
            train_error=r.train_error, step_times=r.step_times, compile_s=r.compile_s,
            target_loss=config.target_loss,
        )
        if r.final_diagnostics and r.final_diagnostics[0]:
            agg["final_sampler_diagnostics"] = {
                key: aggregate.mean_std_dict([d[key] for d in r.final_diagnostics])
                for key in r.final_diagnostics[0]
            }
        agg.update(label=r.label, settings=r.settings, warmup_s=r.warmup_s,
                   description=method_spec(r.name).description, source=method_spec(r.name).source)
        methods[r.name] = agg
    return {
        "config": config.to_json(),
        "resolved": resolved,
        "versions": versions(),
        "machine": machine_info(),
        "timing_note": TIMING_NOTE,
        "methods": methods,
    }


def markdown_table(config: ExperimentConfig, summary: dict) -> str:
    """``table.md``: one row per method (and Lahire's Table 1 layout if configured)."""
    res = summary["resolved"]
    lines = [
        f"# {config.name}",
        "",
        config.description,
        "",
        f"{config.dataset} (n = {res['num_train']}), model {config.model}, K = {config.batch_size}, "
        f"lr = {config.learning_rate}, {res['num_steps']} steps, {len(res['seeds'])} seeds "
        f"(mean ± std over seeds). Device: {summary['machine']['jax_device_kind']} "
        f"({summary['machine']['cpu_model']}, {summary['machine']['cpu_count']} cores).",
        "",
        f"Evaluated every {config.eval_every} steps: training loss on "
        + (f"the {res['num_eval_train']} training examples with a nonzero feature vector"
           if config.eval_informative_only else
           f"the first {res['num_eval_train']} training examples" if config.eval_train_examples
           else f"all {res['num_eval_train']} training examples")
        + f", test error on {res['num_eval_test']} test examples"
        + (" (with a nonzero feature vector)." if config.eval_informative_only else ".")
        + f" Steps run as {res['loop']!r} chunks (see Timing).",
        "",
    ]
    target = config.target_loss
    header = ["method", "final train loss", "final test error (%)"]
    if target is not None:
        header += [f"time to loss ≤ {target:g} (s)", f"steps to loss ≤ {target:g}"]
    header += ["time / step (ms)", "train time / run (s)", "compile (s)"]
    show_ess = any("effective_sample_size" in m.get("final_sampler_diagnostics", {})
                   for m in summary["methods"].values())
    if show_ess:
        header.append("final ESS of p")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in summary["methods"].items():
        row = [
            f"{m['label']} (`{name}`)",
            aggregate.format_mean_std(m["final_train_loss"]),
            aggregate.format_mean_std(m["final_test_error"], scale=100),
        ]
        if target is not None:
            for key, fmt in (("time_to_target_s", "{:.3g} ± {:.2g}"), ("steps_to_target", "{:.0f} ± {:.0f}")):
                t = m[key]
                if t["reached"]:
                    row.append(fmt.format(t["mean"], t["std"]) + f" ({t['reached']}/{t['num_seeds']})")
                else:
                    row.append(f"never (0/{t['num_seeds']})")
        row += [
            aggregate.format_mean_std(m["time_per_step_s"], scale=1e3),
            aggregate.format_mean_std(m["train_time_per_run_s"]),
            f"{m['compile_s']:.2f}",
        ]
        if show_ess:
            ess = m.get("final_sampler_diagnostics", {}).get("effective_sample_size")
            row.append(aggregate.format_mean_std(ess) if ess else "—")
        lines.append("| " + " | ".join(row) + " |")
    diverged = {name: m["num_diverged"] for name, m in summary["methods"].items() if m["num_diverged"]}
    if diverged:
        lines += ["", f"Diverged (non-finite final loss) seeds: {diverged}."]
    if show_ess:
        lines += ["", "Final ESS of p: effective sample size 1/(n sum_j p_j^2) of the sampler's "
                  "distribution at the end of training (1 = uniform; smaller = more concentrated)."]
    if target is not None:
        lines += ["", f"Time/steps to target: mean ± std over the seeds that reached a full "
                  f"training loss ≤ {target:g} (evaluated every {config.eval_every} steps), "
                  "and how many did."]
    if config.table_layout == "lahire":
        lines += ["", lahire_table(summary)]
    lines += ["", "Timing: " + summary["timing_note"], ""]
    return "\n".join(lines)


def lahire_table(summary: dict) -> str:
    """Lahire's Table 1 layout: wall-clock per run (s), rows sampling, columns optimizer."""
    methods = summary["methods"]
    optimizers = [o for o in ("sgd", "rmsprop", "adam") if o in methods or f"{o}-gn" in methods]
    lines = [
        "Wall-clock time (s) per run (Lahire Table 1 layout; mean ± std over seeds):",
        "",
        "| sampling | " + " | ".join(o.upper() if o == "sgd" else o.capitalize() if o == "adam"
                                    else "RMSProp" for o in optimizers) + " |",
        "|" + "---|" * (len(optimizers) + 1),
    ]
    for sampling, suffix in (("u", ""), ("p^GN", "-gn")):
        cells = []
        for o in optimizers:
            m = methods.get(o + suffix)
            cells.append(aggregate.format_mean_std(m["train_time_per_run_s"]) if m else "—")
        lines.append(f"| {sampling} | " + " | ".join(cells) + " |")
    if "adambs" in methods:
        lines += ["", "AdamBS: " + aggregate.format_mean_std(methods["adambs"]["train_time_per_run_s"])
                  + " s per run."]
    return "\n".join(lines)


def write_outputs(out_dir: Path, config: ExperimentConfig, summary: dict, rows: list[dict],
                  results: Sequence[MethodResult]) -> None:
    from experiments import plotting

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(_json_safe(row)) + "\n")
    table = markdown_table(config, summary)
    (out_dir / "table.md").write_text(table)
    summary["files"] = {
        "metrics": "metrics.jsonl", "table": "table.md",
        "plots": plotting.plot_all(out_dir, config, summary),
    }
    with open(out_dir / "summary.json", "w") as f:
        json.dump(_json_safe(summary), f, indent=1)


def _json_safe(obj: Any):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj
