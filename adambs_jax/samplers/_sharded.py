"""A tree sampler whose state is split by examples over one axis of a device mesh.

``sharded(sampler, mesh, axis)`` takes an ``exp3_sampler`` or a ``priority_sampler`` and
returns a ``Sampler`` with the same contract and the same distribution whose state is
sharded along ``axis`` (D devices): device d owns the examples d m .. (d + 1) m - 1,
m = ceil(n / D), their weights and a prefix-sum tree over them (``_sumtree``), so each holds
about 1/D of the replicated state. Only O(D + K) numbers cross devices per step:

* **draw**: every device makes the same K uniforms (same key) and all-gathers the D shard
  totals S_0..S_{D-1} (D floats). A target t = u sum_d S_d falls in shard d with
  prefix(d) <= t < prefix(d) + S_d (the rule of ``sumtree.draw``, one level of D children);
  each device descends its own subtree for all K targets, keeps those of its shard, and a
  ``psum`` of K indices and K leaf values (zeros from the devices that do not own a draw,
  so the sums are exact) gives every device the same ``(indices, probs)``.
* **update**: the K leaf values and log-weights of the drawn examples are combined the same
  way (one ``psum`` of 2K floats); every device then runs the sampler's own steps on these
  K values (exp3: Algorithm 2's loss estimate and the exact KL projection onto
  {p >= p_min}, whose rest mass uses the global total) identically, and writes only the
  leaves it owns. A draw another device owns is written to an extra leaf of weight 0 that
  every local tree carries after its m leaves (never drawn), so the scatter needs no mask.
* **renormalize** (exp3): one ``psum`` of the D totals, then an O(n / D) rebuild per device.

Everything runs inside ``jax.shard_map`` over ``axis`` (replicated over any other mesh
axis), callable inside the caller's ``jit``: no host round trip, nothing O(n) crosses
devices. The probabilities differ from the replicated sampler's only by float32 rounding
(the total is summed in another order); draws agree except at rounding boundaries.

State layout: ``log_weights`` (D, m) (exp3) and ``tree`` (D, T) with
``NamedSharding(mesh, P(axis))``, T = the size of a tree over m + 1 leaves; scalars
replicated. Padding (n not a multiple of D) holds weight 0 (log-weight -inf): never drawn.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 and §4.2 (the tree).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adambs_jax._checks import check_key, check_per_draw
from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _priority as priority
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._base import Sampler, SamplerStateBase

__all__ = [
    "ShardLayout",
    "shard_layout",
    "ShardedExp3State",
    "ShardedPriorityState",
    "sharded",
]


def _shard_map(f, *, mesh, in_specs, out_specs):
    """``jax.shard_map``, or on an older jax the experimental one (same keywords)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


class ShardLayout(NamedTuple):
    """The static split of n examples over D shards (hashable).

    Attributes:
      num_examples: n.
      num_shards: D, the size of the mesh axis.
      shard_size: m = ceil(n / D), examples per shard (the last ones padded).
      tree: the ``sumtree.TreeLayout`` of every shard's tree, over m + 1 leaves (leaf m: the
        sink of writes to examples of other shards, always 0).
      axis: the mesh axis name.
    """

    num_examples: int
    num_shards: int
    shard_size: int
    tree: sumtree.TreeLayout
    axis: str


