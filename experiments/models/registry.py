"""``get_model(name, num_classes, **kw)``, input specs and parameter init.

Every model is a ``flax.linen`` module called as
``model.apply({"params": params}, x, train=..., rngs={"dropout": key})``
(the ``rngs`` argument is only needed with ``train=True`` for models with
dropout). Classification models return ``(batch, num_classes)`` logits;
binary models (``task == "binary"``) return one logit per example,
``(batch,)``, for sigmoid cross-entropy with labels in {0, 1}; regression models
(``task == "regression"``) one output per example, ``(batch,)``; language models
(``task == "next_token"``) ``(batch, T, num_classes)`` logits.

=================== ================ ======================== ==============
name                input (no batch) typical dataset          task
=================== ================ ======================== ==============
lahire-mlp          (4,) float32     iris, wine               classification
mnist1d-mlp         (40,) float32    mnist1d                  classification
digits-mlp          (64,) float32    digits                   classification
regression-mlp      (10,) float32    friedman                 regression
digits-cnn          (8, 8, 1)        digits-image             classification
heavy-tailed-neuron (100,) float32   heavy-tailed             binary
cifar-cnn           (32, 32, 3)      cifar10, cifar100        classification
fashion-cnn         (28, 28, 1)      fashion-mnist, mnist     classification
row-lstm            (28, 28, 1)      mnist, fashion-mnist     classification
pixel-lstm          (28, 28, 1)      mnist, fashion-mnist     classification
imdb-rcnn           (400,) int32     imdb                     binary
byte-transformer    (64,) int32      stdlib-bytes             next_token
=================== ================ ======================== ==============

The input shapes are defaults for :meth:`ModelSpec.example_input`; every
model also accepts other sizes (e.g. ``lahire-mlp`` on Wine's 13 features,
``heavy-tailed-neuron`` on any ``d``; ``imdb-rcnn`` on any length >= 8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.lookup import lookup
from experiments.models.cnn import CifarCNN, DigitsCNN, FashionCNN
from experiments.models.mlp import (
    HeavyTailedNeuron,
    digits_mlp,
    lahire_mlp,
    mnist1d_mlp,
    regression_mlp,
)
from experiments.models.recurrent import ImdbRCNN, PixelSequenceLSTM
from experiments.models.transformer import ByteTransformer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a runner needs to build and initialize a model.

    Attributes:
      name: registry name.
      build: ``build(num_classes, **kw) -> nn.Module``.
      input_shape: default shape of one example (no batch axis).
      input_dtype: ``np.float32`` or ``np.int32`` (token ids).
      task: ``"classification"``, ``"binary"`` or ``"next_token"``.
      datasets: the datasets the model is meant for.
    """

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: Any
    task: str
    datasets: tuple[str, ...]

    def example_input(
        self, batch_size: int = 2, input_shape: tuple[int, ...] | None = None
    ) -> jnp.ndarray:
        """Zeros of shape ``(batch_size, *input_shape)`` to initialize parameters."""
        shape = self.input_shape if input_shape is None else tuple(input_shape)
        return jnp.zeros((batch_size, *shape), dtype=self.input_dtype)


def _binary(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a one-logit model so it accepts (and checks) ``num_classes``."""

    def build_binary(num_classes: int = 2, **kw) -> nn.Module:
        if num_classes not in (1, 2):
            raise ValueError(f"binary model: num_classes must be 1 or 2, got {num_classes}")
        return build(**kw)

    return build_binary


def _regressor(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a one-output model for regression (``num_classes`` must be 1)."""

    def build_regressor(num_classes: int = 1, **kw) -> nn.Module:
        if num_classes != 1:
            raise ValueError(f"regression model: num_classes must be 1, got {num_classes}")
        return build(**kw)

    return build_regressor


def _classifier(module_cls) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kw) -> nn.Module:
        return module_cls(num_classes=num_classes, **kw)

    return build


_SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec("lahire-mlp", lahire_mlp, (4,), np.float32, "classification", ("iris", "wine")),
        ModelSpec("mnist1d-mlp", mnist1d_mlp, (40,), np.float32, "classification", ("mnist1d",)),
        ModelSpec("digits-mlp", digits_mlp, (64,), np.float32, "classification", ("digits",)),
        ModelSpec(
            "regression-mlp",
            _regressor(regression_mlp),
            (10,),
            np.float32,
            "regression",
            ("friedman",),
        ),
        ModelSpec(
            "digits-cnn",
            _classifier(DigitsCNN),
            (8, 8, 1),
            np.float32,
            "classification",
            ("digits-image",),
        ),
        ModelSpec(
            "heavy-tailed-neuron",
            _binary(HeavyTailedNeuron),
            (100,),
            np.float32,
            "binary",
            ("heavy-tailed",),
        ),
        ModelSpec(
            "cifar-cnn",
            _classifier(CifarCNN),
            (32, 32, 3),
            np.float32,
            "classification",
            ("cifar10", "cifar100"),
        ),
        ModelSpec(
            "fashion-cnn",
            _classifier(FashionCNN),
            (28, 28, 1),
            np.float32,
            "classification",
            ("fashion-mnist", "mnist"),
        ),
        ModelSpec(
            "row-lstm",
            _classifier(PixelSequenceLSTM),
            (28, 28, 1),
            np.float32,
            "classification",
            ("mnist", "fashion-mnist"),
        ),
        ModelSpec(
            "pixel-lstm",
            _classifier(lambda **kw: PixelSequenceLSTM(pixels_per_step=1, **kw)),
            (28, 28, 1),
            np.float32,
            "classification",
            ("mnist", "fashion-mnist"),
        ),
        ModelSpec("imdb-rcnn", _binary(ImdbRCNN), (400,), np.int32, "binary", ("imdb",)),
        ModelSpec(
            "byte-transformer",
            lambda num_classes, **kw: ByteTransformer(vocab_size=num_classes, **kw),
            (64,),
            np.int32,
            "next_token",
            ("stdlib-bytes",),
        ),
    )
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return sorted(_SPECS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` (default input shape, dtype, task)."""
    return lookup(_SPECS, name, "model", known=list_models())


def get_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build model ``name``; ``kw`` are the module's fields (e.g. dropout rates).

    For binary models ``num_classes`` must be 1 or 2 and the output is ``(batch,)``.
    """
    return model_spec(name).build(num_classes, **kw)


def init_params(model: nn.Module, key: jax.Array, example_input: jnp.ndarray) -> Any:
    """Initialize ``model`` on ``example_input`` (eval mode); returns ``params``."""
    variables = model.init({"params": key}, example_input, train=False)
    return variables["params"]
