"""Tests for adambs_jax.grain_source: ArrayRecord shards written and read back through grain."""

import json
import os

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


# ---- checksums, shard order, truncated and missing shards ----


def _labelled(n=60):
    return {"x": np.arange(4.0 * n).reshape(n, 4), "label": np.arange(n, dtype=np.int64)}


def _edit_json(path, edit):
    with open(path) as stream:
        content = json.load(stream)
    edit(content)
    with open(path, "w") as stream:
        json.dump(content, stream)


def test_a_layout_changed_after_writing_is_refused(tmp_path):
    paths = write_array_record(tmp_path / "d", _labelled(), num_shards=3)

    def float_labels(layout):  # int64 -> float64: the same 8 bytes, garbage values
        layout["fields"][1]["dtype"] = "<f8"

    for path in paths:
        _edit_json(path + ".layout.json", float_labels)
    with pytest.raises(ValueError, match=r"layout .*d-00000-of-00003.layout.json' does not match"):
        ArrayRecordSource(paths)


def test_shards_out_of_order_missing_from_paths_or_of_another_write_are_refused(tmp_path):
    paths = write_array_record(tmp_path / "d", _labelled(), num_shards=3)
    with pytest.raises(ValueError, match=r"paths\[0\]: .*d-00001-of-00003' is shard 1 of 3"):
        ArrayRecordSource([paths[1], paths[0], paths[2]])
    with pytest.raises(ValueError, match=r"is shard 0 of 3 of its dataset, passed as shard 0 of 2"):
        ArrayRecordSource([paths[0], paths[2]])
    other = write_array_record(tmp_path / "e", _labelled(), num_shards=3)
    with pytest.raises(ValueError, match="d-00001-of-00003' was written by another"):
        ArrayRecordSource([other[0], paths[1], other[2]])
    assert ArrayRecordSource(paths, verify=True).num_examples == 60


def test_truncated_missing_and_changed_shards_are_named(tmp_path):
    paths = write_array_record(tmp_path / "d", _labelled(), num_shards=2)
    with open(paths[1], "rb") as stream:
        data = stream.read()
    with open(paths[1], "wb") as stream:
        stream.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard .*d-00001-of-00002' has \d+ bytes, its layout"):
        ArrayRecordSource(paths)
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match=r"the shard .*d-00001-of-00002' is missing"):
        ArrayRecordSource(paths)
    changed = bytearray(data)
    changed[-50] ^= 0xFF  # the same size, read without complaint by array_record
    with open(paths[1], "wb") as stream:
        stream.write(bytes(changed))
    ArrayRecordSource(paths)  # without verify: size and record counts only
    with pytest.raises(ValueError, match=r"sha256 of the shard .*d-00001-of-00002' does not"):
        ArrayRecordSource(paths, verify=True)


def test_read_errors_of_array_record_name_the_shard(tmp_path):
    paths = write_array_record(tmp_path / "d", _labelled(), num_shards=2)
    with open(paths[1], "rb") as stream:
        data = stream.read()
    source = ArrayRecordSource(paths)
    with open(paths[1], "wb") as stream:  # truncated after opening, before the first read
        stream.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"records \[30, 31.* of \[.*d-00001-of-00002'\] do not"):
        source.read(np.arange(60))
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF  # inside the records: opens, then array_record's own error
    with open(paths[1], "wb") as stream:
        stream.write(bytes(corrupt))
    source = ArrayRecordSource(paths)
    with pytest.raises(OSError, match=r"failed in the shards \['[^,]*d-00001-of-00002'\]: Runt"):
        source.read(np.arange(60))
    source.read(np.arange(30))  # the other shard still reads


def test_a_truncated_layout_is_named_and_old_layouts_still_open(tmp_path):
    paths = write_array_record(tmp_path / "d", _labelled(), num_shards=2)
    layout_path = paths[0] + ".layout.json"
    text = open_text(layout_path)
    with open(layout_path, "w") as stream:
        stream.write(text[:20])
    with pytest.raises(ValueError, match=r"d-00000-of-00002.layout.json' is not valid JSON"):
        ArrayRecordSource(paths)
    with open(layout_path, "w") as stream:
        stream.write(text)

    def legacy(layout):  # what write_array_record wrote before the checksums
        layout["format"] = grain_source.LEGACY_LAYOUT_FORMAT
        for key in ("shard_index", "num_shards", "dataset", "shard_bytes", "shard_sha256"):
            del layout[key]
        del layout["layout_sha256"]

    for path in paths:
        _edit_json(path + ".layout.json", legacy)
    source = ArrayRecordSource(paths)
    _assert_same_batch(source.read(np.arange(60)), _labelled())
