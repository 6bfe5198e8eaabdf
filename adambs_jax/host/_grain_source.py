"""ArrayRecord files as a data source, read through grain (the optional ``[data]`` extra).

``write_array_record(path, arrays, ...)`` converts a dict of numpy arrays (leading axis n)
into ArrayRecord shards, one record per example; ``ArrayRecordSource(paths)`` is a
``adambs_jax.host.DataSource`` over them whose ``read(indices)`` does one batched random
access (``grain.sources.ArrayRecordDataSource.__getitems__``: the records of each shard in
one call, the shards in parallel threads) and decodes the K records into a dict of numpy
arrays with leading axis K.

Record encoding (fixed layout, no pickle): every record is the packed bytes of one element
of the numpy structured dtype ``[(name, dtype, shape), ...]`` of the fields in the order
written (no padding, the dtypes' own byte order), so a batch of K records decodes with one
``np.frombuffer`` of their concatenation. The layout is a JSON sidecar next to each shard,
``<shard>.layout.json`` (``LAYOUT_FORMAT``: the fields, the record size in bytes and the
shard's number of records); ``ArrayRecordSource`` refuses shards of different layouts and
records of the wrong size.

grain and array_record are imported on first use; without them an ImportError says
``pip install adambs-jax[data]``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from adambs_jax._checks import check_optional_int
from adambs_jax._jsonable import read_format_file
from adambs_jax.host._sources import check_read_indices, leading_axis

__all__ = [
    "LAYOUT_FORMAT",
    "record_dtype",
    "shard_paths",
    "write_array_record",
    "ArrayRecordSource",
]

LAYOUT_FORMAT = "adambs_jax.array_record_layout/1"
PathLike = Union[str, "os.PathLike[str]"]


def _require(module: str):
    """Imports an optional dependency, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"adambs_jax.host.ArrayRecordSource needs {module.split('.')[0]}: "
            f"pip install adambs-jax[data]"
        ) from error


def record_dtype(fields: Sequence[Mapping[str, Any]]) -> np.dtype:
    """The packed structured dtype of one record from the layout's fields."""
    return np.dtype([(f["name"], np.dtype(f["dtype"]), tuple(f["shape"])) for f in fields])