def shard_layout(num_examples: int, num_shards: int, arity: int, axis: str) -> ShardLayout:
    """The ``ShardLayout`` of n examples over D shards with trees of ``arity``."""
    shard_size = -(-num_examples // num_shards)
    return ShardLayout(
        num_examples, num_shards, shard_size, sumtree.layout_for(shard_size + 1, arity), axis
    )


# --- the collective pieces, inside shard_map ---------------------------------------------


def _real_count(layout: ShardLayout, shard) -> jax.Array:
    """How many of shard ``shard``'s m slots hold examples (the rest is padding)."""
    return jnp.clip(layout.num_examples - shard * layout.shard_size, 0, layout.shard_size)


def _owned(layout: ShardLayout, indices):
    """``(mine (K,), local (K,))``: which global ``indices`` this device owns, and their local
    slot (m, the sink leaf, for the others)."""
    me = jax.lax.axis_index(layout.axis)
    mine = indices // layout.shard_size == me
    return mine, jnp.where(mine, indices % layout.shard_size, layout.shard_size)


def _gather_owned(layout: ShardLayout, mine, values):
    """Every device's ``values`` where it owns the draw, 0 elsewhere, summed over the axis:
    the owner's value exactly (one nonzero term per draw)."""
    return jax.lax.psum(jnp.where(mine, values, jnp.zeros_like(values)), layout.axis)


def _totals(layout: ShardLayout, tree) -> tuple[jax.Array, jax.Array]:
    """``(shard totals (D,), global total)``: one all-gather of D floats (a ``psum`` of a
    one-hot vector: exact, and known to be replicated); every device sums them in the same
    order, so the total is the same everywhere."""
    me = jax.lax.axis_index(layout.axis)
    one_hot = jnp.arange(layout.num_shards) == me
    totals = jax.lax.psum(jnp.where(one_hot, sumtree.total(tree), 0.0), layout.axis)
    return totals, jnp.cumsum(totals)[-1]


def _draw(layout: ShardLayout, tree, targets, totals):
    """Global indices (K,) and their leaf values (K,) for prefix-sum ``targets`` (K,) in
    [0, sum totals): the shard by the prefix sums of the D ``totals`` (the last shard of
    positive total whose exclusive prefix is <= t), the leaf by this device's descent."""
    before = jnp.cumsum(totals) - totals
    eligible = (before[None, :] <= targets[:, None]) & (totals[None, :] > 0)
    shard = jnp.max(jnp.where(eligible, jnp.arange(layout.num_shards), 0), axis=1)
    local = sumtree.draw(tree, targets - before[shard], layout.tree)
    mine = shard == jax.lax.axis_index(layout.axis)
    leaves = sumtree.get_leaves(tree, local, layout.tree)
    indices = _gather_owned(layout, mine, shard * layout.shard_size + local)
    return indices.astype(jnp.int32), _gather_owned(layout, mine, leaves)


def _write(layout: ShardLayout, tree, mine, local, values):
    """Writes ``values`` at this device's ``local`` slots (the sink, with 0, for draws it does
    not own). Copies of one index must carry one value (merged draws)."""
    values = jnp.where(mine, values, 0.0).astype(tree.dtype)
    return sumtree.set_leaves(tree, local, values, layout.tree, duplicates_agree=True)


def _sharding(mesh: Mesh, axis: str | None) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(axis) if axis else PartitionSpec())


def _check_axis(mesh: Any, axis: Any) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of mesh (axes {tuple(mesh.axis_names)})")
    return int(mesh.shape[axis])


def _leaf_block(layout: ShardLayout, tree) -> jax.Array:
    """(D, m) leaf values of the (D, T) trees (O(n))."""
    start = layout.tree.offsets[-1]
    return tree[:, start : start + layout.shard_size]


def _unpadded(layout: ShardLayout, block) -> jax.Array:
    """The n real entries of a (D, m) block, in example order."""
    return block.reshape(-1)[: layout.num_examples]


# --- exp3 ---------------------------------------------------------------------------------


