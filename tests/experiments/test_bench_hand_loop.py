"""Tests for experiments.bench_hand_loop: the loops train the same problem, and the report
has a row per variant with the plain loop as 1."""

import json

import jax
import numpy as np

from experiments import bench_hand_loop


def test_the_port_and_the_explicit_form_train_as_the_plain_loop():
    variants = ("optax", "sampling/uniform/loss", "explicit/priority/loss")
    loops = bench_hand_loop.build_loops(variants, steps=40)
    losses = {variant: float(run(20)) for variant, run in loops.items()}
    assert all(np.isfinite(loss) for loss in losses.values()), losses
    # the uniform port draws like the plain loop (weights 1): the same scale of loss
    assert abs(losses["sampling/uniform/loss"] - losses["optax"]) < 1.0


def test_the_report_has_a_row_per_variant_with_the_plain_loop_as_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_hand_loop.main(["--steps", "2", "--rounds", "1", "--out", str(out)])
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(bench_hand_loop.VARIANTS) == {r["variant"] for r in report["rows"]}
    assert rows["optax"]["ratio_to_optax"] == 1.0
    assert all(
        row["pipelined_us"] > 0 and row["backend"] == jax.default_backend() for row in rows.values()
    )
    assert "ratio to optax" in capsys.readouterr().out
