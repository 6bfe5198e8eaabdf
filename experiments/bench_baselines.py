"""Benchmark: time of one training step of each method AdamBS is compared against.

    python -m experiments.bench_baselines [--out results/bench_baselines.json] [--runs 100]

One model, defined here (Flax linen, so the benchmark depends on nothing else in
``experiments``): the MLP 64 -> 128 -> 128 -> 10 on digits-sized random data (n = 1797,
64 features, 10 classes), batch K = 128, ``optax.adam(1e-3)``; every method is
``ab.make_train_step`` with a different sampler (diagnostics off, so no variant pays for the
O(n) metrics):

* ``uniform``: ``uniform_sampler``, ``"loss"`` feedback (plain Adam; the baseline);
* ``adambs/logit_grad_norm``: ``exp3_sampler`` (AdamBS);
* ``adam_impt/uniform-phase``: ``adam_impt_sampler`` before its switch (threshold never
  reached), step feedback ``"logit_grad_norm"`` (which feeds the switch, as in K&F's code);
* ``adam_impt/importance-phase``: the same after the switch (threshold forced low): a
  presample of B = 3K = 384 scored with the logit bound every step;
* ``adam_impt/presample-scoring``: ``uniform_phase_scores="presample"`` (the presample is
  scored every step, also while uniform), measured while uniform;
* ``p_gn``: ``gradient_norm_sampler`` (exact gradient norms of all n examples every step,
  chunks of 256), step feedback ``"loss"``.

Every step is jitted with the state donated, warmed up (compilation excluded) and timed
with ``block_until_ready``; the variants are interleaved in rounds (a change of machine load
hits all of them), and the table reports the median over ``--runs`` steps and the ratio to
``uniform`` (DESIGN.md §5; docs/algorithm.md quotes the numbers).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adambs_jax as ab
from experiments.machine import machine_info, versions
from experiments.step_timing import time_interleaved, time_summary

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
NUM_EXAMPLES = 1797
NUM_FEATURES = 64
NUM_CLASSES = 10
P_GN_CHUNK_SIZE = 256

VARIANTS = (
    "uniform",
    "adambs/logit_grad_norm",
    "adam_impt/uniform-phase",
    "adam_impt/importance-phase",
    "adam_impt/presample-scoring",
    "p_gn",
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(NUM_CLASSES)(x)


def make_problem(seed: int = 0):
    """(model_loss, data, params): random digits-sized data, on device."""
    rng = np.random.default_rng(seed)
    data = {
        "x": jnp.asarray(rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, size=(NUM_EXAMPLES,)), jnp.int32),
    }
    model = MLP()
    params = jax.jit(model.init)(jax.random.key(seed), data["x"][:1])
    model_loss = ab.ModelLoss(
        apply_fn=lambda p, batch: model.apply(p, batch["x"]),
        loss_from_outputs=lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        ),
    )
    return model_loss, data, params


def sampler_and_feedback(variant: str, num_examples: int):
    """The sampler and the step's feedback kind of a variant name."""
    if variant == "uniform":
        return ab.uniform_sampler(num_examples, BATCH_SIZE), "loss"
    if variant == "adambs/logit_grad_norm":
        return ab.exp3_sampler(num_examples, BATCH_SIZE, num_steps=10_000), "logit_grad_norm"
    if variant == "adam_impt/uniform-phase":
        return ab.adam_impt_sampler(num_examples, BATCH_SIZE, tau_threshold=1e9), "logit_grad_norm"
    if variant == "adam_impt/importance-phase":
        # tau >= 1 always, so a tiny threshold keeps importance sampling on
        return ab.adam_impt_sampler(num_examples, BATCH_SIZE, tau_threshold=1e-3), "logit_grad_norm"
    if variant == "adam_impt/presample-scoring":
        sampler = ab.adam_impt_sampler(
            num_examples, BATCH_SIZE, tau_threshold=1e9, uniform_phase_scores="presample"
        )
        return sampler, "logit_grad_norm"
    if variant == "p_gn":
        sampler = ab.gradient_norm_sampler(num_examples, BATCH_SIZE, chunk_size=P_GN_CHUNK_SIZE)
        return sampler, "loss"
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def library_step(model_loss, num_examples: int, variant: str):
    optimizer = optax.adam(LEARNING_RATE)
    sampler, feedback = sampler_and_feedback(variant, num_examples)
    step = ab.make_train_step(model_loss, optimizer, sampler, feedback=feedback, diagnostics=False)

    def init(params):
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        if variant == "adam_impt/importance-phase":  # on from the first step
            state = state._replace(
                sampler_state=state.sampler_state.replace(
                    variance_reduction_ema=jnp.asarray(1.0, jnp.float32)
                )
            )
        return state

    return step, init


def run(runs: int, warmup: int, rounds: int, variants=VARIANTS):
    model_loss, data, params = make_problem()
    steps = {}
    for variant in variants:
        step, init = library_step(model_loss, NUM_EXAMPLES, variant)
        steps[variant] = (step, init(params))
    timed = time_interleaved(steps, data, runs=runs, warmup=warmup, rounds=rounds)
    for phase, expected in (("importance-phase", True), ("uniform-phase", False)):
        name = f"adam_impt/{phase}"
        if name in timed:
            on = bool(timed[name].state.sampler_state.importance_sampling_on)
            assert on == expected, f"{name}: importance_sampling_on is {on}"
    results = []
    for variant in variants:
        summary = time_summary(timed[variant].times, timed[variants[0]].times)
        results.append(
            {
                "model": "mlp",
                "num_examples": NUM_EXAMPLES,
                "batch_size": BATCH_SIZE,
                "variant": variant,
                "median_ms": summary["median_ms"],
                "p10_ms": summary["p10_ms"],
                "p90_ms": summary["p90_ms"],
                "runs": summary["runs"],
                f"ratio_vs_{variants[0]}": summary["ratio"],
            }
        )
        print(f"{variant:30s} {summary['median_ms']:9.3f} ms  x{summary['ratio']:.2f}", flush=True)
    return results


def markdown_table(results) -> str:
    baseline = results[0]["variant"]
    lines = [
        f"| variant | median ms/step | p10–p90 ms | ratio vs {baseline} |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}–{r['p90_ms']:.3f} | "
            f"{r[f'ratio_vs_{baseline}']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_baselines.json")
    parser.add_argument("--runs", type=int, default=100, help="timed steps per variant (>= 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="interleaving rounds")
    args = parser.parse_args(argv)
    if args.runs < 30 or args.warmup < 1 or args.rounds < 1:
        parser.error("--runs must be >= 30, --warmup and --rounds >= 1")
    results = run(args.runs, args.warmup, args.rounds)
    report = {"benchmark": "baselines_train_step", "machine": {**machine_info(), **versions()}, "results": results}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print()
    print(markdown_table(results))
    print(f"\nmachine: {report['machine']}\nwrote {out}")


if __name__ == "__main__":
    main()