@struct.dataclass
class ShardedExp3State(SamplerStateBase):
    """State of ``sharded(exp3_sampler(...), mesh, axis)``.

    Attributes:
      log_weights: (D, m) float32, sharded along the mesh axis: log u_j of the examples
        d m + i (-inf for padding).
      tree: (D, T) float32, sharded: each shard's prefix-sum tree over its m leaves and the
        sink leaf; p_j = u_j / sum of the D roots.
      grad_norm_bound, step, num_dropped_feedback, num_rescales: replicated scalars, as in
        ``Exp3SamplerState``.
      num_examples, p_min, arity, bound_mode: static, as in ``Exp3SamplerState``.
      num_shards: static D.

    Restored from a checkpoint written with another D (e.g. 8 devices, restored on 4) or
    arity, the log-weights are re-split and the trees rebuilt on the host (O(n),
    ``restored``); with the same D and arity the arrays are kept as saved.
    """

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ("arity", "bound_mode", "num_shards")
    rebuilt_fields: ClassVar[tuple[str, ...]] = ("tree", "log_weights")

    log_weights: jax.Array
    tree: jax.Array
    grad_norm_bound: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    num_rescales: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    p_min: float = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)
    num_shards: int = struct.field(pytree_node=False)
    bound_mode: str = struct.field(pytree_node=False, default="running_max")

    def healthy(self) -> jax.Array:
        total = jnp.sum(self.tree[:, 0])
        return jnp.isfinite(total) & (total > 0) & jnp.isfinite(self.grad_norm_bound)

    def probabilities(self) -> jax.Array:
        layout = shard_layout(self.num_examples, self.num_shards, self.arity, "")
        return _unpadded(layout, _leaf_block(layout, self.tree)) / jnp.sum(self.tree[:, 0])

    def restored(self, like: ShardedExp3State, saved_config: dict, where: str):
        log_weights = np.asarray(jax.device_get(self.log_weights)).reshape(-1)
        log_weights = log_weights[: like.num_examples]
        if not np.all(np.isfinite(log_weights)):
            exp3._refuse(where, "log_weights", "has non-finite entries")  # noqa: SLF001
        bound = exp3._restored_bound(  # noqa: SLF001 (reads the same bound fields)
            cast(Any, self), cast(Any, like), saved_config.get("bound_mode", "running_max")
        )
        if _same_layout(self, like, saved_config):  # as saved: resumes bitwise
            tree = np.asarray(jax.device_get(self.tree))
            if not (np.all(np.isfinite(tree)) and np.all(tree >= 0) and np.sum(tree[:, 0]) > 0):
                exp3._refuse(where, "tree", "has non-finite or negative nodes, or total 0")  # noqa: SLF001
            return self.replace(grad_norm_bound=bound)
        sharding = getattr(like.tree, "sharding", None)
        mesh, axis = _mesh_of(sharding)
        lw, tree = _exp3_blocks(log_weights, like.num_examples, like.num_shards, like.arity)
        if mesh is not None:
            lw = jax.device_put(lw, _sharding(mesh, axis))
            tree = jax.device_put(tree, _sharding(mesh, axis))
        return self.replace(log_weights=lw, tree=tree, grad_norm_bound=bound)


def _same_layout(restored: Any, like: Any, saved_config: dict) -> bool:
    """Whether the checkpoint was split as ``like`` is (same D, same arity, same shapes): its
    arrays are then read with ``like``'s shardings and kept as they are."""
    return (
        saved_config.get("num_shards", like.num_shards) == like.num_shards
        and saved_config.get("arity", like.arity) == like.arity
        and restored.tree.shape == like.tree.shape
    )


def _mesh_of(sharding) -> tuple[Mesh | None, str | None]:
    """The mesh and the leading axis of a ``NamedSharding`` (None, None for another)."""
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec)
    return cast(Mesh, sharding.mesh), cast("str | None", spec[0] if spec else None)


def _exp3_blocks(log_weights: np.ndarray, num_examples: int, num_shards: int, arity: int):
    """Host-built (D, m) log-weights and (D, T) trees of the n ``log_weights`` (a restore)."""
    layout = shard_layout(num_examples, num_shards, arity, "")
    padded = np.full(num_shards * layout.shard_size, -np.inf, np.float32)
    padded[:num_examples] = log_weights
    block = padded.reshape(num_shards, layout.shard_size)
    sink = np.zeros((num_shards, 1), np.float32)
    leaves = jnp.asarray(np.concatenate([np.exp(block), sink], axis=1))
    tree = jax.vmap(lambda w: sumtree.build(w, layout.tree))(leaves)
    return jnp.asarray(block), tree


