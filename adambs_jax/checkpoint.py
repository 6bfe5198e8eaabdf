"""Checkpoint and resume a ``TrainState`` with orbax-checkpoint.

    ab.save_checkpoint("/ckpt/step_1500", state, sampler=sampler)
    ...                                              # preempted; a new process:
    like = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
    state = ab.restore_checkpoint("/ckpt/step_1500", like, sampler=sampler)

Everything a step reads is saved: the parameters, the optimizer state, the sampler state
(exp3: the (n,) log-weights, the prefix-sum tree, the bound L, its counters), ``step``,
``skipped_steps`` and the PRNG key. Training resumed from a checkpoint is bitwise the
training that was never interrupted (same device kind, same jitted step).

A checkpoint directory holds two orbax items: ``state`` (the arrays, orbax's
``StandardSave``: OCDBT/Zarr, sharded arrays written by their owning hosts) and
``adambs_metadata`` (JSON: library version, sampler kind and static configuration —
``num_examples``, ``p_min`` —, batch size if known, step, and every leaf's path, shape and
dtype). ``restore_checkpoint`` checks that metadata against the template ``like`` before it
reads an array and refuses a checkpoint of another dataset size, sampler kind, ``p_min``,
batch size, optimizer or model with a ``ValueError`` that lists every difference.

PRNG keys: typed keys (``jax.random.key``) are saved as their raw uint32 data
(``jax.random.key_data``) with the implementation's name in the metadata, and rewrapped
(``jax.random.wrap_key_data``) on restore; raw uint32 keys (``jax.random.PRNGKey``) are saved
as they are.

Several hosts: call ``save_checkpoint`` / ``restore_checkpoint`` on every process with the
same path (orbax coordinates the processes; each writes the shards it owns). Restored arrays
get the shardings of ``like``'s arrays, e.g. replicated over a mesh if ``like`` went through
``ab.replicate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from adambs_jax.train_step import TrainState

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "restore_checkpoint",
    "read_checkpoint_metadata",
    "describe_state",
    "CheckpointManager",
]

CHECKPOINT_FORMAT = 1
"""Version of the layout below; bumped if it changes incompatibly."""

_STATE_ITEM = "state"
_METADATA_ITEM = "adambs_metadata"
_MAX_LISTED = 6  # differences listed per kind in an error message

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- helpers


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(leaf: Any) -> str:
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return str(jax.random.key_impl(leaf))
    impl = getattr(leaf.dtype, "_impl", None)  # an abstract key (jax.eval_shape) has no API
    return str(getattr(impl, "name", leaf.dtype))


def _raw_keys(tree: Any) -> Any:
    """Typed PRNG key leaves replaced by their uint32 data (works on abstract trees too)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return repr(value)


def _static_config(obj: Any, prefix: str = "") -> dict:
    """The static (non-pytree) fields of the flax dataclasses in a sampler state, e.g.
    ``{"num_examples": 96, "p_min": 0.001}``; nested states get dotted names."""
    config = {}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if not field.metadata.get("pytree_node", True):
                config[prefix + field.name] = _json_value(value)
            else:
                config.update(_static_config(value, f"{prefix}{field.name}."))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        for name in obj._fields:
            config.update(_static_config(getattr(obj, name), f"{prefix}{name}."))
    elif isinstance(obj, Mapping):
        for name, value in obj.items():
            config.update(_static_config(value, f"{prefix}{name}."))
    return config


def _host_int(value: Any) -> Optional[int]:
    if value is None or isinstance(value, jax.ShapeDtypeStruct):
        return None
    if isinstance(value, jax.Array):  # a replicated array may span hosts: read a local copy
        value = value.addressable_data(0)
    return int(np.asarray(value))


def _check_train_state(state: Any, name: str) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(
            f"{name} must be an ab.TrainState (TrainState.create(...)), got "
            f"{type(state).__name__}"
        )


