"""Tests of adambs_jax.host_loop: the overlapped loader loop of a host train step.

The mesh test runs in a subprocess with 8 CPU devices (``--xla_force_host_platform_device_count``
must be set before jax is imported); the two-process test runs two subprocesses joined by
``jax.distributed.initialize`` on localhost.
"""

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.host._loop import process_rows

NUM_EXAMPLES, BATCH_SIZE = 48, 8


def _data(n=NUM_EXAMPLES):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] - x[:, 2] > 0).astype(np.int32)}


_loss = ab.ModelLoss(
    lambda params, batch: batch["x"] @ params,
    lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
)


def _params():
    return jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)


def _step(sampler=None, **options):
    sampler = sampler or ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=20, step_size=0.5)
    return ab.make_host_train_step(_loss, optax.adam(0.1), sampler, feedback="loss", **options)


class _ThreadRecordingSource(ab.host.ArraySource):
    """An ArraySource that records the thread of every read."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.threads = []

    def read(self, indices):
        self.threads.append(threading.current_thread())
        return super().read(indices)


def test_the_loop_equals_calling_the_step_by_hand():
    data, num_steps, key = _data(), 9, jax.random.key(2)
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    source = _ThreadRecordingSource(data)
    looped, pending, metrics = ab.run_host_loop(step, state, draws, source, num_steps, key=key)
    assert threading.main_thread() not in source.threads  # reads run in loader threads
    assert len(metrics) == num_steps and len(pending) == step.lookahead

    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    for t, call_key in enumerate(jax.random.split(key, num_steps)):
        current = draws.pop(0)
        batch = source.read(np.asarray(current.indices))
        state, by_hand, later = step(state, batch, current, call_key)
        draws.append(later)
        np.testing.assert_array_equal(metrics[t]["loss"], by_hand["loss"])
    np.testing.assert_array_equal(looped.params, state.params)
    np.testing.assert_array_equal(
        ab.samplers.probabilities(looped.sampler_state),
        ab.samplers.probabilities(state.sampler_state),
    )
    for left, right in zip(pending, draws):
        np.testing.assert_array_equal(left.indices, right.indices)


def test_a_uniform_sampler_trains_as_make_train_step_on_the_in_memory_data():
    data, num_steps, lookahead = _data(), 8, 2
    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    init_key, key = jax.random.key(0), jax.random.key(1)
    step = _step(sampler, lookahead=lookahead)
    state, draws = step.init(_params(), init_key)
    looped, _, _ = ab.run_host_loop(
        step, state, draws, ab.host.ArraySource(data), num_steps, key=key
    )

    reference = ab.make_train_step(_loss, optax.adam(0.1), sampler, feedback="loss")
    state = reference.init(_params())
    keys = list(jax.random.split(init_key, lookahead + 1)[1:]) + list(
        jax.random.split(key, num_steps)
    )
    for step_key in keys[:num_steps]:
        state, _ = reference(state, jax.tree.map(jnp.asarray, data), step_key)
    np.testing.assert_array_equal(looped.params, state.params)
    assert float(jnp.max(jnp.abs(looped.params - _params()))) > 0.05  # it trained


def test_continuing_from_the_pending_draws_equals_one_run():
    data = ab.host.ArraySource(_data())
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    whole, _, _ = ab.run_host_loop(step, state, draws, data, 8)  # the state's own key
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    state, draws, _ = ab.run_host_loop(step, state, draws, data, 3)
    state, _, _ = ab.run_host_loop(step, state, draws, data, 5)
    np.testing.assert_array_equal(whole.params, state.params)


def test_a_reader_error_is_raised_in_the_main_thread_with_the_sources_message():
    class FailingSource(ab.host.ArraySource):
        def read(self, indices):
            if self.reads == 3:
                raise OSError("record 17 of shard 2 is corrupt")
            self.reads += 1
            return super().read(indices)

    source = FailingSource(_data())
    source.reads = 0
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    with pytest.raises(OSError, match="record 17 of shard 2 is corrupt"):
        ab.run_host_loop(step, state, draws, source, 10)


class _FailingSource(ab.host.ArraySource):
    """An ArraySource whose read number ``at`` runs ``fail(indices)`` (0-based, in order
    with one loader thread)."""

    def __init__(self, arrays, at, fail):
        super().__init__(arrays)
        self.reads, self.at, self.fail = 0, at, fail

    def read(self, indices):
        self.reads += 1
        if self.reads - 1 == self.at:
            self.fail(indices)
        return super().read(indices)


def _corrupt(indices):
    raise OSError("record 17 of shard 2 is corrupt")


def test_a_reader_error_carries_the_state_reached_and_the_run_continues_from_it():
    source = _FailingSource(_data(), at=5, fail=_corrupt)
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    with pytest.raises(OSError, match="record 17 of shard 2 is corrupt") as info:
        ab.run_host_loop(step, state, draws, source, 10, num_threads=1)
    assert state.params.is_deleted()  # the caller's state went to step 0
    progress = info.value.host_loop
    assert isinstance(progress, ab.host.HostLoopProgress)
    assert progress.steps_done == 5 == len(progress.metrics) == int(progress.state.step)
    assert len(progress.draws) == step.lookahead  # those of steps 5 and 6, not lost
    assert any("stopped after 5 of 10 steps" in note for note in info.value.__notes__)
    # a checkpoint of progress.state, then the rest of the run: as if nothing happened
    data = ab.host.ArraySource(_data())
    resumed, _, _ = ab.run_host_loop(step, progress.state, progress.draws, data, 3)
    whole_step = _step()
    whole, _, _ = ab.run_host_loop(
        whole_step, *whole_step.init(_params(), jax.random.key(0)), data, 8
    )
    np.testing.assert_array_equal(resumed.params, whole.params)


def test_ctrl_c_and_a_callback_error_carry_the_state_reached():
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))

    def interrupt(t, metrics):
        if t == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        ab.run_host_loop(step, state, draws, ab.host.ArraySource(_data()), 10, on_metrics=interrupt)
    progress = info.value.host_loop
    assert progress.steps_done == 4 == int(progress.state.step) and len(progress.draws) == 2
    np.asarray(progress.state.params)  # alive: a checkpoint can be saved


def test_ctrl_c_right_after_a_step_is_dispatched_loses_no_state():
    """SIGINT arrives when the jitted call has donated the state and not yet returned the new
    one: the loop holds it until the new state is assigned."""
    built = _step()
    calls = []

    def step_fn(*args):
        out = built.step_fn(*args)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, handled in the middle of the call
        return out

    step = dataclasses.replace(built, step_fn=step_fn)
    state, draws = step.init(_params(), jax.random.key(0))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            ab.run_host_loop(step, state, draws, ab.host.ArraySource(_data()), 10)
    finally:
        signal.signal(signal.SIGINT, previous)
    progress = info.value.host_loop
    assert progress.steps_done == 3 == int(progress.state.step)
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_hung_reader_times_out_naming_the_step_and_keeps_the_state():
    release = threading.Event()
    source = _FailingSource(_data(), at=4, fail=lambda indices: release.wait(60))
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    start = time.monotonic()
    try:
        with pytest.raises(ab.host.LoaderTimeoutError) as info:
            ab.run_host_loop(step, state, draws, source, 10, num_threads=1, timeout=1.0)
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert isinstance(info.value, TimeoutError)
    message = str(info.value)
    assert "step 4" in message and "timeout=1 s" in message and "in source.read" in message
    indices = np.asarray(info.value.host_loop.draws[0].indices)
    assert str(indices[:8].tolist())[1:-1] in message  # the indices waited for
    assert info.value.host_loop.steps_done == 4 == int(info.value.host_loop.state.step)
    assert elapsed < 30  # not waiting for the hung read when closing either


def test_the_timeout_is_checked():
    step = _step()
    for timeout in (0, -1.0, "10", True):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
            ab.host.HostLoader(step, ab.host.ArraySource(_data()), timeout=timeout)
    with ab.host.HostLoader(step, ab.host.ArraySource(_data()), timeout=None) as loader:
        assert loader.timeout is None


def test_invalid_initial_draws_are_refused_by_the_loader_with_the_state_kept():
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    bad = ab.host.Draws(draws[0].indices, -draws[0].probs)  # device arrays, built by hand
    with pytest.raises(ValueError, match=r"draws.probs\[0\] = .*every probability") as info:
        ab.run_host_loop(step, state, [bad, draws[1]], ab.host.ArraySource(_data()), 4)
    progress = info.value.host_loop
    assert progress.steps_done == 0 and int(progress.state.step) == 0
    np.testing.assert_array_equal(progress.state.params, _params())


def test_a_closed_loader_says_so():
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    loader = ab.host.HostLoader(step, ab.host.ArraySource(_data()), draws)
    loader.close()
    with pytest.raises(RuntimeError, match="HostLoader.put: the loader is closed"):
        loader.put(draws[0])
    with pytest.raises(RuntimeError, match="HostLoader.next: the loader is closed"):
        loader.next()
    assert len(loader.pending_draws()) == 2  # still there to continue from
    loader.close()  # twice is fine


def test_a_source_of_the_wrong_size_is_refused_by_name():
    step = _step()
    with pytest.raises(ValueError, match=r"source: has num_examples = 40.*n = 48"):
        ab.host.HostLoader(step, ab.host.ArraySource(_data(40)))
    with pytest.raises(TypeError, match="source must be a data source"):
        ab.host.HostLoader(step, _data())
    with pytest.raises(TypeError, match="step must be a HostTrainStep"):
        ab.host.HostLoader(
            ab.make_train_step(_loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)),
            ab.host.ArraySource(_data()),
        )


def test_the_loader_waits_only_in_next_and_counts_it():
    step = _step()
    state, draws = step.init(_params(), jax.random.key(0))
    with ab.host.HostLoader(step, ab.host.ArraySource(_data()), draws) as loader:
        with pytest.raises(ValueError, match="no batch is scheduled"):
            for _ in range(3):
                batch, current = loader.next()
                assert batch["x"].shape == (BATCH_SIZE, 3) and isinstance(batch["x"], jax.Array)
        assert loader.batches == 2 and loader.wait_seconds >= 0.0


def test_process_rows_without_a_mesh_is_the_whole_batch():
    assert process_rows(None, BATCH_SIZE) == slice(0, BATCH_SIZE)
    mesh = ab.data_parallel_mesh()
    assert process_rows(ab.sharding.batch_sharding(mesh), BATCH_SIZE) == slice(0, BATCH_SIZE)


_MESH_CHILD = textwrap.dedent(
    r"""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    import adambs_jax as ab
    from jax.sharding import PartitionSpec

    n, K, steps = 64, 16, 6
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    source = ab.host.ArraySource({"x": x, "y": (x[:, 0] > 0).astype(np.int32)})
    loss = ab.ModelLoss(lambda p, b: b["x"] @ p,
        lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]))
    sampler = ab.exp3_sampler(n, K, num_steps=steps, step_size=0.5)
    params = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    out = {"num_devices": jax.device_count()}

    def run(mesh):
        step = ab.make_host_train_step(loss, optax.adam(0.1), sampler, feedback="loss",
                                       mesh=mesh)
        state, draws = step.init(params, jax.random.key(0))
        with ab.host.HostLoader(step, source, draws[:1]) as loader:
            batch, _ = loader.next()
        state, _, metrics = ab.run_host_loop(step, state, draws, source, steps,
                                             key=jax.random.key(1))
        return step, state, batch, metrics

    _, single, _, _ = run(None)
    step, sharded, batch, metrics = run(ab.data_parallel_mesh())
    out["param_diff"] = float(jnp.max(jnp.abs(single.params - sharded.params)))
    out["prob_diff"] = float(jnp.max(jnp.abs(ab.samplers.probabilities(single.sampler_state)
                                             - ab.samplers.probabilities(sharded.sampler_state))))
    out["batch_split"] = all(leaf.sharding.spec == PartitionSpec("data")
                             for leaf in jax.tree.leaves(batch))
    out["batch_devices"] = len(batch["x"].sharding.device_set)
    out["shard_rows"] = sorted(s.data.shape[0] for s in batch["x"].addressable_shards)
    out["state_replicated"] = all(leaf.sharding.is_fully_replicated
                                  for leaf in jax.tree.leaves(sharded))
    out["metrics_replicated"] = all(v.sharding.is_fully_replicated for v in metrics[-1].values())
    print("RESULT " + json.dumps(out))
    """
)


def _run_child(tmp_path, script, *args, env_extra=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "child.py"
    path.write_text(script)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        **(env_extra or {}),
    )
    return subprocess.Popen(
        [sys.executable, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    line = next(s for s in stdout.splitlines() if s.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow  # a subprocess with 8 CPU devices
def test_eight_devices_shard_the_batch_and_match_one_device(tmp_path):
    out = _result(
        _run_child(
            tmp_path,
            _MESH_CHILD,
            env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        )
    )
    assert out["num_devices"] == 8
    assert out["batch_split"], out
    assert out["batch_devices"] == 8 and out["shard_rows"] == [2] * 8, out
    assert out["param_diff"] <= 1e-5 and out["prob_diff"] <= 1e-6, out
    assert out["state_replicated"] and out["metrics_replicated"], out


_TWO_PROCESS_CHILD = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[1]), initialization_timeout=60)
    import jax.numpy as jnp, numpy as np, optax
    import adambs_jax as ab
    sys.path.insert(0, sys.argv[3])
    from tests.host.test_loop import _recording_run

    state, seen = _recording_run(ab.data_parallel_mesh())
    # ab.sharding.replicate with 2 processes (jax.device_put alone refuses this sharding)
    mesh = ab.data_parallel_mesh()
    tree = {"x": np.arange(6.0, dtype=np.float32).reshape(3, 2), "key": jax.random.key(3)}
    replicated = ab.sharding.replicate(tree, mesh)
    again = ab.replicate(replicated, mesh)
    total = jax.jit(lambda t: jnp.sum(t["x"]) + jax.random.uniform(t["key"]))(replicated)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "devices": jax.device_count(),
        "params": np.asarray(state.params.addressable_data(0)).tolist(), "seen": seen,
        "replicated": all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set)
                          == jax.device_count() for leaf in jax.tree.leaves(replicated)),
        "x": np.asarray(replicated["x"].addressable_data(0)).tolist(),
        "key": np.asarray(jax.random.key_data(replicated["key"]).addressable_data(0)).tolist(),
        "unchanged_if_replicated": again["x"] is replicated["x"],
        "total": float(total.addressable_data(0))}))
    """
)


