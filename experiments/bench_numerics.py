"""Benchmark (not a test): long-run float32 numerics of the EXP3 sampler.

    python -m experiments.bench_numerics                      # 10^6 updates at n = 10^6
    python -m experiments.bench_numerics --num-updates 20000  # a quick run

Runs ``--num-updates`` sample + update steps of ``exp3_sampler(n, K)`` (default n = 10^6,
K = 128, eta0 of Lemma 1 with T = num_updates) on random feedback, jitted in ``lax.scan``
chunks of ``--chunk`` updates with the state donated; ``sampler.renormalize`` runs after
every chunk and every ``sampler.renormalize_every`` updates within one. The feedback of a
draw of example j is b_j u with b_j ~ LogNormal(0, ``--feedback-sigma``) fixed per example
(heavy-tailed, so many examples are pushed down to the floor p_min) and u ~ Uniform(0.5,
1.5) fresh per draw; ``--nan-rate`` replaces that fraction of the feedback with NaN (dropped
by the sampler).

After every chunk, on the host (O(n), only once per chunk): p = leaf / root as the library
computes it (float32), then

* ``sum_p_error``      = |sum_j p_j - 1|, the sum taken in float64;
* ``tree_drift``       = |root / sum_j leaf_j - 1| with the leaf sum in float64 (how far the
  float32 prefix-sum tree's root is from the exact total of its leaves);
* ``min_p_over_p_min`` = min_j p_j / p_min (must stay >= 1 - 1e-5);
* ``any_nan``          = any NaN or infinity in p or the log-weights;
* ``num_rescales``, ``num_dropped_feedback`` (the sampler's counters; ``num_rescales``
  counts the renormalizations, one per chunk at least).

Writes a JSON file (``--out``, default ``results/bench_numerics.json``) and a PNG plot of
|sum p - 1| and min p / p_min against the number of updates (``--plot``).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import adambs_jax as ab
from adambs_jax.samplers import _sumtree as sumtree
from experiments import bench_harness as harness

SUM_TOLERANCE = 1e-5  # |sum p - 1| must stay below
MIN_P_TOLERANCE = 1 - 1e-5  # min p / p_min must stay above


def make_chunk(sampler, base_feedback, chunk, nan_rate):
    """A jitted function running ``chunk`` sample + update steps in one ``lax.scan``."""
    batch_size = sampler.batch_size

    def one_update(state, key):
        draw_key, noise_key, nan_key = jax.random.split(key, 3)
        indices, _ = sampler.sample(state, draw_key)
        noise = jax.random.uniform(noise_key, (batch_size,), minval=0.5, maxval=1.5)
        feedback = base_feedback[indices] * noise
        if nan_rate > 0:
            feedback = jnp.where(
                jax.random.uniform(nan_key, (batch_size,)) < nan_rate, jnp.nan, feedback
            )
        return sampler.update(state, indices, feedback), None

    # renormalize at least every sampler.renormalize_every updates (static positions), and
    # at the end of every chunk (O(n) once per chunk: negligible)
    every = min(chunk, sampler.renormalize_every or chunk)

    def run(state, key):
        keys = jax.random.split(key, chunk)
        for start in range(0, chunk, every):
            state, _ = jax.lax.scan(one_update, state, keys[start : start + every])
            state = sampler.renormalize(state)
        return state

    return jax.jit(run, donate_argnums=0)


def measure(state, p_min):
    """The O(n) host-side figures of one state (see the module docstring)."""
    p32 = np.asarray(ab.samplers.probabilities(state))  # float32, p = leaf / root
    layout = sumtree.layout_for(state.num_examples, state.arity)
    leaves = np.asarray(sumtree.leaf_values(state.tree, layout), dtype=np.float64)
    root = float(np.asarray(sumtree.total(state.tree)))
    log_weights = np.asarray(state.log_weights)
    return {
        "sum_p_error": abs(float(np.sum(p32, dtype=np.float64)) - 1.0),
        "tree_drift": abs(root / float(np.sum(leaves)) - 1.0),
        "min_p_over_p_min": float(np.min(p32)) / p_min,
        "max_p": float(np.max(p32)),
        "num_at_floor": int(np.sum(p32 <= p_min * (1 + 1e-4))),
        "any_nan": bool(not (np.all(np.isfinite(p32)) and np.all(np.isfinite(log_weights)))),
        "root": root,
        "num_rescales": int(state.num_rescales),
        "num_dropped_feedback": int(state.num_dropped_feedback),
    }


def plot(records, p_min_tolerance, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["updates"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.semilogy(updates, [max(r["sum_p_error"], 1e-12) for r in records], label="|sum p - 1|")
    top.semilogy(
        updates,
        [max(r["tree_drift"], 1e-12) for r in records],
        label="|root / sum leaves - 1|",
        alpha=0.7,
    )
    top.axhline(1e-5, color="red", linestyle="--", label="tolerance 1e-5")
    top.set_ylabel("error (floored at 1e-12)")
    top.legend()
    bottom.plot(updates, [r["min_p_over_p_min"] for r in records], label="min p / p_min")
    bottom.axhline(p_min_tolerance, color="red", linestyle="--", label="1 - 1e-5")
    bottom.set_ylabel("min p / p_min")
    bottom.set_xlabel("sampler updates")
    bottom.legend()
    fig.suptitle("exp3_sampler float32 numerics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser():
    parser = harness.bench_parser(__doc__, "results/bench_numerics.json")
    parser.add_argument("--num-examples", type=int, default=10**6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-updates", type=int, default=10**6)
    parser.add_argument("--chunk", type=int, default=10**4, help="updates per jitted call")
    parser.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="eta0; default sqrt(2 log n / (n T)) with T = num-updates",
    )
    parser.add_argument("--feedback-sigma", type=float, default=1.5)
    parser.add_argument("--nan-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="PNG path; default: --out with .png")
    return parser


def run_updates(run_chunk, state, run_key, num_chunks: int, chunk: int, p_min: float):
    """``(records, seconds, compile_seconds)``: the chunks run one after the other, each timed
    (``block_until_ready``) and followed by the untimed :func:`measure` of its state."""
    records = [dict(updates=0, seconds=0.0, **measure(state, p_min))]
    compile_start = time.perf_counter()
    run_chunk.lower(state, run_key).compile()
    compile_seconds = time.perf_counter() - compile_start
    elapsed = 0.0
    with tqdm(total=num_chunks * chunk, unit="upd", unit_scale=True) as progress:
        for c in range(num_chunks):
            start = time.perf_counter()
            state = run_chunk(state, jax.random.fold_in(run_key, c))
            jax.block_until_ready(state)
            elapsed += time.perf_counter() - start
            record = dict(updates=(c + 1) * chunk, seconds=elapsed, **measure(state, p_min))
            records.append(record)
            progress.update(chunk)
            progress.set_postfix(
                sum_err=f"{record['sum_p_error']:.1e}",
                min_ratio=f"{record['min_p_over_p_min']:.6f}",
                rescales=record["num_rescales"],
            )
    return records, elapsed, compile_seconds


def summarize(records, total: int, seconds: float, compile_seconds: float) -> dict:
    """The worst and final figures of a run, and whether it stayed within the tolerances."""
    summary = {
        "updates": total,
        "max_sum_p_error": max(r["sum_p_error"] for r in records),
        "final_sum_p_error": records[-1]["sum_p_error"],
        "max_tree_drift": max(r["tree_drift"] for r in records),
        "min_min_p_over_p_min": min(r["min_p_over_p_min"] for r in records),
        "final_num_at_floor": records[-1]["num_at_floor"],
        "final_max_p": records[-1]["max_p"],
        "any_nan": any(r["any_nan"] for r in records),
        "num_rescales": records[-1]["num_rescales"],
        "num_dropped_feedback": records[-1]["num_dropped_feedback"],
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "us_per_update": 1e6 * seconds / total,
    }
    summary["passed"] = bool(
        summary["max_sum_p_error"] <= SUM_TOLERANCE
        and summary["min_min_p_over_p_min"] >= MIN_P_TOLERANCE
        and not summary["any_nan"]
    )
    return summary


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_updates < 1 or args.chunk < 1:
        parser.error("--num-updates and --chunk must be >= 1")
    chunk = min(args.chunk, args.num_updates)
    num_chunks = math.ceil(args.num_updates / chunk)
    total = num_chunks * chunk

    n, batch_size = args.num_examples, args.batch_size
    step_size = args.step_size or ab.samplers.default_step_size(n, total)
    sampler = ab.exp3_sampler(n, batch_size, step_size=step_size)
    state = sampler.init()
    p_min = state.p_min
    base_key, run_key = jax.random.split(jax.random.key(args.seed))
    base_feedback = jnp.exp(args.feedback_sigma * jax.random.normal(base_key, (n,), jnp.float32))
    run_chunk = make_chunk(sampler, base_feedback, chunk, args.nan_rate)
    records, seconds, compile_seconds = run_updates(
        run_chunk, state, run_key, num_chunks, chunk, p_min
    )
    result = {
        "benchmark": "bench_numerics",
        "config": {
            "num_examples": n,
            "batch_size": batch_size,
            "num_updates": total,
            "chunk": chunk,
            "step_size": step_size,
            "p_min": p_min,
            "feedback_sigma": args.feedback_sigma,
            "nan_rate": args.nan_rate,
            "seed": args.seed,
        },
        "environment": harness.machine_record(),
        "summary": summarize(records, total, seconds, compile_seconds),
        "records": records,
    }
    harness.write_report(args.out, result)
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    plot(records, MIN_P_TOLERANCE, plot_path)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {plot_path}")
    return result


if __name__ == "__main__":
    main()
