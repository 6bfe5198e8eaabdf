"""Tests for experiments.chunks: the chunk plan, the scan chunk and the metric reductions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments.chunks as chunks_module
from experiments.chunks import (
    MEAN,
    METRIC_REDUCTIONS,
    Renormalization,
    chunk_plan,
    compile_chunks,
    eval_points,
    fixed_chunk_plan,
    make_chunk,
    reduce_step_metrics,
    reduction_of,
    timed_call,
)


@pytest.mark.parametrize(
    "num_steps, eval_every, chunk_steps, expected",
    [
        (1000, 10, 100, [(10, 10)] * 10),
        (600, 25, 100, [(25, 4)] * 6),
        (12, 4, 8, [(4, 1)] * 3),  # 3 intervals: largest divisor <= 2 is 1
        (37, 10, 100, [(10, 3), (7, 1)]),  # remainder chunk
        (5, 10, 100, [(5, 1)]),
        (1000, 1000, 100, [(1000, 1)]),
    ],
)
def test_chunk_plan(num_steps, eval_every, chunk_steps, expected):
    plan = chunk_plan(num_steps, eval_every, chunk_steps)
    assert plan == expected
    points = eval_points(plan)
    assert points[0] == 0 and points[-1] == num_steps
    assert len(points) == 1 + sum(count for _, count in plan)


@pytest.mark.parametrize(
    "num_steps, eval_every, chunk_steps, expected",
    [
        (1000, 10, 100, [(10, 10)] * 10),
        (2823, 10, 100, [(10, 10)] * 28 + [(10, 2), (3, 1)]),  # chunk_plan would cut 6 intervals
        (5, 10, 100, [(5, 1)]),
        (250, 1000, 100, [(250, 1)]),
        (75, 25, 25, [(25, 1)] * 3),  # the python loop's plan
    ],
)
def test_fixed_chunk_plan(num_steps, eval_every, chunk_steps, expected):
    plan = fixed_chunk_plan(num_steps, eval_every, chunk_steps)
    assert plan == expected
    assert eval_points(plan)[-1] == num_steps


class CounterState(NamedTuple):
    params: jax.Array
    step: jax.Array
    sampler_state: jax.Array | None = None


def test_make_chunk_keeps_params_and_reduces_metrics():
    def step_nt(state, data, key):  # params counts up; the metrics report the old value
        del data, key
        metrics = {
            "loss": state.params,
            "max_weight": state.params,
            "num_dropped_feedback": jnp.ones((), jnp.int32),
        }
        return CounterState(state.params + 1.0, state.step + 1), metrics

    initial = CounterState(jnp.zeros(()), jnp.zeros((), jnp.int32))
    chunk = jax.jit(make_chunk(step_nt, interval=3, num_intervals=2))
    final, snapshots, metrics = chunk(initial, None, jax.random.key(0))
    assert float(final.params) == 6.0 and int(final.step) == 6
    np.testing.assert_allclose(snapshots.params, [3.0, 6.0])
    assert snapshots.sampler_state is None  # not asked for
    np.testing.assert_allclose(metrics["loss"], [1.0, 4.0])  # mean of 0,1,2 / 3,4,5
    np.testing.assert_allclose(metrics["max_weight"], [2.0, 5.0])  # max
    np.testing.assert_allclose(metrics["num_dropped_feedback"], [3.0, 3.0])  # sum
    python = reduce_step_metrics(
        [
            {"loss": 0.0, "max_weight": 0.0, "num_dropped_feedback": 1},
            {"loss": 2.0, "max_weight": 2.0, "num_dropped_feedback": 1},
        ]
    )
    assert python == {"loss": [1.0], "max_weight": [2.0], "num_dropped_feedback": [2.0]}


def test_one_table_of_reductions():
    for name in ("loss", "sampled_loss", "anything else"):
        assert reduction_of(name) is MEAN
    assert float(METRIC_REDUCTIONS["min_weight"].on_host(np.array([0.5, 3.0]))) == 0.5
    values = np.array([0.5, 3.0, 1.5], np.float32)
    for name, reduction in METRIC_REDUCTIONS.items():  # device and host reduce alike
        np.testing.assert_allclose(
            float(reduction.on_device(jnp.asarray(values))),
            float(reduction.on_host(values.astype(np.float64))),
            err_msg=name,
        )
    assert float(METRIC_REDUCTIONS["max_weight"].on_host(values)) == 3.0
    assert float(METRIC_REDUCTIONS["num_dropped_feedback"].on_host(values)) == 5.0


def counting_step(state, data, key):
    del data
    metrics = {
        "loss": state.params + jax.random.uniform(key),
        "num_dropped_feedback": jnp.ones((), jnp.int32),
    }
    return CounterState(state.params + 1.0, state.step + 1, state.sampler_state - 1.0), metrics


def test_python_loop_chunk_matches_scan_chunk():
    """Both loops give the same state, snapshot and reduced metrics (same keys per step)."""
    outputs = {}
    for loop in ("scan", "python"):

        def args():  # a fresh state each time: the chunks donate it
            state = CounterState(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros(()))
            return state, None, jax.random.key(3)

        chunk = compile_chunks(counting_step, [(4, 1)], loop, args(), keep_sampler_state=True)[
            (4, 1)
        ]
        state, snapshots, metrics, seconds = timed_call(chunk, *args())
        assert seconds > 0
        outputs[loop] = (float(state.params), snapshots, jax.device_get(metrics))
    (scan_params, scan_stack, scan_metrics) = outputs["scan"]
    (python_params, python_stack, python_metrics) = outputs["python"]
    assert scan_params == python_params == 4.0
    for stack in (scan_stack, python_stack):  # one snapshot: the state after the 4 steps
        np.testing.assert_allclose(stack.params, [4.0])
        np.testing.assert_allclose(stack.sampler_state, [-4.0])
    for name in ("loss", "num_dropped_feedback"):
        np.testing.assert_allclose(scan_metrics[name], python_metrics[name], rtol=1e-6)
    assert python_metrics["num_dropped_feedback"] == [4.0]


@pytest.mark.parametrize(
    "loop, boundaries", [("scan", "exact"), ("scan", "interval_end"), ("python", None)]
)
def test_chunks_renormalize_the_sampler_every_m_steps(loop, boundaries, monkeypatch):
    """M = 5, 12 steps, the sampler state counts down and renormalizing maps x to 2x + 100:
    right after steps 5 and 10 (the Python loop; the scan with "exact", the CPU's mode),
    or at the end of the interval that crossed the boundary (the scan with "interval_end",
    an accelerator's)."""
    if boundaries is not None:
        assert chunks_module.boundary_mode("cpu") == "exact"
        assert chunks_module.boundary_mode("gpu") == "interval_end"
        monkeypatch.setattr(chunks_module, "boundary_mode", lambda backend=None: boundaries)
    renormalization = Renormalization(lambda sampler_state: 2.0 * sampler_state + 100.0, 5)
    state = CounterState(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros(()))
    shape = (4, 3) if loop == "scan" else (12, 1)
    chunk = compile_chunks(
        counting_step,
        [shape],
        loop,
        (state, None, jax.random.key(0)),
        keep_sampler_state=True,
        renormalization=renormalization,
    )[shape]
    state, snapshots, _, _ = timed_call(chunk, state, None, jax.random.key(0))
    assert int(state.step) == 12
    # exact: -5 -> 90, 87 at step 8, 85 at step 10 -> 270, 268 at step 12
    # interval ends 4, 8, 12: -8 at step 8 -> 84, 80 at step 12 -> 260
    expected = {"exact": [-4.0, 87.0, 268.0], "interval_end": [-4.0, 84.0, 260.0]}
    if loop == "scan":
        np.testing.assert_allclose(snapshots.sampler_state, expected[boundaries])
    else:
        assert float(state.sampler_state) == 268.0
    with pytest.raises(ValueError, match="boundaries must be one of"):
        make_chunk(counting_step, 4, 3, renormalization=renormalization, boundaries="late")


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_a_renormalization_the_run_never_reaches_is_left_out(loop):
    """M = 13 > the plan's 12 steps: no boundary, so the chunks carry no renormalization."""
    calls = []

    def renormalize(sampler_state):
        calls.append(1)  # traced (scan) or called (python) only if the chunk has it
        return sampler_state + 100.0

    state = CounterState(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros(()))
    shape = (4, 3) if loop == "scan" else (12, 1)
    chunk = compile_chunks(
        counting_step,
        [shape],
        loop,
        (state, None, jax.random.key(0)),
        keep_sampler_state=True,
        renormalization=Renormalization(renormalize, 13),
    )[shape]
    state, _, _, _ = timed_call(chunk, state, None, jax.random.key(0))
    assert float(state.sampler_state) == -12.0 and not calls
