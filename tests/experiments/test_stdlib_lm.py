"""The ``stdlib-lm`` configuration's plumbing on a tiny tree of .py files and a tiny
transformer: the data, model, next-token loss and evaluation it builds and its methods (fast), and a
compute-matched run end to end (slow: it compiles every method's chunks twice)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import get_config
from experiments.data import load_dataset
from experiments.methods import build_method
from experiments.models import get_model, init_params, model_spec
from experiments.runner import run_experiment
from experiments.tasks import make_evaluator, make_model_loss
from tests.experiments.test_data_stdlib_bytes import write_tree


def test_config_is_compute_matched_on_the_stdlib_bytes():
    config = get_config("stdlib-lm")
    assert config.dataset == "stdlib-bytes" and config.model == "byte-transformer"
    assert config.budget_seconds is not None and config.feedback == "grad_norm"
    assert "adam" in config.methods and "adam-priority" in config.methods


def tiny_config(tmp_path, methods):
    write_tree(tmp_path / "src")
    return get_config("stdlib-lm").replace(
        methods=methods,
        dataset_options={"root": str(tmp_path / "src"), "length": 8, "max_test_windows": 16},
        model_options={"max_length": 8, "width": 8, "num_heads": 2, "num_layers": 1},
        budget_seconds=0.2,
        num_seeds=1,
        calibration_rounds=1,
        eval_every=5,
        chunk_steps=5,
        batch_size=4,
        eval_train_examples=16,
        diagnostic_examples=8,
    )


def test_config_builds_data_model_and_next_token_evaluation(tmp_path):
    """What ``prepare`` builds from the configuration, without its compilations of the run."""
    config = tiny_config(tmp_path, ("adam",))
    dataset = load_dataset(config.dataset, data_dir=tmp_path / "cache", **config.dataset_options)
    model = get_model(config.model, dataset.num_classes, **config.model_options)
    assert model_spec(config.model).task == dataset.task == "next_token"
    x, y = dataset.x_test[:4], dataset.y_test[:4]
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), x))
    params = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.01, leaf.dtype), params)
    losses = make_model_loss(model, dataset.task)(params, {"x": x, "y": y})
    loss, error = make_evaluator(model, dataset.task, batch_size=3)(params, x, y)  # padded
    assert losses.shape == (4,)  # one loss per window: the mean over its positions
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    assert 0.0 <= float(error) <= 1.0


def test_refresh_variant_rescores_once_per_epoch_of_steps():
    built = build_method(
        "adam-priority-refresh", num_examples=1000, batch_size=32, num_steps=10, learning_rate=1e-3
    )
    assert built.settings["sampler_options"]["refresh_every"] == 32  # ceil(1000 / 32)


@pytest.mark.slow  # compiles each method's chunks twice (calibration, budget): minutes here
@pytest.mark.parametrize("methods", [("adam", "adam-priority-refresh")])
def test_tiny_budget_run_end_to_end(tmp_path, methods):
    config = tiny_config(tmp_path, methods)
    summary = run_experiment(config, tmp_path / "out", data_dir=tmp_path / "cache", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert {row["method"] for row in rows} == set(methods)
    assert all(np.isfinite(row["test_loss"]) for row in rows)
    assert rows[0]["test_loss"] == pytest.approx(np.log(256), rel=0.2)  # ~uniform at init
    assert summary["resolved"]["task"] == "next_token"
    assert (tmp_path / "out" / "table.md").exists()
