"""Reports of a finished run: ``summary.json`` (:func:`build_summary`), ``table.md``
(:func:`markdown_table`, with Lahire's Table 1 layout if configured), ``metrics.jsonl`` and
the plots (:func:`write_outputs`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adambs_jax._jsonable import to_jsonable
from experiments import aggregate, budget_report
from experiments.configs import ExperimentConfig
from experiments.machine import machine_info, versions
from experiments.method_run import MethodResult
from experiments.methods import method_spec

TIMING_NOTE = (
    "Wall-clock at step t = sum of the per-step times of steps 1..t; per-step time = "
    "(perf_counter time around one timed chunk + block_until_ready) / chunk length. A chunk "
    "is one jitted lax.scan of about chunk_steps steps (resolved.loop = 'scan'), or a Python "
    "loop of eval_every calls of one jitted step ('python': chosen on CPU for models with "
    "convolutions, whose backward pass XLA:CPU runs ~20x slower inside a loop). Excluded: "
    "compilation (compile_s, ahead of time, once per method, reused for all seeds), untimed "
    "warm-up chunks per method (two of the first chunk shape, one of each other), "
    "evaluation, Python between chunks. With 'scan' the Python dispatch is paid once per "
    "chunk, so absolute times are below those of an eager step-by-step loop; compare "
    "methods by the ratios measured here."
)

# ----------------------------------------------------------------------------- summary.json


def method_summary(config: ExperimentConfig, r: MethodResult) -> dict:
    """One method's entry of ``summary.json``: its aggregates over seeds and what it is."""
    agg = aggregate.method_aggregates(
        steps=r.steps,
        times=r.times,
        train_loss=r.train_loss,
        test_error=r.test_error,
        train_error=r.train_error,
        step_times=r.step_times,
        compile_s=r.compile_s,
        target_loss=config.target_loss,
    )
    for name, values in r.curves.items():  # sampled_loss and the sampler diagnostics
        mean, std = aggregate.mean_and_std(values)
        agg[f"curve_{name}_mean"], agg[f"curve_{name}_std"] = (
            aggregate.floats(mean),
            aggregate.floats(std),
        )
    if r.final_diagnostics and r.final_diagnostics[0]:
        agg["final_sampler_diagnostics"] = {
            key: aggregate.mean_std_dict([d[key] for d in r.final_diagnostics])
            for key in r.final_diagnostics[0]
        }
    for name in ("clean_loss", "clean_error"):  # flipped labels: the clean-label curves
        if name in r.curves:
            agg[f"final_{name}"] = aggregate.mean_std_dict(np.asarray(r.curves[name])[:, -1])
    agg.update(
        label=r.label,
        settings=r.settings,
        warmup_s=r.warmup_s,
        description=method_spec(r.name).description,
        source=method_spec(r.name).source,
    )
    return agg


def build_summary(
    config: ExperimentConfig, resolved: dict, results: Sequence[MethodResult]
) -> dict:
    return {
        "config": config.to_json(),
        "resolved": resolved,
        "versions": versions(),
        "machine": machine_info(),
        "timing_note": TIMING_NOTE,
        "methods": {r.name: method_summary(config, r) for r in results},
    }


# ----------------------------------------------------------------------------- table.md


def _table_intro(config: ExperimentConfig, summary: dict) -> list[str]:
    """The title, the description and what was run and evaluated."""
    res, machine = summary["resolved"], summary["machine"]
    if config.eval_informative_only:
        train_set = f"the {res['num_eval_train']} training examples with a nonzero feature vector"
    elif config.eval_train_examples:
        train_set = f"the first {res['num_eval_train']} training examples"
    else:
        train_set = f"all {res['num_eval_train']} training examples"
    test_note = " (with a nonzero feature vector)." if config.eval_informative_only else "."
    return [
        f"# {config.name}",
        "",
        config.description,
        "",
        f"{config.dataset} (n = {res['num_train']}), model {config.model}, "
        f"K = {config.batch_size}, "
        f"lr = {config.learning_rate}, {res['num_steps']} steps, {len(res['seeds'])} seeds "
        f"(mean ± std over seeds). Device: {machine['jax_device_kind']} "
        f"({machine['cpu_model']}, {machine['cpu_count']} cores).",
        "",
        f"Evaluated every {config.eval_every} steps: training loss on {train_set}, test error "
        f"on {res['num_eval_test']} test examples{test_note} Steps run as {res['loop']!r} "
        "chunks (see Timing).",
        "",
    ]


