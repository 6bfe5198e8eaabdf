"""CIFAR-10 and CIFAR-100 from the "python version" pickles (Krizhevsky 2009).

Accepted layouts (either is enough):

* ``<data_dir>/cifar10/cifar-10-batches-py/{data_batch_1..5, test_batch}`` or
  ``<data_dir>/cifar10/cifar-10-python.tar.gz``;
* ``<data_dir>/cifar100/cifar-100-python/{train, test}`` or
  ``<data_dir>/cifar100/cifar-100-python.tar.gz``.

Tarballs are read in place (members are read from the archive, nothing is
extracted). If neither is present the tarball is downloaded from
https://www.cs.toronto.edu/~kriz/.

Every file is checked against its pinned MD5 before it is read, whether
downloaded or found in the cache: the tarball against the published sum, the
extracted batches against the sums torchvision pins (``member_md5``). A file
that differs raises :class:`~experiments.data.integrity.ChecksumMismatchError`
naming it; one that cannot be decoded raises
:class:`~experiments.data.integrity.CorruptFileError` naming it.

Each pickle is a dict with ``b"data"``: uint8 ``(N, 3072)`` in channel-major
order (1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major),
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100; the 100 fine
classes are used, not the 20 coarse ones). Official split: 50 000 train,
10 000 test.

Preprocessing: images become ``(N, 32, 32, 3)``, are scaled to [0, 1] (/255)
and standardized per channel with training mean/std.

Pickles are an executable format. Besides the checksum, the batches are read
with :func:`experiments.data.safe_pickle.load_data_pickle`, which builds only
arrays, lists, dicts, numbers and strings and refuses any other global, so
even a file that matched by mistake cannot run code.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import RemoteFile, ensure_files, resolve_data_dir
from experiments.data.integrity import reading_file, verify_file
from experiments.data.preprocessing import standardize_images
from experiments.data.safe_pickle import load_data_pickle

_BASE_URL = "https://www.cs.toronto.edu/~kriz/"

CIFAR_LAYOUTS = {
    "cifar10": {
        "archive": RemoteFile(
            "cifar-10-python.tar.gz",
            (_BASE_URL + "cifar-10-python.tar.gz",),
            md5="c58f30108f718f92721af3b95e74349a",
        ),
        "folder": "cifar-10-batches-py",
        "train": tuple(f"data_batch_{k}" for k in range(1, 6)),
        "test": ("test_batch",),
        "member_md5": {  # the extracted batches, as torchvision pins them
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        "label_key": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "archive": RemoteFile(
            "cifar-100-python.tar.gz",
            (_BASE_URL + "cifar-100-python.tar.gz",),
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "member_md5": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        },
        "label_key": b"fine_labels",
        "num_classes": 100,
    },
}


def decode_batch(batch: dict, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR pickle dict to ``(N, 32, 32, 3)`` uint8 images and int32 labels."""
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[label_key], dtype=np.int32)
    return np.ascontiguousarray(images), labels


def _read_members(source: Path, folder: str, members: tuple[str, ...]) -> list[dict]:
    """The pickled batches ``members`` from the folder or tarball ``source`` (verified)."""
    if source.is_dir():
        batches = []
        for member in members:
            with reading_file(source / member), open(source / member, "rb") as stream:
                batches.append(load_data_pickle(stream, source=source / member))
        return batches
    with reading_file(source), tarfile.open(source, "r:gz") as archive:
        batches = []
        for member in members:
            stream = archive.extractfile(f"{folder}/{member}")
            if stream is None:
                raise ValueError(f"{source}: {folder}/{member} is not a regular file")
            batches.append(load_data_pickle(stream, source=f"{source}:{folder}/{member}"))
        return batches


def _verify_members(source: Path, layout: dict) -> None:
    for member in layout["train"] + layout["test"]:
        verify_file(source / member, RemoteFile(member, (), md5=layout["member_md5"][member]))


def _concatenate(batches: list[dict], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    decoded = [decode_batch(b, label_key) for b in batches]
    return (np.concatenate([d[0] for d in decoded]), np.concatenate([d[1] for d in decoded]))


def load_cifar(
    name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """``cifar10`` or ``cifar100`` as standardized ``(N, 32, 32, 3)`` images."""
    layout = CIFAR_LAYOUTS[name]
    directory = resolve_data_dir(data_dir) / name
    source = directory / layout["folder"]
    if not all((source / m).exists() for m in layout["train"] + layout["test"]):
        hint = (
            f"Alternatively put the extracted folder {layout['folder']}/ "
            f"(with {', '.join(layout['train'] + layout['test'])}) in {directory}."
        )
        (source,) = ensure_files(
            directory, [layout["archive"]], dataset=name, download=download, hint=hint
        )
    else:
        _verify_members(source, layout)
    train_images, y_train = _concatenate(
        _read_members(source, layout["folder"], layout["train"]), layout["label_key"]
    )
    test_images, y_test = _concatenate(
        _read_members(source, layout["folder"], layout["test"]), layout["label_key"]
    )
    x_train, x_test, stats = standardize_images(train_images, test_images)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=layout["num_classes"],
        name=name,
        task="classification",
        description=(
            f"CIFAR-{layout['num_classes']} (python pickles), official train/test split; "
            "(N, 32, 32, 3) images scaled to [0, 1], per-channel standardized with "
            "training mean/std."
        ),
        metadata={"source": str(source), **stats},
    )
