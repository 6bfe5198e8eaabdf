"""Timing jitted train steps side by side (DESIGN.md §5), for the benchmarks' shared harness
(``experiments.bench_harness``).

Every variant's step is compiled and warmed up first, then the variants are interleaved in
``rounds`` rounds, each giving every variant ``runs / rounds`` consecutive steps, so that a
change of the machine's load during the benchmark hits all variants alike. Each step is
timed with ``block_until_ready``; the state is donated and re-bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class TimedStep:
    """One variant's jitted step, its live (donated, re-bound) state and its step times."""

    def __init__(self, step: Callable, state: Any):
        self.step, self.state, self.times = step, state, []

    def advance(self, data: Any, keys, record: bool):
        for key in keys:
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, data, key)
            jax.block_until_ready((self.state, metrics))
            if record:
                self.times.append(time.perf_counter() - start)


def time_interleaved(steps: dict, data: Any, *, runs: int, warmup: int, rounds: int) -> dict:
    """``steps``: name -> (step, initial state). Returns name -> ``TimedStep`` with ``runs``
    recorded step times each (compilation and ``warmup`` steps excluded)."""
    timed = {name: TimedStep(step, state) for name, (step, state) in steps.items()}
    keys = list(jax.random.split(jax.random.key(1), warmup + runs))
    for variant in timed.values():  # compile and warm up
        variant.advance(data, keys[:warmup], record=False)
    per_round = -(-runs // rounds)
    for start in range(warmup, warmup + runs, per_round):
        for variant in timed.values():
            variant.advance(data, keys[start : start + per_round], record=True)
    return timed


def time_summary(times, baseline_times) -> dict:
    """Median, p10 and p90 in ms, the number of runs, and the ratio of medians to a baseline."""
    median = statistics.median(times)
    return {
        "median_ms": 1e3 * median,
        "p10_ms": 1e3 * float(np.percentile(times, 10)),
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "runs": len(times),
        "ratio": median / statistics.median(baseline_times),
    }


def time_pipelined(step: Callable, state: Any, data: Any, keys) -> tuple[Any, float]:
    """Dispatches one step per key back to back, as a training loop does, and blocks once at
    the end: ``(state, seconds per step)``. On an accelerator this hides the dispatch of
    each step behind the device work of the previous ones (unless the step syncs)."""
    start = time.perf_counter()
    for key in keys:
        state, metrics = step(state, data, key)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / len(keys)


def time_scanned(multi_step: Callable, state: Any, data: Any, key, num_steps: int):
    """One call of ``multi_step`` (``num_steps`` steps in one ``lax.scan``): ``(state, seconds
    per step)``, i.e. the device time of a step without its dispatch."""
    start = time.perf_counter()
    state, metrics = multi_step(state, data, key)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / num_steps


def time_throughput(variants: dict, data: Any, *, rounds: int, steps: int) -> dict:
    """``variants``: name -> (single step, its state, multi step of ``steps`` steps, its
    state). Returns name -> ``{"pipelined": [s/step per round], "scan": [...]}``, the
    variants interleaved in ``rounds`` rounds (after one warm-up round, compilation
    excluded)."""
    live = {name: list(value) for name, value in variants.items()}
    times = {name: {"pipelined": [], "scan": []} for name in variants}
    for round_index in range(rounds + 1):
        keys = list(jax.random.split(jax.random.key(100 + round_index), steps))
        for name, (single, single_state, multi, multi_state) in live.items():
            single_state, pipelined = time_pipelined(single, single_state, data, keys)
            multi_state, scanned = time_scanned(multi, multi_state, data, keys[0], steps)
            live[name][1], live[name][3] = single_state, multi_state
            if round_index:  # round 0 compiles and warms up
                times[name]["pipelined"].append(pipelined)
                times[name]["scan"].append(scanned)
    return times