def _shows_ess(summary: dict) -> bool:
    return any(
        "effective_sample_size" in m.get("final_sampler_diagnostics", {})
        for m in summary["methods"].values()
    )


def versus_adam(summary: dict, name: str, baseline: str = "adam") -> str:
    """The verdict against uniform Adam of the same run: the ratio of the mean final
    training losses, on how many seeds the method's final loss is lower (the same seed
    starts both from the same initialization), and a word: ``better`` if it is lower on at
    least 3/4 of the seeds and the ratio is below 0.95, ``worse`` if on at most 1/4 and the
    ratio is above 1.05, else ``tie``."""
    methods = summary["methods"]
    if name == baseline or baseline not in methods:
        return "—"
    ours = np.asarray(methods[name].get("final_train_loss_per_seed", []), float)
    adam = np.asarray(methods[baseline].get("final_train_loss_per_seed", []), float)
    if ours.size == 0 or ours.size != adam.size:
        return "—"
    ratio = (
        methods[name]["final_train_loss"]["mean"] / methods[baseline]["final_train_loss"]["mean"]
    )
    wins, seeds = int(np.sum(ours < adam)), ours.size
    need = math.ceil(0.75 * seeds)
    word = "tie"
    if wins >= need and ratio < 0.95:
        word = "better"
    elif wins <= seeds - need and ratio > 1.05:
        word = "worse"
    return f"{ratio:.2f}x, lower {wins}/{seeds}: {word}"


def _extra_columns(summary: dict) -> list[tuple[str, object]]:
    """(header, cell(name, m)) of the columns only some runs have: the clean-label loss
    and the share of draws on flipped examples (label noise)."""
    methods = summary["methods"].values()
    columns = []
    if any("final_clean_loss" in m for m in methods):
        columns.append(
            (
                "final clean-label train loss",
                lambda name, m: (
                    aggregate.format_mean_std(m["final_clean_loss"])
                    if "final_clean_loss" in m
                    else "—"
                ),
            )
        )
    if any("corrupted_share" in m.get("final_sampler_diagnostics", {}) for m in methods):
        columns.append(("final share of draws on flipped (%)", _corrupted_cell))
    return columns


def _corrupted_cell(name: str, m: dict) -> str:
    final = m.get("final_sampler_diagnostics", {})
    if "corrupted_share" in final:
        return aggregate.format_mean_std(final["corrupted_share"], scale=100)
    return "(uniform)"


def _table_header(target: float | None, show_ess: bool) -> list[str]:
    header = ["method", "final train loss", "vs Adam", "final test error (%)"]
    if target is not None:
        header += [f"time to loss ≤ {target:g} (s)", f"steps to loss ≤ {target:g}"]
    header += ["time / step (ms)", "train time / run (s)", "compile (s)"]
    return header + (["final ESS of p", "final V(p)/V(u)"] if show_ess else [])


def _crossing_cell(t: dict, fmt: str) -> str:
    """A time- or steps-to-target cell: mean ± std over the seeds that got there, and how many."""
    if t["reached"]:
        return fmt.format(t["mean"], t["std"]) + f" ({t['reached']}/{t['num_seeds']})"
    return f"never (0/{t['num_seeds']})"


def _table_row(
    name: str, m: dict, target: float | None, show_ess: bool, versus: str = "—"
) -> list[str]:
    row = [
        f"{m['label']} (`{name}`)",
        aggregate.format_mean_std(m["final_train_loss"]),
        versus,
        aggregate.format_mean_std(m["final_test_error"], scale=100),
    ]
    if target is not None:
        row += [
            _crossing_cell(m["time_to_target_s"], "{:.3g} ± {:.2g}"),
            _crossing_cell(m["steps_to_target"], "{:.0f} ± {:.0f}"),
        ]
    row += [
        aggregate.format_mean_std(m["time_per_step_s"], scale=1e3),
        aggregate.format_mean_std(m["train_time_per_run_s"]),
        f"{m['compile_s']:.2f}",
    ]
    if show_ess:
        final = m.get("final_sampler_diagnostics", {})
        for key in ("effective_sample_size", "variance_ratio"):
            row.append(aggregate.format_mean_std(final[key]) if key in final else "—")
    return row


