"""Host-side data sources: the records of a dataset that lives on the host (or on disk).

A step that takes a gathered batch (``adambs_jax.host_step``) needs the records of the K
drawn examples, not the dataset. A data source gives them by batched random access:

    source.num_examples              # n
    batch = source.read(indices)     # indices (K,) int numpy -> pytree of numpy (K, ...)

``read`` is called from a loader thread (``adambs_jax.host_loop``), so it must be safe to
call from a thread other than the one that made the source. ``ArraySource`` holds numpy
arrays in memory; ``adambs_jax.sources`` also has sources over numpy memmaps and
``adambs_jax.grain_source`` one over ArrayRecord files (the optional ``[data]`` extra).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

__all__ = ["DataSource", "ArraySource", "check_source", "check_read_indices"]


@runtime_checkable
class DataSource(Protocol):
    """Batched random access to n records (a pytree of arrays per record)."""

    num_examples: int

    def read(self, indices: np.ndarray) -> Any:
        """The records ``indices`` (K,) as a pytree of numpy arrays with leading axis K."""


def check_source(source: Any, *, name: str = "source") -> int:
    """``source.num_examples`` after checking that ``source`` is a ``DataSource`` with n ≥ 1."""
    if not isinstance(source, DataSource):
        raise TypeError(
            f"{name} must be a data source (num_examples and read(indices)), e.g. "
            f"ab.sources.ArraySource(arrays); got {type(source).__name__}"
        )
    num_examples = source.num_examples
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise TypeError(f"{name}.num_examples must be an int, got {num_examples!r}")
    if num_examples < 1:
        raise ValueError(f"{name}: the data is empty (num_examples = {num_examples})")
    return int(num_examples)


def check_read_indices(indices: Any, num_examples: int, *, name: str = "indices") -> np.ndarray:
    """``indices`` as a 1-D integer numpy array, every entry in [0, n); else a clear error
    (never a wrapped negative index: numpy would read ``data[-1]`` silently)."""
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"{name} must be 1-D (K,), got shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        raise ValueError(
            f"{name}: every index must be in [0, {num_examples}), got "
            f"min {indices.min()} and max {indices.max()}"
        )
    return indices


class ArraySource:
    """A data source over a pytree of arrays already in host memory (leading axis n).

    Examples:
      >>> import numpy as np
      >>> source = ArraySource({"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)})
      >>> source.num_examples, source.read(np.array([4, 0]))["y"].tolist()
      (5, [4, 0])
    """

    def __init__(self, arrays: Any):
        leaves = jax.tree.leaves(arrays)
        if not leaves:
            raise ValueError("arrays: the data is empty (no leaves)")
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"arrays: every leaf must have the same leading axis n, got {sorted(map(str, sizes))}"
            )
        (num_examples,) = sizes
        if num_examples < 1:
            raise ValueError("arrays: the data is empty (n = 0)")
        self.arrays = jax.tree.map(np.asarray, arrays)
        self.num_examples = int(num_examples)

    def read(self, indices: np.ndarray) -> Any:
        indices = check_read_indices(indices, self.num_examples)
        return jax.tree.map(lambda leaf: leaf[indices], self.arrays)
