"""Tests for experiments.results_table (``python -m experiments.aggregate``): the method x
configuration tables from small fake results/ folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adambs_jax._jsonable import to_jsonable
from experiments.budget_report import add_budget_summary
from experiments.configs import ExperimentConfig
from experiments.method_run import MethodResult
from experiments.reports import build_summary
from experiments.results_table import load_summaries, main, summary_tables

METHODS = ("adam", "adam-gn", "adambs")


def fake_result(name, final_loss, seconds_per_step, steps=(0, 10)):
    losses = np.array([[1.0, final_loss - 0.01], [1.0, final_loss + 0.01]])
    times = np.array([[0.0, steps[-1] * seconds_per_step]] * 2)
    return MethodResult(
        name=name,
        label=name,
        settings={},
        compile_s=1.0,
        warmup_s=0.1,
        steps=list(steps),
        times=times,
        train_loss=losses,
        train_error=losses,
        test_loss=losses,
        test_error=losses / 10,
        step_times=np.array([seconds_per_step] * 2),
        chunk_times=[[1.0], [1.0]],
    )


def write_run(folder, name, finals, *, budget=None):
    """A results/ folder of configuration ``name``: per-step, or compute-matched if budget."""
    config = ExperimentConfig(
        name=name,
        description="fake",
        dataset="iris",
        model="lahire-mlp",
        methods=METHODS,
        learning_rate=0.01,
        batch_size=5,
        num_steps=10,
        num_seeds=2,
        target_loss=0.3,
        budget_seconds=budget,
    )
    speeds = {"adam": 0.001, "adam-gn": 0.003, "adambs": 0.0011}
    results = [fake_result(m, finals[m], speeds[m]) for m in METHODS]
    summary = build_summary(config, {"num_steps": 10, "seeds": [0, 1]}, results)
    if budget is not None:
        rates = {
            m: {"steps_per_s": 1 / speeds[m], "chunk_steps": 10, "chunk_s": [0.01]} for m in METHODS
        }
        add_budget_summary(summary, config, rates, results)
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(to_jsonable(summary)))
    return folder


@pytest.fixture
def folders(tmp_path):
    return [
        write_run(tmp_path / "a", "conf-a", {"adam": 0.5, "adam-gn": 0.1, "adambs": 0.3}),
        write_run(tmp_path / "b", "conf-b", {"adam": 0.2, "adam-gn": 0.25, "adambs": 0.2}),
        write_run(
            tmp_path / "c", "conf-a", {"adam": 0.2, "adam-gn": 0.4, "adambs": 0.25}, budget=0.5
        ),
    ]


def table_rows(text, title):
    """``method -> cells`` of the table under the bold ``title`` (a prefix)."""
    block = text.split(f"**{title}")[1].split("\n\n")[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return block.splitlines()[0], rows


def test_tables_per_step_and_per_second(folders):
    text = summary_tables(*load_summaries(folders))
    header, rows = table_rows(text, "Per step: full training loss")
    assert header == "| method | conf-a (10 steps) | conf-b (10 steps) |"
    assert rows["adam"] == ["0.5 ± 0.014", "0.2 ± 0.014"]
    _, share = table_rows(text, "Per step: share of p^GN")
    # (0.5 - 0.3) / (0.5 - 0.1) = 0.5 on conf-a; p^GN does not beat Adam on conf-b
    assert share["adambs"] == ["0.50", "(no gain)"] and share["adam-gn"][0] == "1.00"
    _, ratio = table_rows(text, "Per step: time per step")
    assert ratio["adam-gn"] == ["3.00x", "3.00x"] and ratio["adambs"] == ["1.10x", "1.10x"]
    header, loss = table_rows(text, "Per second: full training loss at the budget")
    assert header == "| method | conf-a (0.5 s) |"
    assert loss["adam"] == ["0.2 ± 0.014"] and loss["adam-gn"] == ["0.4 ± 0.014"]
    _, error = table_rows(text, "Per second: test error")
    assert error["adam"] == ["2 ± 0.14"]
    _, reached = table_rows(text, "Per second: time to the target")
    assert reached["adam"] == ["0.01 ± 0 (2/2)"]
    assert reached["adam-gn"] == ["not reached (0/2)"]


def test_equal_steps_view_when_only_a_budget_run(folders):
    text = summary_tables(*load_summaries(folders[2:]))
    header, rows = table_rows(text, "Per step: full training loss")
    assert header == "| method | conf-a (equal steps) |"
    assert rows["adam"] == ["0.2 ± 0.014 @ step 10"]


def test_cli_writes_the_tables_and_refuses_a_folder_without_summary(folders, tmp_path, capsys):
    out = tmp_path / "tables.md"
    assert main([str(f) for f in folders] + ["--out", str(out)]) == 0
    assert out.read_text() == summary_tables(*load_summaries(folders))
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_folders_of_one_configuration_are_merged_first_method_wins(tmp_path):
    first = write_run(tmp_path / "a", "conf-a", {"adam": 0.5, "adam-gn": 0.1, "adambs": 0.3})
    summary = json.loads((first / "summary.json").read_text())
    del summary["methods"]["adam-gn"]  # the oracle left out of the main run
    (first / "summary.json").write_text(json.dumps(summary))
    oracle = write_run(tmp_path / "b", "conf-a", {"adam": 0.9, "adam-gn": 0.1, "adambs": 0.9})
    per_step, budget = load_summaries([first, oracle])
    methods = per_step["conf-a"]["methods"]
    assert set(methods) == set(METHODS) and not budget
    assert methods["adam"] == summary["methods"]["adam"]  # the first folder's adam is kept
    _, rows = table_rows(summary_tables(per_step, budget), "Per step: share")
    assert rows["adambs"] == ["0.50"]  # (0.5 - 0.3) / (0.5 - 0.1)
