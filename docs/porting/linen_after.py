"""Flax linen on scikit-learn's digits with a TrainState that carries the BatchNorm statistics
and a dropout key, in the style of the Flax linen guides (BatchNorm, Dropout)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adambs_jax as ab

TRAIN_STEPS = 400
EVAL_EVERY = 100
BATCH_SIZE = 32
LEARNING_RATE = 0.003


def load_data(seed):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    train = jax.device_put({"image": x_train, "label": y_train})
    test = jax.device_put({"image": x_test, "label": y_test})
    return train, test


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, kernel_size=(3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nn.Dropout(rate=0.1, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
        return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any
    key: jax.Array


def create_train_state(seed, image):
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    model = CNN()
    variables = model.init(params_key, image, train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        key=dropout_key,
        tx=optax.adam(LEARNING_RATE),
    )


@jax.jit
def train_step(state, batch):
    dropout_key = jax.random.fold_in(state.key, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return loss, updates

    grad_fn = ab.value_and_grad(loss_fn, has_aux=True, batch=batch)
    (loss, updates), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads)
    state = state.replace(batch_stats=updates["batch_stats"])
    return state, loss


@jax.jit
def evaluate(state, batch):
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def main(steps=TRAIN_STEPS, seed=0):
    train, test = load_data(seed)
    state = create_train_state(seed, train["image"][:1])

    sampling = ab.Sampling(ab.priority_sampler(len(train["label"]), BATCH_SIZE), train, seed=seed)
    for step in range(steps):
        batch = sampling.draw()  # learns from the last step's feedback, then draws K examples
        state, loss = train_step(state, batch)

        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            test_loss, test_accuracy = evaluate(state, test)
            print(
                f"step {step + 1}: train loss {loss:.4f}, test loss {test_loss:.4f}, "
                f"test accuracy {test_accuracy:.4f}"
            )
    return state, float(test_accuracy)


if __name__ == "__main__":
    main()
