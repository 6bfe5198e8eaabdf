"""Iris, Wine and Digits from scikit-learn (bundled with the package, no network).

None of them has an official train/test split, so each is split with
:func:`~experiments.data.preprocessing.stratified_split`: a seeded stratified
split with ``test_fraction = 0.2`` (20% of every class goes to the test set).

Preprocessing:

* ``iris`` (150 x 4), ``wine`` (178 x 13), ``digits`` (1797 x 64, flat):
  per-feature standardization with training mean/std (tabular).
* ``digits-image``: the same 8x8 digits as ``(N, 8, 8, 1)`` images, scaled to
  [0, 1] by dividing by 16 (the pixel maximum of this dataset), then
  standardized with the training mean/std of the single channel.
"""

from __future__ import annotations

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.preprocessing import (
    standardize_features,
    standardize_images,
    stratified_split,
)

TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
DIGITS_PIXEL_MAX = 16.0

_SOURCES = {
    "iris": "Fisher's Iris (sklearn.datasets.load_iris): 150 flowers, 4 features, 3 species.",
    "wine": "UCI Wine (sklearn.datasets.load_wine): 178 wines, 13 chemical features, 3 cultivars.",
    "digits": "UCI optical digits (sklearn.datasets.load_digits): 1797 8x8 images, 10 classes.",
}


def _load_arrays(source: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as sk_datasets  # imported lazily (slow import)

    loader = {
        "iris": sk_datasets.load_iris,
        "wine": sk_datasets.load_wine,
        "digits": sk_datasets.load_digits,
    }[source]
    bunch = loader()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int32)


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int):
    """``(noisy, corrupted)``: a uniformly random ``round(fraction * N)`` of the labels each
    replaced by a uniformly random *other* class (seeded); ``corrupted`` is their mask."""
    if not 0 <= fraction < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    corrupted = np.zeros(n, bool)
    corrupted[rng.choice(n, size=round(fraction * n), replace=False)] = True
    shift = rng.integers(1, num_classes, size=n)
    noisy = np.where(corrupted, (labels + shift) % num_classes, labels).astype(np.int32)
    return noisy, corrupted


def load_tabular(
    source: str,
    *,
    seed: int | None = None,
    test_fraction: float = TEST_FRACTION,
    label_noise: float = 0.0,
) -> Dataset:
    """``iris`` / ``wine`` / ``digits`` as standardized feature vectors. ``label_noise``:
    flip that fraction of the *training* labels (``flip_labels``, seeded by ``seed``; the
    test labels stay clean); the mask and the clean labels go to the metadata."""
    seed = DEFAULT_SPLIT_SEED if seed is None else seed
    features, labels = _load_arrays(source)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    x_train, x_test, stats = standardize_features(features[train_idx], features[test_idx])
    num_classes = int(labels.max()) + 1
    y_train, noise = labels[train_idx], ""
    if label_noise:
        clean = y_train
        y_train, corrupted = flip_labels(clean, label_noise, num_classes, seed)
        stats = {**stats, "corrupted": corrupted, "clean_y_train": clean}
        noise = (
            f" {int(corrupted.sum())} training labels ({label_noise:.0%}) flipped to a "
            f"random other class (seed {seed}); test labels clean."
        )
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=labels[test_idx],
        num_classes=num_classes,
        name=source,
        task="classification",
        description=(
            f"{_SOURCES[source]} Stratified {1 - test_fraction:.0%}/{test_fraction:.0%} "
            f"train/test split (seed {seed}); features standardized with train mean/std." + noise
        ),
        metadata={
            "split_seed": seed,
            "test_fraction": test_fraction,
            "label_noise": label_noise,
            **stats,
        },
    )


def load_digits_images(*, seed: int | None = None, test_fraction: float = TEST_FRACTION) -> Dataset:
    """``digits`` as ``(N, 8, 8, 1)`` images for a CNN (same split as ``digits``)."""
    seed = DEFAULT_SPLIT_SEED if seed is None else seed
    features, labels = _load_arrays("digits")
    images = features.reshape(-1, 8, 8, 1)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    x_train, x_test, stats = standardize_images(
        images[train_idx], images[test_idx], scale=DIGITS_PIXEL_MAX
    )
    return Dataset(
        x_train=x_train,
        y_train=labels[train_idx],
        x_test=x_test,
        y_test=labels[test_idx],
        num_classes=10,
        name="digits-image",
        task="classification",
        description=(
            f"{_SOURCES['digits']} As (N, 8, 8, 1) images scaled to [0, 1] (/16), then "
            f"channel-standardized with train statistics; stratified "
            f"{1 - test_fraction:.0%}/{test_fraction:.0%} split (seed {seed})."
        ),
        metadata={"split_seed": seed, "test_fraction": test_fraction, **stats},
    )