def _exp3_init(config: exp3.Exp3Config, layout: ShardLayout, mesh: Mesh):
    log_u = exp3.INITIAL_LOG_ROOT - math.log(config.num_examples)

    def local():
        real = _real_count(layout, jax.lax.axis_index(layout.axis))
        slots = jnp.arange(layout.shard_size)
        log_weights = jnp.where(slots < real, log_u, -jnp.inf).astype(jnp.float32)
        leaves = jnp.concatenate([jnp.exp(log_weights), jnp.zeros((1,), jnp.float32)])
        return log_weights[None], sumtree.build(leaves, layout.tree)[None]

    spec = PartitionSpec(layout.axis)
    fn = _shard_map(local, mesh=mesh, in_specs=(), out_specs=(spec, spec))
    log_weights, tree = jax.jit(fn)()
    bound = 0.0 if config.adaptive_bound else config.grad_norm_bound
    replicated = _sharding(mesh, None)
    # three separate counters (not one array thrice: a donated step would donate it twice)
    scalars = jax.device_put(
        (jnp.asarray(bound, jnp.float32),) + tuple(jnp.zeros((), jnp.int32) for _ in range(3)),
        replicated,
    )
    return ShardedExp3State(
        log_weights,
        tree,
        *scalars,
        num_examples=config.num_examples,
        p_min=config.p_min,
        arity=config.layout.arity,
        num_shards=layout.num_shards,
        bound_mode=config.bound_mode,
    )


def _check_state(layout: ShardLayout, state, state_type: type) -> None:
    """``state`` is a ``state_type`` built for this layout (n and the trees' shape)."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"state must be a {state_type.__name__} (sampler.init()), got {type(state).__name__}"
        )
    expected = (layout.num_shards, layout.tree.size)
    if state.num_examples != layout.num_examples or state.tree.shape != expected:
        raise ValueError(
            f"state: built for num_examples={state.num_examples} with a tree of shape "
            f"{state.tree.shape}, but this sampler has num_examples={layout.num_examples} and "
            f"trees of shape {expected}"
        )


def _exp3_sample(config: exp3.Exp3Config, layout: ShardLayout, mesh: Mesh, state, key):
    _check_state(layout, state, ShardedExp3State)
    check_key(key, name="key")

    def local(tree, key):
        tree = tree[0]
        totals, total = _totals(layout, tree)
        uniforms = jax.random.uniform(key, (config.batch_size,), jnp.float32)
        targets = sumtree.uniforms_to_targets(uniforms, total, stratified=config.stratified)
        indices, leaves = _draw(layout, tree, targets, totals)
        return indices, leaves / total

    spec = PartitionSpec(layout.axis)
    fn = _shard_map(
        local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=(PartitionSpec(),) * 2
    )
    return fn(state.tree, key)


def _exp3_local_update(config, layout, log_weights, tree, stored_bound, indices, feedback, apply):
    """Algorithm 2 on one device: the K drawn values come from their owners, every device
    computes the same projection and writes the leaves it owns (``_exp3.update``'s steps)."""
    clean = exp3.clean_feedback(indices, feedback, config.num_examples)
    bound, ratio = exp3.bound_for_update(config, clean, stored_bound)
    ratio, takes_part = exp3.impute_dropped(ratio, clean)
    draws = exp3.merge_duplicate_draws(clean.indices, ratio, takes_part)
    _, total = _totals(layout, tree)
    mine, local = _owned(layout, draws.indices)
    owned = jnp.stack(
        [
            sumtree.get_leaves(tree, local, layout.tree),
            log_weights[jnp.minimum(local, layout.shard_size - 1)],
        ]
    )
    leaves, old_log_weights = _gather_owned(layout, mine[None], owned)
    p = leaves / total
    alpha_h = exp3.shifted_loss_estimate(
        p, draws, p_min=config.p_min, step_size=config.step_size, batch_size=config.batch_size
    )
    log_scaled_w = old_log_weights - alpha_h
    log_root = jnp.log(total)
    # step 5 with the global root and the K gathered values, as the replicated sampler
    new_log_weights, written = exp3.projected_log_weights(
        config, draws, p, log_scaled_w, log_root, apply
    )
    new_log_weights = jnp.where(written, new_log_weights, old_log_weights)
    log_weights = log_weights.at[local].set(new_log_weights, mode="drop")  # slot m: dropped
    tree = _write(layout, tree, mine, local, jnp.exp(new_log_weights))
    return log_weights, tree, bound, written, exp3.count_dropped(clean.valid)


def _exp3_renormalize_local(layout: ShardLayout, log_weights, tree):
    _, total = _totals(layout, tree)
    log_weights = log_weights - (jnp.log(total) - exp3.INITIAL_LOG_ROOT)
    leaves = jnp.concatenate([jnp.exp(log_weights), jnp.zeros((1,), tree.dtype)])
    return log_weights, sumtree.build(leaves, layout.tree)


def _exp3_renormalize(config, layout: ShardLayout, mesh: Mesh, state):
    _check_state(layout, state, ShardedExp3State)

    def local(log_weights, tree):
        log_weights, tree = _exp3_renormalize_local(layout, log_weights[0], tree[0])
        return log_weights[None], tree[None]

    spec = PartitionSpec(layout.axis)
    fn = _shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))
    log_weights, tree = fn(state.log_weights, state.tree)
    return state.replace(log_weights=log_weights, tree=tree, num_rescales=state.num_rescales + 1)


