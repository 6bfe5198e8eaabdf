"""Reports of a compute-matched run (``experiments.compute_matched``): what ``summary.json``
adds to the usual per-method aggregates, and ``table.md``.

``summary["compute_matched"]``: the budget S, the schedule, the calibration rounds and the
equal-steps point s* (the largest step every method evaluated). Per method, next to the
usual aggregates (whose ``final_*``, ``train_time_per_run_s`` and ``time_to_target_s`` are
now *at the budget*): ``steps_per_s`` (calibrated), ``num_steps`` (T_m),
``calibration_chunk_s``, ``budget_time_ratio`` (measured training time / S) and
``at_equal_steps`` (full training loss and test error at step s*, mean ± std over seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments import aggregate

REFERENCE = (
    "Kaddour, Key, Nawrot, Minervini, Kusner, No Train No Gain: Revisiting Efficient "
    "Training Algorithms for Transformer-based Language Models, NeurIPS 2023"
)


def equal_steps(results: Sequence) -> int:
    """s*: the largest step at which every method was evaluated (0 if only the start)."""
    common = set(results[0].steps).intersection(*(set(r.steps) for r in results[1:]))
    return max(common)


def add_budget_summary(summary: dict, config, rates: dict, results: Sequence) -> None:
    """Adds ``summary["compute_matched"]`` and the per-method budget entries (in place)."""
    step = equal_steps(results)
    summary["compute_matched"] = {
        "budget_s": float(config.budget_seconds),
        "lr_schedule": config.lr_schedule,
        "calibration_rounds": int(config.calibration_rounds),
        "equal_steps": step,
        "reference": REFERENCE,
    }
    for r in results:
        m, rate, point = summary["methods"][r.name], rates[r.name], r.steps.index(step)
        m.update(
            steps_per_s=float(rate["steps_per_s"]),
            num_steps=int(r.steps[-1]),
            calibration_chunk_s=[float(s) for s in rate["chunk_s"]],
            calibration_chunk_steps=int(rate["chunk_steps"]),
            budget_time_ratio=aggregate.mean_std_dict(
                np.asarray(r.times)[:, -1] / config.budget_seconds
            ),
            at_equal_steps={
                "step": step,
                "train_loss": aggregate.mean_std_dict(np.asarray(r.train_loss)[:, point]),
                "test_error": aggregate.mean_std_dict(np.asarray(r.test_error)[:, point]),
            },
        )


def time_to_target_cell(crossings: dict) -> str:
    """Mean ± std over the seeds that reached the target and how many; else "not reached"."""
    if crossings["reached"]:
        return (
            aggregate.format_mean_std(crossings)
            + f" ({crossings['reached']}/{crossings['num_seeds']})"
        )
    return f"not reached (0/{crossings['num_seeds']})"


def _header(config, step: int, show_variance: bool) -> list[str]:
    header = [
        "method",
        "steps/s (calibrated)",
        "T_m (steps)",
        "train loss at budget",
        "test error at budget (%)",
    ]
    if config.target_loss is not None:
        header.append(f"time to loss ≤ {config.target_loss:g} (s)")
    header += [
        "measured train time (s)",
        f"train loss at step {step}",
        f"test error at step {step} (%)",
    ]
    return header + (["final V(p)/V(u)"] if show_variance else [])


def _row(config, name: str, m: dict, show_variance: bool) -> list[str]:
    row = [
        f"{m['label']} (`{name}`)",
        f"{m['steps_per_s']:.4g}",
        str(m["num_steps"]),
        aggregate.format_mean_std(m["final_train_loss"]),
        aggregate.format_mean_std(m["final_test_error"], scale=100),
    ]
    if config.target_loss is not None:
        row.append(time_to_target_cell(m["time_to_target_s"]))
    row += [
        aggregate.format_mean_std(m["train_time_per_run_s"]),
        aggregate.format_mean_std(m["at_equal_steps"]["train_loss"]),
        aggregate.format_mean_std(m["at_equal_steps"]["test_error"], scale=100),
    ]
    if show_variance:
        ratio = m.get("final_sampler_diagnostics", {}).get("variance_ratio")
        row.append(aggregate.format_mean_std(ratio) if ratio else "—")
    return row


def budget_table(config, summary: dict) -> str:
    """``table.md`` of a compute-matched run: one row per method, at the budget and at s*."""
    budget, res, machine = summary["compute_matched"], summary["resolved"], summary["machine"]
    step = budget["equal_steps"]
    show_variance = any(
        "variance_ratio" in m.get("final_sampler_diagnostics", {})
        for m in summary["methods"].values()
    )
    header = _header(config, step, show_variance)
    lines = [
        f"# {config.name}: compute-matched, {budget['budget_s']:g} s per run",
        "",
        config.description,
        "",
        f"{config.dataset} (n = {res['num_train']}), model {config.model}, K = "
        f"{config.batch_size}, lr = {config.learning_rate} decayed to 0 ({budget['lr_schedule']}) "
        f"at each method's T_m = floor({budget['budget_s']:g} s x its calibrated steps/s), "
        f"{len(res['seeds'])} seeds (mean ± std over seeds). Device: {machine['jax_device_kind']} "
        f"({machine['cpu_model']}, {machine['cpu_count']} cores).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, m in summary["methods"].items():
        lines.append("| " + " | ".join(_row(config, name, m, show_variance)) + " |")
    lines += [
        "",
        f"Protocol: {REFERENCE}. Each method's run is a run of its own (its schedule ends "
        "at its T_m). Calibration: steps per chunk / mean time of "
        f"{budget['calibration_rounds']} interleaved one-chunk runs after compilation and "
        "warm-up. 'At budget': at T_m; 'measured train time' is what the run took (it differs "
        f"from {budget['budget_s']:g} s by the calibration's error). Step {step}: the largest "
        "step every method evaluated (the per-step view; the methods' schedules differ there).",
    ]
    if config.target_loss is not None:
        lines += [
            "",
            f"Time to target: the first evaluated wall-clock time with full training "
            f"loss ≤ {config.target_loss:g}, mean ± std over the seeds that reached it.",
        ]
    if show_variance:
        lines += [
            "",
            "V(p)/V(u): the sampler's gradient-variance term relative to uniform at "
            "the end of the run (experiments/diagnostics.py; 1 = uniform, lower is better).",
        ]
    return "\n".join(lines + ["", "Timing: " + summary["timing_note"], ""])
