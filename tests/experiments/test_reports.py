"""Tests for experiments.reports: the summary of a run and its markdown table, on synthetic
method results."""

from __future__ import annotations

import numpy as np

from experiments.configs import ExperimentConfig
from experiments.method_run import MethodResult
from experiments.reports import build_summary, markdown_table

CONFIG = ExperimentConfig(
    name="synthetic",
    description="Two made-up methods.",
    dataset="iris",
    model="lahire-mlp",
    methods=("adam", "adambs"),
    learning_rate=0.01,
    batch_size=5,
    num_steps=10,
    num_seeds=2,
    eval_every=5,
    target_loss=0.5,
    table_layout="lahire",
)
RESOLVED = {
    "num_train": 120,
    "num_eval_train": 120,
    "num_eval_test": 30,
    "num_steps": 10,
    "seeds": [0, 1],
    "loop": "scan",
}


def result(name, label, final_loss, diagnostics):
    curve = np.array([[1.0, 0.8, final_loss], [1.0, 0.7, final_loss]])
    return MethodResult(
        name=name,
        label=label,
        settings={},
        compile_s=1.25,
        warmup_s=0.1,
        steps=[0, 5, 10],
        times=np.array([[0.0, 0.1, 0.2], [0.0, 0.1, 0.2]]),
        train_loss=curve,
        train_error=curve / 2,
        test_loss=curve,
        test_error=curve / 4,
        step_times=np.array([0.02, 0.02]),
        chunk_times=[[0.2], [0.2]],
        final_diagnostics=[diagnostics, diagnostics],
    )


def synthetic_summary():
    results = [
        result("adam", "Adam", 0.6, {}),
        result("adambs", "AdamBS", 0.4, {"effective_sample_size": 0.9, "variance_ratio": 1.5}),
    ]
    return build_summary(CONFIG, RESOLVED, results)


def test_summary_aggregates_each_method():
    summary = synthetic_summary()
    assert list(summary["methods"]) == ["adam", "adambs"]
    assert "final_sampler_diagnostics" not in summary["methods"]["adam"]
    ess = summary["methods"]["adambs"]["final_sampler_diagnostics"]["effective_sample_size"]
    assert ess == {"mean": 0.9, "std": 0.0}
    assert summary["methods"]["adambs"]["steps_to_target"]["per_seed"] == [10.0, 10.0]
    assert summary["config"]["name"] == "synthetic" and "compilation" in summary["timing_note"]


def test_markdown_table_rows_and_notes():
    text = markdown_table(CONFIG, synthetic_summary())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header.split(" | ")[-2:] == ["final ESS of p", "final V(p)/V(u) |"]
    assert "time to loss ≤ 0.5 (s)" in header
    adam = next(line for line in lines if "(`adam`)" in line)
    adambs = next(line for line in lines if "(`adambs`)" in line)
    assert "never (0/2)" in adam and adam.endswith("| 1.25 | — | — |")
    assert "10 ± 0 (2/2)" in adambs and adambs.endswith("| 0.9 ± 0 | 1.5 ± 0 |")
    assert "all 120 training examples, test error on 30 test examples." in text
    assert "Lahire Table 1 layout" in text and text.endswith("measured here.\n")


def test_versus_adam_compares_seed_by_seed():
    from experiments.reports import versus_adam

    def method(per_seed):
        return {
            "final_train_loss": {"mean": float(np.mean(per_seed))},
            "final_train_loss_per_seed": per_seed,
        }

    summary = {
        "methods": {
            "adam": method([1.0, 1.0, 1.0, 1.0]),
            "better": method([0.5, 0.5, 0.5, 2.0]),
            "worse": method([2.0, 2.0, 2.0, 0.5]),
            "tie": method([0.5, 0.5, 2.0, 2.0]),
        }
    }
    assert versus_adam(summary, "better") == "0.88x, lower 3/4: better"
    assert versus_adam(summary, "worse") == "1.62x, lower 1/4: worse"
    assert versus_adam(summary, "tie").endswith("lower 2/4: tie")
    assert versus_adam(summary, "adam") == "—"
    summary["methods"]["close"] = method([1.01, 1.01, 1.01, 1.01])  # within 5%: a tie
    assert versus_adam(summary, "close") == "1.01x, lower 0/4: tie"
