"""The ``Dataset`` container returned by every loader.

Conventions shared by all loaders:

* ``x_*`` are numpy arrays, ``float32`` for real-valued inputs (tabular rows
  ``(N, D)``, images ``(N, H, W, C)``, signals ``(N, L)``) and ``int32`` for
  token sequences ``(N, T)``.
* ``y_*`` are ``int32`` class indices in ``[0, num_classes)`` (``float32`` targets for
  ``task == "regression"``).
* ``task`` is ``"classification"`` (a model with ``num_classes`` logits and
  softmax cross-entropy) or ``"binary"`` (a model with one logit per example,
  shape ``(N,)``, sigmoid cross-entropy; labels are ``{0, 1}`` and
  ``num_classes`` is 2), ``"regression"`` (one output per example, shape ``(N,)``,
  squared error; ``num_classes`` is 1), or ``"next_token"`` (token sequences: ``x`` and ``y``
  both ``(N, T)`` int32, ``y[:, t]`` the token after ``x[:, t]``; a model with
  ``num_classes`` logits per position, the per-example loss the mean cross-entropy over the T
  positions).
* Label noise (``label_noise`` of the tabular loaders): ``metadata["corrupted"]`` is the
  (N_train,) bool mask of the flipped training labels and ``metadata["clean_y_train"]`` the
  labels before flipping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

TASKS = ("classification", "binary", "regression", "next_token")


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: no elementwise ==
class Dataset:
    """A train/test split with its metadata.

    Attributes:
      x_train, y_train, x_test, y_test: the arrays (see module docstring).
      num_classes: number of classes (2 for ``task == "binary"``).
      name: registry name, e.g. ``"cifar10"``.
      task: ``"classification"``, ``"binary"`` or ``"regression"``.
      description: one or two sentences on source, split and preprocessing.
      metadata: loader-specific extras (standardization statistics, generator
        parameters, ...). Never needed to train.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    task: str
    description: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if len(self.x_train) != len(self.y_train):
            raise ValueError("x_train and y_train differ in length")
        if len(self.x_test) != len(self.y_test):
            raise ValueError("x_test and y_test differ in length")

    @property
    def num_train(self) -> int:
        return int(len(self.x_train))

    @property
    def num_test(self) -> int:
        return int(len(self.x_test))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch axis)."""
        return tuple(self.x_train.shape[1:])

    def first_train_examples(self, count: int) -> Dataset:
        """The same dataset restricted to its first ``count`` training examples.

        The test split and any preprocessing statistics are unchanged (they
        were computed on the full training split).
        """
        if count <= 0:
            raise ValueError(f"subset must be positive, got {count}")
        return dataclasses.replace(
            self,
            x_train=self.x_train[:count],
            y_train=self.y_train[:count],
            metadata={**self.metadata, "subset": int(count)},
        )