def _exp3_update(config, layout: ShardLayout, mesh: Mesh, state, indices, feedback, *, apply=True):
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    _check_state(layout, state, ShardedExp3State)
    apply = jnp.asarray(apply, bool)
    exp3.clean_feedback(indices, feedback, config.num_examples)  # TypeError for float indices

    def local(log_weights, tree, stored_bound, indices, feedback, apply):
        log_weights, tree, bound, written, dropped = _exp3_local_update(
            config, layout, log_weights[0], tree[0], stored_bound, indices, feedback, apply
        )
        if config.renormalize_every == 0:  # static: as _exp3.update, every time
            renormalized = _exp3_renormalize_local(layout, log_weights, tree)
            log_weights, tree = (
                jnp.where(apply, new, old)
                for new, old in zip(renormalized, (log_weights, tree), strict=True)
            )
        return log_weights[None], tree[None], bound, written, dropped

    spec, rep = PartitionSpec(layout.axis), PartitionSpec()
    fn = _shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, rep, rep, rep, rep),
        out_specs=(spec, spec, rep, rep, rep),
    )
    log_weights, tree, bound, written, dropped = fn(
        state.log_weights, state.tree, state.grad_norm_bound, indices, feedback, apply
    )
    new = state.replace(
        log_weights=log_weights,
        tree=tree,
        grad_norm_bound=jnp.where(written, bound, state.grad_norm_bound),
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback + jnp.where(apply, dropped, 0),
    )
    if config.renormalize_every == 0:
        new = new.replace(num_rescales=state.num_rescales + apply.astype(jnp.int32))
    return new


def _sharded_exp3(config: exp3.Exp3Config, mesh: Mesh, axis: str) -> Sampler:
    layout = shard_layout(config.num_examples, _check_axis(mesh, axis), config.layout.arity, axis)
    bind = functools.partial
    return Sampler(
        _with_sharding(
            bind(_exp3_init, config, layout, mesh), _exp3_shardings(config, layout, mesh)
        ),
        bind(_exp3_sample, config, layout, mesh),
        bind(_exp3_update, config, layout, mesh),
        config.num_examples,
        config.batch_size,
        lambda state: state.probabilities(),
        renormalize_every=config.renormalize_every or None,
        renormalize=bind(_exp3_renormalize, config, layout, mesh),
        metrics=exp3.bound_metrics,
    )


# --- priority -----------------------------------------------------------------------------


