"""Host-side data sources: the records of a dataset that lives on the host (or on disk).

A step that takes a gathered batch (``make_host_train_step``) needs the records of the K
drawn examples, not the dataset. A data source gives them by batched random access:

    source.num_examples              # n
    batch = source.read(indices)     # indices (K,) int numpy -> pytree of numpy (K, ...)

``read`` is called from a loader thread (``HostLoader``, ``_loop``), so it must be safe to
call from a thread other than the one that made the source. ``ArraySource`` holds numpy
arrays in memory; ``MemmapSource`` reads ``.npy`` files through read-only numpy memmaps
(a dataset larger than host memory: ``write_memmap_dataset`` writes one in chunks, with a
JSON manifest of shapes, dtypes and sha256 sums, and ``open_memmap_dataset`` opens it);
``_grain_source`` has one over ArrayRecord files (the optional ``[data]`` extra).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, Union, runtime_checkable

import jax
import numpy as np

from adambs_jax._checks import check_bool, check_int, check_optional_int
from adambs_jax._jsonable import read_format_file

__all__ = [
    "DataSource",
    "ArraySource",
    "MemmapSource",
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "write_memmap_dataset",
    "open_memmap_dataset",
    "check_source",
    "check_read_indices",
    "file_digest",
    "manifest_file",
]


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
            f"ab.host.ArraySource(arrays); got {type(source).__name__}"
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


def leading_axis(leaves: list, *, name: str) -> int:
    """The common leading axis n >= 1 of ``leaves``; else a ValueError naming ``name``."""
    if not leaves:
        raise ValueError(f"{name}: the data is empty (no leaves)")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name}: every leaf must have the same leading axis n, got {sorted(map(str, sizes))}"
        )
    (num_examples,) = sizes
    assert num_examples is not None  # refused above
    if num_examples < 1:
        raise ValueError(f"{name}: the data is empty (n = 0)")
    return int(num_examples)


class ArraySource:
    """A data source over a pytree of arrays already in host memory (leading axis n).

    Examples:
      >>> import numpy as np
      >>> source = ArraySource({"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)})
      >>> source.num_examples, source.read(np.array([4, 0]))["y"].tolist()
      (5, [4, 0])
    """

    def __init__(self, arrays: Any):
        self.num_examples = leading_axis(jax.tree.leaves(arrays), name="arrays")
        self.arrays = jax.tree.map(np.asarray, arrays)

    def read(self, indices: np.ndarray) -> Any:
        indices = check_read_indices(indices, self.num_examples)
        return jax.tree.map(lambda leaf: leaf[indices], self.arrays)


PathLike = Union[str, "os.PathLike[str]"]
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "adambs_jax.memmap_dataset/1"
DEFAULT_CHUNK_SIZE = 65536
_FIELD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")  # a safe file name, no path


def read_each_once(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` reading every distinct row once, in ascending order (a memmap then
    touches each page once, front to back), scattered back to the order drawn."""
    unique, inverse = np.unique(indices, return_inverse=True)
    return np.asarray(np.take(array, unique, axis=0))[inverse.reshape(-1)]


class MemmapSource:
    """A data source over ``.npy`` files opened as read-only numpy memmaps (n may exceed
    host memory: only the pages of the rows read are loaded, by the OS page cache).

    ``MemmapSource(files, *, verify=False)`` takes either a dict ``name -> path`` of ``.npy``
    files (each opened with ``np.load(path, mmap_mode="r")``; an already open array, e.g. a
    memmap, is taken as is) or a directory written by ``write_memmap_dataset`` (its
    manifest is checked against the files; ``verify=True`` also recomputes every file's
    sha256, O(size), and refuses a file that changed). Every field must have the same
    leading axis n.

    ``read(indices)`` (K,) -> dict ``name -> (K, ...)``: the K indices are sorted, every
    distinct row is read once (``np.take`` on the memmap) and scattered back to the order
    drawn, duplicates included. Thread-safe: the memmaps are read-only and a read keeps no
    state (no shared file offset), so loader threads may call ``read`` concurrently.

    Attributes:
      arrays: dict name -> read-only memmap (n, ...).
      num_examples: n.
      manifest: the dataset's manifest (a dict) when opened from a directory, else None.

    Examples:
      >>> import tempfile, numpy as np
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     _ = write_memmap_dataset(directory, {"x": np.arange(10.0).reshape(5, 2)})
      ...     source = MemmapSource(directory)
      ...     source.num_examples, source.read(np.array([4, 0, 4]))["x"][:, 0].tolist()
      (5, [8.0, 0.0, 8.0])
    """

    def __init__(self, files: PathLike | Mapping[str, Any], *, verify: bool = False):
        check_bool("verify", verify)
        self.manifest: dict | None = None
        if isinstance(files, (str, os.PathLike)):
            self.arrays, self.manifest = _open_dataset(os.fspath(files), verify)
        elif isinstance(files, Mapping):
            self.arrays = {
                _check_field_name(name): _open_npy(name, value) for name, value in files.items()
            }
        else:
            raise TypeError(
                f"files must be a dict name -> .npy path or a directory written by "
                f"write_memmap_dataset, got {type(files).__name__}"
            )
        self.num_examples = leading_axis(list(self.arrays.values()), name="files")

    def read(self, indices: np.ndarray) -> dict:
        indices = check_read_indices(indices, self.num_examples)
        return {name: read_each_once(array, indices) for name, array in self.arrays.items()}


def _check_field_name(name: Any) -> str:
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise ValueError(
            f"field names must be non-empty strings of letters, digits, '_', '.' or '-' "
            f"(not starting with '.' or '-'), got {name!r}"
        )
    return name


def _open_npy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"files[{name!r}] must be a .npy path or an array, got {type(value).__name__}"
        )
    try:
        return np.load(value, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"files[{name!r}]: cannot open {os.fspath(value)!r} as .npy: {error}"
        ) from error


def file_digest(path: PathLike, algorithm: str = "sha256", block_size: int = 1 << 22) -> str:
    """The hex digest of a file (``algorithm``: a ``hashlib`` name, e.g. ``"sha256"`` or
    ``"md5"``), read in blocks (O(1) memory). Also what ``experiments/data`` verifies the
    downloaded files with."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: str) -> dict:
    return read_format_file(
        os.path.join(directory, MANIFEST_NAME),
        MANIFEST_FORMAT,
        name="directory",
        missing=f"{directory!r} holds no {MANIFEST_NAME} (write it with write_memmap_dataset)",
    )


def _check_manifest(manifest: dict, directory: str) -> dict:
    """``manifest["fields"]`` after checking the manifest's structure (a ValueError naming
    the manifest file, not a KeyError)."""
    where = f"{os.path.join(directory, MANIFEST_NAME)!r}"
    fields = manifest.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise ValueError(f"directory: {where} has no fields (a dict name -> spec)")
    for name, spec in fields.items():
        missing = {"file", "shape", "dtype", "sha256"} - set(spec if isinstance(spec, dict) else ())
        if missing:
            raise ValueError(f"directory: {where}, field {name!r} lacks {sorted(missing)}")
    return fields


def manifest_file(directory: str, name: str, file: Any) -> str:
    """The path of a field's file from its manifest entry, which must be a relative path
    inside ``directory``: an absolute path or one that climbs out with ``..`` would make
    opening (or overwriting) a dataset read (or delete) a file elsewhere, so it is refused."""
    drive, rest = os.path.splitdrive(file) if isinstance(file, str) else ("", "")
    parts = os.path.normpath(rest).split(os.sep) if rest else []
    if drive or not parts or os.path.isabs(rest) or parts[0] in (os.curdir, os.pardir):
        raise ValueError(
            f"field {name!r}: the manifest's file entry {file!r} is not a relative path "
            f"inside the dataset directory {directory!r}; refused"
        )
    return os.path.join(directory, rest)


def _open_dataset(directory: str, verify: bool) -> tuple[dict, dict]:
    """The fields of a dataset directory as memmaps, each checked against the manifest."""
    manifest = _read_manifest(directory)
    arrays = {}
    for name, spec in _check_manifest(manifest, directory).items():
        path = manifest_file(directory, name, spec["file"])
        array = _open_npy(_check_field_name(name), path)
        expected = (tuple(spec["shape"]), np.dtype(spec["dtype"]))
        if (array.shape, array.dtype) != expected:
            raise ValueError(
                f"field {name!r}: {spec['file']} has shape {array.shape} and dtype "
                f"{array.dtype}, the manifest says {expected[0]} and {expected[1]}"
            )
        if verify and file_digest(path) != spec["sha256"]:
            raise ValueError(
                f"field {name!r}: the sha256 of {spec['file']} does not match the manifest "
                f"(the file is corrupted or was changed after writing)"
            )
        arrays[name] = array
    return arrays, manifest


def open_memmap_dataset(directory: PathLike, verify: bool = False) -> MemmapSource:
    """The ``MemmapSource`` of a directory written by ``write_memmap_dataset``; with
    ``verify`` True every file's sha256 is recomputed (O(size)) and a changed file refused."""
    return MemmapSource(os.fspath(directory), verify=verify)


