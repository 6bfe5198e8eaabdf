"""The "doubly heavy-tailed" synthetic problem of the AdamBS paper (§4.3).

Source: Liu, Wu & Mozafari, "Adam with Bandit Sampling for Deep Learning"
(NeurIPS 2020), §4.3 "Comparison with Uniform Sampling" and Appendix C
(/work/shared/papers/000_3210f3def4dac4d3.txt, lines ~694-735, 1985-2200).

Features. Example ``j`` (1-based, j = 1..n) has features
``z_j in {-1, 0, +1}^d`` with independent entries and

    P(|z_{j,i}| = 1) = beta * i^(-gamma) * j^(-gamma),   gamma >= 2,

(i = 1..d the 1-based feature index); a non-zero entry is +1 or -1 with
probability 1/2 each. The paper writes the constant as "β3" (the PDF
extraction cannot tell ``beta_3`` from ``beta^3``); here it is a single
constant ``beta`` in (0, 1], so every probability is at most 1. Because the
probabilities decay in both ``i`` and ``j``, the first examples carry almost
all the non-zero features: the setting in which non-uniform sampling pays off.

Labels. The paper fixes ``y_j in {-1, +1}`` but not how they arise. We draw
a true weight vector ``theta* ~ N(0, I_d)`` and label each example by the
paper's model ``sigma(ReLU(z_j . theta*))``: ``y_j = +1`` if the model's
probability exceeds 1/2, i.e. ``z_j . theta* > 0``, ``y_j = -1`` if
``z_j . theta* < 0``, and a fair coin when ``z_j . theta* = 0`` (in
particular for all-zero ``z_j``, which have zero gradient anyway).

The paper specifies no sizes; defaults here are ``n = 1000`` training
examples, ``d = 100`` features, ``beta = 1``, ``gamma = 2``. The test split
(``num_test``, default ``n // 4``) is a fresh draw of the same process with
its own example indices ``j = 1..num_test`` and the same ``theta*``. Features
are not standardized (standardizing would destroy the ternary structure).

In the returned :class:`Dataset` the labels are mapped to ``{0, 1}``
(``y01 = (y + 1) / 2``) for sigmoid cross-entropy on one logit; the ``±1``
labels and ``theta*`` are kept in ``metadata``.
"""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset

DEFAULT_NUM_EXAMPLES = 1000
DEFAULT_NUM_FEATURES = 100
DEFAULT_BETA = 1.0
DEFAULT_GAMMA = 2.0
DEFAULT_SEED = 0
_ROWS_PER_CHUNK = 16384  # bounds the (rows, d) uniform draws held at once


def activation_probabilities(
    num_examples: int, num_features: int, beta: float, gamma: float
) -> np.ndarray:
    """The ``(n, d)`` matrix ``P(|z_{j,i}| = 1) = beta * i^-gamma * j^-gamma``."""
    j = np.arange(1, num_examples + 1, dtype=np.float64)
    i = np.arange(1, num_features + 1, dtype=np.float64)
    return beta * np.outer(j ** (-gamma), i ** (-gamma))


def sample_features(
    num_examples: int, num_features: int, beta: float, gamma: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``z`` (int8, shape ``(n, d)``) from the doubly heavy-tailed law."""
    feature_decay = np.arange(1, num_features + 1, dtype=np.float64) ** (-gamma)
    z = np.zeros((num_examples, num_features), dtype=np.int8)
    for start in range(0, num_examples, _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, num_examples)
        example_decay = np.arange(start + 1, stop + 1, dtype=np.float64) ** (-gamma)
        probs = beta * np.outer(example_decay, feature_decay)
        active = rng.random(probs.shape) < probs
        signs = np.where(rng.random(probs.shape) < 0.5, -1, 1).astype(np.int8)
        z[start:stop] = np.where(active, signs, 0)
    return z


def label_by_true_neuron(
    z: np.ndarray, true_weights: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``±1`` labels: sign of ``z . theta*``, a fair coin where it is zero."""
    scores = z.astype(np.float64) @ true_weights
    coin = np.where(rng.random(len(z)) < 0.5, -1, 1)
    return np.where(scores > 0, 1, np.where(scores < 0, -1, coin)).astype(np.int8)


def generate_heavy_tailed(
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    num_features: int = DEFAULT_NUM_FEATURES,
    *,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    num_test: int | None = None,
    seed: int = DEFAULT_SEED,
) -> dict[str, np.ndarray]:
    """Raw arrays: ``z_train, y_train, z_test, y_test`` (labels ±1) and ``true_weights``."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must lie in (0, 1] so probabilities are <= 1, got {beta}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive (the paper assumes >= 2), got {gamma}")
    if num_examples < 1 or num_features < 1:
        raise ValueError("num_examples and num_features must be positive")
    num_test = max(num_examples // 4, 1) if num_test is None else num_test
    rng = np.random.default_rng(seed)
    true_weights = rng.standard_normal(num_features)
    z_train = sample_features(num_examples, num_features, beta, gamma, rng)
    y_train = label_by_true_neuron(z_train, true_weights, rng)
    z_test = sample_features(num_test, num_features, beta, gamma, rng)
    y_test = label_by_true_neuron(z_test, true_weights, rng)
    return {
        "z_train": z_train,
        "y_train": y_train,
        "z_test": z_test,
        "y_test": y_test,
        "true_weights": true_weights,
    }


def load_heavy_tailed(
    *,
    seed: int | None = None,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    num_features: int = DEFAULT_NUM_FEATURES,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    num_test: int | None = None,
) -> Dataset:
    """The heavy-tailed problem as a binary :class:`Dataset` (labels in {0, 1})."""
    seed = DEFAULT_SEED if seed is None else seed
    raw = generate_heavy_tailed(
        num_examples, num_features, beta=beta, gamma=gamma, num_test=num_test, seed=seed
    )
    return Dataset(
        x_train=raw["z_train"].astype(np.float32),
        y_train=((raw["y_train"] + 1) // 2).astype(np.int32),
        x_test=raw["z_test"].astype(np.float32),
        y_test=((raw["y_test"] + 1) // 2).astype(np.int32),
        num_classes=2,
        name="heavy-tailed",
        task="binary",
        description=(
            f"AdamBS §4.3 doubly heavy-tailed features, P(|z_ji|=1) = beta i^-gamma j^-gamma "
            f"(n={num_examples}, d={num_features}, beta={beta}, gamma={gamma}, seed={seed}); "
            "labels sign(z.theta*) with theta* ~ N(0, I), mapped to {0, 1}."
        ),
        metadata={
            "y_train_pm1": raw["y_train"],
            "y_test_pm1": raw["y_test"],
            "true_weights": raw["true_weights"],
            "beta": beta,
            "gamma": gamma,
            "seed": seed,
        },
    )
