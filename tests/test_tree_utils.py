"""Tests of adambs_jax.tree_utils: pytree helpers shared by the step, the feedback and samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax import _tree_utils as tree_utils


def _data():
    return {"x": jnp.arange(12.0).reshape(6, 2), "y": jnp.arange(6, dtype=jnp.int32)}


def test_gather_takes_rows_of_every_leaf():
    rows = jax.jit(tree_utils.gather)(_data(), jnp.asarray([4, 0, 4], jnp.int32))
    np.testing.assert_array_equal(rows["x"], [[8.0, 9.0], [0.0, 1.0], [8.0, 9.0]])
    np.testing.assert_array_equal(rows["y"], [4, 0, 4])


def test_batch_size_of():
    assert tree_utils.batch_size_of(_data()) == 6
    assert tree_utils.batch_size_of(jax.ShapeDtypeStruct((5, 3), jnp.float32)) == 5
    with pytest.raises(ValueError, match="data must be a pytree of arrays .* got no leaves"):
        tree_utils.batch_size_of({}, name="data")
    with pytest.raises(ValueError, match=r"leaf \['s'\] is a scalar"):
        tree_utils.batch_size_of({"s": jnp.ones(()), "x": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"batch: leaves have different leading axes \[2, 3\]"):
        tree_utils.batch_size_of({"a": jnp.ones(2), "b": jnp.ones((3, 1))})


def test_per_example_norms_are_the_norms_of_the_flattened_rows():
    tree = {"a": jnp.asarray([[3.0, 0.0], [1.0, 1.0]]), "b": jnp.asarray([[[4.0]], [[1.0]]])}
    np.testing.assert_allclose(tree_utils.per_example_norms(tree), [5.0, np.sqrt(3.0)])


def test_per_example_norms_accumulate_in_float32():
    big = jnp.full((2, 4), 300.0, jnp.float16)  # 300^2 overflows float16
    norms = tree_utils.per_example_norms(big)
    assert norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, [600.0, 600.0])


def test_all_finite_ignores_integer_and_key_leaves():
    ok = {"w": jnp.ones(3), "count": jnp.asarray(7), "key": jax.random.key(0)}
    assert bool(jax.jit(tree_utils.all_finite)(ok))
    assert bool(tree_utils.all_finite({"count": jnp.asarray(1)}))  # no float leaf at all
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(tree_utils.all_finite(ok, {"g": jnp.asarray([0.0, bad])}))


def test_select_is_a_leafwise_where_including_typed_keys():
    new = {"w": jnp.ones(2), "key": jax.random.key(1)}
    old = {"w": jnp.zeros(2), "key": jax.random.key(2)}
    for pred, expected in ((True, new), (False, old)):
        chosen = jax.jit(tree_utils.select)(jnp.asarray(pred), new, old)
        np.testing.assert_array_equal(chosen["w"], expected["w"])
        np.testing.assert_array_equal(
            jax.random.key_data(chosen["key"]), jax.random.key_data(expected["key"])
        )
        assert jax.random.key_impl(chosen["key"]) == jax.random.key_impl(expected["key"])
