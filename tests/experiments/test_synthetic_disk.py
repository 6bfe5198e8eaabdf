"""Tests for experiments.data.synthetic_disk: the on-disk memmap dataset and its checksums."""

from __future__ import annotations

import json

import numpy as np
import pytest

import adambs_jax as ab
from experiments.data import synthetic_disk


def test_written_in_chunks_equals_written_at_once_and_is_learnable(tmp_path):
    data = synthetic_disk.load_synthetic(tmp_path / "a", 1000, chunk_size=300, progress=False)
    assert data["x"].shape == (1000, 32) and data["x"].dtype == np.float32
    assert data["y"].shape == (1000,) and data["y"].dtype == np.int32
    assert isinstance(data["x"], np.memmap)
    again = synthetic_disk.load_synthetic(tmp_path / "b", 1000, chunk_size=300, progress=False)
    np.testing.assert_array_equal(data["x"], again["x"])  # deterministic in (n, seed, chunk)
    # separable-ish: least squares on one-hot labels beats chance (10%) by far
    x, y = np.asarray(data["x"]), np.asarray(data["y"])
    weights = np.linalg.lstsq(x, np.eye(10)[y], rcond=None)[0]
    assert np.mean(np.argmax(x @ weights, 1) == y) > 0.5
    assert len(np.unique(y)) == 10


def test_the_teacher_task_splits_share_the_teacher_but_not_the_examples(tmp_path):
    train = synthetic_disk.open_synthetic(
        tmp_path / "train", 2000, task="teacher", chunk_size=700, progress=False
    )
    test = synthetic_disk.open_synthetic(
        tmp_path / "test", 2000, task="teacher", split="test", chunk_size=700, progress=False
    )
    assert isinstance(train, ab.host.MemmapSource) and train.num_examples == 2000
    assert not np.array_equal(train.arrays["x"][:10], test.arrays["x"][:10])
    # the same teacher: a nearest-neighbour rule fit on train predicts test far above chance
    x_train, y_train = np.asarray(train.arrays["x"]), np.asarray(train.arrays["y"])
    x_test, y_test = np.asarray(test.arrays["x"][:300]), np.asarray(test.arrays["y"][:300])
    distances = ((x_test[:, None, :] - x_train[None]) ** 2).sum(-1)
    assert np.mean(y_train[np.argmin(distances, 1)] == y_test) > 0.2
    with pytest.raises(ValueError, match="task must be one of"):
        synthetic_disk.write_synthetic(tmp_path / "c", 10, task="nope", progress=False)


def test_an_existing_dataset_is_reused_and_a_changed_file_is_caught(tmp_path):
    synthetic_disk.write_synthetic(tmp_path, 500, chunk_size=200, progress=False)
    params = json.loads((tmp_path / synthetic_disk.PARAMS_FILE).read_text())
    assert params["num_examples"] == 500 and params["task"] == "linear"
    manifest = json.loads((tmp_path / ab.host.MANIFEST_NAME).read_text())
    assert set(manifest["fields"]) == {"x", "y"}
    before = (tmp_path / "x.npy").stat().st_mtime_ns
    synthetic_disk.load_synthetic(tmp_path, 500, chunk_size=200, progress=False)
    assert (tmp_path / "x.npy").stat().st_mtime_ns == before  # not rewritten
    y = np.load(tmp_path / "y.npy", mmap_mode="r+")
    y[3] = (y[3] + 1) % 10
    y.flush()
    del y
    with pytest.raises(ValueError, match="sha256 of y.npy does not match"):
        synthetic_disk.verify(tmp_path)
    with pytest.raises(ValueError, match="num_examples and chunk_size must be >= 1"):
        synthetic_disk.write_synthetic(tmp_path, 0, progress=False)
