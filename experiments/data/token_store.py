"""Variable-length token sequences stored as plain integer arrays (no pickle).

Keras's ``imdb.npz`` holds each split as an object array of Python lists,
which only a pickle can read. After its first verified load the reviews are
kept as a flat ``int32`` token array plus ``int64`` offsets per split,
review ``i`` being ``tokens[offsets[i]:offsets[i + 1]]``, in an ``.npz``
that is read with ``allow_pickle=False``.

The store records the SHA-256 of the file it was built from and a SHA-256
of its own arrays; a store that fails to load, holds inconsistent arrays,
was built from another source or whose arrays differ from their digest
raises :class:`~experiments.data.integrity.CorruptFileError` naming it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.data.integrity import CorruptFileError, reading_file

SPLITS = ("train", "test")
_INT32_MAX = np.iinfo(np.int32).max


def pack_sequences(sequences: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, offsets)``: the sequences concatenated (int32) and their bounds (int64)."""
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > _INT32_MAX):
        raise ValueError("token ids must lie in [0, 2**31 - 1]")
    return tokens.astype(np.int32), offsets


def unpack_sequences(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """The sequences of :func:`pack_sequences`, as views of ``tokens``."""
    return [tokens[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]


def _content_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_token_store(
    path: Path, splits: dict[str, tuple[Sequence, np.ndarray]], source_sha256: str
) -> None:
    """Write ``{split: (sequences, labels)}`` to ``path`` atomically (temp file + rename)."""
    arrays = {}
    for split, (sequences, labels) in splits.items():
        arrays[f"x_{split}_tokens"], arrays[f"x_{split}_offsets"] = pack_sequences(sequences)
        arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int32)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(
            tmp,
            source_sha256=np.array(source_sha256),
            content_sha256=np.array(_content_digest(arrays)),
            **arrays,
        )
    os.replace(tmp.name, path)


def _check_split(path: Path, arrays: dict[str, np.ndarray], split: str) -> None:
    tokens, offsets = arrays[f"x_{split}_tokens"], arrays[f"x_{split}_offsets"]
    labels = arrays[f"y_{split}"]
    consistent = (
        tokens.dtype == np.int32
        and tokens.ndim == 1
        and offsets.dtype == np.int64
        and labels.dtype == np.int32
        and offsets.shape == (len(labels) + 1,)
        and offsets[0] == 0
        and offsets[-1] == len(tokens)
        and bool(np.all(np.diff(offsets) >= 0))
        and not bool(np.any(tokens < 0))
    )
    if not consistent:
        raise CorruptFileError(f"{path}: inconsistent arrays for the {split} split; delete it")


def read_token_store(path: Path, source_sha256: str) -> dict[str, tuple[list, np.ndarray]]:
    """``{split: (sequences, labels)}`` from ``path`` (no pickle), verified as described above."""
    hint = "delete it and it is rebuilt from the verified source file"
    with reading_file(path, hint=hint), np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
        recorded_source = str(arrays.pop("source_sha256"))
        recorded_content = str(arrays.pop("content_sha256"))
        for split in SPLITS:
            _check_split(path, arrays, split)
    if recorded_source != source_sha256:
        raise CorruptFileError(
            f"{path}: built from another file (sha256 {recorded_source}); {hint}"
        )
    if _content_digest(arrays) != recorded_content:
        raise CorruptFileError(f"{path}: its arrays differ from their recorded digest; {hint}")
    return {
        split: (
            unpack_sequences(arrays[f"x_{split}_tokens"], arrays[f"x_{split}_offsets"]),
            arrays[f"y_{split}"],
        )
        for split in SPLITS
    }
