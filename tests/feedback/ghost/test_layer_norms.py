"""Tests of adambs_jax.ghost.layer_norms: each rule equals the norm of the explicit gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adambs_jax.feedback.ghost import _layer_norms as layer_norms

K = 3


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def _explicit_matmul_sq_norms(a, b):
    return np.array([np.sum(np.square(np.asarray(a[k]).T @ np.asarray(b[k]))) for k in range(K)])


@pytest.mark.parametrize("rows,d,p", [(1, 4, 3), (3, 5, 6), (9, 2, 3)])
def test_matmul_sq_norms_ghost_and_explicit_forms(rows, d, p):
    a, b = _normal(0, (K, rows, d)), _normal(1, (K, rows, p))
    assert layer_norms.use_ghost_form(rows, d, p) == (2 * rows * rows <= d * p)
    np.testing.assert_allclose(
        layer_norms.matmul_sq_norms(a, b), _explicit_matmul_sq_norms(a, b), rtol=1e-5
    )


@pytest.mark.parametrize("rows,d,p", [(2, 4, 3), (9, 2, 3)])  # ghost form, explicit form
def test_group_axes_give_a_kernel_slice_per_group(rows, d, p):
    """A (K, G, T, d), B (K, G, T, p) (DenseGeneral batch_dims): g_k[g] = A_kg^T B_kg."""
    a, b = _normal(0, (K, 2, rows, d)), _normal(1, (K, 2, rows, p))
    per_example = jnp.einsum("kgtd,kgtp->kgdp", a, b, precision=lax.Precision.HIGHEST)
    sq_norms, total = layer_norms.matmul_sq_norms_and_sum(a, b)
    np.testing.assert_allclose(sq_norms, jnp.sum(per_example**2, axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(total, jnp.sum(per_example, axis=0), rtol=1e-5, atol=1e-6)
    bias_sq_norms, bias_total = layer_norms.sum_sq_norms_and_sum(b)
    np.testing.assert_allclose(bias_sq_norms, jnp.sum(b.sum(axis=2) ** 2, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(bias_total, b.sum(axis=(0, 2)), rtol=1e-5, atol=1e-6)


def test_single_row_is_product_of_squared_norms():
    a, b = _normal(0, (K, 1, 4)), _normal(1, (K, 1, 3))
    expected = jnp.sum(a[:, 0] ** 2, axis=1) * jnp.sum(b[:, 0] ** 2, axis=1)
    np.testing.assert_allclose(layer_norms.matmul_sq_norms(a, b), expected, rtol=1e-6)


def test_bfloat16_factors_accumulate_in_float32():
    a, b = _normal(0, (K, 2, 4)).astype(jnp.bfloat16), _normal(1, (K, 2, 3))
    assert layer_norms.matmul_sq_norms(a, b).dtype == jnp.float32
    assert layer_norms.norm_dtype(jnp.float64) == jnp.float64


def test_sum_sq_norms_is_bias_gradient_norm():
    b = _normal(2, (K, 5, 3))
    expected = np.sum(np.square(np.sum(np.asarray(b), axis=1)), axis=1)
    np.testing.assert_allclose(layer_norms.sum_sq_norms(b), expected, rtol=1e-6)


def test_embed_sq_norms_equals_one_hot_gradient():
    tokens = jnp.array([[0, 2, 2, 1], [3, 3, 3, 3], [0, 1, 2, 3]])
    b = _normal(3, (K, 4, 5))
    one_hot = jax.nn.one_hot(tokens, 4)
    np.testing.assert_allclose(
        layer_norms.embed_sq_norms(tokens, b), _explicit_matmul_sq_norms(one_hot, b), rtol=1e-5
    )


@pytest.mark.parametrize(
    "strides,padding,lhs_dil,rhs_dil",
    [
        ((1, 1), "SAME", (1, 1), (1, 1)),
        ((2, 3), ((1, 1), (2, 0)), (2, 1), (1, 2)),
        ((2, 3), "SAME", (1, 1), (1, 2)),
        ((1, 2), "VALID", (1, 1), (2, 2)),
        ((1, 1), ((-1, 2), (0, 0)), (1, 1), (1, 1)),
        ((2, 1), ((1, 0), (2, 1)), (1, 2), (2, 1)),
    ],
)
def test_conv_patches_times_kernel_is_the_convolution(strides, padding, lhs_dil, rhs_dil):
    x, kernel = _normal(4, (2, 7, 6, 3)), _normal(5, (3, 2, 3, 4))  # NHWC, HWIO
    expected = lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    patches = layer_norms.conv_patches(x, (3, 2), strides, padding, lhs_dil, rhs_dil)
    np.testing.assert_allclose(patches @ kernel.reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="inputs and output_grads must be"):
        layer_norms.matmul_sq_norms(jnp.ones((K, 2, 3)), jnp.ones((K, 3, 3)))
    with pytest.raises(ValueError, match="tokens must be"):
        layer_norms.embed_sq_norms(jnp.ones((K, 2), int), jnp.ones((K, 3, 3)))
