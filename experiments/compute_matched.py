"""The compute-matched protocol: every method gets the same wall-clock budget on this machine.

Kaddour, Key, Nawrot, Minervini, Kusner, "No Train No Gain: Revisiting Efficient Training
Algorithms for Transformer-based Language Models", NeurIPS 2023: a training method that is
faster per step but slower per second has to be compared at equal *time*, each run with the
learning-rate schedule it would use if that time were all it had (decayed to zero at the
budget), not as a prefix of a longer run.

For a configuration with ``budget_seconds = S`` (``python -m experiments NAME
--budget-seconds S``), :func:`run_compute_matched`:

1. **calibrates** each method's speed (:func:`measure_rates`): its chunks are compiled and
   warmed up exactly as for training (``experiments.method_run``), then
   ``calibration_rounds`` one-chunk runs of each method go interleaved (round after round,
   every method once per round, so a drift of the machine's speed hits all alike), each
   with its untimed evaluation as in training; steps/s = steps per chunk / the mean chunk
   time. The budget runs are cut into chunks of that same shape
   (``experiments.chunks.fixed_chunk_plan``);
2. sets each method's horizon T_m = floor(S * steps/s_m) (:func:`steps_for_budget`, at
   least 1);
3. builds each method for T_m steps (AdamBS's default eta0 uses T_m) with the learning rate
   lr * f(t), f(t) = 1 - t / T_m (``lr_schedule="linear"``, the default) or
   f(t) = (1 + cos(pi t / T_m)) / 2 (``"cosine"``), the same shape for every method, so f
   reaches 0 at t = T_m (:func:`decay_factor`; optax's ``linear_schedule`` and
   ``cosine_decay_schedule`` with ``alpha=0``). f multiplies the optimizer's update
   (:func:`with_decay`, ``optax.scale_by_schedule`` after the optimizer), which is training
   with learning rate lr * f(t) for every optimizer whose update is linear in its learning
   rate: SGD, RMSProp, Adam and AMSGrad (all of ``experiments.methods``);
4. trains every method for its own T_m steps (a run of its own: seeds outer, methods inner,
   as ``experiments.runner``), evaluating every ``eval_every`` steps and at T_m.

The reports (``experiments.budget_report``): at the budget (the end of each run), the full
training loss and test error (mean ± std over seeds), the measured training time, and the
time to the target loss (the first evaluated wall-clock time with full loss <= target,
"not reached" otherwise); and a per-step view: the same metrics at the largest step that
every method evaluated (the shortest run's last multiple of ``eval_every``). Time is
measured as in ``experiments.chunks`` (compilation, warm-up and evaluation excluded), so a
run's measured time differs from S by the calibration's error; both are reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import optax

from experiments import budget_report
from experiments.configs import ExperimentConfig
from experiments.method_run import MethodRun, build_for_setup
from experiments.methods import BuiltMethod
from experiments.reports import build_summary, write_outputs
from experiments.run_setup import Setup, prepare
from experiments.runner import (
    check_methods_available,
    describe_run,
    resolved_settings,
    run_interleaved,
)


def decay_factor(num_steps: int, shape: str = "linear") -> optax.Schedule:
    """f(t): 1 at t = 0, 0 at t = ``num_steps`` (and after), ``"linear"`` or ``"cosine"``."""
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shape == "linear":
        return optax.linear_schedule(1.0, 0.0, num_steps)
    if shape == "cosine":
        return optax.cosine_decay_schedule(1.0, num_steps, alpha=0.0)
    raise ValueError(f"shape must be 'linear' or 'cosine', got {shape!r}")


def with_decay(
    optimizer: optax.GradientTransformation, num_steps: int, shape: str = "linear"
) -> optax.GradientTransformation:
    """``optimizer`` whose update at its t-th call (t = 0, 1, ...) is multiplied by f(t)."""
    return optax.chain(optimizer, optax.scale_by_schedule(decay_factor(num_steps, shape)))


def steps_for_budget(budget_seconds: float, steps_per_second: float) -> int:
    """T_m = floor(S * steps/s), at least 1."""
    if not (budget_seconds > 0 and steps_per_second > 0):
        raise ValueError(f"budget and rate must be > 0, got {budget_seconds}, {steps_per_second}")
    return max(1, math.floor(budget_seconds * steps_per_second))


def build_decayed(setup: Setup, name: str) -> BuiltMethod:
    """Method ``name`` built for ``setup.num_steps`` = T_m steps, its learning rate decayed
    to zero at T_m (``config.lr_schedule``)."""
    config = setup.config
    built = build_for_setup(setup, name)
    settings = {**built.settings, "lr_schedule": config.lr_schedule, "decay_steps": setup.num_steps}
    return dataclasses.replace(
        built,
        optimizer=with_decay(built.optimizer, setup.num_steps, config.lr_schedule),
        settings=settings,
    )


def calibration_setup(setup: Setup) -> Setup:
    """A setup of one full chunk (``chunk_steps`` steps in a scan, ``eval_every`` in the
    Python loop): the chunk shape most of a budget run's steps run in
    (``experiments.chunks.fixed_chunk_plan``)."""
    config = setup.config
    per_chunk = config.chunk_steps if setup.loop == "scan" else config.eval_every
    return setup.with_num_steps(
        max(config.eval_every, per_chunk // config.eval_every * config.eval_every)
    )


def measure_rates(setup: Setup, names, log: Callable[[str], None] = print) -> dict:
    """``name -> {"steps_per_s", "chunk_steps", "chunk_s", "compile_s"}``: each method's
    calibrated speed.

    Every method is compiled and warmed up by ``MethodRun`` for a one-chunk run, then
    ``calibration_rounds`` such runs go round after round (every method once per round), each
    exactly as in training (the untimed evaluation and diagnostics after the timed chunk, so
    the chunk starts in the same state of the machine's caches as a training chunk does).
    steps/s = steps per chunk / the *mean* chunk time: a run's time is the sum of its chunks'.
    """
    calibration = calibration_setup(setup)
    seed = setup.seeds[0]
    runs = {}
    for name in names:
        log(f"  calibrating {name} ...")
        runs[name] = MethodRun(calibration, name, build_decayed(calibration, name))
    for _ in range(setup.config.calibration_rounds):
        for run in runs.values():
            run.run_seed(seed)
    steps = calibration.num_steps
    out = {}
    for name, run in runs.items():
        chunk_s = [seconds for seed_times in run.chunk_times for seconds in seed_times]
        out[name] = {
            "steps_per_s": steps / statistics.fmean(chunk_s),
            "chunk_steps": steps,
            "chunk_s": chunk_s,
            "compile_s": run.compile_s,
        }
    return out


def budget_runs(setup: Setup, rates: dict, log: Callable[[str], None] = print) -> list[MethodRun]:
    """One compiled :class:`MethodRun` per method, for its own T_m steps."""
    method_runs = []
    for name, rate in rates.items():
        num_steps = steps_for_budget(setup.config.budget_seconds, rate["steps_per_s"])
        log(f"  {name}: {rate['steps_per_s']:.4g} steps/s -> T = {num_steps} steps; compiling ...")
        method_setup = setup.with_num_steps(num_steps)
        method_runs.append(MethodRun(method_setup, name, build_decayed(method_setup, name)))
    return method_runs


def run_compute_matched(
    config: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs ``config`` under the compute-matched protocol (``config.budget_seconds`` set)
    and writes ``results/<run>/`` as ``experiments.runner`` does; returns the summary."""
    if config.budget_seconds is None:
        raise ValueError(f"{config.name}: the compute-matched protocol needs budget_seconds")
    check_methods_available(config)
    started = time.perf_counter()
    setup = prepare(config, data_dir)
    log(
        describe_run(setup) + f"; compute-matched: {config.budget_seconds:g} s per run, "
        f"{config.lr_schedule} decay to 0"
    )
    rates = measure_rates(setup, config.methods, log)
    method_runs = budget_runs(setup, rates, log)
    run_interleaved(method_runs, setup, progress)
    results = [method_run.result() for method_run in method_runs]
    rows = [row for method_run in method_runs for row in method_run.rows]
    resolved = resolved_settings(setup, started)
    resolved.update(
        num_steps={r.name: r.setup.num_steps for r in method_runs},
        eval_steps=None,
        chunk_plan=None,
        num_chunks=None,
    )
    summary = build_summary(config, resolved, results)
    budget_report.add_budget_summary(summary, config, rates, results)
    write_outputs(Path(out_dir), config, summary, rows, results)
    summary["total_wall_s"] = time.perf_counter() - started
    return summary
