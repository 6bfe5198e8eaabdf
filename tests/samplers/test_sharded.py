"""Tests of ab.samplers.sharded: exp3 and priority states split by examples over a mesh axis.

The fast tests run in this process on a one-device mesh (the same code, axis of size 1).
The 8-device checks run once in a subprocess (``--xla_force_host_platform_device_count=8``
must be set before jax is imported) that prints one JSON line; the tests read its fields.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.samplers import sharded

_CHILD = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from scipy import stats
    import adambs_jax as ab

    mesh = ab.data_parallel_mesh()
    out = {"num_devices": jax.device_count()}
    rng = np.random.default_rng(0)

    def state_bytes(state):
        per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
        total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        return per_device, total

    from adambs_jax.samplers import _sharded

    def as_sharded(name, s0, s1):
        # the replicated state s0, split like s1 (to compare one update from one state)
        put = lambda x, like: jax.device_put(x, like.sharding)
        if name == "exp3":
            lw, tree = _sharded._exp3_blocks(np.asarray(s0.log_weights), n, 8, s1.arity)
            return s1.replace(log_weights=put(lw, s1.log_weights), tree=put(tree, s1.tree),
                              grad_norm_bound=s0.grad_norm_bound)
        layout = ab.samplers._priority.sumtree.layout_for(n, s0.arity)
        leaves = np.asarray(ab.samplers._priority.sumtree.leaf_values(s0.tree, layout))
        tree = _sharded._priority_tree(leaves, n, 8, s1.arity)
        return s1.replace(tree=put(tree, s1.tree), mix=s0.mix, mix_ratios=s0.mix_ratios)

    def compare(name, base, steps, n):
        sh = ab.samplers.sharded(base, mesh)
        s0, s1 = base.init(), sh.init()
        one_step = 0.0
        scores = jnp.asarray(rng.uniform(0.1, 2.0, size=n).astype(np.float32))
        sample0, sample1 = jax.jit(base.sample), jax.jit(sh.sample)
        update0, update1 = jax.jit(base.update), jax.jit(sh.update)
        same = total = 0
        for t in range(steps):
            key = jax.random.key(t)
            i0, p0 = sample0(s0, key)
            i1, p1 = sample1(s1, key)
            same += int(jnp.sum(i0 == i1))
            total += i0.shape[0]
            feedback = scores[i0]
            if t % 7 == 3:  # bad feedback: NaN, inf, negative
                feedback = feedback.at[0].set(jnp.nan).at[1].set(jnp.inf).at[2].set(-1.0)
            same_start = update1(as_sharded(name, s0, s1), i0, feedback)
            s0, s1 = update0(s0, i0, feedback), update1(s1, i0, feedback)
            p0 = base.probabilities(s0)
            one_step = max(one_step, float(jnp.max(
                jnp.abs(p0 - sh.probabilities(same_start)) / p0)))
        p0, p1 = base.probabilities(s0), sh.probabilities(s1)
        skipped = update1(s1, i0, feedback, apply=False)
        res = {
            "same_draws": same / total,
            "prob_rel_diff": float(jnp.max(jnp.abs(p0 - p1) / p0)),
            "one_step_rel_diff": one_step,
            "prob_sum": float(jnp.sum(p1)),
            "learned": float(jnp.max(p1) * n),
            "dropped": [int(s0.num_dropped_feedback), int(s1.num_dropped_feedback)],
            "finite": bool(jnp.all(jnp.isfinite(p1))),
            "skip_unchanged": all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(skipped))
            ),
            "spec": list(s1.tree.sharding.spec),
            "tree_shards": len(s1.tree.addressable_shards),
        }
        # draws from the learned state: chi-square against p, weights 1 / (n p) unbiased
        keys = jax.random.split(jax.random.key(99), 300)
        idx, probs = jax.jit(lambda s: jax.lax.map(lambda k: sh.sample(s, k), keys))(s1)
        idx, probs = np.asarray(idx).ravel(), np.asarray(probs).ravel()
        p = np.asarray(p1, np.float64)
        res["probs_match"] = float(np.max(np.abs(probs - p[idx]) / p[idx]))
        counts = np.bincount(idx, minlength=n)
        expected = p / p.sum() * idx.size
        res["chi2_p"] = float(stats.chisquare(counts, expected).pvalue)
        f = np.asarray(scores, np.float64)
        estimate = np.mean(f[idx] / (n * probs))
        res["unbiased_rel_err"] = float(abs(estimate - f.mean()) / f.mean())
        res["bytes"] = [state_bytes(s1)[0], state_bytes(s0)[0]]
        return res

    n, K = 203, 32  # 203 = 8 * 26 - 5: the last shard is padded
    out["exp3"] = compare("exp3", ab.exp3_sampler(n, K, step_size=0.1), 60, n)
    out["exp3_stratified"] = compare(
        "exp3", ab.exp3_sampler(n, K, step_size=0.1, stratified=True, arity=4), 25, n)
    out["priority"] = compare("priority", ab.samplers.priority_sampler(n, K), 60, n)
    out["priority_fixed"] = compare(
        "priority", ab.samplers.priority_sampler(n, K, uniform_mix=0.3), 25, n)

    # memory: n = 10^4 on 8 devices
    big = 10_000
    for name, base in [("exp3", ab.exp3_sampler(big, K, num_steps=100)),
                       ("priority", ab.samplers.priority_sampler(big, K))]:
        per_device, _ = state_bytes(ab.samplers.sharded(base, mesh).init())
        replicated, _ = state_bytes(jax.device_put(base.init(), jax.devices()[0]))
        out[name + "_bytes"] = [per_device, replicated]
    print("RESULT " + json.dumps(out))
    """
)


