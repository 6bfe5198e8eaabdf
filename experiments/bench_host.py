"""Benchmark: steps/s from an on-disk dataset through the host loop, per sampler variant.

    python -m experiments.bench_host --num-examples 1000000 --dir /tmp/adambs_disk

The data are ``experiments.data.synthetic_disk`` (numpy memmaps of n examples, 32 float32
features, 10 classes), K = 128, a 32-128-128-10 MLP, Adam, ``feedback="grad_norm"`` for all
variants (the same step computation), ``lookahead`` L = 2:

    no_sampler  the indices are drawn on the host with numpy (uniform), read by the same
                ``HostLoader``; the step's own draws are ignored (no device -> host copy of
                indices on the path)
    uniform     ``uniform_sampler`` through the host loop (indices drawn on the device)
    exp3        ``exp3_sampler`` through the host loop (per-example bandit: K random rows)
    groups16_exp3, groups128_exp3
                ``group_sampler(n', K, m, base="exp3")`` with m = 16, 128: the same bandit
                over contiguous groups of m examples, so a drawn batch is read as K / m
                sequential runs of m rows (m = K = 128: one run, Adam-APT). n' = m floor(n / m)
                (the groups cover the first n' examples of the same files)

Each variant is compiled and warmed up, then the variants are interleaved in ``--rounds``
rounds of ``--steps`` steps (blocked once at the end of a round). Reported per variant:
median steps per second over rounds, the ratios to ``no_sampler`` and ``uniform``, and the
fraction of a round's wall time the main thread spent waiting for a batch in
``HostLoader.next`` (on CPU, where the device is the host, the loader-starvation proxy),
and the rate of the same step on one batch already on the device (``step only``: what the
step costs without the loader; ``loop / step only`` is what the loader leaves of it).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adambs_jax as ab
from experiments import bench_harness as harness
from experiments.data import synthetic_disk
from experiments.models.mlp import MLP

VARIANTS = ("no_sampler", "uniform", "exp3", "groups16_exp3", "groups128_exp3")
GROUP_SIZES = {"groups16_exp3": 16, "groups128_exp3": 128}
TABLE_COLUMNS = [
    ("variant", "---", "{variant}"),
    ("steps/s (median)", "---:", "{steps_per_s:.1f}"),
    ("vs no sampler", "---:", "{ratio_vs_no_sampler:.2f}"),
    ("vs uniform", "---:", "{ratio_vs_uniform:.2f}"),
    ("main thread waiting", "---:", "{wait_fraction:.1%}"),
    ("step only steps/s", "---:", "{step_only_steps_per_s:.1f}"),
    ("loop / step only", "---:", "{loop_vs_step_only:.2f}"),
]


def _build(variant: str, num_examples: int, args):
    model = MLP(num_classes=synthetic_disk.NUM_CLASSES, hidden_sizes=(128, 128))
    loss = ab.ModelLoss(
        lambda params, batch: model.apply(params, batch["x"]),
        lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
    )
    if variant == "exp3":
        sampler = ab.exp3_sampler(num_examples, args.batch_size, num_steps=10_000)
    elif variant in GROUP_SIZES:
        sampler = ab.group_sampler(
            num_examples, args.batch_size, GROUP_SIZES[variant], base="exp3", num_steps=10_000
        )
    else:
        sampler = ab.uniform_sampler(num_examples, args.batch_size)
    step = ab.make_host_train_step(loss, optax.adam(1e-3), sampler, lookahead=args.lookahead)
    params = model.init(jax.random.key(0), jnp.zeros((1, synthetic_disk.NUM_FEATURES)))
    return step, *step.init(params, jax.random.key(1))


class Runner:
    """One variant's step, live state, pending draws and loader."""

    def __init__(self, variant: str, source, args):
        self.variant, self.batch_size = variant, args.batch_size
        self.step, self.state, draws = _build(variant, source.num_examples, args)
        self.rng = np.random.default_rng(0)
        self.loader = ab.host.HostLoader(self.step, source, num_threads=args.num_threads)
        for current in draws:
            self.loader.put(self._host_draws() if variant == "no_sampler" else current)
        self.key = jax.random.key(2)

    def _host_draws(self):
        n = self.step.sampler.num_examples
        indices = self.rng.integers(0, n, self.batch_size, dtype=np.int32)
        return ab.host.Draws(indices, np.full(self.batch_size, 1.0 / n, np.float32))

    def run(self, steps: int) -> tuple[float, float]:
        """``(wall seconds, seconds waited for batches)`` of ``steps`` steps, blocked once."""
        waited, start = self.loader.wait_seconds, time.perf_counter()
        metrics = None
        for _ in range(steps):
            batch, current = self.loader.next()
            self.key, key = jax.random.split(self.key)
            self.state, metrics, later = self.step(self.state, batch, current, key)
            self.loader.put(self._host_draws() if self.variant == "no_sampler" else later)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start, self.loader.wait_seconds - waited

    def run_step_only(self, steps: int) -> float:
        """Wall seconds of ``steps`` steps on one batch already on the device (no loader:
        what the step costs by itself), blocked once."""
        batch, current = self.loader.next()
        metrics = None
        start = time.perf_counter()
        for _ in range(steps):
            self.key, key = jax.random.split(self.key)
            self.state, metrics, _ = self.step(self.state, batch, current, key)
        jax.block_until_ready((self.state, metrics))
        wall = time.perf_counter() - start
        self.loader.put(current)  # keep L batches scheduled
        return wall


