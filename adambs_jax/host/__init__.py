"""Data that stays on the host: data sources, the step on a gathered batch, and the loop
that reads the next batches while the device trains.

    step = make_host_train_step(loss_fn, optax.adam(1e-3), sampler, lookahead=2)
    state, pending = step.init(params, key)
    state, pending, metrics = run_host_loop(step, state, pending, MemmapSource(path), T)

Whatever stops the loop is raised with ``error.host_loop`` (``HostLoopProgress``: the state
reached, to save); a read that hangs raises ``LoaderTimeoutError`` after ``timeout``.

Sources: ``ArraySource`` (arrays in memory), ``MemmapSource`` over ``.npy`` memmaps
(``write_memmap_dataset`` / ``open_memmap_dataset``, a manifest with checksums),
``ArrayRecordSource`` over ArrayRecord shards read through grain (the ``[data]`` extra).

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1 and eq. 1 (the weights of stale draws stay exact).
"""

from adambs_jax.host._grain_source import ArrayRecordSource, write_array_record
from adambs_jax.host._loop import HostLoader, HostLoopProgress, LoaderTimeoutError, run_host_loop
from adambs_jax.host._sources import (
    MANIFEST_NAME,
    ArraySource,
    DataSource,
    MemmapSource,
    open_memmap_dataset,
    write_memmap_dataset,
)
from adambs_jax.host._step import Draws, HostTrainStep, make_host_train_step

__all__ = [
    "make_host_train_step",
    "HostTrainStep",
    "Draws",
    "HostLoader",
    "run_host_loop",
    "HostLoopProgress",
    "LoaderTimeoutError",
    "DataSource",
    "ArraySource",
    "MemmapSource",
    "MANIFEST_NAME",
    "write_memmap_dataset",
    "open_memmap_dataset",
    "ArrayRecordSource",
    "write_array_record",
]
