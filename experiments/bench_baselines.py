"""Benchmark: time of one training step of each method AdamBS is compared against.

    python -m experiments.bench_baselines [--out results/bench_baselines.json] [--runs 100]

One model, ``bench_step``'s MLP 64 -> 128 -> 128 -> 10 on digits-sized random data
(n = 1797, 64 features, 10 classes), batch K = 128, ``optax.adam(1e-3)``; every method is
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
hits all of them; ``experiments.bench_harness``), and the table reports the median over
``--runs`` steps and the ratio to ``uniform`` (DESIGN.md §5; docs/algorithm.md quotes the
numbers).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

import adambs_jax as ab
from experiments import bench_harness as harness
from experiments.bench_step import BATCH_SIZE, LEARNING_RATE, make_problem, model_loss_of

NUM_EXAMPLES = 1797  # bench_step's "mlp" problem
P_GN_CHUNK_SIZE = 256

VARIANTS = (
    "uniform",
    "adambs/logit_grad_norm",
    "adam_impt/uniform-phase",
    "adam_impt/importance-phase",
    "adam_impt/presample-scoring",
    "p_gn",
)


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
    model, data, params = make_problem("mlp")
    model_loss = model_loss_of(model)
    steps = {}
    for variant in variants:
        step, init = library_step(model_loss, NUM_EXAMPLES, variant)
        steps[variant] = (step, init(params))
    results, timed = harness.time_variants(
        steps,
        data,
        runs=runs,
        warmup=warmup,
        rounds=rounds,
        model="mlp",
        num_examples=NUM_EXAMPLES,
        batch_size=BATCH_SIZE,
    )
    for phase, expected in (("importance-phase", True), ("uniform-phase", False)):
        name = f"adam_impt/{phase}"
        if name in timed:
            on = bool(timed[name].state.sampler_state.importance_sampling_on)
            assert on == expected, f"{name}: importance_sampling_on is {on}"
    return results


def markdown_table(results) -> str:
    columns = [("variant", "---", "{variant}"), *harness.step_time_columns(results[0]["variant"])]
    return harness.markdown_table(columns, results)


def main(argv=None):
    parser = harness.bench_parser(__doc__, "results/bench_baselines.json")
    harness.add_step_timing_arguments(parser, min_runs=30)
    args = parser.parse_args(argv)
    harness.check_step_timing_arguments(parser, args, min_runs=30)
    results = run(args.runs, args.warmup, args.rounds)
    report = {
        "benchmark": "baselines_train_step",
        "machine": harness.machine_record(),
        "results": results,
    }
    harness.print_report(report, markdown_table(results), harness.write_report(args.out, report))


if __name__ == "__main__":
    main()
