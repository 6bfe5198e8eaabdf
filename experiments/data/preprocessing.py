"""Standardization and splitting shared by the loaders.

Standardization always uses statistics of the *training* split only, and the
same affine map is applied to the test split (no test-set leakage):

* tabular features (``standardize_features``): per column
  ``x' = (x - mean_train) / std_train``;
* images (``standardize_images``): first scaled to ``[0, 1]`` by dividing by
  the pixel maximum (255 for 8-bit images), then per channel
  ``x' = (x - mean_c) / std_c`` with the mean/std of channel ``c`` over all
  training pixels.

A zero standard deviation (a constant column/channel, e.g. the always-blank
corner pixels of ``digits``) is replaced by 1, so the column becomes 0.

``stratified_split`` gives the fixed seeded split used where a dataset has no
official train/test split.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 4096  # examples per chunk when computing image statistics


def _safe_std(std: np.ndarray) -> np.ndarray:
    return np.where(std > 0, std, 1.0)


def standardize_features(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per-column standardization with training statistics; returns float32."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    mean = x_train.mean(axis=0)
    std = _safe_std(x_train.std(axis=0))
    stats = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
        stats,
    )


def channel_mean_std(images: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``images / scale`` over (N, H, W).

    Works in chunks with float64 accumulators, so a uint8 CIFAR training set
    never has to be materialized in float64.
    """
    num_channels = images.shape[-1]
    total = np.zeros(num_channels)
    total_sq = np.zeros(num_channels)
    count = 0
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].astype(np.float64) / scale
        flat = chunk.reshape(-1, num_channels)
        total += flat.sum(axis=0)
        total_sq += np.square(flat).sum(axis=0)
        count += flat.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean, _safe_std(np.sqrt(var))


def standardize_images(
    x_train: np.ndarray, x_test: np.ndarray, scale: float = 255.0
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Scale ``(N, H, W, C)`` images to [0, 1] then standardize each channel.

    Args:
      x_train, x_test: images with the channel axis last.
      scale: the pixel maximum (255 for uint8 images, 16 for sklearn digits).
    Returns:
      float32 ``(x_train, x_test, {"mean": (C,), "std": (C,)})``; mean/std are
      in the [0, 1]-scaled units.
    """
    if x_train.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {x_train.shape}")
    mean, std = channel_mean_std(x_train, scale)
    mean32 = mean.astype(np.float32)
    std32 = std.astype(np.float32)

    def transform(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32)
        out /= np.float32(scale)
        out -= mean32
        out /= std32
        return out

    return transform(x_train), transform(x_test), {"mean": mean32, "std": std32}


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of example indices into (train, test).

    Each class ``c`` with ``n_c`` examples contributes
    ``round(test_fraction * n_c)`` examples to the test split (at least one if
    ``n_c >= 2``), drawn by a permutation from ``np.random.default_rng(seed)``.
    Both index arrays are returned shuffled (so class order is mixed).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            num_test = min(max(num_test, 1), len(members) - 1)
        test_parts.append(members[:num_test])
        train_parts.append(members[num_test:])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    return train, test
