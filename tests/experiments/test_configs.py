"""Tests for experiments.configs: every configuration is consistent and sourced."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.configs import get_config
from experiments.methods import METHODS


def test_configs_are_consistent():
    for name in (
        "lahire-iris",
        "lahire-wine",
        "digits-cnn",
        "mnist1d-mlp",
        "heavy-tailed",
        "default",
        "paper-cifar10",
        "paper-cifar100",
        "paper-fashion-cnn",
        "paper-mnist-lstm",
        "paper-fashion-lstm",
        "paper-imdb-rcnn",
    ):
        config = get_config(name)
        assert config.sources, name
        assert all(m in METHODS for m in config.methods), name
    lahire = get_config("lahire-iris")
    assert (lahire.learning_rate, lahire.batch_size, lahire.num_steps, lahire.num_seeds) == (
        0.01,
        5,
        1000,
        50,
    )
    assert set(lahire.methods) == {
        "sgd",
        "sgd-gn",
        "rmsprop",
        "rmsprop-gn",
        "adam",
        "adam-gn",
        "adambs",
    }
    cifar = get_config("paper-cifar10")
    assert (cifar.learning_rate, cifar.batch_size, cifar.num_epochs) == (1e-3, 128, 10)
    assert cifar.steps_for(50_000) == 3907
    assert cifar.replace(max_steps=20).steps_for(50_000) == 20
    with pytest.raises(KeyError):
        get_config("nope")


def test_default_is_a_shortened_digits_cnn():
    """``make run``'s config is digits-cnn with fewer seeds, steps and methods, nothing else."""
    default, digits = get_config("default"), get_config("digits-cnn")
    changed = {
        field.name
        for field in dataclasses.fields(default)
        if getattr(default, field.name) != getattr(digits, field.name)
    }
    assert changed == {"name", "description", "methods", "num_steps", "num_seeds"}
    assert (default.num_steps, default.num_seeds) == (600, 3)
    # the paper comparison without AMSGrad, plus the priority sampler with its defaults
    assert set(default.methods) - {"adam-priority"} < set(digits.methods)
    assert {"adam", "adambs", "adam-priority"} <= set(default.methods)


@pytest.mark.parametrize("name", ["friedman-mlp", "digits-noisy-mlp"])
def test_priority_check_configs_compare_the_priority_variants(name):
    config = get_config(name)
    assert {"adam", "adam-priority-fixed", "adam-priority", "adam-priority-refresh"} <= set(
        config.methods
    )
    assert config.num_seeds >= 5


@pytest.mark.parametrize(
    "name, learning_rate, source",
    [
        ("paper-cifar10", 1e-3, "§5.2: 0.001"),
        ("paper-mnist-lstm", 1e-6, "§5.3: 1e-6"),
        ("paper-imdb-rcnn", 1e-3, "§5.4: 0.001"),
    ],
)
def test_paper_learning_rates_match_their_sources(name, learning_rate, source):
    config = get_config(name)
    assert config.learning_rate == learning_rate
    assert config.sources["learning_rate"].endswith(source)
