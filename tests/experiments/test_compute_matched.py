"""Tests for experiments.compute_matched: the decay reaches zero at T_m, the decayed optimizer
is the optimizer with the scheduled learning rate, budgets give T_m from the measured rate,
and a tiny compute-matched run end to end."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.compute_matched import (
    calibration_setup,
    decay_factor,
    steps_for_budget,
    with_decay,
)
from experiments.configs import ExperimentConfig
from experiments.runner import run_experiment


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_decay_reaches_zero_at_num_steps(shape):
    f = decay_factor(40, shape)
    assert float(f(0)) == pytest.approx(1.0)
    assert float(f(40)) == pytest.approx(0.0, abs=1e-7)
    assert float(f(60)) == pytest.approx(0.0, abs=1e-7)  # and stays there
    values = np.array([float(f(t)) for t in range(41)])
    assert np.all(np.diff(values) <= 1e-7)  # non-increasing
    expected = (1 - 20 / 40) if shape == "linear" else (1 + math.cos(math.pi * 20 / 40)) / 2
    assert float(f(20)) == pytest.approx(expected)


def test_decay_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        decay_factor(0)
    with pytest.raises(ValueError, match="shape"):
        decay_factor(10, "step")


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
        lambda lr: optax.sgd(lr),
        lambda lr: optax.rmsprop(lr, decay=0.99, eps=1e-8),
    ],
)
def test_decayed_optimizer_is_the_optimizer_with_the_scheduled_learning_rate(make):
    lr, num_steps = 0.1, 6
    decayed = with_decay(make(lr), num_steps)
    scheduled = make(optax.linear_schedule(lr, 0.0, num_steps))
    params = jnp.asarray([1.0, -2.0, 0.5])
    state_a, state_b = decayed.init(params), scheduled.init(params)
    for t in range(num_steps + 1):
        grad = jnp.asarray([math.sin(t), math.cos(t), 0.3 * t])
        update_a, state_a = decayed.update(grad, state_a, params)
        update_b, state_b = scheduled.update(grad, state_b, params)
        np.testing.assert_allclose(update_a, update_b, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(update_a, 0.0, atol=1e-9)  # the step after T_m does nothing


def test_steps_for_budget():
    assert steps_for_budget(2.0, 1000.0) == 2000
    assert steps_for_budget(0.5, 333.3) == 166  # floor
    assert steps_for_budget(1e-6, 10.0) == 1  # at least one step
    with pytest.raises(ValueError):
        steps_for_budget(0.0, 10.0)
    with pytest.raises(ValueError):
        steps_for_budget(1.0, -1.0)


def tiny_budget_config(**changes) -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny-budget",
        description="tiny compute-matched check",
        dataset="iris",
        model="lahire-mlp",
        methods=("adam", "sgd"),
        learning_rate=0.01,
        batch_size=5,
        num_steps=10,
        num_seeds=2,
        eval_every=1000,
        chunk_steps=20,
        target_loss=1.0,
        budget_seconds=0.004,
        calibration_rounds=2,
        **changes,
    )


def test_config_checks_budget_settings():
    with pytest.raises(ValueError, match="budget_seconds"):
        tiny_budget_config().replace(budget_seconds=0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_budget_config().replace(lr_schedule="step")


def test_compute_matched_run_end_to_end(tmp_path):
    config = tiny_budget_config()
    logged = []
    summary = run_experiment(config, tmp_path, progress=False, log=logged.append)
    written = json.loads((tmp_path / "summary.json").read_text())
    budget = written["compute_matched"]
    assert budget["budget_s"] == 0.004 and budget["lr_schedule"] == "linear"
    for name in config.methods:
        m = written["methods"][name]
        # T_m from the calibrated rate, and the run trained exactly T_m steps
        assert m["num_steps"] == steps_for_budget(0.004, m["steps_per_s"])
        assert m["steps"][-1] == m["num_steps"] == summary["resolved"]["num_steps"][name]
        assert len(m["calibration_chunk_s"]) == 2 and m["calibration_chunk_steps"] == 1000
        assert m["settings"]["lr_schedule"] == "linear"
        assert m["settings"]["decay_steps"] == m["num_steps"]
        assert budget["equal_steps"] in m["steps"]
        assert m["at_equal_steps"]["step"] == budget["equal_steps"]
        assert m["time_to_target_s"]["num_seeds"] == 2
    table = (tmp_path / "table.md").read_text()
    assert "compute-matched, 0.004 s per run" in table and "`sgd`" in table
    assert any("steps/s" in line for line in logged)
    assert (tmp_path / "loss_vs_time.png").is_file()


def test_calibration_setup_is_one_full_chunk():
    class FakeSetup:  # what calibration_setup reads
        def __init__(self, loop):
            self.loop = loop
            self.config = ExperimentConfig(
                name="x",
                description="",
                dataset="iris",
                model="lahire-mlp",
                methods=("adam",),
                learning_rate=0.1,
                batch_size=5,
                num_steps=10,
                eval_every=10,
                chunk_steps=100,
            )

        def with_num_steps(self, num_steps):
            return num_steps

    assert calibration_setup(FakeSetup("scan")) == 100
    assert calibration_setup(FakeSetup("python")) == 10
