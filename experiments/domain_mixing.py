"""Experiment: the domain sampler's mixture q moving toward the harder domains.

    python -m experiments.domain_mixing --out docs/results/domain-mixing [--steps T] [--seeds S]

Four synthetic regression domains of unequal sizes and difficulty share one input
distribution (x ~ N(0, I_8)) and one MLP (8-64-64-1, Adam, K = 64); they differ in the target
and its noise:

    easy     n = 16000   y = <w, x> + 0.05 e              (linear, almost noiseless)
    noisy    n =  4000   y = <w, x> + 1.0 e               (linear, irreducible noise)
    curved   n =  2000   y = 2 sin(<v, x>) + 0.05 e       (nonlinear)
    hard     n =   500   y = 3 sin(2 <u, x>) cos(<v, x>) + 0.05 e   (small and wiggly)

Plain training draws them in proportion to size (q_d = n_d / n: 71%, 18%, 9%, 2%). The
domain sampler learns q from the per-example gradient norms of the examples it draws;
its variance-optimal target is q_d proportional to n_d sqrt(mean ||g_j||^2 over d), so the
domains whose examples keep large gradients (the hard and the noisy ones) gain mass. It
writes ``domain_mixing.json`` (q over steps per method and seed, the held-out MSE per
domain) and ``q_over_steps.png`` into ``--out``. Methods: ``uniform`` (plain training, the
example-uniform sampler), ``exp3`` (``domain_sampler`` with exp3 over the domains, p_min
= 0.5 / D, eta0 = 0.1: the defaults made for n examples move a few arms too slowly,
docs/api.md "Domain sampler") and ``priority`` (``domain_sampler`` with the priority base).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adambs_jax as ab

DOMAINS = ("easy", "noisy", "curved", "hard")
SIZES = (16000, 4000, 2000, 500)
NOISE = (0.05, 1.0, 0.05, 0.05)
DIM, HIDDEN, BATCH = 8, 64, 64
METHODS = ("uniform", "exp3", "priority")


def make_data(seed: int, sizes=SIZES, test_per_domain: int = 1000):
    """``(train, test, domain_of_test)``: the domains laid out contiguously (train) and a
    held-out set of ``test_per_domain`` examples per domain."""
    rng = np.random.default_rng(seed)
    w, u, v = (rng.normal(size=DIM) / np.sqrt(DIM) for _ in range(3))

    def domain(d, count):
        x = rng.normal(size=(count, DIM)).astype(np.float32)
        target = (
            x @ w,
            x @ w,
            2.0 * np.sin(x @ v),
            3.0 * np.sin(2.0 * (x @ u)) * np.cos(x @ v),
        )[d]
        y = target + NOISE[d] * rng.normal(size=count)
        return x, y.astype(np.float32)

    def stack(counts):
        parts = [domain(d, c) for d, c in enumerate(counts)]
        return {
            "x": jnp.asarray(np.concatenate([p[0] for p in parts])),
            "y": jnp.asarray(np.concatenate([p[1] for p in parts])),
        }

    train = stack(sizes)
    test = stack([test_per_domain] * len(sizes))
    return train, test, np.repeat(np.arange(len(sizes)), test_per_domain)


def init_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    glorot = jax.nn.initializers.glorot_normal()
    return {
        "w1": glorot(k1, (DIM, HIDDEN)),
        "b1": jnp.zeros(HIDDEN),
        "w2": glorot(k2, (HIDDEN, HIDDEN)),
        "b2": jnp.zeros(HIDDEN),
        "w3": glorot(k3, (HIDDEN, 1)),
        "b3": jnp.zeros(1),
    }


def predict(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    h = jax.nn.relu(h @ params["w2"] + params["b2"])
    return (h @ params["w3"] + params["b3"])[..., 0]


def loss_fn(params, batch):
    """Per-example squared errors (K,)."""
    return jnp.square(predict(params, batch["x"]) - batch["y"])


def make_sampler(method: str, sizes, num_steps: int):
    if method == "uniform":
        return ab.uniform_sampler(sum(sizes), BATCH)
    if method == "exp3":
        return ab.samplers.domain_sampler(
            sizes, BATCH, base="exp3", p_min=0.5 / len(sizes), step_size=0.1
        )
    if method == "priority":
        return ab.samplers.domain_sampler(sizes, BATCH, base="priority")
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def mixture(method: str, state, sizes) -> list[float]:
    """q (D,): the domain sampler's mixture; for uniform, n_d / n."""
    if method == "uniform":
        return [s / sum(sizes) for s in sizes]
    return [float(v) for v in state.sampler_state.domain_probabilities()]