def write_memmap_dataset(
    directory: PathLike,
    arrays_or_chunks: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    num_examples: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
) -> dict:
    """Writes a dataset of n examples as one ``.npy`` file per field plus a JSON manifest,
    in chunks, so that n = 10^7 never needs to fit in memory; returns the manifest.

    The files are written aside, in a staging directory ``directory/.staging-*`` (the same
    file system), then moved in with ``os.replace``, the manifest last. A file is never
    rewritten in place: a process reading the old dataset keeps the data of its open
    memmaps (the replaced file lives on until they close; rewriting it would change their
    data under them, or end them with SIGBUS if it shrank), and a write that fails (a bad
    chunk, a full disk, an interrupt) leaves the old dataset as it was.

    Args:
      directory: where to write (created if missing); ``<name>.npy`` per field and
        ``manifest.json`` (``MANIFEST_FORMAT``: n, and per field its file, shape, dtype and
        sha256).
      arrays_or_chunks: a dict name -> array (leading axis n; a memmap is fine: it is
        copied ``chunk_size`` rows at a time), or an iterable of such dicts, the chunks in
        order, whose leading axes add up to ``num_examples``.
      num_examples: n; required with an iterable of chunks (the files are allocated
        first), checked against the arrays otherwise.
      chunk_size: rows copied at a time from a dict of arrays.
      overwrite: replace a dataset already in ``directory`` (else refused). While the new
        files are moved in (a few renames), the directory holds no manifest: an open then
        fails instead of pairing old and new files. The old dataset's files that the new
        one does not have are deleted.

    Raises:
      ValueError / TypeError naming the argument: bad field names, chunks whose fields,
      trailing shapes or dtypes differ from the first chunk's, object dtypes, a total
      other than ``num_examples``; FileExistsError: ``directory`` holds a dataset.
    """
    directory = os.fspath(directory)
    chunk_size = check_int("chunk_size", chunk_size)
    num_examples = check_optional_int("num_examples", num_examples)
    check_bool("overwrite", overwrite)
    if isinstance(arrays_or_chunks, Mapping):
        n = leading_axis(list(arrays_or_chunks.values()), name="arrays_or_chunks")
        if num_examples is not None and num_examples != n:
            raise ValueError(f"num_examples={num_examples}, but the arrays have n = {n}")
        num_examples, chunks = n, _slices(arrays_or_chunks, n, chunk_size)
    elif num_examples is None:
        raise ValueError("num_examples: required when arrays_or_chunks is an iterable of chunks")
    else:
        chunks = iter(arrays_or_chunks)
    if os.path.exists(os.path.join(directory, MANIFEST_NAME)) and not overwrite:
        raise FileExistsError(
            f"directory: {directory!r} already holds a dataset; pass overwrite=True"
        )
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=directory)
    try:
        fields = _write_chunks(staging, chunks, num_examples)
        manifest = {"format": MANIFEST_FORMAT, "num_examples": num_examples, "fields": fields}
        _write_json(os.path.join(staging, MANIFEST_NAME), manifest)
        _move_in(staging, directory, fields)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(directory):
            os.rmdir(directory)
    return manifest


