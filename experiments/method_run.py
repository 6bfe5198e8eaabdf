"""One method of a run: built and compiled once, then trained seed by seed from the shared
:class:`~experiments.run_setup.Setup`, its curves (arrays over seeds x evaluation points) and
``metrics.jsonl`` rows accumulated into a :class:`MethodResult`."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

import adambs_jax as ab
from experiments.chunks import compile_chunks, renormalization_of, timed_call
from experiments.diagnostics import keeps_sampler_state, sampler_probe
from experiments.methods import BuiltMethod, build_method
from experiments.run_setup import Setup

WARMUP_CHUNKS = 2  # untimed calls of the first chunk shape per method before its timed runs
CURVES = ("time_s", "train_loss", "train_error", "test_loss", "test_error", "sampled_loss")
"""The curves of every method; ``sampled_loss`` is the step metric of that name averaged over
the evaluation interval that ends at the point (NaN at step 0). The sampler diagnostics
(``experiments.diagnostics``) add curves of their own names."""


@dataclasses.dataclass
class MethodResult:
    name: str
    label: str
    settings: dict
    compile_s: float
    warmup_s: float
    steps: list[int]
    times: np.ndarray  # (S, P) cumulative training seconds at each eval point
    train_loss: np.ndarray  # (S, P)
    train_error: np.ndarray
    test_loss: np.ndarray
    test_error: np.ndarray
    step_times: np.ndarray  # (S,) seconds per step (mean over the run)
    chunk_times: list  # per seed: the timed chunk durations
    final_diagnostics: list = dataclasses.field(default_factory=list)  # per seed, at the end
    # name -> (S, P): sampled_loss and the sampler diagnostics
    curves: dict = dataclasses.field(default_factory=dict)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def build_for_setup(setup: Setup, name: str) -> BuiltMethod:
    """Method ``name`` (``experiments.methods.build_method``) for ``setup``: its training set,
    batch size, ``setup.num_steps``, learning rate, feedback and method options."""
    config = setup.config
    return build_method(
        name,
        num_examples=setup.dataset.num_train,
        batch_size=config.batch_size,
        num_steps=setup.num_steps,
        learning_rate=config.learning_rate,
        feedback=config.feedback,
        options=config.method_options.get(name),
    )


class MethodRun:
    """One method of a run: built and compiled once (``__init__``), then run seed by seed
    (``run_seed``), its curves and rows accumulated for :meth:`result`."""

    def __init__(self, setup: Setup, name: str, built: BuiltMethod | None = None):
        """``built``: the method as built by ``experiments.methods.build_method`` for this
        setup (None: built here from the configuration)."""
        seeds = setup.seeds
        self.setup, self.name = setup, name
        self.built = built or build_for_setup(setup, name)
        step = ab.make_train_step(
            setup.loss,
            self.built.optimizer,
            self.built.sampler,
            feedback=self.built.feedback,
            diagnostics=False,
            jit=False,
        )
        example_args = (self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0]))
        self.probe = sampler_probe(
            self.built, setup.grad_norm_probe, corrupted=setup.dataset.metadata.get("corrupted")
        )
        started = time.perf_counter()
        self.compiled = compile_chunks(
            step,
            setup.plan,
            setup.loop,
            example_args,
            keeps_sampler_state(self.built),
            renormalization_of(self.built.sampler),
        )
        self.compile_s = time.perf_counter() - started
        started = time.perf_counter()  # untimed calls: first-execution costs (allocations, ...)
        # ... and one of every other shape (a remainder chunk), so no timed call is a first
        warmup = [setup.plan[0]] * WARMUP_CHUNKS + sorted(set(setup.plan) - {setup.plan[0]})
        for shape in warmup:
            jax.block_until_ready(
                self.compiled[shape](
                    self.new_state(seeds[0]), setup.data, setup.train_key(seeds[0])
                )
            )
        self.warmup_s = time.perf_counter() - started
        self.shape = (len(seeds), len(setup.steps_at))
        self.curves = {key: np.full(self.shape, np.nan) for key in CURVES}
        self.step_times = np.zeros(len(seeds))
        self.chunk_times, self.final_diagnostics, self.rows = [], [], []

    def new_state(self, seed: int) -> ab.TrainState:
        return ab.TrainState.create(
            params=self.setup.initial_params[seed],
            optimizer=self.built.optimizer,
            sampler=self.built.sampler,
        )

    def run_seed(self, seed: int, bar=None) -> None:
        """Trains one seed from the shared initialization; records curves and rows."""
        setup = self.setup
        s_i = setup.seeds.index(seed)
        state, key = self.new_state(seed), setup.train_key(seed)
        diagnostics = self.probe(state.sampler_state, state.params)
        self._record_start(seed, s_i, diagnostics)
        elapsed, point, chunk_times = 0.0, 1, []
        for interval, count in setup.plan:
            state, snapshots, metrics, dt = timed_call(
                self.compiled[(interval, count)], state, setup.data, key
            )
            # --- untimed from here on
            chunk_times.append(dt)
            evals = setup.evaluate_all(snapshots.params)
            metrics = jax.device_get(metrics)
            for j in range(count):
                elapsed += dt / count  # time attributed evenly to the chunk's steps
                diagnostics = self._diagnose(snapshots, j)
                self._record_point(seed, s_i, point, elapsed, evals, metrics, j)
                self._record_diagnostics(s_i, point, diagnostics)
                if j == count - 1:
                    self.rows[-1]["chunk_time_s"] = _round(dt)
                point += 1
            if bar is not None:
                bar.update(1)
        self.step_times[s_i] = sum(chunk_times) / setup.num_steps
        self.chunk_times.append(chunk_times)
        self.final_diagnostics.append(diagnostics)

    def _diagnose(self, snapshots, j: int) -> dict:
        """The sampler diagnostics at snapshot ``j`` of a chunk (none without its state)."""
        if snapshots.sampler_state is None:
            return {}
        sampler_state, params = jax.tree.map(
            lambda leaf: leaf[j], (snapshots.sampler_state, snapshots.params)
        )
        return self.probe(sampler_state, params)

    def _record_diagnostics(self, s_i: int, point: int, diagnostics: dict) -> None:
        """Adds ``diagnostics`` to the point's row and to their curves."""
        for k, v in diagnostics.items():
            self.curves.setdefault(k, np.full(self.shape, np.nan))[s_i, point] = v
        self.rows[-1].update({k: _round(v) for k, v in diagnostics.items()})

    def _record_start(self, seed: int, s_i: int, diagnostics: dict) -> None:
        """The step-0 evaluation (shared by every method of the seed) and diagnostics."""
        first = self.setup.initial_eval[seed]
        self.curves["time_s"][s_i, 0] = 0.0
        for k, v in first.items():  # setdefault: e.g. clean_loss, with flipped labels
            self.curves.setdefault(k, np.full(self.shape, np.nan))[s_i, 0] = v[0]
        self.rows.append(
            {
                "method": self.name,
                "seed": seed,
                "step": 0,
                "time_s": 0.0,
                **{k: _round(v[0]) for k, v in first.items()},
            }
        )
        self._record_diagnostics(s_i, 0, diagnostics)

    def _record_point(self, seed, s_i, point, elapsed, evals, metrics, j) -> None:
        """Evaluation point ``point`` (snapshot ``j`` of its chunk): curves and its row."""
        self.curves["time_s"][s_i, point] = elapsed
        for k, v in evals.items():
            self.curves.setdefault(k, np.full(self.shape, np.nan))[s_i, point] = v[j]
        if "sampled_loss" in metrics:
            self.curves["sampled_loss"][s_i, point] = metrics["sampled_loss"][j]
        self.rows.append(
            {
                "method": self.name,
                "seed": seed,
                "step": self.setup.steps_at[point],
                "time_s": _round(elapsed),
                **{k: _round(v[j]) for k, v in evals.items()},
                **{f"batch_{k}": _round(v[j]) for k, v in metrics.items()},
            }
        )

    def result(self) -> MethodResult:
        c = self.curves
        return MethodResult(
            name=self.name,
            label=self.built.label,
            settings=self.built.settings,
            compile_s=self.compile_s,
            warmup_s=self.warmup_s,
            steps=list(self.setup.steps_at),
            times=c["time_s"],
            train_loss=c["train_loss"],
            train_error=c["train_error"],
            test_loss=c["test_loss"],
            test_error=c["test_error"],
            step_times=self.step_times,
            chunk_times=self.chunk_times,
            final_diagnostics=self.final_diagnostics,
            curves={k: v for k, v in c.items() if k not in CURVES[:5]},
        )