# make_train_step(mesh=): the same run with the replicated and the sharded exp3 sampler
_STEP_CHILD = r"""
import os, json, re
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np, optax
import adambs_jax as ab
n, K, steps = 256, 16, 12
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 5)).astype(np.float32)
data = {"x": jnp.asarray(x), "y": jnp.asarray(np.argmax(x @ rng.normal(size=(5, 3)), 1))}
params = {"w": jnp.asarray(0.1 * rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
loss = ab.ModelLoss(lambda p, b: b["x"] @ p["w"] + p["b"],
    lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]))
optimizer = optax.adam(0.05)
mesh = ab.data_parallel_mesh()
base = ab.exp3_sampler(n, K, num_steps=steps)
out = {}
def run(sampler):
    step = ab.make_train_step(loss, optimizer, sampler, mesh=mesh)
    state = step.init(params)
    sampler_state = state.sampler_state
    # everything replicated but the sampler state, which init already split
    state = ab.replicate(state._replace(sampler_state=None), mesh)
    state = state._replace(sampler_state=sampler_state)
    d = ab.replicate(data, mesh)
    for t in range(steps):
        state, metrics = step(state, d, jax.random.fold_in(jax.random.key(0), t))
    return step, state, metrics, d
_, s0, m0, _ = run(base)
step1, s1, m1, d = run(ab.samplers.sharded(base, mesh))
out["param_diff"] = max(float(jnp.max(jnp.abs(a - b)))
                        for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)))
p0 = ab.samplers.probabilities(s0.sampler_state)
p1 = ab.samplers.probabilities(s1.sampler_state)
out["prob_rel_diff"] = float(jnp.max(jnp.abs(p0 - p1) / p0))
out["sampler_spec"] = list(s1.sampler_state.tree.sharding.spec)
out["params_replicated"] = all(l.sharding.is_fully_replicated for l in jax.tree.leaves(s1.params))
out["loss"] = [float(m0["loss"]), float(m1["loss"])]
hlo = step1.lower(s1, d, jax.random.key(1)).compile().as_text()
# collectives of n or more floats (a gathered state) would show as f32[N] with N >= n
out["big_collective"] = [
    line.strip()[:120] for line in hlo.splitlines()
    if re.search(r"(all-gather|all-reduce)\(", line)
    and any(int(size) >= n for size in re.findall(r"f32\[(\d+)", line))]
print("RESULT " + json.dumps(out))
"""


def _run_child(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def eight_devices():
    return _run_child(_CHILD)


@pytest.mark.slow  # a subprocess with 8 CPU devices
def test_train_step_with_sharded_sampler_matches_replicated():
    out = _run_child(_STEP_CHILD)
    # the draws agree (same uniforms), so the runs agree up to float rounding
    assert out["param_diff"] < 1e-5
    assert out["prob_rel_diff"] < 1e-4
    assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-5)
    # the sampler state stays split; nothing of size n crosses devices in the step
    assert out["sampler_spec"] == ["data"]
    assert out["params_replicated"]
    assert out["big_collective"] == []