@struct.dataclass
class ShardedPriorityState(SamplerStateBase):
    """State of ``sharded(priority_sampler(...), mesh, axis)``.

    Attributes:
      tree: (D, T) float32, sharded along the mesh axis: each shard's tree over the
        priorities u_j of its m examples (0 for padding) and the sink leaf.
      step, num_dropped_feedback, cursor, mix, mix_ratios: replicated, as in
        ``PrioritySamplerState``.
      num_examples, arity, uniform_mix, min_uniform_mix, alpha, eps: static, as in
        ``PrioritySamplerState``; num_shards: static D.

    Restored from a checkpoint written with another D or arity, the stored leaves are
    re-split and the trees rebuilt on the host (O(n), ``restored``); with the same D and
    arity the tree is kept as saved.
    """

    reconfigurable_fields: ClassVar[tuple[str, ...]] = ("arity", "num_shards")
    rebuilt_fields: ClassVar[tuple[str, ...]] = ("tree",)

    tree: jax.Array
    step: jax.Array
    num_dropped_feedback: jax.Array
    cursor: jax.Array
    mix: jax.Array
    mix_ratios: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    arity: int = struct.field(pytree_node=False)
    num_shards: int = struct.field(pytree_node=False)
    uniform_mix: float | str = struct.field(pytree_node=False, default=1.0)
    min_uniform_mix: float = struct.field(pytree_node=False, default=1.0)
    alpha: float = struct.field(pytree_node=False, default=1.0)
    eps: float = struct.field(pytree_node=False, default=1e-6)

    def healthy(self) -> jax.Array:
        total = jnp.sum(self.tree[:, 0])
        return jnp.isfinite(total) & (total > 0)

    def probabilities(self) -> jax.Array:
        layout = shard_layout(self.num_examples, self.num_shards, self.arity, "")
        leaves = _unpadded(layout, _leaf_block(layout, self.tree))
        return (1.0 - self.mix) * leaves / jnp.sum(self.tree[:, 0]) + self.mix / self.num_examples

    def restored(self, like: ShardedPriorityState, saved_config: dict, where: str):
        del where
        if _same_layout(self, like, saved_config):  # as saved: resumes bitwise
            return self
        saved_shards = saved_config.get("num_shards", like.num_shards)
        saved_arity = saved_config.get("arity", like.arity)
        saved_layout = shard_layout(like.num_examples, saved_shards, saved_arity, "")
        tree = np.asarray(jax.device_get(self.tree)).reshape(saved_shards, -1)
        leaves = np.asarray(_unpadded(saved_layout, _leaf_block(saved_layout, tree)))
        tree = _priority_tree(leaves, like.num_examples, like.num_shards, like.arity)
        mesh, axis = _mesh_of(getattr(like.tree, "sharding", None))
        if mesh is not None:
            tree = jax.device_put(tree, _sharding(mesh, axis))
        return self.replace(tree=tree)


def _priority_tree(leaves: np.ndarray, num_examples: int, num_shards: int, arity: int):
    """(D, T) trees over the n priorities ``leaves`` (a restore), built on the host's device."""
    layout = shard_layout(num_examples, num_shards, arity, "")
    padded = np.zeros((num_shards, layout.shard_size + 1), np.float32)
    flat = np.zeros(num_shards * layout.shard_size, np.float32)
    flat[:num_examples] = leaves
    padded[:, :-1] = flat.reshape(num_shards, layout.shard_size)
    return jax.vmap(lambda w: sumtree.build(w, layout.tree))(jnp.asarray(padded))


def _priority_init(config, layout: ShardLayout, mesh: Mesh):
    initial = priority.priorities(config, jnp.asarray(config.initial_score))

    def local():
        real = _real_count(layout, jax.lax.axis_index(layout.axis))
        slots = jnp.arange(layout.shard_size + 1)
        leaves = jnp.where(slots < real, initial, 0.0).astype(jnp.float32)
        return sumtree.build(leaves, layout.tree)[None]

    fn = _shard_map(local, mesh=mesh, in_specs=(), out_specs=PartitionSpec(layout.axis))
    tree = jax.jit(fn)()
    plain = priority.init(config._replace(num_examples=1, layout=sumtree.layout_for(1, 2)))
    scalars = jax.device_put(
        (plain.step, plain.num_dropped_feedback, plain.cursor, plain.mix, plain.mix_ratios),
        _sharding(mesh, None),
    )
    return ShardedPriorityState(
        tree,
        *scalars,
        num_examples=config.num_examples,
        arity=config.layout.arity,
        num_shards=layout.num_shards,
        uniform_mix=config.uniform_mix,
        min_uniform_mix=config.min_uniform_mix,
        alpha=config.alpha,
        eps=config.eps,
    )


def _owned_leaves(layout: ShardLayout, tree, indices):
    """The leaf values (K,) of global ``indices`` (K,), from their owners."""
    mine, local = _owned(layout, indices)
    return _gather_owned(layout, mine, sumtree.get_leaves(tree, local, layout.tree))


