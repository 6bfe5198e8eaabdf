"""Pickles that can hold only data: a restricted unpickler for CIFAR and IMDB.

A pickle may name any importable callable and call it while loading
(``os.system``, ``builtins.exec``, ...). The CIFAR "python version" batches
and the object arrays of Keras's ``imdb.npz`` need only containers the
pickle opcodes build themselves (dict, list, tuple, int, bytes, str) plus
numpy arrays, so :class:`DataUnpickler` resolves exactly these globals and
refuses every other one:

* ``numpy.ndarray`` and ``numpy.dtype`` with numpy's array reconstructors
  (``_reconstruct`` for protocols <= 4, ``_frombuffer`` for protocol 5; the
  module is ``numpy.core`` in pickles written by numpy 1, ``numpy._core``
  by numpy 2), and ``scalar`` for numpy scalars;
* ``_codecs.encode``, which Python 3 writes for ``bytes`` under protocol 2,
  narrowed to the latin-1 round trip it is used for.

Files are also checksum-verified before they reach this unpickler (see
:mod:`experiments.data.integrity`); this is the second line, so that even a
file that matches by mistake cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
from numpy.lib import format as npy_format

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (``bytes`` written by Python 3)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r})"
        )
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _package in ("numpy.core", "numpy._core"):  # as written by numpy 1 / numpy 2
    ALLOWED_GLOBALS[(f"{_package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    ALLOWED_GLOBALS[(f"{_package}.multiarray", "scalar")] = _multiarray.scalar
    ALLOWED_GLOBALS[(f"{_package}.numeric", "_frombuffer")] = _numeric._frombuffer


class DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (data, never code)."""

    def __init__(self, stream, *, source: str | os.PathLike, encoding: str):
        super().__init__(stream, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load {module}.{name}; a data pickle holds "
                "only arrays, lists, dicts, numbers and strings (is this the official file?)"
            ) from None


def load_data_pickle(stream, *, source: str | os.PathLike, encoding: str = "bytes"):
    """``pickle.load(stream, encoding=encoding)`` restricted to data (see module docstring)."""
    return DataUnpickler(stream, source=source, encoding=encoding).load()


def _read_npy(stream, source: str) -> np.ndarray:
    """One ``.npy`` member; object arrays go through :class:`DataUnpickler`."""
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if not dtype.hasobject:
        count = int(np.prod(shape, dtype=np.int64))
        raw = stream.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise EOFError(f"{source}: array data ends early")
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    array = load_data_pickle(stream, source=source, encoding="latin1")
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ValueError(f"{source}: the pickled array does not match its header {shape}")
    return array


def load_npz_with_objects(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an ``.npz`` that may hold object arrays, read without code.

    Like ``np.load(path, allow_pickle=True)`` but object arrays are unpickled by
    :class:`DataUnpickler`. A missing key raises ``KeyError``.
    """
    with zipfile.ZipFile(path) as archive:
        arrays = {}
        for key in keys:
            with archive.open(key + ".npy") as member:
                arrays[key] = _read_npy(io.BufferedReader(member), f"{path}[{key}]")
        return arrays
