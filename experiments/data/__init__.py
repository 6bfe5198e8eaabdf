"""Datasets for the experiments: ``load_dataset(name, ...) -> Dataset``.

See :mod:`experiments.data.registry` for the list of names and
:mod:`experiments.data.preprocessing` for the standardization conventions.
"""
from experiments.data.dataset import Dataset
from experiments.data.download import ChecksumMismatchError, resolve_data_dir
from experiments.data.registry import list_datasets, load_dataset

__all__ = [
    "ChecksumMismatchError",
    "Dataset",
    "list_datasets",
    "load_dataset",
    "resolve_data_dir",
]
