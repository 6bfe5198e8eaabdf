"""A jittable B-ary prefix-sum (segment) tree over nonnegative weights, as one flat array.

Layout. The tree has ``depth`` levels below the root; level ``l`` holds ``sizes[l]`` nodes
(a multiple of the arity B, except the root level of size 1) and starts at ``offsets[l]``
in the flat array; level ``depth`` holds the leaves, leaf j at ``offsets[depth] + j``.
Node q of level l has the B children ``B q .. B q + B - 1`` of level l + 1. Levels are
padded with zeros to a multiple of B (never to B^depth), so the array has about
n B / (B - 1) entries for any n; zero nodes are never drawn.

Why B-ary: a draw or an update walks one path per level, and on an accelerator each level
is a few tiny kernels whose launch, not their arithmetic, is the cost (we measured
~40 binary levels at 80-120 µs per step on an H100). With B = 32 a tree over 10^8 leaves has
6 levels instead of 27; each level gathers B children per path (K x B values) and reduces
them. On a CPU the per-level cost is XLA's per-operation overhead plus the K x B gather;
B = 4 .. 16 are about equally fast there and B = 2 is slowest (docs/performance.md has the
measurements behind ``default_arity``).

Costs: ``build`` O(n); ``total`` O(1); ``draw`` O(K B log_B n); ``set_leaves``
O(K min(K, log K) + K B log_B n) (duplicates found by K x K compares up to
``SORT_FREE_MAX_BATCH``, by a sort above).

Numerics. Every parent touched by ``set_leaves`` is recomputed from its B children with
``sum_children``, a fixed pairwise order (((c0 + c1) + (c2 + c3)) + ...) that ``build``
uses too, so each internal node is always bitwise what a fresh build gives, however many
updates are applied (unlike delta-update trees: flashbax's float32 sum tree drifts, its
issue #52). Duplicate indices in one call are aggregated before writing so the result never
depends on XLA's scatter order.

Reference: the data structure of Namkoong et al. (ICML 2017) and AdamBS (Liu, Wu, Mozafari,
NeurIPS 2020, §4.2: "a segment tree ... to update p in O(K log n)").
"""

from __future__ import annotations

import functools
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_TREE_SIZE",
    "TreeLayout",
    "layout_for",
    "max_leaves",
    "default_arity",
    "build",
    "total",
    "leaf_values",
    "rebuilt_for_restore",
    "restored_tree",
    "get_leaves",
    "dedupe_last",
    "SORT_FREE_MAX_BATCH",
    "first_copies",
    "last_copy_values",
    "set_leaves",
    "sum_children",
    "draw",
    "uniforms_to_targets",
]

# a tree on the device or, in host-side checks, a host copy of it
_Tree = TypeVar("_Tree", jax.Array, np.ndarray)

MAX_TREE_SIZE = 2**31 - 1
"""Largest flat tree the int32 node indices address (about 2^31 (B - 1) / B leaves)."""

_SUPPORTED_ARITIES = (2, 4, 8, 16, 32, 64, 128)


class TreeLayout(NamedTuple):
    """The static shape of a tree (hashable; part of a compiled step, not of its data).

    Attributes:
      num_leaves: n.
      arity: B, the number of children of a node (a power of two).
      sizes: nodes per level, root level first (1, then multiples of B).
      offsets: start of each level in the flat array.
      size: length of the flat array.
    """

    num_leaves: int
    arity: int
    sizes: tuple
    offsets: tuple
    size: int

    @property
    def depth(self) -> int:
        """Levels below the root (edges on a root-to-leaf path)."""
        return len(self.sizes) - 1


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def layout_for(num_leaves: int, arity: int = 2) -> TreeLayout:
    """The layout of a tree over ``num_leaves`` leaves with ``arity`` children per node.

    Raises:
      ValueError: ``num_leaves`` < 1, ``arity`` not a power of two in [2, 128], or a tree
        too large for int32 node indices (naming both and the limit).
    """
    if isinstance(num_leaves, bool) or not isinstance(num_leaves, int) or num_leaves < 1:
        raise ValueError(f"num_leaves must be an int >= 1, got {num_leaves!r}")
    if arity not in _SUPPORTED_ARITIES:
        raise ValueError(f"arity must be one of {_SUPPORTED_ARITIES}, got {arity!r}")
    sizes = _level_sizes(num_leaves, arity)
    offsets, start = [], 0
    for level_size in sizes:
        offsets.append(start)
        start += level_size
    if start > MAX_TREE_SIZE:
        raise ValueError(
            f"num_examples={num_leaves} needs a tree of {start} nodes with arity {arity}, more "
            f"than int32 indices address ({MAX_TREE_SIZE}); at most {max_leaves(arity)} "
            f"examples with arity {arity}: use a larger arity"
        )
    return TreeLayout(num_leaves, arity, sizes, tuple(offsets), start)


