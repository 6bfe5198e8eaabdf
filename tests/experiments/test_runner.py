"""Tests for the experiment runner: end to end on a tiny configuration, the aggregation on
synthetic numbers, the chunk plan, the method registry, the configurations and the CLI."""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import aggregate
from experiments.__main__ import main
from experiments.configs import CONFIGS, ExperimentConfig, get_config
from experiments.methods import METHODS, build_method, list_methods, method_available
from experiments.runner import (
    chunk_plan,
    eval_points,
    make_chunk,
    reduce_step_metrics,
    run_experiment,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss_vs_time.png", "loss_vs_steps.png", "error_vs_steps.png")


# --------------------------------------------------------------------------- end to end


def tiny_config(**changes) -> ExperimentConfig:
    methods = ("adam", "adambs") + tuple(m for m in ("adam-gn",) if method_available(m))
    config = ExperimentConfig(
        name="tiny", description="tiny end-to-end check", dataset="iris", model="lahire-mlp",
        methods=methods, learning_rate=0.01, batch_size=5, num_steps=12, num_seeds=2,
        eval_every=4, chunk_steps=8, target_loss=1.0, table_layout="lahire",
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
    assert "final ESS of p" in table  # adambs learns a distribution


def test_runner_metrics_rows(tiny_run):
    config, out, _ = tiny_run
    rows = read_rows(out)
    # 12 steps, eval every 4: points at 0, 4, 8, 12 (chunks of 8 -> divisor 1 of 3 intervals)
    assert len(rows) == len(config.methods) * config.num_seeds * 4
    for row in rows:
        assert {"method", "seed", "step", "time_s", "train_loss", "train_error",
                "test_loss", "test_error"} <= set(row)
    # the same initialization for every method of a seed
    for seed in range(config.num_seeds):
        initial = {r["method"]: r["train_loss"] for r in rows if r["seed"] == seed and r["step"] == 0}
        assert len(set(initial.values())) == 1, initial
    # ... and different initializations for different seeds
    assert len({r["train_loss"] for r in rows if r["step"] == 0}) == config.num_seeds
    # time is cumulative, starts at 0 and grows
    for method in config.methods:
        times = [r["time_s"] for r in rows if r["method"] == method and r["seed"] == 0]
        assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    # the sampler diagnostics of AdamBS are there (at chunk ends)
    assert any("effective_sample_size" in r for r in rows if r["method"] == "adambs")


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
    for name, m in summary["methods"].items():
        assert m["num_seeds"] == 2
        assert len(m["curve_train_loss_mean"]) == 4
        assert m["compile_s"] > 0
        assert m["time_per_step_s"]["mean"] > 0
        assert math.isclose(m["train_time_per_run_s"]["mean"],
                            m["time_per_step_s"]["mean"] * 12, rel_tol=1e-6)
        assert m["time_to_target_s"]["num_seeds"] == 2
        assert m["settings"]["learning_rate"] == 0.01
    ess = summary["methods"]["adambs"]["final_sampler_diagnostics"]["effective_sample_size"]
    assert 0 < ess["mean"] <= 1
    # the run learns something
    adam = summary["methods"]["adam"]
    assert adam["curve_train_loss_mean"][-1] < adam["curve_train_loss_mean"][0]


def test_runner_python_loop_matches_scan(tmp_path):
    """The two ways of running a chunk give the same training run (same keys, same steps)."""
    config = tiny_config(methods=("adambs",), num_seeds=1, num_steps=8, target_loss=None,
                         table_layout=None)
    scan = run_experiment(config.replace(loop="scan"), tmp_path / "scan", progress=False,
                          log=lambda m: None)
    python = run_experiment(config.replace(loop="python"), tmp_path / "python", progress=False,
                            log=lambda m: None)
    assert python["resolved"]["loop"] == "python"
    np.testing.assert_allclose(scan["methods"]["adambs"]["curve_train_loss_mean"],
                               python["methods"]["adambs"]["curve_train_loss_mean"], rtol=1e-4)


# --------------------------------------------------------------------------- aggregation


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
        steps=steps, times=times, train_loss=train_loss, test_error=test_error,
        step_times=[0.01, 0.03], compile_s=1.5, target_loss=0.5,
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
        steps=[0, 1], times=[[0, 1], [0, 1]], train_loss=[[1.0, np.nan], [1.0, 0.5]],
        test_error=[[0.5, 0.5], [0.5, 0.5]])
    assert diverged["num_diverged"] == 1 and diverged["curve_train_loss_mean"][1] is None


def test_format_mean_std():
    assert aggregate.format_mean_std({"mean": 0.12345, "std": 0.01}) == "0.123 ± 0.01"
    assert aggregate.format_mean_std({"mean": 0.02, "std": 0.001}, scale=100) == "2 ± 0.1"
    assert aggregate.format_mean_std({"mean": float("nan"), "std": 0.0}) == "nan"


# --------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("num_steps, eval_every, chunk_steps, expected", [
    (1000, 10, 100, [(10, 10)] * 10),
    (600, 25, 100, [(25, 4)] * 6),
    (12, 4, 8, [(4, 1)] * 3),          # 3 intervals: largest divisor <= 2 is 1
    (37, 10, 100, [(10, 3), (7, 1)]),  # remainder chunk
    (5, 10, 100, [(5, 1)]),
    (1000, 1000, 100, [(1000, 1)]),
])
def test_chunk_plan(num_steps, eval_every, chunk_steps, expected):
    plan = chunk_plan(num_steps, eval_every, chunk_steps)
    assert plan == expected
    points = eval_points(plan)
    assert points[0] == 0 and points[-1] == num_steps
    assert len(points) == 1 + sum(count for _, count in plan)