# make_host_train_step(mesh=): batches gathered on the host, the sampler state split
_HOST_STEP_CHILD = r"""
import os, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np, optax
import adambs_jax as ab
n, K, steps = 256, 16, 20
x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
data = {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32)}
loss = lambda p, b: (b["x"] @ p - b["y"]) ** 2
mesh = ab.data_parallel_mesh()
out = {}
for name, sampler in [("replicated", ab.exp3_sampler(n, K, num_steps=50)),
                      ("sharded", ab.samplers.sharded(ab.exp3_sampler(n, K, num_steps=50), mesh))]:
    step = ab.make_host_train_step(loss, optax.adam(0.05), sampler, mesh=mesh)
    state, (draws, _) = step.init(jnp.zeros(3), jax.random.key(0))
    for t in range(steps):
        batch = {k: v[np.asarray(draws.indices)] for k, v in data.items()}
        state, metrics, draws = step(state, batch, draws, jax.random.key(t + 1))
    out[name] = [float(metrics["loss"]), np.asarray(state.params).tolist(),
                 list(getattr(state.sampler_state.tree.sharding, "spec", []))]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 4 CPU devices
def test_host_train_step_with_sharded_sampler_matches_replicated():
    out = _run_child(_HOST_STEP_CHILD)
    assert out["sharded"][0] == pytest.approx(out["replicated"][0], rel=1e-5)
    np.testing.assert_allclose(out["sharded"][1], out["replicated"][1], rtol=1e-5, atol=1e-6)
    assert out["sharded"][2] == ["data"]  # the state stays split across the steps


# checkpoints: a run on D devices saved, restored on another D through the public API
_CKPT_CHILD = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=__D__"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np, optax
import adambs_jax as ab
D, directory, saves, restores = __D__, "__DIR__", __SAVES__, __RESTORES__
n, K = 203, 16  # 203 = 8 * 26 - 5: padded on 8 devices (and on 4: 4 * 51 - 1)
rng = np.random.default_rng(0)
x = rng.normal(size=(n, 5)).astype(np.float32)
data = {"x": jnp.asarray(x), "y": jnp.asarray(np.argmax(x @ rng.normal(size=(5, 3)), 1))}
params = {"w": jnp.asarray(0.1 * rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
loss = ab.ModelLoss(lambda p, b: b["x"] @ p["w"] + p["b"],
    lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]))
mesh = ab.data_parallel_mesh()
d = ab.replicate(data, mesh)
key = lambda t: jax.random.fold_in(jax.random.key(0), t)
out = {"num_devices": jax.device_count()}
def setup(kind):
    base = (ab.exp3_sampler(n, K, step_size=0.1) if kind == "exp3"
            else ab.samplers.priority_sampler(n, K))
    sampler = ab.samplers.sharded(base, mesh)
    step = ab.make_train_step(loss, optax.adam(0.05), sampler, mesh=mesh)
    state = step.init(params)
    split = state.sampler_state
    state = ab.replicate(state._replace(sampler_state=None), mesh)._replace(sampler_state=split)
    return sampler, step, state
def run(step, state, start, stop):
    for t in range(start, stop):
        state, metrics = step(state, d, key(t))
    return state, float(metrics["loss"])
def summary(state, loss):
    return {"p": np.asarray(ab.samplers.probabilities(state.sampler_state)).tolist(),
            "w": np.asarray(state.params["w"]).ravel().tolist(), "loss": loss,
            "step": int(state.step), "sampler_step": int(state.sampler_state.step)}
for kind in ("exp3", "priority"):
    sampler, step, state = setup(kind)
    if saves:  # 5 steps, save, 3 more: the uninterrupted run
        state, _ = run(step, state, 0, 5)
        ab.save_checkpoint(f"{directory}/{kind}_{D}", state, sampler=sampler)
        saved = summary(state, None)
        out[kind + "_saved"] = dict(summary(*run(step, state, 5, 8)), p_saved=saved["p"])
    for source in restores:  # restore what D = source saved, then 3 more steps
        sampler, step, like = setup(kind)  # a fresh template (the steps donated `state`)
        r = ab.restore_checkpoint(f"{directory}/{kind}_{source}", like=like, sampler=sampler)
        res = summary(r, None)
        res["tree_shape"] = list(r.sampler_state.tree.shape)
        res["tree_shards"] = len(r.sampler_state.tree.addressable_shards)
        res["spec"] = list(r.sampler_state.tree.sharding.spec)
        r, last_loss = run(step, r, 5, 8)
        res["after"] = summary(r, last_loss)
        res["after_shards"] = len(r.sampler_state.tree.addressable_shards)
        out[f"{kind}_from_{source}"] = res
print("RESULT " + json.dumps(out))
"""