def _table_notes(config: ExperimentConfig, summary: dict, show_ess: bool) -> list[str]:
    """Diverged seeds, what the ESS and the target columns mean, Lahire's layout, timing."""
    lines = []
    if "adam" in summary["methods"]:
        lines += [
            "",
            "vs Adam: mean final training loss / uniform Adam's, the seeds on which it is "
            "lower (same initialization and keys per seed), and the verdict: better if lower "
            "on at least 3/4 of the seeds and by more than 5% on average, worse if lower on at "
            "most 1/4 and higher by more than 5%, else tie.",
        ]
    diverged = {
        name: m["num_diverged"] for name, m in summary["methods"].items() if m["num_diverged"]
    }
    if diverged:
        lines += ["", f"Diverged (non-finite final loss) seeds: {diverged}."]
    if show_ess:
        lines += [
            "",
            "Final ESS of p: effective sample size 1/(n sum_j p_j^2) of the sampler's "
            "distribution at the end of training (1 = uniform; smaller = more concentrated)."
            " Final V(p)/V(u): its gradient-variance term sum_j g_j^2/(n^2 p_j) relative "
            "to uniform's, g_j the exact per-example gradient norms at the final "
            "parameters (1 = as good as uniform, lower is better; "
            "experiments/diagnostics.py).",
        ]
    if config.target_loss is not None:
        lines += [
            "",
            f"Time/steps to target: mean ± std over the seeds that reached a full "
            f"training loss ≤ {config.target_loss:g} (evaluated every {config.eval_every} "
            "steps), and how many did.",
        ]
    if config.table_layout == "lahire":
        lines += ["", lahire_table(summary)]
    return lines + ["", "Timing: " + summary["timing_note"], ""]


def markdown_table(config: ExperimentConfig, summary: dict) -> str:
    """``table.md``: one row per method (and Lahire's Table 1 layout if configured); a
    compute-matched run's: ``experiments.budget_report.budget_table``."""
    if "compute_matched" in summary:
        return budget_report.budget_table(config, summary)
    target, show_ess = config.target_loss, _shows_ess(summary)
    extra = _extra_columns(summary)
    header = _table_header(target, show_ess) + [h for h, _ in extra]
    lines = _table_intro(config, summary)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in summary["methods"].items():
        row = _table_row(name, m, target, show_ess, versus_adam(summary, name))
        row += [cell(name, m) for _, cell in extra]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + _table_notes(config, summary, show_ess))


def lahire_table(summary: dict) -> str:
    """Lahire's Table 1 layout: wall-clock per run (s), rows sampling, columns optimizer."""
    methods = summary["methods"]
    optimizers = [o for o in ("sgd", "rmsprop", "adam") if o in methods or f"{o}-gn" in methods]
    lines = [
        "Wall-clock time (s) per run (Lahire Table 1 layout; mean ± std over seeds):",
        "",
        "| sampling | "
        + " | ".join(
            o.upper() if o == "sgd" else o.capitalize() if o == "adam" else "RMSProp"
            for o in optimizers
        )
        + " |",
        "|" + "---|" * (len(optimizers) + 1),
    ]
    for sampling, suffix in (("u", ""), ("p^GN", "-gn")):
        cells = []
        for o in optimizers:
            m = methods.get(o + suffix)
            cells.append(aggregate.format_mean_std(m["train_time_per_run_s"]) if m else "—")
        lines.append(f"| {sampling} | " + " | ".join(cells) + " |")
    if "adambs" in methods:
        lines += [
            "",
            "AdamBS: "
            + aggregate.format_mean_std(methods["adambs"]["train_time_per_run_s"])
            + " s per run.",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def write_outputs(
    out_dir: Path,
    config: ExperimentConfig,
    summary: dict,
    rows: list[dict],
    results: Sequence[MethodResult],
) -> None:
    from experiments import plotting

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(to_jsonable(row)) + "\n")
    table = markdown_table(config, summary)
    (out_dir / "table.md").write_text(table)
    summary["files"] = {
        "metrics": "metrics.jsonl",
        "table": "table.md",
        "plots": plotting.plot_all(out_dir, config, summary),
    }
    with open(out_dir / "summary.json", "w") as f:
        json.dump(to_jsonable(summary), f, indent=1)
