"""Tests for experiments.data.synthetic_disk: the on-disk memmap dataset and its checksums."""
from __future__ import annotations

import json

import numpy as np
import pytest

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


def test_an_existing_dataset_is_reused_and_a_changed_file_is_caught(tmp_path):
    synthetic_disk.write_synthetic(tmp_path, 500, chunk_size=200, progress=False)
    meta = json.loads((tmp_path / synthetic_disk.CHECKSUM_FILE).read_text())
    assert meta["num_examples"] == 500 and set(meta["sha256"]) == {"x.npy", "y.npy"}
    before = (tmp_path / "x.npy").stat().st_mtime_ns
    synthetic_disk.load_synthetic(tmp_path, 500, chunk_size=200, progress=False)
    assert (tmp_path / "x.npy").stat().st_mtime_ns == before  # not rewritten
    y = np.load(tmp_path / "y.npy", mmap_mode="r+")
    y[3] = (y[3] + 1) % 10
    y.flush()
    del y
    with pytest.raises(ValueError, match="y.npy: SHA-256"):
        synthetic_disk.verify(tmp_path)
    with pytest.raises(ValueError, match="num_examples and chunk_size must be >= 1"):
        synthetic_disk.write_synthetic(tmp_path, 0, progress=False)
