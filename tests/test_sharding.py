"""Tests of adambs_jax.sharding and make_train_step(mesh=...): data parallelism.

The 8-device test runs in a subprocess: ``--xla_force_host_platform_device_count=8`` must be
set before jax is imported, and this process has already imported it with one CPU device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import adambs_jax as ab

_CHILD = textwrap.dedent(
    r"""
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    import adambs_jax as ab
    from jax.sharding import NamedSharding, PartitionSpec

    out = {"num_devices": jax.device_count()}
    n, K, steps = 256, 16, 20
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(np.argmax(x @ rng.normal(size=(5, 3)), 1))}
    params = {"w": jnp.asarray(0.1 * rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    loss = ab.ModelLoss(
        lambda p, b: b["x"] @ p["w"] + p["b"],
        lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]))
    optimizer = optax.adam(0.05)
    sampler = ab.exp3_sampler(n, K, num_steps=steps)
    key = jax.random.key(0)

    def run(step, state, data):
        for t in range(steps):
            state, metrics = step(state, data, jax.random.fold_in(key, t))
        return state, metrics

    # one device, no mesh
    single, _ = run(ab.make_train_step(loss, optimizer, sampler),
                    ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler),
                    data)

    # 8 devices: batch split along "data", everything else replicated
    mesh = ab.data_parallel_mesh()
    step = ab.make_train_step(loss, optimizer, sampler, mesh=mesh)
    state = ab.replicate(
        ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler), mesh)
    replicated_data = ab.replicate(data, mesh)
    compiled = step.lower(state, replicated_data, key).compile()
    hlo = compiled.as_text()
    sharded, metrics = run(compiled, state, replicated_data)

    out["param_diff"] = max(float(jnp.max(jnp.abs(a - b)))
                            for a, b in zip(jax.tree.leaves(single.params),
                                            jax.tree.leaves(sharded.params)))
    out["prob_diff"] = float(jnp.max(jnp.abs(ab.samplers.probabilities(single.sampler_state)
                                             - ab.samplers.probabilities(sharded.sampler_state))))
    p_sharded = ab.samplers.probabilities(sharded.sampler_state)
    out["probs_learned"] = float(jnp.max(p_sharded)) > 1.0 / n
    out["state_replicated"] = all(leaf.sharding.is_fully_replicated
                                  for leaf in jax.tree.leaves(sharded))
    out["state_devices"] = sorted({len(leaf.sharding.device_set)
                                   for leaf in jax.tree.leaves(sharded)})
    out["metrics_replicated"] = all(v.sharding.is_fully_replicated for v in metrics.values())
    out["collectives"] = sorted(set(re.findall(r"\b(all-reduce|all-gather|reduce-scatter)\(",
                                               hlo)))
    tree_size = sharded.sampler_state.tree.shape[0]
    scatters = re.findall(r"= f32\[(\d+)\]\{0\} scatter\(", hlo)
    out["tree_scatter_full"] = str(tree_size) in scatters
    out["tree_scatter_sharded"] = str(tree_size // 8) in scatters
    # per-example work is split: the per-device batch of features is (K/8, 5)
    out["sharded_batch"] = bool(re.search(r"f32\[%d,5\]" % (K // 8), hlo))

    # a batch that does not split evenly is refused at build time
    try:
        ab.make_train_step(loss, optimizer, ab.exp3_sampler(n, 12, num_steps=5), mesh=mesh)
        out["indivisible_error"] = None
    except ValueError as error:
        out["indivisible_error"] = str(error)

    # a replicated state round-trips through a checkpoint, and keeps its sharding
    path = sys.argv[1]
    ab.save_checkpoint(path, sharded)
    like = ab.replicate(
        ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler), mesh)
    restored = ab.restore_checkpoint(path, like)
    out["restored_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(restored)))
    out["restored_devices"] = sorted({len(leaf.sharding.device_set)
                                      for leaf in jax.tree.leaves(restored)})

    # a model state (linen BatchNorm) and an auxiliary output under the mesh: the batch
    # statistics are the whole batch's, as on one device
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            # no bias before BatchNorm: its gradient is 0 up to rounding, which Adam would
            # amplify into lr-sized steps that differ between any two reduction orders
            hidden = nn.Dense(8, use_bias=False)(x)
            return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=False)(hidden)))

    variables = Net().init(jax.random.key(1), x[:2])

    def loss_fn(params, batch, key, batch_stats):  # (losses, aux, new model state)
        logits, updates = Net().apply({"params": params, "batch_stats": batch_stats},
                                      batch["x"], mutable=["batch_stats"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return losses, {"logits": logits}, updates["batch_stats"]

    def run_bn(step_mesh):
        step = ab.make_train_step(ab.Loss(loss_fn, model_state=True, has_aux=True),
                                  optimizer, sampler, feedback="loss", mesh=step_mesh)
        state = step.init(variables["params"], model_state=variables["batch_stats"])
        step_data = data
        if step_mesh is not None:
            state, step_data = ab.replicate(state, mesh), ab.replicate(data, mesh)
        return run(step, state, step_data)

    (bn_single, aux_single), (bn_sharded, aux_sharded) = run_bn(None), run_bn(mesh)
    out["bn_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves((bn_single.params, bn_single.model_state)),
        jax.tree.leaves((bn_sharded.params, bn_sharded.model_state))))
    out["aux_diff"] = float(jnp.max(jnp.abs(aux_single["aux"]["logits"]
                                            - aux_sharded["aux"]["logits"])))
    out["aux_shape"] = list(aux_sharded["aux"]["logits"].shape)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow  # a subprocess with 8 CPU devices
def test_eight_devices_match_one_device(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    # the child imports the package from wherever this process does (a checkout that is
    # not pip-installed, e.g. PYTHONPATH on an accelerator machine): pass our sys.path on
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(s for s in result.stdout.splitlines() if s.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["num_devices"] == 8
    assert out["param_diff"] <= 1e-5, out
    assert out["prob_diff"] <= 1e-5, out
    assert out["probs_learned"]
    assert out["state_replicated"], out  # everything replicated ...
    assert out["state_devices"] == [8], out  # ... on all 8 devices
    assert out["metrics_replicated"], out
    assert "all-reduce" in out["collectives"], out  # XLA's gradient reduction
    assert out["sharded_batch"], out
    assert out["tree_scatter_full"] and not out["tree_scatter_sharded"], out
    assert "multiple of the size of mesh axis 'data'" in out["indivisible_error"]
    assert out["restored_equal"] and out["restored_devices"] == [8], out
    assert out["bn_diff"] <= 1e-5 and out["aux_diff"] <= 1e-4, out  # has_aux + model_state
    assert out["aux_shape"] == [16, 3], out


def _problem(n=64, batch_size=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray((x[:, 0] > 0).astype(np.int32))}
    loss = ab.ModelLoss(
        lambda p, b: b["x"] @ p,
        lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]),
    )
    return data, loss, ab.exp3_sampler(n, batch_size, num_steps=10), jnp.zeros((3, 2))


def test_one_device_mesh_is_the_plain_step():
    data, loss, sampler, params = _problem()
    mesh = ab.data_parallel_mesh(jax.devices()[:1])
    results = []
    for step_mesh in (None, mesh):
        step = ab.make_train_step(loss, optax.adam(0.1), sampler, feedback="loss", mesh=step_mesh)
        state = ab.TrainState.create(params=params, optimizer=optax.adam(0.1), sampler=sampler)
        if step_mesh is not None:
            state, step_data = ab.replicate(state, mesh), ab.replicate(data, mesh)
        else:
            step_data = data
        for t in range(5):
            state, _ = step(state, step_data, jax.random.key(t))
        results.append(state)
    np.testing.assert_allclose(results[0].params, results[1].params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        ab.samplers.probabilities(results[0].sampler_state),
        ab.samplers.probabilities(results[1].sampler_state),
        rtol=1e-6,
    )


def test_pure_step_with_mesh_inside_a_user_jit():
    data, loss, sampler, params = _problem()
    mesh = ab.data_parallel_mesh(axis_name="batch")
    pure = ab.make_train_step(
        loss, optax.sgd(0.1), sampler, feedback="loss", mesh=mesh, data_axis="batch", jit=False
    )
    state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
    state, metrics = jax.jit(pure)(state, data, jax.random.key(0))
    assert int(state.step) == 1 and np.isfinite(metrics["loss"])


def test_helpers_and_their_errors():
    mesh = ab.data_parallel_mesh()
    assert mesh.axis_names == ("data",)
    assert ab.sharding.replicated_sharding(mesh).spec == PartitionSpec()
    assert ab.sharding.batch_sharding(mesh).spec == PartitionSpec("data")
    tree = ab.replicate({"a": jnp.ones(3)}, mesh)
    assert isinstance(tree["a"].sharding, NamedSharding)
    # replicate_on_mesh: None leaves the tree as it is; a mesh replicates (values kept)
    host = {"a": np.arange(3.0), "key": jax.random.key(4)}
    assert ab.sharding.replicate_on_mesh(host, None) is host
    placed = ab.sharding.replicate_on_mesh(host, mesh)
    assert placed["a"].sharding.is_fully_replicated and placed["key"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(placed["a"]), host["a"])
    assert bool(jnp.all(jax.random.key_data(placed["key"]) == jax.random.key_data(host["key"])))
    with pytest.raises(TypeError, match="mesh"):
        ab.replicate(host, None)  # no mesh: refused (replicate_on_mesh is the None-tolerant one)
    assert ab.sharding.check_mesh(mesh, "data", batch_size=8) == len(jax.devices())
    with pytest.raises(ValueError, match="devices"):
        ab.data_parallel_mesh([])
    with pytest.raises(TypeError, match="axis_name"):
        ab.data_parallel_mesh(axis_name="")
    with pytest.raises(TypeError, match="mesh"):
        ab.sharding.check_mesh(object(), "data")
    with pytest.raises(ValueError, match="data_axis='model'"):
        ab.sharding.batch_sharding(mesh, "model")
    with pytest.raises(ValueError, match="leaf"):
        jax.jit(lambda b: ab.sharding.constrain_batch(b, mesh))({"a": jnp.ones(())})
