"""Tests of adambs_jax.sumtree: structure, exact sums, order independence, drawing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adambs_jax import sumtree


def assert_parents_are_sums(tree):
    tree = np.asarray(tree)
    capacity = tree.shape[0] // 2
    parents = np.arange(1, capacity)
    # exact equality: every parent is the float32 sum of its two children
    np.testing.assert_array_equal(tree[parents], tree[2 * parents] + tree[2 * parents + 1])


@pytest.mark.parametrize("n,capacity", [(1, 1), (2, 2), (3, 4), (7, 8), (8, 8), (1000, 1024)])
def test_capacity_is_next_power_of_two(n, capacity):
    assert sumtree.capacity_for(n) == capacity
    assert sumtree.depth_for(n) == capacity.bit_length() - 1


def test_capacity_rejects_empty():
    with pytest.raises(ValueError, match="num_leaves"):
        sumtree.capacity_for(0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1e3, width=32, allow_subnormal=False), min_size=1, max_size=70))
def test_build_sums_and_padding(weights):
    weights = np.asarray(weights, np.float32)
    tree = sumtree.build(jnp.asarray(weights))
    capacity = sumtree.capacity_for(len(weights))
    assert tree.shape == (2 * capacity,)
    assert_parents_are_sums(tree)
    np.testing.assert_array_equal(sumtree.leaf_values(tree, len(weights)), weights)
    np.testing.assert_array_equal(np.asarray(tree)[capacity + len(weights) :], 0)
    np.testing.assert_allclose(float(sumtree.total(tree)), weights.sum(dtype=np.float64), rtol=1e-5)


def test_build_rejects_bad_shape():
    with pytest.raises(ValueError, match="weights"):
        sumtree.build(jnp.ones((2, 3)))


class SetLeavesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_rebuild_bitwise(self):
        rng = np.random.default_rng(0)
        n = 37
        weights = rng.random(n).astype(np.float32)
        tree = sumtree.build(jnp.asarray(weights))
        set_leaves = self.variant(sumtree.set_leaves)
        for _ in range(20):
            idx = rng.integers(0, n, size=8)
            vals = rng.random(8).astype(np.float32)
            tree = set_leaves(tree, jnp.asarray(idx), jnp.asarray(vals))
            for i, v in zip(idx, vals):  # numpy sequential semantics: last write wins
                weights[i] = v
            # recomputing parents from children gives exactly what a fresh build gives
            np.testing.assert_array_equal(np.asarray(tree), np.asarray(sumtree.build(weights)))

    def test_duplicates_are_order_independent(self):
        n = 16
        tree = sumtree.build(jnp.ones(n))
        idx = jnp.array([3, 3, 5, 3, 5, 9])
        vals = jnp.array([2.0, 2.0, 7.0, 2.0, 7.0, 0.5])
        reference = sumtree.set_leaves(tree, idx, vals)
        for seed in range(10):
            perm = np.random.default_rng(seed).permutation(6)
            permuted = sumtree.set_leaves(tree, idx[perm], vals[perm])
            np.testing.assert_array_equal(np.asarray(permuted), np.asarray(reference))
        assert_parents_are_sums(reference)

    def test_last_duplicate_wins(self):
        tree = sumtree.build(jnp.ones(4))
        tree = sumtree.set_leaves(tree, jnp.array([1, 1, 1]), jnp.array([5.0, 6.0, 7.0]))
        np.testing.assert_array_equal(sumtree.leaf_values(tree, 4), [1, 7, 1, 1])

    def test_rejects_mismatched_shapes(self):
        tree = sumtree.build(jnp.ones(4))
        with self.assertRaisesRegex(ValueError, "indices and values"):
            sumtree.set_leaves(tree, jnp.array([0, 1]), jnp.array([1.0]))


def test_many_updates_keep_exact_sums():
    n = 1000
    tree = sumtree.build(jnp.full((n,), 1.0 / n))

    def body(tree, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (64,), 0, n)
        vals = jax.random.uniform(k2, (64,), minval=1e-6, maxval=1e-2)
        return sumtree.set_leaves(tree, idx, vals), None

    tree, _ = jax.jit(lambda t, ks: jax.lax.scan(body, t, ks))(
        tree, jax.random.split(jax.random.PRNGKey(0), 20_000)
    )
    assert_parents_are_sums(tree)
    leaves = np.asarray(sumtree.leaf_values(tree, n), np.float64)
    np.testing.assert_allclose(float(sumtree.total(tree)), leaves.sum(), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 100, width=32, allow_subnormal=False), min_size=1, max_size=40).filter(lambda w: sum(w) > 0),
    st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=16),
)
def test_draw_finds_the_prefix_interval(weights, uniforms):
    weights = np.asarray(weights, np.float32)
    tree = sumtree.build(jnp.asarray(weights))
    targets = jnp.asarray(uniforms, jnp.float32) * sumtree.total(tree)
    drawn = np.asarray(sumtree.draw(tree, targets))
    assert np.all(weights[drawn] > 0), "a zero-weight leaf was drawn"
    prefix = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    scale = prefix[-1]
    for t, j in zip(np.asarray(targets, np.float64), drawn):
        # prefix(j) <= t < prefix(j+1), up to float32 rounding of the partial sums
        assert prefix[j] - 1e-5 * scale <= t <= prefix[j + 1] + 1e-5 * scale


def test_draw_never_returns_padding_or_zero_leaves_at_the_edges():
    weights = jnp.array([0.0, 1.0, 0.0, 2.0, 0.0])  # capacity 8: three padding leaves
    tree = sumtree.build(weights)
    root = sumtree.total(tree)
    edge_targets = jnp.array([0.0, root, jnp.nextafter(root, 2 * root), 1e30, 0.99999 * root])
    drawn = np.asarray(sumtree.draw(tree, edge_targets))
    assert set(drawn.tolist()) <= {1, 3}


def test_stratified_targets_cover_each_slice_once():
    u = jnp.array([0.0, 0.5, 0.999])
    targets = np.asarray(sumtree.uniforms_to_targets(u, jnp.float32(6.0), stratified=True))
    np.testing.assert_allclose(targets, [0.0, 3.0, 5.998], rtol=1e-6)
    for k, t in enumerate(targets):
        assert 2.0 * k <= t < 2.0 * (k + 1)
