"""IMDB movie-review sentiment (Maas et al. 2011) in the Keras ``imdb.npz`` format.

File: ``<data_dir>/imdb/imdb.npz`` with object arrays ``x_train, y_train,
x_test, y_test`` (25 000 / 25 000, the official split): each review is a list
of word ranks (1 = most frequent word), labels are 0 (negative) / 1
(positive). If missing it is downloaded from the Keras dataset bucket and
checked against the SHA-256 that Keras pins.

Preprocessing reproduces ``keras.datasets.imdb.load_data`` followed by
``keras.preprocessing.sequence.pad_sequences``:

1. shuffle train, then test, with ``np.random.RandomState(113)`` (Keras's
   default seed; the raw file is sorted by label);
2. every word rank ``w`` becomes ``w + 3`` (``index_from = 3``) and each
   review is prefixed with the start token 1; ids ``>= num_words`` (default
   20 000, the vocabulary of the Keras CNN-LSTM example) become the
   out-of-vocabulary token 2; 0 is the padding token;
3. each review is truncated to its *last* ``maxlen`` tokens and left-padded
   with 0 to ``maxlen`` (Keras ``'pre'`` padding/truncation).

``maxlen`` defaults to 400 words (the value the harness chose; the Keras
``imdb_cnn_lstm`` example that the paper's RCNN mirrors uses 100, pass
``maxlen=100`` for that). Inputs are ``int32`` token ids, ``task = "binary"``.

Integrity: ``imdb.npz`` holds pickled object arrays. It is read only after
its SHA-256 matches the pin (whether downloaded or found in the cache), and
then with :func:`experiments.data.safe_pickle.load_npz_with_objects`, which
builds only arrays and lists of numbers. Its reviews are then stored as plain
integer arrays in ``<data_dir>/imdb/imdb_tokens.npz`` (see
:mod:`experiments.data.token_store`), which later loads read with
``allow_pickle=False`` (``imdb.npz`` is then no longer needed). A store that
fails its checks is rebuilt from ``imdb.npz``, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset
from experiments.data.download import RemoteFile, ensure_files, resolve_data_dir
from experiments.data.integrity import CorruptFileError, reading_file
from experiments.data.safe_pickle import load_npz_with_objects
from experiments.data.token_store import SPLITS, read_token_store, write_token_store

IMDB_FILE = RemoteFile(
    "imdb.npz",
    ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/imdb.npz",),
    sha256="69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f",
)
DEFAULT_MAXLEN = 400
DEFAULT_NUM_WORDS = 20_000
PAD_TOKEN, START_TOKEN, OOV_TOKEN, INDEX_FROM = 0, 1, 2, 3
KERAS_SHUFFLE_SEED = 113
TOKEN_STORE = "imdb_tokens.npz"


def encode_reviews(reviews, *, num_words: int, maxlen: int) -> np.ndarray:
    """Keras-style token ids, left-padded/truncated to ``(len(reviews), maxlen)`` int32."""
    out = np.full((len(reviews), maxlen), PAD_TOKEN, dtype=np.int32)
    for row, review in enumerate(reviews):
        ids = np.concatenate(([START_TOKEN], np.asarray(review, dtype=np.int64) + INDEX_FROM))
        ids[ids >= num_words] = OOV_TOKEN
        kept = ids[-maxlen:]
        out[row, maxlen - len(kept) :] = kept
    return out


def _read_keras_file(directory: Path, download: bool) -> tuple[dict, Path]:
    """Reviews and labels of the verified ``imdb.npz``; also saved as a token store."""
    (path,) = ensure_files(directory, [IMDB_FILE], dataset="imdb", download=download)
    keys = tuple(f"{axis}_{split}" for split in SPLITS for axis in ("x", "y"))
    with reading_file(path):  # also names the file if its token ids do not fit int32
        raw = load_npz_with_objects(path, keys)
        splits = {split: (list(raw[f"x_{split}"]), raw[f"y_{split}"]) for split in SPLITS}
        try:
            write_token_store(directory / TOKEN_STORE, splits, IMDB_FILE.sha256)
        except OSError as err:  # a read-only data folder: keep working from imdb.npz
            warnings.warn(
                f"could not write {directory / TOKEN_STORE}: {err}", RuntimeWarning, stacklevel=3
            )
    return splits, path


def read_reviews(directory: Path, download: bool) -> tuple[dict, Path]:
    """``({split: (reviews, labels)}, path read)``: the token store, else ``imdb.npz``."""
    store = directory / TOKEN_STORE
    if store.exists():
        try:
            return read_token_store(store, IMDB_FILE.sha256), store
        except CorruptFileError as err:
            warnings.warn(
                f"{err}; rebuilding it from {IMDB_FILE.filename}", RuntimeWarning, stacklevel=2
            )
            store.unlink()
    return _read_keras_file(directory, download)


def load_imdb(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    maxlen: int = DEFAULT_MAXLEN,
    num_words: int = DEFAULT_NUM_WORDS,
) -> Dataset:
    """IMDB as ``(N, maxlen)`` int32 token ids with binary labels."""
    if num_words <= OOV_TOKEN:
        raise ValueError(f"num_words must exceed {OOV_TOKEN}, got {num_words}")
    splits, path = read_reviews(resolve_data_dir(data_dir) / "imdb", download)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    rng = np.random.RandomState(KERAS_SHUFFLE_SEED)
    train_order = np.arange(len(x_train))
    rng.shuffle(train_order)
    test_order = np.arange(len(x_test))
    rng.shuffle(test_order)
    return Dataset(
        x_train=encode_reviews(
            [x_train[i] for i in train_order], num_words=num_words, maxlen=maxlen
        ),
        y_train=np.asarray(y_train, dtype=np.int32)[train_order],
        x_test=encode_reviews([x_test[i] for i in test_order], num_words=num_words, maxlen=maxlen),
        y_test=np.asarray(y_test, dtype=np.int32)[test_order],
        num_classes=2,
        name="imdb",
        task="binary",
        description=(
            f"IMDB reviews (Keras imdb.npz), official 25k/25k split, Keras encoding "
            f"(start=1, oov=2, index_from=3, vocab {num_words}), left-padded/truncated "
            f"to the last {maxlen} tokens."
        ),
        metadata={"maxlen": maxlen, "num_words": num_words, "path": str(path)},
    )
