"""Tests for experiments.data: every loader at tiny size, never touching the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import random
import tarfile
import urllib.error

import numpy as np
import pytest

from experiments.data import cifar, idx_images, imdb, list_datasets, load_dataset, resolve_data_dir
from experiments.data import download as download_module
from experiments.data.dataset import Dataset
from experiments.data.idx_images import parse_idx
from experiments.data.imdb import encode_reviews
from experiments.data.preprocessing import stratified_split

NETWORK_DISABLED = "network disabled in tests"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download attempt fails as if offline; records the URLs tried."""
    attempted = []

    def refuse(url, timeout):
        attempted.append(url)
        raise urllib.error.URLError(NETWORK_DISABLED)

    monkeypatch.setattr(download_module, "open_url", refuse)
    return attempted


def assert_train_standardized(x: np.ndarray, axes, atol=1e-4):
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    np.testing.assert_allclose(mean, 0.0, atol=atol)
    np.testing.assert_allclose(std, 1.0, atol=atol)


# ----------------------------------------------------------------- file writers
def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array in the IDX format (big-endian header)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def write_tiny_idx_dataset(directory, num_train=30, num_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(num_test)[::-1] % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / (stem + (".gz" if compress else "")), array, compress)
    return arrays


def cifar_batch(images_hwc: np.ndarray, labels: np.ndarray, label_key: bytes) -> dict:
    """A pickle dict in the official layout: rows of 1024 R, 1024 G, 1024 B values."""
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)
    batch = {b"data": data, label_key: [int(v) for v in labels], b"batch_label": b"tiny"}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) % 20 for v in labels]
    return batch


def tiny_cifar_members(
    name: str, rng
) -> tuple[dict[str, dict], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    num_classes, label_key = (10, b"labels") if name == "cifar10" else (100, b"fine_labels")
    train_members = [f"data_batch_{k}" for k in range(1, 6)] if name == "cifar10" else ["train"]
    test_member = "test_batch" if name == "cifar10" else "test"
    members, train_x, train_y = {}, [], []
    for k, member in enumerate(train_members):
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = (np.arange(3) + 3 * k) % num_classes
        members[member] = cifar_batch(images, labels, label_key)
        train_x.append(images)
        train_y.append(labels)
    test_images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    test_labels = np.array([num_classes - 1, 0, 1, 2])
    members[test_member] = cifar_batch(test_images, test_labels, label_key)
    return members, np.concatenate(train_x), np.concatenate(train_y), test_images, test_labels


def write_cifar_tarball(path, folder: str, members: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for member, batch in members.items():
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


def write_cifar_folder(folder_path, members: dict[str, dict]) -> None:
    folder_path.mkdir(parents=True)
    for member, batch in members.items():
        (folder_path / member).write_bytes(pickle.dumps(batch, protocol=2))


def digest_of(path, algorithm="md5") -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def pin_checksums(monkeypatch, name: str, directory) -> None:
    """Pin the checksums of the tiny files in ``directory`` as the real ones are pinned.

    Loaders verify every file against the pinned table before reading it; the
    tests' tiny files get their own sums (monkeypatched, undone after the test).
    """
    if name == "imdb":
        digest = digest_of(directory / "imdb.npz", "sha256")
        monkeypatch.setattr(imdb, "IMDB_FILE", dataclasses.replace(imdb.IMDB_FILE, sha256=digest))
    elif name in cifar.CIFAR_LAYOUTS:
        layout = cifar.CIFAR_LAYOUTS[name]
        archive = directory / layout["archive"].filename
        if archive.exists():
            monkeypatch.setitem(
                layout, "archive", dataclasses.replace(layout["archive"], md5=digest_of(archive))
            )
        for member in (directory / layout["folder"]).glob("*"):
            monkeypatch.setitem(layout["member_md5"], member.name, digest_of(member))
    else:
        for path in directory.iterdir():
            table = idx_images._MD5 if path.suffix == ".gz" else idx_images._RAW_MD5
            monkeypatch.setitem(table[name], path.name, digest_of(path))


def object_array(sequences) -> np.ndarray:
    out = np.empty(len(sequences), dtype=object)
    out[:] = [list(s) for s in sequences]
    return out


# ----------------------------------------------------------------- registry
def test_registry_lists_every_dataset():
    assert set(list_datasets()) == {
        "iris",
        "wine",
        "digits",
        "digits-image",
        "mnist1d",
        "heavy-tailed",
        "friedman",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "imdb",
        "stdlib-bytes",
    }
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("no-such-dataset")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMBS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ADAMBS_DATA_DIR")
    assert resolve_data_dir().name == "adambs_jax"


def test_dataset_rejects_bad_task_and_lengths():
    x, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int32)
    with pytest.raises(ValueError):
        Dataset(x, y, x, y, 2, "t", "ranking", "")
    with pytest.raises(ValueError):
        Dataset(x, y[:2], x, y, 2, "t", "binary", "")


# ----------------------------------------------------------------- splits and sklearn sets
def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == 100
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 6, 4])
    again = stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], test)


