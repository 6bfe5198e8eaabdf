"""Datasets for the experiments: ``load_dataset(name, ...) -> Dataset``.

See :mod:`experiments.data.registry` for the list of names and
:mod:`experiments.data.preprocessing` for the standardization conventions and
:mod:`experiments.data.integrity` for how data files are verified before they
are read (:class:`CorruptFileError`, :class:`ChecksumMismatchError`).
"""

from experiments.data.dataset import Dataset
from experiments.data.download import ChecksumMismatchError, CorruptFileError, resolve_data_dir
from experiments.data.registry import list_datasets, load_dataset

__all__ = [
    "ChecksumMismatchError",
    "CorruptFileError",
    "Dataset",
    "list_datasets",
    "load_dataset",
    "resolve_data_dir",
]
