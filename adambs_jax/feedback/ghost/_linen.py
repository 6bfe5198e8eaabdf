"""Flax linen layers for ghost norms: their rules, and the interception of their calls.

``interception(handler)`` is a context manager (``flax.linen.intercept_methods``) under which
every call of an ``nn.Dense``, ``nn.DenseGeneral`` (``batch_dims`` included), ``nn.Conv`` (no
feature groups, no mask, SAME/VALID/explicit padding), ``nn.Embed`` or normalization layer
goes through ``handler.on_call``; the model code is unchanged. Exact types only: a subclass may
override ``__call__``, so it falls back like any custom layer.

The layer rules themselves (inputs and output gradients to rows) are in ``ghost.rules``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn

from adambs_jax.feedback.ghost._rules import (
    conv_config_of,
    conv_factors,
    dense_factors,
    embed_factors,
)
from adambs_jax.feedback.ghost._sites import LayerRule

__all__ = ["LINEN_RULES", "LINEN_NORMALIZATION_LAYERS", "interception"]


def _dense_config(module):
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None
    return ((-1,), bool(module.use_bias), 0)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _dense_general_config(module):
    if module.dot_general is not None or getattr(module, "dot_general_cls", None) is not None:
        return None
    # batch_dims: an int or a sequence, the leading axes 0..n-1 (flax checks that)
    num_batch = len(_as_tuple(module.batch_dims))
    return (_as_tuple(module.axis), bool(module.use_bias), num_batch)


def _conv_config(module):
    if (
        module.conv_general_dilated is not None
        or getattr(module, "conv_general_dilated_cls", None) is not None
    ):
        return None  # a user-supplied convolution: its gradient is not the im2col one
    return conv_config_of(module)


LINEN_RULES = {
    nn.Dense: LayerRule("Dense", _dense_config, dense_factors),
    nn.DenseGeneral: LayerRule("DenseGeneral", _dense_general_config, dense_factors),
    nn.Conv: LayerRule("Conv", _conv_config, conv_factors),
    nn.Embed: LayerRule("Embed", lambda module: (), embed_factors),
}
"""Exact linen layer types with a ghost-norm rule."""

LINEN_NORMALIZATION_LAYERS = tuple(
    getattr(nn, name)
    for name in ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm", "InstanceNorm")
    if hasattr(nn, name)
)
"""Layers whose (small, elementwise) parameters take the direct per-example path."""


def _own_params(module) -> dict:
    params = module.variables.get("params", {})
    return {name: value for name, value in params.items() if not hasattr(value, "items")}


def _interceptor(handler):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        rule = LINEN_RULES.get(type(module))
        if rule is None and type(module) not in LINEN_NORMALIZATION_LAYERS:
            return next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            if rule is not None and context.method_name != "setup":
                handler.on_other_method(lambda: _own_params(module))
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        inputs = args[0] if args else next(iter(kwargs.values()))
        config = rule.config(module) if rule is not None else None
        return handler.on_call(
            path,
            rule,
            config,
            inputs,
            lambda: next_fun(*args, **kwargs),
            lambda: _own_params(module),
        )

    return intercept


@contextlib.contextmanager
def interception(handler: Any):
    """Routes supported linen layer calls through ``handler`` (a ``_sites.Recorder`` or
    ``_sites.Perturber``) while active."""
    with nn.intercept_methods(_interceptor(handler)):
        yield
