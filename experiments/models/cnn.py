"""Convolutional models (inputs ``(batch, H, W, C)``, outputs logits).

Dropout layers use the ``'dropout'`` rng and are active only when
``train=True``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def _max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class DigitsCNN(nn.Module):
    """Small CNN for the 8x8x1 sklearn digits (our own choice, no paper model).

    conv 3x3x16 (same) -> ReLU -> conv 3x3x32 (same) -> ReLU -> max-pool 2x2
    -> flatten (4*4*32) -> Dense 64 -> ReLU -> Dense num_classes.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
        x = _max_pool_2x2(x).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
    """The AdamBS CIFAR-10/100 CNN.

    Paper (000_3210f3def4dac4d3.txt lines 925-927): "4 layers of 3x3
    convolution filters and max pooling with size 2x2. Dropout with dropping
    probability 0.25 is applied to the 2nd and 4th convolutional layers. This
    is then followed by a fully connected layer of 512 hidden units."

    That is the Keras ``cifar10_cnn.py`` example, whose remaining details we
    take: 32, 32, 64, 64 filters; 'same', 'valid', 'same', 'valid' padding;
    ReLU; max-pool 2x2 then dropout 0.25 after conv 2 and conv 4; Dense 512
    ReLU; dropout 0.5 (``dense_dropout``; not mentioned by the paper); Dense
    num_classes. The l2(1e-4) kernel regularizer of the importance-sampling
    fork of that example is an optimizer concern and is not part of the model.
    For 32x32 inputs the flattened features are 6*6*64 = 2304.
    """

    num_classes: int = 10
    conv_dropout: float = 0.25
    dense_dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        for filters in (32, 64):
            x = nn.relu(nn.Conv(filters, (3, 3), padding="SAME")(x))
            x = nn.relu(nn.Conv(filters, (3, 3), padding="VALID")(x))
            x = _max_pool_2x2(x)
            x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512)(x))
        x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class FashionCNN(nn.Module):
    """The AdamBS Fashion-MNIST CNN.

    Paper (lines 928-930): "2 layers of 3x3 filters and max pooling with size
    2x2 is applied to the 2nd convolutional layer, which is followed by a
    fully connected layer of 128 hidden units."

    Filter counts 32 and 64 ('valid' padding, ReLU) follow the ``mnist_cnn.py``
    example of the importance-sampling library the paper's code is based on
    (same batch size 128 and 10 epochs as the paper); it has no dropout, so
    ``conv_dropout``/``dense_dropout`` default to 0 (Keras' own mnist_cnn uses
    0.25/0.5). For 28x28 inputs the flattened features are 12*12*64 = 9216.
    """

    num_classes: int = 10
    conv_dropout: float = 0.0
    dense_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = _max_pool_2x2(x)
        x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
