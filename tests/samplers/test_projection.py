"""The O(K log K) projection against a brute-force sort-based KL projection over all n arms."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adambs_jax.samplers._projection import project_onto_floored_simplex


def brute_force_projection(w, p_min):
    """argmin_{q >= p_min, sum q = 1} KL(q || w) over ALL arms, float64: q = max(p_min, w/Z).

    Sorts all n weights and tries every number k of clipped (smallest) arms, keeping the
    one whose Z is consistent with its own clipping pattern."""
    w = np.asarray(w, np.float64)
    ws = np.sort(w)
    n = len(ws)
    for k in range(n + 1):
        if 1 - k * p_min <= 0:
            break
        z = ws[k:].sum() / (1 - k * p_min)
        lower_ok = k == 0 or ws[k - 1] <= p_min * z * (1 + 1e-12)
        upper_ok = k == n or ws[k] >= p_min * z * (1 - 1e-12)
        if lower_ok and upper_ok:
            return np.maximum(p_min, w / z), z
    raise AssertionError("no consistent clipping pattern")


@st.composite
def projection_cases(draw):
    n = draw(st.integers(2, 60))
    floor_fraction = draw(st.sampled_from([0.01, 0.1, 0.5, 0.9, 1.0]))
    p_min = floor_fraction / n
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    p = p_min + (1 - n * p_min) * rng.dirichlet(np.full(n, draw(st.sampled_from([0.2, 1.0, 5.0]))))
    k = draw(st.integers(1, 16))
    indices = rng.integers(0, n, size=k)  # duplicates are likely for small n
    # step sizes from tiny to huge, so some arms are clipped and some are not
    alpha_h = rng.exponential(1.0, size=k) * draw(st.sampled_from([1e-3, 0.3, 3.0, 50.0]))
    return p, p_min, indices, alpha_h


@pytest.mark.slow  # 200 hypothesis examples
@settings(max_examples=200, deadline=None)
@given(projection_cases())
def test_matches_brute_force_projection(case):
    p, p_min, indices, alpha_h = case
    distinct, first = np.unique(indices, return_index=True)
    is_arm = np.zeros(len(indices), bool)
    is_arm[first] = True
    # every copy of one arm carries the arm's summed step (as the sampler computes it)
    total_step = {j: alpha_h[indices == j].sum() for j in distinct}

    # the float32 inputs the function sees, and the exact float64 answer for those inputs
    log_w_sampled = np.array([np.log(p[j]) - total_step[j] for j in indices], np.float32)
    w_full = p.copy()
    w_full[indices] = np.exp(log_w_sampled.astype(np.float64))
    expected, expected_z = brute_force_projection(w_full, p_min)

    unsampled = np.setdiff1d(np.arange(len(p)), distinct)
    rest = np.float32(p[unsampled].sum())  # exactly 0 when every arm was drawn
    result = project_onto_floored_simplex(
        jnp.asarray(log_w_sampled), jnp.asarray(is_arm), jnp.asarray(rest), p_min
    )
    # relative error of Z <= 1e-5, plus the float32 spacing of log Z itself (which matters
    # only when every arm was sampled and all weights are astronomically small)
    log_z = float(result.log_normalizer)
    assert abs(log_z - np.log(expected_z)) <= 1e-5 + 3e-7 * abs(np.log(expected_z))
    z = np.exp(log_z)
    projected = p / z
    projected[distinct] = np.maximum(p_min, w_full[distinct] / z)
    if abs(np.log(expected_z)) < 10:  # realistic scales: the projection itself to 1e-5
        np.testing.assert_allclose(projected, expected, rtol=1e-5)
    np.testing.assert_allclose(projected.sum(), 1.0, rtol=1e-5 + 3e-7 * abs(np.log(expected_z)))
    strictly_clipped = np.sum(w_full[distinct] < p_min * expected_z * (1 - 1e-4))
    at_floor = np.sum(w_full[distinct] <= p_min * expected_z * (1 + 1e-4))
    # ties at the floor (within rounding) may be counted either way
    assert strictly_clipped <= int(result.num_clipped) <= at_floor


def test_no_clipping_is_plain_renormalization():
    p = np.full(10, 0.1)
    w = np.array([0.05, 0.08])
    result = project_onto_floored_simplex(
        jnp.log(jnp.asarray(w, jnp.float32)), jnp.array([True, True]), jnp.float32(0.8), 0.001
    )
    np.testing.assert_allclose(np.exp(float(result.log_normalizer)), 0.8 + 0.13, rtol=1e-6)
    assert int(result.num_clipped) == 0
    del p


def test_all_arms_sampled_and_floor_forces_uniform():
    # p_min * n = 1: the only feasible distribution is uniform
    n = 4
    w = jnp.array([0.25, 1e-9, 0.2, 0.01], jnp.float32)
    result = project_onto_floored_simplex(jnp.log(w), jnp.ones(n, bool), jnp.float32(0.0), 1.0 / n)
    z = np.exp(float(result.log_normalizer))
    projected = np.maximum(1.0 / n, np.asarray(w) / z)
    np.testing.assert_allclose(projected, np.full(n, 1.0 / n), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-30, 0, width=32), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.floats(0.0, 0.9),
    st.sampled_from([1e-4, 0.01, 0.05]),
)
def test_rank_candidates_agree_with_the_sorted_ones(log_w, arm_flags, rest, p_min):
    """The sort-free path (K x K ranks) picks the same k and, up to rounding, the same Z as
    the sorted path used above ``SORT_FREE_MAX_ARMS`` entries; ties in w included."""
    from adambs_jax.samplers import _projection as projection

    log_w = np.array(log_w + log_w[:2], np.float32)  # some exact ties
    is_arm = jnp.asarray(np.array(arm_flags + [True, False])[: len(log_w)])
    weights = jnp.exp(jnp.asarray(log_w) - float(np.max(log_w)))
    num_arms = jnp.sum(is_arm)
    rest = jnp.float32(rest)
    z_s, v_s, k_s = projection._candidates_sorted(weights, is_arm, num_arms, rest, p_min)
    z_r, v_r, k_r = projection._candidates_by_rank(weights, is_arm, num_arms, rest, p_min)

    def pick(z, v, k):
        best = jnp.argmin(jnp.where(v == jnp.min(v), k, len(log_w) + 2))
        return float(z[best]), int(k[best])

    (zs, ks), (zr, kr) = pick(z_s, v_s, k_s), pick(z_r, v_r, k_r)
    assert ks == kr
    np.testing.assert_allclose(zr, zs, rtol=1e-5)
