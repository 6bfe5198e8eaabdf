"""Tests of adambs_jax.exp3_bound: step 2 of AdamBS Algorithm 2, the bound L (fixed,
running max, running quantile) and the clipped share of the feedback."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax.samplers import _exp3 as exp3_bound


def test_clip_to_bound_running_max_and_fixed_bound():
    f = jnp.array([0.5, 4.0, 1.0])
    bound, ratio = exp3_bound.clip_to_bound(f, jnp.float32(2.0), adaptive=True)
    assert float(bound) == 4.0
    np.testing.assert_allclose(ratio, [0.125, 1.0, 0.25], rtol=1e-7)
    bound, ratio = exp3_bound.clip_to_bound(f, jnp.float32(2.0), adaptive=False)
    assert float(bound) == 2.0
    np.testing.assert_allclose(ratio, [0.25, 1.0, 0.5], rtol=1e-7)  # min(f, L) / L
    bound, ratio = exp3_bound.clip_to_bound(jnp.zeros(3), jnp.float32(0.0), adaptive=True)
    assert float(bound) == 0.0 and np.all(np.asarray(ratio) == 0)  # L = 0: the maximum loss


def test_quantile_bound_starts_at_the_first_batch_quantile_of_valid_feedback():
    f = jnp.array([5.0, 1.0, 2.0, 3.0, 4.0, 0.0, 7.0, 8.0, 9.0, 10.0])
    valid = jnp.arange(10) != 6  # 7.0 is dropped
    bound = exp3_bound.quantile_bound(f, valid, jnp.float32(0.0), quantile=0.5, learning_rate=0.1)
    assert float(bound) == 4.0  # nearest rank: ceil(0.5 * 9) = 5th of 0,1,2,3,4,5,8,9,10
    none = exp3_bound.quantile_bound(
        f, jnp.zeros(10, bool), jnp.float32(2.0), quantile=0.5, learning_rate=0.1
    )
    assert float(none) == 2.0  # no valid feedback: L unchanged


def test_one_outlier_moves_the_quantile_bound_by_at_most_the_learning_rate():
    f = jnp.array([1.0, 1.0, 1.0, 1e30])
    for valid, moved in [(jnp.ones(4, bool), 0.25 - 0.1), (jnp.array([0, 0, 0, 1], bool), 0.9)]:
        bound = exp3_bound.quantile_bound(
            f, valid, jnp.float32(2.0), quantile=0.9, learning_rate=0.1
        )
        assert math.log(float(bound) / 2.0) == pytest.approx(0.1 * moved, rel=1e-5)
    # log L is kept where float32 stays normal, whatever the feedback
    huge = exp3_bound.quantile_bound(
        jnp.full(4, 3e38), jnp.ones(4, bool), jnp.float32(3e34), quantile=0.9, learning_rate=10.0
    )
    assert float(huge) == pytest.approx(math.exp(80.0), rel=1e-5)


def test_quantile_bound_converges_on_fixed_feedback():
    rng = np.random.default_rng(0)
    population = jnp.asarray(rng.lognormal(size=5000).astype(np.float32))
    target = float(np.quantile(np.asarray(population), 0.9))

    def body(bound, key):
        batch = jax.random.choice(key, population, (64,))
        return exp3_bound.quantile_bound(
            batch, jnp.ones(64, bool), bound, quantile=0.9, learning_rate=0.02
        ), None

    for start in (0.0, 100 * target, target / 100):  # first batch, far above, far below
        bound, _ = jax.jit(
            lambda b: jax.lax.scan(body, b, jax.random.split(jax.random.key(1), 6000))
        )(jnp.float32(start))
        assert float(bound) == pytest.approx(target, rel=0.1)


def test_clipped_fraction_counts_valid_feedback_above_the_bound():
    f = jnp.array([0.5, 2.0, 3.0, jnp.nan, -1.0, 1.0])
    assert float(exp3_bound.clipped_fraction(f, 1.0)) == pytest.approx(2 / 4)
    assert float(exp3_bound.clipped_fraction(jnp.full(3, jnp.nan), 1.0)) == 0.0


@pytest.mark.parametrize("size", (9, 300))
def test_order_statistic_is_the_sorted_valid_entry(size):
    """Sort-free (K <= 256) and sorted (above) paths: the rank-th smallest valid entry, ties
    included, inf past the number of valid entries."""
    rng = np.random.default_rng(size)
    values = jnp.asarray(rng.integers(0, 5, size).astype(np.float32))  # many ties
    valid = jnp.asarray(rng.uniform(size=size) > 0.3)
    ordered = np.sort(np.where(np.asarray(valid), np.asarray(values), np.inf))
    for rank in (0, 1, size // 2, int(np.sum(valid)) - 1, size - 1):
        got = exp3_bound.order_statistic(values, valid, jnp.int32(rank))
        assert float(got) == float(ordered[rank])
