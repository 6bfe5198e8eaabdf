"""Tests of adambs_jax.checkpoint_storage: the save lock, atomic writes, storage errors."""

import json
import os
import socket

import pytest

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
        pid, host = lock.read_text().split()
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
