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
from typing import Any, NamedTuple

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
MIN = Reduction(jnp.min, np.min)
SUM = Reduction(lambda values: jnp.sum(values).astype(jnp.float32), np.sum)

METRIC_REDUCTIONS: dict[str, Reduction] = {
    "max_weight": MAX,  # the largest importance weight of the interval
    "min_weight": MIN,  # the smallest
    "num_dropped_feedback": SUM,  # a count: how many draws' feedback was dropped
    "skipped": SUM,  # a count: how many steps of the interval were skipped
    "skipped_steps": MAX,  # cumulative: its value at the end of the interval
}
"""The metrics not reduced by their mean (every other metric: :data:`MEAN`, among them
``loss``, the unbiased (1/K) sum_k w_k loss_k of the step, and ``sampled_loss``, the plain
mean of the sampled batch's losses; ``metrics.jsonl`` has them as ``batch_loss`` and
``batch_sampled_loss``)."""


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


class Snapshots(NamedTuple):
    """What a chunk keeps after each of its evaluation intervals, every leaf with a leading
    ``num_intervals`` axis: the parameters (evaluated after the timed call) and, if asked
    for, the sampler's state (for ``experiments.diagnostics``; else None)."""

    params: Any
    sampler_state: Any = None


def _snapshot(state, keep_sampler_state: bool) -> Snapshots:
    return Snapshots(state.params, state.sampler_state if keep_sampler_state else None)


class Renormalization(NamedTuple):
    """A sampler's O(n) ``renormalize`` (``state -> state`` of the *sampler's* state) and its
    period M (``renormalize_every``): exp3's tree rescaling, InfoBatch's epoch boundary."""

    renormalize: Callable
    every: int


def renormalization_of(sampler) -> Renormalization | None:
    """The sampler's :class:`Renormalization`, or None if it needs none."""
    every, renormalize = sampler.renormalize_every, sampler.renormalize
    return Renormalization(renormalize, int(every)) if every and renormalize is not None else None


