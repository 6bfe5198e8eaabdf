"""Tests for adambs_jax.sources: the data-source contract and the in-memory source."""

import json
import os

import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.host._sources import (
    MANIFEST_NAME,
    ArraySource,
    MemmapSource,
    check_read_indices,
    check_source,
    open_memmap_dataset,
    write_memmap_dataset,
)
from tests.helpers import read_from_threads, run_api_doc_example


def _arrays(n=6):
    return {"x": np.arange(2.0 * n).reshape(n, 2), "y": np.arange(n, dtype=np.int32)}


def test_read_returns_the_records_in_the_order_drawn_with_duplicates():
    source = ArraySource(_arrays())
    batch = source.read(np.array([5, 0, 5, 2]))
    np.testing.assert_array_equal(batch["y"], [5, 0, 5, 2])
    np.testing.assert_array_equal(batch["x"][0], [10.0, 11.0])
    assert check_source(source) == 6 and isinstance(source, ab.host.DataSource)


@pytest.mark.parametrize(
    "indices, error, match",
    [
        (np.array([0, 6]), ValueError, r"indices: every index must be in \[0, 6\)"),
        (np.array([-1]), ValueError, "every index must be in"),  # never data[-1]
        (np.array([[0]]), ValueError, "must be 1-D"),
        (np.array([0.0]), TypeError, "must be integers"),
    ],
)
def test_bad_indices_are_refused_by_name(indices, error, match):
    with pytest.raises(error, match=match):
        ArraySource(_arrays()).read(indices)
    with pytest.raises(error, match=match):
        check_read_indices(indices, 6)


def test_bad_data_is_refused_by_name():
    with pytest.raises(ValueError, match="arrays: the data is empty"):
        ArraySource({"x": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="arrays: the data is empty"):
        ArraySource({})
    with pytest.raises(ValueError, match="same leading axis"):
        ArraySource({"x": np.zeros((3, 2)), "y": np.zeros(4)})
    with pytest.raises(TypeError, match="source must be a data source"):
        check_source(np.zeros(3))


# ---- MemmapSource, write_memmap_dataset, open_memmap_dataset ----


def _mixed_arrays(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 3, 2)).astype(np.float32),
        "y": rng.integers(0, 10, size=n).astype(np.int64),
        "mask": rng.random(n) < 0.5,
        "h": rng.normal(size=(n, 4)).astype(np.float16),
    }