def describe_state(state: TrainState, *, sampler: Any = None) -> dict:
    """The metadata stored with a checkpoint of ``state`` (JSON-serializable).

    Keys: ``format``, ``library``, ``version``, ``sampler_kind`` (class name of
    ``state.sampler_state``), ``sampler_config`` (its static fields: ``num_examples``,
    ``p_min``, ...), ``batch_size`` (``sampler.batch_size`` if ``sampler`` is given, else
    None), ``step``, ``skipped_steps``, ``typed_keys`` ({leaf path: PRNG implementation} of
    typed keys) and ``leaves`` (path, shape, dtype of every array, keys as raw data).
    """
    _check_train_state(state, "state")
    from adambs_jax import __version__  # pylint: disable=import-outside-toplevel

    typed_keys = {
        jax.tree_util.keystr(path): _key_impl_name(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if _is_key(leaf)
    }
    raw = jax.eval_shape(_raw_keys, state)
    leaves = [
        {"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        for path, leaf in jax.tree_util.tree_flatten_with_path(raw)[0]
    ]
    batch_size = getattr(sampler, "batch_size", None) if sampler is not None else None
    return {
        "format": CHECKPOINT_FORMAT,
        "library": "adambs_jax",
        "version": __version__,
        "sampler_kind": type(state.sampler_state).__name__,
        "sampler_config": _static_config(state.sampler_state),
        "batch_size": _json_value(batch_size),
        "step": _host_int(state.step),
        "skipped_steps": _host_int(state.skipped_steps),
        "typed_keys": typed_keys,
        "leaves": leaves,
    }


def _differences(saved: dict, expected: dict) -> list[str]:
    """Human-readable differences between a checkpoint's metadata and a template's."""
    problems = []
    if saved.get("sampler_kind") != expected["sampler_kind"]:
        problems.append(
            f"sampler kind: checkpoint {saved.get('sampler_kind')}, `like` "
            f"{expected['sampler_kind']}"
        )
    saved_config, expected_config = saved.get("sampler_config", {}), expected["sampler_config"]
    for name in sorted(set(saved_config) | set(expected_config)):
        if saved_config.get(name) != expected_config.get(name):
            label = "dataset size (num_examples)" if name.endswith("num_examples") else name
            problems.append(
                f"sampler {label}: checkpoint {saved_config.get(name)!r}, "
                f"`like` {expected_config.get(name)!r}"
            )
    if (
        saved.get("batch_size") is not None
        and expected["batch_size"] is not None
        and saved["batch_size"] != expected["batch_size"]
    ):
        problems.append(
            f"batch size: checkpoint {saved['batch_size']}, sampler {expected['batch_size']}"
        )
    if saved.get("typed_keys", {}) != expected["typed_keys"]:
        problems.append(
            f"PRNG keys: checkpoint has typed keys {saved.get('typed_keys', {})}, `like` "
            f"{expected['typed_keys']} (typed jax.random.key vs raw uint32 PRNGKey, or "
            f"another implementation)"
        )
    saved_leaves = {leaf["path"]: leaf for leaf in saved.get("leaves", [])}
    expected_leaves = {leaf["path"]: leaf for leaf in expected["leaves"]}
    missing = [path for path in expected_leaves if path not in saved_leaves]
    extra = [path for path in saved_leaves if path not in expected_leaves]
    if missing:
        problems.append(
            f"{len(missing)} arrays of `like` are not in the checkpoint (a different model, "
            f"optimizer or sampler?): {', '.join(missing[:_MAX_LISTED])}"
        )
    if extra:
        problems.append(
            f"{len(extra)} arrays of the checkpoint are not in `like`: "
            f"{', '.join(extra[:_MAX_LISTED])}"
        )
    mismatched = [
        f"{path} checkpoint {saved_leaves[path]['dtype']}{tuple(saved_leaves[path]['shape'])} "
        f"vs `like` {leaf['dtype']}{tuple(leaf['shape'])}"
        for path, leaf in expected_leaves.items()
        if path in saved_leaves
        and (saved_leaves[path]["shape"] != leaf["shape"]
             or saved_leaves[path]["dtype"] != leaf["dtype"])
    ]
    if mismatched:
        problems.append(
            f"{len(mismatched)} arrays differ in shape or dtype: "
            f"{'; '.join(mismatched[:_MAX_LISTED])}"
        )
    return problems


def _abstract(like_raw_leaf: Any, like_leaf: Any) -> jax.ShapeDtypeStruct:
    """What orbax should restore a leaf as: shape, dtype and the sharding of ``like``."""
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(like_raw_leaf.shape, like_raw_leaf.dtype, sharding=sharding)


def _abstract_raw_tree(like: TrainState) -> Any:
    raw = jax.eval_shape(_raw_keys, like)
    leaves, treedef = jax.tree.flatten(raw)
    like_leaves = jax.tree.leaves(like)
    if len(like_leaves) != len(leaves):  # cannot happen: key_data keeps one leaf per key
        raise AssertionError("key conversion changed the number of leaves")
    return jax.tree.unflatten(treedef, [_abstract(a, b) for a, b in zip(leaves, like_leaves)])


def _rewrap_keys(restored_raw: Any, like: TrainState) -> TrainState:
    like_leaves, treedef = jax.tree.flatten(like)
    raw_leaves = jax.tree.leaves(restored_raw)
    if len(raw_leaves) != len(like_leaves):
        raise ValueError(
            f"restore_checkpoint: the checkpoint gave {len(raw_leaves)} arrays, `like` has "
            f"{len(like_leaves)}"
        )
    leaves = [
        jax.random.wrap_key_data(raw, impl=_key_impl_name(template)) if _is_key(template) else raw
        for raw, template in zip(raw_leaves, like_leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _check_path(path: Any, name: str = "path") -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{name} must be a non-empty str or os.PathLike, got {path!r}")
    return pathlib.Path(os.path.abspath(os.fspath(path)))


def _check_extra(extra_metadata: Any) -> dict:
    if extra_metadata is None:
        return {}
    if not isinstance(extra_metadata, Mapping):
        raise TypeError(
            f"extra_metadata must be a dict of JSON values or None, got "
            f"{type(extra_metadata).__name__}"
        )
    try:
        json.dumps(dict(extra_metadata))
    except (TypeError, ValueError) as error:
        raise TypeError(f"extra_metadata must be JSON-serializable: {error}") from None
    return dict(extra_metadata)


def _save_args(state: TrainState, metadata: dict) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{
            _STATE_ITEM: ocp.args.StandardSave(_raw_keys(state)),
            _METADATA_ITEM: ocp.args.JsonSave(metadata),
        }
    )


def _verify(saved: dict, like: TrainState, sampler: Any, where: str) -> None:
    if saved.get("library") != "adambs_jax" or "leaves" not in saved:
        raise ValueError(f"{where} is not an adambs_jax checkpoint (no adambs_jax metadata)")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{where} has checkpoint format {saved.get('format')}, this version reads "
            f"{CHECKPOINT_FORMAT}"
        )
    problems = _differences(saved, describe_state(like, sampler=sampler))
    if problems:
        raise ValueError(
            f"{where} does not fit the template `like`; refusing to restore it:\n  - "
            + "\n  - ".join(problems)
        )


# ----------------------------------------------------------------------------- public API


def save_checkpoint(
    path: PathLike,
    state: TrainState,
    *,
    sampler: Any = None,
    extra_metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``state`` (every array) and its metadata to the directory ``path`` (orbax).

    Synchronous: when it returns the checkpoint is complete on disk (orbax writes to a
    temporary directory and renames it, so a crash never leaves a half checkpoint at
    ``path``), and ``state`` may be donated to the next step.

    Args:
      path: the checkpoint directory; must not exist unless ``overwrite``.
      state: a ``TrainState`` (its arrays may be sharded or replicated over a mesh).
      sampler: optional; records ``sampler.batch_size`` so that a restore with a sampler of
        another batch size is refused.
      extra_metadata: optional JSON-serializable dict stored under ``"extra"`` (e.g. the
        epoch, the config of the run); ``read_checkpoint_metadata`` returns it.
      overwrite: replace an existing checkpoint at ``path``.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      TypeError: ``state`` is not a ``TrainState``, ``path`` is not a path,
        ``extra_metadata`` is not a JSON-serializable dict, ``overwrite`` is not a bool.
      ValueError: ``path`` exists and ``overwrite`` is False.
    """
    _check_train_state(state, "state")
    path = _check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    metadata = describe_state(state, sampler=sampler)
    metadata["extra"] = _check_extra(extra_metadata)
    if path.exists() and not overwrite:
        raise ValueError(
            f"path: a checkpoint (or file) already exists at {path}; pass overwrite=True to "
            f"replace it"
        )
    _checkpointer().save(path, _save_args(state, metadata), force=overwrite)
    return path


def read_checkpoint_metadata(path: PathLike) -> dict:
    """The metadata of a checkpoint (see ``describe_state``; plus ``"extra"``), no arrays.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
    """
    path = _check_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: no checkpoint directory at {path}")
    if not (path / _METADATA_ITEM).exists():
        raise ValueError(f"path: {path} is not an adambs_jax checkpoint (no {_METADATA_ITEM})")
    restored = _checkpointer().restore(
        path, ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
    )
    return dict(restored[_METADATA_ITEM])


def restore_checkpoint(path: PathLike, like: TrainState, *, sampler: Any = None) -> TrainState:
    """Reads the checkpoint at ``path`` into a ``TrainState`` shaped like ``like``.

    ``like`` is a template: a fresh ``TrainState.create(...)`` with the same model, optimizer
    and sampler (its values are not used; an abstract one from ``jax.eval_shape`` works
    too). The restored arrays get the shardings of ``like``'s arrays (replicated over a mesh
    if ``like`` was ``ab.replicate``-d; one device otherwise).

    Args:
      path: a directory written by ``save_checkpoint`` (or a ``CheckpointManager`` step).
      like: the template ``TrainState``.
      sampler: optional; if given (and the checkpoint recorded a batch size) its
        ``batch_size`` must match.

    Returns:
      The restored ``TrainState``: same pytree structure, dtypes and key types as ``like``.

    Raises:
      FileNotFoundError: nothing at ``path``.
      TypeError: ``like`` is not a ``TrainState``.
      ValueError: the checkpoint does not fit ``like``: another sampler kind (e.g. exp3 vs
        uniform), dataset size ``num_examples``, ``p_min``, batch size, typed vs raw PRNG
        key, or arrays of other paths, shapes or dtypes (another model or optimizer). The
        message lists every difference; nothing is loaded.
    """
    _check_train_state(like, "like")
    path = _check_path(path)
    saved = read_checkpoint_metadata(path)
    _verify(saved, like, sampler, f"the checkpoint at {path}")
    restored = _checkpointer().restore(
        path,
        ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(_abstract_raw_tree(like))}),
    )
    return _rewrap_keys(restored[_STATE_ITEM], like)


class CheckpointManager:
    """Periodic checkpoints of a training run under one directory, keeping the last few, and
    resuming from the latest: a thin wrapper of ``orbax.checkpoint.CheckpointManager`` that
    stores and checks the same metadata as ``save_checkpoint``.

        manager = ab.CheckpointManager("/ckpt/run1", max_to_keep=3, sampler=sampler)
        state = manager.restore_latest(like) or like        # None if nothing saved yet
        for t in range(int(state.step), num_steps):
            state, metrics = step(state, data, jax.random.fold_in(key, t))
            if (t + 1) % 1000 == 0:
                manager.save(t + 1, state)
        manager.close()

    Saves are synchronous (complete when ``save`` returns), so the state may be donated to
    the next step right away.

    Args:
      directory: the run's directory; step s is saved in ``directory/s``.
      max_to_keep: keep the newest this many checkpoints (None: all).
      sampler: optional, as for ``save_checkpoint`` / ``restore_checkpoint``.
    """

    def __init__(self, directory: PathLike, *, max_to_keep: Optional[int] = 3, sampler: Any = None):
        self.directory = _check_path(directory, "directory")
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be an int >= 1 or None, got {max_to_keep!r}")
        self.sampler = sampler
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
            item_names=(_STATE_ITEM, _METADATA_ITEM),
        )

    def save(
        self, step: int, state: TrainState, *, extra_metadata: Optional[Mapping[str, Any]] = None
    ) -> None:
        """Saves ``state`` as step ``step`` (an int >= 0, e.g. ``int(state.step)``).

        Raises:
          ValueError: ``step`` is negative or already saved. TypeError: bad ``state``.
        """
        _check_train_state(state, "state")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if int(step) in self.all_steps():
            raise ValueError(f"step: a checkpoint of step {int(step)} already exists")
        metadata = describe_state(state, sampler=self.sampler)
        metadata["extra"] = _check_extra(extra_metadata)
        self._manager.save(int(step), args=_save_args(state, metadata), force=True)
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(int(step) for step in self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """Restores step ``step`` (default: the latest), checked against ``like`` exactly as
        ``restore_checkpoint`` does.

        Raises:
          FileNotFoundError: no checkpoint (of that step). ValueError: it does not fit ``like``.
        """
        _check_train_state(like, "like")
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if int(step) not in self.all_steps():
            raise FileNotFoundError(
                f"step: no checkpoint of step {step} in {self.directory} (saved: "
                f"{self.all_steps()})"
            )
        saved = self._manager.restore(
            int(step), args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
        )[_METADATA_ITEM]
        where = f"the checkpoint of step {step} in {self.directory}"
        _verify(dict(saved), like, self.sampler, where)
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{_STATE_ITEM: ocp.args.StandardRestore(_abstract_raw_tree(like))}
            ),
        )
        return _rewrap_keys(restored[_STATE_ITEM], like)

    def restore_latest(self, like: TrainState) -> Optional[TrainState]:
        """``restore(like)`` of the latest step, or None if nothing was saved yet."""
        if self.latest_step() is None:
            return None
        return self.restore(like)

    def close(self) -> None:
        """Waits for pending writes and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
