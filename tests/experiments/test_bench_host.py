"""Tests for experiments.bench_host: its memmap source (a run of the benchmark compiles three
MLP steps, too slow for the suite: run ``python -m experiments.bench_host`` by hand)."""
from __future__ import annotations

import numpy as np

import adambs_jax as ab
from experiments import bench_host
from experiments.data import synthetic_disk


def test_the_memmap_source_reads_the_draws_in_order(tmp_path):
    arrays = synthetic_disk.load_synthetic(tmp_path, 300, chunk_size=100, progress=False)
    source = bench_host.MemmapSource(arrays)
    indices = np.array([299, 0, 17, 17, 150])
    expected = ab.sources.ArraySource({k: np.asarray(v) for k, v in arrays.items()}).read(indices)
    batch = source.read(indices)
    for name in ("x", "y"):
        np.testing.assert_array_equal(batch[name], expected[name])
    assert source.num_examples == 300

