"""Tests for experiments.data.integrity, download and safe_pickle, and the caches.

Cached data files are verified before they are read, and read without code.

Regression tests: a crafted pickle in the cache must not run code, a cached
file that differs from its pinned checksum or is truncated must be refused
with an error naming it, and a damaged MNIST-1D cache must be regenerated.
Every file is written here, tiny; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import urllib.error

import numpy as np
import pytest

from experiments.data import (
    ChecksumMismatchError,
    CorruptFileError,
    imdb,
    load_dataset,
    mnist1d_data,
)
from experiments.data import download as download_module
from experiments.data.safe_pickle import load_data_pickle
from experiments.data.token_store import pack_sequences, unpack_sequences
from tests.experiments.test_data import (  # noqa: F401  (no_network: autouse fixture, active here too)
    no_network,
    object_array,
    pin_checksums,
    tiny_cifar_members,
    write_cifar_folder,
    write_cifar_tarball,
    write_tiny_idx_dataset,
)

CIFAR_ARCHIVE, CIFAR_FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: code run by a crafted pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_cifar10(directory, layout="tarball", payload=None):
    """Tiny CIFAR-10 files; ``payload`` is hidden in the test batch if given."""
    members = tiny_cifar_members("cifar10", np.random.default_rng(0))[0]
    if payload is not None:
        members["test_batch"][b"batch_label"] = payload
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "tarball":
        write_cifar_tarball(directory / CIFAR_ARCHIVE, CIFAR_FOLDER, members)
        return directory / CIFAR_ARCHIVE
    write_cifar_folder(directory / CIFAR_FOLDER, members)
    return directory / CIFAR_FOLDER / "test_batch"


def write_imdb(directory, payload=None):
    """A tiny ``imdb.npz`` in the Keras layout; ``payload`` is hidden in a review if given."""
    reviews = [[5, 6, 7], [8, 9], [4, 4, 4, 4], [10]]
    x_train = object_array(reviews[:2])
    if payload is not None:
        x_train[1] = payload
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / "imdb.npz",
        x_train=x_train,
        y_train=np.array([0, 1]),
        x_test=object_array(reviews[2:]),
        y_test=np.array([1, 0]),
    )
    return directory / "imdb.npz"


def write_files(name, directory, **options):
    """The tiny files of ``name``; returns the one a test damages."""
    if name == "cifar10":
        return write_cifar10(directory, **options)
    if name == "imdb":
        return write_imdb(directory, **options)
    write_tiny_idx_dataset(directory, **options)
    return directory / (
        "train-images-idx3-ubyte" + (".gz" if options.get("compress", True) else "")
    )


# ----------------------------------------------------------------- crafted pickles
@pytest.mark.parametrize("layout", ["tarball", "folder"])
def test_crafted_cifar_pickle_matching_its_pin_does_not_run_code(tmp_path, monkeypatch, layout):
    marker = tmp_path / "marker"
    path = write_cifar10(tmp_path / "cifar10", layout, payload=CreatesMarker(marker))
    pin_checksums(monkeypatch, "cifar10", tmp_path / "cifar10")  # matches "by mistake"
    with pytest.raises(CorruptFileError, match="refusing to load io.open") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(path) in str(info.value) and "delete it" in str(info.value)
    assert not marker.exists()


def test_crafted_imdb_pickle_matching_its_pin_does_not_run_code(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path = write_imdb(tmp_path / "imdb", payload=CreatesMarker(marker))
    pin_checksums(monkeypatch, "imdb", tmp_path / "imdb")
    with pytest.raises(CorruptFileError, match="refusing to load io.open") as info:
        load_dataset("imdb", data_dir=tmp_path)
    assert str(path) in str(info.value)
    assert not marker.exists() and not (tmp_path / "imdb" / imdb.TOKEN_STORE).exists()


@pytest.mark.parametrize("name", ["cifar10", "imdb"])
def test_crafted_pickle_is_refused_by_the_real_pin_before_it_is_read(tmp_path, name):
    marker = tmp_path / "marker"
    path = write_files(name, tmp_path / name, payload=CreatesMarker(marker))
    with pytest.raises(ChecksumMismatchError, match="delete it") as info:
        load_dataset(name, data_dir=tmp_path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_data_unpickler_builds_data_and_refuses_any_other_global(tmp_path):
    batch = {
        b"data": np.arange(6, dtype=np.uint8).reshape(2, 3),
        b"labels": [1, 2],
        b"name": b"tiny",
        "scalar": np.float32(2.5),
        "ragged": object_array([[1], [2, 3]]),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = load_data_pickle(io.BytesIO(pickle.dumps(batch, protocol)), source="p")
        np.testing.assert_array_equal(loaded[b"data"], batch[b"data"])
        assert loaded[b"labels"] == [1, 2] and loaded[b"name"] == b"tiny"
        assert loaded["scalar"] == 2.5 and loaded["ragged"][1] == [2, 3]
    crafted = pickle.dumps(CreatesMarker(tmp_path / "marker"))
    with pytest.raises(pickle.UnpicklingError, match="crafted.pkl: refusing to load io.open"):
        load_data_pickle(io.BytesIO(crafted), source="crafted.pkl")
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------- checksums and truncation
@pytest.mark.parametrize(
    "name, options",
    [
        ("mnist", {"compress": True}),
        ("mnist", {"compress": False}),
        ("cifar10", {"layout": "tarball"}),
        ("cifar10", {"layout": "folder"}),
        ("imdb", {}),
    ],
)
def test_cached_file_with_wrong_checksum_is_refused_naming_it(
    tmp_path,
    name,
    options,
    no_network,  # noqa: F811 (the imported autouse fixture, requested for the URLs it records)
):
    write_files(name, tmp_path / name, **options)  # well-formed, but not the official files
    with pytest.raises(ChecksumMismatchError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / name) in message and "expected" in message and "delete it" in message
    assert no_network == []  # refused, not silently replaced


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imdb"])
def test_truncated_cached_file_is_refused_naming_it(tmp_path, monkeypatch, name):
    path = write_files(name, tmp_path / name)
    pin_checksums(monkeypatch, name, tmp_path / name)  # the pin of the complete file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ChecksumMismatchError, match="truncated") as info:
        load_dataset(name, data_dir=tmp_path)
    assert str(path) in str(info.value) and "delete it" in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imdb"])
def test_undecodable_file_that_passes_its_checksum_is_named(tmp_path, monkeypatch, name):
    """The second line: a decoder's EOFError & co. become an error naming the file."""
    path = write_files(name, tmp_path / name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pin_checksums(monkeypatch, name, tmp_path / name)  # pinned as truncated, e.g. a wrong pin
    with pytest.raises(CorruptFileError, match="cannot be read") as info:
        load_dataset(name, data_dir=tmp_path)
    assert str(path) in str(info.value) and "delete it" in str(info.value)


def test_file_without_pinned_checksum_is_refused(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ChecksumMismatchError, match="no checksum is pinned"):
        download_module.verify_file(path, download_module.RemoteFile("blob.bin", ()))


# ----------------------------------------------------------------- imdb token store
def test_imdb_is_read_from_plain_integer_arrays_after_the_first_verified_load(
    tmp_path, monkeypatch
):
    directory = tmp_path / "imdb"
    write_imdb(directory)
    pin_checksums(monkeypatch, "imdb", directory)
    first = load_dataset("imdb", data_dir=tmp_path, maxlen=6, num_words=12)
    store = directory / imdb.TOKEN_STORE
    with np.load(store, allow_pickle=False) as stored:  # no object arrays in it
        assert stored["x_train_tokens"].dtype == np.int32
    (directory / "imdb.npz").unlink()  # no longer needed
    again = load_dataset("imdb", data_dir=tmp_path, maxlen=6, num_words=12)
    assert again.metadata["path"] == str(store)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, key), getattr(first, key))


