"""docs/porting.md: three training loops that already work (Flax NNX, a linen TrainState, a
hand-written optax loop) ported to bandit sampling, each pair of programs kept as files in
docs/porting/.

The page's diffs are those of the files (the page cannot drift), the changed lines are
counted as the page says, every program runs, and under the uniform sampler each port is
its original: the same draws (the port's, fed to the original), weights 1, the same
parameters within float rounding.

    python -m tests.test_porting write     # rewrites the diffs of docs/porting.md
    python -m tests.test_porting measure   # the accuracy table of docs/porting.md
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import adambs_jax as ab

pytest.importorskip("sklearn")  # the programs train on scikit-learn's digits

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "porting.md"
PROGRAMS = ROOT / "docs" / "porting"
PORTS = ("nnx", "linen", "optax")
# diff -u before after | grep -c '^[+-][^+-]': a line changed counts twice (- and +)
CHANGED_LINES = {"nnx": 10, "linen": 10, "optax": 8}
STEPS = 6  # training steps of the tests (the programs' own default: TRAIN_STEPS)


def _read(name: str) -> list[str]:
    return (PROGRAMS / f"{name}.py").read_text().splitlines(keepends=True)


def page_diff(port: str) -> str:
    """The unified diff docs/porting.md shows: the whole program as context, and a blank
    line of context as an empty line (not one space: the docs carry no trailing
    whitespace; ``patch`` and ``git apply`` read it as the same)."""
    before, after = _read(f"{port}_before"), _read(f"{port}_after")
    lines = difflib.unified_diff(
        before,
        after,
        fromfile=f"docs/porting/{port}_before.py",
        tofile=f"docs/porting/{port}_after.py",
        n=max(len(before), len(after)),
    )
    return re.sub(r"^ $", "", "".join(lines), flags=re.M)


def changed_lines(port: str) -> int:
    """``diff -u before after | grep -c '^[+-][^+-]'``, with difflib."""
    diff = difflib.unified_diff(_read(f"{port}_before"), _read(f"{port}_after"))
    return sum(1 for line in diff if re.match(r"[+-][^+-]", line.rstrip("\n")))


def _diff_blocks(text: str) -> list[str]:
    return re.findall(r"```diff\n(.*?)```", text, flags=re.S)


def test_the_page_shows_the_diffs_of_the_files():
    blocks = _diff_blocks(PAGE.read_text())
    assert len(blocks) == len(PORTS), "docs/porting.md: one diff per port"
    for port, block in zip(PORTS, blocks):
        assert block == page_diff(port), (
            f"docs/porting.md's {port} diff is not that of docs/porting/{port}_*.py: "
            f"python -m tests.test_porting write"
        )


@pytest.mark.parametrize("port", PORTS)
def test_the_changed_lines_are_those_the_page_states(port):
    assert changed_lines(port) == CHANGED_LINES[port]
    if shutil.which("diff") and shutil.which("grep"):  # the count as the page words it
        command = f"diff -u {port}_before.py {port}_after.py | grep -c '^[+-][^+-]'"
        out = subprocess.run(command, shell=True, cwd=PROGRAMS, capture_output=True, text=True)
        assert int(out.stdout) == CHANGED_LINES[port]
    row = re.search(rf"^\| {port} \|.*$", PAGE.read_text(), flags=re.M)
    assert row and f"| {CHANGED_LINES[port]} |" in row.group(0), row


@pytest.mark.parametrize("port", PORTS)
def test_each_port_is_at_most_ten_changed_lines(port):
    assert changed_lines(port) <= 10


def load(name: str):
    """A fresh module of docs/porting/<name>.py (its jitted functions compile anew)."""
    spec = importlib.util.spec_from_file_location(f"porting_{name}", PROGRAMS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Replay:
    """Stands in for the original's ``np.random.default_rng(seed)``: its draws are the
    port's, in order."""

    def __init__(self, draws, num_examples, batch_size):
        self._draws, self.n, self.k = iter(draws), num_examples, batch_size

    def integers(self, low, high, size):
        assert (low, high, size) == (0, self.n, self.k), "the original draws i.i.d. uniform"
        return next(self._draws)