def _recording_run(mesh, steps=5):
    """Trains with exp3 from a source that records the indices each read got."""
    n, batch_size = 64, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    seen = []

    class RecordingSource(ab.host.ArraySource):
        def read(self, indices):
            seen.append(np.asarray(indices).tolist())
            return super().read(indices)

    source = RecordingSource({"x": x, "y": (x[:, 0] > 0).astype(np.int32)})
    sampler = ab.exp3_sampler(n, batch_size, num_steps=steps, step_size=0.5)
    step = ab.make_host_train_step(_loss, optax.adam(0.1), sampler, feedback="loss", mesh=mesh)
    state, draws = step.init(jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), jax.random.key(0))
    state, _, _ = ab.run_host_loop(
        step, state, draws, source, steps, key=jax.random.key(1), num_threads=1
    )  # one thread: reads in order
    return state, seen[:steps]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow  # two subprocesses
def test_two_processes_each_read_their_half_and_train_as_one(tmp_path):
    port, tests_dir = _free_port(), os.path.dirname(__file__)
    children = [
        _run_child(tmp_path / str(i), _TWO_PROCESS_CHILD, str(i), port, tests_dir) for i in range(2)
    ]
    outs = sorted(
        (_result(child, timeout=240) for child in children), key=lambda out: out["process"]
    )
    reference, reference_seen = _recording_run(None)
    half = len(reference_seen[0]) // 2
    for process, out in enumerate(outs):
        assert out["devices"] == 4, out
        np.testing.assert_allclose(out["params"], reference.params, rtol=1e-5, atol=1e-6)
        # the dataset is not replicated: each process read only its half of every batch
        expected = [indices[process * half : (process + 1) * half] for indices in reference_seen]
        assert out["seen"] == expected, (process, out["seen"], reference_seen)
        # ab.sharding.replicate: every leaf a global array on all 4 devices, same values
        assert out["replicated"] and out["unchanged_if_replicated"], out
        assert out["x"] == np.arange(6.0).reshape(3, 2).tolist(), out
        key = jax.random.key(3)
        assert out["key"] == np.asarray(jax.random.key_data(key)).tolist(), out
        assert out["total"] == pytest.approx(15.0 + float(jax.random.uniform(key)), rel=1e-6)


def test_api_doc_host_data_example_runs():
    """The example of docs/api.md, "Data on the host", runs and its asserts hold."""
    api_doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"
    blocks = [
        block
        for block in re.findall(r"```python\n(.*?)```", api_doc.read_text(), re.S)
        if block.startswith("# host data example")
    ]
    assert len(blocks) == 1, "docs/api.md lost its host data example"
    exec(compile(blocks[0], f"{api_doc.name}[host data]", "exec"), {"__name__": "doc"})
