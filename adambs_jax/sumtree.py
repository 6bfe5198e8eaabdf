"""A jittable prefix-sum (segment) tree over nonnegative weights, as a flat array.

Layout (a binary heap): ``tree`` has length ``2 * capacity`` where ``capacity`` is the
smallest power of two >= the number of leaves ``n``. Index 1 is the root, node ``i`` has
children ``2 i`` and ``2 i + 1``, leaf ``j`` lives at ``capacity + j``; index 0 and the
padding leaves ``n .. capacity - 1`` hold 0, so they are never drawn.

Costs: ``build`` O(n); ``total`` O(1); ``draw`` O(K log n); ``set_leaves`` O(K log K + K log n).

Numerics. Unlike delta-update trees (flashbax's float32 sum tree drifts, its issue #52), every
parent touched by ``set_leaves`` is recomputed as ``left + right`` from its two children, so
each internal node is always exactly the floating-point sum of its children, however many
updates are applied. Duplicate indices in one call are aggregated before writing so the
result never depends on XLA's scatter order.

These are the data structure of Namkoong et al. (ICML 2017) and AdamBS (Liu et al., NeurIPS
2020, §4.2: "a segment tree ... to update p in O(K log n)").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "capacity_for",
    "depth_for",
    "build",
    "total",
    "leaf_values",
    "get_leaves",
    "set_leaves",
    "draw",
    "uniforms_to_targets",
]


def capacity_for(num_leaves: int) -> int:
    """Smallest power of two >= ``num_leaves`` (the number of leaf slots)."""
    if num_leaves < 1:
        raise ValueError(f"num_leaves must be >= 1, got {num_leaves}")
    return 1 << (int(num_leaves) - 1).bit_length()


def depth_for(num_leaves: int) -> int:
    """Number of edges from the root to a leaf, log2(capacity)."""
    return capacity_for(num_leaves).bit_length() - 1


def _capacity_of(tree: jax.Array) -> int:
    size = tree.shape[0]
    if tree.ndim != 1 or size < 2 or size & (size - 1):
        raise ValueError(f"tree must be a flat array of length 2 * 2^d, got shape {tree.shape}")
    return size // 2


def build(weights: jax.Array) -> jax.Array:
    """Builds the tree from ``weights`` (n,) >= 0 in O(n). Returns (2 * capacity,)."""
    weights = jnp.asarray(weights)
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(f"weights must have shape (n,) with n >= 1, got {weights.shape}")
    n = weights.shape[0]
    capacity = capacity_for(n)
    level = jnp.zeros((capacity,), weights.dtype).at[:n].set(weights)
    levels = [level]
    while level.shape[0] > 1:
        level = level[0::2] + level[1::2]  # parents are exactly left + right, as in set_leaves
        levels.append(level)
    # heap order: [unused 0, root, level 1, ..., leaves]
    return jnp.concatenate([jnp.zeros((1,), weights.dtype)] + levels[::-1])


def total(tree: jax.Array) -> jax.Array:
    """The root: sum of all leaves."""
    return tree[1]


def leaf_values(tree: jax.Array, num_leaves: int) -> jax.Array:
    """All n leaf values, (n,). O(n); for tests, plots and rescaling."""
    capacity = _capacity_of(tree)
    return tree[capacity : capacity + num_leaves]


def get_leaves(tree: jax.Array, indices: jax.Array) -> jax.Array:
    """Leaf values at ``indices`` (K,)."""
    return tree[_capacity_of(tree) + indices]


def _dedupe_last(indices: jax.Array, values: jax.Array):
    """Sorts by index and gives every copy of a duplicated index the value of its last
    occurrence in argument order (numpy's sequential-assignment semantics), so that all
    scatter writes to one location are equal and the scatter order cannot matter."""
    k = indices.shape[0]
    order = jnp.argsort(indices, stable=True)
    sorted_idx = indices[order]
    sorted_val = values[order]
    # position of the last element of each run of equal indices
    is_last = jnp.concatenate([sorted_idx[1:] != sorted_idx[:-1], jnp.array([True])])
    last_pos = jnp.where(is_last, jnp.arange(k), k)
    # reverse cumulative min gives, for each position, the end of its run
    run_end = jax.lax.cummin(last_pos, reverse=True)
    return sorted_idx, sorted_val[run_end]


def set_leaves(tree: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
    """Sets leaves ``indices`` (K,) to ``values`` (K,) and recomputes their ancestors.

    Duplicated indices take the value of their last occurrence. O(K log K + K log n).
    """
    capacity = _capacity_of(tree)
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError(
            f"indices and values must both have shape (K,), got {indices.shape} and {values.shape}"
        )
    indices, values = _dedupe_last(indices, values.astype(tree.dtype))
    node = capacity + indices
    tree = tree.at[node].set(values)
    for _ in range(capacity.bit_length() - 1):  # one pass per tree level, not per example
        node = node // 2
        # every copy of a duplicated parent writes the same value: order-independent
        tree = tree.at[node].set(tree[2 * node] + tree[2 * node + 1])
    return tree


def uniforms_to_targets(
    uniforms: jax.Array, root: jax.Array, *, stratified: bool
) -> jax.Array:
    """Maps uniforms in [0, 1) (K,) to prefix-sum targets in [0, root).

    i.i.d.: target_k = u_k * root. Stratified: target_k = (k + u_k) / K * root, one draw in
    each of K equal slices of the mass (still marginally distributed as p; lower variance).
    """
    k = uniforms.shape[0]
    if stratified:
        uniforms = (jnp.arange(k, dtype=uniforms.dtype) + uniforms) / k
    return uniforms * root


def draw(tree: jax.Array, targets: jax.Array) -> jax.Array:
    """Finds for each target t the leaf j with prefix(j) <= t < prefix(j) + leaf_j.

    Descends the tree once per level, vectorized over the K targets: O(K log n). A leaf
    with weight 0 (padding or a zero-weight example) is never returned, even when rounding
    puts a target at or past the end of the mass: at each node we only step into a child
    whose subtree has positive weight. Requires total(tree) > 0.

    Returns int32 leaf indices (K,).
    """
    capacity = _capacity_of(tree)
    node = jnp.ones(targets.shape, jnp.int32)
    target = targets.astype(tree.dtype)
    for _ in range(capacity.bit_length() - 1):
        left = tree[2 * node]
        right = tree[2 * node + 1]
        go_right = (target >= left) & (right > 0)
        target = jnp.where(go_right, target - left, target)
        node = 2 * node + go_right.astype(jnp.int32)
    return node - capacity
