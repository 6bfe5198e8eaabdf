"""Pytree helpers shared by the train step, the feedback and the samplers (like optax's
``tree_utils``): rows of a dataset, the batch size of a pytree, per-example norms, an
all-finite test and a leafwise select.

Every function is jittable and works on any pytree of arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adambs_jax._checks import is_prng_key

__all__ = ["gather", "batch_size_of", "per_example_norms", "all_finite", "select"]


def gather(data: Any, indices: jax.Array) -> Any:
    """Rows ``indices`` of every leaf of ``data`` (leaves (n, ...) -> (M, ...)), on device."""
    return jax.tree.map(lambda leaf: jnp.take(leaf, indices, axis=0), data)


def batch_size_of(batch: Any, *, name: str = "batch") -> int:
    """K, the common leading axis of every leaf of ``batch``.

    Raises:
      ValueError: ``batch`` has no array leaves, a scalar leaf, or leaves of different K.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError(
            f"{name} must be a pytree of arrays with a leading batch axis, got no leaves"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) < 1:
            raise ValueError(
                f"{name}: every leaf needs a leading batch axis; leaf "
                f"{jax.tree_util.keystr(path)} is a scalar"
            )
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        raise ValueError(f"{name}: leaves have different leading axes {sorted(sizes)} ({sizes})")
    return next(iter(sizes))


def per_example_norms(per_example_tree: Any) -> jax.Array:
    """(K,) L2 norms over all leaves of a per-example pytree (every leaf (K, ...)).

    norms_k = sqrt(sum_leaves sum_{non-leading axes} leaf[k]^2), accumulated in float32 (or
    the leaves' dtype if wider).
    """
    leaves = jax.tree.leaves(per_example_tree)
    batch_size = batch_size_of(per_example_tree, name="per_example_tree")

    def squared_norms(leaf):
        dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        return jnp.sum(jnp.square(leaf.astype(dtype)).reshape(batch_size, -1), axis=1)

    return jnp.sqrt(sum(squared_norms(leaf) for leaf in leaves))


def all_finite(*trees: Any) -> jax.Array:
    """True iff every floating-point entry of every leaf is finite (O(size), one reduction)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not checks:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(checks))


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(pred, on_true, on_false)`` (typed PRNG keys via their data)."""

    def select_leaf(new, old):
        if is_prng_key(new):
            data = jnp.where(pred, jax.random.key_data(new), jax.random.key_data(old))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
        return jnp.where(pred, new, old)

    return jax.tree.map(select_leaf, on_true, on_false)
