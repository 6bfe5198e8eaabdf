"""Training from an on-disk dataset: uniform vs exp3 vs groups-exp3 through the host loop.

    python -m experiments.disk_train --num-examples 10000000 --steps 20000 \\
        --methods uniform,exp3,groups-exp3 --seeds 3 --out results/disk-mlp

The data (``experiments.data.synthetic_disk``, task ``"teacher"``): n training examples of 32
float32 features labelled by a random teacher MLP with label noise, in ``.npy`` memmaps
(generated once under ``--data-dir``, reused after their checksums are verified), and a
held-out test split of ``--num-test`` examples of the same teacher. Every method trains the
same student (an MLP 32-128-128-10, ReLU) with Adam at the same learning rate, batch size,
steps and seeds; batches are read from the memmaps by ``ab.run_host_loop`` (loader threads,
``lookahead`` L = 2) while the device trains:

    uniform      ``ab.uniform_sampler(n, K)``
    exp3         ``ab.exp3_sampler(n, K, num_steps=T)`` (AdamBS, per example)
    groups-exp3  ``ab.group_sampler(n', K, m, base="exp3", num_steps=T)``: the bandit over
                 contiguous groups of m = ``--group-size`` examples (a batch is K / m
                 sequential runs); n' = m floor(n / m), the first n' examples

Every ``--eval-every`` steps (and at step 0) the run records the full-data training loss,
estimated on a fixed random subset of ``--eval-examples`` training examples (the same
subset for every method and seed, read once through the source: at n = 10^7 the exact
mean over all n would cost more than the training), its error, and the test loss and error on
the whole test split. ``seconds`` counts training time only (each chunk of steps is timed
up to ``block_until_ready``; evaluation and compilation excluded).

Writes into ``--out``: ``metrics.jsonl`` (one line per evaluation), ``summary.json`` (the
machine, the arguments, the seeds, per method the steps per second and the final losses and
errors as mean ± std over seeds) and ``disk_train.png`` (training loss vs steps and vs
seconds, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import adambs_jax as ab
from experiments import bench_harness as harness
from experiments.data import synthetic_disk
from experiments.models.mlp import MLP

METHODS = ("uniform", "exp3", "groups-exp3")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. S-1 per method")
    parser.add_argument("--out", default="results/disk-mlp")
    parser.add_argument("--data-dir", default="/tmp/adambs_disk_train")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", default="128,128", help="the student's hidden sizes")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-examples", type=int, default=20_000)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if min(args.steps, args.seeds, args.eval_every, args.eval_examples, args.num_test) < 1:
        parser.error("--steps, --seeds, --eval-every, --eval-examples, --num-test must be >= 1")
    args.hidden = tuple(int(width) for width in args.hidden.split(","))
    return args


def open_data(args) -> tuple[ab.host.MemmapSource, ab.host.MemmapSource]:
    """The training and test splits (written under ``--data-dir`` unless already there)."""
    root = pathlib.Path(args.data_dir) / f"teacher_n{args.num_examples}"
    progress = not args.no_progress
    train = synthetic_disk.open_synthetic(
        root / "train", args.num_examples, task="teacher", progress=progress
    )
    test = synthetic_disk.open_synthetic(
        root / f"test_n{args.num_test}",
        args.num_test,
        task="teacher",
        split="test",
        progress=progress,
    )
    return train, test


def make_sampler(method: str, num_examples: int, args):
    if method == "uniform":
        return ab.uniform_sampler(num_examples, args.batch_size)
    if method == "exp3":
        return ab.exp3_sampler(num_examples, args.batch_size, num_steps=args.steps)
    return ab.group_sampler(
        num_examples, args.batch_size, args.group_size, base="exp3", num_steps=args.steps
    )


def method_source(method: str, source: ab.host.MemmapSource, args):
    """The training source a method draws from (whole groups only for groups-exp3)."""
    if method == "groups-exp3":
        return synthetic_disk.whole_groups(source, args.group_size)
    return source


def make_evaluate(model: MLP, train: ab.host.MemmapSource, test: ab.host.MemmapSource, args):
    """``params -> dict`` of the training loss/error on a fixed random subset of the
    training set (seed 0, the same for every run) and the test loss/error."""
    size = min(args.eval_examples, train.num_examples)
    subset = np.sort(np.random.default_rng(0).choice(train.num_examples, size, replace=False))
    sets = {
        "train": jax.device_put(train.read(subset)),
        "test": jax.device_put(test.read(np.arange(test.num_examples))),
    }

    @jax.jit
    def loss_and_error(params, batch):
        logits = model.apply(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) != batch["y"])

    def evaluate(params) -> dict:
        record = {}
        for name, batch in sets.items():
            loss, error = loss_and_error(params, batch)
            record[f"{name}_loss"], record[f"{name}_error"] = float(loss), float(error)
        return record

    return evaluate


def compile_step(step, state, draws, source) -> None:
    """Compiles the step outside the timed training: one call of the jitted step on a copy
    of the state (the step donates it), its result discarded."""
    batch = jax.device_put(source.read(np.asarray(draws.indices)))
    copy = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(step.step_fn(copy, batch, draws, jax.random.key(0)))


def build_step(method: str, source, model: MLP, args) -> ab.host.HostTrainStep:
    """The method's host step (built and compiled once, shared by its seeds)."""
    loss = ab.ModelLoss(
        lambda params, batch: model.apply(params, batch["x"]),
        lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
    )
    sampler = make_sampler(method, source.num_examples, args)
    return ab.make_host_train_step(
        loss, optax.adam(args.learning_rate), sampler, lookahead=args.lookahead
    )


