"""Benchmark: ab.samplers.sharded (state split by examples over a mesh axis) vs the replicated
sampler, on D simulated host devices: state bytes per device, step time, compile time, and a
chi-square check of the sharded draws.

    python -m experiments.bench_sharded --out results/bench_sharded.json \
        [--devices 8] [--sizes 10000000] [--batch-size 128] [--steps 50] [--repeats 5]

The device count is forced with ``--xla_force_host_platform_device_count=D`` in XLA_FLAGS,
which must be set before jax is imported: this module imports jax only inside ``main`` (run
it as a fresh process). For each sampler (exp3, priority) and each n:

* **bytes per device**: the sum over the state's array leaves of
  ``addressable_shards[0].data.nbytes``, for the replicated state (``NamedSharding(mesh,
  P())``: every device holds a full copy) and the sharded one, and their ratio.
* **step time**: ``--steps`` steps of sample K + update K (random feedback) inside one
  jitted ``lax.scan`` that donates the state; ``--repeats`` timed calls after one warm-up,
  replicated and sharded interleaved in one process; median, min and max per step (µs).
  The replicated state lives on every device, so its step runs on all D devices alike.
* **compile time**: lowering and compiling that scan (seconds), for each variant.
* **chi-square** (n = ``--chi-n``): the sharded sampler (priority: a fixed uniform mix,
  ``--chi-uniform-mix``) after ``--chi-updates`` updates with skewed feedback;
  ``--chi-batches`` batches of K draws binned into ``--chi-bins`` contiguous bins of
  example indices, against the expected counts from p summed per bin (exit status 1 if
  p < 1e-3). Every call is synced before the next (see ``main``).

Simulated devices share the host's cores: the timings show the overhead of the sharded code
path on one CPU, not the speed of real devices (no parallelism, collectives are memcpys).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SAMPLERS = ("exp3", "priority")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_sharded.json")
    parser.add_argument("--devices", type=int, default=8, help="simulated host devices D")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**7], help="n to time")
    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="*",
        default=[],
        help="n for which only the sharded state is built and measured (replicated bytes from "
        "the shapes, never allocated)",
    )
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per jitted scan")
    parser.add_argument("--repeats", type=int, default=5, help="timed scans per variant")
    parser.add_argument("--chi-n", type=int, default=10**7)
    parser.add_argument("--chi-updates", type=int, default=20)
    parser.add_argument("--chi-batches", type=int, default=200)
    parser.add_argument("--chi-bins", type=int, default=64)
    parser.add_argument(
        "--chi-uniform-mix",
        type=float,
        default=0.1,
        help="the priority sampler's fixed uniform mix in the chi-square check (the default "
        "'auto' starts at 1, uniform, and stays there for a few updates: nothing to test)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.steps < 1 or args.repeats < 1 or args.chi_bins < 2:
        parser.error("--devices, --steps, --repeats must be >= 1 and --chi-bins >= 2")
    return args


def force_host_devices(count: int) -> None:
    """Sets XLA_FLAGS for ``count`` host devices (and the CPU platform); jax must not be
    imported yet, or the flag would be ignored."""
    if "jax" in sys.modules:
        raise RuntimeError("bench_sharded: jax is already imported; run it as a fresh process")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_samplers(kind: str, n: int, batch_size: int, mesh, uniform_mix: float | str = "auto"):
    """``(replicated sampler, sharded sampler)`` of ``kind`` (priority: with ``uniform_mix``)."""
    import adambs_jax as ab

    if kind == "exp3":
        base = ab.exp3_sampler(n, batch_size, num_steps=10_000)
    else:
        base = ab.priority_sampler(n, batch_size, uniform_mix=uniform_mix)
    return base, ab.samplers.sharded(base, mesh, mesh.axis_names[0])


def state_bytes(state) -> dict:
    """Bytes of the state's arrays on the first device (``addressable_shards[0]``) and over
    every device."""
    import jax

    leaves = jax.tree.leaves(state)
    return {
        "per_device": int(sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)),
        "all_devices": int(
            sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
        ),
    }


def replicated_init(base, mesh):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.device_put(base.init(), NamedSharding(mesh, PartitionSpec()))


def scan_fn(sampler, steps: int, batch_size: int, state):
    """The jitted ``steps`` steps (sample K, uniform feedback in [0.1, 2), update) in one
    ``lax.scan``, donating the state and keeping its placement."""
    import jax

    def step(state, key):
        draw_key, feedback_key = jax.random.split(key)
        indices, _ = sampler.sample(state, draw_key)
        feedback = jax.random.uniform(feedback_key, (batch_size,), minval=0.1, maxval=2.0)
        return sampler.update(state, indices, feedback), None

    def run(state, key):
        state, _ = jax.lax.scan(step, state, jax.random.split(key, steps))
        return state

    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    return jax.jit(run, donate_argnums=0, out_shardings=shardings)


def compile_scan(sampler, state, args, key):
    """``(compiled scan, lower_s, compile_s)``."""
    jitted = scan_fn(sampler, args.steps, args.batch_size, state)
    start = time.perf_counter()
    lowered = jitted.lower(state, key)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lower_s, time.perf_counter() - start


def prepare_variant(kind: str, n: int, name: str, sampler, init, args) -> dict:
    """One variant's initial state, its bytes, and its compiled scan, each timed."""
    import jax

    start = time.perf_counter()
    state = jax.block_until_ready(init())
    init_s = time.perf_counter() - start
    memory = state_bytes(state)
    compiled, lower_s, compile_s = compile_scan(sampler, state, args, jax.random.key(args.seed))
    log(
        f"{kind} n={n:.0e} {name}: {memory['per_device'] / 1e6:.2f} MB/device, init "
        f"{init_s:.2f} s, lower {lower_s:.2f} s, compile {compile_s:.2f} s"
    )
    return {
        "compiled": compiled,
        "state": state,
        "times": [],
        "bytes": memory,
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }


