"""Demo: the EXP3 sampler learning the variance-optimal distribution from fixed feedback.

    python -m experiments.demo_sampler --out results/demo_sampler

Every example j has a fixed "gradient norm" f_j (log-normal, heavy-tailed). The sampler
only sees the feedback of the K examples it draws. The quantity AdamBS minimizes is the
variance term V(p) = sum_j f_j^2 / p_j of the importance-weighted gradient estimate
(paper §4.2): V(uniform) = n sum f^2, and the minimum over {p >= p_min} is attained at
p_j = max(p_min, f_j / lambda) (about (sum f)^2). The demo prints V(p_t) / V(uniform) as
training goes and saves a plot of it and of the learned p against f.

It compares five settings, and the first one loses: with the paper's defaults (p_min =
0.1/n, L = running max) the shift L^2/p_min^2 in the loss makes the EXP3 step almost pure
noise (the informative part is (p_min f / (L p))^2 ~ 1e-2 (f/L)^2 of it), log p diffuses
with variance ~ eta0^2 T n / K = 2 log(n) / K, and V(p) ends above V(uniform). A larger
floor (p_min = 0.5/n) and a clipped bound (L = 90th percentile of f) learn. The last two
use the library's default bound, a running 0.9-quantile of the feedback learned online
(``grad_norm_bound="quantile"``), which needs no knowledge of f. See docs/algorithm.md,
"What the shift does".
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import adambs_jax as ab


def optimal_distribution(f, p_min):
    """argmin_{p >= p_min, sum p = 1} sum f^2 / p = max(p_min, f / lambda), by bisection."""
    lo, hi = 1e-30, 1e30
    for _ in range(300):
        lam = math.sqrt(lo * hi)
        lo, hi = (lam, hi) if np.maximum(p_min, f / lam).sum() > 1 else (lo, lam)
    return np.maximum(p_min, f / lam)


def _make_run_chunk(sampler, f_dev, chunk):
    """A jitted ``(state, key) -> (state, V(p))``: ``chunk`` sample + update steps of
    ``sampler`` on the fixed feedback ``f_dev``, then a renormalization."""

    @jax.jit
    def run_chunk(state, key):
        def body(s, key):
            indices, _ = sampler.sample(s, key)
            return sampler.update(s, indices, f_dev[indices]), None

        state, _ = jax.lax.scan(body, state, jax.random.split(key, chunk))
        state = sampler.renormalize(state)  # chunk <= sampler.renormalize_every here
        p = sampler.probabilities(state)
        return state, jnp.sum(f_dev.astype(jnp.float32) ** 2 / p)

    return run_chunk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/demo_sampler")
    args = parser.parse_args(argv)

    n, k, steps = args.num_examples, args.batch_size, args.num_steps
    rng = np.random.default_rng(args.seed)
    f = rng.lognormal(0.0, 1.0, size=n).astype(np.float32)
    f_dev = jnp.asarray(f)
    p_min = 0.1 / n
    v_uniform = n * float(np.sum(f.astype(np.float64) ** 2))
    p_opt = optimal_distribution(f.astype(np.float64), p_min)
    v_opt = float(np.sum(f.astype(np.float64) ** 2 / p_opt)) / v_uniform  # at p_min = 0.1/n
    chunk = max(steps // 50, 1)
    os.makedirs(args.out, exist_ok=True)
    curves, finals = {}, {}
    settings = {
        "paper defaults (p_min=0.1/n, L=running max)": dict(grad_norm_bound="running_max"),
        "p_min=0.5/n": dict(p_min=0.5 / n, grad_norm_bound="running_max"),
        "p_min=0.5/n, L=90th pct of f": dict(
            p_min=0.5 / n, grad_norm_bound=float(np.quantile(f, 0.9))
        ),
        "library default (p_min=0.1/n, L=running 0.9-quantile)": dict(),
        "p_min=0.5/n, L=running 0.9-quantile": dict(p_min=0.5 / n),
    }
    for label, options in settings.items():
        sampler = ab.exp3_sampler(n, k, num_steps=steps, **options)
        p_best = optimal_distribution(f.astype(np.float64), options.get("p_min", p_min))
        run_chunk = _make_run_chunk(sampler, f_dev, chunk)
        state, key = sampler.init(), jax.random.PRNGKey(args.seed)
        curve = [(0, 1.0)]
        for i in tqdm(range(steps // chunk), desc=label):
            key, sub = jax.random.split(key)
            state, v = run_chunk(state, sub)
            curve.append(((i + 1) * chunk, float(v) / v_uniform))
        curves[label] = curve
        finals[label] = np.asarray(sampler.probabilities(state))
        v_best = float(np.sum(f.astype(np.float64) ** 2 / p_best)) / v_uniform
        print(
            f"{label}: V(p)/V(uniform) = {curve[-1][1]:.3f}   (optimum at this floor {v_best:.3f})"
        )

    summary = {
        "settings": {name: dict(o) for name, o in settings.items()},
        "num_examples": n,
        "batch_size": k,
        "num_steps": steps,
        "seed": args.seed,
        "v_opt_over_uniform": v_opt,
        "final_v_over_uniform": {name: c[-1][1] for name, c in curves.items()},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    _plot(curves, finals, f, p_opt, v_opt, os.path.join(args.out, "demo_sampler.png"))
    print(f"wrote {args.out}/summary.json and {args.out}/demo_sampler.png")


def _plot(curves, finals, f, p_opt, v_opt, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        steps, v = zip(*curve)
        ax1.plot(steps, v, label=label)
    ax1.axhline(v_opt, color="k", ls="--", label="optimum p ∝ f (p_min=0.1/n)")
    ax1.axhline(1.0, color="gray", ls=":", label="uniform")
    ax1.set_xlabel("sampler updates")
    ax1.set_ylabel("V(p) / V(uniform)  (lower is better)")
    ax1.set_title("variance of the reweighted gradient")
    ax1.legend(fontsize=8)
    order = np.argsort(f)
    for label, p in finals.items():
        ax2.plot(f[order], p[order] * len(f), ".", ms=2, label=label)
    ax2.plot(f[order], p_opt[order] * len(f), "k-", lw=1, label="optimum (p_min=0.1/n)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("feedback f_j (fixed per example)")
    ax2.set_ylabel("n p_j")
    ax2.set_title("learned distribution")
    ax2.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
