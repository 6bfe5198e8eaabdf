"""Orchestration: runs an :class:`~experiments.configs.ExperimentConfig` and writes
``results/<run>/``.

:func:`run_experiment` follows the configuration through four rooms, each entered once:
:func:`~experiments.run_setup.prepare` builds what every method shares (data, loss,
initial parameters, chunk plan, evaluation); a :class:`~experiments.method_run.MethodRun`
per method builds and compiles its chunks (``experiments.chunks``) ahead of time (reported
as ``compile_s``) and reuses them for every seed: seeds change the initial state and keys,
not shapes. All methods are compiled first; then, seed after seed, every method runs in turn
(interleaved, so slow drifts of the machine's speed hit all methods alike). Every method of
a seed starts from the same parameters. After each timed chunk, a separate jitted function
evaluates the kept parameters (training loss and error on the training set, test loss and
error), untimed. Last, ``experiments.reports`` writes the summary, the table and the plots.

**What the wall-clock means.** A run's wall-clock at step t is the sum of the per-step times
of steps 1..t; the per-step time is the time of one timed chunk call
(:func:`experiments.chunks.timed_call`) / chunk length (inside a chunk, time is attributed
to its steps evenly). It excludes compilation, the untimed warm-up chunks of each method
(two of its first chunk shape, one of each other), evaluation (and the sampler diagnostics,
which are O(n)), and Python between chunks.

Outputs (:func:`~experiments.reports.write_outputs`): ``metrics.jsonl`` (one line per
method x seed x evaluation point), ``summary.json``, ``table.md``, ``loss_vs_time.png``,
``loss_vs_steps.png``, ``error_vs_steps.png`` and, if a sampler has a full distribution,
``diagnostics_vs_steps.png``. With ``budget_seconds`` set, the compute-matched protocol
(``experiments.compute_matched``) runs instead and writes the same files.

The names of those rooms that callers used from here stay importable from here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

from experiments.chunks import (  # noqa: F401  (re-exported)
    LOOPS,
    METRIC_REDUCTIONS,
    choose_loop,
    chunk_plan,
    compile_chunks,
    eval_points,
    has_convolution,
    make_chunk,
    reduce_step_metrics,
)
from experiments.configs import ExperimentConfig
from experiments.diagnostics import sampler_diagnostics  # noqa: F401  (re-exported)
from experiments.method_run import WARMUP_CHUNKS, MethodResult, MethodRun  # noqa: F401
from experiments.methods import method_available, method_spec
from experiments.reports import (  # noqa: F401  (re-exported)
    TIMING_NOTE,
    build_summary,
    lahire_table,
    markdown_table,
    write_outputs,
)
from experiments.run_setup import Setup, prepare
from experiments.tasks import (  # noqa: F401  (re-exported)
    make_evaluator,
    make_model_loss,
    make_stack_evaluator,
    per_example_loss_from_outputs,
    uses_dropout,
)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="chunk", dynamic_ncols=True, file=sys.stderr)


def check_methods_available(config: ExperimentConfig) -> None:
    """KeyError on an unknown method, RuntimeError on one the library cannot build."""
    for name in config.methods:
        method_spec(name)  # KeyError early on a typo
        if not method_available(name):
            raise RuntimeError(
                f"method {name!r} needs ab.{method_spec(name).requires}, which the installed "
                "adambs_jax does not have"
            )


def describe_run(setup: Setup) -> str:
    """The one-line announcement of a run: sizes, schedule, chunking and device."""
    config, plan = setup.config, setup.plan
    chunking = "one lax.scan" if setup.loop == "scan" else "a Python loop of jitted steps"
    return (
        f"[{config.name}] {config.dataset}: n = {setup.dataset.num_train} train / "
        f"{setup.dataset.num_test} test, model {config.model}, K = {config.batch_size}, "
        f"lr = {config.learning_rate:g}, {setup.num_steps} steps x {config.num_seeds} seeds x "
        f"{len(config.methods)} methods, eval every {config.eval_every} steps, "
        f"{plan[0][0] * plan[0][1]} steps per timed chunk ({chunking}); "
        f"device {jax.devices()[0].device_kind}"
    )


def run_interleaved(method_runs: list[MethodRun], setup: Setup, progress: bool) -> None:
    """Seeds outer and methods inner: the methods of a seed run back to back, so slow drifts
    of the machine's speed hit every method alike."""
    bar = _progress(len(setup.seeds) * sum(len(r.setup.plan) for r in method_runs), progress)
    try:
        for seed in setup.seeds:
            for method_run in method_runs:
                if bar is not None:
                    bar.set_description(f"seed {seed} {method_run.name}")
                method_run.run_seed(seed, bar)
    finally:
        if bar is not None:
            bar.close()


def resolved_settings(setup: Setup, started: float) -> dict:
    """``summary["resolved"]``: what the configuration resolved to for this dataset."""
    dataset, plan = setup.dataset, setup.plan
    return {
        "num_train": dataset.num_train,
        "num_test": dataset.num_test,
        "num_eval_train": int(setup.eval_sets["train"][0].shape[0]),
        "num_eval_test": int(setup.eval_sets["test"][0].shape[0]),
        "num_classes": dataset.num_classes,
        "task": dataset.task,
        "num_steps": setup.num_steps,
        "loop": setup.loop,
        "chunk_plan": [list(c) for c in sorted(set(plan))],
        "num_chunks": len(plan),
        "eval_steps": list(setup.steps_at),
        "seeds": setup.seeds,
        "dataset_description": dataset.description,
        "eval_compile_s": setup.eval_compile_s,
        "train_and_eval_wall_s": time.perf_counter() - started,
    }


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs ``config`` and writes its results under ``out_dir``; returns the summary dict.

    With ``config.budget_seconds`` set, the compute-matched protocol runs instead
    (``experiments.compute_matched``: every method the same wall-clock budget, its learning
    rate decayed to zero at the steps that fit in it).

    Raises:
      FileNotFoundError: the dataset's files are missing (from ``load_dataset``).
      RuntimeError: a method's sampler is missing from the installed ``adambs_jax``.
    """
    if config.budget_seconds is not None:  # every method gets the same wall-clock budget
        from experiments.compute_matched import run_compute_matched

        return run_compute_matched(config, out_dir, data_dir=data_dir, progress=progress, log=log)
    check_methods_available(config)
    started = time.perf_counter()
    setup = prepare(config, data_dir)
    log(describe_run(setup))
    method_runs = []  # all methods compiled first
    for name in config.methods:
        log(f"  compiling {name} ...")
        method_runs.append(MethodRun(setup, name))
    run_interleaved(method_runs, setup, progress)
    results = [method_run.result() for method_run in method_runs]
    rows = [row for method_run in method_runs for row in method_run.rows]
    summary = build_summary(config, resolved_settings(setup, started), results)
    write_outputs(Path(out_dir), config, summary, rows, results)
    summary["total_wall_s"] = time.perf_counter() - started
    return summary
