"""The overlapped host loop: read the next batches while the device trains on this one.

A ``HostTrainStep`` (``_step``) returns at call t the draws of step t + L.
A ``HostLoader`` turns each of those draws into a batch on the device, in loader threads:

    copy   ``indices.copy_to_host_async()`` (main thread, no wait), then in a loader thread
           ``np.asarray(indices)`` (waits for the step that drew them, not the main thread)
    read   ``source.read(indices of this process)`` (a thread pool of ``num_threads``)
    put    ``jax.device_put`` (no mesh), or the global batch split along the mesh's data axis
           (``jax.make_array_from_process_local_data``)

and the main thread only waits for the batch of the step it is about to dispatch:

    step = ab.make_host_train_step(loss_fn, optax.adam(1e-3), sampler, lookahead=2)
    state, draws = step.init(params, key)
    with ab.host.HostLoader(step, source, draws) as loader:
        for t in range(num_steps):
            batch, draws = loader.next()                 # waits for this batch only
            state, metrics, later = step(state, batch, draws, keys[t])
            loader.put(later)                            # read while the device works
    # or: state, draws, metrics = ab.run_host_loop(step, state, draws, source, num_steps, key=key)

With L = ``lookahead``, while step t runs on the device, the batches of steps t + 1 .. t + L - 1
are being read (their draws came from steps <= t - 1), so L = 2 overlaps one read with one
step. The state stays with the caller (flax style); the loader holds only the pending draws.

Mesh (the step's ``mesh``, a data axis over P devices in one or several processes): the
dataset is never replicated. Each process reads only the rows of the K draws that its own
devices hold in the batch sharding (a contiguous slice, e.g. K / P rows for process
``jax.process_index()`` of a one-device-per-process mesh) and the global batch is assembled
with ``jax.make_array_from_process_local_data``; the draws and the sampler state are
replicated (every process draws the same indices), so no process needs another's records.
Every process runs the same loop with the same keys.

Errors: an exception in a loader thread (``source.read`` failing, a bad record) is raised
again in the main thread, unchanged (its type and the source's message), by the ``next()``
that wanted that batch.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1 (the sampler decides which records are read).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from adambs_jax._checks import check_int
from adambs_jax.host._sources import check_source
from adambs_jax.host._step import Draws, HostTrainStep
from adambs_jax.sharding import replicate_on_mesh

__all__ = ["LoadedBatch", "HostLoader", "process_rows", "run_host_loop"]


class LoadedBatch(NamedTuple):
    """A batch on the device and the draws it holds the records of."""

    batch: Any
    draws: Draws


def process_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> slice:
    """The rows of a (K, ...) batch that this process's devices hold under ``sharding``: a
    contiguous slice (all K rows without a sharding).

    Raises:
      ValueError: the rows of this process's devices are not contiguous.
    """
    if sharding is None:
        return slice(0, batch_size)
    rows = sorted(
        (index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
        for index in sharding.addressable_devices_indices_map((batch_size,)).values()
    )
    start, stop = rows[0][0], max(row[1] for row in rows)
    covered = set()
    for row_start, row_stop in rows:
        covered.update(range(row_start, row_stop))
    if covered != set(range(start, stop)):
        raise ValueError(
            f"mesh: the batch rows of process {jax.process_index()} are not contiguous "
            f"({rows}); order the mesh's devices by process"
        )
    return slice(start, stop)


def _to_device(records: Any, sharding, batch_size: int):
    """The process's records as the (global) device batch."""
    if sharding is None:
        return jax.device_put(records)
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(
            sharding, leaf, (batch_size,) + leaf.shape[1:]
        ),
        records,
    )


