"""What a restore takes from the checkpoint and what from the sampler configured now.

The checkpoint holds what was *learned*; the new sampler (``like``'s sampler state, built
from the sampler the user configures now) holds the *hyperparameters*. Which is which is
each sampler state's own knowledge (``adambs_jax.samplers.SamplerStateBase``): exp3 keeps
its log-weights, counters and adaptive bound L and takes a fixed L, a changed bound mode
and the tree's arity from the new sampler; priority and InfoBatch keep their trees'
leaves and take the arity. Another ``num_examples`` (or exp3's ``p_min``) is refused
before any array is read (``_metadata``).

``restore_target`` is the abstract tree orbax reads into (the stored shape of each
sampler state's ``rebuilt_fields``, e.g. a tree of another arity); ``finish_restore``
rewraps the keys and lets every sampler state reconcile itself (``state.restored``), which
refuses a state that is not finite with a ``ValueError`` naming the checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from adambs_jax.checkpoint._metadata import (
    config_prefix,
    is_sampler_state,
    raw_keys,
    rebuilt_paths,
    rewrap_keys,
)
from adambs_jax.step import TrainState

__all__ = ["restore_target", "finish_restore"]


def _saved_config(saved: dict, path) -> dict:
    """The static fields the checkpoint recorded for the sampler state at ``path``."""
    prefix = config_prefix(path)
    config = saved.get("sampler_config", {})
    return {
        name[len(prefix) :]: value
        for name, value in config.items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    }


def _abstract(like_raw_leaf: Any, like_leaf: Any, shape=None) -> jax.ShapeDtypeStruct:
    """What orbax should restore a leaf as: shape, dtype and the sharding of ``like``; a
    leaf stored with another shape (a rebuilt field) replicated over ``like``'s mesh instead,
    since ``like``'s split need not divide it (a sampler state split over 4 devices saved by
    8 has 8 rows, one saved by 4 has 4 rows on 8 devices); ``restored`` re-splits it."""
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shape = like_raw_leaf.shape if shape is None else tuple(shape)
    if shape != tuple(like_raw_leaf.shape) and isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(shape, like_raw_leaf.dtype, sharding=sharding)


def restore_target(like: TrainState, saved: dict) -> Any:
    """The abstract tree orbax restores into: ``like``'s (keys as raw data), except that a
    sampler state's ``rebuilt_fields`` take the stored shape (rebuilt by ``finish_restore``)."""
    raw = jax.eval_shape(raw_keys, like)
    flat, treedef = jax.tree_util.tree_flatten_with_path(raw)
    like_leaves = jax.tree.leaves(like)
    if len(like_leaves) != len(flat):  # cannot happen: key_data keeps one leaf per key
        raise AssertionError("key conversion changed the number of leaves")
    trees = rebuilt_paths(like)
    stored = {leaf["path"]: leaf["shape"] for leaf in saved.get("leaves", [])}
    leaves = [
        _abstract(
            leaf,
            like_leaf,
            stored.get(jax.tree_util.keystr(path)) if jax.tree_util.keystr(path) in trees else None,
        )
        for (path, leaf), like_leaf in zip(flat, like_leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


def finish_restore(restored_raw: Any, like: TrainState, saved: dict, where: str) -> TrainState:
    """The state to resume from: keys rewrapped as in ``like``, and every sampler state
    reconciled by itself (``state.restored(like_state, saved_config, where)``): checked,
    with the hyperparameters of the sampler configured now."""
    return _reconcile(rewrap_keys(restored_raw, like), like, saved, where)


def _reconcile(tree: Any, like: Any, saved: dict, where: str, prefix: tuple = ()) -> Any:
    """``tree`` with every sampler state in it restored (inner states first)."""

    def is_inner(node: Any) -> bool:
        return node is not tree and is_sampler_state(node)

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_inner)
    like_nodes = treedef.flatten_up_to(like)
    nodes = []
    for (path, node), like_node in zip(flat, like_nodes):
        if is_inner(node):
            node = _reconcile(node, like_node, saved, where, prefix + path)
            node = node.restored(like_node, _saved_config(saved, prefix + path), where)
        nodes.append(node)
    return treedef.unflatten(nodes)
