"""Recurrent models: the pixel-sequence LSTM and the IMDB RCNN of AdamBS §5.3-5.4.

Both use ``flax.linen.RNN`` over an ``OptimizedLSTMCell`` (gates
``sigmoid``, cell/output activation ``activation_fn``) and keep the output of
the last time step.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp


class PixelSequenceLSTM(nn.Module):
    """LSTM over the pixels of an image, last hidden state -> Dense logits.

    Paper (000_3210f3def4dac4d3.txt lines 946-950): "image pixels are fed to
    RNN as a sequence ... an LSTM with dimension 100 in the hidden space, and
    ReLU as recurrent activation function, which is followed by a fully
    connected layer"; batch 32, learning rate 1e-6, 200 epochs. Those
    settings are the Keras ``mnist_irnn.py`` example (a ReLU ``SimpleRNN`` of
    100 units fed one pixel per step) with the SimpleRNN replaced by an LSTM,
    so we read "ReLU as recurrent activation" as Keras' ``activation='relu'``
    = the cell-candidate and output activation (``activation_fn``); the
    gates stay sigmoid (``gate_fn``). Keras' ``unit_forget_bias`` (forget-gate
    bias 1 at init) is not reproduced: Flax initializes all biases at 0.

    ``pixels_per_step`` sets the sequence layout of a ``(H, W, C)`` image
    flattened in row-major order: ``W * C`` (default 28, i.e. one image row
    per step: 28 steps for MNIST, registry name ``row-lstm``) or ``1`` (one
    pixel per step: 784 steps as in mnist_irnn, ``pixel-lstm``).
    """

    num_classes: int = 10
    hidden_size: int = 100
    pixels_per_step: int = 28
    activation_fn: Callable = nn.relu
    gate_fn: Callable = nn.sigmoid

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        batch = x.shape[0]
        if x[0].size % self.pixels_per_step:
            raise ValueError(
                f"{x[0].size} pixels do not split into steps of {self.pixels_per_step}"
            )
        sequence = x.reshape((batch, -1, self.pixels_per_step))
        cell = nn.OptimizedLSTMCell(
            self.hidden_size, activation_fn=self.activation_fn, gate_fn=self.gate_fn
        )
        outputs = nn.RNN(cell)(sequence)
        return nn.Dense(self.num_classes)(outputs[:, -1])


class ImdbRCNN(nn.Module):
    """The AdamBS IMDB RCNN (convolution + LSTM), one logit per review.

    Paper (lines 960-962): "a convolutional layer with filter of size 5, and
    a max pooling layer of size 4, followed by an LSTM and a fully connected
    layer"; batch size 30. The unstated sizes follow the Keras
    ``imdb_cnn_lstm.py`` example (whose batch size is also 30): embedding of
    a 20 000-word vocabulary into 128 dimensions, dropout 0.25, Conv1D of 64
    filters of width 5 ('valid', ReLU, stride 1), max-pool 4 (stride 4), LSTM
    of 70 units (tanh, sigmoid gates), Dense 1.

    Input: ``(batch, T)`` int token ids in ``[0, vocab_size)``. Output: the
    logit of P(positive), shape ``(batch,)`` (the example's final sigmoid is
    left to ``optax.sigmoid_binary_cross_entropy``).
    """

    vocab_size: int = 20_000
    embedding_size: int = 128
    embedding_dropout: float = 0.25
    filters: int = 64
    kernel_size: int = 5
    pool_size: int = 4
    lstm_size: int = 70

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        x = nn.Embed(self.vocab_size, self.embedding_size)(tokens)
        x = nn.Dropout(self.embedding_dropout, deterministic=not train)(x)
        x = nn.relu(nn.Conv(self.filters, (self.kernel_size,), padding="VALID")(x))
        x = nn.max_pool(x, (self.pool_size,), strides=(self.pool_size,), padding="VALID")
        outputs = nn.RNN(nn.OptimizedLSTMCell(self.lstm_size))(x)
        return nn.Dense(1)(outputs[:, -1])[:, 0]