def train_one(method: str, seed: int, step, source, init_params, evaluate, args, bar) -> list[dict]:
    """One method and seed: the evaluation records, every ``eval_every`` steps."""
    params = init_params(jax.random.key(seed))
    state, draws = step.init(params, jax.random.key(1000 + seed))
    compile_step(step, state, draws[0], source)  # compiles once; later seeds hit the cache
    done, seconds = 0, 0.0
    records = [{"method": method, "seed": seed, "step": 0, "seconds": 0.0, **evaluate(params)}]
    while done < args.steps:
        chunk = min(args.eval_every, args.steps - done)
        start = time.perf_counter()
        state, draws, _ = ab.run_host_loop(
            step,
            state,
            draws,
            source,
            chunk,
            num_threads=args.num_threads,
            key=jax.random.fold_in(jax.random.key(2000 + seed), done),
        )
        jax.block_until_ready(state)
        seconds += time.perf_counter() - start
        done += chunk
        records.append(
            {
                "method": method,
                "seed": seed,
                "step": done,
                "seconds": seconds,
                **evaluate(state.params),
            }
        )
        bar.update(chunk)
        bar.set_postfix(method=method, seed=seed, loss=f"{records[-1]['train_loss']:.3f}")
    return records


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarize(records: list[dict], args) -> dict:
    """Per method: steps per second (training time, compilation excluded) and the final
    losses and errors, mean ± std over seeds."""
    methods = {}
    for method in args.methods:
        finals = [
            [r for r in records if r["method"] == method and r["seed"] == seed][-1]
            for seed in range(args.seeds)
        ]
        methods[method] = {
            "steps_per_s": mean_std([final["step"] / final["seconds"] for final in finals]),
            **{
                key: mean_std([final[key] for final in finals])
                for key in ("train_loss", "train_error", "test_loss", "test_error")
            },
        }
    return {
        "experiment": "disk_train",
        "task": "synthetic_disk teacher",
        "args": {key: value for key, value in vars(args).items()},
        "seeds": list(range(args.seeds)),
        "methods": methods,
        "train_loss_estimate": f"mean over a fixed random subset of "
        f"{min(args.eval_examples, args.num_examples)} training examples",
        "machine": harness.machine_record(),
    }


def plot(records: list[dict], args, path: pathlib.Path) -> None:
    """Training loss (the subset estimate) vs steps and vs seconds, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method in args.methods:
        runs = [
            [r for r in records if r["method"] == method and r["seed"] == seed]
            for seed in range(args.seeds)
        ]
        steps = [r["step"] for r in runs[0]]
        loss = np.mean([[r["train_loss"] for r in run] for run in runs], axis=0)
        seconds = np.mean([[r["seconds"] for r in run] for run in runs], axis=0)
        axes[0].plot(steps, loss, label=method)
        axes[1].plot(seconds, loss, label=method)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel("training loss (subset estimate)")
    axes[0].legend()
    figure.suptitle(
        f"on-disk teacher task, n = {args.num_examples}, K = {args.batch_size}, "
        f"{args.seeds} seed(s)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = open_data(args)
    model = MLP(num_classes=synthetic_disk.NUM_CLASSES, hidden_sizes=args.hidden)
    evaluate = make_evaluate(model, train, test, args)
    features = jnp.zeros((1, synthetic_disk.NUM_FEATURES))
    init_params = jax.jit(lambda key: model.init(key, features))
    records = []
    total = args.steps * args.seeds * len(args.methods)
    with tqdm(total=total, unit="step", disable=args.no_progress) as bar:
        for method in args.methods:
            source = method_source(method, train, args)
            step = build_step(method, source, model, args)
            for seed in range(args.seeds):
                records += train_one(method, seed, step, source, init_params, evaluate, args, bar)
    with open(out / "metrics.jsonl", "w") as stream:
        stream.writelines(json.dumps(record) + "\n" for record in records)
    summary = summarize(records, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(records, args, out / "disk_train.png")
    for method, row in summary["methods"].items():
        print(
            f"{method:12s} {row['steps_per_s']['mean']:8.1f} steps/s  train loss "
            f"{row['train_loss']['mean']:.4f} ± {row['train_loss']['std']:.4f}  test error "
            f"{row['test_error']['mean']:.4f} ± {row['test_error']['std']:.4f}"
        )
    print(f"wrote {out}/metrics.jsonl, summary.json, disk_train.png")
    return summary


if __name__ == "__main__":
    main()