def shard_paths(path: PathLike, num_shards: int) -> list[str]:
    """``[path]`` for one shard, else ``path-00000-of-0000N``, ... (N = ``num_shards``)."""
    path = os.fspath(path)
    if num_shards == 1:
        return [path]
    return [f"{path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def _shard_count(n: int, records_per_shard: int | None, num_shards: int | None) -> int:
    records_per_shard = check_optional_int("records_per_shard", records_per_shard)
    num_shards = check_optional_int("num_shards", num_shards)
    if records_per_shard is not None and num_shards is not None:
        raise ValueError("records_per_shard and num_shards: give one of them, not both")
    if num_shards is not None:
        if num_shards > n:
            raise ValueError(f"num_shards={num_shards} exceeds the number of examples n = {n}")
        return num_shards
    return 1 if records_per_shard is None else -(-n // records_per_shard)


def _packed(arrays: Mapping[str, Any]) -> tuple[np.ndarray, list[dict]]:
    """The examples as one packed structured array (n,) and the layout's fields."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a dict name -> array, got {type(arrays).__name__}")
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    n = leading_axis(list(arrays.values()), name="arrays")
    fields = []
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"arrays: field names must be non-empty strings, got {name!r}")
        if value.dtype.hasobject or value.dtype.fields is not None:
            raise TypeError(
                f"arrays: field {name!r} has dtype {value.dtype}; plain numeric or bool dtypes only"
            )
        fields.append({"name": name, "dtype": value.dtype.str, "shape": list(value.shape[1:])})
    packed = np.empty(n, record_dtype(fields))
    for name, value in arrays.items():
        packed[name] = value
    return packed, fields


def write_array_record(
    path: PathLike,
    arrays: Mapping[str, Any],
    *,
    records_per_shard: int | None = None,
    num_shards: int | None = None,
) -> list[str]:
    """Writes the n examples of ``arrays`` (dict name -> array, leading axis n) as ArrayRecord
    shards, one record per example (the module's fixed layout), in order: record key j of
    the shards read together is example j. Returns the shard paths (pass them to
    ``ArrayRecordSource``).

    Args:
      path: the file (one shard) or the shards' prefix (``shard_paths``).
      records_per_shard, num_shards: at most one; default one shard. Shards are written
        with ``group_size:1`` (what grain needs for fast random access).
    """
    array_record = _require("array_record.python.array_record_module")
    packed, fields = _packed(arrays)
    n = packed.shape[0]
    count = _shard_count(n, records_per_shard, num_shards)
    if records_per_shard is None:  # num_shards (or one) shards of equal size, up to one record
        bounds = np.linspace(0, n, count + 1).round().astype(int)
    else:
        bounds = np.minimum(np.arange(count + 1) * records_per_shard, n)
    paths = shard_paths(path, count)
    for shard, start, stop in zip(paths, bounds[:-1], bounds[1:]):
        writer = array_record.ArrayRecordWriter(shard, "group_size:1")
        try:
            for record in packed[start:stop]:
                writer.write(record.tobytes())
        finally:
            writer.close()
        layout = {
            "format": LAYOUT_FORMAT,
            "fields": fields,
            "record_bytes": packed.dtype.itemsize,
            "num_records": int(stop - start),
        }
        with open(shard + ".layout.json", "w") as stream:
            json.dump(layout, stream, indent=1)
    return paths


def _read_layouts(paths: Sequence[str]) -> list[dict]:
    """Every shard's layout: the same fields for all, and a known format."""
    layouts = []
    for path in paths:
        sidecar = path + ".layout.json"
        layout = read_format_file(
            sidecar,
            LAYOUT_FORMAT,
            name="paths",
            missing=f"{path!r} has no {os.path.basename(sidecar)} (write it with "
            f"write_array_record)",
        )
        if layouts and layout["fields"] != layouts[0]["fields"]:
            raise ValueError(
                f"paths: {path!r} has fields {layout['fields']}, but "
                f"{paths[0]!r} has {layouts[0]['fields']}"
            )
        layouts.append(layout)
    return layouts


class ArrayRecordSource:
    """A data source over ArrayRecord shards written by ``write_array_record``.

    ``read(indices)`` (K,) -> dict name -> (K, ...): the distinct indices, sorted, are read
    in one batched call (``grain.sources.ArrayRecordDataSource.__getitems__``: each shard's
    records in one ``ArrayRecordReader.read``, the shards in parallel threads), decoded
    with one ``np.frombuffer`` and scattered back to the order drawn (duplicates read once).
    Thread-safe: grain's source creates its readers under a lock and its batched read is
    documented thread-safe; the decoding keeps no state.

    Why ``__getitems__`` and not ``dataset[i]`` one by one: ``MapDataset.source`` over this
    source (``self.dataset``, for grain pipelines: ``.map``, ``.batch``) reads element by
    element, K reader calls instead of one per shard. Read-ahead: grain's readers are opened
    with ``readahead_buffer_size:0`` (read-ahead serves sequential scans, not random keys);
    overlapping reads with the step is the loader loop's job (``adambs_jax.host.HostLoader``
    reads ahead in threads, and ``read`` is safe to call from several at once). More shards
    give more parallel reads per batch.

    Attributes:
      paths: the shard paths, in record-key order.
      num_examples: n, the total number of records.
      source: the ``grain.sources.ArrayRecordDataSource``; dataset: ``grain.MapDataset``
        over it; dtype: the packed structured dtype of one record.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike]):
        grain = _require("grain")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(paths, Sequence) or not paths:
            raise ValueError(f"paths: one or more ArrayRecord files, got {paths!r}")
        self.paths = [os.fspath(path) for path in paths]
        layouts = _read_layouts(self.paths)
        self.dtype = record_dtype(layouts[0]["fields"])
        self.source = grain.sources.ArrayRecordDataSource(self.paths)
        self.dataset = grain.MapDataset.source(self.source)
        self.num_examples = len(self.source)
        expected = sum(layout["num_records"] for layout in layouts)
        if self.num_examples != expected:
            raise ValueError(
                f"paths: the shards hold {self.num_examples} records, their layouts say {expected}"
            )
        if self.num_examples < 1:
            raise ValueError("paths: the data is empty (no records)")

    def decode(self, records: Sequence[bytes]) -> dict:
        """The records as a dict name -> (len(records), ...) numpy arrays."""
        size = self.dtype.itemsize
        if any(len(record) != size for record in records):
            raise ValueError(
                f"records: every record must have {size} bytes (the layout's), "
                f"got sizes {sorted({len(r) for r in records})}"
            )
        packed = np.frombuffer(b"".join(records), dtype=self.dtype)
        return {name: np.array(packed[name]) for name in self.dtype.names}

    def read(self, indices: np.ndarray) -> dict:
        indices = check_read_indices(indices, self.num_examples)
        unique, inverse = np.unique(indices, return_inverse=True)
        # grain's batched read needs at least one key (it starts >= 1 reader thread)
        records = self.source.__getitems__(unique.tolist()) if unique.size else []
        fields = self.decode(records)
        return {name: value[inverse.reshape(-1)] for name, value in fields.items()}
