"""Friedman #1: a synthetic regression problem from scikit-learn (no network).

Friedman, "Multivariate Adaptive Regression Splines", Annals of Statistics 1991
(``sklearn.datasets.make_friedman1``): x uniform on [0, 1]^d (d = 10, only the first five
matter), y = 10 sin(pi x_1 x_2) + 20 (x_3 - 0.5)^2 + 10 x_4 + 5 x_5 + noise N(0, sigma^2).
Features are standardized and targets standardized with the training mean/std, so a test
mean squared error of 1 is the constant predictor's and the error column (the test MSE
in these units) reads as the fraction of variance unexplained.
"""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.preprocessing import standardize_features

DEFAULT_SEED = 0


def load_friedman(
    *,
    seed: int | None = None,
    num_train: int = 2000,
    num_test: int = 1000,
    noise: float = 1.0,
    num_features: int = 10,
) -> Dataset:
    """Friedman #1 with ``num_train`` + ``num_test`` examples drawn with ``seed``; float32
    targets ``(N,)``, task ``"regression"``."""
    from sklearn.datasets import make_friedman1  # imported lazily (slow import)

    seed = DEFAULT_SEED if seed is None else seed
    x, y = make_friedman1(
        n_samples=num_train + num_test, n_features=num_features, noise=noise, random_state=seed
    )
    x_train, x_test, stats = standardize_features(x[:num_train], x[num_train:])
    mean, std = float(y[:num_train].mean()), float(y[:num_train].std())
    return Dataset(
        x_train=x_train,
        y_train=((y[:num_train] - mean) / std).astype(np.float32),
        x_test=x_test,
        y_test=((y[num_train:] - mean) / std).astype(np.float32),
        num_classes=1,
        name="friedman",
        task="regression",
        description=(
            f"Friedman #1 (sklearn.datasets.make_friedman1, d = {num_features}, noise "
            f"sigma = {noise}, seed {seed}): {num_train} train / {num_test} test; features "
            "and targets standardized with train statistics."
        ),
        metadata={"seed": seed, "noise": noise, "target_mean": mean, "target_std": std, **stats},
    )