def time_interleaved(kind: str, n: int, variants: dict, args) -> None:
    """Runs each variant's scan ``args.repeats`` times after a warm-up, the variants in turn
    within each repeat (so a change of load hits both), appending seconds per step."""
    import jax

    for repeat in range(args.repeats + 1):  # the first call of each variant is a warm-up
        key = jax.random.key(args.seed + 1 + repeat)
        for name, variant in variants.items():
            start = time.perf_counter()
            variant["state"] = jax.block_until_ready(variant["compiled"](variant["state"], key))
            elapsed = time.perf_counter() - start
            if repeat:
                variant["times"].append(elapsed / args.steps)
            log(
                f"{kind} n={n:.0e} {name} {'warm-up' if not repeat else f'repeat {repeat}'}: "
                f"{1e6 * elapsed / args.steps:.1f} us/step"
            )


def variant_summary(variant: dict) -> dict:
    """The JSON row of one timed variant (its state checked healthy at the end)."""
    import jax

    times_us = [1e6 * t for t in variant["times"]]
    state = variant["state"]
    return {
        "bytes_per_device": variant["bytes"]["per_device"],
        "bytes_all_devices": variant["bytes"]["all_devices"],
        "init_s": variant["init_s"],
        "lower_s": variant["lower_s"],
        "compile_s": variant["compile_s"],
        "step_us_median": statistics.median(times_us),
        "step_us_min": min(times_us),
        "step_us_max": max(times_us),
        "step_us_all": times_us,
        "steps_done": int(jax.device_get(state.step)),
        "healthy": bool(jax.jit(lambda state: state.healthy())(state)),
    }


def time_size(kind: str, n: int, mesh, args) -> dict:
    """One row: bytes per device, compile and step times of the replicated and the sharded
    ``kind`` sampler at n, their scans interleaved."""
    base, sharded = make_samplers(kind, n, args.batch_size, mesh)
    variants = {
        "replicated": prepare_variant(
            kind, n, "replicated", base, lambda: replicated_init(base, mesh), args
        ),
        "sharded": prepare_variant(kind, n, "sharded", sharded, sharded.init, args),
    }
    time_interleaved(kind, n, variants, args)
    row: dict = {"sampler": kind, "num_examples": n}
    for name, variant in variants.items():
        row[name] = variant_summary(variant)
        del variant["state"], variant["compiled"]
    rep, sh = row["replicated"], row["sharded"]
    row["bytes_ratio"] = sh["bytes_per_device"] / rep["bytes_per_device"]
    row["step_ratio"] = sh["step_us_median"] / rep["step_us_median"]
    log(
        f"{kind} n={n:.0e}: bytes/device sharded/replicated {row['bytes_ratio']:.4f}, "
        f"step sharded/replicated {row['step_ratio']:.2f}"
    )
    return row


def memory_only(kind: str, n: int, mesh, args) -> dict:
    """The sharded state's bytes per device measured, the replicated state's from its shapes
    (``jax.eval_shape``: never allocated; a replicated copy is whole on every device)."""
    import jax

    base, sharded = make_samplers(kind, n, args.batch_size, mesh)
    shapes = jax.eval_shape(base.init)
    replicated = int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes)))
    state = jax.block_until_ready(sharded.init())
    measured = state_bytes(state)
    del state
    row = {
        "sampler": kind,
        "num_examples": n,
        "replicated_bytes_per_device_from_shapes": replicated,
        "sharded_bytes_per_device": measured["per_device"],
        "sharded_bytes_all_devices": measured["all_devices"],
        "bytes_ratio": measured["per_device"] / replicated,
    }
    log(
        f"{kind} n={n:.0e} memory only: sharded {measured['per_device'] / 1e6:.2f} MB/device, "
        f"replicated (shapes) {replicated / 1e6:.2f} MB/device, ratio {row['bytes_ratio']:.4f}"
    )
    return row


