"""The benchmarks' shared harness: command-line arguments, timing variants of a train step
side by side (``experiments.step_timing``) into result rows, markdown tables, and the JSON
report with the record of the machine it ran on (``experiments.machine``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import jax

from experiments.machine import machine_info, versions
from experiments.step_timing import time_interleaved, time_summary, time_throughput


def machine_record() -> dict:
    """Where a benchmark ran: the machine and the versions of what it depends on."""
    return {**machine_info(), **versions()}


def bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the benchmark's docstring, with ``--out``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out)
    return parser


def add_step_timing_arguments(parser: argparse.ArgumentParser, *, min_runs: int) -> None:
    """``--runs``, ``--warmup`` and ``--rounds`` of :func:`time_variants`."""
    parser.add_argument(
        "--runs", type=int, default=100, help=f"timed steps per variant (>= {min_runs})"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="interleaving rounds")


def check_step_timing_arguments(parser: argparse.ArgumentParser, args, *, min_runs: int) -> None:
    if args.runs < min_runs or args.warmup < 1 or args.rounds < 1:
        parser.error(f"--runs must be >= {min_runs}, --warmup and --rounds >= 1")


def time_variants(
    steps: dict, data: Any, *, runs: int, warmup: int, rounds: int, label: str = "", **fields
) -> tuple[list[dict], dict]:
    """Times ``steps`` (variant -> (jitted step, initial state)) interleaved; the first variant
    is the baseline of the ratios.

    Returns ``(rows, timed)``: one row per variant, ``{**fields, "variant", "median_ms",
    "p10_ms", "p90_ms", "runs", "ratio_vs_<baseline>"}`` (each printed as it is made, after
    ``label``), and the ``TimedStep`` of each variant (its final state and times).
    """
    timed = time_interleaved(steps, data, runs=runs, warmup=warmup, rounds=rounds)
    baseline = next(iter(steps))
    rows = []
    for variant in steps:
        summary = time_summary(timed[variant].times, timed[baseline].times)
        rows.append(
            {
                **fields,
                "variant": variant,
                "median_ms": summary["median_ms"],
                "p10_ms": summary["p10_ms"],
                "p90_ms": summary["p90_ms"],
                "runs": summary["runs"],
                f"ratio_vs_{baseline}": summary["ratio"],
            }
        )
        print(
            f"{label}{variant:32s} {summary['median_ms']:9.3f} ms  x{summary['ratio']:.2f}",
            flush=True,
        )
    return rows, timed


def add_throughput(
    rows: list[dict],
    variants: dict,
    data: Any,
    *,
    rounds: int,
    steps: int,
    scale: float = 1e3,
    unit: str = "ms",
) -> None:
    """Adds to each row (one per variant, the first the baseline) the median ``pipelined_<unit>``
    and ``scan_<unit>`` per step (``step_timing.time_throughput``), their ratios to the
    baseline's (``ratio_pipelined_vs_<baseline>``, ``ratio_scan_vs_<baseline>``), the number
    of scanned steps and the backend. ``variants``: name -> (step, state, multi step, state)."""
    times = time_throughput(variants, data, rounds=rounds, steps=steps)
    baseline = next(iter(variants))
    medians = {
        name: {mode: statistics.median(t) for mode, t in modes.items()}
        for name, modes in times.items()
    }
    for row in rows:
        variant = medians[row["variant"]]
        for mode in ("pipelined", "scan"):
            row[f"{mode}_{unit}"] = scale * variant[mode]
            row[f"ratio_{mode}_vs_{baseline}"] = variant[mode] / medians[baseline][mode]
        row.update(scan_steps=steps, backend=jax.default_backend())
        print(
            f"{row['variant']:40s} pipelined {row[f'pipelined_{unit}']:9.3f} {unit}  "
            f"scan {row[f'scan_{unit}']:9.3f} {unit}",
            flush=True,
        )


def step_time_columns(baseline: str, baseline_label: str | None = None) -> list[tuple]:
    """The columns of a step-time table: median, p10–p90 and the ratio to ``baseline``."""
    return [
        ("median ms/step", "---:", "{median_ms:.3f}"),
        ("p10–p90 ms", "---:", "{p10_ms:.3f}–{p90_ms:.3f}"),
        (f"ratio vs {baseline_label or baseline}", "---:", f"{{ratio_vs_{baseline}:.2f}}"),
    ]


def markdown_table(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict]) -> str:
    """A markdown table; ``columns``: ``(header, alignment ("---" or "---:"), template)``, the
    template formatted with a row's keys (``"{median_ms:.3f}"``, ``"{tree[median_us]:.1f}"``)."""
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join(alignment for _, alignment, _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(template.format(**row) for _, _, template in columns) + " |")
    return "\n".join(lines)


def write_report(path: str | pathlib.Path, report: dict) -> pathlib.Path:
    """Writes ``report`` as indented JSON at ``path`` (creating its folder)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def print_report(report: dict, table: str, path: pathlib.Path) -> None:
    """The table, the machine record and where the report went."""
    print()
    print(table)
    print(f"\nmachine: {report['machine']}\nwrote {path}")