def _renormalize_if_crossed(state, step_before, renormalization: Renormalization | None):
    """After an interval: the sampler's state renormalized if the interval crossed a multiple
    of M (``state.step // M`` changed), selected with ``jnp.where`` (no ``lax.cond``: the
    O(n) renormalization is computed at every interval end, a cost of O(n / eval_every) per
    step, and kept only where a boundary was crossed)."""
    if renormalization is None:
        return state
    crossed = (state.step // renormalization.every) != (step_before // renormalization.every)
    renormalized = renormalization.renormalize(state.sampler_state)
    sampler_state = jax.tree.map(
        lambda new, old: jnp.where(crossed, new, old), renormalized, state.sampler_state
    )
    return state._replace(sampler_state=sampler_state)


def _renormalize_at_boundary(state, renormalization: Renormalization):
    """After a step: the sampler's state renormalized if ``state.step`` is a multiple of M,
    through ``lax.cond`` (the O(n) work runs only at the boundary). On a CPU a conditional
    costs no host round trip; on an accelerator it would (its predicate goes to the host),
    which is why :func:`boundary_mode` chooses it on the CPU only. Measured on this CPU
    (exp3, n = 10^5, a linear model): the conditional's untaken branch copies exp3's (n,)
    log-weights every step (38 -> 69 us per step); InfoBatch's step costs the same with it
    (26-27 us at n = 4000). exp3's M exceeds every configuration's run here, so its runs
    carry no renormalization at all (:func:`compile_chunks`)."""
    due = state.step % renormalization.every == 0
    sampler_state = jax.lax.cond(due, renormalization.renormalize, lambda s: s, state.sampler_state)
    return state._replace(sampler_state=sampler_state)


BOUNDARY_MODES = ("exact", "interval_end")


def boundary_mode(backend: str | None = None) -> str:
    """Where a scan chunk renormalizes: ``"exact"``, right after every M-th step as
    ``TrainStep`` and the Python loop do (InfoBatch's epochs are then exactly ceil(n / K)
    steps), on a CPU; ``"interval_end"``, at the end of each interval that crossed a
    multiple of M (up to ``eval_every - 1`` steps late, with no conditional), on an
    accelerator. Late is safe for exp3 (M is half the updates its tree can take,
    ``adambs_jax.exp3_config.renormalization_period``) but lengthens InfoBatch's epochs
    towards the intervals' length."""
    return "exact" if (backend or jax.default_backend()) == "cpu" else "interval_end"


def make_chunk(
    step: Callable,
    interval: int,
    num_intervals: int,
    keep_sampler_state: bool = False,
    renormalization: Renormalization | None = None,
    boundaries: str = "exact",
) -> Callable:
    """``chunk(state, data, run_key) -> (state, snapshots, metrics_stack)``.

    ``num_intervals * interval`` training steps in one nested ``lax.scan``; after every
    ``interval`` steps the parameters (and the sampler's state if ``keep_sampler_state``)
    are kept (:class:`Snapshots`: every leaf gets a leading ``num_intervals`` axis), to be
    evaluated after the timed call. Step t uses the key
    ``fold_in(run_key, t)`` (t = ``state.step``), so a run's keys do not depend on how it is
    cut into chunks. ``metrics_stack[name]`` is ``(num_intervals,)``: the step's metric
    reduced over each interval (:func:`reduction_of`: the mean, the max for ``max_weight``,
    the sum for ``num_dropped_feedback``). With a ``renormalization`` (M), the sampler is
    renormalized where ``boundaries`` (one of :data:`BOUNDARY_MODES`; :func:`boundary_mode`
    chooses by platform) says: right after every M-th step (``"exact"``), or at the end of
    each interval that crossed a multiple of M (``"interval_end"``).
    """
    if boundaries not in BOUNDARY_MODES:
        raise ValueError(f"boundaries must be one of {BOUNDARY_MODES}, got {boundaries!r}")
    exact = renormalization is not None and boundaries == "exact"

    def chunk(state, data, run_key):
        def one_step(state, _):
            state, metrics = step(state, data, jax.random.fold_in(run_key, state.step))
            if exact:
                state = _renormalize_at_boundary(state, renormalization)
            return state, metrics

        def one_interval(state, _):
            step_before = state.step
            state, metrics = jax.lax.scan(one_step, state, None, length=interval)
            if not exact:
                state = _renormalize_if_crossed(state, step_before, renormalization)
            out = {name: reduction_of(name).on_device(value) for name, value in metrics.items()}
            return state, (_snapshot(state, keep_sampler_state), out)

        state, (snapshots, metrics_stack) = jax.lax.scan(
            one_interval, state, None, length=num_intervals
        )
        return state, snapshots, metrics_stack

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


def fixed_chunk_plan(num_steps: int, eval_every: int, chunk_steps: int) -> list[tuple[int, int]]:
    """Like :func:`chunk_plan`, but every chunk but the last two has the one shape
    ``(eval_every, max(1, chunk_steps // eval_every))`` whatever ``num_steps`` is: then the
    remaining full intervals in one chunk, then a remainder of fewer than ``eval_every``
    steps. The compute-matched protocol uses it so that a run's chunks have the shape its
    speed was calibrated on (at most three shapes: three compilations)."""
    num_steps, eval_every = int(num_steps), int(eval_every)
    full, rest = divmod(num_steps, eval_every)
    per_chunk = max(1, int(chunk_steps) // eval_every)
    plan = [(eval_every, per_chunk)] * (full // per_chunk)
    if full % per_chunk:
        plan.append((eval_every, full % per_chunk))
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


def compile_chunks(
    step: Callable,
    plan,
    loop: str,
    example_args,
    keep_sampler_state: bool = False,
    renormalization: Renormalization | None = None,
) -> dict:
    """``{(interval, count): chunk}`` with ``chunk(state, data, run_key) -> (state,
    snapshots or None, metrics)``, compiled ahead of time, for a run from step 0 cut as
    ``plan`` (a ``renormalization`` whose M the run never reaches is left out).

    ``"scan"``: one compiled ``make_chunk`` per distinct shape; ``metrics`` is a dict of
    ``(count,)`` arrays. ``"python"``: one compiled step (key ``fold_in(run_key, t)`` as in
    the scan), called ``interval * count`` times, and the sampler renormalized right after
    every M-th step (exactly at the boundary: the loop counts steps in Python); ``snapshots``
    is None (:func:`timed_call` takes the final state's) and ``metrics`` the list of the
    steps' metric dicts.
    """
    if renormalization is not None and sum(i * c for i, c in plan) < renormalization.every:
        renormalization = None  # the run (from step 0) never reaches a multiple of M
    if loop == "scan":
        boundaries = boundary_mode()
        return {
            shape: jax.jit(
                make_chunk(step, *shape, keep_sampler_state, renormalization, boundaries),
                donate_argnums=0,
            )
            .lower(*example_args)
            .compile()
            for shape in sorted(set(plan))
        }

    def keyed_step(state, data, run_key):
        return step(state, data, jax.random.fold_in(run_key, state.step))

    compiled_step = jax.jit(keyed_step, donate_argnums=0).lower(*example_args).compile()
    renormalize = None
    if renormalization is not None:
        renormalize = (
            jax.jit(
                lambda state: state._replace(
                    sampler_state=renormalization.renormalize(state.sampler_state)
                ),
                donate_argnums=0,
            )
            .lower(example_args[0])
            .compile()
        )

    def python_chunk(num_steps):
        def chunk(state, data, run_key):
            metrics, first = [], int(state.step)  # the loop syncs every step anyway
            for t in range(first + 1, first + num_steps + 1):
                state, step_metrics = compiled_step(state, data, run_key)
                metrics.append(step_metrics)
                if renormalize is not None and t % renormalization.every == 0:
                    state = renormalize(state)
            return state, None, metrics

        chunk.keep_sampler_state = keep_sampler_state  # read by timed_call
        return chunk

    return {shape: python_chunk(shape[0] * shape[1]) for shape in sorted(set(plan))}


def timed_call(chunk: Callable, state, data, run_key):
    """``(state, snapshots, metrics, seconds)``: one chunk call, timed with
    ``perf_counter`` around the call and ``block_until_ready`` of the returned state.

    With the Python loop (``snapshots`` None) the snapshots become the final state's (one
    interval per chunk) and the metrics are reduced here, after the clock stopped.
    """
    started = time.perf_counter()
    state, snapshots, metrics = chunk(state, data, run_key)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    if snapshots is None:  # python loop: one interval per chunk
        final = _snapshot(state, getattr(chunk, "keep_sampler_state", False))
        snapshots = jax.tree.map(lambda leaf: leaf[None], final)
        metrics = reduce_step_metrics(metrics)
    return state, snapshots, metrics, seconds
