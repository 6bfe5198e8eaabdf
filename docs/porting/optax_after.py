"""A hand-written optax loop on scikit-learn's digits: a linen MLP, a per-example loss,
gradient clipping chained before AdamW, and a jax.jit step of its own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import adambs_jax as ab

TRAIN_STEPS = 400
EVAL_EVERY = 100
BATCH_SIZE = 32
LEARNING_RATE = 0.003


def load_data(seed):
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.25, random_state=seed, stratify=y
    )
    train = jax.device_put({"image": x_train, "label": y_train})
    test = jax.device_put({"image": x_test, "label": y_test})
    return train, test


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


model = MLP()
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE, weight_decay=1e-4))


def loss_fn(params, batch):  # per-example losses (K,)
    logits = model.apply(params, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


@jax.jit
def train_step(params, opt_state, batch):
    loss, grads = ab.value_and_grad(loss_fn, feedback=ab.feedback.GradNorm())(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def evaluate(params, batch):
    logits = model.apply(params, batch["image"])
    return loss_fn(params, batch).mean(), jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def main(steps=TRAIN_STEPS, seed=0):
    train, test = load_data(seed)
    params = model.init(jax.random.key(seed), train["image"][:1])
    opt_state = tx.init(params)

    sampling = ab.Sampling(ab.priority_sampler(len(train["label"]), BATCH_SIZE), train, seed=seed)
    for step in range(steps):
        batch = sampling.draw()  # learns from the last step's feedback, then draws K examples
        params, opt_state, loss = train_step(params, opt_state, batch)

        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            test_loss, test_accuracy = evaluate(params, test)
            print(
                f"step {step + 1}: train loss {loss:.4f}, test loss {test_loss:.4f}, "
                f"test accuracy {test_accuracy:.4f}"
            )
    return params, float(test_accuracy)


if __name__ == "__main__":
    main()
