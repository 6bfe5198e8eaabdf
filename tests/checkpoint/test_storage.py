"""Tests of adambs_jax.checkpoint_storage: the save lock, atomic writes, storage errors."""

import json
import os
import socket
import subprocess
import time

import pytest

from adambs_jax.checkpoint import _lock as lock_module
from adambs_jax.checkpoint import _storage as storage


def _write_files(content):
    def write(tmp):
        tmp.mkdir()
        (tmp / "data").write_text(content)

    return write


def test_write_atomically_replaces_only_with_a_complete_directory(tmp_path):
    path = tmp_path / "c"
    storage.write_atomically(path, _write_files("first"))
    assert (path / "data").read_text() == "first"

    def fails_half_way(tmp):
        _write_files("second")(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_atomically(path, fails_half_way)
    assert (path / "data").read_text() == "first"  # the old checkpoint survives
    storage.write_atomically(path, _write_files("third"))
    assert (path / "data").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary left


def test_the_lock_is_exclusive_and_released_however_the_block_ends(tmp_path):
    path = tmp_path / "c"
    lock = tmp_path / f"c{storage.LOCK_SUFFIX}"
    with storage.exclusive_save_lock(path):
        pid, host = lock.read_text().split()[:2]
        assert (int(pid), host) == (os.getpid(), socket.gethostname())
        with pytest.raises(ValueError, match=r"path: another save to .* is in progress"):
            with storage.exclusive_save_lock(path):
                pass
        assert lock.exists()  # the refused attempt did not remove the holder's lock
    assert not lock.exists()
    with pytest.raises(RuntimeError):
        with storage.exclusive_save_lock(path, name="directory"):
            raise RuntimeError
    assert not lock.exists()


def test_a_lock_being_written_is_still_reported(tmp_path):
    (tmp_path / f"c{storage.LOCK_SUFFIX}").write_text("")  # holder between open and write
    with pytest.raises(ValueError, match=r"directory: another save to .* is in progress"):
        with storage.exclusive_save_lock(tmp_path / "c", name="directory"):
            pass


def _dead_pid():
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _take(path, name="path"):
    with storage.exclusive_save_lock(path, name=name):
        lock = path.with_name(path.name + storage.LOCK_SUFFIX)
        assert int(lock.read_text().split()[0]) == os.getpid()  # ours now
    assert not lock.exists()


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning(tmp_path):
    """A regression: the lock of a save killed outright refused every later save. Gone:
    the pid is not running, or it now names another process (another start time)."""
    lock = tmp_path / f"c{storage.LOCK_SUFFIX}"
    host = socket.gethostname()
    own_identity = lock_module._process_identity(os.getpid())
    stale_lines = {
        "dead pid": f"{_dead_pid()} {host} 1@boot\n",
        "dead pid, old format": f"{_dead_pid()} {host}\n",
    }
    if own_identity is not None:  # Linux: a pid reused by a live process is told apart
        stale_lines["reused pid"] = f"{os.getpid()} {host} 0@another-boot\n"
    for why, line in stale_lines.items():
        lock.write_text(line)
        with pytest.warns(storage.StaleLockWarning, match=r"no longer running; removed"):
            _take(tmp_path / "c")
        assert not (tmp_path / f"c{storage.LOCK_SUFFIX}.takeover").exists(), why
    lock.write_text("")  # its holder died between creating and writing it
    old = time.time() - lock_module.STALE_EMPTY_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(storage.StaleLockWarning):
        _take(tmp_path / "c")


def test_a_live_or_foreign_lock_is_never_taken(tmp_path):
    lock = tmp_path / f"c{storage.LOCK_SUFFIX}"
    identity = lock_module._process_identity(os.getpid()) or "-"
    for line, match in [
        (f"{os.getpid()} {socket.gethostname()} {identity}\n", "is in progress"),  # live
        (f"{_dead_pid()} another-host 1@boot\n", "another host"),  # cannot be checked here
    ]:
        lock.write_text(line)
        with pytest.raises(ValueError, match=match):
            with storage.exclusive_save_lock(tmp_path / "c"):
                pass
        assert lock.read_text() == line  # untouched
    # a stale lock that another process is taking over right now is left to it
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    takeover = tmp_path / f"c{storage.LOCK_SUFFIX}.takeover"
    takeover.write_text(f"{os.getpid()} {socket.gethostname()} {identity}\n")
    with pytest.raises(ValueError, match="is in progress"):
        with storage.exclusive_save_lock(tmp_path / "c"):
            pass
    takeover.write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # died taking it over
    with pytest.warns(storage.StaleLockWarning):
        _take(tmp_path / "c")
    assert not takeover.exists()


def test_remove_leftovers_puts_a_moved_aside_checkpoint_back_and_deletes_the_rest(tmp_path):
    path = tmp_path / "c"
    (tmp_path / ".c.adambs-old-1").mkdir()
    (tmp_path / ".c.adambs-old-1" / "data").write_text("previous")
    (tmp_path / ".c.adambs-tmp-2.orbax-checkpoint-tmp").mkdir()
    (tmp_path / ".c.adambs-tmp-3").mkdir()
    (tmp_path / ".cd.adambs-tmp-4").mkdir()  # another checkpoint's: not ours to delete
    assert storage.interrupted_replace(path)
    with pytest.warns(storage.StaleLockWarning, match="previous checkpoint is back"):
        storage.remove_leftovers(path)
    assert (path / "data").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cd.adambs-tmp-4", "c"]
    (tmp_path / ".c.adambs-old-5").mkdir()  # killed after the new one was in place
    assert not storage.interrupted_replace(path)
    storage.remove_leftovers(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cd.adambs-tmp-4", "c"]
    run = tmp_path / "run"
    for name in ["3", "4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1234"]:
        (run / name).mkdir(parents=True)
    storage.remove_orbax_leftovers(run)
    assert sorted(p.name for p in run.iterdir()) == ["3"]


def test_storage_errors_name_the_checkpoint_and_keep_the_cause():
    cause = json.JSONDecodeError("Expecting value", "x", 0)
    with pytest.raises(
        ValueError,
        match=r"path: the checkpoint at /x is damaged or incomplete "
        r"and cannot be read \(JSONDecodeError: Expecting",
    ) as info:
        with storage.damaged_checkpoint_errors("the checkpoint at /x"):
            raise cause
    assert info.value.__cause__ is cause
    with pytest.raises(ValueError, match=r"\(Exception: " + "y" * 300 + r"\.\.\.\)"):
        with storage.damaged_checkpoint_errors("the checkpoint at /x"):
            raise Exception("y" * 1000 + "\nsecond line")  # TensorStore raises bare Exception


def test_open_checkpointer_closes_it(monkeypatch):
    closed = []
    with storage.open_checkpointer() as checkpointer:
        monkeypatch.setattr(checkpointer, "close", lambda: closed.append(True))
    assert closed == [True]


def test_a_save_cleans_what_dead_saves_to_other_paths_left(tmp_path):
    host, token = socket.gethostname(), "0" * 32
    (tmp_path / f"x{storage.LOCK_SUFFIX}").write_text(f"{_dead_pid()} {host}\n")  # died
    (tmp_path / f".x.adambs-tmp-{token}.orbax-checkpoint-tmp").mkdir()
    (tmp_path / f".w.adambs-tmp-{token}").mkdir()  # its lock deleted by hand
    (tmp_path / f"y{storage.LOCK_SUFFIX}").write_text(f"{os.getpid()} {host}\n")  # saving now
    (tmp_path / f".y.adambs-tmp-{token}").mkdir()
    with pytest.warns(storage.StaleLockWarning, match="/x was interrupted"):
        storage.remove_neighbours_leftovers(tmp_path / "z")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".y.adambs-tmp-{token}",
        f"y{storage.LOCK_SUFFIX}",
    ]
