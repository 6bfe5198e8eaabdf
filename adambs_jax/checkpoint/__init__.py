"""Checkpoints of a training state with orbax, restored only into a compatible configuration.

    save_checkpoint(path, state, sampler=sampler)
    state = restore_checkpoint(path, like=step.init(params), sampler=sampler)
    with CheckpointManager(directory, max_to_keep=3) as manager: ...

A checkpoint holds the state's arrays and metadata that describe it (sampler kind and
configuration, shapes, versions); a restore compares them with the state it restores into
and refuses what does not fit, naming the difference. Writes are atomic and locked; a
damaged checkpoint is an error that names it, never a silently wrong state. A save killed
outright leaves its lock behind; the next save takes it over (``StaleLockWarning``) when its
process is gone, and removes what it left.
"""

from adambs_jax import _deprecated
from adambs_jax.checkpoint._checkpoint import (
    CheckpointManager,
    read_checkpoint_metadata,
    restore_checkpoint,
    save_checkpoint,
)
from adambs_jax.checkpoint._lock import StaleLockWarning
from adambs_jax.checkpoint._metadata import describe_state

__all__ = [
    "save_checkpoint",
    "restore_checkpoint",
    "read_checkpoint_metadata",
    "describe_state",
    "CheckpointManager",
    "StaleLockWarning",
]

__getattr__ = _deprecated.forwarding_getattr(
    "adambs_jax.checkpoint",
    {"CHECKPOINT_FORMAT": ("adambs_jax.checkpoint._metadata", "read_checkpoint_metadata")},
)
