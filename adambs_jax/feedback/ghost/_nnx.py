"""Flax NNX layers for ghost norms: the interception of their calls.

NNX modules are plain Python objects, so there is no ``intercept_methods``: while
``interception(handler)`` is active, ``__call__`` of ``nnx.Linear``, ``nnx.Conv`` (no feature
groups, no mask, SAME/VALID/explicit padding), ``nnx.Embed`` and the normalization layers is
temporarily replaced (on the class, at trace time) by a wrapper that routes the call through
``handler.on_call``; model code is unchanged. Exact types only: an instance of a subclass runs
the original method and its parameters fall back. ``nnx.Embed.attend`` marks the embedding
as not covered (a tied output layer).

A loss on an NNX model takes the parameters as state and merges them, e.g.
``loss_fn = lambda params, batch: per_example_loss(nnx.merge(graphdef, params, rest), batch)``
with ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``; the ghost pass maps a
layer's parameters to the leaves of ``params`` by identity. Layers are named by the order of
their first call (``Linear_0``, ...), the same in every trace of the same loss. The classes
are patched process-wide while a ghost pass traces: do not trace NNX models in another
thread at the same time.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any

import jax
from flax import nnx

from adambs_jax.feedback.ghost._rules import (
    conv_config_of,
    conv_factors,
    dense_factors,
    embed_factors,
)
from adambs_jax.feedback.ghost._sites import LayerRule

__all__ = ["NNX_RULES", "NNX_NORMALIZATION_LAYERS", "interception"]


def _linear_config(module):
    if module.dot_general is not jax.lax.dot_general:
        return None
    return ((-1,), bool(module.use_bias), 0)


def _conv_config(module):
    if module.conv_general_dilated is not jax.lax.conv_general_dilated:
        return None  # a user-supplied convolution: its gradient is not the im2col one
    return conv_config_of(module)


NNX_RULES = {
    nnx.Linear: LayerRule("Linear", _linear_config, dense_factors),
    nnx.Conv: LayerRule("Conv", _conv_config, conv_factors),
    nnx.Embed: LayerRule("Embed", lambda module: (), embed_factors),
}
"""Exact NNX layer types with a ghost-norm rule."""

NNX_NORMALIZATION_LAYERS = tuple(
    getattr(nnx, name)
    for name in ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm")
    if hasattr(nnx, name)
)
"""Layers whose (small, elementwise) parameters take the direct per-example path."""


def _own_params(module) -> dict:
    params = {name: value for name, value in vars(module).items() if isinstance(value, nnx.Param)}
    return {
        name: param.get_value() if hasattr(param, "get_value") else param.value
        for name, param in params.items()
    }


class _Names:
    """``Class_n`` by order of first call, per module object, within one trace."""

    def __init__(self):
        self._names: dict = {}
        self._per_class = collections.Counter()

    def __call__(self, module) -> str:
        if id(module) not in self._names:
            name = type(module).__name__
            self._names[id(module)] = (f"{name}_{self._per_class[name]}", module)
            self._per_class[name] += 1
        return self._names[id(module)][0]


def _wrap_call(cls, original, handler, names):
    rule = NNX_RULES.get(cls)

    @functools.wraps(original)
    def call(self, *args, **kwargs):
        if type(self) is not cls:  # a subclass: its parameters fall back
            return original(self, *args, **kwargs)
        inputs = args[0] if args else next(iter(kwargs.values()))
        config = rule.config(self) if rule is not None else None
        return handler.on_call(
            names(self),
            rule,
            config,
            inputs,
            lambda: original(self, *args, **kwargs),
            lambda: _own_params(self),
        )

    return call


def _wrap_attend(original, handler):
    @functools.wraps(original)
    def attend(self, *args, **kwargs):
        handler.on_other_method(lambda: _own_params(self))
        return original(self, *args, **kwargs)

    return attend


@contextlib.contextmanager
def interception(handler: Any):
    """Routes supported NNX layer calls through ``handler`` (a ``_sites.Recorder`` or
    ``_sites.Perturber``) while active; restores the classes afterwards."""
    names = _Names()
    patched = [
        (cls, "__call__", _wrap_call(cls, cls.__call__, handler, names))
        for cls in (*NNX_RULES, *NNX_NORMALIZATION_LAYERS)
    ]
    patched.append((nnx.Embed, "attend", _wrap_attend(nnx.Embed.attend, handler)))
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patched]
    try:
        for cls, name, wrapper in patched:
            setattr(cls, name, wrapper)
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
