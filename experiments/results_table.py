"""The summary tables of docs/experiments.md: method x configuration, from the ``results/``
folders of several runs.

    python -m experiments.aggregate results/lahire-iris results/lahire-iris-budget ... [--out F]

(also ``python -m experiments.results_table``). Each folder's ``summary.json`` is either a
per-step run (``python -m experiments NAME``: every method the same number of steps) or a
compute-matched run (``--budget-seconds S``, ``experiments.compute_matched``). The
markdown written:

* **per step**: the full training loss at the end of the per-step run (mean ± std over
  seeds; the column says after how many steps); for a configuration with only a
  compute-matched run, its equal-steps view (loss at the largest step every method
  evaluated, marked ``@ step s``); from the per-step runs also each method's share of
  p^GN's reduction of uniform Adam's loss, (L_adam - L_m) / (L_adam - L_adam-gn) (1 = all
  of the oracle's gain, 0 = none, < 0 worse than Adam), and its time per step relative to
  uniform Adam's in the same run (the targets: a share >= 0.5 at <= 1.2x);
* **per second** (compute-matched runs): the full training loss at the budget, the test
  error at the budget and the time to the target loss ("not reached" when no seed got
  there), one table each.

A configuration's column comes from the last folder given for it (per kind of run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import aggregate
from experiments.budget_report import time_to_target_cell

MISSING = "—"


def load_summaries(folders: Sequence[str | Path]) -> tuple[dict, dict]:
    """``(per_step, budget)``: configuration name -> summary, from each folder's
    ``summary.json`` (FileNotFoundError naming the folder if it has none).

    Several folders of the same configuration and kind are merged: a method comes from the
    first folder that has it (e.g. an expensive oracle run on its own with the same seeds
    and keys); its time-per-step ratio is then against another run's uniform Adam."""
    per_step, budget = {}, {}
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no summary.json (not a results/ folder of a run)")
        summary = json.loads(path.read_text())
        kind = budget if "compute_matched" in summary else per_step
        name = summary["config"]["name"]
        if name in kind:
            merged = kind[name]["methods"]
            for method, result in summary["methods"].items():
                merged.setdefault(method, result)
        else:
            kind[name] = summary
    return per_step, budget


def _methods(*groups: dict) -> list[str]:
    """Every method of the summaries, in order of first appearance."""
    names = []
    for group in groups:
        for summary in group.values():
            names += [name for name in summary["methods"] if name not in names]
    return names


def _table(title: str, columns: dict, methods: list[str], cell) -> list[str]:
    """A markdown table: one row per method, one column per ``columns`` entry
    (header -> summary); ``cell(method_summary) -> str``."""
    if not columns:
        return []
    lines = [
        f"**{title}**",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name in methods:
        cells = []
        for summary in columns.values():
            m = summary["methods"].get(name)
            cells.append(cell(m) if m is not None else MISSING)
        if any(c != MISSING for c in cells):
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines + [""]


def per_step_cell(m: dict) -> str:
    if "at_equal_steps" in m:  # a compute-matched run's equal-steps view
        view = m["at_equal_steps"]
        return aggregate.format_mean_std(view["train_loss"]) + f" @ step {view['step']}"
    return aggregate.format_mean_std(m["final_train_loss"])


def per_step_columns(per_step: dict, budget: dict) -> dict:
    columns = {}
    for name in sorted(set(per_step) | set(budget), key=_order(per_step, budget)):
        if name in per_step:
            steps = per_step[name]["resolved"]["num_steps"]
            columns[f"{name} ({steps} steps)"] = per_step[name]
        else:
            columns[f"{name} (equal steps)"] = budget[name]
    return columns


def _order(*groups: dict):
    names = [name for group in groups for name in group]
    return names.index


def budget_columns(budget: dict) -> dict:
    return {f"{name} ({s['compute_matched']['budget_s']:g} s)": s for name, s in budget.items()}


def share_of_oracle_gain(
    summary: dict, name: str, baseline: str = "adam", oracle: str = "adam-gn"
) -> str:
    """(L_baseline - L_name) / (L_baseline - L_oracle) of the mean final full training
    losses: the share of p^GN's per-step reduction of Adam's loss that ``name`` gets."""
    methods = summary["methods"]
    if baseline not in methods or oracle not in methods or name not in methods:
        return MISSING
    loss = {k: methods[k]["final_train_loss"]["mean"] for k in (baseline, oracle, name)}
    gain = loss[baseline] - loss[oracle]
    return f"{(loss[baseline] - loss[name]) / gain:.2f}" if gain > 0 else "(no gain)"


def time_per_step_ratio(summary: dict, name: str, baseline: str = "adam") -> str:
    """Mean time per step of ``name`` / the baseline's, in the same run."""
    methods = summary["methods"]
    if baseline not in methods or name not in methods:
        return MISSING
    ratio = methods[name]["time_per_step_s"]["mean"] / methods[baseline]["time_per_step_s"]["mean"]
    return f"{ratio:.2f}x"


def _per_run_table(title: str, runs: dict, methods: list[str], cell) -> list[str]:
    """Like :func:`_table`, with ``cell(summary, method_name) -> str``."""
    if not runs:
        return []
    lines = [
        f"**{title}**",
        "",
        "| method | " + " | ".join(runs) + " |",
        "|" + "---|" * (len(runs) + 1),
    ]
    for name in methods:
        cells = [cell(summary, name) for summary in runs.values()]
        if any(c != MISSING for c in cells):
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_tables(per_step: dict, budget: dict) -> str:
    """The markdown of the module docstring."""
    methods = _methods(per_step, budget)
    lines = _table(
        "Per step: full training loss after the same number of steps (mean ± std over seeds)",
        per_step_columns(per_step, budget),
        methods,
        per_step_cell,
    )
    lines += _per_run_table(
        "Per step: share of p^GN's reduction of Adam's final loss, (L_adam − L_m) / "
        "(L_adam − L_adam-gn)",
        per_step,
        methods,
        share_of_oracle_gain,
    )
    lines += _per_run_table(
        "Per step: time per step / uniform Adam's (same run)",
        per_step,
        methods,
        time_per_step_ratio,
    )
    columns = budget_columns(budget)
    lines += _table(
        "Per second: full training loss at the budget",
        columns,
        methods,
        lambda m: aggregate.format_mean_std(m["final_train_loss"]),
    )
    lines += _table(
        "Per second: test error at the budget (%)",
        columns,
        methods,
        lambda m: aggregate.format_mean_std(m["final_test_error"], scale=100),
    )
    lines += _table(
        "Per second: time to the target loss (s; seeds that reached it)",
        {h: s for h, s in columns.items() if s["config"]["target_loss"] is not None},
        methods,
        lambda m: time_to_target_cell(m["time_to_target_s"]),
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.aggregate",
        description="Summary tables (method x configuration, per step and per second) from "
        "the results/ folders of several runs.",
    )
    parser.add_argument("folders", nargs="+", help="results/<run> folders (with summary.json)")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    try:
        text = summary_tables(*load_summaries(args.folders))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
