"""The storage side of checkpoints: orbax items, one writer at a time, whole checkpoints or
none, and storage-layer errors that name the checkpoint.

A checkpoint directory holds two orbax items: ``state`` (the arrays, orbax's
``StandardSave``: OCDBT/Zarr) and ``adambs_metadata`` (JSON, see
``_metadata``).

Concurrent saves (one process per job): ``exclusive_save_lock`` creates the lock file
``<path>.adambs-lock`` with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems),
so a second process saving to the same path at the same time is refused with a
``ValueError`` before it writes anything; ``write_atomically`` lets orbax write into a
fresh, uniquely named temporary directory next to the target and renames it into place
only when it is complete (an overwritten checkpoint is replaced only then). So a save that
returns has written its own state, and a save that raises has changed nothing at ``path``.
In a multi-process JAX job every process calls ``save`` with the same path and orbax
coordinates them; the lock and the private temporary directory are then not used.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orbax.checkpoint as ocp

from adambs_jax.checkpoint._metadata import raw_keys

__all__ = [
    "STATE_ITEM",
    "METADATA_ITEM",
    "LOCK_SUFFIX",
    "open_checkpointer",
    "save_args",
    "metadata_restore_args",
    "state_restore_args",
    "exclusive_save_lock",
    "write_atomically",
    "damaged_checkpoint_errors",
]

STATE_ITEM = "state"
METADATA_ITEM = "adambs_metadata"
LOCK_SUFFIX = ".adambs-lock"
_MAX_CAUSE_CHARS = 300  # of a storage-layer message quoted in our error


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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _lock_held_message(path: pathlib.Path, lock: pathlib.Path, name: str) -> str:
    try:
        pid_text, host = lock.read_text().split()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):  # being written by its holder this very moment
        pid, host = None, None
    holder = f" by process {pid} on {host}" if pid is not None else ""
    if pid is not None and host == socket.gethostname() and not _process_alive(pid):
        return (
            f"{name}: a save to {path} was interrupted: its lock file {lock} is held{holder}, "
            f"which is no longer running; delete {lock} and save again"
        )
    return (
        f"{name}: another save to {path} is in progress (lock file {lock}, held{holder}); "
        f"nothing was written. Wait for it to finish and save again, or delete {lock} if no "
        f"save is running (a save that crashed leaves it behind)"
    )


@contextlib.contextmanager
def exclusive_save_lock(path: pathlib.Path, *, name: str = "path") -> Iterator[None]:
    """Holds the lock file ``<path>.adambs-lock`` for the block, or raises ValueError (naming
    ``name``) at once if another save holds it. The lock records pid and host, so the
    message can tell a running save from one that crashed."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ValueError(_lock_held_message(path, lock, name)) from None
    try:
        with os.fdopen(descriptor, "w") as lock_file:
            lock_file.write(f"{os.getpid()} {socket.gethostname()}\n")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def write_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` into a fresh uniquely named directory next to ``path``, then renames
    it to ``path`` (replacing a checkpoint already there only now that the new one is
    complete). Whatever fails, no temporary directory is left behind and ``path`` holds
    either its old content or the new checkpoint."""
    token = uuid.uuid4().hex
    tmp = path.with_name(f".{path.name}.adambs-tmp-{token}")
    old = path.with_name(f".{path.name}.adambs-old-{token}")
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


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > _MAX_CAUSE_CHARS:
        text = text[:_MAX_CAUSE_CHARS] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def damaged_checkpoint_errors(where: str, *, name: str = "path") -> Iterator[None]:
    """Turns any error of the storage layer (orbax, TensorStore, JSON) raised in the block
    into a ValueError that names the checkpoint ``where`` and says what to do; the original
    error stays attached as ``__cause__``."""
    try:
        yield
    except Exception as error:  # TensorStore raises bare Exception and ValueError alike
        raise ValueError(
            f"{name}: {where} is damaged or incomplete and cannot be read "
            f"({_first_line(error)}). Nothing was loaded; restore an earlier checkpoint, or "
            f"save this one again"
        ) from error