class HostLoader:
    """Reads the batches of pending draws from ``source`` in threads, in order.

    ``put(draws)`` schedules a batch (starts the host copy of the indices without waiting);
    ``next()`` returns the oldest scheduled ``LoadedBatch``, waiting only for it. Use it as
    a context manager (or call ``close()``) to stop the threads.

    Attributes:
      wait_seconds: total time the main thread spent in ``next()`` waiting for a batch.
      batches: number of batches ``next()`` returned.
    """

    def __init__(
        self, step: HostTrainStep, source: Any, draws: Sequence[Draws] = (), *, num_threads: int = 2
    ):
        if not isinstance(step, HostTrainStep):
            raise TypeError(
                f"step must be a HostTrainStep (ab.make_host_train_step), got {type(step).__name__}"
            )
        num_examples = check_source(source)
        if num_examples != step.sampler.num_examples:
            raise ValueError(
                f"source: has num_examples = {num_examples}, but the step's sampler draws "
                f"from n = {step.sampler.num_examples} examples"
            )
        self.source = source
        self.batch_size = step.sampler.batch_size
        self.sharding = step.batch_sharding
        self.rows = process_rows(self.sharding, self.batch_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            check_int("num_threads", num_threads), thread_name_prefix="adambs-loader"
        )
        self._pending: collections.deque = collections.deque()
        self.wait_seconds = 0.0
        self.batches = 0
        for pending in draws:
            self.put(pending)

    def _load(self, draws: Draws):
        indices = np.asarray(
            draws.indices.addressable_data(0)
            if isinstance(draws.indices, jax.Array)
            else draws.indices
        )
        if indices.shape != (self.batch_size,):
            raise ValueError(
                f"draws.indices must have shape ({self.batch_size},), got {indices.shape}"
            )
        records = self.source.read(indices[self.rows])
        return _to_device(records, self.sharding, self.batch_size)

    def put(self, draws: Draws) -> None:
        """Schedules the batch of ``draws`` (a ``Draws``) to be read."""
        draws = Draws(*draws)
        if isinstance(draws.indices, jax.Array):
            draws.indices.copy_to_host_async()
        self._pending.append((self._pool.submit(self._load, draws), draws))

    def next(self) -> LoadedBatch:
        """The oldest scheduled batch, read and on the device; raises a loader thread's
        error here."""
        if not self._pending:
            raise ValueError("HostLoader.next: no batch is scheduled; put(draws) first")
        future, draws = self._pending.popleft()
        start = time.perf_counter()
        batch = future.result()
        self.wait_seconds += time.perf_counter() - start
        self.batches += 1
        return LoadedBatch(batch, draws)

    def pending_draws(self) -> list[Draws]:
        """The draws scheduled and not yet returned by ``next()``, oldest first."""
        return [draws for _, draws in self._pending]

    def close(self) -> None:
        """Stops the threads (waits for running reads; cancels queued ones)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HostLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_host_loop(
    step: HostTrainStep,
    state: Any,
    draws: Sequence[Draws],
    source: Any,
    num_steps: int,
    *,
    key: jax.Array | None = None,
    num_threads: int = 2,
    on_metrics: Callable[[int, dict], None] | None = None,
):
    """Runs ``num_steps`` steps of ``step`` fed from ``source`` by a ``HostLoader``.

    Args:
      step: a ``HostTrainStep``; state, draws: its state and the pending draws (from
        ``step.init`` or a previous ``run_host_loop``), oldest first.
      source: a ``DataSource`` with ``num_examples`` = the sampler's n.
      num_steps: how many steps to run.
      key: step t gets ``jax.random.split(key, num_steps)[t]``; None: the state's own key.
      num_threads: loader threads.
      on_metrics: called ``on_metrics(t, metrics)`` after each dispatch (device arrays:
        converting them to Python numbers waits for the step).

    Returns:
      ``(state, draws, metrics)``: the final state, the pending draws to continue with, and
      the list of each step's metrics (device arrays).
    """
    num_steps = check_int("num_steps", num_steps)
    keys = None if key is None else replicate_on_mesh(jax.random.split(key, num_steps), step.mesh)
    metrics_list = []
    with HostLoader(step, source, draws, num_threads=num_threads) as loader:
        for t in range(num_steps):
            batch, current = loader.next()
            state, metrics, later = step(state, batch, current, None if keys is None else keys[t])
            loader.put(later)
            metrics_list.append(metrics)
            if on_metrics is not None:
                on_metrics(t, metrics)
        pending = loader.pending_draws()
    return state, pending, metrics_list