@pytest.mark.parametrize(
    "name, num_train, num_test, width, num_classes",
    [("iris", 120, 30, 4, 3), ("wine", 142, 36, 13, 3), ("digits", 1438, 359, 64, 10)],
)
def test_tabular_sklearn_sets(name, num_train, num_test, width, num_classes):
    data = load_dataset(name)
    assert data.x_train.shape == (num_train, width) and data.x_test.shape == (num_test, width)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.num_classes == num_classes and data.task == "classification"
    assert set(np.unique(data.y_train)) == set(range(num_classes))
    varying = data.x_train.std(axis=0) > 0  # digits has constant blank pixels
    assert_train_standardized(data.x_train[:, varying], axes=0)
    np.testing.assert_allclose(data.x_train[:, ~varying], 0.0)
    assert data.description


def test_label_noise_flips_a_fifth_of_the_training_labels_only():
    clean, noisy = load_dataset("digits"), load_dataset("digits", label_noise=0.2)
    corrupted = noisy.metadata["corrupted"]
    assert corrupted.sum() == round(0.2 * clean.num_train)
    np.testing.assert_array_equal(noisy.metadata["clean_y_train"], clean.y_train)
    assert np.all(noisy.y_train[corrupted] != clean.y_train[corrupted])
    np.testing.assert_array_equal(noisy.y_train[~corrupted], clean.y_train[~corrupted])
    np.testing.assert_array_equal(noisy.y_test, clean.y_test)
    assert noisy.y_train.dtype == np.int32 and noisy.y_train.max() < 10
    with pytest.raises(ValueError, match="label_noise"):
        load_dataset("digits", label_noise=1.0)


def test_friedman_is_a_standardized_regression():
    data = load_dataset("friedman")
    assert data.task == "regression" and data.num_classes == 1
    assert data.x_train.shape == (2000, 10) and data.x_test.shape == (1000, 10)
    assert data.y_train.dtype == np.float32 and data.y_train.shape == (2000,)
    assert abs(float(data.y_train.mean())) < 1e-5 and float(data.y_train.std()) == pytest.approx(
        1, rel=1e-4
    )
    again = load_dataset("friedman", seed=0)
    np.testing.assert_array_equal(data.y_test, again.y_test)


def test_sklearn_split_is_seeded():
    first, again, other = (
        load_dataset("iris"),
        load_dataset("iris", seed=0),
        load_dataset("iris", seed=1),
    )
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.x_test, other.x_test)


def test_digits_image_layout_matches_flat_digits():
    images, flat = load_dataset("digits-image"), load_dataset("digits")
    assert images.x_train.shape == (1438, 8, 8, 1) and images.x_test.shape == (359, 8, 8, 1)
    np.testing.assert_array_equal(images.y_train, flat.y_train)
    assert_train_standardized(images.x_train, axes=(0, 1, 2))
    # Undo the channel standardization: pixels were scaled by 1/16 into [0, 1].
    mean, std = images.metadata["mean"], images.metadata["std"]
    raw = images.x_train * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    np.testing.assert_allclose(raw * 16, np.round(raw * 16), atol=1e-3)


def test_subset_keeps_first_training_examples():
    full, part = load_dataset("wine"), load_dataset("wine", subset=10)
    np.testing.assert_array_equal(part.x_train, full.x_train[:10])
    np.testing.assert_array_equal(part.y_train, full.y_train[:10])
    np.testing.assert_array_equal(part.x_test, full.x_test)
    with pytest.raises(ValueError):
        load_dataset("wine", subset=0)


