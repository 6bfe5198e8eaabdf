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
batch size, optimizer or model with a ``ValueError`` that lists every difference. The
learned sampler state comes from the checkpoint, the hyperparameters (a fixed bound L, the
bound mode, the tree's arity, ``step_size``, ``stratified``) from the sampler of ``like``;
a non-finite exp3 state is refused (``_restore``; each sampler state's ``restored``).

PRNG keys: typed keys (``jax.random.key``) are saved as their raw uint32 data
(``jax.random.key_data``) with the implementation's name in the metadata, and rewrapped
(``jax.random.wrap_key_data``) on restore; raw uint32 keys (``jax.random.PRNGKey``) are saved
as they are.

Several hosts: call ``save_checkpoint`` / ``restore_checkpoint`` on every process with the
same path (orbax coordinates the processes; each writes the shards it owns). Restored arrays
get the shardings of ``like``'s arrays, e.g. replicated over a mesh if ``like`` went through
``ab.replicate``.

Concurrent saves to one path are refused, not mixed: the first holds the lock file
``<path>.adambs-lock``; a save that returns wrote its own state, one that raises changed
nothing (``_storage``). A save killed outright (SIGKILL) leaves its lock
and temporary directories; the next save takes over a lock whose process is gone (this
host), with a ``StaleLockWarning``, and removes what the dead save left. Damaged
(truncated, corrupted) files are refused with a ``ValueError`` naming the checkpoint, never
half-loaded.
``_metadata`` describes and compares checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adambs_jax.checkpoint._metadata import (
    CHECKPOINT_FORMAT,
    check_train_state,
    describe_state,
    verify_metadata,
)
from adambs_jax.checkpoint._restore import finish_restore, restore_target
from adambs_jax.checkpoint._storage import (
    METADATA_ITEM,
    STATE_ITEM,
    damaged_checkpoint_errors,
    exclusive_save_lock,
    interrupted_replace,
    metadata_restore_args,
    open_checkpointer,
    remove_leftovers,
    remove_neighbours_leftovers,
    remove_orbax_leftovers,
    save_args,
    state_restore_args,
    write_atomically,
)
from adambs_jax.step import TrainState

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "restore_checkpoint",
    "read_checkpoint_metadata",
    "describe_state",
    "CheckpointManager",
]

PathLike = str | os.PathLike


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


def _refuse_existing(path: pathlib.Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(
            f"path: a checkpoint (or file) already exists at {path}; pass overwrite=True to "
            f"replace it"
        )


def _write(path: pathlib.Path, args: ocp.args.Composite, *, overwrite: bool) -> None:
    """One process: under the save lock, into a private directory renamed into place.
    Several processes of one job: orbax's coordinated save straight to ``path``."""
    if jax.process_count() > 1:
        with open_checkpointer() as checkpointer:
            checkpointer.save(path, args, force=overwrite)
        return
    with exclusive_save_lock(path):
        remove_leftovers(path)  # of saves that died: whatever is there now is not a live one's
        _refuse_existing(path, overwrite)  # again: another process may have saved meanwhile
        with open_checkpointer() as checkpointer:
            write_atomically(path, lambda tmp: checkpointer.save(tmp, args))
    remove_neighbours_leftovers(path)  # a run saving to a new path each time: step_1, step_2


def _recover(path: pathlib.Path) -> None:
    """Puts back the checkpoint that a save killed while replacing it had moved aside (under
    the lock; if a live save holds it, that save finishes the replacement itself)."""
    with contextlib.suppress(ValueError), exclusive_save_lock(path):
        remove_leftovers(path)


def _read_state(path: pathlib.Path, like: TrainState, saved: dict) -> TrainState:
    where = f"the checkpoint at {path}"
    with damaged_checkpoint_errors(where), open_checkpointer() as ckpt:
        restored = ckpt.restore(path, state_restore_args(restore_target(like, saved)))
    return finish_restore(restored[STATE_ITEM], like, saved, where)


# ----------------------------------------------------------------------------- public API


def save_checkpoint(
    path: PathLike,
    state: TrainState,
    *,
    sampler: Any = None,
    extra_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``state`` (every array) and its metadata to the directory ``path`` (orbax).

    Synchronous: when it returns the checkpoint is complete on disk (it is written to a
    private temporary directory and renamed, so a crash never leaves a half checkpoint at
    ``path``, and an overwritten checkpoint is replaced only by a complete one), and
    ``state`` may be donated to the next step. One save to a path at a time: a second
    process saving to the same path meanwhile is refused (see the module docstring).

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
      ValueError: ``path`` exists and ``overwrite`` is False, or another process is saving
        to ``path`` right now (a live process, or one on another host; the lock of a
        process of this host that is gone is taken over, with a ``StaleLockWarning``).

    References:
      orbax-checkpoint, https://orbax.readthedocs.io (the storage format: OCDBT/Zarr items).

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, optax, adambs_jax as ab
      >>> sampler = ab.uniform_sampler(10, 2)
      >>> state = ab.TrainState.create(params={"w": jnp.ones(3)}, optimizer=optax.sgd(0.1),
      ...                              sampler=sampler)
      >>> run = tempfile.mkdtemp()
      >>> path = ab.save_checkpoint(os.path.join(run, "step_0"), state, sampler=sampler,
      ...                           extra_metadata={"epoch": 0})
      >>> ab.checkpoint.read_checkpoint_metadata(path)["extra"], sorted(os.listdir(run))
      ({'epoch': 0}, ['step_0'])
    """
    check_train_state(state, "state")
    path = _check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    metadata = describe_state(state, sampler=sampler)
    metadata["extra"] = _check_extra(extra_metadata)
    _refuse_existing(path, overwrite)
    _write(path, save_args(state, metadata), overwrite=overwrite)
    return path


def read_checkpoint_metadata(path: PathLike) -> dict:
    """The metadata of a checkpoint (see ``describe_state``; plus ``"extra"``), no arrays.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: ``path`` is not an adambs_jax checkpoint, or its metadata file is damaged.
    """
    path = _check_path(path)
    if interrupted_replace(path) and jax.process_count() == 1:
        _recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: no checkpoint directory at {path}")
    if not (path / METADATA_ITEM).exists():
        raise ValueError(f"path: {path} is not an adambs_jax checkpoint (no {METADATA_ITEM})")
    with damaged_checkpoint_errors(f"the checkpoint at {path}"), open_checkpointer() as ckpt:
        restored = ckpt.restore(path, metadata_restore_args())
    return dict(restored[METADATA_ITEM])


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
      The restored ``TrainState``: same pytree structure, dtypes and key types as ``like``;
      an exp3 sampler state keeps its learned weights, counters and adaptive L and takes a
      fixed L, a changed bound mode (L restarts at 0) and the arity (tree rebuilt) from
      ``like`` (docs/api.md, "What a restore keeps").

    Raises:
      FileNotFoundError: nothing at ``path``.
      TypeError: ``like`` is not a ``TrainState``.
      ValueError: the checkpoint does not fit ``like``: another sampler kind (e.g. exp3 vs
        uniform), dataset size ``num_examples``, ``p_min``, batch size, typed vs raw PRNG
        key, or arrays of other paths, shapes or dtypes (another model or optimizer), or
        another optimizer state structure (adam vs adamw: "the optimizer states differ").
        The message lists every difference; nothing is loaded. Or its files are damaged
        (truncated, corrupted, missing), or its exp3 sampler state is not finite: the
        message names the checkpoint (and the field).

    References:
      orbax-checkpoint, https://orbax.readthedocs.io (the storage format: OCDBT/Zarr items).

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, optax, adambs_jax as ab
      >>> def fresh(w):  # the same model, optimizer and sampler each time
      ...     return ab.TrainState.create(params={"w": w}, optimizer=optax.sgd(0.1),
      ...                                 sampler=ab.uniform_sampler(10, 2))
      >>> path = ab.save_checkpoint(os.path.join(tempfile.mkdtemp(), "c"), fresh(jnp.ones(3)))
      >>> ab.restore_checkpoint(path, like=fresh(jnp.zeros(3))).params["w"]
      Array([1., 1., 1.], dtype=float32)
    """
    check_train_state(like, "like")
    path = _check_path(path)
    saved = read_checkpoint_metadata(path)
    verify_metadata(saved, like, sampler, f"the checkpoint at {path}")
    return _read_state(path, like, saved)


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

    def __init__(self, directory: PathLike, *, max_to_keep: int | None = 3, sampler: Any = None):
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
            item_names=(STATE_ITEM, METADATA_ITEM),
        )

    def save(
        self, step: int, state: TrainState, *, extra_metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Saves ``state`` as step ``step`` (an int >= 0, e.g. ``int(state.step)``).

        One process saves into the directory at a time (the lock file
        ``<directory>.adambs-lock``, as for ``save_checkpoint``, a dead holder's lock taken
        over); steps saved meanwhile by another process are seen before ``step`` is checked,
        and the unfinished steps of a save that died are deleted.

        Raises:
          ValueError: ``step`` is negative or already saved, or another process is saving
            into this directory right now. TypeError: bad ``state``.
        """
        check_train_state(state, "state")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        metadata = describe_state(state, sampler=self.sampler)
        metadata["extra"] = _check_extra(extra_metadata)
        if jax.process_count() > 1:  # orbax coordinates the processes of one job
            self._save_step(int(step), save_args(state, metadata))
            return
        with exclusive_save_lock(self.directory, name="directory"):
            remove_orbax_leftovers(self.directory)  # unfinished steps of saves that died
            self._manager.reload()
            self._save_step(int(step), save_args(state, metadata))

    def _save_step(self, step: int, args: ocp.args.Composite) -> None:
        if step in self.all_steps():
            raise ValueError(f"step: a checkpoint of step {step} already exists")
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(int(step) for step in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, the highest (as orbax and a restarted process see it; not
        the step this process saved last), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """Restores step ``step`` (default: the latest, the highest), checked against ``like`` as
        ``restore_checkpoint`` does.

        Raises:
          FileNotFoundError: no checkpoint (of that step). ValueError: it does not fit
            ``like``, or its files are damaged.
        """
        check_train_state(like, "like")
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if int(step) not in self.all_steps():
            raise FileNotFoundError(
                f"step: no checkpoint of step {step} in {self.directory} (saved: "
                f"{self.all_steps()})"
            )
        where = f"the checkpoint of step {step} in {self.directory}"
        with damaged_checkpoint_errors(where, name="step"):
            saved = self._manager.restore(int(step), args=metadata_restore_args())
        saved = dict(saved[METADATA_ITEM])
        verify_metadata(saved, like, self.sampler, where)
        with damaged_checkpoint_errors(where, name="step"):
            restored = self._manager.restore(
                int(step), args=state_restore_args(restore_target(like, saved))
            )
        return finish_restore(restored[STATE_ITEM], like, saved, where)

    def restore_latest(self, like: TrainState) -> TrainState | None:
        """``restore(like)`` of the latest (highest) step, or None if nothing was saved yet."""
        if self.latest_step() is None:
            return None
        return self.restore(like)

    def close(self) -> None:
        """Waits for pending writes and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
