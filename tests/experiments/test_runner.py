"""Tests for the experiment runner (orchestration): end to end on a tiny configuration, the
two ways of running chunks giving the same run, and the names it re-exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import chunks, reports, runner, tasks
from experiments.configs import ExperimentConfig
from experiments.methods import method_available
from experiments.runner import run_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss_vs_time.png", "loss_vs_steps.png", "error_vs_steps.png", "diagnostics_vs_steps.png")


# --------------------------------------------------------------------------- end to end


def tiny_config(**changes) -> ExperimentConfig:
    methods = ("adam", "adambs") + tuple(m for m in ("adam-gn",) if method_available(m))
    config = ExperimentConfig(
        name="tiny",
        description="tiny end-to-end check",
        dataset="iris",
        model="lahire-mlp",
        methods=methods,
        learning_rate=0.01,
        batch_size=5,
        num_steps=12,
        num_seeds=2,
        eval_every=4,
        chunk_steps=8,
        target_loss=1.0,
        table_layout="lahire",
        sources={"everything": "test"},
    )
    return config.replace(**changes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    config = tiny_config()
    summary = run_experiment(config, out, progress=False, log=lambda message: None)
    return config, out, summary


def read_rows(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_runner_writes_all_files(tiny_run):
    config, out, summary = tiny_run
    for name in ("metrics.jsonl", "summary.json", "table.md", *PLOTS):
        assert (out / name).is_file(), name
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert 5_000 < len(data) < 150_000
    table = (out / "table.md").read_text()
    for method in config.methods:
        assert f"`{method}`" in table
    assert "Lahire Table 1 layout" in table
    assert "final ESS of p" in table and "final V(p)/V(u)" in table  # adambs learns a p


def test_runner_metrics_rows(tiny_run):
    config, out, _ = tiny_run
    rows = read_rows(out)
    # 12 steps, eval every 4: points at 0, 4, 8, 12 (chunks of 8 -> divisor 1 of 3 intervals)
    assert len(rows) == len(config.methods) * config.num_seeds * 4
    for row in rows:
        assert {
            "method",
            "seed",
            "step",
            "time_s",
            "train_loss",
            "train_error",
            "test_loss",
            "test_error",
        } <= set(row)
    # the same initialization for every method of a seed
    for seed in range(config.num_seeds):
        initial = {
            r["method"]: r["train_loss"] for r in rows if r["seed"] == seed and r["step"] == 0
        }
        assert len(set(initial.values())) == 1, initial
    # ... and different initializations for different seeds
    assert len({r["train_loss"] for r in rows if r["step"] == 0}) == config.num_seeds
    # time is cumulative, starts at 0 and grows
    for method in config.methods:
        times = [r["time_s"] for r in rows if r["method"] == method and r["seed"] == 0]
        assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    # the sampler diagnostics of AdamBS are there at every evaluation point
    adambs = [r for r in rows if r["method"] == "adambs"]
    for row in adambs:
        assert {
            "effective_sample_size",
            "variance_ratio",
            "variance_ratio_optimal",
            "spearman_p_vs_grad_norm",
        } <= set(row)
        assert 0 < row["variance_ratio_optimal"] <= 1
    assert [r["variance_ratio"] for r in adambs if r["step"] == 0] == [1.0, 1.0]  # uniform start
    assert all("variance_ratio" not in r for r in rows if r["method"] == "adam")
    # both losses of the train step, averaged over each interval
    assert all({"batch_loss", "batch_sampled_loss"} <= set(r) for r in rows if r["step"] > 0)


def test_runner_summary(tiny_run):
    config, out, _ = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["name"] == "tiny"
    assert summary["resolved"]["num_steps"] == 12
    assert summary["resolved"]["eval_steps"] == [0, 4, 8, 12]
    assert summary["resolved"]["seeds"] == [0, 1]
    assert summary["resolved"]["loop"] == "scan"  # an MLP on CPU
    assert {"python", "jax", "flax", "optax"} <= set(summary["versions"])
    assert {"cpu_model", "cpu_count", "jax_device_kind"} <= set(summary["machine"])
    assert "compilation" in summary["timing_note"]
    assert set(summary["methods"]) == set(config.methods)
    for m in summary["methods"].values():
        assert m["num_seeds"] == 2
        assert len(m["curve_train_loss_mean"]) == 4
        assert m["compile_s"] > 0
        assert m["time_per_step_s"]["mean"] > 0
        assert math.isclose(
            m["train_time_per_run_s"]["mean"], m["time_per_step_s"]["mean"] * 12, rel_tol=1e-6
        )
        assert m["time_to_target_s"]["num_seeds"] == 2
        assert m["settings"]["learning_rate"] == 0.01
    ess = summary["methods"]["adambs"]["final_sampler_diagnostics"]["effective_sample_size"]
    assert 0 < ess["mean"] <= 1
    # the sampled-batch loss and the diagnostics have curves (none at step 0 for the loss)
    sampled = summary["methods"]["adambs"]["curve_sampled_loss_mean"]
    assert sampled[0] is None and all(v > 0 for v in sampled[1:])
    assert len(summary["methods"]["adambs"]["curve_variance_ratio_mean"]) == 4
    assert "curve_variance_ratio_mean" not in summary["methods"]["adam"]
    # the run learns something
    adam = summary["methods"]["adam"]
    assert adam["curve_train_loss_mean"][-1] < adam["curve_train_loss_mean"][0]


def test_runner_python_loop_matches_scan(tmp_path):
    """The two ways of running a chunk give the same training run (same keys, same steps)."""
    config = tiny_config(
        methods=("adambs",), num_seeds=1, num_steps=8, target_loss=None, table_layout=None
    )
    scan = run_experiment(
        config.replace(loop="scan"), tmp_path / "scan", progress=False, log=lambda m: None
    )
    python = run_experiment(
        config.replace(loop="python"), tmp_path / "python", progress=False, log=lambda m: None
    )
    assert python["resolved"]["loop"] == "python"
    np.testing.assert_allclose(
        scan["methods"]["adambs"]["curve_train_loss_mean"],
        python["methods"]["adambs"]["curve_train_loss_mean"],
        rtol=1e-4,
    )


def test_runner_keeps_the_names_of_its_rooms():
    """Callers that imported the split-off functions from experiments.runner still can."""
    for module, names in (
        (
            chunks,
            (
                "chunk_plan",
                "eval_points",
                "make_chunk",
                "reduce_step_metrics",
                "compile_chunks",
                "choose_loop",
            ),
        ),
        (reports, ("build_summary", "markdown_table", "write_outputs")),
        (tasks, ("make_model_loss", "make_evaluator")),
    ):
        for name in names:
            assert getattr(runner, name) is getattr(module, name), name