def _assert_same_batch(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and isinstance(got[name], np.ndarray)
        np.testing.assert_array_equal(got[name], expected[name])


def test_memmap_source_equals_array_source_on_random_indices_with_duplicates(tmp_path):
    arrays = _mixed_arrays()
    write_memmap_dataset(tmp_path, arrays, chunk_size=7)  # 50 = 7 * 7 + 1: a ragged last chunk
    source, reference = open_memmap_dataset(tmp_path), ArraySource(arrays)
    rng = np.random.default_rng(1)
    for size in (1, 16, 200):
        indices = rng.integers(0, 50, size=size)
        assert size < 50 or len(np.unique(indices)) < size  # duplicates at K = 200
        _assert_same_batch(source.read(indices), reference.read(indices))
    assert source.num_examples == 50 and check_source(source) == 50
    _assert_same_batch(source.read(np.zeros(0, int)), reference.read(np.zeros(0, int)))


def test_memmap_source_over_a_dict_of_npy_paths(tmp_path):
    arrays = _mixed_arrays(n=20)
    paths = {}
    for name, array in arrays.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    source = MemmapSource(paths)
    assert all(isinstance(a, np.memmap) for a in source.arrays.values()) and source.manifest is None
    indices = np.array([19, 3, 3, 0, 19])
    _assert_same_batch(source.read(indices), ArraySource(arrays).read(indices))


def test_memmap_source_reads_concurrently_from_threads(tmp_path):
    arrays = _mixed_arrays(n=400)
    write_memmap_dataset(tmp_path, arrays)
    source, reference = MemmapSource(tmp_path), ArraySource(arrays)
    draws = [np.random.default_rng(seed).integers(0, 400, size=64) for seed in range(16)]
    results = read_from_threads(source, draws)
    for indices, got in zip(draws, results):
        _assert_same_batch(got, reference.read(indices))


def test_manifest_round_trip_and_chunked_writing(tmp_path):
    arrays = _mixed_arrays(n=30)
    chunks = ({k: v[s : s + 8] for k, v in arrays.items()} for s in range(0, 30, 8))
    manifest = write_memmap_dataset(tmp_path, chunks, num_examples=30)
    with open(tmp_path / MANIFEST_NAME) as stream:
        assert json.load(stream) == manifest
    assert manifest["num_examples"] == 30
    for name, array in arrays.items():
        spec = manifest["fields"][name]
        assert spec["shape"] == list(array.shape) and np.dtype(spec["dtype"]) == array.dtype
        assert len(spec["sha256"]) == 64
    source = open_memmap_dataset(tmp_path, verify=True)
    assert source.manifest == manifest
    _assert_same_batch(source.read(np.arange(30)), arrays)


def test_a_corrupted_file_is_refused_when_verified(tmp_path):
    write_memmap_dataset(tmp_path, _mixed_arrays(n=30))
    with open(tmp_path / "x.npy", "r+b") as stream:  # flip one byte of the data, not the header
        stream.seek(-5, os.SEEK_END)
        byte = stream.read(1)
        stream.seek(-5, os.SEEK_END)
        stream.write(bytes([byte[0] ^ 0xFF]))
    open_memmap_dataset(tmp_path)  # without verify only the shapes and dtypes are checked
    with pytest.raises(ValueError, match=r"field 'x': the sha256 of x.npy does not match"):
        open_memmap_dataset(tmp_path, verify=True)
    np.save(tmp_path / "y.npy", np.zeros(29, np.int64))  # another shape than the manifest's
    with pytest.raises(ValueError, match=r"field 'y': y.npy has shape \(29,\)"):
        open_memmap_dataset(tmp_path)


def test_bad_memmap_inputs_are_refused_by_name(tmp_path):
    arrays = {"x": np.zeros((4, 2))}
    with pytest.raises(FileNotFoundError, match="directory: .* holds no manifest.json"):
        open_memmap_dataset(tmp_path)
    write_memmap_dataset(tmp_path, arrays)
    with pytest.raises(FileExistsError, match="directory: .* already holds a dataset"):
        write_memmap_dataset(tmp_path, arrays)
    write_memmap_dataset(tmp_path, {"x": np.ones((3, 2))}, overwrite=True)
    assert open_memmap_dataset(tmp_path).num_examples == 3
    out = tmp_path / "other"
    with pytest.raises(ValueError, match="num_examples: required"):
        write_memmap_dataset(out, iter([arrays]))
    with pytest.raises(ValueError, match="num_examples=5, but the arrays have n = 4"):
        write_memmap_dataset(out, arrays, num_examples=5)
    with pytest.raises(ValueError, match="num_examples=5, but the chunks hold 4 examples"):
        write_memmap_dataset(out, iter([arrays]), num_examples=5)
    with pytest.raises(ValueError, match="num_examples=3, but the chunks hold more"):
        write_memmap_dataset(out, iter([arrays]), num_examples=3)
    with pytest.raises(ValueError, match="chunk 1, field 'x': shape \\(3,\\)"):
        write_memmap_dataset(out, iter([arrays, {"x": np.zeros((4, 3))}]), num_examples=8)
    with pytest.raises(ValueError, match="chunk 1 has fields"):
        write_memmap_dataset(
            out, iter([arrays, {"x": np.zeros((4, 2)), "z": np.zeros(4)}]), num_examples=8
        )
    with pytest.raises(ValueError, match="field names must be"):
        write_memmap_dataset(out, {"../x": np.zeros(3)})
    with pytest.raises(TypeError, match="object dtype"):
        write_memmap_dataset(out, {"x": np.array([None, 1], dtype=object)})
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        write_memmap_dataset(out, arrays, chunk_size=0)
    with pytest.raises(TypeError, match="files must be a dict"):
        MemmapSource(3)
    with pytest.raises(ValueError, match=r"files\['x'\]: cannot open"):
        MemmapSource({"x": tmp_path / "missing.npy"})
    with pytest.raises(ValueError, match="files: every leaf must have the same leading axis"):
        MemmapSource({"x": np.zeros((3, 1)), "y": np.zeros(4)})
    with pytest.raises(ValueError, match=r"indices: every index must be in \[0, 3\)"):
        open_memmap_dataset(tmp_path).read(np.array([3]))


def test_api_doc_memmap_example_runs():
    run_api_doc_example("# memmap dataset example")


# ---- overwriting, foreign manifests, truncated manifests ----


def _fill(value, n=40, z=False):
    arrays = {"x": np.full((n, 3), value, np.float32), "y": np.full(n, value, np.int64)}
    if z:
        arrays["z"] = np.full(n, value, np.int16)
    return arrays


def test_overwriting_leaves_an_open_reader_its_old_data(tmp_path):
    write_memmap_dataset(tmp_path, _fill(1, z=True))
    reader = open_memmap_dataset(tmp_path)  # another process training on the old dataset
    write_memmap_dataset(tmp_path, _fill(2), overwrite=True)  # same shapes: same file sizes
    old = reader.read(np.arange(40))
    assert (old["x"] == 1).all() and (old["y"] == 1).all() and (old["z"] == 1).all()
    new = open_memmap_dataset(tmp_path, verify=True).read(np.arange(40))
    assert (new["x"] == 2).all() and set(new) == {"x", "y"}
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "x.npy", "y.npy"]  # z.npy: gone


