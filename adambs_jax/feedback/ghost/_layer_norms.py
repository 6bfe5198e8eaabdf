"""Per-example squared gradient norms of one layer from its inputs and output gradients.

For a layer y_t = W^T a_t (+ bias) applied at positions t = 1..T of example k (T = 1 for a
Dense on (K, d) inputs; sequence positions, image pixels or extra axes otherwise), the
per-example gradient is g_k = sum_t a_t b_t^T = A_k^T B_k, with A_k (T, d) the layer inputs
and B_k (T, p) the gradients b_t = d loss_k / d y_t of its outputs. Its squared norm is

    ||A_k^T B_k||_F^2 = sum_{t,s} (a_t . a_s)(b_t . b_s) = sum((A_k A_k^T) * (B_k B_k^T)),

which for T = 1 is ||a_k||^2 ||b_k||^2 (Goodfellow 2015, "Efficient per-example gradient
computations"). The "ghost" form on the right costs O(T^2 (d + p)) and never forms g_k (Li
et al. 2022, "Large language models can be strong differentially private learners", ghost
clipping); the explicit form costs O(T d p). Bu et al. 2023 ("Differentially private
optimization on large model at small cost", book-keeping) pick the ghost form iff
2 T^2 <= d p, which ``matmul_sq_norms`` follows. A bias gets ||sum_t b_t||^2.

A convolution is the same product on im2col patches (``conv_patches``), an embedding lookup
is the product with one-hot rows, so (a_t . a_s) = [token_t == token_s] (``embed_sq_norms``).
paxml's ``praxis/layers/ghostnorm`` implements the same rules as custom-vjp layers.

Every function takes per-example stacks with a leading axis K and returns (K,) float32 (or
wider) squared norms; products use ``Precision.HIGHEST`` so that TF32 does not round them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "norm_dtype",
    "use_ghost_form",
    "matmul_sq_norms",
    "matmul_sq_norms_and_sum",
    "sum_sq_norms",
    "sum_sq_norms_and_sum",
    "embed_sq_norms",
    "embed_sq_norms_and_sum",
    "conv_patches",
]

_HIGHEST = lax.Precision.HIGHEST


def norm_dtype(dtype) -> jnp.dtype:
    """float32, or ``dtype`` if wider: the dtype squared norms are accumulated in."""
    return jnp.promote_types(dtype, jnp.float32)


def _wide(x: jax.Array) -> jax.Array:
    return x.astype(norm_dtype(x.dtype))


def use_ghost_form(num_rows: int, in_features: int, out_features: int) -> bool:
    """Bu et al. 2023's rule: the T x T Gram form iff 2 T^2 <= d p (cheaper than T d p)."""
    return 2 * num_rows * num_rows <= in_features * out_features


def matmul_sq_norms(inputs: jax.Array, output_grads: jax.Array) -> jax.Array:
    """(K,) ||A_k^T B_k||_F^2 for inputs A (K, T, d) and output gradients B (K, T, p).

    The squared norm of the per-example gradient of a weight used as y_t = W^T a_t at the
    T rows of each example; ghost (Gram) or explicit form by ``use_ghost_form``.
    """
    return matmul_sq_norms_and_sum(inputs, output_grads)[0]


def matmul_sq_norms_and_sum(inputs: jax.Array, output_grads: jax.Array):
    """``(sq_norms (K,), sum_k A_k^T B_k (d, p))``: the norms and the summed gradient.

    With B the *weighted* output gradients (w_k / K) b_k the sum is the layer's share of
    G_hat (book-keeping, Bu et al. 2023): in the explicit form the per-example gradients
    are formed anyway, so G_hat costs a sum over K instead of another (K T, d) x (K T, p)
    product; in the ghost form it is that one product, as in the ordinary backward pass.
    Group axes between K and T (A (K, G, T, d), B (K, G, T, p): a kernel slice per group,
    DenseGeneral ``batch_dims``) give the (G, d, p) gradient and norms summed over G.
    """
    if (
        inputs.ndim < 3
        or inputs.ndim != output_grads.ndim
        or inputs.shape[:-1] != output_grads.shape[:-1]
    ):
        raise ValueError(
            f"inputs and output_grads must be (K, [G,] T, d) and (K, [G,] T, p), got "
            f"{inputs.shape} and {output_grads.shape}"
        )
    a, b = _wide(inputs), _wide(output_grads)
    num_rows, in_features = a.shape[-2:]
    sum_axes = tuple(range(1, a.ndim))  # per example: groups and the two matrix axes
    if use_ghost_form(num_rows, in_features, b.shape[-1]):
        input_gram = jnp.einsum("k...td,k...sd->k...ts", a, a, precision=_HIGHEST)
        grad_gram = jnp.einsum("k...tp,k...sp->k...ts", b, b, precision=_HIGHEST)
        total = jnp.einsum("k...td,k...tp->...dp", a, b, precision=_HIGHEST)
        return jnp.sum(input_gram * grad_gram, axis=sum_axes), total
    per_example_grads = jnp.einsum("k...td,k...tp->k...dp", a, b, precision=_HIGHEST)
    return jnp.sum(jnp.square(per_example_grads), axis=sum_axes), jnp.sum(per_example_grads, 0)


