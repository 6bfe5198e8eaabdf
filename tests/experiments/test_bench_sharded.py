"""Tests for experiments.bench_sharded: its plumbing at n = 10^4 and 2 scanned steps, run as a
subprocess (the 8 simulated devices must be set before jax is imported)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import bench_sharded

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_force_host_devices_refuses_once_jax_is_imported():
    import jax  # noqa: F401 (the suite has imported it already)

    with pytest.raises(RuntimeError, match="already imported"):
        bench_sharded.force_host_devices(8)


def test_bad_arguments_exit_with_a_usage_error():
    with pytest.raises(SystemExit):
        bench_sharded.parse_args(["--steps", "0"])


@pytest.mark.slow
def test_the_benchmark_writes_its_report_at_small_n(tmp_path):
    out = tmp_path / "sharded.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "experiments.bench_sharded", "--out", str(out)]
    command += ["--sizes", "10000", "--memory-sizes", "20000", "--steps", "2", "--repeats", "2"]
    command += ["--chi-n", "10000", "--chi-updates", "3", "--chi-batches", "20"]
    command += ["--chi-bins", "16"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "repeat 2" in result.stdout  # progress lines
    report = json.loads(out.read_text())
    assert report["devices"] == 8 and report["simulated_devices"]
    assert [row["sampler"] for row in report["rows"]] == ["exp3", "priority"]
    for row in report["rows"]:
        rep, sh = row["replicated"], row["sharded"]
        # a replicated copy is whole on each of the 8 devices; the sharded state about 1/8
        assert rep["bytes_all_devices"] == 8 * rep["bytes_per_device"]
        assert 0.12 < row["bytes_ratio"] < 0.135
        assert sh["bytes_all_devices"] < 1.1 * rep["bytes_per_device"]
        for variant in (rep, sh):
            assert len(variant["step_us_all"]) == 2 and variant["step_us_min"] > 0
            assert variant["steps_done"] == 2 * 3  # warm-up and 2 repeats of 2 steps
            assert variant["healthy"] and variant["compile_s"] > 0
    for row in report["memory_rows"]:
        assert row["num_examples"] == 20000 and 0.12 < row["bytes_ratio"] < 0.135
    for row in report["chi_square"]:
        assert row["draws"] == 20 * 128 and row["dof"] == 15
        assert row["passed"] and 0 <= row["p_value"] <= 1
        assert abs(row["sum_p_minus_1"]) < 1e-4 and row["returned_probs_max_rel_diff"] < 1e-4
    priority = report["chi_square"][1]
    assert priority["max_bin_mass_over_uniform"] > 1.5  # the skewed updates moved p
