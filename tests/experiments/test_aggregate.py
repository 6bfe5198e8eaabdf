"""Tests for experiments.aggregate: mean/std over seeds, time-to-target, the per-method
summary and its formatting, on synthetic numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import aggregate


def test_mean_and_std_over_seeds():
    values = np.array([[1.0, 2.0, 4.0], [3.0, 2.0, 8.0]])
    mean, std = aggregate.mean_and_std(values)
    np.testing.assert_allclose(mean, [2.0, 2.0, 6.0])
    np.testing.assert_allclose(std, [math.sqrt(2), 0.0, math.sqrt(8)])  # ddof = 1
    mean, std = aggregate.mean_and_std(values[:1])
    np.testing.assert_allclose(mean, values[0])
    np.testing.assert_allclose(std, 0.0)
    mean, _ = aggregate.mean_and_std([[1.0, np.nan], [2.0, 1.0]])
    assert mean[0] == 1.5 and np.isnan(mean[1])  # a diverged seed is not hidden


def test_time_to_target():
    times = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 4.0, 6.0], [0.0, 1.0, 2.0, 3.0]])
    losses = np.array([[2.0, 1.0, 0.4, 0.3], [2.0, 0.5, 0.2, 0.1], [2.0, 1.5, 1.2, np.nan]])
    crossings = aggregate.time_to_target(times, losses, target=0.5)
    np.testing.assert_array_equal(crossings, [2.0, 2.0, np.inf])  # <= target counts
    summary = aggregate.summarize_crossings(crossings)
    assert summary["reached"] == 2 and summary["num_seeds"] == 3
    assert summary["mean"] == 2.0 and summary["std"] == 0.0
    assert summary["median"] == 2.0
    assert summary["per_seed"] == [2.0, 2.0, None]
    never = aggregate.summarize_crossings([np.inf, np.inf])
    assert never["reached"] == 0 and math.isnan(never["mean"]) and never["median"] == np.inf
    assert aggregate.first_crossing([0, 10, 20], [3.0, 2.0, 1.0], 0.5) == math.inf
    assert aggregate.first_crossing([0, 10, 20], [3.0, 2.0, 1.0], 3.0) == 0.0


def test_method_aggregates():
    steps = [0, 10, 20]
    times = [[0.0, 0.1, 0.2], [0.0, 0.3, 0.6]]
    train_loss = [[1.0, 0.5, 0.25], [1.0, 0.7, 0.45]]
    test_error = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.4]]
    out = aggregate.method_aggregates(
        steps=steps,
        times=times,
        train_loss=train_loss,
        test_error=test_error,
        step_times=[0.01, 0.03],
        compile_s=1.5,
        target_loss=0.5,
    )
    assert out["num_seeds"] == 2 and out["num_diverged"] == 0
    np.testing.assert_allclose(out["curve_train_loss_mean"], [1.0, 0.6, 0.35])
    np.testing.assert_allclose(out["curve_time_mean"], [0.0, 0.2, 0.4])
    assert out["final_train_loss"]["mean"] == pytest.approx(0.35)
    assert out["final_train_loss"]["std"] == pytest.approx(math.sqrt(0.02))
    assert out["final_test_error"]["mean"] == pytest.approx(0.3)
    assert out["time_per_step_s"]["mean"] == pytest.approx(0.02)
    assert out["train_time_per_run_s"]["mean"] == pytest.approx(0.4)
    assert out["time_to_target_s"]["per_seed"] == [0.1, 0.6]
    assert out["steps_to_target"]["per_seed"] == [10.0, 20.0]
    assert out["compile_s"] == 1.5
    diverged = aggregate.method_aggregates(
        steps=[0, 1],
        times=[[0, 1], [0, 1]],
        train_loss=[[1.0, np.nan], [1.0, 0.5]],
        test_error=[[0.5, 0.5], [0.5, 0.5]],
    )
    assert diverged["num_diverged"] == 1 and diverged["curve_train_loss_mean"][1] is None


def test_format_mean_std():
    assert aggregate.format_mean_std({"mean": 0.12345, "std": 0.01}) == "0.123 ± 0.01"
    assert aggregate.format_mean_std({"mean": 0.02, "std": 0.001}, scale=100) == "2 ± 0.1"
    assert aggregate.format_mean_std({"mean": float("nan"), "std": 0.0}) == "nan"