def sum_sq_norms(output_grads: jax.Array) -> jax.Array:
    """(K,) ||sum_t b_t||^2 for B (K, T, p): the per-example gradient norm of a bias."""
    return sum_sq_norms_and_sum(output_grads)[0]


def sum_sq_norms_and_sum(output_grads: jax.Array):
    """``(sq_norms (K,), sum_k sum_t b_t (p,))`` of a bias (B (K, [G,] T, p): (G, p))."""
    per_example_grads = jnp.sum(_wide(output_grads), axis=-2)
    sum_axes = tuple(range(1, per_example_grads.ndim))
    return jnp.sum(jnp.square(per_example_grads), axis=sum_axes), jnp.sum(per_example_grads, 0)


def embed_sq_norms(tokens: jax.Array, output_grads: jax.Array) -> jax.Array:
    """(K,) squared norms of per-example embedding-table gradients, tokens (K, T), B (K, T, F).

    g_k = sum_t onehot(token_t) b_t^T, so ||g_k||^2 = sum_{t,s} [token_t == token_s] b_t . b_s
    (the token-equality trick of Li et al. 2022), O(T^2 F) without the (V, F) table.
    """
    if tokens.shape != output_grads.shape[:2]:
        raise ValueError(
            f"tokens must be (K, T) matching output_grads (K, T, F), got {tokens.shape} and "
            f"{output_grads.shape}"
        )
    b = _wide(output_grads)
    same_token = (tokens[:, :, None] == tokens[:, None, :]).astype(b.dtype)
    grad_gram = jnp.einsum("ktf,ksf->kts", b, b, precision=_HIGHEST)
    return jnp.sum(same_token * grad_gram, axis=(1, 2))


def embed_sq_norms_and_sum(tokens: jax.Array, output_grads: jax.Array, num_embeddings: int):
    """``(sq_norms (K,), table gradient (num_embeddings, F))``: the rows b_t scattered-added
    to their tokens' rows, as the backward pass of the lookup does."""
    sq_norms = embed_sq_norms(tokens, output_grads)
    b = _wide(output_grads)
    table = jnp.zeros((num_embeddings, b.shape[-1]), b.dtype)
    return sq_norms, table.at[tokens.reshape(-1)].add(b.reshape(-1, b.shape[-1]))


def conv_patches(
    inputs: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    input_dilation: Sequence[int],
    kernel_dilation: Sequence[int],
) -> jax.Array:
    """(N, out_spatial..., prod(kernel_size) * C) im2col patches of channels-last ``inputs``.

    ``inputs`` is (N, spatial..., C) (channels last, as Flax convolutions take them); row
    (n, position) of the result is the receptive field the convolution multiplies with its
    kernel at that output position, features ordered (kernel offset, channel), so that
    conv(x, W)[n, pos] = patches[n, pos] @ W.reshape(-1, p) for an HWIO kernel W. Padding
    strings resolve as in ``lax.conv_general_dilated`` (on the undilated input shape). Built
    from one pad and prod(kernel_size) strided slices: data movement only, unlike
    ``lax.conv_general_dilated_patches`` (a convolution with a one-hot kernel).
    """
    spatial = inputs.shape[1:-1]
    effective = [(k - 1) * r + 1 for k, r in zip(kernel_size, kernel_dilation)]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(spatial, effective, strides, padding)
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(padding, input_dilation)]
    padded = lax.pad(inputs, jnp.zeros((), inputs.dtype), config + [(0, 0, 0)])
    out_shape = [(n - e) // s + 1 for n, e, s in zip(padded.shape[1:-1], effective, strides)]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * r for o, r in zip(offset, kernel_dilation)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out_shape, strides)]
        slices.append(
            lax.slice(
                padded,
                [0, *start, 0],
                [padded.shape[0], *limit, padded.shape[-1]],
                [1, *strides, 1],
            )
        )
    return jnp.concatenate(slices, axis=-1)
