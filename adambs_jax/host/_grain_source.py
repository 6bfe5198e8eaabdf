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
``<shard>.layout.json`` (``LAYOUT_FORMAT``): the fields, the record size in bytes, the
shard's number of records, its place (``shard_index`` of ``num_shards``, the ``dataset`` id
of the write), its size in bytes and sha256, and ``layout_sha256``, the sha256 of the
layout's own canonical JSON.

Why the checksums: nothing in a record says what its bytes are, so a layout whose label
dtype was changed to another of the same size, a shard truncated or replaced, or shards
passed in another order (record key j would be another example) would all decode silently
as wrong data. ``ArrayRecordSource`` refuses, naming the shard and the problem: a layout
that does not match its checksum, shards of different layouts or writes, shards out of
order or missing from ``paths``, a shard missing, of the wrong size or record count; with
``verify=True`` also a shard whose sha256 differs (O(size): it reads every shard). Errors
of array_record itself (often with an empty message) are raised again naming the files.
Layouts of format ``LEGACY_LAYOUT_FORMAT`` (written before the checksums) are read with the
record count check only.

grain and array_record are imported on first use; without them an ImportError says
``pip install adambs-jax[data]``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from adambs_jax._checks import check_bool, check_optional_int
from adambs_jax._jsonable import read_format_file
from adambs_jax.host._sources import check_read_indices, file_digest, leading_axis

__all__ = [
    "LAYOUT_FORMAT",
    "LEGACY_LAYOUT_FORMAT",
    "layout_checksum",
    "record_dtype",
    "shard_paths",
    "write_array_record",
    "ArrayRecordSource",
]

LAYOUT_FORMAT = "adambs_jax.array_record_layout/2"
LEGACY_LAYOUT_FORMAT = "adambs_jax.array_record_layout/1"  # no checksums, no shard order
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


def layout_checksum(layout: Mapping[str, Any]) -> str:
    """The sha256 of ``layout``'s canonical JSON (sorted keys, no spaces), without its own
    ``layout_sha256``."""
    body = {key: value for key, value in layout.items() if key != "layout_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _write_shard(array_record, path: str, records: np.ndarray) -> None:
    """One shard of ``records`` (packed), one record each; array_record's errors named."""
    try:
        writer = array_record.ArrayRecordWriter(path, "group_size:1")
        try:
            if not writer.ok():
                raise OSError("the writer did not open")
            for record in records:
                writer.write(record.tobytes())
        finally:
            writer.close()
    except Exception as error:
        raise OSError(f"write_array_record: cannot write the shard {path!r}: {error}") from error


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
    ``ArrayRecordSource``, in this order).

    Every shard gets its ``<shard>.layout.json`` (``LAYOUT_FORMAT``), written after the
    shard: its place among the shards, its size and sha256, and the layout's own checksum
    (the module docstring says why).

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
    dataset = uuid.uuid4().hex  # the shards of this write, and only those, share it
    for index, (shard, start, stop) in enumerate(zip(paths, bounds[:-1], bounds[1:])):
        _write_shard(array_record, shard, packed[start:stop])
        layout = {
            "format": LAYOUT_FORMAT,
            "fields": fields,
            "record_bytes": packed.dtype.itemsize,
            "num_records": int(stop - start),
            "shard_index": index,
            "num_shards": count,
            "dataset": dataset,
            "shard_bytes": os.path.getsize(shard),
            "shard_sha256": file_digest(shard),
        }
        layout["layout_sha256"] = layout_checksum(layout)
        with open(shard + ".layout.json", "w") as stream:
            json.dump(layout, stream, indent=1)
    return paths


def _read_layout(path: str) -> dict:
    sidecar = path + ".layout.json"
    layout = read_format_file(
        sidecar,
        (LAYOUT_FORMAT, LEGACY_LAYOUT_FORMAT),
        name="paths",
        missing=f"{path!r} has no {os.path.basename(sidecar)} (write it with write_array_record)",
    )
    if layout["format"] == LAYOUT_FORMAT and layout.get("layout_sha256") != layout_checksum(layout):
        raise ValueError(
            f"paths: the layout {sidecar!r} does not match its checksum: it was changed after "
            f"writing (a changed dtype would decode every record as garbage)"
        )
    return layout


def _check_place(paths: Sequence[str], i: int, layout: dict, first: dict) -> None:
    """Shard ``i`` of ``paths`` is shard i of the same write as the first, all passed."""
    path = paths[i]
    if layout["format"] != first["format"]:
        raise ValueError(
            f"paths: {path!r} has layout format {layout['format']!r}, "
            f"{paths[0]!r} {first['format']!r}"
        )
    if layout["format"] != LAYOUT_FORMAT:
        return
    if layout["dataset"] != first["dataset"]:
        raise ValueError(
            f"paths: {path!r} was written by another write_array_record call than {paths[0]!r}"
        )
    place = (layout["shard_index"], layout["num_shards"])
    if place != (i, len(paths)):
        raise ValueError(
            f"paths[{i}]: {path!r} is shard {place[0]} of {place[1]} of its dataset, passed as "
            f"shard {i} of {len(paths)}: pass all the shards, in the order write_array_record "
            f"returned them (record key j must be example j)"
        )


