"""Tests for the command line (experiments/__main__.py): --list, bad arguments, missing data
files and a tiny run."""

from __future__ import annotations

import json

from experiments.__main__ import main
from experiments.configs import CONFIGS


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in CONFIGS:
        assert name in out
    assert "adambs-tuned" in out


def test_cli_bad_arguments(capsys):
    assert main(["nope"]) == 2
    assert main(["default", "--methods", "adam,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "paper-cifar10",
            "--data-dir",
            str(tmp_path),
            "--no-download",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar" in err and "missing" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_runs_a_tiny_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "lahire-wine",
            "--seeds",
            "1",
            "--max-steps",
            "6",
            "--methods",
            "sgd",
            "--eval-every",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "loss_vs_time.png" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"]["num_steps"] == 6 and summary["config"]["num_seeds"] == 1


def test_cli_budget_options_reach_the_config():
    from experiments.__main__ import _parser, apply_overrides

    args = _parser().parse_args(
        [
            "lahire-iris",
            "--budget-seconds",
            "2.5",
            "--lr-schedule",
            "cosine",
            "--calibration-rounds",
            "3",
            "--diagnostic-examples",
            "0",
        ]
    )
    config = apply_overrides(CONFIGS["lahire-iris"], args)
    assert (
        config.budget_seconds,
        config.lr_schedule,
        config.calibration_rounds,
        config.diagnostic_examples,
    ) == (2.5, "cosine", 3, 0)
    assert CONFIGS["lahire-iris"].budget_seconds is None  # per-step by default