def test_a_failed_overwrite_leaves_the_old_dataset_intact(tmp_path):
    write_memmap_dataset(tmp_path, _fill(1))
    before = sorted(os.listdir(tmp_path))

    def chunks():
        yield _fill(2, n=20)
        raise OSError("the producer died")  # or a full disk, or Ctrl-C

    with pytest.raises(OSError, match="the producer died"):
        write_memmap_dataset(tmp_path, chunks(), num_examples=40, overwrite=True)
    with pytest.raises(ValueError, match="chunk 1, field 'x'"):
        write_memmap_dataset(
            tmp_path,
            iter([_fill(2, n=20), {"x": np.zeros((20, 4)), "y": np.zeros(20)}]),
            num_examples=40,
            overwrite=True,
        )
    assert sorted(os.listdir(tmp_path)) == before  # no staging directory left either
    old = open_memmap_dataset(tmp_path, verify=True).read(np.arange(40))
    assert (old["x"] == 1).all() and (old["y"] == 1).all()
    with pytest.raises(ValueError, match="num_examples=3"):
        write_memmap_dataset(tmp_path / "new", _fill(1), num_examples=3)
    assert not (tmp_path / "new").exists()  # a failed first write leaves no directory


@pytest.mark.parametrize("file", ["../outside.npy", "sub/../../outside.npy", "/abs/x.npy", ".", ""])
def test_a_manifest_entry_outside_the_directory_is_refused(tmp_path, file):
    directory = tmp_path / "data"
    write_memmap_dataset(directory, _fill(1))
    np.save(tmp_path / "outside.npy", np.zeros((40, 3), np.float32))
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["fields"]["x"]["file"] = file
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"field 'x': the manifest's file entry {file!r} is not"):
        open_memmap_dataset(directory)
    write_memmap_dataset(directory, _fill(2), overwrite=True)  # deletes nothing outside
    assert (tmp_path / "outside.npy").exists()


def test_a_truncated_or_malformed_manifest_is_named(tmp_path):
    write_memmap_dataset(tmp_path, _fill(1))
    path = tmp_path / MANIFEST_NAME
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME}' is not valid JSON, the file is trunc"):
        open_memmap_dataset(tmp_path)
    manifest = json.loads(text)
    del manifest["fields"]["y"]["dtype"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json', field 'y' lacks \['dtype'\]"):
        open_memmap_dataset(tmp_path)
