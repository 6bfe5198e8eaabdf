"""Data parallelism for the train step: a ``jax.sharding.Mesh``, the batch split along it.

    mesh = ab.data_parallel_mesh()                        # all devices, axis "data"
    step = ab.make_train_step(loss_fn, optimizer, sampler, mesh=mesh)
    state = ab.replicate(ab.TrainState.create(...), mesh)
    data = ab.replicate(data, mesh)
    state, metrics = step(state, data, key)

What lives where, with D the number of devices along the data axis and K the batch size:

* **replicated** (``NamedSharding(mesh, P())``, one full copy per device): the parameters,
  the optimizer state, the sampler state (its (n,) log-weights and prefix-sum tree, the
  bound L), the step counters, the PRNG key, the dataset (leading axis n), and the metrics.
  The sampler's ``sample`` and ``update`` run as replicated computation: every device draws
  the same K indices from the same key and applies the same O(K log n) scatter to its copy
  of the tree, so the copies never diverge and no communication is needed for them.
* **sharded** (``NamedSharding(mesh, P(data_axis))``): the gathered batch ``data[I]``
  (leaves (K, ...)) and everything computed per example from it — the forward and backward
  passes, the per-example losses and the feedback: device d handles examples
  d K/D .. (d+1) K/D - 1.

XLA's SPMD partitioner inserts the collectives: an all-reduce of the gradient
G_hat = (1/K) sum_k w_k g_{i_k} (a sum over the sharded K axis) and an all-gather of the K
feedback values for the replicated sampler update. Nothing is hand-written.

Multiple hosts: call ``jax.distributed.initialize()`` on every process first; then
``data_parallel_mesh()`` spans ``jax.devices()``, i.e. the devices of all hosts, and every process
runs the same program. ``replicate`` expects every process to pass the same host values (same
dataset, same initial parameters, same key): with one process it is ``jax.device_put`` with a
replicated ``NamedSharding``; with several, ``jax.device_put`` cannot place a process's array on
other processes' devices, so every leaf that is not yet a replicated global array goes through the
host into ``jax.make_array_from_process_local_data`` (PRNG keys through their key data). Sharding
the dataset itself along n (instead of replicating it) is a possible extension: the gather
``data[I]`` would then become a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DEFAULT_DATA_AXIS",
    "data_parallel_mesh",
    "replicated_sharding",
    "batch_sharding",
    "replicate",
    "replicate_on_mesh",
    "constrain_batch",
    "check_mesh",
]

DEFAULT_DATA_AXIS = "data"


def data_parallel_mesh(
    # jax binds its Device class by assignment (Device = _xc.Device): pyright sees a variable
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    *,
    axis_name: str = DEFAULT_DATA_AXIS,
) -> Mesh:
    """A one-axis mesh over ``devices`` (default: ``jax.devices()``, all devices of all hosts).

    Args:
      devices: the devices, D >= 1 of them.
      axis_name: the name of the mesh axis along which the batch is split.

    Returns:
      ``Mesh(np.array(devices), (axis_name,))``.

    Raises:
      ValueError: ``devices`` is empty. TypeError: ``axis_name`` is not a non-empty string.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"axis_name must be a non-empty string, got {axis_name!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must hold at least one device, got none")
    return Mesh(np.array(devices), (axis_name,))


def check_mesh(mesh: Any, data_axis: str, batch_size: int | None = None) -> int:
    """Validates a mesh for data parallelism; returns D, the size of ``data_axis``.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: ``data_axis`` is not an axis of ``mesh``, or ``batch_size`` (K) is not a
        multiple of D (every device gets K / D examples).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"data_axis={data_axis!r} is not an axis of mesh (axes {tuple(mesh.axis_names)})"
        )
    num_shards = int(mesh.shape[data_axis])
    if batch_size is not None and batch_size % num_shards:
        raise ValueError(
            f"batch_size (sampler.batch_size = {batch_size}) must be a multiple of the size of "
            f"mesh axis {data_axis!r} ({num_shards} devices), so that every device gets the "
            f"same number of examples"
        )
    return num_shards


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy of the array on every device of ``mesh``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, data_axis: str = DEFAULT_DATA_AXIS) -> NamedSharding:
    """``NamedSharding(mesh, P(data_axis))``: the leading (batch) axis split along
    ``data_axis``, the other axes whole (replicated over the mesh's other axes)."""
    check_mesh(mesh, data_axis)
    return NamedSharding(mesh, PartitionSpec(data_axis))


def _replicated_leaf(leaf: Any, sharding: NamedSharding) -> Any:
    """``leaf`` as a global array with ``sharding`` (fully replicated), from this process's
    copy of its value; a typed PRNG key goes through its key data."""
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _replicated_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_process_local_data(sharding, host, host.shape)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` as a global array with ``replicated_sharding(mesh)``.

    Use it for the ``TrainState`` and the dataset before the first call of a step built with
    ``mesh=``. With one process: ``jax.device_put(tree, replicated_sharding(mesh))``. With
    several processes each must pass the same values; a leaf that is not yet replicated on
    ``mesh`` is copied through the host into ``jax.make_array_from_process_local_data``
    (``jax.device_put`` refuses a sharding over other processes' devices).
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: _replicated_leaf(leaf, sharding), tree)


def replicate_on_mesh(tree: Any, mesh: Mesh | None) -> Any:
    """``replicate(tree, mesh)``, or ``tree`` unchanged when ``mesh`` is None (no mesh)."""
    return tree if mesh is None else replicate(tree, mesh)


def constrain_batch(batch: Any, mesh: Mesh, data_axis: str = DEFAULT_DATA_AXIS) -> Any:
    """Inside ``jit``: asks XLA to split every leaf of ``batch`` (leaves (K, ...)) along its
    leading axis over ``data_axis`` (``jax.lax.with_sharding_constraint``).

    Raises:
      ValueError: a leaf is a scalar, or its leading axis is not a multiple of the size of
        ``data_axis``.
    """
    num_shards = check_mesh(mesh, data_axis)
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(leaf)
        if len(shape) < 1 or shape[0] % num_shards:
            raise ValueError(
                f"batch: leaf {jax.tree_util.keystr(path)} of shape {shape} cannot be split "
                f"along its leading axis over {num_shards} devices (mesh axis {data_axis!r})"
            )
    return jax.lax.with_sharding_constraint(batch, sharding)