def _write_json(path: str, content: dict) -> None:
    """``content`` as JSON in ``path``, on disk (fsync) before it is moved anywhere."""
    with open(path, "w") as stream:
        json.dump(content, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())


def _old_files(directory: str) -> set:
    """The files of the dataset in ``directory`` (relative paths inside it); none if there
    is no manifest or it cannot be trusted to name only files of the directory."""
    try:
        fields = _check_manifest(_read_manifest(directory), directory)
        return {
            os.path.relpath(manifest_file(directory, name, spec["file"]), directory)
            for name, spec in fields.items()
        }
    except (OSError, ValueError):
        return set()


def _move_in(staging: str, directory: str, fields: dict) -> None:
    """Moves the staged files into ``directory`` (``os.replace``, each atomic), the old
    manifest out first and the new one last, then deletes the old dataset's other files."""
    old = _old_files(directory)
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # no moment where the old manifest names the new files
    new = set()
    for spec in fields.values():
        os.replace(os.path.join(staging, spec["file"]), os.path.join(directory, spec["file"]))
        new.add(os.path.normpath(spec["file"]))
    os.replace(os.path.join(staging, MANIFEST_NAME), manifest_path)
    for stale in old - new:
        try:
            os.remove(os.path.join(directory, stale))
        except OSError:  # already gone, or not ours to delete: the new dataset is complete
            pass


