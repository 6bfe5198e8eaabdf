"""Tasks and evaluation: the per-example training loss of a model and its jitted evaluation.

A dataset's ``task`` (``"classification"``: softmax cross-entropy with integer labels;
``"binary"``: sigmoid binary cross-entropy; ``"regression"``: squared error (y - out)^2;
``"next_token"``: softmax cross-entropy at every position of a sequence, averaged over the
positions, the error rate likewise) fixes the loss; the training loss is split at the
logits (``ab.ModelLoss``) so that the ``logit_grad_norm`` feedback works, and the
evaluation (mean loss and error rate, in eval mode) runs in bounded memory over any number
of examples and of parameter snapshots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import adambs_jax as ab


def uses_dropout(model) -> bool:
    """Whether a Flax module has a positive ``*dropout*`` field (then it needs a key)."""
    for field in dataclasses.fields(model):
        if "dropout" in field.name:
            value = getattr(model, field.name, 0)
            if isinstance(value, (int, float)) and value > 0:
                return True
    return False


def per_example_loss_from_outputs(task: str) -> Callable:
    """``(outputs, batch) -> (K,)``: softmax CE with integer labels, sigmoid BCE, or the
    squared error, or for ``"next_token"`` the mean over positions of the softmax CE of
    ``(K, T, V)`` logits and ``(K, T)`` labels."""
    if task == "classification":
        return lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]
        )
    if task == "binary":
        return lambda logits, batch: optax.sigmoid_binary_cross_entropy(
            logits, batch["y"].astype(logits.dtype)
        )
    if task == "regression":
        return lambda outputs, batch: jnp.square(outputs - batch["y"].astype(outputs.dtype))
    if task == "next_token":
        return lambda logits, batch: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), axis=-1
        )
    raise ValueError(f"unknown task {task!r}")


def make_model_loss(model, task: str) -> ab.ModelLoss:
    """The per-example training loss split at the logits (so ``logit_grad_norm`` works).

    ``apply_fn(params, batch[, key])`` runs the model in training mode; models with dropout
    get ``rngs={"dropout": key}`` (the step passes a fresh key every step).
    """
    if uses_dropout(model):

        def apply_fn(params, batch, key):
            return model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": key})
    else:

        def apply_fn(params, batch):
            return model.apply({"params": params}, batch["x"], train=True)

    return ab.ModelLoss(apply_fn, per_example_loss_from_outputs(task))


def make_evaluator(model, task: str, batch_size: int) -> Callable:
    """``evaluate(params, x, y) -> (mean loss, error rate)``, jitted, in eval mode (for a
    regression the "error" is the mean squared error, the loss).

    Runs over ``x`` in batches of ``batch_size`` (``lax.map``; the last batch padded and
    masked), so the memory stays bounded on large datasets.
    """
    loss_from_outputs = per_example_loss_from_outputs(task)

    def per_example(params, x, y):
        logits = model.apply({"params": params}, x, train=False)
        losses = loss_from_outputs(logits, {"y": y})
        if task == "next_token":  # the per-example error: the share of wrong positions
            wrong = jnp.mean(jnp.argmax(logits, axis=-1) != y, axis=-1)
        elif task == "classification":
            wrong = jnp.argmax(logits, axis=-1) != y
        elif task == "regression":  # the "error" of a regression: its squared error
            wrong = losses
        else:
            wrong = (logits > 0).astype(jnp.int32) != y
        return losses.astype(jnp.float32), wrong.astype(jnp.float32)

    @jax.jit
    def evaluate(params, x, y):
        num = x.shape[0]
        if num <= batch_size:
            losses, wrong = per_example(params, x, y)
            return jnp.mean(losses), jnp.mean(wrong)
        num_batches = math.ceil(num / batch_size)
        pad = num_batches * batch_size - num
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        ys = jnp.concatenate([y, jnp.zeros((pad, *y.shape[1:]), y.dtype)])
        mask = (jnp.arange(num_batches * batch_size) < num).astype(jnp.float32)
        xs = xs.reshape(num_batches, batch_size, *x.shape[1:])
        ys = ys.reshape(num_batches, batch_size, *y.shape[1:])
        losses, wrong = jax.lax.map(lambda b: per_example(params, *b), (xs, ys))
        mask = mask.reshape(num_batches, batch_size)
        return jnp.sum(losses * mask) / num, jnp.sum(wrong * mask) / num

    return evaluate


def make_stack_evaluator(evaluate: Callable) -> Callable:
    """``evaluate_stack(params_stack, x, y) -> (losses (k,), errors (k,))``, one call for the
    k parameter snapshots of a chunk (``lax.map``: one snapshot at a time in memory)."""

    @jax.jit
    def evaluate_stack(params_stack, x, y):
        return jax.lax.map(lambda params: evaluate(params, x, y), params_stack)

    return evaluate_stack
