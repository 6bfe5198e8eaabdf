"""Layer rules shared by the linen and NNX interceptions: one call's rows.

Under the per-example ``vmap`` of the ghost pass every layer sees one example, so a call's
first argument stacks to (K, ...) with K the examples, and so does the gradient of its output.
The functions here turn the pair into ``_sites.Factor`` rows A (K, T, d), B (K, T, p) whose
product A_k^T B_k is example k's gradient of the layer's parameter (``_layer_norms``):

* Dense / DenseGeneral over contracting ``axes``: A = the input with those axes flattened
  last, B = the output gradient, T = every other axis (sequence positions, heads, ...);
  DenseGeneral ``batch_dims`` (a kernel slice per batch index) add a group axis G before T;
* Conv: A = im2col patches (``_layer_norms.conv_patches``) of the same strides, padding and
  dilations, B = the output gradient, T = the output positions;
* Embed: one-hot rows, given as tokens (K, T);
* a bias: sum_t b_t.

The input is cast to the output's dtype (the layer's computation dtype after promotion).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from adambs_jax.feedback.ghost._layer_norms import conv_patches
from adambs_jax.feedback.ghost._sites import Factor

__all__ = ["dense_factors", "conv_factors", "embed_factors", "conv_config", "conv_config_of"]


def _rows(x, num_features):
    """(K, ...) -> (K, T, num_features): every non-feature axis of an example is a row."""
    return x.reshape(x.shape[0], -1, num_features)


def dense_factors(config, inputs, output_grads):
    """Dense / DenseGeneral: y = x . W over ``axes`` of x (per-example axes, 0-based), with
    ``num_batch`` leading batch axes (DenseGeneral ``batch_dims``: one kernel slice each, so
    the rows get a group axis, A (K, G, T, d) and B (K, G, T, p) with G their size)."""
    axes, use_bias, num_batch = config
    per_example_ndim = inputs.ndim - 1
    axes = tuple(sorted(a % per_example_ndim + 1 for a in axes))  # as flax orders the kernel
    moved = jnp.moveaxis(inputs, axes, tuple(range(inputs.ndim - len(axes), inputs.ndim)))
    in_features = math.prod(inputs.shape[a] for a in axes)
    groups = (math.prod(inputs.shape[1 : 1 + num_batch]),) if num_batch else ()
    left = moved.astype(output_grads.dtype).reshape((inputs.shape[0], *groups, -1, in_features))
    right = output_grads.reshape(left.shape[:-1] + (-1,))  # features may be a tuple
    factors = {"kernel": Factor("matmul", left, right)}
    if use_bias:
        factors["bias"] = Factor("sum", None, right)
    return factors


def conv_factors(config, inputs, output_grads):
    """Conv: the dense rule on im2col patches of every example's receptive fields."""
    kernel_size, strides, padding, input_dilation, kernel_dilation, use_bias = config
    spatial_and_channels = inputs.shape[inputs.ndim - len(kernel_size) - 1 :]
    flat = inputs.reshape((-1,) + spatial_and_channels).astype(output_grads.dtype)
    patches = conv_patches(flat, kernel_size, strides, padding, input_dilation, kernel_dilation)
    left = _rows(patches.reshape((inputs.shape[0], -1, patches.shape[-1])), patches.shape[-1])
    right = _rows(output_grads, output_grads.shape[-1])
    factors = {"kernel": Factor("matmul", left, right)}
    if use_bias:
        factors["bias"] = Factor("sum", None, right)
    return factors


def embed_factors(config, inputs, output_grads):
    """Embed: one-hot rows, i.e. the token-equality trick."""
    del config
    tokens = inputs.reshape(inputs.shape[0], -1)
    return {"embedding": Factor("embed", tokens, _rows(output_grads, output_grads.shape[-1]))}


def _broadcast(value, rank):
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def conv_config(kernel_size, strides, padding, input_dilation, kernel_dilation, use_bias):
    """The hashable configuration ``conv_factors`` takes, or None for a padding that pads
    the input before the convolution (CIRCULAR, REFLECT, CAUSAL: not covered)."""
    kernel_size = _broadcast(kernel_size, 1)
    rank = len(kernel_size)
    padding = canonicalize_padding(padding, rank)
    if isinstance(padding, str):
        if padding not in ("SAME", "SAME_LOWER", "VALID"):
            return None
    else:
        padding = tuple(tuple(pair) for pair in padding)
    return (
        kernel_size,
        _broadcast(strides, rank),
        padding,
        _broadcast(input_dilation, rank),
        _broadcast(kernel_dilation, rank),
        bool(use_bias),
    )


def conv_config_of(module):
    """``conv_config`` of a linen ``nn.Conv`` or an NNX ``nnx.Conv`` (same attribute names),
    or None for a grouped or masked convolution (not covered: the caller checks the
    framework-specific ways to replace the convolution itself)."""
    if module.mask is not None or module.feature_group_count != 1:
        return None
    return conv_config(
        module.kernel_size,
        module.strides,
        module.padding,
        module.input_dilation,
        module.kernel_dilation,
        module.use_bias,
    )
