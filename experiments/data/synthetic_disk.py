"""A synthetic on-disk dataset for the host data path: n examples in numpy memmaps.

    python -m experiments.data.synthetic_disk --dir /tmp/adambs_disk --num-examples 10000000

writes, through ``ab.host.write_memmap_dataset``, ``x.npy`` (n, 32) float32, ``y.npy``
(n,) int32 and its ``manifest.json`` (shapes, dtypes, the SHA-256 of each file), plus
``synthetic.json``, the parameters the files were generated from (n, task, split, seed,
chunk size). The data are written in chunks of ``chunk_size`` examples (memory O(chunk), a
progress bar), each chunk from its own seeded generator, so the files depend only on
(n, task, split, seed, chunk_size). Every open verifies the files against the manifest's
checksums (``open_memmap_dataset(verify=True)``) before they are read.

Tasks (x ~ N(0, I_32) in both; the teacher's weights depend on ``seed`` only, so the
``"train"`` and ``"test"`` splits of one seed are the same task, drawn independently):

    linear   y = argmax(x W + 0.5 eps), W (32, 10) ~ N(0, 1): linearly separable-ish
    teacher  a random teacher MLP: h = tanh(x W1 / sqrt(32)) (64 units),
             y = argmax(10 h W2 / sqrt(64) + eps), W1, W2 ~ N(0, 1); eps ~ N(0, I_10) is
             label noise: about 14% of the labels differ from the noiseless teacher's
             (seed 0), so even the teacher errs on them

n = 10^7 takes 1.28 GB for x and 40 MB for y.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from tqdm import tqdm

import adambs_jax as ab

NUM_FEATURES = 32
NUM_CLASSES = 10
LABEL_NOISE = 0.5
TEACHER_HIDDEN = 64
TEACHER_SCALE = 10.0
TASKS = ("linear", "teacher")
SPLITS = ("train", "test")
DEFAULT_CHUNK = 1 << 18
PARAMS_FILE = "synthetic.json"


def _teacher(task: str, seed: int):
    """The labelling function of ``task`` (weights fixed by ``seed``): x (m, 32) -> y (m,)."""
    rng = np.random.default_rng(seed)
    if task == "linear":
        weights = rng.standard_normal((NUM_FEATURES, NUM_CLASSES), dtype=np.float32)
        return lambda x, noise: np.argmax(x @ weights + LABEL_NOISE * noise, axis=1)
    first = rng.standard_normal((NUM_FEATURES, TEACHER_HIDDEN), dtype=np.float32)
    second = rng.standard_normal((TEACHER_HIDDEN, NUM_CLASSES), dtype=np.float32)

    def label(x, noise):
        hidden = np.tanh(x @ first / np.sqrt(NUM_FEATURES))
        return np.argmax(TEACHER_SCALE * hidden @ second / np.sqrt(TEACHER_HIDDEN) + noise, 1)

    return label


def _chunks(num_examples: int, task: str, split: str, seed: int, chunk_size: int, progress: bool):
    """The dataset's chunks ``{"x", "y"}`` in order, each from its own generator."""
    label = _teacher(task, seed)
    starts = range(0, num_examples, chunk_size)
    for index, start in enumerate(tqdm(starts, desc="writing", unit="chunk", disable=not progress)):
        # the train split of the linear task keeps its original streams [seed, index]
        stream = [seed, index] if split == "train" else [seed, SPLITS.index(split), index]
        rng = np.random.default_rng(stream)
        size = min(chunk_size, num_examples - start)
        x = rng.standard_normal((size, NUM_FEATURES), dtype=np.float32)
        noise = rng.standard_normal((size, NUM_CLASSES), dtype=np.float32)
        yield {"x": x, "y": label(x, noise).astype(np.int32)}


def _params(num_examples: int, task: str, split: str, seed: int, chunk_size: int) -> dict:
    return {
        "num_examples": num_examples,
        "num_features": NUM_FEATURES,
        "num_classes": NUM_CLASSES,
        "task": task,
        "split": split,
        "seed": seed,
        "chunk_size": chunk_size,
    }


def write_synthetic(
    directory,
    num_examples: int,
    *,
    task: str = "linear",
    split: str = "train",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> pathlib.Path:
    """Writes the dataset (files, manifest, parameters) into ``directory``; returns it."""
    if num_examples < 1 or chunk_size < 1:
        raise ValueError(
            f"num_examples and chunk_size must be >= 1, got {num_examples}, {chunk_size}"
        )
    if task not in TASKS or split not in SPLITS:
        raise ValueError(
            f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}"
        )
    directory = pathlib.Path(directory)
    params = directory / PARAMS_FILE
    if params.exists():
        params.unlink()  # an interrupted rewrite must not look like a finished one
    ab.host.write_memmap_dataset(
        directory,
        _chunks(num_examples, task, split, seed, chunk_size, progress),
        num_examples=num_examples,
        overwrite=True,
    )
    params.write_text(json.dumps(_params(num_examples, task, split, seed, chunk_size), indent=2))
    return directory


def verify(directory) -> dict:
    """The dataset's parameters, after checking both files against the manifest's SHA-256.

    Raises:
      FileNotFoundError: no parameters or manifest file; ValueError: a file does not match.
    """
    directory = pathlib.Path(directory)
    params = json.loads((directory / PARAMS_FILE).read_text())
    ab.host.open_memmap_dataset(directory, verify=True)
    return params


def open_synthetic(
    directory,
    num_examples: int,
    *,
    task: str = "linear",
    split: str = "train",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> ab.host.MemmapSource:
    """The dataset as a verified ``ab.host.MemmapSource``, written first unless
    ``directory`` already holds these (n, task, split, seed, chunk size)."""
    directory = pathlib.Path(directory)
    wanted = _params(num_examples, task, split, seed, chunk_size)
    path = directory / PARAMS_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    if current != wanted or not (directory / ab.host.MANIFEST_NAME).exists():
        write_synthetic(
            directory,
            num_examples,
            task=task,
            split=split,
            seed=seed,
            chunk_size=chunk_size,
            progress=progress,
        )
    return ab.host.open_memmap_dataset(directory, verify=True)


def whole_groups(source: ab.host.MemmapSource, group_size: int) -> ab.host.MemmapSource:
    """The first m floor(n / m) examples of ``source`` (m = ``group_size``): what a groups
    sampler can draw from, since it needs n divisible by m. Slicing a memmap reads the same
    files, so nothing is copied."""
    size = group_size * (source.num_examples // group_size)
    if size == source.num_examples:
        return source
    return ab.host.MemmapSource({name: array[:size] for name, array in source.arrays.items()})


def load_synthetic(directory, num_examples: int, **kwargs) -> dict:
    """``{"x": memmap (n, 32), "y": memmap (n,)}`` of ``open_synthetic`` (same arguments)."""
    return open_synthetic(directory, num_examples, **kwargs).arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--task", choices=TASKS, default="linear")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    args = parser.parse_args(argv)
    open_synthetic(
        args.dir,
        args.num_examples,
        task=args.task,
        split=args.split,
        seed=args.seed,
        chunk_size=args.chunk_size,
    )
    print(f"{args.dir}: verified {args.num_examples} examples")


if __name__ == "__main__":
    main()
