"""A synthetic on-disk dataset for the host data path: n examples in numpy memmaps.

    python -m experiments.data.synthetic_disk --dir /tmp/adambs_disk --num-examples 10000000

writes ``x.npy`` (n, 32) float32 and ``y.npy`` (n,) int32 (``.npy`` files opened with
``np.lib.format.open_memmap``, so ``np.load(path, mmap_mode="r")`` reads them lazily) and
``checksum.json`` (n, the shape, the seed, the SHA-256 of each file). The data are written in
chunks of ``chunk_size`` examples (memory O(chunk), a progress bar), each chunk from its own
seeded generator, so the files depend only on (n, seed, chunk_size).

The task is linearly separable-ish: x ~ N(0, I_32), y = argmax(x W + 0.5 eps) over 10
classes, with W (32, 10) ~ N(0, 1) fixed by the seed and eps ~ N(0, I_10) label noise.
n = 10^7 takes 1.28 GB for x and 40 MB for y.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import numpy as np
from tqdm import tqdm

NUM_FEATURES = 32
NUM_CLASSES = 10
LABEL_NOISE = 0.5
DEFAULT_CHUNK = 1 << 18
CHECKSUM_FILE = "checksum.json"


def _chunk(seed: int, index: int, size: int, weights: np.ndarray):
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal((size, NUM_FEATURES), dtype=np.float32)
    noise = LABEL_NOISE * rng.standard_normal((size, NUM_CLASSES), dtype=np.float32)
    return x, np.argmax(x @ weights + noise, axis=1).astype(np.int32)


def _sha256(path: pathlib.Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(block):
            digest.update(data)
    return digest.hexdigest()


def _meta(num_examples: int, seed: int, chunk_size: int) -> dict:
    return {"num_examples": num_examples, "num_features": NUM_FEATURES,
            "num_classes": NUM_CLASSES, "seed": seed, "chunk_size": chunk_size}


def write_synthetic(directory, num_examples: int, *, seed: int = 0,
                    chunk_size: int = DEFAULT_CHUNK, progress: bool = True) -> pathlib.Path:
    """Writes the dataset (and its checksum file) into ``directory``; returns it."""
    if num_examples < 1 or chunk_size < 1:
        raise ValueError(f"num_examples and chunk_size must be >= 1, got {num_examples}, "
                         f"{chunk_size}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = np.random.default_rng(seed).standard_normal((NUM_FEATURES, NUM_CLASSES),
                                                           dtype=np.float32)
    x = np.lib.format.open_memmap(directory / "x.npy", mode="w+", dtype=np.float32,
                                  shape=(num_examples, NUM_FEATURES))
    y = np.lib.format.open_memmap(directory / "y.npy", mode="w+", dtype=np.int32,
                                  shape=(num_examples,))
    starts = range(0, num_examples, chunk_size)
    for index, start in enumerate(tqdm(starts, desc="writing", unit="chunk", disable=not progress)):
        stop = min(start + chunk_size, num_examples)
        x[start:stop], y[start:stop] = _chunk(seed, index, stop - start, weights)
    x.flush()
    y.flush()
    del x, y
    meta = _meta(num_examples, seed, chunk_size)
    meta["sha256"] = {name: _sha256(directory / name) for name in ("x.npy", "y.npy")}
    (directory / CHECKSUM_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def verify(directory) -> dict:
    """The checksum file's record, after checking both files against it.

    Raises:
      FileNotFoundError: no checksum file; ValueError: a file does not match its checksum.
    """
    directory = pathlib.Path(directory)
    meta = json.loads((directory / CHECKSUM_FILE).read_text())
    for name, expected in meta["sha256"].items():
        actual = _sha256(directory / name)
        if actual != expected:
            raise ValueError(f"{directory / name}: SHA-256 {actual} != {expected} of "
                             f"{CHECKSUM_FILE}; delete the directory to regenerate")
    return meta


def load_synthetic(directory, num_examples: int, *, seed: int = 0,
                   chunk_size: int = DEFAULT_CHUNK, progress: bool = True) -> dict:
    """``{"x": memmap (n, 32), "y": memmap (n,)}``, written first unless ``directory``
    already holds this (n, seed, chunk size) with matching checksums."""
    directory = pathlib.Path(directory)
    checksum = directory / CHECKSUM_FILE
    wanted = _meta(num_examples, seed, chunk_size)
    current = json.loads(checksum.read_text()) if checksum.exists() else {}
    if {key: current.get(key) for key in wanted} != wanted:
        write_synthetic(directory, num_examples, seed=seed, chunk_size=chunk_size,
                        progress=progress)
    verify(directory)
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("x", "y")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    args = parser.parse_args(argv)
    load_synthetic(args.dir, args.num_examples, seed=args.seed, chunk_size=args.chunk_size)
    print(f"{args.dir}: verified {args.num_examples} examples")


if __name__ == "__main__":
    main()
