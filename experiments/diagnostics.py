"""What a method's sampler has learned, for ``metrics.jsonl`` (at every evaluation point,
untimed).

The method's sampler says what there is to report: a sampler with a full distribution p
(``sampler.probabilities``, ``ab.samplers.Sampler``: exp3/AdamBS, p^GN, the priority
sampler, ...) gets :func:`distribution_diagnostics` and, against the exact per-example
gradient norms at the current parameters, :func:`score_diagnostics`; Adam-impt its switch
(:func:`importance_switch_diagnostics`); uniform sampling nothing. Nothing here guesses a
state's kind from its attributes.

**Does p follow the gradient norms?** Let g_j = ||grad loss_j(theta)||_2 be the exact
per-example gradient norms of the n training examples at the current parameters theta and
p the sampler's distribution. The importance-weighted estimate of the mean gradient from one
draw i ~ p, g_i / (n p_i), has second moment

    V(p) = sum_j g_j^2 / (n^2 p_j)        (the part of its variance that depends on p),

uniform sampling's is V(u) = sum_j g_j^2 / n, and the minimum over p (at p*_j = g_j / sum g,
the p^GN of Lahire and of Katharopoulos & Fleuret, ICML 2018, eq. 9) is
V(p*) = (sum_j g_j)^2 / n^2. We report

* ``variance_ratio`` = V(p) / V(u) = sum_j g_j^2 / (n p_j) / sum_j g_j^2: 1 = as good as
  uniform, < 1 better, > 1 worse;
* ``variance_ratio_optimal`` = V(p*) / V(u) = (sum_j g_j)^2 / (n sum_j g_j^2) <= 1: the best
  any p can do at these parameters (how much there is to gain);
* ``spearman_p_vs_grad_norm``: Spearman's rank correlation between p_j and g_j (ties get
  their average rank; NaN when p or g is constant, e.g. a uniform p).

With flipped training labels (the dataset's ``metadata["corrupted"]`` mask C), also
``corrupted_share`` = sum_{j in C} p_j: the expected share of the draws that fall on
corrupted examples (uniform: |C| / n).

For large n (> ``max_examples``, ``ExperimentConfig.diagnostic_examples``) the sums run
over a fixed uniform random subset S of m examples (the same for the whole run), which
estimates each ratio by replacing sum_j by (n/m) sum_{j in S} (the factor cancels):
variance_ratio ~= sum_S g_j^2 / (n p_j) / sum_S g_j^2 and variance_ratio_optimal ~=
(sum_S g_j)^2 / (m sum_S g_j^2); the Spearman correlation is that of the m pairs. The
gradient norms use the model in training mode with a fixed key (dropout masks are fixed).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import adambs_jax as ab
from experiments.methods import BuiltMethod

GRAD_NORM_CHUNK = 256  # examples per vmapped / ghost pass of the gradient-norm probe


# ----------------------------------------------------------------------------- formulas


def average_ranks(values) -> np.ndarray:
    """Ranks 1..m of ``values`` (m,), ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # runs of equal values: [start, end) in sorted order; each gets the mean of its ranks
    boundaries = np.flatnonzero(np.diff(sorted_values) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [values.size]])
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two (m,) arrays: the Pearson correlation of their
    average ranks; NaN if either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / denominator) if denominator > 0 else float("nan")


def variance_ratio(p, grad_norms, num_examples: int) -> float:
    """V(p) / V(u) = sum_j g_j^2 / (n p_j) / sum_j g_j^2 over the given examples (all n, or
    a uniform subset: an estimate); p_j are entries of the full distribution over n."""
    p = np.asarray(p, dtype=np.float64)
    squares = np.square(np.asarray(grad_norms, dtype=np.float64))
    # an example with g_j = 0 adds nothing, whatever p_j (p^GN gives it p_j = 0: 0/0 is 0
    # here, not NaN); g_j > 0 with p_j = 0 is a biased sampler and stays +inf
    with np.errstate(divide="ignore"):
        terms = np.divide(squares, num_examples * p, out=np.zeros_like(squares), where=squares > 0)
    return float(np.sum(terms) / np.sum(squares))


def optimal_variance_ratio(grad_norms) -> float:
    """V(p*) / V(u) = (sum_j g_j)^2 / (m sum_j g_j^2) for p*_j proportional to g_j (m = the
    number of examples given)."""
    g = np.asarray(grad_norms, dtype=np.float64)
    return float(np.sum(g) ** 2 / (g.size * np.sum(g * g)))


def score_diagnostics(p_at_examples, grad_norms, num_examples: int) -> dict:
    """The three numbers of the module docstring for p at the probed examples."""
    return {
        "spearman_p_vs_grad_norm": spearman(p_at_examples, grad_norms),
        "variance_ratio": variance_ratio(p_at_examples, grad_norms, num_examples),
        "variance_ratio_optimal": optimal_variance_ratio(grad_norms),
    }


