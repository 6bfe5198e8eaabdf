"""Flax linen models for the experiments: ``get_model(name, num_classes, **kw)``.

See :mod:`experiments.models.registry` for the names, input shapes and the
calling convention (``model.apply({"params": p}, x, train=..., rngs=...)``).
"""

from experiments.models.registry import (
    ModelSpec,
    get_model,
    init_params,
    list_models,
    model_spec,
)

__all__ = ["ModelSpec", "get_model", "init_params", "list_models", "model_spec"]