class CounterState(NamedTuple):
    params: jax.Array
    step: jax.Array


def test_make_chunk_keeps_params_and_reduces_metrics():
    def step_nt(state, data, key):  # params counts up; the metrics report the old value
        del data, key
        metrics = {"loss": state.params, "max_weight": state.params,
                   "num_dropped_feedback": jnp.ones((), jnp.int32)}
        return CounterState(state.params + 1.0, state.step + 1), metrics

    initial = CounterState(jnp.zeros(()), jnp.zeros((), jnp.int32))
    chunk = jax.jit(make_chunk(step_nt, interval=3, num_intervals=2))
    final, params_stack, metrics = chunk(initial, None, jax.random.key(0))
    assert float(final.params) == 6.0 and int(final.step) == 6
    np.testing.assert_allclose(params_stack, [3.0, 6.0])
    np.testing.assert_allclose(metrics["loss"], [1.0, 4.0])           # mean of 0,1,2 / 3,4,5
    np.testing.assert_allclose(metrics["max_weight"], [2.0, 5.0])     # max
    np.testing.assert_allclose(metrics["num_dropped_feedback"], [3.0, 3.0])  # sum
    python = reduce_step_metrics([{"loss": 0.0, "max_weight": 0.0, "num_dropped_feedback": 1},
                                  {"loss": 2.0, "max_weight": 2.0, "num_dropped_feedback": 1}])
    assert python == {"loss": [1.0], "max_weight": [2.0], "num_dropped_feedback": [2.0]}


# --------------------------------------------------------------------------- registry


def test_every_available_method_builds():
    for name in list_methods():
        if not method_available(name):
            continue
        built = build_method(name, num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
        assert built.name == name and built.label
        assert built.sampler.num_examples == 50 and built.sampler.batch_size == 4
        json.dumps(built.settings)
    tuned = build_method("adambs-tuned", num_examples=50, batch_size=4, num_steps=10,
                         learning_rate=0.1)
    assert tuned.settings["p_min"] == pytest.approx(0.5 / 50)
    paper = build_method("adambs", num_examples=50, batch_size=4, num_steps=10, learning_rate=0.1)
    assert paper.settings["p_min"] == pytest.approx(0.1 / 50)
    assert paper.feedback == "logit_grad_norm"
    assert build_method("adam", num_examples=50, batch_size=4, num_steps=10,
                        learning_rate=0.1).feedback == "loss"
    with pytest.raises(KeyError):
        build_method("nope", num_examples=5, batch_size=1, num_steps=1, learning_rate=0.1)


def test_configs_are_consistent():
    for name in ("lahire-iris", "lahire-wine", "digits-cnn", "mnist1d-mlp", "heavy-tailed",
                 "default", "paper-cifar10", "paper-cifar100", "paper-fashion-cnn",
                 "paper-mnist-lstm", "paper-fashion-lstm", "paper-imdb-rcnn"):
        config = get_config(name)
        assert config.sources, name
        assert all(m in METHODS for m in config.methods), name
    lahire = get_config("lahire-iris")
    assert (lahire.learning_rate, lahire.batch_size, lahire.num_steps, lahire.num_seeds) == (
        0.01, 5, 1000, 50)
    assert set(lahire.methods) == {"sgd", "sgd-gn", "rmsprop", "rmsprop-gn", "adam", "adam-gn",
                                   "adambs"}
    cifar = get_config("paper-cifar10")
    assert (cifar.learning_rate, cifar.batch_size, cifar.num_epochs) == (1e-3, 128, 10)
    assert cifar.steps_for(50_000) == 3907
    assert cifar.replace(max_steps=20).steps_for(50_000) == 20
    with pytest.raises(KeyError):
        get_config("nope")


# --------------------------------------------------------------------------- CLI


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in CONFIGS:
        assert name in out
    assert "adambs-tuned" in out


def test_cli_bad_arguments(capsys):
    assert main(["nope"]) == 2
    assert main(["default", "--methods", "adam,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["paper-cifar10", "--data-dir", str(tmp_path), "--no-download",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar" in err and "missing" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_runs_a_tiny_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["lahire-wine", "--seeds", "1", "--max-steps", "6", "--methods", "sgd",
                 "--eval-every", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "loss_vs_time.png" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"]["num_steps"] == 6 and summary["config"]["num_seeds"] == 1
