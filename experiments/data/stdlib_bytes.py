"""``stdlib-bytes``: next-byte prediction on the Python standard library's own source.

A language-model workload available offline on every machine: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages``, ``dist-packages`` and
``__pycache__`` left out), listed by their path relative to that folder, sorted.

* **Split by file.** A file is a test file when the first 8 hex digits of the sha256 of
  its relative path, read as a fraction of 2^32, are below ``test_fraction`` (default 0.1):
  deterministic, independent of the other files (adding a file moves no other), and no
  window of a test file is ever trained on.
* **Examples.** Each file's bytes are cut into non-overlapping windows of ``length + 1``
  bytes at stride ``length`` (the last incomplete one dropped); a window never crosses two
  files. Example = ``x = window[:-1]``, ``y = window[1:]``, both ``(length,)`` int32 in
  [0, 256): predict every next byte. The per-example loss is the mean token cross-entropy
  over the window (``experiments.tasks``, task ``"next_token"``); in bits per byte it is
  that loss / ln 2.
* **Size.** ``max_train_windows`` (default 131 072 = 2^17) training windows and
  ``max_test_windows`` (default 2048) test windows are drawn without replacement from all
  windows of their split, with ``numpy.random.default_rng(seed)`` (seed 0 by default), and
  kept in that random order (so the first m training windows, which the training-loss
  evaluation uses, are a uniform sample, not the first files). A split with fewer windows
  keeps all of them.

The windows are cached as ``<data_dir>/stdlib_bytes/stdlib_<key>.npz`` (uint8, no pickle),
``key`` the sha256 of the options and of every file's relative path and size; a cache that
fails to load or has the wrong shape is rebuilt. The metadata records the Python version,
the root, the number of files per split and a digest of the file list: the data differ
between Python versions, so compare runs on the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
import tempfile
import warnings
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import resolve_data_dir

VOCAB_SIZE = 256
DEFAULT_LENGTH = 64
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_MAX_TRAIN_WINDOWS = 131_072
DEFAULT_MAX_TEST_WINDOWS = 2048
_EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The standard library's folder of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: str | os.PathLike) -> list[str]:
    """The ``*.py`` files under ``root`` as sorted relative POSIX paths (no site-packages,
    dist-packages or __pycache__)."""
    root = Path(root)
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _EXCLUDED_PARTS.isdisjoint(relative.parts) and path.is_file():
            found.append(relative.as_posix())
    return sorted(found)


def is_test_file(relative_path: str, test_fraction: float) -> bool:
    """Whether a file (by its relative path) belongs to the test split."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32 < test_fraction


