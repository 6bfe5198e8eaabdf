"""Tests for experiments.disk_train: a tiny run of the on-disk training experiment."""

from __future__ import annotations

import json

import pytest

from experiments import disk_train

TINY = [
    "--num-examples",
    "2048",
    "--num-test",
    "500",
    "--steps",
    "90",
    "--eval-every",
    "30",
    "--batch-size",
    "32",
    "--group-size",
    "8",
    "--hidden",
    "32",
    "--learning-rate",
    "0.01",
    "--eval-examples",
    "1000",
    "--seeds",
    "2",
    "--no-progress",
]


def test_a_tiny_run_writes_its_outputs_and_every_method_lowers_the_loss(tmp_path):
    out = tmp_path / "out"
    summary = disk_train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "disk_train.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["seeds"] == [0, 1] and "cpu_model" in summary["machine"]
    assert set(summary["methods"]) == set(disk_train.METHODS)
    for method in disk_train.METHODS:
        for seed in (0, 1):
            run = [r for r in records if r["method"] == method and r["seed"] == seed]
            assert [r["step"] for r in run] == [0, 30, 60, 90]
            assert all(b["seconds"] > a["seconds"] for a, b in zip(run, run[1:]))
            # the training loss (fixed subset) and the test loss go down
            assert run[-1]["train_loss"] < run[0]["train_loss"] - 0.2, run
            assert run[-1]["test_loss"] < run[0]["test_loss"] - 0.2, run
        row = summary["methods"][method]
        assert row["steps_per_s"]["mean"] > 0 and row["test_error"]["std"] >= 0
    # the seeds differ (not one run recorded twice)
    finals = [r for r in records if r["method"] == "exp3" and r["step"] == 90]
    assert finals[0]["train_loss"] != finals[1]["train_loss"]


def test_unknown_methods_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        disk_train.parse_args(["--methods", "uniform,nope"])
    assert "--methods: unknown ['nope']" in capsys.readouterr().err
