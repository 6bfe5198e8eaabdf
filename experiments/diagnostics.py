"""What a method's sampler has learned, for ``metrics.jsonl`` (computed at chunk ends, untimed).

The method's sampling kind (``experiments.methods``) says what there is to report; the
distribution itself comes from the sampler's own ``probabilities`` function
(``adambs_jax.base.Sampler``), so nothing here guesses a state's kind from its attributes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.methods import BuiltMethod


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


def sampler_diagnostics(method: BuiltMethod, sampler_state) -> dict:
    """What ``method``'s sampler has learned in ``sampler_state``.

    exp3 (AdamBS) and p^GN: :func:`distribution_diagnostics` of ``sampler.probabilities``;
    Adam-impt: :func:`importance_switch_diagnostics`; uniform: ``{}`` (nothing is learned).
    """
    if method.sampling == "uniform":
        return {}
    if method.sampling == "adam-impt":
        return importance_switch_diagnostics(sampler_state)
    return distribution_diagnostics(method.sampler.probabilities(sampler_state))
