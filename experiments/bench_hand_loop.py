"""Benchmark: a loop you keep, per step, with and without bandit sampling.

    python -m experiments.bench_hand_loop [--out results/bench_hand_loop.json] [--steps 50]
        [--rounds 7]

The loop of docs/porting.md's optax port on the ``mlp`` of ``experiments.bench_step``
(64 -> 128 -> 128 -> 10, n = 1797 digits-sized random examples, K = 128,
``chain(clip_by_global_norm(1.0), adamw)``), as a user runs it: ``--steps`` iterations
dispatched back to back and blocked on once (a training loop's throughput), the variants
interleaved in ``--rounds`` rounds so that a change of the machine's load hits all alike;
the median time per step and its ratio to the plain loop.

* ``optax``: the plain loop, its own ``jax.jit`` step on a batch gathered by a jitted draw of
  uniform indices (``jax.random.randint``, on the device);
* ``sampling/<sampler>/<feedback>``: the port: ``batch = sampling.draw()`` (learns the last
  batch's feedback and draws, one jitted dispatch, plus the batch's feedback slot) and the
  step with ``ab.value_and_grad`` (the feedback leaves in the batch);
* ``explicit/<sampler>/<feedback>``: the explicit form, its step taking ``batch.data`` and
  ``batch.weights`` and returning ``extras.feedback`` for ``sampling.learn`` (no
  ``jax.Ref`` among the step's arguments: JAX's fast dispatch path);
* ``make_train_step/<sampler>/<feedback>``: the library's own step (draw, gather, gradient,
  update, sampler update in one dispatch), for reference.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020
(the samplers); DESIGN.md §5 (how speed is judged).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import adambs_jax as ab
from experiments import bench_harness as harness
from experiments.bench_step import BATCH_SIZE, make_problem, model_loss_of

VARIANTS = (
    "optax",
    "sampling/uniform/loss",
    "sampling/priority/loss",
    "sampling/priority/grad_norm",
    "sampling/exp3/loss",
    "explicit/priority/loss",
    "make_train_step/priority/loss",
)


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


def _sampler(name: str, n: int, steps: int):
    return {
        "uniform": lambda: ab.uniform_sampler(n, BATCH_SIZE),
        "priority": lambda: ab.priority_sampler(n, BATCH_SIZE),
        "exp3": lambda: ab.exp3_sampler(n, BATCH_SIZE, num_steps=steps),
    }[name]()


def _feedback(name: str):
    return ab.feedback.GradNorm() if name == "grad_norm" else "loss"


def plain_loop(loss_fn, params, data, n):
    """The plain loop: ``run(steps)`` dispatches that many steps and returns the last loss."""
    tx = _optimizer()
    state = {"params": params, "opt": tx.init(params), "key": jax.random.key(0)}

    @jax.jit
    def draw(key):
        key, sub = jax.random.split(key)
        idx = jax.random.randint(sub, (BATCH_SIZE,), 0, n)
        return key, jax.tree.map(lambda leaf: leaf[idx], data)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(steps):
        for _ in range(steps):
            state["key"], batch = draw(state["key"])
            state["params"], state["opt"], loss = step(state["params"], state["opt"], batch)
        return loss

    return run


def sampling_loop(loss_fn, params, data, n, sampler, feedback):
    """The port: ``ab.Sampling`` and ``ab.value_and_grad`` in the plain loop's step."""
    tx = _optimizer()
    state = {"params": params, "opt": tx.init(params)}
    sampling = ab.Sampling(sampler, data, seed=0)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = ab.value_and_grad(loss_fn, feedback=feedback)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(steps):
        for _ in range(steps):
            batch = sampling.draw()
            state["params"], state["opt"], loss = step(state["params"], state["opt"], batch)
        return loss

    return run


