"""Tests for experiments.budget_report: the summary and table of a compute-matched run, on
synthetic method results with different horizons T_m."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.budget_report import add_budget_summary, budget_table, equal_steps
from experiments.configs import ExperimentConfig
from experiments.method_run import MethodResult
from experiments.reports import build_summary, markdown_table

CONFIG = ExperimentConfig(
    name="synthetic",
    description="Two made-up methods.",
    dataset="iris",
    model="lahire-mlp",
    methods=("adam", "adam-gn"),
    learning_rate=0.01,
    batch_size=5,
    num_steps=10,
    num_seeds=2,
    eval_every=10,
    target_loss=0.5,
    budget_seconds=2.0,
)
RESOLVED = {
    "num_train": 120,
    "num_eval_train": 120,
    "num_eval_test": 30,
    "num_steps": {"adam": 30, "adam-gn": 15},
    "seeds": [0, 1],
    "loop": "scan",
}


def result(name, steps, losses, diagnostics):
    losses = np.asarray(losses, dtype=float)
    times = np.tile(np.linspace(0.0, 2.1, len(steps)), (2, 1))
    return MethodResult(
        name=name,
        label=name.upper(),
        settings={},
        compile_s=1.0,
        warmup_s=0.1,
        steps=steps,
        times=times,
        train_loss=losses,
        train_error=losses / 2,
        test_loss=losses,
        test_error=losses / 4,
        step_times=np.array([0.07, 0.07]),
        chunk_times=[[2.1], [2.1]],
        final_diagnostics=[diagnostics, diagnostics],
    )


def synthetic():
    results = [
        result("adam", [0, 10, 20, 30], [[1.0, 0.6, 0.4, 0.3], [1.0, 0.8, 0.6, 0.5]], {}),
        result(
            "adam-gn", [0, 10, 15], [[1.0, 0.5, 0.7], [1.0, 0.7, 0.9]], {"variance_ratio": 0.25}
        ),
    ]
    rates = {
        "adam": {"steps_per_s": 15.2, "chunk_steps": 10, "chunk_s": [0.6, 0.7]},
        "adam-gn": {"steps_per_s": 7.9, "chunk_steps": 10, "chunk_s": [1.2, 1.3]},
    }
    summary = build_summary(CONFIG, RESOLVED, results)
    add_budget_summary(summary, CONFIG, rates, results)
    return summary, results


def test_equal_steps_is_the_largest_common_evaluation_step():
    _, results = synthetic()
    assert equal_steps(results) == 10
    assert equal_steps(results[:1]) == 30


def test_budget_summary():
    summary, _ = synthetic()
    assert summary["compute_matched"]["budget_s"] == 2.0
    assert summary["compute_matched"]["equal_steps"] == 10
    adam, gn = summary["methods"]["adam"], summary["methods"]["adam-gn"]
    assert adam["num_steps"] == 30 and gn["num_steps"] == 15
    assert adam["steps_per_s"] == 15.2
    assert adam["at_equal_steps"]["train_loss"]["mean"] == pytest.approx(0.7)
    assert gn["at_equal_steps"]["train_loss"]["mean"] == pytest.approx(0.6)
    assert gn["at_equal_steps"]["test_error"]["mean"] == pytest.approx(0.15)
    assert adam["final_train_loss"]["mean"] == pytest.approx(0.4)  # at the budget
    assert adam["budget_time_ratio"]["mean"] == pytest.approx(2.1 / 2.0)
    # adam-gn's loss went up again: it was under the target at no evaluated point
    assert gn["time_to_target_s"]["reached"] == 1 and adam["time_to_target_s"]["reached"] == 2


def test_budget_table():
    summary, _ = synthetic()
    text = markdown_table(CONFIG, summary)  # dispatches on the compute_matched section
    assert text == budget_table(CONFIG, summary)
    lines = text.splitlines()
    assert lines[0] == "# synthetic: compute-matched, 2 s per run"
    header = next(line for line in lines if line.startswith("| method"))
    assert "train loss at step 10" in header and header.endswith("final V(p)/V(u) |")
    adam = next(line for line in lines if "(`adam`)" in line)
    gn = next(line for line in lines if "(`adam-gn`)" in line)
    assert "| 15.2 | 30 | 0.4 ± 0.14 |" in adam and adam.endswith("| — |")
    assert "(1/2)" in gn and gn.endswith("| 0.25 ± 0 |")
    assert "No Train No Gain" in text