@pytest.mark.parametrize("damage", ["garbage", "other_source", "edited_tokens"])
def test_damaged_imdb_token_store_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    directory = tmp_path / "imdb"
    write_imdb(directory)
    pin_checksums(monkeypatch, "imdb", directory)
    first = load_dataset("imdb", data_dir=tmp_path, maxlen=6, num_words=12)
    store = directory / imdb.TOKEN_STORE
    if damage == "garbage":
        store.write_bytes(b"not an npz file")
    else:
        with np.load(store) as stored:
            arrays = dict(stored)
        if damage == "other_source":
            arrays["source_sha256"] = np.array("0" * 64)
        else:
            arrays["x_train_tokens"] = arrays["x_train_tokens"] + 1
        np.savez(store, **arrays)
    with pytest.warns(RuntimeWarning, match=f"{imdb.TOKEN_STORE}.*rebuilding"):
        again = load_dataset("imdb", data_dir=tmp_path, maxlen=6, num_words=12)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    assert again.metadata["path"] == str(directory / "imdb.npz")
    assert load_dataset("imdb", data_dir=tmp_path).metadata["path"] == str(store)  # rebuilt


def test_pack_sequences_round_trip_and_range():
    tokens, offsets = pack_sequences([[3, 4], [], [5]])
    assert tokens.dtype == np.int32 and offsets.tolist() == [0, 2, 2, 3]
    assert [s.tolist() for s in unpack_sequences(tokens, offsets)] == [[3, 4], [], [5]]
    with pytest.raises(ValueError, match="token ids"):
        pack_sequences([[2**31]])