def _slices(arrays: Mapping[Any, Any], n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield {name: array[start : start + chunk_size] for name, array in arrays.items()}


def _check_chunk(chunk: Any, number: int, first: dict | None) -> tuple[dict, int]:
    """The chunk's fields as numpy arrays and its length, after checking it against the
    first chunk's (name -> (trailing shape, dtype))."""
    if not isinstance(chunk, Mapping):
        raise TypeError(
            f"arrays_or_chunks: chunk {number} must be a dict name -> array, "
            f"got {type(chunk).__name__}"
        )
    chunk = {_check_field_name(name): np.asarray(value) for name, value in chunk.items()}
    size = leading_axis(list(chunk.values()), name=f"arrays_or_chunks: chunk {number}")
    if first is not None and set(chunk) != set(first):
        raise ValueError(
            f"arrays_or_chunks: chunk {number} has fields {sorted(chunk)}, "
            f"the first chunk {sorted(first)}"
        )
    for name, value in chunk.items():
        if value.dtype.hasobject:
            raise TypeError(f"arrays_or_chunks: field {name!r} has an object dtype")
        if first is not None and (value.shape[1:], value.dtype) != first.get(name):
            raise ValueError(
                f"arrays_or_chunks: chunk {number}, field {name!r}: shape {value.shape[1:]} "
                f"and dtype {value.dtype} per example, but the first chunk's are "
                f"{first[name]}"
            )
    return chunk, size


def _write_chunks(directory: str, chunks: Iterable, num_examples: int) -> dict:
    """Writes the chunks into preallocated ``.npy`` memmaps; the manifest's fields."""
    files, first, offset = {}, None, 0
    for number, chunk in enumerate(chunks):
        chunk, size = _check_chunk(chunk, number, first)
        if first is None:
            first = {name: (value.shape[1:], value.dtype) for name, value in chunk.items()}
            files = {
                name: np.lib.format.open_memmap(
                    os.path.join(directory, f"{name}.npy"),
                    mode="w+",
                    dtype=value.dtype,
                    shape=(num_examples,) + value.shape[1:],
                )
                for name, value in chunk.items()
            }
        if offset + size > num_examples:
            raise ValueError(f"num_examples={num_examples}, but the chunks hold more examples")
        for name, value in chunk.items():
            files[name][offset : offset + size] = value
        offset += size
    if offset != num_examples:
        raise ValueError(f"num_examples={num_examples}, but the chunks hold {offset} examples")
    fields = {}
    for name, memmap in files.items():
        memmap.flush()
        fields[name] = {
            "file": f"{name}.npy",
            "shape": list(memmap.shape),
            "dtype": memmap.dtype.str,
            "sha256": None,
        }
        del memmap
    files.clear()  # close the memmaps before hashing the files
    for spec in fields.values():
        spec["sha256"] = file_digest(os.path.join(directory, spec["file"]))
    return fields
