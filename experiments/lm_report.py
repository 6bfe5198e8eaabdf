"""Held-out test loss of a language-model run (``stdlib-lm``), in nats and bits per byte.

``python -m experiments.lm_report results/stdlib-lm [--out docs/results/stdlib-lm]`` reads a
run's ``metrics.jsonl`` and ``summary.json`` and writes ``lm_table.md`` (per method, mean ±
std over seeds, each seed's value listed: the test loss and the full training loss at the
budget, at the largest step every method evaluated, steps, measured training time) and
``test_loss.png`` (test loss in bits per byte against wall-clock and against steps, the mean
over seeds with a ±1 std band). Bits per byte = mean next-byte cross-entropy in nats / ln 2.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

BITS_PER_NAT = 1.0 / math.log(2.0)


def load_curves(run_dir: str | Path) -> tuple[dict, dict]:
    """``(summary, curves)``: ``curves[method][seed]`` = rows sorted by step."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    curves: dict = defaultdict(lambda: defaultdict(list))
    with (run_dir / "metrics.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            curves[row["method"]][row["seed"]].append(row)
    for per_seed in curves.values():
        for rows in per_seed.values():
            rows.sort(key=lambda row: row["step"])
    return summary, curves


def _stats(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    spread = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return f"{values.mean():.4f} ± {spread:.4f}"


def _at_step(rows: list, step: int) -> dict:
    return next(row for row in rows if row["step"] == step)


def method_rows(summary: dict, curves: dict) -> list[dict]:
    """Per method: the values at the budget (each run's last point) and at the largest step
    every run evaluated."""
    common = set.intersection(
        *(
            {row["step"] for row in rows}
            for per_seed in curves.values()
            for rows in per_seed.values()
        )
    )
    equal_step = max(common)
    out = []
    for name, per_seed in curves.items():
        seeds = sorted(per_seed)
        last = [per_seed[s][-1] for s in seeds]
        same = [_at_step(per_seed[s], equal_step) for s in seeds]
        out.append(
            {
                "method": name,
                "label": summary["methods"][name]["label"],
                "seeds": seeds,
                "steps": last[0]["step"],
                "time_s": [row["time_s"] for row in last],
                "test_loss": [row["test_loss"] for row in last],
                "train_loss": [row["train_loss"] for row in last],
                "equal_step": equal_step,
                "test_loss_equal_step": [row["test_loss"] for row in same],
            }
        )
    return out


def table(summary: dict, curves: dict) -> str:
    """``lm_table.md``'s text."""
    rows = method_rows(summary, curves)
    machine = summary.get("machine", {})
    budget = summary.get("compute_matched", {}).get("budget_s")
    step = rows[0]["equal_step"]
    lines = [
        f"Budget {budget:g} s of training per run; seeds {rows[0]['seeds']}; "
        f"{machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"{machine.get('jax_device_kind', '?')}; mean ± std over seeds (each seed's value in "
        "brackets). Bits per byte = nats / ln 2.",
        "",
        "| method | steps (T_m) | measured train time (s) | test loss at budget (bits/byte) | "
        f"test loss at budget (nats) | train loss at budget (nats) | test loss at step {step} "
        "(bits/byte) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = [value * BITS_PER_NAT for value in r["test_loss"]]
        bits_equal = [value * BITS_PER_NAT for value in r["test_loss_equal_step"]]
        listed = ", ".join(f"{value:.3f}" for value in bits)
        lines.append(
            f"| {r['label']} (`{r['method']}`) | {r['steps']} | {_stats(r['time_s'])} | "
            f"{_stats(bits)} [{listed}] | {_stats(r['test_loss'])} | {_stats(r['train_loss'])} | "
            f"{_stats(bits_equal)} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, curves: dict, path: str | Path) -> None:
    """``test_loss.png``: test bits/byte vs wall-clock and vs steps (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, per_seed in curves.items():
        seeds = sorted(per_seed)
        count = min(len(per_seed[s]) for s in seeds)
        loss = np.array([[row["test_loss"] for row in per_seed[s][:count]] for s in seeds])
        loss *= BITS_PER_NAT
        times = np.array([[row["time_s"] for row in per_seed[s][:count]] for s in seeds])
        steps = np.array([row["step"] for row in per_seed[seeds[0]][:count]])
        mean, spread = loss.mean(0), loss.std(0)
        label = summary["methods"][name]["label"]
        for axis, x in ((by_time, times.mean(0)), (by_step, steps)):
            (line,) = axis.plot(x, mean, label=label)
            axis.fill_between(x, mean - spread, mean + spread, alpha=0.2, color=line.get_color())
    for axis, xlabel in ((by_time, "training wall-clock (s)"), (by_step, "step")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test loss (bits per byte)")
        axis.set_ylim(top=min(5.0, axis.get_ylim()[1]))  # the start (~9 bits) is off the top
        axis.grid(alpha=0.3)
    by_time.legend()
    budget = summary.get("compute_matched", {}).get("budget_s")
    figure.suptitle(
        f"{summary.get('config', {}).get('name', '')}: held-out test loss, {budget:g} s per run"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lm_report")
    parser.add_argument("run_dir", help="a run's folder (results/stdlib-lm)")
    parser.add_argument("--out", help="where to write lm_table.md and test_loss.png")
    args = parser.parse_args(argv)
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, curves = load_curves(args.run_dir)
    text = table(summary, curves)
    (out / "lm_table.md").write_text(text)
    plot(summary, curves, out / "test_loss.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