def explicit_loop(loss_fn, params, data, sampler, feedback):
    """The explicit form: weights in and feedback out as arguments and returns."""
    tx = _optimizer()
    state = {"params": params, "opt": tx.init(params)}
    sampling = ab.Sampling(sampler, data, seed=0)

    @jax.jit
    def step(params, opt_state, batch, weights):
        grad_fn = ab.value_and_grad(loss_fn, feedback=feedback)
        (loss, extras), grads = grad_fn(params, batch, weights=weights)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, extras.feedback

    def run(steps):
        for _ in range(steps):
            batch = sampling.draw()
            params, opt_state = state["params"], state["opt"]
            *new, loss, scores = step(params, opt_state, batch.data, batch.weights)
            state["params"], state["opt"] = new
            sampling.learn(scores)
        return loss

    return run


def library_loop(model_loss, params, data, sampler, feedback):
    """``ab.make_train_step``: the whole step in one dispatch."""
    train_step = ab.make_train_step(model_loss, _optimizer(), sampler, feedback=feedback)
    state = {"train": train_step.init(params), "key": jax.random.key(0)}

    def run(steps):
        for key in jax.random.split(state["key"], steps):
            state["train"], metrics = train_step(state["train"], data, key)
        return metrics["loss"]

    return run


def build_loops(variants, steps: int) -> dict[str, Callable[[int], jax.Array]]:
    """variant -> ``run(steps)``, each on the same problem and initial parameters."""
    model, data, params = make_problem("mlp")

    def loss_fn(params, batch):  # per-example cross-entropy (K,)
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    n = jax.tree.leaves(data)[0].shape[0]
    loops = {}
    for variant in variants:
        if variant == "optax":
            loops[variant] = plain_loop(loss_fn, params, data, n)
            continue
        kind, sampler_name, feedback_name = variant.split("/")
        sampler, feedback = _sampler(sampler_name, n, steps), _feedback(feedback_name)
        if kind == "sampling":
            loops[variant] = sampling_loop(loss_fn, params, data, n, sampler, feedback)
        elif kind == "explicit":
            loops[variant] = explicit_loop(loss_fn, params, data, sampler, feedback)
        else:
            loops[variant] = library_loop(model_loss_of(model), params, data, sampler, feedback)
    return loops


def time_loops(loops: dict, steps: int, rounds: int) -> list[dict]:
    """Median seconds per step over ``rounds`` interleaved rounds of ``steps`` pipelined
    steps each (the first round of every loop warms it up and is not counted)."""
    per_step: dict[str, list[float]] = {variant: [] for variant in loops}
    for round_index in range(rounds + 1):
        for variant, run in loops.items():
            start = time.perf_counter()
            jax.block_until_ready(run(steps))
            if round_index:
                per_step[variant].append((time.perf_counter() - start) / steps)
    baseline = statistics.median(per_step["optax"])
    return [
        {
            "variant": variant,
            "pipelined_us": 1e6 * statistics.median(times),
            "min_us": 1e6 * min(times),
            "max_us": 1e6 * max(times),
            "ratio_to_optax": statistics.median(times) / baseline,
            "backend": jax.default_backend(),
        }
        for variant, times in per_step.items()
    ]


def main(argv=None):
    parser = harness.bench_parser(__doc__ or "", "results/bench_hand_loop.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rows = time_loops(
        build_loops(VARIANTS, args.steps * (args.rounds + 1)), args.steps, args.rounds
    )
    columns = [
        ("variant", "---", "{variant}"),
        ("µs per step, pipelined (median)", "---:", "{pipelined_us:.0f}"),
        ("min–max", "---:", "{min_us:.0f}–{max_us:.0f}"),
        ("ratio to optax", "---:", "{ratio_to_optax:.2f}"),
    ]
    report = {
        "benchmark": "bench_hand_loop",
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_size": BATCH_SIZE,
        "machine": harness.machine_record(),
        "rows": rows,
    }
    path = harness.write_report(args.out, report)
    harness.print_report(report, harness.markdown_table(columns, rows), path)
    return report


if __name__ == "__main__":
    main()