def variant_source(variant: str, source: ab.host.MemmapSource) -> ab.host.MemmapSource:
    """``source``, or for a groups variant of group size m its first m floor(n / m) examples
    (the groups sampler needs n divisible by m)."""
    if variant not in GROUP_SIZES:
        return source
    return synthetic_disk.whole_groups(source, GROUP_SIZES[variant])


def bench(source, args) -> list[dict]:
    runners = {
        variant: Runner(variant, variant_source(variant, source), args) for variant in VARIANTS
    }
    for runner in runners.values():
        runner.run(args.warmup)
    rates = {variant: [] for variant in VARIANTS}
    waits = {variant: [] for variant in VARIANTS}
    alone = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        for variant, runner in runners.items():
            wall, waited = runner.run(args.steps)
            rates[variant].append(args.steps / wall)
            waits[variant].append(waited / wall)
            alone[variant].append(args.steps / runner.run_step_only(args.steps))
        print(
            f"round {round_index}: "
            + "  ".join(
                f"{v} {rates[v][-1]:.1f}/s (step only {alone[v][-1]:.1f}/s)" for v in VARIANTS
            ),
            flush=True,
        )
    for runner in runners.values():
        runner.loader.close()
    medians = {variant: statistics.median(r) for variant, r in rates.items()}
    return [
        {
            "variant": variant,
            "steps_per_s": medians[variant],
            "steps_per_s_rounds": rates[variant],
            "ratio_vs_no_sampler": medians[variant] / medians["no_sampler"],
            "ratio_vs_uniform": medians[variant] / medians["uniform"],
            "wait_fraction": statistics.median(waits[variant]),
            "step_only_steps_per_s": statistics.median(alone[variant]),
            "loop_vs_step_only": medians[variant] / statistics.median(alone[variant]),
        }
        for variant in VARIANTS
    ]


def main(argv=None):
    parser = harness.bench_parser(__doc__, "docs/results/bench/bench_host_cpu.json")
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--dir", default="/tmp/adambs_synthetic_disk")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    source = synthetic_disk.open_synthetic(args.dir, args.num_examples)
    rows = bench(source, args)
    report = {
        "benchmark": "bench_host",
        "num_examples": args.num_examples,
        "batch_size": args.batch_size,
        "lookahead": args.lookahead,
        "num_threads": args.num_threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "model": "MLP 32-128-128-10, adam(1e-3), feedback grad_norm",
        "source": type(source).__module__ + "." + type(source).__name__,
        "group_sizes": GROUP_SIZES,
        "rows": rows,
        "machine": harness.machine_record(),
    }
    path = harness.write_report(args.out, report)
    harness.print_report(report, harness.markdown_table(TABLE_COLUMNS, rows), path)


if __name__ == "__main__":
    main()
