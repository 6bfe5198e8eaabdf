"""Tests of adambs_jax.sumtree: layout, exact sums, order independence, drawing, for every
arity the samplers use."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adambs_jax.samplers import _sumtree as sumtree

ARITIES = (2, 4, 32)
# the property tests and the long scan: arity 4 in the fast tier, 2 and 32 slow
SLOW_BUT_4 = [a if a == 4 else pytest.param(a, marks=pytest.mark.slow) for a in ARITIES]


def assert_parents_are_sums(tree, layout):
    """Every node of every level is bitwise the fixed-order sum of its B children."""
    tree = np.asarray(tree)
    for level in range(layout.depth):
        parents = tree[layout.offsets[level] : layout.offsets[level] + layout.sizes[level]]
        children = tree[
            layout.offsets[level + 1] : layout.offsets[level + 1] + layout.sizes[level + 1]
        ]
        sums = np.asarray(sumtree.sum_children(jnp.asarray(children.reshape(-1, layout.arity))))
        np.testing.assert_array_equal(parents[: sums.shape[0]], sums)
        np.testing.assert_array_equal(parents[sums.shape[0] :], 0)


@pytest.mark.parametrize("arity", ARITIES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 33, 1000, 1025])
def test_layout_levels_are_padded_to_the_arity_not_to_a_power(n, arity):
    layout = sumtree.layout_for(n, arity)
    assert layout.sizes[0] == 1 and layout.sizes[-1] >= n
    assert all(size % arity == 0 for size in layout.sizes[1:])
    for parent_size, child_size in zip(layout.sizes[1:-1], layout.sizes[2:]):
        assert parent_size * arity >= child_size  # every child slot has a parent
    assert layout.size == sum(layout.sizes) < n * arity / (arity - 1) + arity * (layout.depth + 1)
    assert layout.offsets == tuple(np.cumsum((0,) + layout.sizes[:-1]))


def test_layout_rejects_bad_arguments_and_trees_beyond_int32():
    with pytest.raises(ValueError, match="num_leaves"):
        sumtree.layout_for(0)
    with pytest.raises(ValueError, match="arity"):
        sumtree.layout_for(10, 3)
    with pytest.raises(ValueError, match="num_examples=1073741825.*larger arity"):
        sumtree.layout_for(2**30 + 1, 2)
    assert sumtree.layout_for(10**9, 32).size < 2**31  # n = 10^9 fits with a wide tree
    for arity in (2, 32):  # the limit the message names is exact
        largest = sumtree.max_leaves(arity)
        assert sumtree.layout_for(largest, arity).size <= sumtree.MAX_TREE_SIZE
        with pytest.raises(ValueError, match=f"at most {largest} examples with arity {arity}"):
            sumtree.layout_for(largest + 1, arity)
    assert sumtree.max_leaves(2) == 2**30


@pytest.mark.parametrize("arity", ARITIES)
@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0, 1e3, width=32, allow_subnormal=False), min_size=1, max_size=70))
def test_build_sums_and_padding(arity, weights):
    weights = np.asarray(weights, np.float32)
    layout = sumtree.layout_for(len(weights), arity)
    tree = sumtree.build(jnp.asarray(weights), layout)
    assert tree.shape == (layout.size,)
    assert_parents_are_sums(tree, layout)
    np.testing.assert_array_equal(sumtree.leaf_values(tree, layout), weights)
    np.testing.assert_array_equal(np.asarray(tree)[layout.offsets[-1] + len(weights) :], 0)
    np.testing.assert_allclose(float(sumtree.total(tree)), weights.sum(dtype=np.float64), rtol=1e-5)


def test_build_rejects_bad_shape():
    with pytest.raises(ValueError, match="weights"):
        sumtree.build(jnp.ones((2, 3)), sumtree.layout_for(6))


class SetLeavesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_rebuild_bitwise(self):
        rng = np.random.default_rng(0)
        n = 37
        for arity in ARITIES:
            layout = sumtree.layout_for(n, arity)
            weights = rng.random(n).astype(np.float32)
            tree = sumtree.build(jnp.asarray(weights), layout)
            set_leaves = self.variant(
                lambda t, i, v, layout=layout: sumtree.set_leaves(t, i, v, layout)
            )
            for _ in range(10):
                idx = rng.integers(0, n, size=8)
                vals = rng.random(8).astype(np.float32)
                tree = set_leaves(tree, jnp.asarray(idx), jnp.asarray(vals))
                for i, v in zip(idx, vals):  # numpy sequential semantics: last write wins
                    weights[i] = v
                # recomputing parents from children gives exactly what a fresh build gives
                rebuilt = sumtree.build(jnp.asarray(weights), layout)
                np.testing.assert_array_equal(np.asarray(tree), np.asarray(rebuilt))

    def test_duplicates_are_order_independent(self):
        n = 16
        for arity in ARITIES:
            layout = sumtree.layout_for(n, arity)
            tree = sumtree.build(jnp.ones(n), layout)
            idx = jnp.array([3, 3, 5, 3, 5, 9])
            vals = jnp.array([2.0, 2.0, 7.0, 2.0, 7.0, 0.5])
            reference = sumtree.set_leaves(tree, idx, vals, layout)
            for seed in range(5):
                perm = np.random.default_rng(seed).permutation(6)
                permuted = sumtree.set_leaves(tree, idx[perm], vals[perm], layout)
                np.testing.assert_array_equal(np.asarray(permuted), np.asarray(reference))
            assert_parents_are_sums(reference, layout)

    def test_last_duplicate_wins(self):
        layout = sumtree.layout_for(4)
        tree = sumtree.build(jnp.ones(4), layout)
        tree = sumtree.set_leaves(tree, jnp.array([1, 1, 1]), jnp.array([5.0, 6.0, 7.0]), layout)
        np.testing.assert_array_equal(sumtree.leaf_values(tree, layout), [1, 7, 1, 1])

    def test_rejects_mismatched_shapes(self):
        layout = sumtree.layout_for(4)
        tree = sumtree.build(jnp.ones(4), layout)
        with self.assertRaisesRegex(ValueError, "indices and values"):
            sumtree.set_leaves(tree, jnp.array([0, 1]), jnp.array([1.0]), layout)
        with self.assertRaisesRegex(ValueError, "tree must have shape"):
            sumtree.set_leaves(tree[:-1], jnp.array([0]), jnp.array([1.0]), layout)


@pytest.mark.parametrize("arity", SLOW_BUT_4)
def test_many_updates_keep_exact_sums(arity):
    n = 1000
    layout = sumtree.layout_for(n, arity)
    tree = sumtree.build(jnp.full((n,), 1.0 / n), layout)

    def body(tree, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (64,), 0, n)
        vals = jax.random.uniform(k2, (64,), minval=1e-6, maxval=1e-2)
        return sumtree.set_leaves(tree, idx, vals, layout), None

    tree, _ = jax.jit(lambda t, ks: jax.lax.scan(body, t, ks))(
        tree, jax.random.split(jax.random.PRNGKey(0), 10_000)
    )
    assert_parents_are_sums(tree, layout)
    leaves = np.asarray(sumtree.leaf_values(tree, layout), np.float64)
    np.testing.assert_allclose(float(sumtree.total(tree)), leaves.sum(), rtol=1e-5)


@pytest.mark.parametrize("arity", SLOW_BUT_4)
@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0, 100, width=32, allow_subnormal=False), min_size=1, max_size=40).filter(
        lambda w: sum(w) > 0
    ),
    st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=16),
)
def test_draw_finds_the_prefix_interval(arity, weights, uniforms):
    weights = np.asarray(weights, np.float32)
    layout = sumtree.layout_for(len(weights), arity)
    tree = sumtree.build(jnp.asarray(weights), layout)
    targets = jnp.asarray(uniforms, jnp.float32) * sumtree.total(tree)
    drawn = np.asarray(sumtree.draw(tree, targets, layout))
    assert np.all(weights[drawn] > 0), "a zero-weight leaf was drawn"
    prefix = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    scale = prefix[-1]
    for t, j in zip(np.asarray(targets, np.float64), drawn):
        # prefix(j) <= t < prefix(j+1), up to float32 rounding of the partial sums
        assert prefix[j] - 1e-5 * scale <= t <= prefix[j + 1] + 1e-5 * scale


@pytest.mark.parametrize("arity", ARITIES)
def test_draw_never_returns_padding_or_zero_leaves_at_the_edges(arity):
    weights = jnp.array([0.0, 1.0, 0.0, 2.0, 0.0])  # padded levels: zero leaves and nodes
    layout = sumtree.layout_for(5, arity)
    tree = sumtree.build(weights, layout)
    root = sumtree.total(tree)
    edge_targets = jnp.array([0.0, root, jnp.nextafter(root, 2 * root), 1e30, 0.99999 * root])
    drawn = np.asarray(sumtree.draw(tree, edge_targets, layout))
    assert set(drawn.tolist()) <= {1, 3}


def test_default_arity_by_backend():
    assert sumtree.default_arity("gpu") == sumtree.default_arity("tpu") == 32
    assert sumtree.default_arity("cpu") in (4, 8, 16)  # measured: docs/performance.md


def test_stratified_targets_cover_each_slice_once():
    u = jnp.array([0.0, 0.5, 0.999])
    targets = np.asarray(sumtree.uniforms_to_targets(u, jnp.float32(6.0), stratified=True))
    np.testing.assert_allclose(targets, [0.0, 3.0, 5.998], rtol=1e-6)
    for k, t in enumerate(targets):
        assert 2.0 * k <= t < 2.0 * (k + 1)


def test_check_state_tree_names_the_shapes_and_arities():
    layout = sumtree.layout_for(10, 4)
    sumtree.check_state_tree(jnp.zeros(layout.size), 4, layout)  # fits: no error
    with pytest.raises(
        ValueError,
        match=r"state: tree of shape \(3,\) with arity 4, but this "
        r"sampler has a tree of shape",
    ):
        sumtree.check_state_tree(jnp.zeros(3), 4, layout)
    with pytest.raises(ValueError, match="with arity 2, but my sampler"):
        sumtree.check_state_tree(jnp.zeros(layout.size), 2, layout, owner="my sampler")


@pytest.mark.parametrize("arity", (2, 4, 8, 16, 32, 64))
def test_inclusive_prefix_sums_add_left_to_right(arity):
    """The descent's prefix sums: for B <= 16 bitwise numpy's sequential float32 cumsum
    (XLA's CPU cumsum is sequential too, so draws did not change when it was replaced)."""
    rng = np.random.default_rng(arity)
    children = rng.random((64, arity)) * 10.0 ** rng.uniform(-20, 20, (64, arity))
    children = children.astype(np.float32)
    got = np.asarray(jax.jit(sumtree._inclusive_prefix_sums)(jnp.asarray(children)))
    if arity <= 16:
        np.testing.assert_array_equal(got, np.cumsum(children, axis=1, dtype=np.float32))
    else:
        np.testing.assert_allclose(got, np.cumsum(children.astype(np.float64), axis=1), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=12))
