"""Tests for adambs_jax.grain_source: ArrayRecord shards written and read back through grain."""

import json

import numpy as np
import pytest

pytest.importorskip("grain")  # a guard only: CI installs the [data] extra

import adambs_jax as ab
from adambs_jax.host import _grain_source as grain_source
from adambs_jax.host._grain_source import ArrayRecordSource, shard_paths, write_array_record
from adambs_jax.host._sources import ArraySource, check_source
from tests.helpers import read_from_threads, run_api_doc_example


def _arrays(n=37, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, size=(n, 4, 3), dtype=np.uint8),
        "x": rng.normal(size=(n, 5)).astype(np.float32),
        "x64": rng.normal(size=n),
        "label": rng.integers(-5, 5, size=n).astype(np.int64),
        "flag": rng.random(n) < 0.3,
        "big_endian": rng.normal(size=(n, 2)).astype(">f4"),
    }


def open_text(path):
    with open(path) as stream:
        return stream.read()


def _assert_same_batch(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("shards", [{}, {"num_shards": 3}, {"records_per_shard": 10}])
def test_round_trip_equals_the_array_source(tmp_path, shards):
    arrays = _arrays()
    paths = write_array_record(tmp_path / "data", arrays, **shards)
    source, reference = ArrayRecordSource(paths), ArraySource(arrays)
    assert source.num_examples == 37 == check_source(source)
    assert isinstance(source, ab.host.DataSource)
    rng = np.random.default_rng(1)
    for size in (1, 16, 100):  # K = 100 > n: duplicates
        indices = rng.integers(0, 37, size=size)
        _assert_same_batch(source.read(indices), reference.read(indices))
    _assert_same_batch(source.read(np.arange(37)), arrays)
    _assert_same_batch(source.read(np.zeros(0, int)), reference.read(np.zeros(0, int)))


def test_shards_layouts_and_record_keys(tmp_path):
    paths = write_array_record(tmp_path / "data", _arrays(), records_per_shard=10)
    assert paths == shard_paths(tmp_path / "data", 4) and paths[0].endswith("-00000-of-00004")
    counts = [json.loads(open_text(path + ".layout.json"))["num_records"] for path in paths]
    assert counts == [10, 10, 10, 7]
    record_bytes = json.loads(open_text(paths[0] + ".layout.json"))["record_bytes"]
    assert record_bytes == 12 + 20 + 8 + 8 + 1 + 8  # packed, no padding
    # the grain dataset over the same source gives record j = example j, undecoded
    source = ArrayRecordSource(paths)
    expected = ArraySource(_arrays()).read(np.array([25]))
    _assert_same_batch(source.decode([source.dataset[25]]), expected)


def test_reads_concurrently_from_threads(tmp_path):
    arrays = _arrays(n=300)
    source = ArrayRecordSource(write_array_record(tmp_path / "d", arrays, num_shards=4))
    draws = [np.random.default_rng(seed).integers(0, 300, size=64) for seed in range(12)]
    results = read_from_threads(source, draws)
    for indices, got in zip(draws, results):
        _assert_same_batch(got, ArraySource(arrays).read(indices))


def test_bad_inputs_are_refused_by_name(tmp_path):
    arrays = {"x": np.zeros((4, 2), np.float32)}
    with pytest.raises(ValueError, match="records_per_shard and num_shards: give one"):
        write_array_record(tmp_path / "a", arrays, records_per_shard=2, num_shards=2)
    with pytest.raises(ValueError, match="num_shards=5 exceeds the number of examples n = 4"):
        write_array_record(tmp_path / "a", arrays, num_shards=5)
    with pytest.raises(ValueError, match="num_shards must be an int >= 1"):
        write_array_record(tmp_path / "a", arrays, num_shards=0)
    with pytest.raises(TypeError, match="arrays must be a dict"):
        write_array_record(tmp_path / "a", [np.zeros(3)])
    with pytest.raises(ValueError, match="arrays: every leaf must have the same leading axis"):
        write_array_record(tmp_path / "a", {"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(TypeError, match="field 'x' has dtype object"):
        write_array_record(tmp_path / "a", {"x": np.array([None, 1], dtype=object)})
    with pytest.raises(ValueError, match="paths: one or more"):
        ArrayRecordSource([])
    with pytest.raises(FileNotFoundError, match="has no missing.layout.json"):
        ArrayRecordSource(tmp_path / "missing")
    first = write_array_record(tmp_path / "one", arrays)
    second = write_array_record(tmp_path / "two", {"y": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match="paths: .* has fields"):
        ArrayRecordSource(first + second)
    source = ArrayRecordSource(first)
    with pytest.raises(ValueError, match=r"indices: every index must be in \[0, 4\)"):
        source.read(np.array([4]))
    with pytest.raises(ValueError, match="records: every record must have 8 bytes"):
        source.decode([b"123"])


def test_a_missing_extra_names_the_pip_install(monkeypatch):
    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(grain_source.importlib, "import_module", no_module)
    with pytest.raises(ImportError, match=r"needs grain: pip install adambs-jax\[data\]"):
        ArrayRecordSource("anything")
    with pytest.raises(ImportError, match=r"needs array_record: pip install adambs-jax\[data\]"):
        write_array_record("anything", {"x": np.zeros(2)})


def test_api_doc_array_record_example_runs():
    run_api_doc_example("# array_record example")
