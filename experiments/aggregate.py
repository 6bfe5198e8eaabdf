"""Aggregation over seeds: mean/std bands, time-to-target, the per-method summary.

``python -m experiments.aggregate FOLDERS`` writes the summary tables of several runs
(method x configuration, per step and per second: ``experiments.results_table``).

Everything here is plain numpy on arrays shaped ``(num_seeds, num_eval_points)``: one row
per seed, one column per evaluation point (the same steps for every seed of a method).
A non-finite value (a diverged run) propagates into the mean: it is reported, not hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_and_std(values) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof = 1) over seeds (axis 0).

    With a single seed the std is 0 (no spread to show). NaNs propagate.

    Args:
      values: ``(num_seeds, num_points)`` (or ``(num_seeds,)``).
    Returns:
      ``(mean, std)``, each ``(num_points,)`` (or scalars for 1-D input).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"need at least one seed, got shape {values.shape}")
    mean = values.mean(axis=0)
    if values.shape[0] == 1:
        return mean, np.zeros_like(mean)
    return mean, values.std(axis=0, ddof=1)


def first_crossing(x, losses, target: float) -> float:
    """The first ``x`` (time or step) at which ``losses <= target``; ``inf`` if never.

    Evaluated at the recorded points only (no interpolation between them), so the answer
    is exact up to the evaluation interval. NaN losses never count as reaching the target.
    """
    x = np.asarray(x, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if x.shape != losses.shape or x.ndim != 1:
        raise ValueError(f"x and losses must be 1-D of equal length, got {x.shape}, {losses.shape}")
    reached = np.flatnonzero(losses <= target)  # NaN <= target is False
    return float(x[reached[0]]) if reached.size else math.inf


def time_to_target(times, losses, target: float) -> np.ndarray:
    """Per seed, the first wall-clock time at which the loss is <= ``target`` (inf: never).

    Args:
      times, losses: ``(num_seeds, num_points)``; ``times`` cumulative training seconds.
      target: the target loss.
    Returns:
      ``(num_seeds,)`` float64.
    """
    times = np.atleast_2d(np.asarray(times, dtype=np.float64))
    losses = np.atleast_2d(np.asarray(losses, dtype=np.float64))
    if times.shape != losses.shape:
        raise ValueError(f"times {times.shape} and losses {losses.shape} differ")
    return np.array([first_crossing(t, loss, target) for t, loss in zip(times, losses)])


def summarize_crossings(crossings) -> dict:
    """Summary of per-seed crossing times/steps (``inf`` = never reached).

    Returns a dict: ``reached`` (count), ``num_seeds``, ``mean`` and ``std`` over the seeds
    that reached the target (NaN if none), ``median`` over all seeds (inf if fewer than
    half reached it), and the raw ``per_seed`` values (inf as None for JSON).
    """
    values = np.asarray(crossings, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size:
        mean, std = mean_and_std(finite)
        mean, std = float(mean), float(std)
    else:
        mean = std = math.nan
    return {
        "reached": int(finite.size),
        "num_seeds": int(values.size),
        "mean": mean,
        "std": std,
        "median": float(np.median(values)) if values.size else math.nan,
        "per_seed": [float(v) if math.isfinite(v) else None for v in values],
    }


def method_aggregates(
    *,
    steps: Sequence[int],
    times,
    train_loss,
    test_error,
    train_error=None,
    step_times=None,
    compile_s: float = math.nan,
    target_loss: float | None = None,
) -> dict:
    """The per-method numbers of ``summary.json`` and ``table.md``.

    Args:
      steps: ``(num_points,)`` the steps at which the run was evaluated (0 first).
      times: ``(num_seeds, num_points)`` cumulative training wall-clock seconds.
      train_loss, test_error, train_error: ``(num_seeds, num_points)``.
      step_times: ``(num_seeds,)`` mean seconds per training step of each seed.
      compile_s: compilation seconds of the method's training chunk.
      target_loss: the target training loss for time-to-target (None: skipped).
    """
    steps = np.asarray(steps)
    times = np.atleast_2d(np.asarray(times, dtype=np.float64))
    train_loss = np.atleast_2d(np.asarray(train_loss, dtype=np.float64))
    test_error = np.atleast_2d(np.asarray(test_error, dtype=np.float64))
    loss_mean, loss_std = mean_and_std(train_loss)
    err_mean, err_std = mean_and_std(test_error)
    time_mean, _ = mean_and_std(times)
    final_loss = train_loss[:, -1]
    out = {
        "num_seeds": int(train_loss.shape[0]),
        "num_diverged": int(np.sum(~np.isfinite(final_loss))),
        "steps": [int(s) for s in steps],
        "curve_time_mean": floats(time_mean),
        "curve_train_loss_mean": floats(loss_mean),
        "curve_train_loss_std": floats(loss_std),
        "curve_test_error_mean": floats(err_mean),
        "curve_test_error_std": floats(err_std),
        "final_train_loss": mean_std_dict(final_loss),
        "final_train_loss_per_seed": floats(final_loss),
        "final_test_error": mean_std_dict(test_error[:, -1]),
        "train_time_per_run_s": mean_std_dict(times[:, -1]),
        "compile_s": float(compile_s),
    }
    if train_error is not None:
        train_error = np.atleast_2d(np.asarray(train_error, dtype=np.float64))
        out["final_train_error"] = mean_std_dict(train_error[:, -1])
    if step_times is not None:
        out["time_per_step_s"] = mean_std_dict(np.asarray(step_times, dtype=np.float64))
    if target_loss is not None:
        out["target_loss"] = float(target_loss)
        out["time_to_target_s"] = summarize_crossings(
            time_to_target(times, train_loss, target_loss)
        )
        out["steps_to_target"] = summarize_crossings(
            time_to_target(np.broadcast_to(steps, train_loss.shape), train_loss, target_loss)
        )
    return out


def mean_std_dict(values) -> dict:
    """``{"mean", "std"}`` over seeds of a 1-D sequence (std with ddof = 1)."""
    mean, std = mean_and_std(np.asarray(values, dtype=np.float64))
    return {"mean": float(mean), "std": float(std)}


def floats(values) -> list:
    """A JSON-ready list of floats (non-finite values as None: gaps in the plots)."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def format_mean_std(stats: dict, *, scale: float = 1.0, digits: int = 3) -> str:
    """``"mean ± std"`` of a ``{"mean", "std"}`` dict, each times ``scale``."""
    mean, std = stats["mean"] * scale, stats["std"] * scale
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.{digits}g} ± {std:.{digits - 1}g}" if digits > 1 else f"{mean:.0f} ± {std:.0f}"


if __name__ == "__main__":  # python -m experiments.aggregate FOLDERS: experiments.results_table
    import sys

    from experiments.results_table import main

    sys.exit(main())