def test_dedupe_last_with_keep_takes_the_last_kept_copy(entries):
    """Every copy of index j gets the value of j's last copy with keep True, or of its last
    copy if none is kept; the indices come back sorted, each copy once."""
    indices = np.array([j for j, _ in entries], np.int32)
    keep = np.array([k for _, k in entries])
    values = np.arange(len(entries), dtype=np.float32)
    got_idx, got_val = sumtree.dedupe_last(
        jnp.asarray(indices), jnp.asarray(values), keep=jnp.asarray(keep)
    )
    winner = {}
    for position, (j, kept) in enumerate(entries):
        if kept or not any(k for i, k in entries if i == j):
            winner[j] = position  # the later one overwrites: the last (kept) copy
    np.testing.assert_array_equal(np.asarray(got_idx), np.sort(indices))
    np.testing.assert_array_equal(np.asarray(got_val), [winner[j] for j in np.sort(indices)])


@pytest.mark.parametrize("arity", SLOW_BUT_4)
@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1e3, width=32)), min_size=1, max_size=16),
    st.randoms(use_true_random=False),
)
def test_set_leaves_with_agreeing_duplicates_is_bitwise_the_sorted_write(arity, entries, rnd):
    """``duplicates_agree=True`` (copies already carry one value, in any order) writes the
    same tree, bit for bit, as the default, which sorts and deduplicates first."""
    layout = sumtree.layout_for(41, arity)
    tree = sumtree.build(jnp.asarray(np.linspace(0.5, 2.0, 41, dtype=np.float32)), layout)
    indices = jnp.asarray([j for j, _ in entries], jnp.int32)
    values = jnp.asarray([v for _, v in entries], jnp.float32)
    reference = sumtree.set_leaves(tree, indices, values, layout)
    agreed_idx, agreed_val = sumtree.dedupe_last(indices, values)
    order = list(range(len(entries)))
    rnd.shuffle(order)
    got = sumtree.set_leaves(
        tree,
        agreed_idx[jnp.asarray(order)],
        agreed_val[jnp.asarray(order)],
        layout,
        duplicates_agree=True,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reference))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=20))
