"""One writer per checkpoint path: the lock file ``<path>.adambs-lock``, and the recovery of
a lock whose writer died.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) and
holds one line, ``"<pid> <host> <identity>"``: the holder's process id, the host name, and
where ``/proc`` tells it (Linux) the process's start time and the boot's id, so that a pid
reused by another process is not taken for the holder. A save killed while it held the
lock (SIGKILL, a preemption, an OOM kill) cannot remove it; the next save recovers it:

* held by a process of this host that is gone (or whose pid now names another process): the
  lock is stale, removed with a ``StaleLockWarning``, and taken;
* held by a live process, or by any process of another host (whose liveness cannot be
  checked from here): the save is refused with a ``ValueError`` naming the lock and holder;
* empty (its holder is between creating and writing it, microseconds) for more than
  ``STALE_EMPTY_LOCK_S`` seconds: stale (its holder died in between).

Taking over is itself exclusive: the remover first creates ``<lock>.takeover`` (``O_EXCL``),
checks that the lock still holds the dead holder's line, and only then removes it, so two
processes recovering the same stale lock at once cannot both take it. (A remover killed in
those microseconds leaves ``<lock>.takeover`` with its own pid, recovered the same way.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import socket
import time
import warnings
from collections.abc import Iterator

__all__ = ["LOCK_SUFFIX", "STALE_EMPTY_LOCK_S", "StaleLockWarning", "exclusive_save_lock"]

LOCK_SUFFIX = ".adambs-lock"
STALE_EMPTY_LOCK_S = 60.0
"""An empty lock older than this (seconds) lost its holder between creating and writing it."""

_TAKEOVER_SUFFIX = ".takeover"


class StaleLockWarning(UserWarning):
    """A save found what a save that died left behind (its lock; a checkpoint it had moved
    aside) and recovered it before it went ahead."""


@dataclasses.dataclass(frozen=True)
class _Holder:
    """A lock file's content as read: its text, and the pid, host and identity it names
    (all None for an empty or unreadable lock)."""

    text: str
    pid: int | None = None
    host: str | None = None
    identity: str | None = None

    def describe(self) -> str:
        return f" by process {self.pid} on {self.host}" if self.pid is not None else ""


def _process_identity(pid: int) -> str | None:
    """``"<start time>@<boot id>"`` of process ``pid`` (Linux ``/proc``), or None where it
    cannot be read (not Linux; the process is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces
    return f"{fields[19]}@{boot}" if len(fields) > 19 else None  # field 22: starttime


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _holder_line() -> str:
    identity = _process_identity(os.getpid()) or "-"
    return f"{os.getpid()} {socket.gethostname()} {identity}\n"


def _read_holder(lock: pathlib.Path) -> _Holder | None:
    """The holder named in ``lock``; None if there is no lock file (any more)."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    parts = text.split()
    try:
        pid, host = int(parts[0]), parts[1]
    except (IndexError, ValueError):  # being written by its holder this very moment
        return _Holder(text)
    identity = parts[2] if len(parts) > 2 and parts[2] != "-" else None
    return _Holder(text, pid, host, identity)


def _is_stale(holder: _Holder, lock: pathlib.Path) -> bool:
    """Whether the process that wrote ``lock`` is certainly gone."""
    if holder.pid is None:
        try:
            return time.time() - lock.stat().st_mtime > STALE_EMPTY_LOCK_S
        except FileNotFoundError:
            return False
    if holder.host != socket.gethostname():
        return False  # another host's processes cannot be checked from here
    if not _process_alive(holder.pid):
        return True
    now = _process_identity(holder.pid)  # alive: the holder, or a process that reused its pid
    return holder.identity is not None and now is not None and now != holder.identity


def _try_create(lock: pathlib.Path) -> bool:
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as lock_file:
        lock_file.write(_holder_line())
    return True


def _take_takeover(takeover: pathlib.Path) -> bool:
    """Creates ``takeover``, or removes it first if its creator died."""
    if _try_create(takeover):
        return True
    other = _read_holder(takeover)
    if other is not None and not _is_stale(other, takeover):
        return False  # another process is recovering the same lock right now
    with contextlib.suppress(FileNotFoundError):
        takeover.unlink()
    return _try_create(takeover)


def _remove_stale(lock: pathlib.Path, holder: _Holder) -> bool:
    """Removes ``lock`` if it still holds ``holder``'s line (a stale lock), exclusively."""
    takeover = lock.with_name(lock.name + _TAKEOVER_SUFFIX)
    if not _take_takeover(takeover):
        return False
    try:
        current = _read_holder(lock)
        if current is not None and current.text != holder.text:
            return False  # taken over and held by another process meanwhile
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            takeover.unlink()


def _held_message(path: pathlib.Path, lock: pathlib.Path, name: str) -> str:
    holder = _read_holder(lock) or _Holder("")
    if holder.host is not None and holder.host != socket.gethostname():
        return (
            f"{name}: another save to {path} holds its lock file {lock} (held"
            f"{holder.describe()}, another host, so its liveness cannot be checked from "
            f"here); nothing was written. Wait for it to finish and save again, or delete "
            f"{lock} if no save is running there (a save that crashed there leaves it behind)"
        )
    return (
        f"{name}: another save to {path} is in progress (lock file {lock}, held"
        f"{holder.describe()}); nothing was written. Wait for it to finish and save again"
    )


def _acquire(path: pathlib.Path, lock: pathlib.Path, name: str) -> None:
    for _ in range(3):  # the lock may be released, or recovered, between two looks
        if _try_create(lock):
            return
        holder = _read_holder(lock)
        if holder is None:
            continue
        if not _is_stale(holder, lock) or not _remove_stale(lock, holder):
            break
        warnings.warn(
            f"{name}: a save to {path} was interrupted: its lock file {lock} was held"
            f"{holder.describe()}, which is no longer running; removed it (its leftover "
            f"temporary files are removed too) and saving now",
            StaleLockWarning,
            stacklevel=2,
        )
    raise ValueError(_held_message(path, lock, name))


@contextlib.contextmanager
def exclusive_save_lock(path: pathlib.Path, *, name: str = "path") -> Iterator[None]:
    """Holds the lock file ``<path>.adambs-lock`` for the block, or raises ValueError (naming
    ``name``) at once if a live save holds it; takes over a lock whose holder died on this
    host, with a ``StaleLockWarning`` (module docstring)."""
    lock = path.with_name(path.name + LOCK_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    _acquire(path, lock, name)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
