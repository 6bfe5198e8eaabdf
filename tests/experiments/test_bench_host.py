"""Tests for experiments.bench_host: the variants' sources and samplers (a run of the
benchmark compiles five MLP steps, too slow for the suite: run ``python -m
experiments.bench_host`` by hand)."""

from __future__ import annotations

import argparse

import numpy as np

import adambs_jax as ab
from experiments import bench_host
from experiments.data import synthetic_disk


def _args(batch_size=32):
    return argparse.Namespace(batch_size=batch_size, lookahead=2, num_threads=1)


def test_a_groups_variant_reads_the_first_whole_groups_of_the_same_files(tmp_path):
    source = synthetic_disk.open_synthetic(tmp_path, 300, chunk_size=100, progress=False)
    assert bench_host.variant_source("exp3", source) is source
    groups = bench_host.variant_source("groups128_exp3", source)
    assert groups.num_examples == 256  # 128 * floor(300 / 128)
    indices = np.array([255, 0, 17, 17, 150])
    np.testing.assert_array_equal(groups.read(indices)["x"], source.read(indices)["x"])


def test_the_groups_variant_draws_contiguous_runs_and_the_loader_reads_them(tmp_path):
    source = synthetic_disk.open_synthetic(tmp_path, 300, chunk_size=100, progress=False)
    runner = bench_host.Runner(
        "groups16_exp3", bench_host.variant_source("groups16_exp3", source), _args()
    )
    try:
        batch, draws = runner.loader.next()
    finally:
        runner.loader.close()
    indices = np.asarray(draws.indices)
    runs = indices.reshape(2, 16)  # K / m = 2 groups of m = 16 contiguous examples
    assert np.all(runs[:, 0] % 16 == 0) and np.all(np.diff(runs, axis=1) == 1)
    np.testing.assert_array_equal(np.asarray(batch["y"]), source.read(indices)["y"])
    # the weights 1 / (n p) of a groups draw are 1 / (G q_g): uniform q at the start -> 1
    n = runner.step.sampler.num_examples
    np.testing.assert_allclose(1.0 / (n * np.asarray(draws.probs)), 1.0, rtol=1e-5)
    assert isinstance(runner.step.sampler, ab.samplers.Sampler)
