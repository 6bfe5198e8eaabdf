"""What a restore takes from the checkpoint and what from the sampler configured now.

The checkpoint holds what was *learned*; the new sampler (``like``'s sampler state, built
from the ``exp3_sampler`` the user configures now) holds the *hyperparameters*:

  from the checkpoint    the log-weights (the source of truth) and the tree, the counters
                         (``step``, ``num_dropped_feedback``, ``num_rescales``), and the
                         adaptive bound L when the new sampler keeps L the same way
                         (``bound_mode`` "running_max" or "quantile" on both sides)
  from the new sampler   a fixed ``grad_norm_bound`` (it overrides the stored L), the bound
                         mode (a changed mode restarts L: 0, learned again from the next
                         feedback), ``bound_quantile``, ``bound_learning_rate``,
                         ``step_size``, ``stratified`` (never stored), and the tree's
                         ``arity``: a checkpoint of another arity (GPU default 32, CPU 16)
                         gets its tree rebuilt from the restored log-weights
  refused                another ``num_examples`` or ``p_min``: every stored weight obeys
                         the floor p_j >= p_min of the sampler that wrote it, and a
                         different floor would silently break that invariant (and n is the
                         arrays' shape)

``restore_target`` is the abstract tree orbax reads into (the stored tree shape where the
arity differs); ``finish_restore`` applies the rules above and refuses a non-finite sampler
state (``exp3.check_state_finite``) with a ``ValueError`` naming the checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adambs_jax.checkpoint._metadata import (
    exp3_states,
    exp3_tree_paths,
    is_exp3_state,
    raw_keys,
    rewrap_keys,
)
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._exp3 import Exp3SamplerState, check_state_finite, tree_layout
from adambs_jax.step._train_step import TrainState

__all__ = ["restore_target", "finish_restore"]


def _config_prefix(path) -> str:
    """The prefix of a state's static fields in the metadata's ``sampler_config``
    (``describe_state`` names them from ``state.sampler_state`` down)."""
    names = [
        str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key)))) for key in path[1:]
    ]
    return "".join(f"{name}." for name in names)


def _saved_static(saved: dict, path, field: str, default: Any) -> Any:
    return saved.get("sampler_config", {}).get(_config_prefix(path) + field, default)


def _abstract(like_raw_leaf: Any, like_leaf: Any, shape=None) -> jax.ShapeDtypeStruct:
    """What orbax should restore a leaf as: shape, dtype and the sharding of ``like``."""
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shape = like_raw_leaf.shape if shape is None else tuple(shape)
    return jax.ShapeDtypeStruct(shape, like_raw_leaf.dtype, sharding=sharding)


def restore_target(like: TrainState, saved: dict) -> Any:
    """The abstract tree orbax restores into: ``like``'s (keys as raw data), except that an
    exp3 tree takes the stored shape (another arity: rebuilt by ``finish_restore``)."""
    raw = jax.eval_shape(raw_keys, like)
    flat, treedef = jax.tree_util.tree_flatten_with_path(raw)
    like_leaves = jax.tree.leaves(like)
    if len(like_leaves) != len(flat):  # cannot happen: key_data keeps one leaf per key
        raise AssertionError("key conversion changed the number of leaves")
    trees = exp3_tree_paths(like)
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


def _new_bound(restored: Exp3SamplerState, like: Exp3SamplerState, saved_mode: str):
    """L after a restore: the new fixed L, the stored L (same adaptive mode) or 0 (restart)."""
    if like.bound_mode == "fixed":
        if isinstance(like.grad_norm_bound, jax.ShapeDtypeStruct):
            return restored.grad_norm_bound  # abstract `like`: the first update sets it
        return jnp.asarray(like.grad_norm_bound, jnp.float32)
    if like.bound_mode == saved_mode:
        return restored.grad_norm_bound
    return jnp.zeros_like(restored.grad_norm_bound)


def _reconcile(
    restored: Exp3SamplerState, like: Exp3SamplerState, saved: dict, path, where: str
) -> Exp3SamplerState:
    check_state_finite(
        restored.replace(arity=_saved_static(saved, path, "arity", like.arity)), where=where
    )
    saved_mode = _saved_static(saved, path, "bound_mode", "running_max")
    new = restored.replace(grad_norm_bound=_new_bound(restored, like, saved_mode))
    layout = tree_layout(like.num_examples, like.arity)
    if (
        new.tree.shape != (layout.size,)
        or _saved_static(saved, path, "arity", like.arity) != like.arity
    ):
        tree = sumtree.build(jnp.exp(new.log_weights), layout)
        sharding = getattr(like.tree, "sharding", None)
        new = new.replace(tree=tree if sharding is None else jax.device_put(tree, sharding))
    return new


def finish_restore(restored_raw: Any, like: TrainState, saved: dict, where: str) -> TrainState:
    """The state to resume from: keys rewrapped as in ``like``, and every exp3 sampler state
    checked (finite) and given the new sampler's hyperparameters (the module docstring)."""
    restored = rewrap_keys(restored_raw, like)
    like_states = dict((jax.tree_util.keystr(p), s) for p, s in exp3_states(like))
    fixed = {
        jax.tree_util.keystr(path): _reconcile(
            state, like_states[jax.tree_util.keystr(path)], saved, path, where
        )
        for path, state in exp3_states(restored)
    }
    flat, treedef = jax.tree_util.tree_flatten_with_path(restored, is_leaf=is_exp3_state)
    return jax.tree.unflatten(
        treedef, [fixed.get(jax.tree_util.keystr(path), node) for path, node in flat]
    )
