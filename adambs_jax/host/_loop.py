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
that wanted that batch; the loader threads also refuse draws whose indices or probabilities
are invalid (``check_host_draws``: they hold the indices on the host anyway, so the check
costs no sync). A batch not read within ``timeout`` seconds (default 600; None waits for
ever) raises ``LoaderTimeoutError`` (a ``TimeoutError``) naming the step, its indices and
what the loader thread was doing; the hung read is abandoned (loader threads are daemon
threads: neither ``close()`` nor the interpreter's exit waits for them).

Whatever stops ``run_host_loop`` (a reader error, a timeout, Ctrl-C, an ``on_metrics`` error)
is raised unchanged in type, carrying ``error.host_loop``, a ``HostLoopProgress``: the state
reached, the pending draws and the step count, to save in ``except`` (the caller's own state
was donated to the first step). Ctrl-C during a step's dispatch is held until the step's new
state is assigned, so that state is never lost between donation and assignment.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1 (the sampler decides which records are read).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, cast

import jax
import numpy as np

from adambs_jax._checks import check_int
from adambs_jax.host._sources import check_source
from adambs_jax.host._step import Draws, HostTrainStep, check_host_draws
from adambs_jax.sharding import replicate_on_mesh

__all__ = [
    "DEFAULT_TIMEOUT",
    "LoadedBatch",
    "HostLoopProgress",
    "LoaderTimeoutError",
    "HostLoader",
    "process_rows",
    "run_host_loop",
]

DEFAULT_TIMEOUT = 600.0
"""Seconds ``HostLoader.next`` waits for one batch: far above any sane read of K records
(plus the device steps the loader may wait for: the draws of step t come from step t - L),
far below "for ever"."""


class LoadedBatch(NamedTuple):
    """A batch on the device and the draws it holds the records of."""

    batch: Any
    draws: Draws


class HostLoopProgress(NamedTuple):
    """Where ``run_host_loop`` stopped: the ``host_loop`` attribute of the error it raised.

    Attributes:
      state: the ``TrainState`` after ``steps_done`` steps of this call, alive (not donated):
        save it. None only if a step's own call failed after donating its input state.
      draws: the pending draws, oldest first (those of the step that did not run first):
        ``run_host_loop(step, progress.state, progress.draws, ...)`` continues the run.
      steps_done: steps this call completed (dispatched) before it stopped.
      metrics: their metrics, as ``run_host_loop`` returns them.
    """

    state: Any
    draws: list
    steps_done: int
    metrics: list


class LoaderTimeoutError(TimeoutError):
    """A batch was not read within the loader's ``timeout`` (a ``source.read`` that hangs)."""


def process_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> slice:
    """The rows of a (K, ...) batch that this process's devices hold under ``sharding``: a
    contiguous slice (all K rows without a sharding).

    Raises:
      ValueError: the rows of this process's devices are not contiguous.
    """
    if sharding is None:
        return slice(0, batch_size)
    # jax types the map's values Index | None, but every device of a sharding has an index
    indices = cast(
        "Iterable[tuple[slice, ...]]",
        sharding.addressable_devices_indices_map((batch_size,)).values(),
    )
    rows = sorted(
        (index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
        for index in indices
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


class _Job:
    """One scheduled batch: its draws, the future of its batch and what its thread is doing."""

    __slots__ = ("draws", "future", "stage")

    def __init__(self, draws: Draws):
        self.draws = draws
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.stage = "queued behind earlier reads"


def _on_host(values: Any) -> np.ndarray:
    if isinstance(values, jax.Array):  # a replicated global array: this process's copy
        values = values.addressable_data(0)
    return np.asarray(values)


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


def _preview(values: Any) -> str:
    """The first indices of a draw, for an error message, without waiting for the device."""
    # jax's Array stub has no is_ready (its ArrayImpl does)
    if isinstance(values, jax.Array) and not cast(Any, values).is_ready():
        return "not yet computed by the device"
    values = _on_host(values)
    shown = ", ".join(str(v) for v in values[:8].tolist())
    return f"[{shown}{', ...' if values.size > 8 else ''}] (K = {values.size})"


class HostLoader:
    """Reads the batches of pending draws from ``source`` in threads, in order.

    ``put(draws)`` schedules a batch (starts the host copy of the indices without waiting);
    ``next()`` returns the oldest scheduled ``LoadedBatch``, waiting only for it, at most
    ``timeout`` seconds. Use it as a context manager (or call ``close()``) to stop the threads.

    A batch leaves the schedule only when ``next()`` returns it: after a reader error or a
    timeout, ``pending_draws()`` still lists its draws first (a later ``next()`` raises the
    same error, or waits again for the same read), so no draw is lost.

    Args:
      step: the ``HostTrainStep`` the batches are for; source: a ``DataSource`` of its n.
      draws: the draws to schedule first, oldest first.
      num_threads: loader threads (daemon threads: a read that hangs never blocks the
        interpreter's exit).
      timeout: seconds ``next()`` waits for one batch before ``LoaderTimeoutError``
        (``DEFAULT_TIMEOUT``, 600); None: wait for ever.

    Attributes:
      wait_seconds: total time the main thread spent in ``next()`` waiting for a batch.
      batches: number of batches ``next()`` returned.
    """

    def __init__(
        self,
        step: HostTrainStep,
        source: Any,
        draws: Sequence[Draws] = (),
        *,
        num_threads: int = 2,
        timeout: float | None = DEFAULT_TIMEOUT,
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
        self.num_examples = num_examples
        self.batch_size = step.sampler.batch_size
        self.sharding = step.batch_sharding
        self.rows = process_rows(self.sharding, self.batch_size)
        self.timeout = _check_timeout(timeout)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"adambs-loader-{i}", daemon=True)
            for i in range(check_int("num_threads", num_threads))
        ]
        self._pending: collections.deque[_Job] = collections.deque()
        self._closed = self._abandon = False
        self.wait_seconds = 0.0
        self.batches = 0
        for thread in self._threads:
            thread.start()
        try:
            for pending in draws:
                self.put(pending)
        except BaseException:
            self.close()  # no idle threads left behind by a refused constructor
            raise

    def _work(self) -> None:
        """A loader thread: runs the queued jobs until it takes the None that ``close`` puts."""
        while (job := self._queue.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled by close()
            try:
                result = self._load(job)
            except BaseException as error:  # raised again by next(), in the main thread
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _load(self, job: _Job):
        job.stage = "waiting for the device to compute the draws"
        indices, probs = _on_host(job.draws.indices), _on_host(job.draws.probs)
        check_host_draws(indices, probs, self.num_examples, self.batch_size)
        job.stage = "in source.read"
        records = self.source.read(indices[self.rows])
        job.stage = "putting the batch on the device"
        return _to_device(records, self.sharding, self.batch_size)

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"HostLoader.{method}: the loader is closed (its threads are stopped); make a "
                f"new HostLoader, e.g. with the draws of pending_draws()"
            )

    def put(self, draws: Draws) -> None:
        """Schedules the batch of ``draws`` (a ``Draws``) to be read."""
        self._check_open("put")
        draws = Draws(*draws)
        for values in draws:
            if isinstance(values, jax.Array):
                values.copy_to_host_async()
        job = _Job(draws)
        self._pending.append(job)
        self._queue.put(job)

    def _wait(self, label: str) -> LoadedBatch:
        """The oldest scheduled batch, read and on the device, left scheduled."""
        self._check_open("next")
        if not self._pending:
            raise ValueError("HostLoader.next: no batch is scheduled; put(draws) first")
        job = self._pending[0]
        start = time.perf_counter()
        try:
            batch = job.future.result(timeout=self.timeout)
        except BaseException as error:
            future = job.future
            if future.done() and not future.cancelled() and future.exception() is error:
                raise  # the read's own error (a TimeoutError of the source's included)
            self._abandon = True  # the wait stopped, not the read: close() won't wait for it
            if not isinstance(error, TimeoutError):
                raise  # a KeyboardInterrupt while waiting
            raise LoaderTimeoutError(
                f"HostLoader: the batch of {label} was not read within timeout="
                f"{self.timeout:g} s (its loader thread is {job.stage}; draws.indices "
                f"{_preview(job.draws.indices)}). A read that hangs (a stalled network file "
                f"system, a dead server) is abandoned; pass a larger timeout= (None: wait "
                f"for ever) if reads are this slow"
            ) from None
        finally:
            self.wait_seconds += time.perf_counter() - start
        self._abandon = False
        return LoadedBatch(batch, job.draws)

    def _consume(self) -> None:
        """Takes the oldest batch off the schedule (``next`` returned it)."""
        self._pending.popleft()
        self.batches += 1

    def next(self) -> LoadedBatch:
        """The oldest scheduled batch, read and on the device; raises a loader thread's
        error here, ``LoaderTimeoutError`` after ``timeout`` seconds, and RuntimeError
        once the loader is closed."""
        loaded = self._wait(f"batch {self.batches} of this loader")
        self._consume()
        return loaded

    def pending_draws(self) -> list[Draws]:
        """The draws scheduled and not yet returned by ``next()``, oldest first (also after
        ``close()``)."""
        return [job.draws for job in self._pending]

    def close(self) -> None:
        """Stops the threads: cancels the queued reads and waits for running ones, at most
        ``timeout`` seconds (not at all for a read whose wait timed out or was interrupted:
        it is abandoned to its daemon thread)."""
        if self._closed:
            return
        self._closed = True
        for job in self._pending:
            job.future.cancel()
        for _ in self._threads:
            self._queue.put(None)
        wait = 0.0 if self._abandon else self.timeout
        deadline = None if wait is None else time.monotonic() + wait
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> HostLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextlib.contextmanager
def _ctrl_c_held():
    """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block ends.

    A jitted step donates its input state when it is dispatched; a KeyboardInterrupt raised
    between that and the assignment of its result would lose both states. A second Ctrl-C
    raises at once (a first call that traces for long stays interruptible). Only in the
    main thread, and only over Python's own handler (a handler the program installed is
    left alone); two ``signal.signal`` calls per step, microseconds.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = []

    def hold(signum, frame):
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _alive(state: Any) -> Any:
    """``state``, or None if a leaf was donated (deleted)."""
    leaves = jax.tree.leaves(state)
    deleted = any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in leaves)
    return None if deleted else state


def _attach_progress(error: BaseException, progress: HostLoopProgress, num_steps: int) -> None:
    """Sets ``error.host_loop`` and adds a note saying what it holds."""
    try:
        cast(Any, error).host_loop = progress  # any exception: an attribute of our own
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        return
    what = (
        "the state was donated to the step that failed and is lost"
        if progress.state is None
        else "error.host_loop.state is the state reached: save it, and continue with "
        "run_host_loop(step, progress.state, progress.draws, ...)"
    )
    error.add_note(
        f"run_host_loop: stopped after {progress.steps_done} of {num_steps} steps; {what} "
        f"(error.host_loop: ab.host.HostLoopProgress)"
    )


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
    timeout: float | None = DEFAULT_TIMEOUT,
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
      timeout: seconds to wait for one batch (``HostLoader``'s), None: for ever.

    Returns:
      ``(state, draws, metrics)``: the final state, the pending draws to continue with, and
      the list of each step's metrics (device arrays).

    Raises:
      Whatever stopped the loop (a reader's error, ``LoaderTimeoutError``, invalid draws,
      KeyboardInterrupt, an ``on_metrics`` error), unchanged in type and message, with
      ``error.host_loop``: a ``HostLoopProgress`` (the state reached, alive; the pending
      draws; the steps done; their metrics), since ``state`` itself was donated to the first
      step. The loader threads are stopped first.

    Example (a checkpoint of the state reached, whatever stops the run)::

        try:
            state, draws, _ = ab.run_host_loop(step, state, draws, source, num_steps)
        except BaseException as error:
            progress = getattr(error, "host_loop", None)
            if progress is not None and progress.state is not None:
                save(progress.state, progress.draws)
            raise
    """
    num_steps = check_int("num_steps", num_steps)
    keys = None if key is None else replicate_on_mesh(jax.random.split(key, num_steps), step.mesh)
    metrics_list: list = []
    with HostLoader(step, source, draws, num_threads=num_threads, timeout=timeout) as loader:
        try:
            for t in range(num_steps):
                batch, current = loader._wait(f"step {t} (of {num_steps} in this call)")
                with _ctrl_c_held():  # the new state is assigned before a Ctrl-C is raised
                    state, metrics, later = step(
                        state, batch, current, None if keys is None else keys[t]
                    )
                    loader._consume()
                    loader.put(later)
                    metrics_list.append(metrics)
                if on_metrics is not None:
                    on_metrics(t, metrics)
        except BaseException as error:
            done = len(metrics_list)
            progress = HostLoopProgress(_alive(state), loader.pending_draws(), done, metrics_list)
            _attach_progress(error, progress, num_steps)
            raise
        pending = loader.pending_draws()
    return state, pending, metrics_list
