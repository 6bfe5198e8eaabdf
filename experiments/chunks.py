"""Chunk execution: the jitted chunks of training steps a run is cut into, and their timing.

A run's steps run in chunks of ``ab.make_train_step(..., jit=False)``: a ``jax.lax.scan``
of about ``chunk_steps`` steps that keeps a copy of the parameters every ``eval_every``
steps, or, on CPU for models with convolutions, a Python loop of ``eval_every`` calls of one
jitted step (see :func:`choose_loop`). Step t of a run uses the key ``fold_in(run_key, t)``
whichever way it is chunked. The per-step metrics are reduced over each evaluation interval
as :data:`METRIC_REDUCTIONS` says (the same table inside the scan and for the Python loop).

**What the wall-clock means** (:func:`timed_call`). Each chunk call is timed with
``time.perf_counter`` around the call and ``jax.block_until_ready`` of its output state; the
time per step is chunk time / chunk length. It counts everything a training step does on the
device (sampling, gathering, forward/backward passes, the feedback, the optimizer and
sampler updates) plus the dispatch of the chunk (of every step, in the Python loop). A scan
pays Python dispatch once per chunk, not once per step, so absolute times are lower than an
eager step-by-step loop's (e.g. Lahire's PyTorch timings); compare methods by ratios.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- metric reductions


class Reduction(NamedTuple):
    """How a step metric is reduced over an evaluation interval: ``on_device`` inside the scan
    (jnp, over the interval's ``(interval,)`` values), ``on_host`` for the Python loop (numpy,
    over the float64 column of the interval's values)."""

    on_device: Callable
    on_host: Callable


MEAN = Reduction(lambda values: jnp.mean(values.astype(jnp.float32)), np.mean)
MAX = Reduction(jnp.max, np.max)
SUM = Reduction(lambda values: jnp.sum(values).astype(jnp.float32), np.sum)

METRIC_REDUCTIONS: dict[str, Reduction] = {
    "max_weight": MAX,             # the largest importance weight of the interval
    "num_dropped_feedback": SUM,   # a count: how many draws' feedback was dropped
}
"""The metrics not reduced by their mean (every other metric: :data:`MEAN`)."""


def reduction_of(name: str) -> Reduction:
    """The reduction of step metric ``name`` (:data:`METRIC_REDUCTIONS`, else the mean)."""
    return METRIC_REDUCTIONS.get(name, MEAN)


def reduce_step_metrics(metrics_list: list[dict]) -> dict:
    """The per-interval reduction of ``make_chunk`` for a list of per-step metric dicts."""
    values = jax.device_get(metrics_list)
    out = {}
    for name in values[0]:
        column = np.asarray([v[name] for v in values], dtype=np.float64)
        out[name] = [reduction_of(name).on_host(column)]
    return out


# ----------------------------------------------------------------------------- chunks


def make_chunk(step: Callable, interval: int, num_intervals: int) -> Callable:
    """``chunk(state, data, run_key) -> (state, params_stack, metrics_stack)``.

    ``num_intervals * interval`` training steps in one nested ``lax.scan``; after every
    ``interval`` steps the parameters are kept (``params_stack``: every leaf gets a leading
    ``num_intervals`` axis), to be evaluated after the timed call. Step t uses the key
    ``fold_in(run_key, t)`` (t = ``state.step``), so a run's keys do not depend on how it is
    cut into chunks. ``metrics_stack[name]`` is ``(num_intervals,)``: the step's metric
    reduced over each interval (:func:`reduction_of`: the mean, the max for ``max_weight``,
    the sum for ``num_dropped_feedback``).
    """
    def chunk(state, data, run_key):
        def one_step(state, _):
            return step(state, data, jax.random.fold_in(run_key, state.step))

        def one_interval(state, _):
            state, metrics = jax.lax.scan(one_step, state, None, length=interval)
            out = {name: reduction_of(name).on_device(value) for name, value in metrics.items()}
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


def timed_call(chunk: Callable, state, data, run_key):
    """``(state, params_stack, metrics, seconds)``: one chunk call, timed with
    ``perf_counter`` around the call and ``block_until_ready`` of the returned state.

    With the Python loop (``params_stack`` None) the stack becomes the final parameters
    (one interval per chunk) and the metrics are reduced here, after the clock stopped.
    """
    started = time.perf_counter()
    state, params_stack, metrics = chunk(state, data, run_key)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    if params_stack is None:  # python loop: one interval per chunk
        params_stack = jax.tree.map(lambda leaf: leaf[None], state.params)
        metrics = reduce_step_metrics(metrics)
    return state, params_stack, metrics, seconds