def file_windows(data: bytes, length: int) -> np.ndarray:
    """``(m, length + 1)`` uint8: the windows of ``data`` at stride ``length``, m =
    floor((len(data) - 1) / length) (the last incomplete window dropped)."""
    array = np.frombuffer(data, dtype=np.uint8)
    count = max(0, (array.size - 1) // length)
    if count == 0:
        return np.zeros((0, length + 1), np.uint8)
    starts = np.arange(count) * length
    return array[starts[:, None] + np.arange(length + 1)[None, :]]


def _split_windows(root: Path, files: list[str], length: int) -> np.ndarray:
    pieces = [file_windows((root / name).read_bytes(), length) for name in files]
    return np.concatenate(pieces) if pieces else np.zeros((0, length + 1), np.uint8)


def _choose(windows: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` windows without replacement, in a random order."""
    count = windows.shape[0] if limit is None else min(int(limit), windows.shape[0])
    return windows[rng.permutation(windows.shape[0])[:count]]


def build_windows(
    root: str | os.PathLike,
    *,
    length: int = DEFAULT_LENGTH,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_train_windows: int | None = DEFAULT_MAX_TRAIN_WINDOWS,
    max_test_windows: int | None = DEFAULT_MAX_TEST_WINDOWS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train (n, length + 1) uint8, test (m, length + 1) uint8, metadata)`` from the
    ``*.py`` files under ``root`` (see the module docstring)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    files = source_files(root)
    test_files = [name for name in files if is_test_file(name, test_fraction)]
    train_files = [name for name in files if not is_test_file(name, test_fraction)]
    if not train_files or not test_files:
        raise ValueError(
            f"{root}: {len(train_files)} training and {len(test_files)} test files; "
            "need at least one of each"
        )
    train_all = _split_windows(root, train_files, length)
    test_all = _split_windows(root, test_files, length)
    rng = np.random.default_rng(seed)
    train = _choose(train_all, max_train_windows, rng)
    test = _choose(test_all, max_test_windows, rng)
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError(f"{root}: no window of {length + 1} bytes in one of the splits")
    metadata = {
        "root": str(root),
        "python_version": platform.python_version(),
        "length": int(length),
        "test_fraction": float(test_fraction),
        "seed": int(seed),
        "num_train_files": len(train_files),
        "num_test_files": len(test_files),
        "train_windows_available": int(train_all.shape[0]),
        "test_windows_available": int(test_all.shape[0]),
        "file_list_sha256": hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest(),
    }
    return train, test, metadata


def _cache_key(root: Path, files: list[str], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8"))
    for name in files:
        digest.update(f"{name}\0{(root / name).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path, length: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            train, test = archive["train"], archive["test"]
            metadata = json.loads(str(archive["metadata"]))
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"rebuilding {path}: unreadable cache ({err})", RuntimeWarning, stacklevel=3)
        return None
    for windows in (train, test):
        if windows.dtype != np.uint8 or windows.ndim != 2 or windows.shape[1] != length + 1:
            warnings.warn(f"rebuilding {path}: wrong array shape", RuntimeWarning, stacklevel=3)
            return None
    return train, test, metadata


def _write_cache(path: Path, train: np.ndarray, test: np.ndarray, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        np.savez(handle, train=train, test=test, metadata=np.array(json.dumps(metadata)))
    os.replace(handle.name, path)  # atomic: a concurrent reader sees no half-written file


def load_stdlib_bytes(
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    root: str | os.PathLike | None = None,
    length: int = DEFAULT_LENGTH,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_train_windows: int | None = DEFAULT_MAX_TRAIN_WINDOWS,
    max_test_windows: int | None = DEFAULT_MAX_TEST_WINDOWS,
    cache: bool = True,
) -> Dataset:
    """The ``stdlib-bytes`` dataset (module docstring); ``root`` defaults to this
    interpreter's standard library, ``seed`` (window choice and order) to 0."""
    root = Path(root) if root is not None else stdlib_root()
    seed = 0 if seed is None else int(seed)
    options = {
        "length": int(length),
        "test_fraction": float(test_fraction),
        "max_train_windows": max_train_windows,
        "max_test_windows": max_test_windows,
        "seed": seed,
    }
    built = None
    cache_path = None
    if cache:
        key = _cache_key(root, source_files(root), {**options, "root": str(root.resolve())})
        cache_path = resolve_data_dir(data_dir) / "stdlib_bytes" / f"stdlib_{key}.npz"
        if cache_path.exists():
            built = _read_cache(cache_path, length)
    if built is None:
        built = build_windows(root, **options)
        if cache_path is not None:
            _write_cache(cache_path, *built)
    train, test, metadata = built
    to_int = lambda windows: np.ascontiguousarray(windows, dtype=np.int32)  # noqa: E731
    return Dataset(
        x_train=to_int(train[:, :-1]),
        y_train=to_int(train[:, 1:]),
        x_test=to_int(test[:, :-1]),
        y_test=to_int(test[:, 1:]),
        num_classes=VOCAB_SIZE,
        name="stdlib-bytes",
        task="next_token",
        description=(
            f"Python {metadata['python_version']} standard library source (*.py under "
            f"{metadata['root']}), windows of {length} bytes -> next byte, split by file "
            f"({metadata['num_train_files']} train / {metadata['num_test_files']} test files)"
        ),
        metadata={**metadata, "cache": None if cache_path is None else str(cache_path)},
    )