def skewed_feedback(indices, n: int):
    """Feedback growing with the example index (1e-2 .. 1e5): the updated priorities dominate
    the tree and p is uneven across the shards."""
    import jax.numpy as jnp

    return 1e-2 + 1e5 * jnp.power(indices.astype(jnp.float32) / n, 3)


def chi_square(kind: str, mesh, args) -> dict:
    """The sharded ``kind`` sampler's draws, binned by index, against its probabilities."""
    import jax
    import numpy as np
    from scipy import stats

    n, bins = args.chi_n, args.chi_bins
    _, sampler = make_samplers(kind, n, args.batch_size, mesh, args.chi_uniform_mix)
    state = sampler.init()
    sample, update = jax.jit(sampler.sample), jax.jit(sampler.update)
    keys = jax.random.split(jax.random.key(args.seed + 10_000), args.chi_updates + 1)
    for key in keys[:-1]:  # synced: see ``main`` on programs in flight
        indices, _ = jax.block_until_ready(sample(state, key))
        state = jax.block_until_ready(update(state, indices, skewed_feedback(indices, n)))

    @jax.jit
    def draws(state, keys):
        return jax.lax.map(lambda key: sampler.sample(state, key), keys)

    start = time.perf_counter()
    indices, probs = draws(state, jax.random.split(keys[-1], args.chi_batches))
    indices, probs = np.asarray(indices).reshape(-1), np.asarray(probs).reshape(-1)
    draw_s = time.perf_counter() - start
    p = np.asarray(jax.jit(sampler.probabilities)(state), np.float64)  # one program
    edges = (np.arange(bins + 1, dtype=np.int64) * n) // bins  # contiguous bins of indices
    bin_of = np.searchsorted(edges, indices.astype(np.int64), side="right") - 1
    observed = np.bincount(bin_of, minlength=bins).astype(np.float64)
    mass = np.add.reduceat(p, edges[:-1]) / p.sum()
    expected = mass * indices.size
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    p_value = float(stats.chi2.sf(statistic, bins - 1))
    row = {
        "sampler": kind,
        "num_examples": n,
        "updates": args.chi_updates,
        "uniform_mix": args.chi_uniform_mix if kind == "priority" else None,
        "draws": int(indices.size),
        "bins": bins,
        "dof": bins - 1,
        "statistic": statistic,
        "p_value": p_value,
        "min_expected": float(expected.min()),
        "max_bin_mass_over_uniform": float(mass.max() * bins),
        "min_bin_mass_over_uniform": float(mass.min() * bins),
        "sum_p_minus_1": float(p.sum() - 1.0),
        "returned_probs_max_rel_diff": float(np.max(np.abs(probs - p[indices]) / p[indices])),
        "draw_s": draw_s,
        "passed": p_value > 1e-3,
    }
    log(
        f"chi-square {kind} n={n:.0e}: {statistic:.1f} on {bins - 1} dof, p = {p_value:.3f} "
        f"({indices.size} draws, bin mass / uniform {row['min_bin_mass_over_uniform']:.2f}.."
        f"{row['max_bin_mass_over_uniform']:.2f})"
    )
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    force_host_devices(args.devices)
    import jax

    import adambs_jax as ab
    from experiments import bench_harness as harness

    if jax.device_count() != args.devices:
        raise RuntimeError(f"asked for {args.devices} devices, jax has {jax.device_count()}")
    # Every call is waited for before the next is dispatched: with several programs with
    # collectives in flight at once, the simulated devices of a host with few cores can all
    # wait in one program's all-reduce while another holds the threads (a run aborted so here).
    mesh = ab.data_parallel_mesh()
    log(f"{jax.device_count()} {jax.default_backend()} devices, jax {jax.__version__}")
    rows = [time_size(kind, n, mesh, args) for n in args.sizes for kind in args.samplers]
    memory_rows = [
        memory_only(kind, n, mesh, args) for n in args.memory_sizes for kind in args.samplers
    ]
    chi_rows = [chi_square(kind, mesh, args) for kind in args.samplers]
    report = {
        "benchmark": "sharded vs replicated sampler: bytes per device, scan step, compile, chi2",
        "devices": args.devices,
        "simulated_devices": "--xla_force_host_platform_device_count" in os.environ["XLA_FLAGS"],
        "backend": jax.default_backend(),
        "batch_size": args.batch_size,
        "scan_steps": args.steps,
        "repeats": args.repeats,
        "machine": harness.machine_record(),
        "rows": rows,
        "memory_rows": memory_rows,
        "chi_square": chi_rows,
    }
    out = harness.write_report(args.out, report)
    log(f"wrote {out}")
    return 0 if all(row["passed"] for row in chi_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
