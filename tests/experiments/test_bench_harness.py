"""Tests for experiments.bench_harness: arguments, interleaved timing rows, tables, reports."""

from __future__ import annotations

import json

import jax
import pytest

from experiments import bench_harness as harness


def test_markdown_table_formats_rows_with_templates():
    columns = [
        ("n", "---", "{n:.0e}"),
        ("tree", "---:", "{tree[us]:.1f}"),
        ("ratio", "---:", "{ratio:.1f}x"),
    ]
    table = harness.markdown_table(columns, [{"n": 1000, "tree": {"us": 2.345}, "ratio": 3.0}])
    assert table.splitlines() == [
        "| n | tree | ratio |",
        "|---|---:|---:|",
        "| 1e+03 | 2.3 | 3.0x |",
    ]


def test_write_report_creates_the_folder(tmp_path):
    report = {"benchmark": "b", "machine": harness.machine_record(), "results": [1, 2]}
    path = harness.write_report(tmp_path / "sub" / "bench.json", report)
    assert json.loads(path.read_text()) == report
    assert {"cpu_model", "jax_backend", "jax"} <= set(report["machine"])


def test_time_variants_rows_and_ratios(capsys):
    step = jax.jit(lambda state, data, key: (state + data, {}))
    steps = {"base": (step, 0.0), "other": (step, 0.0)}
    rows, timed = harness.time_variants(
        steps, 1.0, runs=4, warmup=1, rounds=2, label="mlp ", model="mlp"
    )
    assert [row["variant"] for row in rows] == ["base", "other"]
    assert list(rows[0]) == [
        "model",
        "variant",
        "median_ms",
        "p10_ms",
        "p90_ms",
        "runs",
        "ratio_vs_base",
    ]
    assert rows[0]["ratio_vs_base"] == 1.0 and rows[1]["runs"] == 4
    assert float(timed["other"].state) == 5.0  # warm-up and timed steps all advanced it
    assert "mlp base" in capsys.readouterr().out
    table = harness.markdown_table(harness.step_time_columns("base", "Base"), rows)
    assert table.splitlines()[0] == "| median ms/step | p10–p90 ms | ratio vs Base |"


def test_step_timing_arguments_are_checked():
    parser = harness.bench_parser("A benchmark.\n\nMore.", "results/x.json")
    harness.add_step_timing_arguments(parser, min_runs=30)
    args = parser.parse_args(["--runs", "40"])
    harness.check_step_timing_arguments(parser, args, min_runs=30)
    assert (args.out, args.runs, args.warmup, args.rounds) == ("results/x.json", 40, 5, 10)
    with pytest.raises(SystemExit):
        harness.check_step_timing_arguments(
            parser, parser.parse_args(["--runs", "10"]), min_runs=30
        )
