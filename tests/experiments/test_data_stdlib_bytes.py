"""Tests for experiments.data.stdlib_bytes: file listing, split by file, windows, cache, on a
small tree of .py files the tests write themselves."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data import load_dataset
from experiments.data.stdlib_bytes import (
    build_windows,
    file_windows,
    is_test_file,
    load_stdlib_bytes,
    source_files,
)

LENGTH = 8


def write_tree(root, num_files: int = 40) -> dict[str, bytes]:
    """``num_files`` .py files of distinct content in a few folders, plus files that must be
    left out (site-packages, __pycache__, not .py); returns relative path -> bytes."""
    files = {}
    for i in range(num_files):
        relative = f"pkg{i % 3}/mod_{i:02d}.py" if i % 2 else f"top_{i:02d}.py"
        files[relative] = "".join(f"x{i}_{j} = {i * j}\n" for j in range(5 + i % 7)).encode()
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    for ignored in ("site-packages/foo.py", "pkg0/__pycache__/bar.py", "notes.txt"):
        (root / ignored).parent.mkdir(parents=True, exist_ok=True)
        (root / ignored).write_bytes(b"ignored = True\n" * 20)
    return files


def rows(windows) -> set[bytes]:
    return {bytes(row) for row in np.asarray(windows, np.uint8)}


def test_source_files_are_sorted_relative_and_leave_out_site_packages(tmp_path):
    files = write_tree(tmp_path)
    listed = source_files(tmp_path)
    assert listed == sorted(files)
    assert not any("site-packages" in name or "__pycache__" in name for name in listed)


def test_file_windows_cut_at_stride_length_without_crossing_the_end():
    data = bytes(range(30))
    windows = file_windows(data, 8)
    assert windows.shape == (3, 9)  # floor((30 - 1) / 8)
    np.testing.assert_array_equal(windows[1], np.arange(8, 17))
    assert file_windows(b"abc", 8).shape == (0, 9)


def test_split_is_by_file_deterministic_and_disjoint(tmp_path):
    files = write_tree(tmp_path)
    train, test, meta = build_windows(
        tmp_path, length=LENGTH, test_fraction=0.25, max_train_windows=None, max_test_windows=None
    )
    test_files = [name for name in files if is_test_file(name, 0.25)]
    assert meta["num_test_files"] == len(test_files) > 0
    assert meta["num_train_files"] == len(files) - len(test_files) > 0
    expected_test = set().union(*(rows(file_windows(files[n], LENGTH)) for n in test_files))
    assert rows(test) == expected_test  # every window of the test files, nothing else
    assert not rows(train) & expected_test  # no test window is trained on
    again = build_windows(
        tmp_path, length=LENGTH, test_fraction=0.25, max_train_windows=None, max_test_windows=None
    )
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])


def test_caps_draw_without_replacement_with_the_seed(tmp_path):
    write_tree(tmp_path)
    full, _, _ = build_windows(tmp_path, length=LENGTH, max_train_windows=None)
    a, _, meta = build_windows(tmp_path, length=LENGTH, max_train_windows=20, seed=1)
    b, _, _ = build_windows(tmp_path, length=LENGTH, max_train_windows=20, seed=1)
    c, _, _ = build_windows(tmp_path, length=LENGTH, max_train_windows=20, seed=2)
    assert a.shape == (20, LENGTH + 1) and meta["train_windows_available"] == len(full)
    assert len(rows(a)) == 20 and rows(a) <= rows(full)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_load_gives_next_byte_pairs_and_reuses_its_cache(tmp_path):
    write_tree(tmp_path / "src")
    options = dict(root=tmp_path / "src", length=LENGTH, max_train_windows=50)
    dataset = load_dataset("stdlib-bytes", data_dir=tmp_path / "cache", **options)
    assert dataset.task == "next_token" and dataset.num_classes == 256
    assert dataset.x_train.shape == dataset.y_train.shape == (50, LENGTH)
    assert dataset.x_train.dtype == np.int32 and dataset.num_test > 0
    np.testing.assert_array_equal(dataset.x_train[:, 1:], dataset.y_train[:, :-1])
    cache = tmp_path / "cache" / "stdlib_bytes"
    (cached,) = cache.glob("*.npz")
    again = load_stdlib_bytes(data_dir=tmp_path / "cache", **options)
    np.testing.assert_array_equal(dataset.x_train, again.x_train)
    cached.write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = load_stdlib_bytes(data_dir=tmp_path / "cache", **options)
    np.testing.assert_array_equal(dataset.y_test, rebuilt.y_test)


def test_refuses_a_tree_without_both_splits(tmp_path):
    (tmp_path / "only.py").write_bytes(b"a = 1\n" * 50)
    with pytest.raises(ValueError, match="training and"):
        build_windows(tmp_path, length=LENGTH)
