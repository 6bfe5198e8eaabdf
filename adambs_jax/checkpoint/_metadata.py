"""What a checkpoint says about itself, and whether it fits a template.

``describe_state`` turns a ``TrainState`` into the JSON metadata stored next to its arrays
(library version, sampler kind and static configuration, batch size, step, every leaf's
path, shape and dtype, and the path of every subtree without arrays); ``verify_metadata``
compares a checkpoint's metadata with a template's and refuses a mismatch with a
``ValueError`` listing every difference (those of the optimizer state named as such),
before a single array is read. What a restore may take from the sampler configured now is the
sampler state's to say (``adambs_jax.samplers.SamplerStateBase``): its
``reconfigurable_fields`` (exp3: the tree's ``arity``, the ``bound_mode``) are not
compared, nor the shapes of its ``rebuilt_fields`` (the tree of another arity). No file is
touched here: ``_checkpoint`` does the reading and writing, ``_restore`` the reconciling.

PRNG keys: typed keys (``jax.random.key``) are stored as their raw uint32 data
(``raw_keys``) with the implementation's name in the metadata, and rewrapped on restore
(``rewrap_keys``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, cast

import jax
import numpy as np

from adambs_jax._checks import is_prng_key
from adambs_jax._jsonable import to_jsonable
from adambs_jax.samplers import SamplerStateBase
from adambs_jax.step import TrainState
from adambs_jax.version import __version__

__all__ = [
    "CHECKPOINT_FORMAT",
    "is_sampler_state",
    "sampler_states",
    "describe_state",
    "metadata_differences",
    "rebuilt_paths",
    "reconfigurable_names",
    "verify_metadata",
    "raw_keys",
    "rewrap_keys",
    "check_train_state",
]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; bumped if it changes incompatibly."""

_MAX_LISTED = 6  # differences listed per kind in an error message
_OPTIMIZER_PATH = ".opt_state"  # TrainState's optimizer state, as ``keystr`` names it
_EMPTY = "empty_subtrees"


def is_sampler_state(node: Any) -> bool:
    return isinstance(node, SamplerStateBase)


def config_prefix(path) -> str:
    """The prefix of a sampler state's static fields in the metadata's ``sampler_config``
    (``describe_state`` names them from ``state.sampler_state`` down: ``""``, ``"base."``)."""
    names = [
        str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key)))) for key in path[1:]
    ]
    return "".join(f"{name}." for name in names)


def sampler_states(tree: Any, prefix: tuple = ()) -> list:
    """``[(path, state)]`` of every library sampler state in ``tree`` (a ``TrainState``),
    the states inside a state too (a groups sampler's base)."""
    found = []

    def is_inner(node: Any) -> bool:
        return node is not tree and is_sampler_state(node)

    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_inner)[0]:
        if is_inner(node):
            found.append((prefix + path, node))
            found += sampler_states(node, prefix + path)
    return found


def rebuilt_paths(tree: Any) -> set:
    """The leaf paths (``keystr``) whose stored shape may differ from ``tree``'s: each
    sampler state's ``rebuilt_fields`` (a tree of another arity, rebuilt on restore)."""
    return {
        jax.tree_util.keystr(path) + "." + field
        for path, state in sampler_states(tree)
        for field in type(state).rebuilt_fields
    }


def reconfigurable_names(tree: Any) -> set:
    """The ``sampler_config`` names a restore takes from the sampler configured now (each
    sampler state's ``reconfigurable_fields``), so not compared with the checkpoint's."""
    return {
        config_prefix(path) + field
        for path, state in sampler_states(tree)
        for field in type(state).reconfigurable_fields
    }


def _json_value(value: Any) -> Any:
    # NaN/inf stay as they are (json writes them), as the metadata always did.
    return to_jsonable(value, nonfinite_as_none=False)


def _key_impl_name(leaf: Any) -> str:
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return str(jax.random.key_impl(leaf))
    impl = getattr(leaf.dtype, "_impl", None)  # an abstract key (jax.eval_shape) has no API
    return str(getattr(impl, "name", leaf.dtype))