def _checkpoint_child(devices: int, directory, saves: bool, restores: tuple) -> dict:
    code = (
        _CKPT_CHILD.replace("__DIR__", str(directory))
        .replace("__D__", str(devices))
        .replace("__SAVES__", str(saves))
        .replace("__RESTORES__", repr(restores))
    )
    return _run_child(code)


@pytest.fixture(scope="module")
def checkpoints_across_devices(tmp_path_factory):
    """Saved on 8 devices; restored on 4 (and saved there); restored on 8 from 8 and 4."""
    directory = tmp_path_factory.mktemp("sharded_checkpoints")
    on8 = _checkpoint_child(8, directory, True, ())
    on4 = _checkpoint_child(4, directory, True, (8,))
    again8 = _checkpoint_child(8, directory, False, (8, 4))
    return {8: on8, 4: on4, "again8": again8}


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.slow  # three subprocesses with 8 and 4 CPU devices
@pytest.mark.parametrize("kind", ("exp3", "priority"))
def test_checkpoint_of_eight_devices_restores_on_four(checkpoints_across_devices, kind):
    on8, on4 = checkpoints_across_devices[8], checkpoints_across_devices[4]
    assert (on8["num_devices"], on4["num_devices"]) == (8, 4)
    saved, res = on8[kind + "_saved"], on4[kind + "_from_8"]
    # p as saved, within float32 rounding (exp3's trees are rebuilt from the log-weights;
    # measured 2.3e-7 relative, priority 0)
    assert _rel(res["p"], saved["p_saved"]) < 2e-6
    assert res["step"] == 5 and res["sampler_step"] == 5
    # split over the 4 devices: 4 rows of ceil(203 / 4) = 51 examples
    assert res["tree_shards"] == 4 and res["spec"] == ["data"] and res["tree_shape"][0] == 4
    # training goes on from there, split as before, as the run on 8 devices did
    after = res["after"]
    assert after["step"] == 8 and after["sampler_step"] == 8 and res["after_shards"] == 4
    assert np.isfinite(after["loss"])
    assert _rel(after["w"], saved["w"]) < 1e-5  # measured 1e-7
    assert _rel(after["p"], saved["p"]) < 1e-5  # measured 3e-7


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("exp3", "priority"))
def test_checkpoint_restored_on_the_same_devices_resumes_bitwise(checkpoints_across_devices, kind):
    saved = checkpoints_across_devices[8][kind + "_saved"]
    res = checkpoints_across_devices["again8"][kind + "_from_8"]
    assert res["p"] == saved["p_saved"]  # the arrays as saved, no rebuild
    assert res["tree_shards"] == 8 and res["tree_shape"][0] == 8
    assert res["after"]["w"] == saved["w"] and res["after"]["p"] == saved["p"]
    assert res["after"]["loss"] == saved["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("exp3", "priority"))
def test_checkpoint_of_four_devices_restores_on_eight(checkpoints_across_devices, kind):
    # 4 stored rows cannot be split over 8 devices as they are: read whole, re-split
    saved = checkpoints_across_devices[4][kind + "_saved"]
    res = checkpoints_across_devices["again8"][kind + "_from_4"]
    assert _rel(res["p"], saved["p_saved"]) < 2e-6
    assert res["tree_shards"] == 8 and res["tree_shape"][0] == 8
    assert res["after"]["step"] == 8 and res["after_shards"] == 8
    assert _rel(res["after"]["p"], saved["p"]) < 1e-5


KINDS = ("exp3", "exp3_stratified", "priority", "priority_fixed")


@pytest.mark.slow  # a subprocess with 8 CPU devices
@pytest.mark.parametrize("kind", KINDS)
def test_eight_devices_same_distribution(eight_devices, kind):
    res = eight_devices[kind]
    assert eight_devices["num_devices"] == 8
    assert res["tree_shards"] == 8 and res["spec"] == ["data"]
    # one update from the same state: float32 rounding (the total is summed in another
    # order; log-weights ~69 have an ulp of 8e-6)
    assert res["one_step_rel_diff"] < 3e-5
    # many updates: exp3's feedback loop amplifies those roundings (measured ~1e-3 after
    # 80 updates at eta0 = 0.1); the distributions still agree closely
    assert res["prob_rel_diff"] < 2e-2
    assert abs(res["prob_sum"] - 1) < 1e-5
    assert res["same_draws"] > 0.98  # the same uniforms give the same leaves
    assert res["learned"] > 1.2  # the distribution moved away from uniform
    assert res["finite"]
    assert res["dropped"][0] == res["dropped"][1] > 0  # bad feedback dropped alike
    assert res["skip_unchanged"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_eight_devices_draws_follow_p(eight_devices, kind):
    res = eight_devices[kind]
    assert res["probs_match"] < 1e-5  # returned probs are p[indices]
    assert res["chi2_p"] > 1e-3
    assert res["unbiased_rel_err"] < 0.03  # 9,600 draws


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("exp3", "priority"))
def test_eight_devices_state_bytes(eight_devices, kind):
    per_device, replicated = eight_devices[kind + "_bytes"]
    # 1/8 of the replicated state plus O(D) (each shard's tree is padded per level, and
    # carries one sink leaf)
    assert per_device <= replicated / 8 + 64 * 8 * 4
    assert per_device >= replicated / 8 * 0.9


# --- fast: a one-device mesh in this process --------------------------------------------


def _one_device_mesh():
    return ab.data_parallel_mesh(jax.devices()[:1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ab.exp3_sampler(57, 8, step_size=0.5),
        lambda: ab.samplers.priority_sampler(57, 8, uniform_mix=0.5),
    ],
    ids=["exp3", "priority"],
)
def test_one_device_matches_replicated(make):
    base = make()
    sh = sharded(base, _one_device_mesh())
    s0, s1 = base.init(), sh.init()
    scores = jnp.linspace(0.1, 3.0, 57)
    update = jax.jit(sh.update)
    for t in range(20):
        i0, p0 = base.sample(s0, jax.random.key(t))
        i1, p1 = jax.jit(sh.sample)(s1, jax.random.key(t))
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(p0, p1, rtol=1e-5)
        feedback = scores[i0].at[0].set(jnp.nan)
        s0, s1 = base.update(s0, i0, feedback), update(s1, i0, feedback)
    np.testing.assert_allclose(base.probabilities(s0), sh.probabilities(s1), rtol=1e-5)
    np.testing.assert_allclose(ab.samplers.probabilities(s1), sh.probabilities(s1), rtol=0, atol=0)
    assert int(s1.num_dropped_feedback) == int(s0.num_dropped_feedback) == 20
    assert bool(s1.healthy())


def test_exp3_renormalize_keeps_p():
    base = ab.exp3_sampler(40, 8, step_size=0.5)
    sh = sharded(base, _one_device_mesh())
    state = sh.init()
    sample, update = jax.jit(sh.sample), jax.jit(sh.update)
    for t in range(5):
        indices, _ = sample(state, jax.random.key(t))
        state = update(state, indices, jnp.arange(8.0))
    renormalized = jax.jit(sh.renormalize)(state)
    np.testing.assert_allclose(sh.probabilities(renormalized), sh.probabilities(state), rtol=1e-5)
    assert int(renormalized.num_rescales) == 1
    assert sh.renormalize_every == base.renormalize_every
    assert sh.metrics is base.metrics


def test_refuses_other_samplers_and_meshes():
    mesh = _one_device_mesh()
    with pytest.raises(TypeError, match="exp3_sampler or ab.priority_sampler"):
        sharded(ab.uniform_sampler(10, 2), mesh)
    with pytest.raises(TypeError, match="Mesh"):
        sharded(ab.exp3_sampler(10, 2, num_steps=5), "mesh")
    with pytest.raises(ValueError, match="not an axis"):
        sharded(ab.exp3_sampler(10, 2, num_steps=5), mesh, "model")
    with pytest.raises(ValueError, match="refresh_every"):
        sharded(ab.samplers.priority_sampler(10, 2, refresh_every=5), mesh)
    sh = sharded(ab.exp3_sampler(10, 2, num_steps=5), mesh)
    with pytest.raises(TypeError, match="ShardedExp3State"):
        sh.sample(ab.exp3_sampler(10, 2, num_steps=5).init(), jax.random.key(0))
    with pytest.raises(TypeError, match="integer"):
        sh.update(sh.init(), jnp.zeros(2), jnp.ones(2))
