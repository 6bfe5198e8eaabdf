"""Tests for adambs_jax.sources: the data-source contract and the in-memory source."""

import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.sources import ArraySource, check_read_indices, check_source


def _arrays(n=6):
    return {"x": np.arange(2.0 * n).reshape(n, 2), "y": np.arange(n, dtype=np.int32)}


def test_read_returns_the_records_in_the_order_drawn_with_duplicates():
    source = ArraySource(_arrays())
    batch = source.read(np.array([5, 0, 5, 2]))
    np.testing.assert_array_equal(batch["y"], [5, 0, 5, 2])
    np.testing.assert_array_equal(batch["x"][0], [10.0, 11.0])
    assert check_source(source) == 6 and isinstance(source, ab.sources.DataSource)


@pytest.mark.parametrize("indices, error, match", [
    (np.array([0, 6]), ValueError, r"indices: every index must be in \[0, 6\)"),
    (np.array([-1]), ValueError, "every index must be in"),   # never data[-1]
    (np.array([[0]]), ValueError, "must be 1-D"),
    (np.array([0.0]), TypeError, "must be integers"),
])
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
