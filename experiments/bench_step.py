"""Benchmark: time of one training step, plain Adam vs AdamBS with each feedback kind.

    python -m experiments.bench_step [--out results/bench_step.json] [--runs 100]
        [--scan-steps 50] [--throughput-rounds 5]

Two models (defined here, Flax linen; ``bench_baselines`` uses the same ``mlp``; the
models depend on nothing else in ``experiments``):

* ``mlp``: 64 -> 128 -> 128 -> 10 on digits-sized random data (n = 1797, 64 features,
  10 classes);
* ``mlp4000``: 40 -> 100 -> 100 -> 10 on MNIST-1D-sized random data (n = 4000, 40
  features, 10 classes), where a sampler's fixed cost per step is most visible;
* ``cnn``: conv 3x3x16 (stride 2) -> conv 3x3x32 (stride 2) -> dense 10 on random 28x28x1
  images (n = 10,000);
* ``cifar``: the AdamBS paper's CIFAR-10 CNN (``experiments.models.cnn.CifarCNN``, 4 conv
  3x3 + max-pool + dense 512, eval mode) on random 32x32x3 images (n = 50,000);
* ``transformer``: one pre-LayerNorm transformer block (token + position embedding, 4-head
  self-attention from Dense layers, MLP 4x, LayerNorm) on random token sequences, T = 32,
  width 64, vocabulary 1000, mean-pooled into 10 classes (n = 10,000).

Batch size K = 128. Variants: ``adam`` (a hand-written jitted optax Adam step with uniform
indices, the baseline), ``uniform`` (``make_train_step`` with ``uniform_sampler``, ``"loss"``
feedback: the overhead of the step itself), and ``adambs/<feedback>`` (``exp3_sampler`` with
``"grad_norm"``, ``"logit_grad_norm"``, ``"loss"``; default diagnostics, which are O(n) at
these n), ``priority/logit_grad_norm`` (``priority_sampler``, its defaults), plus
``adambs/grad_norm/reuse-per-example`` (``GradNorm(reuse_per_example_grads=True)``) and
``adambs/loss/no-diagnostics``, and
``adambs/grad_norm/vmap`` (exact norms by ``vmap`` per-example gradients instead of the
default ghost norms: ``GradNorm(method="vmap")``).
Every step is jitted with the state donated, warmed up (compilation excluded) and timed with
``block_until_ready``, the variants interleaved in rounds (``experiments.bench_harness``);
the table reports the median over ``--runs`` steps and the ratio to ``adam`` (AdamBS paper:
Liu, Wu, Mozafari, NeurIPS 2020; DESIGN.md §5).

Three figures per variant, as a user sees them: ``median_ms`` (synced: every step
blocked on, the latency of one step), ``pipelined_ms`` (``--scan-steps`` steps dispatched back
to back, blocked once: a training loop's throughput) and ``scan_ms`` (the same number of
steps in one jitted ``lax.scan``, ``make_train_step(..., steps_per_call=N)``: device time
without dispatch), each with its ratio to ``adam`` and the backend in every row.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adambs_jax as ab
from experiments import bench_harness as harness
from experiments.models.cnn import CifarCNN

BATCH_SIZE = 128
LEARNING_RATE = 1e-3


class MLP(nn.Module):
    width: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class TransformerBlock(nn.Module):
    """A small pre-LayerNorm transformer classifier built from standard Flax layers."""

    vocab: int = 1000
    width: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        x = x + nn.Embed(tokens.shape[1], self.width)(jnp.arange(tokens.shape[1]))
        x = x + nn.SelfAttention(num_heads=self.heads, qkv_features=self.width)(nn.LayerNorm()(x))
        h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
        x = x + nn.Dense(self.width)(nn.gelu(h))
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


MODELS = {
    "mlp": lambda: (MLP(), 1797, (64,)),
    "mlp4000": lambda: (MLP(width=100), 4000, (40,)),
    "cnn": lambda: (CNN(), 10_000, (28, 28, 1)),
    "cifar": lambda: (CifarCNN(), 50_000, (32, 32, 3)),
    "transformer": lambda: (TransformerBlock(), 10_000, (32,)),
}
"""name -> () -> (model, n, example shape)."""


def make_problem(name: str, seed: int = 0):
    """(model, data, params): random data of the given shape, on device."""
    rng = np.random.default_rng(seed)
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    model, n, shape = MODELS[name]()
    if name == "transformer":
        x = rng.integers(0, model.vocab, size=(n,) + shape).astype(np.int32)
    else:
        x = rng.normal(size=(n,) + shape).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 10, size=(n,)), jnp.int32)}
    params = jax.jit(model.init)(jax.random.key(seed), data["x"][:1])
    return model, data, params


def model_loss_of(model) -> ab.ModelLoss:
    return ab.ModelLoss(
        apply_fn=lambda params, batch: model.apply(params, batch["x"]),
        loss_from_outputs=lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        ),
    )


def plain_adam_step(model_loss, num_examples, steps_per_call=1):
    """The baseline: uniform indices, gather, grad of the mean loss, optax.adam; with
    ``steps_per_call`` N, N of them in one ``lax.scan`` (keys ``split(key, N)``)."""
    optimizer = optax.adam(LEARNING_RATE)

    def step(state, data, key):
        params, opt_state = state
        indices = jax.random.randint(key, (BATCH_SIZE,), 0, num_examples)
        batch = jax.tree.map(lambda leaf: leaf[indices], data)
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model_loss(p, batch)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    def init(params):
        return (jax.tree.map(jnp.copy, params), optimizer.init(params))

    def multi_step(state, data, key):
        keys = jax.random.split(key, steps_per_call)
        return jax.lax.scan(lambda carry, k: step(carry, data, k), state, keys)

    return jax.jit(step if steps_per_call == 1 else multi_step, donate_argnums=0), init


def library_step(model_loss, num_examples, variant: str, steps_per_call=1):
    """``make_train_step`` for a variant name ``uniform`` or ``adambs/<feedback>[/...]``."""
    optimizer = optax.adam(LEARNING_RATE)
    parts = variant.split("/")
    if parts[0] == "uniform":
        sampler, feedback = ab.uniform_sampler(num_examples, BATCH_SIZE), "loss"
    elif parts[0] == "priority":
        sampler, feedback = ab.priority_sampler(num_examples, BATCH_SIZE), parts[1]
    else:
        sampler = ab.exp3_sampler(num_examples, BATCH_SIZE, num_steps=10_000)
        feedback = parts[1]
    diagnostics = False if "no-diagnostics" in parts else None
    if feedback == "grad_norm":
        feedback = ab.feedback.GradNorm(
            method="vmap" if "vmap" in parts else "auto",
            reuse_per_example_grads="reuse-per-example" in parts,
        )
    step = ab.make_train_step(
        model_loss,
        optimizer,
        sampler,
        feedback=feedback,
        diagnostics=diagnostics,
        steps_per_call=steps_per_call,
    )

    def init(params):
        return ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)

    return step, init


VARIANTS = (
    "adam",
    "uniform",
    "adambs/grad_norm",
    "adambs/grad_norm/vmap",
    "adambs/grad_norm/reuse-per-example",
    "adambs/logit_grad_norm",
    "adambs/loss",
    "adambs/loss/no-diagnostics",
    "priority/logit_grad_norm",
)


def _variant_steps(model_loss, num_examples, variant, steps_per_call):
    """(one-step function, init, ``steps_per_call``-step function) of a variant."""
    if variant == "adam":
        make = functools.partial(plain_adam_step, model_loss, num_examples)
    else:
        make = functools.partial(library_step, model_loss, num_examples, variant)
    step, init = make()
    multi_step, _ = make(steps_per_call=steps_per_call)
    return step, init, multi_step


def run(
    models,
    runs: int,
    warmup: int,
    rounds: int = 10,
    scan_steps: int = 50,
    throughput_rounds: int = 5,
    variants=VARIANTS,
):
    """Times every variant of each model, interleaved: ``rounds`` rounds, each giving every
    variant ``runs / rounds`` consecutive steps, so that a change of the machine's load
    during the benchmark hits all variants alike (ratios side by side, DESIGN.md §5); then
    the pipelined and scanned throughput of ``scan_steps`` steps, ``throughput_rounds``
    interleaved rounds."""
    results = []
    for name in models:
        model, data, params = make_problem(name)
        model_loss = model_loss_of(model)
        num_examples = data["y"].shape[0]
        steps, throughput = {}, {}
        for variant in variants:
            step, init, multi_step = _variant_steps(model_loss, num_examples, variant, scan_steps)
            steps[variant] = (step, init(params))
            throughput[variant] = (step, init(params), multi_step, init(params))
        rows, timed = harness.time_variants(
            steps,
            data,
            runs=runs,
            warmup=warmup,
            rounds=rounds,
            label=f"{name:4s} ",
            model=name,
            num_examples=num_examples,
            batch_size=BATCH_SIZE,
        )
        del timed, steps
        harness.add_throughput(rows, throughput, data, rounds=throughput_rounds, steps=scan_steps)
        results += rows
    return results


def markdown_table(results) -> str:
    columns = [
        ("model", "---", "{model}"),
        ("n", "---:", "{num_examples}"),
        ("variant", "---", "{variant}"),
        *harness.step_time_columns("adam", "Adam"),
        ("pipelined ms", "---:", "{pipelined_ms:.3f}"),
        ("ratio", "---:", "{ratio_pipelined_vs_adam:.2f}"),
        ("scan ms", "---:", "{scan_ms:.3f}"),
        ("ratio", "---:", "{ratio_scan_vs_adam:.2f}"),
    ]
    return harness.markdown_table(columns, results)


def main(argv=None):
    parser = harness.bench_parser(__doc__, "results/bench_step.json")
    harness.add_step_timing_arguments(parser, min_runs=1)
    parser.add_argument(
        "--models", default="mlp,cnn", help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated; 'adam' (the baseline of the ratios) is always run",
    )
    parser.add_argument(
        "--scan-steps", type=int, default=50, help="steps per pipelined burst and per lax.scan call"
    )
    parser.add_argument("--throughput-rounds", type=int, default=5)
    args = parser.parse_args(argv)
    harness.check_step_timing_arguments(parser, args, min_runs=1)
    variants = ("adam",) + tuple(v for v in args.variants.split(",") if v and v != "adam")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    results = run(
        [m for m in args.models.split(",") if m],
        args.runs,
        args.warmup,
        args.rounds,
        args.scan_steps,
        args.throughput_rounds,
        variants,
    )
    report = {
        "benchmark": "train_step",
        "backend": jax.default_backend(),
        "machine": harness.machine_record(),
        "results": results,
    }
    harness.print_report(report, markdown_table(results), harness.write_report(args.out, report))


if __name__ == "__main__":
    main()
