"""Plots of a run: mean over seeds (line) and ± one std (shaded band), one line per method.

* ``loss_vs_time.png``: full training loss vs training wall-clock. The x value of each
  evaluation point is the mean over seeds of the time at which it was reached (every seed
  of a method evaluates at the same steps).
* ``loss_vs_steps.png``: full training loss vs steps.
* ``error_vs_steps.png``: test error rate vs steps (training error rates are in
  ``metrics.jsonl``).

Small files (dpi 90), matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 90
FIGSIZE = (6.4, 4.2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _band(ax, x, mean, std, label, color, log_scale, linestyle="-"):
    ax.plot(x, mean, label=label, color=color, linestyle=linestyle, linewidth=1.6)
    lower, upper = mean - std, mean + std
    if log_scale:  # a band below zero cannot be drawn on a log axis: clip at a fraction of the mean
        lower = np.maximum(lower, mean * 0.05)
    ax.fill_between(x, lower, upper, color=color, alpha=0.18, linewidth=0)


def _positive(values) -> bool:
    values = values[np.isfinite(values)]
    return values.size > 0 and bool(np.all(values > 0))


def line_styles(method_names, colors) -> dict:
    """``name -> (color, linestyle)``: a method and its p^GN variant (``x`` and ``x-gn``)
    share a color, the p^GN one dashed (Lahire's Fig. 1 pairs)."""
    bases = []
    for name in method_names:
        base = name[:-3] if name.endswith("-gn") else name
        if base not in bases:
            bases.append(base)
    return {
        name: (colors[bases.index(name[:-3] if name.endswith("-gn") else name) % len(colors)],
               "--" if name.endswith("-gn") else "-")
        for name in method_names
    }


def plot_all(out_dir: Path, config, summary: dict) -> list[str]:
    """Writes the three plots into ``out_dir``; returns their file names."""
    plt = _pyplot()
    methods = summary["methods"]
    styles = line_styles(list(methods), plt.rcParams["axes.prop_cycle"].by_key()["color"])
    num_seeds = len(summary["resolved"]["seeds"])
    title = (f"{config.name}: {config.dataset}, {config.model}, "
             f"mean ± std over {num_seeds} seed{'s' if num_seeds > 1 else ''}")
    all_losses = np.concatenate([_array(m["curve_train_loss_mean"]) for m in methods.values()])
    log_loss = bool(config.loss_log_scale) and _positive(all_losses)
    loss_name = "full training loss"
    if getattr(config, "eval_informative_only", False):
        loss_name = "training loss (examples with a nonzero feature)"
    elif getattr(config, "eval_train_examples", None):
        loss_name = f"training loss (first {summary['resolved']['num_eval_train']} examples)"
    written = []

    for file_name, x_key, x_label in (
        ("loss_vs_time.png", "time", "training wall-clock (s, compilation excluded)"),
        ("loss_vs_steps.png", "steps", "training steps"),
    ):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for name, m in methods.items():
            x = _array(m["curve_time_mean"]) if x_key == "time" else np.asarray(m["steps"], float)
            _band(ax, x, _array(m["curve_train_loss_mean"]), _array(m["curve_train_loss_std"]),
                  m["label"], *styles[name][:1], log_loss, styles[name][1])
        if log_loss:
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(loss_name + (" (log scale)" if log_loss else ""))
        if config.target_loss is not None:
            ax.axhline(config.target_loss, color="gray", linestyle=":", linewidth=1,
                       label=f"target {config.target_loss:g}")
        _finish(fig, ax, title, out_dir / file_name)
        written.append(file_name)

    fig, ax = plt.subplots(figsize=FIGSIZE)
    all_errors = np.concatenate([_array(m["curve_test_error_mean"]) for m in methods.values()])
    log_error = bool(config.loss_log_scale) and _positive(all_errors)
    for name, m in methods.items():
        steps = np.asarray(m["steps"], float)
        _band(ax, steps, 100 * _array(m["curve_test_error_mean"]),
              100 * _array(m["curve_test_error_std"]), m["label"], styles[name][0], log_error,
              styles[name][1])
    if log_error:
        ax.set_yscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test error rate (%)" + (" (log scale)" if log_error else ""))
    _finish(fig, ax, title, out_dir / "error_vs_steps.png")
    written.append("error_vs_steps.png")
    return written


def _finish(fig, ax, title, path):
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
