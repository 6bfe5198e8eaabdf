"""Tests of adambs_jax.jsonable.to_jsonable."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax._jsonable import to_jsonable


def test_python_and_numpy_scalars_become_python_values():
    assert to_jsonable(None) is None and to_jsonable("a") == "a"
    for value, expected in [
        (True, True),
        (np.bool_(False), False),
        (3, 3),
        (np.int64(3), 3),
        (np.float32(0.5), 0.5),
        (2.5, 2.5),
    ]:
        converted = to_jsonable(value)
        assert converted == expected and type(converted) is type(expected)


def test_non_finite_floats_become_none_unless_asked_to_stay():
    assert to_jsonable([math.nan, math.inf, np.float32(-math.inf)]) == [None, None, None]
    kept = to_jsonable([math.nan, math.inf], nonfinite_as_none=False)
    assert math.isnan(kept[0]) and kept[1] == math.inf


def test_containers_and_arrays_become_json_containers():
    value = {
        1: (np.int32(2), [np.float64(0.25)]),
        "arr": np.arange(3),
        "jax": jnp.array([[1.0, 2.0]]),
        "zero_d": jnp.float32(1.5),
    }
    converted = to_jsonable(value)
    assert converted == {"1": [2, [0.25]], "arr": [0, 1, 2], "jax": [[1.0, 2.0]], "zero_d": 1.5}
    assert json.loads(json.dumps(converted)) == converted


def test_anything_else_becomes_its_repr():
    assert to_jsonable(np.dtype("float32")) == repr(np.dtype("float32"))
    key = jax.random.key(0)  # a typed key array has no numpy form
    assert to_jsonable(key) == repr(key)
    assert isinstance(to_jsonable(object()), str)


def test_read_format_file_checks_presence_and_format(tmp_path):
    import json

    from adambs_jax._jsonable import read_format_file

    path = tmp_path / "a.json"
    with pytest.raises(FileNotFoundError, match="where: write it first"):
        read_format_file(str(path), "fmt-1", name="where", missing="write it first")
    path.write_text(json.dumps({"format": "fmt-0", "n": 1}))
    with pytest.raises(ValueError, match="where: .* is not a file of format 'fmt-1'"):
        read_format_file(str(path), "fmt-1", name="where", missing="")
    path.write_text(json.dumps({"format": "fmt-1", "n": 1}))
    assert read_format_file(str(path), "fmt-1", name="where", missing="") == {
        "format": "fmt-1",
        "n": 1,
    }
