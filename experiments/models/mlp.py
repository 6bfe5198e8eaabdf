"""Fully connected models: Lahire's MLP, the MNIST-1D MLP, the digits and regression MLPs
and the AdamBS neuron.

All modules take ``__call__(x, *, train=False)`` (``train`` is unused: none of
these models has dropout) and return logits (the regression MLP: one output per example).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """``Dense -> ReLU`` for each hidden size, then ``Dense(num_classes)`` logits.

    Inputs of any trailing shape are flattened to ``(batch, features)``.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (100, 100)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def lahire_mlp(num_classes: int, hidden_sizes: Sequence[int] = (10, 10)) -> MLP:
    """Lahire's MLP for Iris / Wine.

    Source: Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep
    Learning", Appendix E (/work/shared/papers/004_57fb09608c6ed123.txt,
    lines 246-248): "The first layer is layer with 10 neurons, followed by a
    ReLU ... The second layer also has 10 neurons. The neural network
    computes a cross-entropy loss at the output of the last layer."

    The text leaves open whether the second 10-neuron layer is the output
    (10 logits, of which only 3 classes occur) or a hidden layer. We read it
    as two hidden layers of 10 units, each followed by ReLU (a linear layer
    feeding a linear layer would be redundant), then a linear output layer of
    ``num_classes`` logits for the cross-entropy. ``hidden_sizes=(10,)``
    gives the other reading with ``num_classes`` outputs instead of 10.
    """
    return MLP(num_classes=num_classes, hidden_sizes=tuple(hidden_sizes))


def mnist1d_mlp(num_classes: int = 10, hidden_sizes: Sequence[int] = (100, 100)) -> MLP:
    """MLP for MNIST-1D's 40-sample signals: two hidden ReLU layers of 100 units
    (the MLP baseline of the MNIST-1D paper)."""
    return MLP(num_classes=num_classes, hidden_sizes=tuple(hidden_sizes))


def digits_mlp(num_classes: int = 10, hidden_sizes: Sequence[int] = (64,)) -> MLP:
    """Our small MLP for the flat 64-pixel digits (one hidden ReLU layer of 64): cheap
    enough for 10 seeds on a CPU."""
    return MLP(num_classes=num_classes, hidden_sizes=tuple(hidden_sizes))


class RegressionMLP(nn.Module):
    """``Dense -> ReLU`` per hidden size, then one output per example, shape ``(batch,)``."""

    hidden_sizes: Sequence[int] = (32, 32)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1)(x)[:, 0]


def regression_mlp(hidden_sizes: Sequence[int] = (32, 32)) -> RegressionMLP:
    """Our small MLP for regression (two hidden ReLU layers of 32)."""
    return RegressionMLP(hidden_sizes=tuple(hidden_sizes))


class HeavyTailedNeuron(nn.Module):
    """The one-neuron network of AdamBS §4.3.

    Source: /work/shared/papers/000_3210f3def4dac4d3.txt lines ~694-705: one
    hidden neuron with ReLU, one output neuron with sigmoid, loss
    ``f(theta) = -(1/n) sum_j y_j log sigma(ReLU(z_j^T theta))`` and gradient
    ``g_j = -y_j (1 - sigma(ReLU(z_j^T theta))) 1(z_j^T theta > 0) z_j``, so
    the only parameter is ``theta in R^d`` (no biases, no output weight).

    Returns the logit ``ReLU(z . theta)`` of shape ``(batch,)``:
    ``sigmoid(logit)`` is the model's P(y = 1). Use it with
    ``optax.sigmoid_binary_cross_entropy(logit, y01)`` and labels in {0, 1}
    (what ``load_dataset("heavy-tailed")`` returns); the paper's literal loss
    with ``y in {-1, +1}`` is ``-y * jax.nn.log_sigmoid(logit)``. Note that
    the logit is >= 0, so the model can never predict P(y = 1) < 1/2.
    """

    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        x = x.reshape((x.shape[0], -1))
        return nn.relu(nn.Dense(1, use_bias=self.use_bias, name="theta")(x))[:, 0]
