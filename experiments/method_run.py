"""One method of a run: built and compiled once, then trained seed by seed from the shared
:class:`~experiments.run_setup.Setup`, its curves (arrays over seeds x evaluation points) and
``metrics.jsonl`` rows accumulated into a :class:`MethodResult`."""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

import adambs_jax as ab
from experiments.chunks import compile_chunks, timed_call
from experiments.diagnostics import sampler_diagnostics
from experiments.methods import build_method
from experiments.run_setup import Setup

WARMUP_CHUNKS = 2  # untimed chunk calls per method before its timed runs
CURVES = ("time_s", "train_loss", "train_error", "test_loss", "test_error")


@dataclasses.dataclass
class MethodResult:
    name: str
    label: str
    settings: dict
    compile_s: float
    warmup_s: float
    steps: list[int]
    times: np.ndarray        # (S, P) cumulative training seconds at each eval point
    train_loss: np.ndarray   # (S, P)
    train_error: np.ndarray
    test_loss: np.ndarray
    test_error: np.ndarray
    step_times: np.ndarray   # (S,) seconds per step (mean over the run)
    chunk_times: list        # per seed: the timed chunk durations
    final_diagnostics: list = dataclasses.field(default_factory=list)  # per seed, at the end


def _round(value: float) -> float:
    return float(f"{value:.6g}")


class MethodRun:
    """One method of a run: built and compiled once (``__init__``), then run seed by seed
    (``run_seed``), its curves and rows accumulated for :meth:`result`."""

    def __init__(self, setup: Setup, name: str):
        config, seeds = setup.config, setup.seeds
        self.setup, self.name = setup, name
        self.built = build_method(
            name, num_examples=setup.dataset.num_train, batch_size=config.batch_size,
            num_steps=setup.num_steps, learning_rate=config.learning_rate,
            feedback=config.feedback, options=config.method_options.get(name),
        )
        step = ab.make_train_step(setup.loss, self.built.optimizer, self.built.sampler,
                                  feedback=self.built.feedback, diagnostics=False, jit=False)
        example_args = (self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0]))
        started = time.perf_counter()
        self.compiled = compile_chunks(step, setup.plan, setup.loop, example_args)
        self.compile_s = time.perf_counter() - started
        started = time.perf_counter()  # untimed calls: first-execution costs (allocations, ...)
        for _ in range(WARMUP_CHUNKS):
            jax.block_until_ready(self.compiled[setup.plan[0]](
                self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0])))
        self.warmup_s = time.perf_counter() - started
        shape = (len(seeds), len(setup.steps_at))
        self.curves = {key: np.zeros(shape) for key in CURVES}
        self.step_times = np.zeros(len(seeds))
        self.chunk_times, self.final_diagnostics, self.rows = [], [], []

    def new_state(self, seed: int) -> ab.TrainState:
        return ab.TrainState.create(params=self.setup.initial_params[seed],
                                    optimizer=self.built.optimizer, sampler=self.built.sampler)

    def run_seed(self, seed: int, bar=None) -> None:
        """Trains one seed from the shared initialization; records curves and rows."""
        setup = self.setup
        s_i = setup.seeds.index(seed)
        state, key = self.new_state(seed), setup.train_key(seed)
        self._record_start(seed, s_i)
        elapsed, point, chunk_times, diagnostics = 0.0, 1, [], {}
        for interval, count in setup.plan:
            state, params_stack, metrics, dt = timed_call(
                self.compiled[(interval, count)], state, setup.data, key)
            # --- untimed from here on
            chunk_times.append(dt)
            evals = setup.evaluate_all(params_stack)
            metrics = jax.device_get(metrics)
            diagnostics = sampler_diagnostics(self.built, state.sampler_state)
            for j in range(count):
                elapsed += dt / count  # time attributed evenly to the chunk's steps
                self._record_point(seed, s_i, point, elapsed, evals, metrics, j)
                if j == count - 1:  # the sampler's state exists at chunk ends only
                    self.rows[-1]["chunk_time_s"] = _round(dt)
                    self.rows[-1].update({k: _round(v) for k, v in diagnostics.items()})
                point += 1
            if bar is not None:
                bar.update(1)
        self.step_times[s_i] = sum(chunk_times) / setup.num_steps
        self.chunk_times.append(chunk_times)
        self.final_diagnostics.append(diagnostics)

    def _record_start(self, seed: int, s_i: int) -> None:
        """The step-0 evaluation (shared by every method of the seed)."""
        first = self.setup.initial_eval[seed]
        for k, v in first.items():
            self.curves[k][s_i, 0] = v[0]
        self.rows.append({"method": self.name, "seed": seed, "step": 0, "time_s": 0.0,
                          **{k: _round(v[0]) for k, v in first.items()}})

    def _record_point(self, seed, s_i, point, elapsed, evals, metrics, j) -> None:
        """Evaluation point ``point`` (snapshot ``j`` of its chunk): curves and its row."""
        self.curves["time_s"][s_i, point] = elapsed
        for k, v in evals.items():
            self.curves[k][s_i, point] = v[j]
        self.rows.append({"method": self.name, "seed": seed, "step": self.setup.steps_at[point],
                          "time_s": _round(elapsed),
                          **{k: _round(v[j]) for k, v in evals.items()},
                          **{f"batch_{k}": _round(v[j]) for k, v in metrics.items()}})

    def result(self) -> MethodResult:
        c = self.curves
        return MethodResult(
            name=self.name, label=self.built.label, settings=self.built.settings,
            compile_s=self.compile_s, warmup_s=self.warmup_s, steps=list(self.setup.steps_at),
            times=c["time_s"], train_loss=c["train_loss"], train_error=c["train_error"],
            test_loss=c["test_loss"], test_error=c["test_error"], step_times=self.step_times,
            chunk_times=self.chunk_times, final_diagnostics=self.final_diagnostics,
        )