# ----------------------------------------------------------------- mnist1d cache
@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes", "missing_array"])
def test_corrupted_mnist1d_cache_is_regenerated_with_a_warning(tmp_path, damage):
    fresh = load_dataset("mnist1d", data_dir=tmp_path, num_samples=40)
    cache = next((tmp_path / "mnist1d").glob("mnist1d_*.npz"))
    good = mnist1d_data.generate_mnist1d(40, mnist1d_data.DEFAULT_GENERATOR_SEED)
    if damage == "garbage":
        cache.write_bytes(b"\x00" * 100)
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "wrong_shapes":
        np.savez(cache, **{**good, "x": good["x"][:, :7]})
    else:
        np.savez(cache, x=good["x"], y=good["y"], x_test=good["x_test"])
    with pytest.warns(RuntimeWarning, match=f"{cache.name}.*regenerating"):
        again = load_dataset("mnist1d", data_dir=tmp_path, num_samples=40)
    np.testing.assert_array_equal(again.x_train, fresh.x_train)
    np.testing.assert_array_equal(again.y_test, fresh.y_test)
    with np.load(cache) as rewritten:
        np.testing.assert_array_equal(rewritten["x"], good["x"])


# ----------------------------------------------------------------- downloads
class FakeResponse(io.BytesIO):
    pass


def test_checksum_mismatch_on_download_raises_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(
        download_module, "open_url", lambda url, timeout: FakeResponse(b"not the real imdb file")
    )
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        load_dataset("imdb", data_dir=tmp_path)
    assert list((tmp_path / "imdb").iterdir()) == []


def test_verified_download_is_written(tmp_path, monkeypatch):
    payload = b"tiny payload"
    remote = download_module.RemoteFile(
        "blob.bin",
        ("https://example.invalid/a", "https://example.invalid/b"),
        md5=hashlib.md5(payload).hexdigest(),
    )
    tried = []

    def flaky(url, timeout):
        tried.append(url)
        if url.endswith("/a"):
            raise urllib.error.URLError("first mirror down")
        return FakeResponse(payload)

    monkeypatch.setattr(download_module, "open_url", flaky)
    (path,) = download_module.ensure_files(tmp_path, [remote], dataset="blob")
    assert path.read_bytes() == payload and tried == [remote.urls[0], remote.urls[1]]
    # Present files are not fetched again.
    download_module.ensure_files(tmp_path, [remote], dataset="blob")
    assert len(tried) == 2


def test_verify_file_detects_mismatch(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    good = download_module.RemoteFile("f", (), md5="900150983cd24fb0d6963f7d28e17f72")
    download_module.verify_file(path, good)
    with pytest.raises(ChecksumMismatchError):
        download_module.verify_file(path, download_module.RemoteFile("f", (), md5="0" * 32))
