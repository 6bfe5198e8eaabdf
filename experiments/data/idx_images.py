"""MNIST and Fashion-MNIST from their IDX files.

Files (official 60 000 / 10 000 train/test split), in
``<data_dir>/mnist/`` and ``<data_dir>/fashion-mnist/`` respectively::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

(uncompressed copies without ``.gz`` are accepted too). Missing files are
downloaded (see :mod:`experiments.data.download`). Every file, downloaded or
found in the folder, is checked against its pinned MD5 before it is read:
the ``.gz`` files against the sums published with the datasets (the same
ones torchvision pins), uncompressed copies against the sums of the
decompressed official files (``_RAW_MD5``).

IDX format (LeCun): a big-endian header ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the data in C order; type
``0x08`` is uint8 (the only one these datasets use).

Preprocessing: images become ``(N, 28, 28, 1)``, are scaled to [0, 1]
(/255) and standardized with the training mean/std of the single channel.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import RemoteFile, ensure_files, resolve_data_dir
from experiments.data.integrity import reading_file, verify_file
from experiments.data.preprocessing import standardize_images

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_MD5 = {
    "mnist": {
        TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_RAW_MD5 = {  # the decompressed files (md5sum after gunzip of the official .gz files)
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_MIRRORS = {"mnist": _MNIST_MIRRORS, "fashion-mnist": _FASHION_MIRRORS}
_DESCRIPTIONS = {
    "mnist": "MNIST handwritten digits (LeCun et al.)",
    "fashion-mnist": "Fashion-MNIST clothing images (Xiao et al. 2017)",
}


def remote_files(name: str) -> list[RemoteFile]:
    """The four IDX files of ``name`` (``"mnist"`` or ``"fashion-mnist"``)."""
    return [
        RemoteFile(filename, tuple(m + filename for m in _MIRRORS[name]), md5=md5)
        for filename, md5 in _MD5[name].items()
    ]


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"unknown IDX data type 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header_end], dtype=">u4"))
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(f"IDX payload has {len(raw) - header_end} bytes, expected {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed if its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with reading_file(path), opener(path, "rb") as stream:
        return parse_idx(stream.read())


def _locate(directory: Path, name: str, download: bool) -> dict[str, Path]:
    """Verified paths of the four files: the ``.gz`` if present (or downloaded),
    else an uncompressed copy."""
    paths, to_fetch = {}, []
    for remote in remote_files(name):
        uncompressed = directory / remote.filename[: -len(".gz")]
        if (directory / remote.filename).exists() or not uncompressed.exists():
            to_fetch.append(remote)
            continue
        verify_file(
            uncompressed, RemoteFile(uncompressed.name, (), md5=_RAW_MD5[name][uncompressed.name])
        )
        paths[remote.filename] = uncompressed
    for path in ensure_files(directory, to_fetch, dataset=name, download=download):
        paths[path.name] = path
    return paths


def load_idx_dataset(
    name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """``mnist`` or ``fashion-mnist`` as standardized ``(N, 28, 28, 1)`` images."""
    directory = resolve_data_dir(data_dir) / name
    paths = _locate(directory, name, download)
    train_images = read_idx(paths[TRAIN_IMAGES])
    test_images = read_idx(paths[TEST_IMAGES])
    y_train = read_idx(paths[TRAIN_LABELS]).astype(np.int32)
    y_test = read_idx(paths[TEST_LABELS]).astype(np.int32)
    if (
        train_images.ndim != 3
        or len(train_images) != len(y_train)
        or len(test_images) != len(y_test)
    ):
        raise ValueError(f"{name}: inconsistent IDX files in {directory}")
    x_train, x_test, stats = standardize_images(train_images[..., None], test_images[..., None])
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        name=name,
        task="classification",
        description=(
            f"{_DESCRIPTIONS[name]}, official train/test split; (N, 28, 28, 1) images "
            "scaled to [0, 1] and standardized with the training mean/std."
        ),
        metadata={"directory": str(directory), **stats},
    )