def _check_shard(array_record, path: str, layout: dict, verify: bool) -> None:
    """The shard file against its layout: present, its size, record count and sha256."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"paths: the shard {path!r} is missing (its layout is there)")
    if layout["format"] == LAYOUT_FORMAT and os.path.getsize(path) != layout["shard_bytes"]:
        raise ValueError(
            f"paths: the shard {path!r} has {os.path.getsize(path)} bytes, its layout says "
            f"{layout['shard_bytes']}: it is truncated or was changed after writing"
        )
    try:
        reader = array_record.ArrayRecordReader(path)
        try:
            count = reader.num_records() if reader.ok() else None
        finally:
            reader.close()
    except Exception as error:
        raise OSError(
            f"paths: cannot open the shard {path!r}: {type(error).__name__}: {error}"
        ) from error
    if count != layout["num_records"]:
        found = "cannot be read as ArrayRecord" if count is None else f"holds {count} records"
        raise ValueError(
            f"paths: the shard {path!r} {found}, its layout says {layout['num_records']}"
        )
    if verify and layout["format"] == LAYOUT_FORMAT and file_digest(path) != layout["shard_sha256"]:
        raise ValueError(
            f"paths: the sha256 of the shard {path!r} does not match its layout (the file is "
            f"corrupted or was changed after writing)"
        )


def _read_layouts(paths: Sequence[str], verify: bool) -> list[dict]:
    """Every shard's layout and file, checked: the same fields, the same write, in order."""
    array_record = _require("array_record.python.array_record_module")
    layouts = [_read_layout(path) for path in paths]
    for path, layout in zip(paths, layouts):
        if layout["fields"] != layouts[0]["fields"]:
            raise ValueError(
                f"paths: {path!r} has fields {layout['fields']}, but "
                f"{paths[0]!r} has {layouts[0]['fields']}"
            )
    for i, layout in enumerate(layouts):
        _check_place(paths, i, layout, layouts[0])
    for path, layout in zip(paths, layouts):
        _check_shard(array_record, path, layout, verify)
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

    Opening checks every shard against its layout (the module docstring: checksum, order,
    size, record count; ``verify=True`` also each shard's sha256) and counts each shard's
    records once (grain is then given them as ``path[0:count]``, so it does not open every
    shard again). A read that fails in array_record is raised as an OSError naming the
    shards of the keys read.

    Args:
      paths: the shard paths, all of them, in the order ``write_array_record`` returned.
      verify: also recompute every shard's sha256 (O(size)) and refuse a changed shard.

    Attributes:
      paths: the shard paths, in record-key order.
      num_examples: n, the total number of records.
      source: the ``grain.sources.ArrayRecordDataSource``; dataset: ``grain.MapDataset``
        over it; dtype: the packed structured dtype of one record.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, verify: bool = False):
        grain = _require("grain")
        check_bool("verify", verify)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(paths, Sequence) or not paths:
            raise ValueError(f"paths: one or more ArrayRecord files, got {paths!r}")
        self.paths = [os.fspath(path) for path in paths]
        layouts = _read_layouts(self.paths, verify)
        self.dtype = record_dtype(layouts[0]["fields"])
        counts = [layout["num_records"] for layout in layouts]
        self._ends = np.cumsum(counts)  # record key j is in the first shard whose end > j
        instructions = [f"{path}[0:{count}]" for path, count in zip(self.paths, counts)]
        try:
            self.source = grain.sources.ArrayRecordDataSource(instructions)
        except Exception as error:
            raise OSError(
                f"paths: grain cannot open the shards {self.paths}: {type(error).__name__}: {error}"
            ) from error
        self.dataset = grain.MapDataset.source(self.source)
        self.num_examples = len(self.source)
        if self.num_examples < 1:
            raise ValueError("paths: the data is empty (no records)")

    def _shards_of(self, keys: np.ndarray) -> list[str]:
        shards = np.unique(np.searchsorted(self._ends, keys, side="right"))
        return [self.paths[i] for i in shards.tolist()]

    def _failing_shards(self, keys: np.ndarray) -> list[str]:
        """The shards whose own keys among ``keys`` fail to read (the error path only: grain's
        error does not say which shard failed); all of them if none fails alone."""
        shard_of = np.searchsorted(self._ends, keys, side="right")
        failing = []
        for shard in np.unique(shard_of).tolist():
            try:
                self.source.__getitems__(keys[shard_of == shard].tolist())
            except Exception:
                failing.append(self.paths[shard])
        return failing or self._shards_of(keys)

    def decode(self, records: Sequence[bytes]) -> dict:
        """The records as a dict name -> (len(records), ...) numpy arrays."""
        size = self.dtype.itemsize
        if any(len(record) != size for record in records):
            raise ValueError(
                f"records: every record must have {size} bytes (the layout's), "
                f"got sizes {sorted({len(r) for r in records})}"
            )
        packed = np.frombuffer(b"".join(records), dtype=self.dtype)
        assert self.dtype.names is not None  # a structured dtype (record_dtype)
        return {name: np.array(packed[name]) for name in self.dtype.names}

    def _read_records(self, keys: np.ndarray) -> list:
        """The records of ``keys`` (sorted, distinct); array_record's errors name the shards."""
        try:
            # grain's batched read needs at least one key (it starts >= 1 reader thread)
            records = self.source.__getitems__(keys.tolist()) if keys.size else []
        except Exception as error:
            raise OSError(
                f"ArrayRecordSource.read: reading {keys.size} records failed in the shards "
                f"{self._failing_shards(keys)}: {type(error).__name__}: "
                f"{error or '(array_record gave no message)'}"
            ) from error
        size = self.dtype.itemsize
        bad = [key for key, record in zip(keys.tolist(), records) if len(record) != size]
        if bad:
            raise ValueError(
                f"ArrayRecordSource.read: records {bad[:8]} of {self._shards_of(np.array(bad))} "
                f"do not have the layout's {size} bytes: the shard was truncated or changed "
                f"after it was opened"
            )
        return records

    def read(self, indices: np.ndarray) -> dict:
        indices = check_read_indices(indices, self.num_examples)
        unique, inverse = np.unique(indices, return_inverse=True)
        fields = self.decode(self._read_records(unique))
        return {name: value[inverse.reshape(-1)] for name, value in fields.items()}
