"""The per-example loss interface shared by the feedback functions and the train step.

Bandit sampling needs one loss per example, not their mean: the sampler learns from
per-example scores, and the gradient estimate weights each example by 1 / (n p)
(Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. 1).
A loss is therefore either

* a callable ``loss_fn(params, batch) -> losses (K,)`` — the usual Flax loss without the
  final ``.mean()``; or ``loss_fn(params, batch, key) -> losses (K,)`` when the model needs
  randomness (dropout): the train step then passes a fresh PRNG key every step; or
* a ``ModelLoss(apply_fn, loss_from_outputs)`` pair, which splits the same computation at the
  model's outputs (logits): ``apply_fn(params, batch[, key]) -> outputs (K, ...)`` and
  ``loss_from_outputs(outputs, batch) -> losses (K,)``. Only this form allows the
  ``"logit_grad_norm"`` feedback (the norm of d loss_k / d outputs_k), because that needs the
  outputs. A ``ModelLoss`` is itself a loss callable.

``batch`` is any pytree whose leaves have a leading axis K (the gathered rows of the dataset).
Row k of the outputs and loss k must depend on example k only (no batch statistics): per-
example gradients and the logit bound assume it. A model with batch statistics (BatchNorm)
uses ``make_train_step(..., model_state=True)`` (``adambs_jax.model_state``), which computes
the step on the batch as a whole and refuses the per-example ``"grad_norm"`` feedback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = [
    "ModelLoss",
    "PerExampleLoss",
    "KEY_NAMES",
    "takes_key",
    "with_explicit_key",
    "with_key_argument",
    "check_losses",
]

PerExampleLoss = Callable[..., jax.Array]
"""``(params, batch) -> (K,)`` or ``(params, batch, key) -> (K,)``."""


class ModelLoss(NamedTuple):
    """A per-example loss split at the model's outputs: loss_k = ell(f(params, x_k), y_k).

    Attributes:
      apply_fn: ``(params, batch) -> outputs`` or ``(params, batch, key) -> outputs``; outputs
        is an array (or pytree of arrays) with leading axis K, typically the logits (the
        pre-activation of the last layer). E.g. ``lambda p, b: model.apply(p, b["x"])``.
      loss_from_outputs: ``(outputs, batch) -> losses (K,)``, row-wise, e.g.
        ``lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])``.

    Calling it, ``ModelLoss(...)(params, batch, key=None)``, returns the (K,) losses.

    References:
      Katharopoulos, Fleuret, "Not All Samples Are Created Equal: Deep Learning with
      Importance Sampling", ICML 2018, §3.3 (the gradient-norm bound from the outputs that
      needs this split); Liu, Wu, Mozafari, NeurIPS 2020, eq. 1 (per-example losses).
    """

    apply_fn: Callable[..., Any]
    loss_from_outputs: Callable[[Any, Any], jax.Array]

    def outputs(self, params, batch, key: jax.Array | None = None):
        """The model outputs (leading axis K); passes ``key`` iff ``apply_fn`` takes one."""
        if takes_key(self.apply_fn):
            return self.apply_fn(params, batch, key)
        return self.apply_fn(params, batch)

    def __call__(self, params, batch, key: jax.Array | None = None) -> jax.Array:
        return self.loss_from_outputs(self.outputs(params, batch, key), batch)


KEY_NAMES = ("key", "rng", "rngs", "prng_key", "dropout_key")
"""A third positional parameter with a default counts as the key only under these names."""


def takes_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes the PRNG key as a third positional argument (a guess from the
    signature; ``make_train_step(..., loss_takes_key=True/False)`` states it instead).

    Counted are positional parameters without a default, and one with a default only if it
    is named like a key (``KEY_NAMES``): True for ``f(params, batch, key)``, ``f(params,
    batch, key=None)``, ``f(*args)`` and a ``ModelLoss``; False for ``f(params, batch)``,
    ``lambda p, b, model=model: ...`` (a bound loop variable, not a key) and callables whose
    signature cannot be inspected.
    """
    if isinstance(fn, ModelLoss):
        return True
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    num_positional = 0
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ) and (parameter.default is inspect.Parameter.empty or parameter.name in KEY_NAMES):
            num_positional += 1
    return num_positional >= 3


def with_explicit_key(loss_fn: PerExampleLoss, loss_takes_key: bool | None) -> PerExampleLoss:
    """``loss_fn`` with its key argument stated, not guessed (``make_train_step``'s
    ``loss_takes_key``): None keeps ``takes_key``'s guess; True makes it ``(params, batch,
    key)``, False ``(params, batch)``. For a ``ModelLoss`` it applies to ``apply_fn``.

    Raises:
      TypeError: ``loss_takes_key`` is not None or a bool.
    """
    if loss_takes_key is None:
        return loss_fn
    if not isinstance(loss_takes_key, bool):
        raise TypeError(f"loss_takes_key must be None, True or False, got {loss_takes_key!r}")
    if isinstance(loss_fn, ModelLoss):
        return loss_fn._replace(apply_fn=_stated_key(loss_fn.apply_fn, loss_takes_key))
    return _stated_key(loss_fn, loss_takes_key)


def _stated_key(fn, with_key: bool):
    if with_key:
        return lambda params, batch, key: fn(params, batch, key)
    return lambda params, batch: fn(params, batch)


def with_key_argument(loss_fn: PerExampleLoss) -> Callable[[Any, Any, Any], jax.Array]:
    """``loss_fn`` as ``(params, batch, key) -> losses``; the key is dropped if unused.

    Raises:
      TypeError: ``loss_fn`` is not callable.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if takes_key(loss_fn):
        return loss_fn

    def loss_without_key(params, batch, key):
        del key
        return loss_fn(params, batch)

    return loss_without_key


def check_losses(losses: Any, batch_size: int, *, name: str = "loss_fn") -> jax.Array:
    """Checks (at trace time) that ``losses`` has shape (K,) and a floating dtype.

    Raises:
      ValueError: wrong shape, e.g. a scalar mean loss instead of per-example losses.
      TypeError: not a floating-point array.
    """
    shape = jax.numpy.shape(losses)
    if shape != (batch_size,):
        raise ValueError(
            f"{name} must return per-example losses of shape ({batch_size},) (one per example "
            f"of the batch; do not take the mean), got shape {shape}"
        )
    if not jax.numpy.issubdtype(jax.numpy.result_type(losses), jax.numpy.floating):
        raise TypeError(
            f"{name} must return floating-point losses, got {jax.numpy.result_type(losses)}"
        )
    return losses
