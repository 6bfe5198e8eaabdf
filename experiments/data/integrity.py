"""Checksums of data files and the errors that name a bad file.

Every data file is checked against the checksum pinned in the code *before*
it is read, whether it was just downloaded or found in the cache: the CIFAR
and IMDB formats are pickles (executable), and a truncated or foreign file
must be refused with its name, not fail later with a bare ``EOFError``.

* :class:`ChecksumMismatchError`: the file's digest differs from the pin.
* :class:`CorruptFileError`: a file could not be decoded (truncated, not the
  format it claims); :func:`reading_file` turns the decoders' low-level
  errors into this, naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import pickle
import tarfile
import zipfile
import zlib

from adambs_jax.host import _sources as sources

_BLOCK = 1 << 20
DELETE_HINT = "delete it (a missing file is downloaded again) or replace it with the official file"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A published file: its name, mirrors (tried in order) and checksums.

    Only checksums copied from the publishers (or from torchvision / Keras,
    which pin the same files) are written here; ``None`` means unknown.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


class CorruptFileError(ValueError):
    """A data file is damaged or not what its name says; the message names it."""


class ChecksumMismatchError(CorruptFileError):
    """A file's digest differs from the published checksum."""


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest (``"md5"`` or ``"sha256"``) of a file, read in 1 MiB blocks
    (``adambs_jax.host._sources.file_digest``)."""
    return sources.file_digest(path, algorithm, _BLOCK)


def verify_file(path: str | os.PathLike, remote: RemoteFile, *, hint: str = DELETE_HINT) -> None:
    """Raise :class:`ChecksumMismatchError` if ``path`` does not match ``remote``.

    A file with no pinned checksum at all is refused too: nothing is read
    unverified.
    """
    pinned = [(a, getattr(remote, a)) for a in ("sha256", "md5") if getattr(remote, a)]
    if not pinned:
        raise ChecksumMismatchError(
            f"{path}: no checksum is pinned for {remote.filename}, so it cannot be verified."
        )
    for algorithm, expected in pinned:
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            raise ChecksumMismatchError(
                f"{path}: {algorithm} is {actual}, expected {expected} for "
                f"{remote.filename}; the file is corrupt, truncated or a different "
                f"version: {hint}."
            )


_DECODING_ERRORS = (
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    tarfile.TarError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    KeyError,
    ValueError,
)


@contextlib.contextmanager
def reading_file(path: str | os.PathLike, *, hint: str = DELETE_HINT):
    """Turn a decoder's error inside the block into :class:`CorruptFileError` naming ``path``
    (``hint`` says what to do about it)."""
    try:
        yield
    except CorruptFileError:
        raise
    except _DECODING_ERRORS as err:
        raise CorruptFileError(
            f"{path}: cannot be read ({type(err).__name__}: {err}); the file is "
            f"truncated or damaged: {hint}."
        ) from err