def run(method: str, seed: int, num_steps: int, record_every: int, sizes=SIZES) -> dict:
    """One run: q every ``record_every`` steps and the held-out MSE per domain at the end."""
    train, test, test_domains = make_data(seed, sizes)
    sampler = make_sampler(method, sizes, num_steps)
    step = ab.make_train_step(loss_fn, optax.adam(3e-3), sampler)
    state = step.init(init_params(jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(1000 + seed), num_steps)
    steps, history = [], []
    for t in range(num_steps):
        if t % record_every == 0:
            steps.append(t)
            history.append(mixture(method, state, sizes))
        state, _ = step(state, train, keys[t])
    steps.append(num_steps)
    history.append(mixture(method, state, sizes))
    errors = np.asarray(loss_fn(state.params, test))
    per_domain = [float(errors[test_domains == d].mean()) for d in range(len(sizes))]
    return {"method": method, "seed": seed, "steps": steps, "q": history, "test_mse": per_domain}


def plot(results: list[dict], path: str, sizes=SIZES) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m != "uniform" and any(r["method"] == m for r in results)]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 3.8), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, method in zip(axes[0], methods):
        runs = [r for r in results if r["method"] == method]
        steps = runs[0]["steps"]
        q = np.asarray([r["q"] for r in runs])  # (seeds, records, D)
        for d, name in enumerate(DOMAINS[: len(sizes)]):
            mean = q[:, :, d].mean(0)
            ax.plot(steps, mean, color=colors[d], label=f"{name} (n={sizes[d]})")
            if len(runs) > 1:
                ax.fill_between(
                    steps, q[:, :, d].min(0), q[:, :, d].max(0), color=colors[d], alpha=0.2
                )
            ax.axhline(sizes[d] / sum(sizes), color=colors[d], ls=":", lw=1)
        ax.set_title(f"domain_sampler, base={method} ({len(runs)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("q_d (dotted: n_d / n, plain training)")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(results: list[dict], sizes=SIZES) -> dict:
    """Per method: the mean final q and held-out MSE per domain (over seeds), and the MSE
    over the held-out set weighted like the training set (n_d / n)."""
    share = np.asarray(sizes) / sum(sizes)
    summary = {}
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        q = np.mean([r["q"][-1] for r in runs], axis=0)
        mse = np.mean([r["test_mse"] for r in runs], axis=0)
        summary[method] = {
            "final_q": [round(float(v), 4) for v in q],
            "test_mse": [round(float(v), 4) for v in mse],
            "test_mse_size_weighted": round(float(np.sum(share * mse)), 4),
            "test_mse_domain_mean": round(float(mse.mean()), 4),
        }
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.domain_mixing")
    parser.add_argument("--out", default="results/domain-mixing")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--record-every", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = [
        run(method, seed, args.steps, args.record_every)
        for method in args.methods.split(",")
        for seed in range(args.seeds)
    ]
    summary = summarize(results)
    with open(os.path.join(args.out, "domain_mixing.json"), "w") as f:
        json.dump({"domains": DOMAINS, "sizes": SIZES, "summary": summary, "runs": results}, f)
    plot(results, os.path.join(args.out, "q_over_steps.png"))
    for method, row in summary.items():
        print(method, json.dumps(row))
    return summary


if __name__ == "__main__":
    main()
