"""Flax linen layers for ghost norms: their rules, and the interception of their calls.

``interception(handler)`` is a context manager (``flax.linen.intercept_methods``) under which
every call of an ``nn.Dense``, ``nn.DenseGeneral`` (no ``batch_dims``), ``nn.Conv`` (no
feature groups, no mask, SAME/VALID/explicit padding), ``nn.Embed`` or normalization layer
goes through ``handler.on_call``; the model code is unchanged. Exact types only: a subclass may
override ``__call__``, so it falls back like any custom layer.

Under the per-example ``vmap`` of the ghost pass every layer sees one example, so a call's
first argument stacks to (K, ...) with K the examples; the rules below turn it and the output
gradient into rows (see ``layer_norms``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from adambs_jax.ghost.layer_norms import conv_patches
from adambs_jax.ghost.sites import Factor, LayerRule

__all__ = ["LINEN_RULES", "LINEN_NORMALIZATION_LAYERS", "interception", "dense_factors",
           "conv_factors", "embed_factors"]


def _rows(x, num_features):
    """(K, ...) -> (K, T, num_features): every non-feature axis of an example is a row."""
    return x.reshape(x.shape[0], -1, num_features)


def dense_factors(config, inputs, output_grads):
    """Dense / DenseGeneral: y = x . W over ``axes`` of x (per-example axes, 0-based)."""
    axes, use_bias = config
    per_example_ndim = inputs.ndim - 1
    axes = tuple(sorted(a % per_example_ndim + 1 for a in axes))
    moved = jnp.moveaxis(inputs, axes, tuple(range(inputs.ndim - len(axes), inputs.ndim)))
    in_features = math.prod(inputs.shape[a] for a in axes)
    left = _rows(moved.astype(output_grads.dtype), in_features)
    right = output_grads.reshape(left.shape[0], left.shape[1], -1)  # features may be a tuple
    factors = {"kernel": Factor("matmul", left, right)}
    if use_bias:
        factors["bias"] = Factor("sum", None, right)
    return factors


def conv_factors(config, inputs, output_grads):
    """Conv: the dense rule on im2col patches of every example's receptive fields."""
    kernel_size, strides, padding, input_dilation, kernel_dilation, use_bias = config
    spatial_and_channels = inputs.shape[inputs.ndim - len(kernel_size) - 1:]
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


def _dense_config(module):
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None
    return ((-1,), bool(module.use_bias))


def _dense_general_config(module):
    if tuple(module.batch_dims) or module.dot_general is not None:
        return None
    if getattr(module, "dot_general_cls", None) is not None:
        return None
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return (tuple(axis), bool(module.use_bias))


def _broadcast(value, rank):
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def _conv_config(module):
    if (module.mask is not None or module.feature_group_count != 1
            or module.conv_general_dilated is not None
            or getattr(module, "conv_general_dilated_cls", None) is not None):
        return None
    kernel_size = _broadcast(module.kernel_size, 1)
    rank = len(kernel_size)
    padding = canonicalize_padding(module.padding, rank)
    if isinstance(padding, str):
        if padding not in ("SAME", "SAME_LOWER", "VALID"):
            return None  # CIRCULAR / REFLECT / CAUSAL pad the input first
    else:
        padding = tuple(tuple(pair) for pair in padding)
    return (kernel_size, _broadcast(module.strides, rank), padding,
            _broadcast(module.input_dilation, rank), _broadcast(module.kernel_dilation, rank),
            bool(module.use_bias))


LINEN_RULES = {
    nn.Dense: LayerRule("Dense", _dense_config, dense_factors),
    nn.DenseGeneral: LayerRule("DenseGeneral", _dense_general_config, dense_factors),
    nn.Conv: LayerRule("Conv", _conv_config, conv_factors),
    nn.Embed: LayerRule("Embed", lambda module: (), embed_factors),
}
"""Exact linen layer types with a ghost-norm rule."""

LINEN_NORMALIZATION_LAYERS = tuple(
    getattr(nn, name) for name in ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm",
                                   "InstanceNorm") if hasattr(nn, name)
)
"""Layers whose (small, elementwise) parameters take the direct per-example path."""


def _own_params(module) -> list:
    params = module.variables.get("params", {})
    return [value for value in params.values() if not hasattr(value, "items")]


def _interceptor(handler):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        rule = LINEN_RULES.get(type(module))
        if rule is None and type(module) not in LINEN_NORMALIZATION_LAYERS:
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if context.method_name != "__call__":
            if rule is not None and context.method_name != "setup":
                handler.on_other_method(path)
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else next(iter(kwargs.values()))
        config = rule.config(module) if rule is not None else None
        return handler.on_call(path, rule, config, inputs, lambda: next_fun(*args, **kwargs),
                               lambda: _own_params(module))

    return intercept


@contextlib.contextmanager
def interception(handler: Any):
    """Routes supported linen layer calls through ``handler`` (a ``sites.Recorder`` or
    ``sites.Perturber``) while active."""
    with nn.intercept_methods(_interceptor(handler)):
        yield