def test_first_copies_names_each_index_by_its_first_position(values):
    """Both paths (K x K compares, and the sort above ``SORT_FREE_MAX_BATCH``) give every
    copy the position of the index's first occurrence, in argument order."""
    indices = np.array(values, np.int32)
    expected = [values.index(v) for v in values]
    np.testing.assert_array_equal(sumtree.first_copies(jnp.asarray(indices)), expected)
    padded = np.concatenate([indices, 100 + np.arange(sumtree.SORT_FREE_MAX_BATCH)])
    got = np.asarray(sumtree.first_copies(jnp.asarray(padded, jnp.int32)))
    np.testing.assert_array_equal(got[: len(values)], expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=12))
def test_last_copy_values_are_dedupe_last_in_argument_order(entries):
    """The sort-free values (and the sorted path for large K) equal ``dedupe_last``'s,
    returned in argument order: each copy carries its index's winner."""
    indices = jnp.asarray([j for j, _ in entries], jnp.int32)
    keep = jnp.asarray([k for _, k in entries])
    values = jnp.arange(len(entries), dtype=jnp.float32)
    for kept in (None, keep):
        sorted_idx, sorted_val = sumtree.dedupe_last(indices, values, keep=kept)
        winner = dict(zip(np.asarray(sorted_idx).tolist(), np.asarray(sorted_val).tolist()))
        got = sumtree.last_copy_values(indices, values, keep=kept)
        np.testing.assert_array_equal(got, [winner[j] for j in np.asarray(indices)])
        extra = sumtree.SORT_FREE_MAX_BATCH
        big_idx = jnp.concatenate([indices, 100 + jnp.arange(extra, dtype=jnp.int32)])
        big_val = jnp.concatenate([values, jnp.zeros(extra, jnp.float32)])
        big_keep = None if kept is None else jnp.concatenate([kept, jnp.ones(extra, bool)])
        got = sumtree.last_copy_values(big_idx, big_val, keep=big_keep)[: len(entries)]
        np.testing.assert_array_equal(got, [winner[j] for j in np.asarray(indices)])


@pytest.mark.parametrize("arity", (2, 16, 64))
def test_children_gathers_contiguous_rows(arity):
    layout = sumtree.layout_for(1000, arity)
    tree = jnp.arange(layout.size, dtype=jnp.float32)
    parents = jnp.array([0, 3, 1, 3], jnp.int32)
    got = sumtree._children(tree, layout, layout.depth, parents)
    first = layout.offsets[layout.depth] + arity * np.asarray(parents)
    np.testing.assert_array_equal(got, first[:, None] + np.arange(arity))
