"""MNIST-1D (Greydanus 2020), generated locally and cached.

The data are *generated* with ``mnist1d.data.make_dataset(args)`` where
``args = mnist1d.data.get_dataset_args()`` with ``num_samples`` and ``seed``
overridden (never ``get_dataset``, which downloads a pickle). Defaults:
4000 train / 1000 test signals of length 40, 10 classes, generator seed 42
(mnist1d's own default, which gives its standard dataset).

The split is mnist1d's own: the first ``train_split = 0.8`` of the shuffled
examples are the training set.

Standardization: ``make_dataset`` already centres and scales all signals with
one global mean/std (computed over train and test). We re-standardize with a
single scalar mean/std of the *training* signals (the signal is one channel,
so this is the 1-D analogue of per-channel image standardization).

``make_dataset`` reseeds numpy's and Python's *global* random generators; the
loader saves and restores both so the caller's random state is untouched.
Generated arrays are cached as ``<data_dir>/mnist1d/mnist1d_<key>.npz``, where
``key`` hashes all generator arguments.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import resolve_data_dir

DEFAULT_NUM_SAMPLES = 5000
DEFAULT_GENERATOR_SEED = 42


@contextlib.contextmanager
def _preserve_global_random_state():
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _generator_args(num_samples: int, seed: int) -> dict:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(num_samples), seed=int(seed))
    args.pop("url", None)  # irrelevant to generation; never used
    return args


def _cache_path(cache_dir: Path, args: dict) -> Path:
    key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"mnist1d_{key}.npz"


def generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Run mnist1d's generator; returns raw ``x, y, x_test, y_test``."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    args = _generator_args(num_samples, seed)
    with _preserve_global_random_state():
        data = make_dataset(ObjectView(dict(args)))
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def load_mnist1d(
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    use_cache: bool = True,
) -> Dataset:
    """MNIST-1D with ``num_samples`` signals in total (80% train, 20% test)."""
    seed = DEFAULT_GENERATOR_SEED if seed is None else seed
    if num_samples < 20:
        raise ValueError("num_samples must be at least 20 (two per class per split)")
    cache_dir = resolve_data_dir(data_dir) / "mnist1d"
    cache_file = _cache_path(cache_dir, _generator_args(num_samples, seed))
    if use_cache and cache_file.exists():
        with np.load(cache_file) as cached:
            raw = {key: cached[key] for key in cached.files}
    else:
        raw = generate_mnist1d(num_samples, seed)
        if use_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as tmp:
                np.savez(tmp, **raw)
            os.replace(tmp.name, cache_file)

    x_train = raw["x"].astype(np.float64)
    mean, std = x_train.mean(), x_train.std()
    std = std if std > 0 else 1.0
    return Dataset(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=raw["y"].astype(np.int32),
        x_test=((raw["x_test"] - mean) / std).astype(np.float32),
        y_test=raw["y_test"].astype(np.int32),
        num_classes=10,
        name="mnist1d",
        task="classification",
        description=(
            f"MNIST-1D generated with mnist1d.make_dataset (num_samples={num_samples}, "
            f"seed={seed}); mnist1d's 80/20 split; signals standardized with the "
            "scalar mean/std of the training signals."
        ),
        metadata={"generator_seed": seed, "num_samples": num_samples,
                  "mean": float(mean), "std": float(std), "cache_file": str(cache_file)},
    )