def _priority_sample(config, layout: ShardLayout, mesh: Mesh, state, key):
    """``_priority.sample`` with the tree split: the same keys, the same Bernoulli choices."""
    _check_state(layout, state, ShardedPriorityState)
    check_key(key, name="key")
    shape = (config.batch_size,)

    def local(tree, mix, key):
        tree = tree[0]
        mix_key, uniform_key, tree_key = jax.random.split(key, 3)
        indices = jax.random.randint(uniform_key, shape, 0, config.num_examples, jnp.int32)
        totals, total = _totals(layout, tree)
        if config.adaptive or config.uniform_mix < 1.0:
            from_uniform = jax.random.bernoulli(mix_key, mix, shape)
            uniforms = jax.random.uniform(tree_key, shape, jnp.float32)
            targets = sumtree.uniforms_to_targets(uniforms, total, stratified=False)
            from_tree, _ = _draw(layout, tree, targets, totals)
            indices = jnp.where(from_uniform, indices, from_tree)
        leaves = _owned_leaves(layout, tree, indices)
        return indices, (1.0 - mix) * (leaves / total) + mix / config.num_examples

    spec, rep = PartitionSpec(layout.axis), PartitionSpec()
    fn = _shard_map(local, mesh=mesh, in_specs=(spec, rep, rep), out_specs=(rep, rep))
    return fn(state.tree, state.mix, key)


def _priority_update(
    config, layout: ShardLayout, mesh: Mesh, state, indices, feedback, *, apply=True
):
    """``_priority.update`` with the tree split: the K old leaves from their owners, the same
    new values on every device, each device writes the leaves it owns."""
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    _check_state(layout, state, ShardedPriorityState)
    apply = jnp.asarray(apply, bool)
    exp3.clean_feedback(indices, feedback, config.num_examples)  # TypeError for float indices

    def local(tree, mix, mix_ratios, indices, feedback, apply):
        tree = tree[0]
        clean = exp3.clean_feedback(indices, feedback, config.num_examples)
        _, total = _totals(layout, tree)
        old = _owned_leaves(layout, tree, clean.indices)
        mix, mix_ratios = priority.next_mix(config, mix, mix_ratios, clean, apply, old, total)
        scores, writes = exp3.impute_dropped(clean.feedback, clean)
        new = jnp.where(writes & apply, priority.priorities(config, scores), old)
        keep = clean.valid.astype(jnp.int32) * 2 + writes.astype(jnp.int32)
        idx, new = sumtree.dedupe_last(clean.indices, new, keep=keep)
        mine, local_idx = _owned(layout, idx)
        tree = _write(layout, tree, mine, local_idx, new)
        return tree[None], mix, mix_ratios, exp3.count_dropped(clean.valid)

    spec, rep = PartitionSpec(layout.axis), PartitionSpec()
    fn = _shard_map(
        local, mesh=mesh, in_specs=(spec,) + (rep,) * 5, out_specs=(spec, rep, rep, rep)
    )
    tree, mix, mix_ratios, dropped = fn(
        state.tree, state.mix, state.mix_ratios, indices, feedback, apply
    )
    return state.replace(
        tree=tree,
        mix=mix,
        mix_ratios=mix_ratios,
        step=state.step + apply.astype(jnp.int32),
        num_dropped_feedback=state.num_dropped_feedback + jnp.where(apply, dropped, 0),
    )


def _sharded_priority(config, mesh: Mesh, axis: str) -> Sampler:
    if config.refresh_chunk is not None:
        raise ValueError(
            "sharded: a priority_sampler with refresh_every (a ScoringSampler) is not "
            "supported; build it without refresh_every"
        )
    layout = shard_layout(config.num_examples, _check_axis(mesh, axis), config.layout.arity, axis)
    bind = functools.partial
    return Sampler(
        _with_sharding(
            bind(_priority_init, config, layout, mesh), _priority_shardings(config, layout, mesh)
        ),
        bind(_priority_sample, config, layout, mesh),
        bind(_priority_update, config, layout, mesh),
        config.num_examples,
        config.batch_size,
        lambda state: state.probabilities(),
    )


# --- the wrapper ---------------------------------------------------------------------------


def _with_sharding(init, state_sharding):
    """``init`` carrying ``state_sharding``: the placement of its state's arrays, a pytree
    prefix of the state that ``make_train_step(..., mesh=)`` gives its jitted step's output
    (its other state stays replicated)."""
    init.state_sharding = state_sharding
    return init