def _level_sizes(num_leaves: int, arity: int) -> tuple:
    """Nodes per level, root first: leaves padded to a multiple of B, then their parents."""
    sizes = [_round_up(num_leaves, arity)]
    while sizes[-1] > arity:  # parents of level l + 1, padded to a multiple of B
        sizes.append(_round_up(sizes[-1] // arity, arity))
    sizes.append(1)  # the root, parent of the top B nodes
    return tuple(reversed(sizes))


@functools.cache
def max_leaves(arity: int) -> int:
    """The largest n whose tree with ``arity`` fits int32 node indices (bisection)."""
    low, high = 1, MAX_TREE_SIZE  # sum(sizes) > n, so n = MAX_TREE_SIZE never fits
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (
            (middle, high) if sum(_level_sizes(middle, arity)) <= MAX_TREE_SIZE else (low, middle)
        )
    return low


def default_arity(backend: str | None = None) -> int:
    """B by backend: 32 on GPU/TPU (few levels: each is a kernel launch), 16 on CPU (the
    lowest total of sample + update at n = 10^3 .. 10^7 in three runs on a 2-core CPU;
    4, 8 and 16 are within that machine's noise of each other, 2 is 1.5-4x slower:
    docs/performance.md, "Tree arity")."""
    backend = backend or jax.default_backend()
    return 16 if backend == "cpu" else 32


def sum_children(children: jax.Array) -> jax.Array:
    """Sum over the last axis (size B) in a fixed pairwise order: bitwise the same wherever
    it is computed, so ``build`` and ``set_leaves`` agree exactly."""
    while children.shape[-1] > 1:
        children = children[..., 0::2] + children[..., 1::2]
    return children[..., 0]


def _check_tree(tree: jax.Array | np.ndarray, layout: TreeLayout) -> None:
    if tree.shape != (layout.size,):
        raise ValueError(
            f"tree must have shape ({layout.size},) for {layout.num_leaves} leaves with arity "
            f"{layout.arity}, got {tree.shape}"
        )


def check_state_tree(tree, arity: int, layout: TreeLayout, *, owner: str = "this sampler") -> None:
    """ValueError unless a sampler state's ``tree`` and ``arity`` fit ``layout`` (a state
    built for another n or arity has another tree shape: one message for every tree sampler)."""
    if arity != layout.arity or tree.shape != (layout.size,):
        raise ValueError(
            f"state: tree of shape {tree.shape} with arity {arity}, but {owner} has a tree of "
            f"shape ({layout.size},) with arity {layout.arity}"
        )


def build(weights: jax.Array, layout: TreeLayout) -> jax.Array:
    """Builds the tree from ``weights`` (n,) >= 0 in O(n). Returns (layout.size,)."""
    weights = jnp.asarray(weights)
    if weights.shape != (layout.num_leaves,):
        raise ValueError(
            f"weights must have shape ({layout.num_leaves},) (one per leaf), got {weights.shape}"
        )
    level = jnp.zeros((layout.sizes[-1],), weights.dtype).at[: layout.num_leaves].set(weights)
    levels = [level]
    for size in reversed(layout.sizes[:-1]):
        parents = sum_children(level.reshape(-1, layout.arity))
        level = jnp.zeros((size,), weights.dtype).at[: parents.shape[0]].set(parents)
        levels.append(level)
    return jnp.concatenate(levels[::-1])


def total(tree: jax.Array) -> jax.Array:
    """The root: sum of all leaves."""
    return tree[0]


def leaf_values(tree: _Tree, layout: TreeLayout) -> _Tree:
    """All n leaf values, (n,). O(n); for tests, plots and renormalization."""
    _check_tree(tree, layout)
    start = layout.offsets[-1]
    return tree[start : start + layout.num_leaves]


def rebuilt_for_restore(weights: jax.Array, num_examples: int, arity: int, like_tree) -> jax.Array:
    """A tree of ``arity`` over ``weights`` (n,), placed like ``like_tree`` (the tree of the
    state a checkpoint is restored into, possibly abstract): what a sampler state's restore
    builds when the checkpoint's tree has another arity (GPU 32, CPU 16). O(n)."""
    tree = build(weights, layout_for(num_examples, arity))
    sharding = getattr(like_tree, "sharding", None)
    return tree if sharding is None else jax.device_put(tree, sharding)


def restored_tree(saved_tree, num_examples: int, saved_arity: int, arity: int, like_tree):
    """A tree read from a checkpoint (written with ``saved_arity``) as a tree of ``arity``
    placed like ``like_tree``: itself where the arities agree, else rebuilt from its leaves."""
    if saved_arity == arity:
        return saved_tree
    leaves = leaf_values(saved_tree, layout_for(num_examples, saved_arity))
    return rebuilt_for_restore(leaves, num_examples, arity, like_tree)


def get_leaves(tree: jax.Array, indices: jax.Array, layout: TreeLayout) -> jax.Array:
    """Leaf values at ``indices`` (K,)."""
    return tree[layout.offsets[-1] + indices]


def _children(tree: jax.Array, layout: TreeLayout, level: int, parents: jax.Array):
    """(K, B) values of the children (at ``level``) of nodes ``parents`` (K,): one gather of
    K contiguous rows of B (a row per parent, not K x B separately indexed elements; the
    rows are in range, as every level is padded to a multiple of B)."""
    first = layout.offsets[level] + layout.arity * parents
    return jax.vmap(lambda start: jax.lax.dynamic_slice(tree, (start,), (layout.arity,)))(first)


def dedupe_last(indices: jax.Array, values: jax.Array, keep: jax.Array | None = None):
    """Sorts by index and gives every copy of a duplicated index the value of its last
    occurrence in argument order (numpy's sequential-assignment semantics), so that all
    scatter writes to one location are equal and the scatter order cannot matter.

    With ``keep`` (bool or int, (K,)): of the copies with the largest ``keep``, the last one
    wins (one lexicographic sort by (index, keep), not a second sort)."""
    k = indices.shape[0]
    if keep is None:
        order = jnp.argsort(indices, stable=True)
    else:
        *_, order = jax.lax.sort(
            (indices, keep.astype(jnp.int32), jnp.arange(k)), num_keys=2, is_stable=True
        )
    sorted_idx = indices[order]
    sorted_val = values[order]
    is_last = jnp.concatenate([sorted_idx[1:] != sorted_idx[:-1], jnp.array([True])])
    last_pos = jnp.where(is_last, jnp.arange(k), k)
    run_end = jax.lax.cummin(last_pos, reverse=True)  # for each position, the end of its run
    return sorted_idx, sorted_val[run_end]


SORT_FREE_MAX_BATCH = 256
"""Up to this K, duplicates are found by comparing all K x K pairs (one fused compare and
reduction, a few µs for K = 128 on a CPU and one kernel on a GPU) instead of a sort of the
K indices (~12 µs for K = 128 on a CPU: XLA:CPU's sort calls its comparator through a
pointer); above it, by the O(K log K) sort, so the cost per step stays O(K log K)."""


def first_copies(indices: jax.Array) -> jax.Array:
    """int32 (K,): for each k, the position of the first occurrence of ``indices[k]``
    (first[k] == k exactly at the first copy of each distinct index). Equal for all copies
    of an index, so it names the index's group; no reordering. O(K^2) compares for
    K <= ``SORT_FREE_MAX_BATCH``, else one O(K log K) stable sort."""
    k = indices.shape[0]
    positions = jnp.arange(k, dtype=jnp.int32)
    if k <= SORT_FREE_MAX_BATCH:
        same = indices[:, None] == indices[None, :]
        return jnp.min(jnp.where(same, positions[None, :], k), axis=1)
    order = jnp.argsort(indices, stable=True)
    sorted_idx = indices[order]
    starts = jnp.concatenate([jnp.array([True]), sorted_idx[1:] != sorted_idx[:-1]])
    # the first position of each run of equal indices, spread over the run
    run_first = jax.lax.cummax(jnp.where(starts, positions, 0))
    return jnp.zeros((k,), jnp.int32).at[order].set(order[run_first].astype(jnp.int32))


def last_copy_values(indices: jax.Array, values: jax.Array, keep: jax.Array | None = None):
    """``values`` (K,) with every copy of a duplicated index given the value of its last
    occurrence in argument order (of the copies with the largest ``keep``, bool or int,
    where given): ``dedupe_last``'s values, but in argument order (no sort, indices
    unchanged), so that all scatter writes to one location are equal. O(K^2) compares for
    K <= ``SORT_FREE_MAX_BATCH``, else ``dedupe_last``'s sort."""
    k = indices.shape[0]
    if k > SORT_FREE_MAX_BATCH:
        order = (
            jnp.argsort(indices, stable=True)
            if keep is None
            else jax.lax.sort(
                (indices, keep.astype(jnp.int32), jnp.arange(k)), num_keys=2, is_stable=True
            )[-1]
        )
        _, agreed = dedupe_last(indices[order], values[order])
        return jnp.zeros_like(values).at[order].set(agreed)
    positions = jnp.arange(k, dtype=jnp.int32)
    rank = positions if keep is None else keep.astype(jnp.int32) * k + positions
    same = indices[:, None] == indices[None, :]
    winner = jnp.max(jnp.where(same, rank[None, :], -1), axis=1) % k
    return values[winner]


def set_leaves(
    tree: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    layout: TreeLayout,
    *,
    duplicates_agree: bool = False,
) -> jax.Array:
    """Sets leaves ``indices`` (K,) to ``values`` (K,) and recomputes their ancestors.

    Duplicated indices take the value of their last occurrence (``last_copy_values``).
    O(K min(K, log K) + K B log_B n). ``duplicates_agree=True`` promises that every copy of
    a duplicated index already carries the same value (``dedupe_last``'s or
    ``last_copy_values``'s output, exp3's merged draws): that step is skipped, and the tree
    is bitwise the same, since every write to a node is then equal.
    """
    _check_tree(tree, layout)
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError(
            f"indices and values must both have shape (K,), got {indices.shape} and {values.shape}"
        )
    node, values = indices, values.astype(tree.dtype)
    if not duplicates_agree:
        values = last_copy_values(node, values)
    tree = tree.at[layout.offsets[-1] + node].set(values)
    for level in range(layout.depth - 1, -1, -1):  # one pass per level, not per example
        node = node // layout.arity
        sums = sum_children(_children(tree, layout, level + 1, node))
        # every copy of a duplicated parent writes the same value: order-independent
        tree = tree.at[layout.offsets[level] + node].set(sums)
    return tree


def uniforms_to_targets(uniforms: jax.Array, root: jax.Array, *, stratified: bool) -> jax.Array:
    """Maps uniforms in [0, 1) (K,) to prefix-sum targets in [0, root).

    i.i.d.: target_k = u_k * root. Stratified: target_k = (k + u_k) / K * root, one draw in
    each of K equal slices of the mass (still marginally distributed as p; lower variance).
    """
    k = uniforms.shape[0]
    if stratified:
        uniforms = (jnp.arange(k, dtype=uniforms.dtype) + uniforms) / k
    return uniforms * root


def _inclusive_prefix_sums(children: jax.Array) -> jax.Array:
    """``jnp.cumsum(children, axis=1)`` for (K, B), added left to right. For B <= 16 as B - 1
    adds that XLA fuses into one loop: bitwise what XLA's CPU cumsum gives (a sequential
    sum there too), at 0.6 instead of 5 us per level for K = 128, B = 16 on this CPU (a
    descent has a level per log_B n); for larger B, ``jnp.cumsum``."""
    if children.shape[1] > 16:
        return jnp.cumsum(children, axis=1)
    columns = [children[:, 0]]
    for j in range(1, children.shape[1]):
        columns.append(columns[-1] + children[:, j])
    return jnp.stack(columns, axis=1)


def draw(tree: jax.Array, targets: jax.Array, layout: TreeLayout) -> jax.Array:
    """Finds for each target t the leaf j with prefix(j) <= t < prefix(j) + leaf_j.

    Descends once per level, vectorized over the K targets: at a node, the child taken is
    the LAST child with positive weight whose exclusive prefix sum is <= t. In exact
    arithmetic that is the child containing t; under rounding (a target at or past the end
    of the mass) it is still a child of positive weight, so a leaf of weight 0 (padding or a
    zero-weight example) is never returned. Requires total(tree) > 0.

    Returns int32 leaf indices (K,).
    """
    _check_tree(tree, layout)
    node = jnp.zeros(targets.shape, jnp.int32)
    target = targets.astype(tree.dtype)
    child_ids = jnp.arange(layout.arity, dtype=jnp.int32)
    for level in range(1, layout.depth + 1):
        children = _children(tree, layout, level, node)
        before = _inclusive_prefix_sums(children) - children  # exclusive prefix sums
        eligible = (before <= target[:, None]) & (children > 0)
        child = jnp.max(jnp.where(eligible, child_ids, 0), axis=1)
        target = target - jnp.take_along_axis(before, child[:, None], axis=1)[:, 0]
        node = layout.arity * node + child
    return node
