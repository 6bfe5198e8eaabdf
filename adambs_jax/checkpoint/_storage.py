"""The storage side of checkpoints: orbax items, one writer at a time, whole checkpoints or
none, and storage-layer errors that name the checkpoint.

A checkpoint directory holds two orbax items: ``state`` (the arrays, orbax's
``StandardSave``: OCDBT/Zarr) and ``adambs_metadata`` (JSON, see
``_metadata``).

Concurrent saves (one process per job): ``exclusive_save_lock`` (``_lock``) holds the lock
file ``<path>.adambs-lock``, so a second process saving to the same path at the same time is
refused with a ``ValueError`` before it writes anything (a lock whose holder died on this
host is taken over, with a ``StaleLockWarning``); ``write_atomically`` lets orbax write into
a fresh, uniquely named temporary directory next to the target and renames it into place
only when it is complete (an overwritten checkpoint is replaced only then). So a save that
returns has written its own state, and a save that raises has changed nothing at ``path``.

A save that is killed (SIGKILL: nothing runs) leaves its temporary directories behind, and,
killed between its two renames, the previous checkpoint moved aside. The next save to that
path holds the lock, so every such leftover is a dead writer's: ``remove_leftovers`` puts a
checkpoint moved aside back (the killed save changed nothing) and deletes the rest, and
``remove_neighbours_leftovers`` does the same for the other paths of the directory;
``remove_orbax_leftovers`` deletes the unfinished steps (``*.orbax-checkpoint-tmp*``) of a
``CheckpointManager``'s directory. Nothing half-written is ever renamed into place.

In a multi-process JAX job every process calls ``save`` with the same path and orbax
coordinates them; the lock and the private temporary directory are then not used.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import orbax.checkpoint as ocp

from adambs_jax.checkpoint._lock import LOCK_SUFFIX, StaleLockWarning, exclusive_save_lock
from adambs_jax.checkpoint._metadata import raw_keys

__all__ = [
    "STATE_ITEM",
    "METADATA_ITEM",
    "LOCK_SUFFIX",
    "StaleLockWarning",
    "open_checkpointer",
    "save_args",
    "metadata_restore_args",
    "state_restore_args",
    "exclusive_save_lock",
    "write_atomically",
    "interrupted_replace",
    "remove_leftovers",
    "remove_neighbours_leftovers",
    "remove_orbax_leftovers",
    "damaged_checkpoint_errors",
]

STATE_ITEM = "state"
METADATA_ITEM = "adambs_metadata"
_MAX_CAUSE_CHARS = 300  # of a storage-layer message quoted in our error
_TMP, _OLD = "tmp", "old"  # write_atomically's private directories: .<name>.adambs-<kind>-<token>
_LEFTOVER_NAME = re.compile(r"\.(.+)\.adambs-(?:tmp|old)-[0-9a-f]{32}")  # -> the path's name
_ORBAX_STRUCTURE_MISMATCH = "tree structures do not match"  # orbax: intact, another tree
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # an orbax directory not yet complete ends so (or -<n>)


@contextlib.contextmanager
def open_checkpointer() -> Iterator[ocp.Checkpointer]:
    """A synchronous orbax checkpointer of the two items, closed (its handler's threads
    released) however the block ends."""
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        yield checkpointer
    finally:
        checkpointer.close()


def save_args(state: Any, metadata: dict) -> ocp.args.Composite:
    """Orbax arguments that write ``state`` (typed keys as raw data) and ``metadata``."""
    return ocp.args.Composite(
        **{
            STATE_ITEM: ocp.args.StandardSave(raw_keys(state)),
            METADATA_ITEM: ocp.args.JsonSave(metadata),
        }
    )


def metadata_restore_args() -> ocp.args.Composite:
    """Orbax arguments that read only the metadata item."""
    return ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})


def state_restore_args(abstract_raw_state: Any) -> ocp.args.Composite:
    """Orbax arguments that read the arrays as ``abstract_raw_state`` (shapes, dtypes and
    shardings of ``jax.ShapeDtypeStruct`` leaves)."""
    return ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_raw_state)})


def write_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` into a fresh uniquely named directory next to ``path``, then renames
    it to ``path`` (replacing a checkpoint already there only now that the new one is
    complete). Whatever fails, no temporary directory is left behind and ``path`` holds
    either its old content or the new checkpoint."""
    token = uuid.uuid4().hex
    tmp = path.with_name(f"{_leftover_prefix(path, _TMP)}{token}")
    old = path.with_name(f"{_leftover_prefix(path, _OLD)}{token}")
    try:
        write(tmp)
        if path.exists():
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if old.exists():
                os.rename(old, path)
            raise
    finally:  # orbax's own temporary directory is named after ours
        for leftover in path.parent.glob(f"{tmp.name}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _leftover_prefix(path: pathlib.Path, kind: str) -> str:
    return f".{path.name}.adambs-{kind}-"


def _leftovers(path: pathlib.Path, kind: str) -> list[pathlib.Path]:
    pattern = glob.escape(_leftover_prefix(path, kind)) + "*"
    return sorted(path.parent.glob(pattern), key=lambda p: p.lstat().st_mtime)


def _remove(entry: pathlib.Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def interrupted_replace(path: pathlib.Path) -> bool:
    """Whether ``path`` is missing because a save replacing it died between its renames
    (the previous checkpoint is still next to it, moved aside)."""
    return not path.exists() and bool(_leftovers(path, _OLD))


def remove_leftovers(path: pathlib.Path) -> None:
    """What dead saves to ``path`` left (call it holding ``path``'s lock): a checkpoint
    moved aside goes back to ``path`` if nothing is there (with a warning), and every
    temporary directory (``write_atomically``'s and orbax's inside it) is deleted."""
    moved_aside = _leftovers(path, _OLD)
    if moved_aside and not path.exists():
        os.rename(moved_aside[-1], path)
        warnings.warn(
            f"path: a save that was replacing the checkpoint at {path} was interrupted; "
            f"the previous checkpoint is back at {path}",
            StaleLockWarning,
            stacklevel=3,
        )
    for entry in _leftovers(path, _TMP) + _leftovers(path, _OLD):
        _remove(entry)


def remove_neighbours_leftovers(path: pathlib.Path) -> None:
    """What dead saves to *other* paths next to ``path`` left (a run that saves to a new
    path each time never saves to a dead save's path again): for each such path, under its
    lock (a stale one taken over, with a warning; a live one skipped), ``remove_leftovers``.
    Errors are ignored: this is housekeeping after a save that succeeded."""
    parent, names = path.parent, set()
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = _LEFTOVER_NAME.match(entry.name)
            if match:
                names.add(match.group(1))
            elif entry.name.endswith(LOCK_SUFFIX):
                names.add(entry.name[: -len(LOCK_SUFFIX)])
    names.discard(path.name)
    for name in sorted(names):
        with contextlib.suppress(ValueError, OSError), exclusive_save_lock(parent / name):
            remove_leftovers(parent / name)


def remove_orbax_leftovers(directory: pathlib.Path) -> None:
    """Deletes the unfinished steps (``<step>.orbax-checkpoint-tmp*``) that a dead
    ``CheckpointManager.save`` left in ``directory`` (call it holding the directory's lock;
    orbax lists no such step, so none is ever restored)."""
    if directory.is_dir():
        for entry in directory.glob(f"*{_ORBAX_TMP}*"):
            _remove(entry)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > _MAX_CAUSE_CHARS:
        text = text[:_MAX_CAUSE_CHARS] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _structure_message(error: ValueError, where: str, name: str) -> str:
    """Orbax's refusal of an intact checkpoint whose tree differs from the target's (only
    reached by a checkpoint that predates ``empty_subtrees`` in the metadata)."""
    lines = [line.strip() for line in str(error).splitlines()[1:]]
    detail = " ".join(line for line in lines if line and not line.startswith("If this"))
    if len(detail) > _MAX_CAUSE_CHARS:
        detail = detail[:_MAX_CAUSE_CHARS] + "..."
    return (
        f"{name}: {where} does not fit the template `like`: the trees differ in structure "
        f"(orbax: {detail}), e.g. another optimizer or optax chain (adam vs adamw) or model. "
        f"The checkpoint is intact; nothing was loaded"
    )


@contextlib.contextmanager
def damaged_checkpoint_errors(where: str, *, name: str = "path") -> Iterator[None]:
    """Turns any error of the storage layer (orbax, TensorStore, JSON) raised in the block
    into a ValueError that names the checkpoint ``where`` and says what to do; the original
    error stays attached as ``__cause__``. Orbax's refusal of a target of another tree
    structure is not damage: its message says the trees differ."""
    try:
        yield
    except Exception as error:  # TensorStore raises bare Exception and ValueError alike
        if isinstance(error, ValueError) and _ORBAX_STRUCTURE_MISMATCH in str(error):
            raise ValueError(_structure_message(error, where, name)) from error
        raise ValueError(
            f"{name}: {where} is damaged or incomplete and cannot be read "
            f"({_first_line(error)}). Nothing was loaded; restore an earlier checkpoint, or "
            f"save this one again"
        ) from error
