"""Benchmark: one sampler step (sample K + update K) of the tree-based EXP3 sampler vs a
dense O(n) baseline, for n = 10^3 .. 10^7 and K = 128.

    python -m experiments.bench_sampler --out results/bench_sampler.json [--arity B]

Both steps are jitted, warmed up (compilation excluded), donate their state, and are timed
with ``block_until_ready``; the median of many runs is reported. The dense baseline is what
one writes without a tree: ``jax.random.choice(p=p)`` (a cumulative sum over n, then a
search) and a multiplicative update of the full p vector followed by the same exact
projection applied to all n entries (O(n) elementwise work).

Besides that synced latency (``median_us``), the tree step is timed as a user sees it:
``pipelined_us`` (``--scan-steps`` steps dispatched back to back, blocked once) and
``scan_us`` (that many steps in one jitted ``lax.scan``: device time without dispatch).
``--arities 2 4 8 16`` times the scan for each tree arity B (``sumtree.default_arity`` is
chosen from such a run).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

import adambs_jax as ab
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers import project_onto_floored_simplex
from experiments import bench_harness as harness
from experiments import step_timing

TABLE_COLUMNS = [
    ("n", "---", "{num_examples:.0e}"),
    ("B", "---:", "{arity}"),
    ("depth", "---:", "{depth}"),
    ("tree (us, median)", "---", "{tree[median_us]:.1f}"),
    ("tree pipelined (us)", "---:", "{tree[pipelined_us]:.1f}"),
    ("tree scan (us)", "---:", "{tree[scan_us]:.1f}"),
    ("dense (us, median)", "---", "{dense[median_us]:.1f}"),
    ("dense / tree", "---", "{speedup:.1f}x"),
]


def tree_sampler_step(num_examples, batch_size, arity=None):
    """The sampler and its pure step (sample K, update with random feedback)."""
    sampler = ab.exp3_sampler(num_examples, batch_size, num_steps=10_000, arity=arity)

    def step(state, key):
        k_draw, k_feedback = jax.random.split(key)
        indices, _ = sampler.sample(state, k_draw)
        feedback = jax.random.uniform(k_feedback, (batch_size,))
        return sampler.update(state, indices, feedback)

    return sampler, step


def tree_step_fn(num_examples, batch_size, arity=None):
    sampler, step = tree_sampler_step(num_examples, batch_size, arity)
    return sampler.init(), jax.jit(step, donate_argnums=0)


def tree_throughput(num_examples, batch_size, arity, steps, rounds):
    """Median ``pipelined_us`` and ``scan_us`` per sampler step (``steps`` per burst)."""
    sampler, step = tree_sampler_step(num_examples, batch_size, arity)
    single = jax.jit(lambda state, data, key: (step(state, key), None), donate_argnums=0)
    multi = jax.jit(
        lambda state, data, key: jax.lax.scan(
            lambda s, k: (step(s, k), None), state, jax.random.split(key, steps)
        ),
        donate_argnums=0,
    )
    variants = {"tree": (single, sampler.init(), multi, sampler.init())}
    times = step_timing.time_throughput(variants, None, rounds=rounds, steps=steps)["tree"]
    return {f"{mode}_us": 1e6 * statistics.median(t) for mode, t in times.items()}


def dense_step_fn(num_examples, batch_size):
    p_min = 0.1 / num_examples
    step_size = ab.samplers.default_step_size(num_examples, 10_000)

    def step(p, key):
        k_draw, k_feedback = jax.random.split(key)
        indices = jax.random.choice(k_draw, num_examples, (batch_size,), p=p)
        feedback = jax.random.uniform(k_feedback, (batch_size,))
        bound = jnp.maximum(jnp.max(feedback), 1e-12)
        p_drawn = p[indices]
        shortfall = jnp.clip(1 - jnp.square(p_min * feedback / (bound * p_drawn)), 0, 1)
        alpha_h = jnp.zeros_like(p).at[indices].add(step_size * shortfall / (batch_size * p_drawn))
        w = p * jnp.exp(-alpha_h)  # O(n)
        order = jnp.argsort(indices)
        sorted_idx = indices[order]
        is_first = jnp.concatenate([jnp.array([True]), sorted_idx[1:] != sorted_idx[:-1]])
        rest = 1 - jnp.sum(jnp.where(is_first, p[sorted_idx], 0))
        log_z = project_onto_floored_simplex(
            jnp.log(w[sorted_idx]), is_first, rest, p_min
        ).log_normalizer
        return jnp.maximum(p_min, w / jnp.exp(log_z))  # O(n)

    return jnp.full((num_examples,), 1.0 / num_examples, jnp.float32), jax.jit(
        step, donate_argnums=0
    )


def time_step(make, num_examples, batch_size, repeats):
    state, step = make(num_examples, batch_size)
    keys = jax.random.split(jax.random.PRNGKey(0), repeats + 3)
    start = time.perf_counter()
    state = jax.block_until_ready(step(state, keys[0]))
    compile_s = time.perf_counter() - start
    for key in keys[1:3]:  # warm-up
        state = jax.block_until_ready(step(state, key))
    times = []
    for key in keys[3:]:
        start = time.perf_counter()
        state = jax.block_until_ready(step(state, key))
        times.append(time.perf_counter() - start)
    return {
        "median_us": statistics.median(times) * 1e6,
        "p10_us": sorted(times)[len(times) // 10] * 1e6,
        "p90_us": sorted(times)[(9 * len(times)) // 10] * 1e6,
        "repeats": repeats,
        "compile_s": compile_s,
    }


def size_row(n, args):
    """One row of the report: the tree (synced, pipelined, scan), the dense baseline, and the
    scan time of each of ``args.arities``."""
    arity = args.arity or ab.samplers.default_arity()
    tree = time_step(functools.partial(tree_step_fn, arity=arity), n, args.batch_size, args.repeats)
    tree.update(tree_throughput(n, args.batch_size, arity, args.scan_steps, args.throughput_rounds))
    dense = time_step(
        dense_step_fn, n, args.batch_size, max(20, args.repeats // (10 if n >= 10**6 else 1))
    )
    scan_by_arity = {
        str(b): tree_throughput(n, args.batch_size, b, args.scan_steps, args.throughput_rounds)[
            "scan_us"
        ]
        for b in args.arities
    }
    return {
        "num_examples": n,
        "arity": arity,
        "depth": sumtree.layout_for(n, arity).depth,
        "tree": tree,
        "dense": dense,
        "speedup": dense["median_us"] / tree["median_us"],
        "scan_us_by_arity": scan_by_arity,
    }


def main(argv=None):
    parser = harness.bench_parser(__doc__, "results/bench_sampler.json")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6, 10**7])
    parser.add_argument(
        "--repeats",
        type=int,
        default=500,
        help="runs per measurement (fewer at n >= 1e6 for the dense baseline)",
    )
    parser.add_argument(
        "--arity", type=int, default=None, help="tree arity B (default: sumtree.default_arity())"
    )
    parser.add_argument(
        "--arities", type=int, nargs="*", default=[], help="also time the scan for each of these B"
    )
    parser.add_argument("--scan-steps", type=int, default=100)
    parser.add_argument("--throughput-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [size_row(n, args) for n in tqdm(args.sizes, desc="sizes")]
    result = {
        "benchmark": "sampler sample+update",
        "batch_size": args.batch_size,
        "backend": jax.default_backend(),
        "machine": harness.machine_record(),
        "rows": rows,
    }
    out = harness.write_report(args.out, result)
    machine = result["machine"]
    print(
        f"\nsample + update, K = {args.batch_size}, {machine['cpu_model']} "
        f"({machine['jax_backend']}), jax {jax.__version__}"
    )
    print(harness.markdown_table(TABLE_COLUMNS, rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
