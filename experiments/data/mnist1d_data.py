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
``key`` hashes all generator arguments. The cache is read without pickle and
checked (the four arrays present, as many signals of ``final_seq_length``
finite values as mnist1d makes for ``num_samples``, split as it splits them,
labels in 0..9); a cache that fails to load or to pass these checks is regenerated,
with a ``RuntimeWarning`` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import resolve_data_dir
from experiments.data.integrity import CorruptFileError, reading_file

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


def _check_generated(raw: dict[str, np.ndarray], args: dict) -> None:
    """Raise ``ValueError`` unless ``raw`` has the shapes and values ``args`` generate.

    mnist1d makes ``num_samples // 10`` signals per class and puts the first
    ``int(train_split * total)`` of them in the training set.
    """
    for key in ("x", "y", "x_test", "y_test"):
        if key not in raw:
            raise ValueError(f"array {key!r} is missing")
    total = len(raw["x"]) + len(raw["x_test"])
    num_train = int(args["train_split"] * total)
    expected = {
        "x": (num_train, args["final_seq_length"]),
        "y": (num_train,),
        "x_test": (total - num_train, args["final_seq_length"]),
        "y_test": (total - num_train,),
    }
    if total != args["num_samples"] // 10 * 10 or any(
        raw[key].shape != shape for key, shape in expected.items()
    ):
        found = {key: raw[key].shape for key in expected}
        raise ValueError(f"arrays have shapes {found}, expected {expected}")
    if not (np.all(np.isfinite(raw["x"])) and np.all(np.isfinite(raw["x_test"]))):
        raise ValueError("signals hold non-finite values")
    labels = np.concatenate([raw["y"], raw["y_test"]])
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels are not integers in 0..9")


def _read_cache(cache_file: Path, args: dict) -> dict[str, np.ndarray]:
    """The checked cache (no pickle); :class:`CorruptFileError` naming the file otherwise."""
    with (
        reading_file(cache_file, hint="regenerating the MNIST-1D cache"),
        np.load(cache_file, allow_pickle=False) as cached,
    ):
        raw = {key: cached[key] for key in cached.files}
        _check_generated(raw, args)
    return raw


def _write_cache(cache_file: Path, raw: dict[str, np.ndarray]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **raw)
    os.replace(tmp.name, cache_file)


def _cached_or_generated(cache_dir: Path, num_samples: int, seed: int, use_cache: bool):
    """``(raw arrays, cache path)``: from a valid cache, else generated (and cached)."""
    args = _generator_args(num_samples, seed)
    cache_file = _cache_path(cache_dir, args)
    if use_cache and cache_file.exists():
        try:
            return _read_cache(cache_file, args), cache_file
        except CorruptFileError as err:
            warnings.warn(str(err), RuntimeWarning, stacklevel=3)
    raw = generate_mnist1d(num_samples, seed)
    if use_cache:
        _write_cache(cache_file, raw)
    return raw, cache_file


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
    raw, cache_file = _cached_or_generated(
        resolve_data_dir(data_dir) / "mnist1d", num_samples, seed, use_cache
    )
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
        metadata={
            "generator_seed": seed,
            "num_samples": num_samples,
            "mean": float(mean),
            "std": float(std),
            "cache_file": str(cache_file),
        },
    )