# ----------------------------------------------------------------- mnist1d
def test_mnist1d_generates_caches_and_preserves_global_rng(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = load_dataset("mnist1d", data_dir=tmp_path, num_samples=100)
    assert np.random.rand() == expected_numpy and random.random() == expected_python

    assert data.x_train.shape == (80, 40) and data.x_test.shape == (20, 40)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.num_classes == 10 and set(np.unique(data.y_train)) <= set(range(10))
    np.testing.assert_allclose(data.x_train.mean(dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(dtype=np.float64), 1.0, atol=1e-5)
    cache_files = list((tmp_path / "mnist1d").glob("mnist1d_*.npz"))
    assert len(cache_files) == 1

    cached = load_dataset("mnist1d", data_dir=tmp_path, num_samples=100)
    np.testing.assert_array_equal(cached.x_train, data.x_train)
    other_seed = load_dataset("mnist1d", data_dir=tmp_path, num_samples=100, seed=7)
    assert not np.array_equal(other_seed.x_train, data.x_train)
    assert len(list((tmp_path / "mnist1d").glob("mnist1d_*.npz"))) == 2


# ----------------------------------------------------------------- mnist / fashion-mnist
def test_parse_idx_rejects_bad_files():
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="payload"):
        parse_idx(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + b"\x00")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_datasets_load_tiny_files(tmp_path, monkeypatch, name, compress, no_network):
    arrays = write_tiny_idx_dataset(tmp_path / name, compress=compress)
    pin_checksums(monkeypatch, name, tmp_path / name)
    data = load_dataset(name, data_dir=tmp_path)
    assert no_network == []  # present files: no download attempted
    assert data.x_train.shape == (30, 28, 28, 1) and data.x_test.shape == (10, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert_train_standardized(data.x_train, axes=(0, 1, 2))
    # Inverting the standardization recovers the raw pixels / 255.
    recovered = (data.x_test * data.metadata["std"] + data.metadata["mean"]) * 255
    np.testing.assert_allclose(recovered[..., 0], arrays["t10k-images-idx3-ubyte"], atol=1e-2)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_missing_files_raise_with_file_names(tmp_path, name, no_network):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    for filename in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert filename in message
    assert str(tmp_path / name) in message and NETWORK_DISABLED in message
    assert len(no_network) >= 4  # each file was tried (and refused)


def test_download_disabled_does_not_try_network(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="downloads disabled"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert no_network == []


# ----------------------------------------------------------------- cifar
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["tarball", "folder"])
def test_cifar_loads_tiny_pickles(tmp_path, monkeypatch, name, layout):
    rng = np.random.default_rng(0)
    members, train_x, train_y, test_x, test_y = tiny_cifar_members(name, rng)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    directory = tmp_path / name
    directory.mkdir()
    if layout == "tarball":
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        write_cifar_tarball(directory / archive, folder, members)
    else:
        write_cifar_folder(directory / folder, members)
    pin_checksums(monkeypatch, name, directory)

    data = load_dataset(name, data_dir=tmp_path)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert data.x_train.shape == (len(train_x), 32, 32, 3) and data.x_test.shape == (4, 32, 32, 3)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    np.testing.assert_array_equal(data.y_train, train_y)
    np.testing.assert_array_equal(data.y_test, test_y)
    assert_train_standardized(data.x_train, axes=(0, 1, 2))
    # Channel-major pickle rows were decoded into the right (H, W, C) pixels.
    recovered = (data.x_train * data.metadata["std"] + data.metadata["mean"]) * 255
    np.testing.assert_allclose(recovered, train_x, atol=1e-2)


@pytest.mark.parametrize(
    "name, archive",
    [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")],
)
def test_cifar_missing_files_raise(tmp_path, name, archive):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    assert archive in str(info.value) and str(tmp_path / name) in str(info.value)


# ----------------------------------------------------------------- imdb
def test_encode_reviews_reproduces_keras_conventions():
    reviews = [[1, 2, 3], [7, 8], [1, 1, 1, 1, 1]]
    encoded = encode_reviews(reviews, num_words=10, maxlen=4)
    # start token 1, ranks shifted by 3, ids >= 10 -> oov token 2, left padding,
    # truncation keeps the last tokens.
    np.testing.assert_array_equal(encoded, [[1, 4, 5, 6], [0, 1, 2, 2], [4, 4, 4, 4]])
    assert encoded.dtype == np.int32


def test_imdb_loads_tiny_npz(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    reviews = [list(rng.integers(1, 50, size=rng.integers(2, 12))) for _ in range(20)]
    # The label is recoverable from the review (first word's parity), so we can
    # check that shuffling kept reviews and labels together.
    labels = np.array([r[0] % 2 for r in reviews])
    directory = tmp_path / "imdb"
    directory.mkdir()
    np.savez(
        directory / "imdb.npz",
        x_train=object_array(reviews[:12]),
        y_train=labels[:12],
        x_test=object_array(reviews[12:]),
        y_test=labels[12:],
    )
    pin_checksums(monkeypatch, "imdb", directory)

    data = load_dataset("imdb", data_dir=tmp_path, maxlen=16, num_words=30)
    assert data.task == "binary" and data.num_classes == 2
    assert data.x_train.shape == (12, 16) and data.x_test.shape == (8, 16)
    assert data.x_train.dtype == np.int32 and data.y_train.dtype == np.int32
    assert data.x_train.min() >= 0 and data.x_train.max() < 30
    assert set(np.unique(data.y_train)) <= {0, 1}
    for tokens, label in zip(data.x_train, data.y_train):
        first_word_id = tokens[tokens != 0][1]  # after the start token
        if first_word_id != 2:  # not out of vocabulary
            assert (first_word_id - 3) % 2 == label
    assert sorted(map(tuple, data.x_test.tolist())) == sorted(
        map(tuple, encode_reviews(reviews[12:], num_words=30, maxlen=16).tolist())
    )


def test_imdb_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="imdb.npz"):
        load_dataset("imdb", data_dir=tmp_path)