def _exp3_shardings(config, layout: ShardLayout, mesh: Mesh) -> ShardedExp3State:
    """The placement of a ``ShardedExp3State`` (its static fields must match: a prefix)."""
    # the state's structure with a sharding in place of each array (a jit out_shardings prefix)
    split, replicated = cast(Any, _sharding(mesh, layout.axis)), cast(Any, _sharding(mesh, None))
    return ShardedExp3State(
        split,
        split,
        *(replicated,) * 4,
        num_examples=config.num_examples,
        p_min=config.p_min,
        arity=config.layout.arity,
        num_shards=layout.num_shards,
        bound_mode=config.bound_mode,
    )


def _priority_shardings(config, layout: ShardLayout, mesh: Mesh) -> ShardedPriorityState:
    """The placement of a ``ShardedPriorityState`` (static fields as its state's)."""
    # the state's structure with a sharding in place of each array (a jit out_shardings prefix)
    split, replicated = cast(Any, _sharding(mesh, layout.axis)), cast(Any, _sharding(mesh, None))
    return ShardedPriorityState(
        split,
        *(replicated,) * 5,
        num_examples=config.num_examples,
        arity=config.layout.arity,
        num_shards=layout.num_shards,
        uniform_mix=config.uniform_mix,
        min_uniform_mix=config.min_uniform_mix,
        alpha=config.alpha,
        eps=config.eps,
    )


def _config_of(sampler: Any, module) -> Any:
    """The configuration a library factory bound into ``sampler.init`` (a partial of
    ``module.init``), or None."""
    init = getattr(sampler, "init", None)
    if isinstance(init, functools.partial) and init.func is module.init and init.args:
        return init.args[0]
    return None


def sharded(sampler: Any, mesh: Mesh, axis: str = "data") -> Sampler:
    """``sampler`` with its state split by examples over the mesh axis ``axis``.

    Device d of the D devices along ``axis`` owns examples d m .. (d + 1) m - 1,
    m = ceil(n / D): their weights and a prefix-sum tree over them, about 1/D of the
    replicated state (plus O(D)). A draw all-gathers the D shard totals, picks each draw's
    shard from their prefix sums, descends the owner's subtree and combines the K indices
    and probabilities with one ``psum``; an update combines the K drawn leaves the same way,
    computes the sampler's step on them on every device alike (exp3's exact projection uses
    the global total) and writes only the owned leaves. Nothing O(n) crosses devices; the
    functions run ``jax.shard_map`` and may be called inside ``jit`` (``make_train_step``).

    The distribution is the one of ``sampler`` after the same updates, up to float32
    rounding (the total is summed in another order); draws agree with the replicated
    sampler's except at rounding boundaries. Bad feedback is handled as ``sampler`` does.

    Args:
      sampler: an ``exp3_sampler`` or a ``priority_sampler`` (without ``refresh_every``).
      mesh: the ``jax.sharding.Mesh``; over its other axes the state is replicated.
      axis: the mesh axis the examples are split along (default ``"data"``, the axis of
        ``ab.data_parallel_mesh``).

    Returns:
      A ``Sampler``: ``init()`` places the state on ``mesh`` (``ShardedExp3State`` or
      ``ShardedPriorityState``; arrays (D, ...) with ``NamedSharding(mesh, P(axis))``);
      ``probabilities(state)`` gathers p (n,) (O(n): for tests and plots).

    Raises:
      TypeError: ``sampler`` is not one of the supported factories' samplers, or ``mesh``
        is not a ``Mesh``. ValueError: ``axis`` is not an axis of ``mesh``.

    Examples:
      >>> import jax
      >>> import adambs_jax as ab
      >>> mesh = ab.data_parallel_mesh()
      >>> sampler = ab.samplers.sharded(ab.exp3_sampler(1000, 8, num_steps=100), mesh)
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> state = sampler.update(state, indices, probs * 0 + 1.0)
      >>> round(float(sampler.probabilities(state).sum()), 4)
      1.0
    """
    config = _config_of(sampler, exp3)
    if config is not None:
        return _sharded_exp3(config, mesh, axis)
    config = _config_of(sampler, priority)
    if config is not None:
        return _sharded_priority(config, mesh, axis)
    raise TypeError(
        "sharded: sampler must be made by ab.exp3_sampler or ab.priority_sampler, got "
        f"{type(sampler).__name__}"
    )
