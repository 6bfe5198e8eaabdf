"""Tests for experiments.tasks: the task losses, dropout detection and the batched evaluator."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.tasks import (
    make_evaluator,
    make_model_loss,
    make_stack_evaluator,
    per_example_loss_from_outputs,
    uses_dropout,
)


class Linear(nn.Module):
    outputs: int = 3
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.outputs)(x)
        return logits[:, 0] if self.outputs == 1 else logits


def test_uses_dropout():
    assert not uses_dropout(Linear())
    assert uses_dropout(Linear(dropout_rate=0.5))


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        per_example_loss_from_outputs("ranking")


def test_regression_loss_is_the_squared_error_and_its_error_the_mse():
    loss = per_example_loss_from_outputs("regression")
    np.testing.assert_allclose(
        loss(jnp.array([1.0, -2.0]), {"y": jnp.array([0.5, 1.0])}), [0.25, 9.0]
    )

    class Scalar(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            return nn.Dense(1)(x)[:, 0]

    model = Scalar()
    x = jax.random.normal(jax.random.key(0), (10, 4))
    y = jax.random.normal(jax.random.key(1), (10,))
    params = model.init(jax.random.key(2), x)["params"]
    mse = float(jnp.mean(jnp.square(model.apply({"params": params}, x) - y)))
    for batch_size in (64, 4):
        loss_value, error = make_evaluator(model, "regression", batch_size)(params, x, y)
        assert float(loss_value) == pytest.approx(mse, rel=1e-5)
        assert float(error) == pytest.approx(mse, rel=1e-5)


@pytest.mark.parametrize("task, outputs", [("classification", 3), ("binary", 1)])
def test_evaluator_in_batches_equals_one_batch(task, outputs):
    model = Linear(outputs=outputs)
    x = jax.random.normal(jax.random.key(0), (10, 4))
    y = jax.random.randint(jax.random.key(1), (10,), 0, 2)
    params = model.init(jax.random.key(2), x)["params"]
    whole = make_evaluator(model, task, batch_size=64)(params, x, y)
    batched = make_evaluator(model, task, batch_size=4)(params, x, y)  # 3 batches, 2 padded
    np.testing.assert_allclose(batched, whole, rtol=1e-6)
    losses = make_model_loss(model, task)(params, {"x": x, "y": y})
    np.testing.assert_allclose(whole[0], jnp.mean(losses), rtol=1e-6)
    stack = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), params)
    np.testing.assert_allclose(
        make_stack_evaluator(make_evaluator(model, task, 4))(stack, x, y),
        np.stack([whole, whole], axis=1),
        rtol=1e-6,
    )
