"""Data directory, checksums and (optional) downloads for the real datasets.

Data directory: the ``data_dir`` argument, else the environment variable
``ADAMBS_DATA_DIR``, else ``~/.cache/adambs_jax``. Each dataset lives in its
own sub-folder (``<data_dir>/mnist/``, ``<data_dir>/cifar10/``, ...).

When a required file is missing, :func:`ensure_files` tries each public URL
of the file in turn (``urllib`` only, with a timeout), writes to a ``.part``
file, verifies the published checksum and only then renames it into place.

* A network failure on every URL raises ``FileNotFoundError`` naming the
  file(s), the folder to put them in and the URLs.
* A download whose checksum differs raises :class:`ChecksumMismatchError`
  and leaves nothing behind.
* A file already in the folder is verified too, before anything reads it
  (see :mod:`experiments.data.integrity`): a file that differs from its
  pinned checksum raises :class:`ChecksumMismatchError` naming it and saying
  to delete it (the tests pin the checksums of their tiny files).

:func:`open_url` is the only function that touches the network; tests replace
it so they never download anything.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from experiments.data.integrity import (
    ChecksumMismatchError,
    CorruptFileError,
    RemoteFile,
    file_digest,
    verify_file,
)

__all__ = [
    "ChecksumMismatchError",
    "CorruptFileError",
    "DownloadError",
    "RemoteFile",
    "download_file",
    "ensure_files",
    "file_digest",
    "open_url",
    "resolve_data_dir",
    "verify_file",
]

DATA_DIR_ENV = "ADAMBS_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/adambs_jax"
DOWNLOAD_TIMEOUT_S = 60.0
_BLOCK = 1 << 20
DISCARDED_HINT = "the download was discarded; put the official file in place by hand"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$ADAMBS_DATA_DIR``, else ``~/.cache/adambs_jax``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


class DownloadError(OSError):
    """No URL of a file could be fetched."""


def open_url(url: str, timeout: float):
    """Open ``url`` for reading (the single network entry point)."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https/http URLs


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)


def download_file(remote: RemoteFile, directory: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``remote`` into ``directory``; verify it; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    destination = directory / remote.filename
    partial = directory / (remote.filename + ".part")
    errors = []
    for url in remote.urls:
        try:
            with open_url(url, timeout) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, _BLOCK)
        except _NETWORK_ERRORS as err:
            partial.unlink(missing_ok=True)
            errors.append(f"{url}: {err}")
            continue
        try:
            verify_file(partial, remote, hint=DISCARDED_HINT)
        except ChecksumMismatchError as err:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatchError(f"downloaded from {url}: {err}") from None
        os.replace(partial, destination)
        return destination
    raise DownloadError("; ".join(errors) or "no URL known")


def ensure_files(
    directory: Path,
    remotes: Sequence[RemoteFile],
    *,
    dataset: str,
    download: bool = True,
    hint: str = "",
) -> list[Path]:
    """Return the paths of ``remotes`` in ``directory``, downloading missing ones.

    Raises:
      FileNotFoundError: a file is missing and could not be downloaded (or
        ``download`` is False); the message lists what to put where.
      ChecksumMismatchError: a file found in ``directory`` or a downloaded one
        failed verification (the message names it and says to delete it).
    """
    failures = []
    for remote in remotes:
        if (directory / remote.filename).exists():
            verify_file(directory / remote.filename, remote)
            continue
        if not download:
            failures.append((remote, "downloads disabled"))
            continue
        try:
            download_file(remote, directory)
        except OSError as err:  # DownloadError, or an unwritable directory
            failures.append((remote, str(err)))
    if failures:
        lines = [
            f"{dataset}: missing file(s) in {directory} and could not download them.",
            f"Put these files in {directory} (or set data_dir= / ${DATA_DIR_ENV}):",
        ]
        for remote, reason in failures:
            lines.append(f"  - {remote.filename}  (from {' or '.join(remote.urls)}; {reason})")
        if hint:
            lines.append(hint)
        raise FileNotFoundError("\n".join(lines))
    return [directory / remote.filename for remote in remotes]
