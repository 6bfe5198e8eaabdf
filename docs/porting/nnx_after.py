"""Flax NNX on scikit-learn's digits, in the style of the Flax NNX MNIST tutorial: a CNN with
BatchNorm and Dropout, nnx.Optimizer, nnx.MultiMetric, nnx.jit train and eval steps."""

from functools import partial

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adambs_jax as ab

TRAIN_STEPS = 400
EVAL_EVERY = 100
BATCH_SIZE = 32
LEARNING_RATE = 0.005
MOMENTUM = 0.9


def load_data(seed):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    train = jax.device_put({"image": x_train, "label": y_train})
    test = jax.device_put({"image": x_test, "label": y_test})
    return train, test


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(32, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(2 * 2 * 32, 128, rngs=rngs)
        self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = self.dropout(nnx.relu(self.linear1(x)))
        return self.linear2(x)


def loss_fn(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return loss, logits


@nnx.jit
def train_step(model, optimizer, metrics, batch):
    grad_fn = ab.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads)


@nnx.jit
def eval_step(model, metrics, batch):
    loss, logits = loss_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])


def main(steps=TRAIN_STEPS, seed=0):
    train, test = load_data(seed)
    model = CNN(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE, MOMENTUM), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    history = {f"{s}_{m}": [] for s in ("train", "test") for m in ("loss", "accuracy")}

    sampling = ab.Sampling(ab.exp3_sampler(len(train["label"]), BATCH_SIZE, num_steps=steps), train, seed=seed)
    for step in range(steps):
        batch = sampling.draw()  # learns from the last step's feedback, then draws K examples
        model.train()
        train_step(model, optimizer, metrics, batch)

        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            for metric, value in metrics.compute().items():
                history[f"train_{metric}"].append(float(value))
            metrics.reset()
            model.eval()
            eval_step(model, metrics, test)
            for metric, value in metrics.compute().items():
                history[f"test_{metric}"].append(float(value))
            metrics.reset()
            print(
                f"step {step + 1}: train loss {history['train_loss'][-1]:.4f}, "
                f"test loss {history['test_loss'][-1]:.4f}, "
                f"test accuracy {history['test_accuracy'][-1]:.4f}"
            )
    return model, history


if __name__ == "__main__":
    main()
