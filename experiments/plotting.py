"""Plots of a run: mean over seeds (line) and ± one std (shaded band), one color per method.

* ``loss_vs_time.png``: full training loss (solid) vs training wall-clock, and the
  sampled-batch loss (``sampled_loss``, dashed, same color): the plain mean of the losses
  of the batches the sampler drew, averaged over the evaluation interval that ends at the
  point. Under a non-uniform sampler the two differ (p^GN draws the hard examples, so its
  batches' losses overstate the training loss many times); under uniform sampling the
  dashed line is a noisy estimate of the solid one. The x value of each evaluation point
  is the mean over seeds of the time at which it was reached (every seed of a method
  evaluates at the same steps).
* ``loss_vs_steps.png``: the same two losses vs steps.
* ``error_vs_steps.png``: test error rate vs steps (training error rates are in
  ``metrics.jsonl``).
* ``diagnostics_vs_steps.png`` (if a method's sampler has a full distribution p): the
  Spearman correlation between p and the exact per-example gradient norms, and the
  variance ratio V(p)/V(u) (log scale; 1 = uniform) with p^GN's optimum V(p*)/V(u) dotted,
  vs steps (``experiments.diagnostics``).

Small files (dpi 90), matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 90
FIGSIZE = (6.4, 4.2)
DIAGNOSTIC_CURVES = ("spearman_p_vs_grad_norm", "variance_ratio")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _band(ax, x, mean, std, label, color, log_scale, linestyle="-", linewidth=1.6):
    ax.plot(x, mean, label=label, color=color, linestyle=linestyle, linewidth=linewidth)
    lower, upper = mean - std, mean + std
    if log_scale:  # a band below zero cannot be drawn on a log axis: clip at a fraction of the mean
        lower = np.maximum(lower, mean * 0.05)
    ax.fill_between(
        x, lower, upper, color=color, alpha=0.18 if linestyle == "-" else 0.08, linewidth=0
    )


def _positive(values) -> bool:
    values = values[np.isfinite(values)]
    return values.size > 0 and bool(np.all(values > 0))


def method_colors(method_names) -> dict:
    """``name -> color``: one color per method (matplotlib's tab10, tab20 beyond 10)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(method_names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(method_names)}


def _x_values(m: dict, x_key: str) -> np.ndarray:
    return _array(m["curve_time_mean"]) if x_key == "time" else np.asarray(m["steps"], float)


def _loss_name(config, summary) -> str:
    if getattr(config, "eval_informative_only", False):
        return "training loss (examples with a nonzero feature)"
    if getattr(config, "eval_train_examples", None):
        return f"training loss (first {summary['resolved']['num_eval_train']} examples)"
    return "full training loss"


def plot_loss(path: Path, config, summary: dict, title: str, x_key: str, x_label: str) -> None:
    """Full training loss (solid) and sampled-batch loss (dashed) per method vs ``x_key``."""
    plt = _pyplot()
    methods = summary["methods"]
    colors = method_colors(list(methods))
    curves = [_array(m["curve_train_loss_mean"]) for m in methods.values()]
    curves += [
        _array(m["curve_sampled_loss_mean"])
        for m in methods.values()
        if "curve_sampled_loss_mean" in m
    ]
    log_loss = bool(config.loss_log_scale) and _positive(np.concatenate(curves))
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, m in methods.items():
        x = _x_values(m, x_key)
        _band(
            ax,
            x,
            _array(m["curve_train_loss_mean"]),
            _array(m["curve_train_loss_std"]),
            m["label"],
            colors[name],
            log_loss,
        )
        if "curve_sampled_loss_mean" in m:
            _band(
                ax,
                x,
                _array(m["curve_sampled_loss_mean"]),
                _array(m["curve_sampled_loss_std"]),
                None,
                colors[name],
                log_loss,
                "--",
                1.0,
            )
    ax.plot([], [], color="gray", linestyle="--", linewidth=1.0, label="dashed: sampled-batch loss")
    if log_loss:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(_loss_name(config, summary) + (" (log scale)" if log_loss else ""))
    if config.target_loss is not None:
        ax.axhline(
            config.target_loss,
            color="gray",
            linestyle=":",
            linewidth=1,
            label=f"target {config.target_loss:g}",
        )
    if x_key == "time" and getattr(config, "budget_seconds", None) is not None:
        ax.axvline(
            config.budget_seconds,
            color="black",
            linestyle="-.",
            linewidth=0.8,
            label=f"budget {config.budget_seconds:g} s",
        )
    _finish(fig, ax, title, path)


def plot_error(path: Path, config, summary: dict, title: str) -> None:
    """Test error rate per method vs steps."""
    plt = _pyplot()
    methods = summary["methods"]
    colors = method_colors(list(methods))
    all_errors = np.concatenate([_array(m["curve_test_error_mean"]) for m in methods.values()])
    log_error = bool(config.loss_log_scale) and _positive(all_errors)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, m in methods.items():
        _band(
            ax,
            np.asarray(m["steps"], float),
            100 * _array(m["curve_test_error_mean"]),
            100 * _array(m["curve_test_error_std"]),
            m["label"],
            colors[name],
            log_error,
        )
    if log_error:
        ax.set_yscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test error rate (%)" + (" (log scale)" if log_error else ""))
    _finish(fig, ax, title, path)


def has_diagnostics(summary: dict) -> bool:
    return any(f"curve_{DIAGNOSTIC_CURVES[0]}_mean" in m for m in summary["methods"].values())


def plot_diagnostics(path: Path, summary: dict, title: str) -> None:
    """Spearman(p, g) (top) and V(p)/V(u) (bottom, log; optimum dotted) per method vs steps."""
    plt = _pyplot()
    methods = summary["methods"]
    colors = method_colors(list(methods))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * 1.5), sharex=True)
    for name, m in methods.items():
        if f"curve_{DIAGNOSTIC_CURVES[0]}_mean" not in m:
            continue
        steps = np.asarray(m["steps"], float)
        for ax, key in zip((top, bottom), DIAGNOSTIC_CURVES):
            _band(
                ax,
                steps,
                _array(m[f"curve_{key}_mean"]),
                _array(m[f"curve_{key}_std"]),
                m["label"],
                colors[name],
                ax is bottom,
            )
        bottom.plot(
            steps,
            _array(m["curve_variance_ratio_optimal_mean"]),
            color=colors[name],
            linestyle=":",
            linewidth=1.0,
        )
    top.axhline(0.0, color="gray", linewidth=0.8)
    bottom.axhline(1.0, color="gray", linewidth=0.8, label="uniform (1)")
    bottom.plot([], [], color="gray", linestyle=":", label="dotted: optimum p ∝ g")
    top.set_ylabel("Spearman(p, grad norms)")
    bottom.set_ylabel("V(p) / V(uniform) (log scale)")
    bottom.set_yscale("log")
    bottom.set_xlabel("training steps")
    top.set_title(title, fontsize=9)
    top.grid(True, alpha=0.3)
    _finish(fig, bottom, None, path)


def plot_all(out_dir: Path, config, summary: dict) -> list[str]:
    """Writes the plots into ``out_dir``; returns their file names."""
    num_seeds = len(summary["resolved"]["seeds"])
    title = (
        f"{config.name}: {config.dataset}, {config.model}, "
        f"mean ± std over {num_seeds} seed{'s' if num_seeds > 1 else ''}"
    )
    if getattr(config, "budget_seconds", None) is not None:
        title += f", budget {config.budget_seconds:g} s"
    plot_loss(
        out_dir / "loss_vs_time.png",
        config,
        summary,
        title,
        "time",
        "training wall-clock (s, compilation excluded)",
    )
    plot_loss(out_dir / "loss_vs_steps.png", config, summary, title, "steps", "training steps")
    plot_error(out_dir / "error_vs_steps.png", config, summary, title)
    written = ["loss_vs_time.png", "loss_vs_steps.png", "error_vs_steps.png"]
    if has_diagnostics(summary):
        plot_diagnostics(out_dir / "diagnostics_vs_steps.png", summary, title)
        written.append("diagnostics_vs_steps.png")
    return written


def _finish(fig, ax, title, path):
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