def _comparable(result):
    """The trained state of a program's ``main``: parameters and BatchNorm statistics."""
    trained = result[0]
    if hasattr(trained, "batch_stats"):  # the linen TrainState
        return {"params": trained.params, "batch_stats": trained.batch_stats}
    if isinstance(trained, nnx.Module):
        return nnx.to_pure_dict(nnx.state(trained, nnx.Any(nnx.Param, nnx.BatchStat)))
    return trained  # optax params


@pytest.mark.parametrize("port", PORTS)
def test_under_the_uniform_sampler_the_port_is_its_original(port, monkeypatch):
    """The port with ``ab.uniform_sampler`` in place of its bandit sampler draws i.i.d.
    uniform batches with weights 1/(n p) = 1; fed the same draws, the original trains to the
    same parameters (and the same metrics) within float rounding. Both evaluate every 2
    steps: the NNX module stays usable between steps."""
    draws, weights = [], []

    class Recording(ab.Sampling):
        def draw(self):
            drawn = super().draw()
            draws.append(np.asarray(self.indices))
            weights.append(np.asarray(drawn.weights))
            return drawn

    with monkeypatch.context() as patch:
        patch.setattr(ab, "Sampling", Recording)
        for factory in ("exp3_sampler", "priority_sampler"):
            patch.setattr(ab, factory, lambda n, k, **_: ab.uniform_sampler(n, k))
        after = load(f"{port}_after")
        patch.setattr(after, "EVAL_EVERY", 2)
        ported = after.main(steps=STEPS)
    assert len(draws) == STEPS
    np.testing.assert_allclose(np.stack(weights), 1.0, rtol=1e-6)

    with monkeypatch.context() as patch:
        n = len(after.load_data(0)[0]["label"])
        patch.setattr(np.random, "default_rng", lambda seed: _Replay(draws, n, after.BATCH_SIZE))
        before = load(f"{port}_before")
        patch.setattr(before, "EVAL_EVERY", 2)
        original = before.main(steps=STEPS)

    chex.assert_trees_all_close(_comparable(ported), _comparable(original), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ported[1], original[1], rtol=1e-5, atol=1e-6)  # the metrics
    if port == "nnx":
        assert len(ported[1]["test_accuracy"]) == STEPS // 2  # evaluated between steps


@pytest.mark.slow
@pytest.mark.parametrize("port", PORTS)
def test_the_port_trains_as_well_as_its_original(port):
    """One seed, the programs' own step count and samplers: the test accuracy of the port
    is the original's within the spread measured over seeds (docs/porting.md)."""
    accuracies = {}
    for version in ("before", "after"):
        result = load(f"{port}_{version}").main()
        accuracies[version] = (
            result[1]["test_accuracy"][-1] if isinstance(result[1], dict) else result[1]
        )
    assert accuracies["after"] > 0.9
    assert abs(accuracies["after"] - accuracies["before"]) <= 0.05, accuracies


def write_page() -> None:
    """Rewrites the diffs of docs/porting.md from the files, in order."""
    text = PAGE.read_text()
    blocks = iter(page_diff(port) for port in PORTS)
    text = re.sub(r"```diff\n.*?```", lambda _: f"```diff\n{next(blocks)}```", text, flags=re.S)
    PAGE.write_text(text)
    print({port: changed_lines(port) for port in PORTS})


def measure(seeds=range(5)) -> None:
    """The final test accuracy of each program over ``seeds`` (its own step count)."""
    for port in PORTS:
        for version in ("before", "after"):
            module = load(f"{port}_{version}")
            module.EVAL_EVERY = module.TRAIN_STEPS
            accuracies = []
            for seed in seeds:
                result = module.main(seed=seed)
                history = result[1]
                accuracies.append(
                    history["test_accuracy"][-1] if isinstance(history, dict) else history
                )
            print(
                f"{port}_{version}: {np.mean(accuracies):.4f} +- {np.std(accuracies, ddof=1):.4f}"
                f" ({', '.join(f'{a:.4f}' for a in accuracies)})",
                flush=True,
            )
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    {"write": write_page, "measure": measure}[sys.argv[1]]()