@jax.jit
def _distribution_stats(p):
    n = p.shape[0]
    return {
        "effective_sample_size": 1.0 / (n * jnp.sum(jnp.square(p))),
        "max_prob_times_n": jnp.max(p) * n,
        "min_prob_times_n": jnp.min(p) * n,
    }


def distribution_diagnostics(p) -> dict:
    """The effective sample size 1/(n sum p^2) (1 = uniform), n max p and n min p of a full
    distribution p (n,) (O(n))."""
    return {k: float(v) for k, v in _distribution_stats(p).items()}


def importance_switch_diagnostics(sampler_state) -> dict:
    """Adam-impt (``ab.adam_impt_sampler``): whether importance sampling is on and the moving
    average of the variance-reduction estimate (its marginal p is not computed)."""
    return {
        "importance_sampling_on": float(sampler_state.importance_sampling_on),
        "variance_reduction_ema": float(sampler_state.variance_reduction_ema),
    }


# ----------------------------------------------------------------------------- probes


def probe_indices(num_examples: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
    """The examples the gradient-norm probe scores: all n if n <= ``max_examples`` (or it is
    None), else a fixed uniform random subset of ``max_examples`` (sorted, no repeats)."""
    if max_examples is None or num_examples <= max_examples:
        return np.arange(num_examples, dtype=np.int32)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False)).astype(np.int32)


class GradNormProbe:
    """The exact per-example gradient norms of a fixed set of training examples
    (:func:`probe_indices`) at given parameters: one jitted function, shared by every method
    of a run (``ab.feedback.make_score_fn`` with ``"grad_norm"``, in chunks of
    :data:`GRAD_NORM_CHUNK`)."""

    def __init__(self, loss, data, num_examples: int, max_examples: int | None):
        self.num_examples = int(num_examples)
        self.indices = probe_indices(self.num_examples, max_examples)
        indices, key = jnp.asarray(self.indices), jax.random.key(0)

        @jax.jit
        def norms(params):
            score = ab.feedback.make_score_fn(
                loss, "grad_norm", params, data, key, chunk_size=GRAD_NORM_CHUNK
            )
            return score(indices)

        self._norms = norms

    def __call__(self, params) -> np.ndarray:
        return np.asarray(jax.device_get(self._norms(params)), dtype=np.float64)


def keeps_sampler_state(method: BuiltMethod) -> bool:
    """Whether :func:`sampler_diagnostics` reads ``method``'s sampler state (all but uniform)."""
    return method.sampling != "uniform"


def sampler_probe(
    method: BuiltMethod,
    grad_norms: GradNormProbe | None,
    *,
    jit: bool = True,
    corrupted=None,
) -> Callable:
    """``probe(sampler_state, params) -> dict``: what ``method``'s sampler has learned.

    A full distribution (``sampler.probabilities`` not None): :func:`distribution_diagnostics`
    plus, with ``grad_norms``, :func:`score_diagnostics` of p against the gradient norms at
    ``params``; Adam-impt: :func:`importance_switch_diagnostics`; uniform: ``{}``.
    ``jit``: compile ``sampler.probabilities`` (once; for a probe called at every point).
    ``corrupted``: (n,) bool mask of flipped labels: adds ``corrupted_share`` (sum of p over it).
    """
    if method.sampling == "adam-impt":
        return lambda sampler_state, params: importance_switch_diagnostics(sampler_state)
    if not keeps_sampler_state(method) or method.sampler.probabilities is None:
        return lambda sampler_state, params: {}
    probabilities = jax.jit(method.sampler.probabilities) if jit else method.sampler.probabilities

    def probe(sampler_state, params) -> dict:
        p = probabilities(sampler_state)
        out = distribution_diagnostics(p)
        if method.sampling == "priority":  # the mix lambda it draws with (adaptive: learned)
            out["uniform_mix"] = float(sampler_state.mix)
        if corrupted is not None:
            p_host = np.asarray(jax.device_get(p), dtype=np.float64)
            out["corrupted_share"] = float(np.sum(p_host[np.asarray(corrupted, bool)]))
        if grad_norms is not None:
            p_at = np.asarray(jax.device_get(p), dtype=np.float64)[grad_norms.indices]
            out.update(score_diagnostics(p_at, grad_norms(params), grad_norms.num_examples))
        return out

    return probe


def sampler_diagnostics(
    method: BuiltMethod, sampler_state, params=None, grad_norms: GradNormProbe | None = None
) -> dict:
    """What ``method``'s sampler has learned in ``sampler_state`` (:func:`sampler_probe`,
    built for one call; the score diagnostics need ``params`` and ``grad_norms``)."""
    probe = sampler_probe(method, grad_norms if params is not None else None, jit=False)
    return probe(sampler_state, params)