def raw_keys(tree: Any) -> Any:
    """Typed PRNG key leaves replaced by their uint32 data (works on abstract trees too)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if is_prng_key(leaf) else leaf, tree)


def rewrap_keys(restored_raw: Any, like: TrainState) -> TrainState:
    """The inverse of ``raw_keys``: leaves that are typed keys in ``like`` rewrapped (with
    ``like``'s implementation) around the restored uint32 data."""
    like_leaves, treedef = jax.tree.flatten(like)
    raw_leaves = jax.tree.leaves(restored_raw)
    if len(raw_leaves) != len(like_leaves):
        raise ValueError(
            f"restore_checkpoint: the checkpoint gave {len(raw_leaves)} arrays, `like` has "
            f"{len(like_leaves)}"
        )
    leaves = [
        jax.random.wrap_key_data(raw, impl=_key_impl_name(template))
        if is_prng_key(template)
        else raw
        for raw, template in zip(raw_leaves, like_leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


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
        for name in cast(Any, obj)._fields:  # pyright does not narrow a tuple by hasattr
            config.update(_static_config(getattr(obj, name), f"{prefix}{name}."))
    elif isinstance(obj, Mapping):
        for name, value in obj.items():
            config.update(_static_config(value, f"{prefix}{name}."))
    return config


def _host_int(value: Any) -> int | None:
    if value is None or isinstance(value, jax.ShapeDtypeStruct):
        return None
    if isinstance(value, jax.Array):  # a replicated array may span hosts: read a local copy
        value = value.addressable_data(0)
    return int(np.asarray(value))


def _is_empty_subtree(node: Any) -> bool:
    """A node without arrays (optax's ``EmptyState()``, None, ``{}``): no leaf records it,
    but it is part of the tree structure orbax restores into."""
    return not isinstance(node, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) and not (
        jax.tree.leaves(node)
    )


def _type_name(node: Any) -> str:
    return "None" if node is None else type(node).__name__


def check_train_state(state: Any, name: str) -> None:
    """Raises TypeError (naming ``name``) unless ``state`` is an ``ab.TrainState``."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"{name} must be an ab.TrainState (TrainState.create(...)), got {type(state).__name__}"
        )


def describe_state(state: TrainState, *, sampler: Any = None) -> dict:
    """The metadata stored with a checkpoint of ``state`` (JSON-serializable).

    Keys: ``format``, ``library``, ``version``, ``sampler_kind`` (class name of
    ``state.sampler_state``), ``sampler_config`` (its static fields: ``num_examples``,
    ``p_min``, ...), ``batch_size`` (``sampler.batch_size`` if ``sampler`` is given, else
    None), ``step``, ``skipped_steps``, ``typed_keys`` ({leaf path: PRNG implementation} of
    typed keys), ``leaves`` (path, shape, dtype of every array, keys as raw data) and
    ``empty_subtrees`` (path and type of every node without arrays, e.g. optax's
    ``EmptyState()``: with the leaves, the tree's structure).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adambs_jax as ab
      >>> state = ab.TrainState.create(params={"w": jnp.zeros(3)}, optimizer=optax.sgd(0.1),
      ...                              sampler=ab.uniform_sampler(10, 2))
      >>> meta = ab.checkpoint.describe_state(state)
      >>> meta["sampler_kind"], meta["sampler_config"], meta["step"]
      ('UniformSamplerState', {'num_examples': 10}, 0)
    """
    check_train_state(state, "state")
    typed_keys = {
        jax.tree_util.keystr(path): _key_impl_name(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if is_prng_key(leaf)
    }
    raw = jax.eval_shape(raw_keys, state)
    leaves = [
        {"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        for path, leaf in jax.tree_util.tree_flatten_with_path(raw)[0]
    ]
    empty = [
        {"path": jax.tree_util.keystr(path), "type": _type_name(node)}
        for path, node in jax.tree_util.tree_flatten_with_path(raw, is_leaf=_is_empty_subtree)[0]
        if _is_empty_subtree(node)
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
        _EMPTY: empty,
    }


def _sampler_differences(saved: dict, expected: dict, reconfigurable=frozenset()) -> list[str]:
    problems = []
    if saved.get("sampler_kind") != expected["sampler_kind"]:
        problems.append(
            f"sampler kind: checkpoint {saved.get('sampler_kind')}, `like` "
            f"{expected['sampler_kind']}"
        )
    saved_config, expected_config = saved.get("sampler_config", {}), expected["sampler_config"]
    for name in sorted(set(saved_config) | set(expected_config)):
        if name in reconfigurable:
            continue  # the new sampler's (the state's restored)
        if saved_config.get(name) != expected_config.get(name):
            label = "dataset size (num_examples)" if name.endswith("num_examples") else name
            stored = (
                repr(saved_config[name])
                if name in saved_config
                else "not recorded (written by an earlier version)"
            )
            problems.append(
                f"sampler {label}: checkpoint {stored}, `like` {expected_config.get(name)!r}"
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
    return problems


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _in_optimizer(path: str) -> bool:
    rest = path[len(_OPTIMIZER_PATH) :]
    return path.startswith(_OPTIMIZER_PATH) and (not rest or rest[0] in ".[")


def _only_in(ours: dict, theirs: dict) -> list[tuple[str, str]]:
    """``(path, label)`` of the entries of ``ours`` that ``theirs`` lacks."""
    return [(path, label) for path, label in ours.items() if path not in theirs]


def _empty_labels(metadata: dict) -> dict:
    return {e["path"]: f"{e['path']} ({e['type']}, no arrays)" for e in metadata[_EMPTY]}


def _optimizer_differences(missing: list, extra: list) -> list[str]:
    """One line for the arrays and empty subtrees only one side's optimizer state has (adam
    vs adamw: adamw's chain has one more, empty, state)."""
    missing = [label for path, label in missing if _in_optimizer(path)]
    extra = [label for path, label in extra if _in_optimizer(path)]
    if not missing and not extra:
        return []
    sides = [f"in `like`, not in the checkpoint: {_listed(missing)}"] if missing else []
    sides += [f"in the checkpoint, not in `like`: {_listed(extra)}"] if extra else []
    return [
        "the optimizer states differ (another optimizer, or optax chain, than the "
        "checkpoint's): " + "; ".join(sides)
    ]


def _structure_differences(saved: dict, expected: dict) -> list[str]:
    """What only one side has: arrays and (when the checkpoint recorded them) subtrees
    without arrays; the optimizer state's named as such."""
    saved_leaves = {leaf["path"]: leaf["path"] for leaf in saved.get("leaves", [])}
    expected_leaves = {leaf["path"]: leaf["path"] for leaf in expected["leaves"]}
    missing = _only_in(expected_leaves, saved_leaves)
    extra = _only_in(saved_leaves, expected_leaves)
    missing_empty, extra_empty = [], []
    if _EMPTY in saved:  # a checkpoint of an earlier version has none recorded
        saved_empty, expected_empty = _empty_labels(saved), _empty_labels(expected)
        missing_empty = _only_in(expected_empty, saved_empty)
        extra_empty = _only_in(saved_empty, expected_empty)
    problems = _optimizer_differences(missing + missing_empty, extra + extra_empty)
    for kind, only in [("arrays", missing), ("subtrees without arrays", missing_empty)]:
        others = [label for path, label in only if not _in_optimizer(path)]
        if others:
            problems.append(
                f"{len(others)} {kind} of `like` are not in the checkpoint (a different model, "
                f"optimizer or sampler?): {_listed(others)}"
            )
    for kind, only in [("arrays", extra), ("subtrees without arrays", extra_empty)]:
        others = [label for path, label in only if not _in_optimizer(path)]
        if others:
            problems.append(
                f"{len(others)} {kind} of the checkpoint are not in `like`: {_listed(others)}"
            )
    return problems


def _leaf_differences(saved: dict, expected: dict, rebuilt: frozenset = frozenset()) -> list[str]:
    saved_leaves = {leaf["path"]: leaf for leaf in saved.get("leaves", [])}
    expected_leaves = {leaf["path"]: leaf for leaf in expected["leaves"]}
    problems = _structure_differences(saved, expected)
    mismatched = [
        f"{path} checkpoint {saved_leaves[path]['dtype']}{tuple(saved_leaves[path]['shape'])} "
        f"vs `like` {leaf['dtype']}{tuple(leaf['shape'])}"
        for path, leaf in expected_leaves.items()
        if path in saved_leaves
        and (
            (saved_leaves[path]["shape"] != leaf["shape"] and path not in rebuilt)
            or saved_leaves[path]["dtype"] != leaf["dtype"]
        )
    ]
    if mismatched:
        problems.append(
            f"{len(mismatched)} arrays differ in shape or dtype: "
            f"{'; '.join(mismatched[:_MAX_LISTED])}"
        )
    return problems


def metadata_differences(
    saved: dict,
    expected: dict,
    rebuilt: Iterable[str] = frozenset(),
    reconfigurable: Iterable[str] = frozenset(),
) -> list[str]:
    """Human-readable differences between a checkpoint's metadata ``saved`` and a
    template's ``expected`` (both as ``describe_state`` returns them); empty if it fits.
    ``rebuilt``: leaf paths whose shape may differ (``rebuilt_paths``); ``reconfigurable``:
    static sampler fields not compared (``reconfigurable_names``)."""
    return _sampler_differences(saved, expected, frozenset(reconfigurable)) + _leaf_differences(
        saved, expected, frozenset(rebuilt)
    )


def verify_metadata(saved: dict, like: TrainState, sampler: Any, where: str) -> None:
    """Raises ValueError (naming ``where``) unless the checkpoint metadata ``saved`` fits
    the template ``like`` (and ``sampler``'s batch size, when both are known)."""
    if saved.get("library") != "adambs_jax" or "leaves" not in saved:
        raise ValueError(f"{where} is not an adambs_jax checkpoint (no adambs_jax metadata)")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{where} has checkpoint format {saved.get('format')}, this version reads "
            f"{CHECKPOINT_FORMAT}"
        )
    expected = describe_state(like, sampler=sampler)
    problems = metadata_differences(
        saved, expected, rebuilt_paths(like), reconfigurable_names(like)
    )
    if problems:
        raise ValueError(
            f"{where} does not fit the template `like`; refusing to restore it:\n  - "
            + "\n  - ".join(problems)
        )
