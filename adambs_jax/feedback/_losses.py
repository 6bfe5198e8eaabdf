"""The per-example loss interface shared by the feedback functions and the train step.

Bandit sampling needs one loss per example, not their mean: the sampler learns from
per-example scores, and the gradient estimate weights each example by 1 / (n p)
(Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. 1).
A loss describes its own call signature, so that no step option changes how it is called:

* ``Loss(fn, takes_key=..., has_aux=False, model_state=False)``: ``fn(params, batch) ->
  losses (K,)``, the usual Flax loss without the final ``.mean()``; with ``takes_key`` it is
  ``fn(params, batch, key)`` and gets a fresh PRNG key every step (dropout); with
  ``has_aux`` it returns ``(losses, aux)``; with ``model_state`` it is ``fn(params, batch,
  key, model_state) -> (losses[, aux], new_model_state)`` (BatchNorm statistics, NNX
  state; ``_model_state``);
* ``ModelLoss(apply_fn, loss_from_outputs, takes_key=..., model_state=False)``: the same
  computation split at the model's outputs (logits): ``apply_fn(params, batch[, key]) ->
  outputs (K, ...)`` and ``loss_from_outputs(outputs, batch) -> losses (K,)``. Only this form
  allows the ``"logit_grad_norm"`` feedback (the norm of d loss_k / d outputs_k);
* a plain callable, shorthand for ``Loss(fn)``: whether it takes the key is read from its
  signature (``takes_key``: three positional parameters), as ``takes_key=None`` does.

``batch`` is any pytree whose leaves have a leading axis K (the gathered rows of the dataset).
Row k of the outputs and loss k must depend on example k only (no batch statistics): per-
example gradients and the logit bound assume it. A model with batch statistics states
``model_state=True``: the step is then computed on the batch as a whole and the per-example
``"grad_norm"`` feedback is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = [
    "Loss",
    "ModelLoss",
    "AnyLoss",
    "as_loss",
    "loss_callable",
    "PerExampleLoss",
    "KEY_NAMES",
    "takes_key",
    "with_key_argument",
    "check_losses",
]

PerExampleLoss = Callable[..., jax.Array]
"""``(params, batch) -> (K,)`` or ``(params, batch, key) -> (K,)``."""


class Loss(NamedTuple):
    """A per-example loss and its call signature: ``fn(params, batch[, key][, model_state])``.

    Attributes:
      fn: ``(params, batch) -> losses (K,)``; ``(params, batch, key) -> ...`` with
        ``takes_key``; returning ``(losses, aux)`` with ``has_aux``; ``(params, batch, key,
        model_state) -> (losses[, aux], new_model_state)`` with ``model_state`` (the key is
        always passed then).
      takes_key: ``fn`` takes the PRNG key (a fresh one each step, e.g. for dropout); None
        (default): read from its signature (three positional parameters, ``takes_key``).
      has_aux: ``fn`` also returns ``aux``, a pytree of arrays of the batched forward; the
        train step reports it as ``metrics["aux"]``.
      model_state: ``fn`` takes and returns the model's state besides ``params`` (linen
        ``batch_stats``, NNX non-``Param`` state); the step keeps the new one
        (``TrainState.model_state``) and computes its gradient on the batch as a whole.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. 1
      (per-example losses).
    """

    fn: Callable[..., Any]
    takes_key: bool | None = None
    has_aux: bool = False
    model_state: bool = False

    def stated(self) -> PerExampleLoss:
        """``fn`` with its key stated, not guessed: ``(params, batch, key)`` or ``(params,
        batch)`` (with ``model_state``, ``fn`` itself: its key is always passed)."""
        if self.model_state or self.takes_key is None:
            return self.fn
        return _stated_key(self.fn, self.takes_key)


class ModelLoss(NamedTuple):
    """A per-example loss split at the model's outputs: loss_k = ell(f(params, x_k), y_k).

    Attributes:
      apply_fn: ``(params, batch) -> outputs`` or ``(params, batch, key) -> outputs``; outputs
        is an array (or pytree of arrays) with leading axis K, typically the logits (the
        pre-activation of the last layer). E.g. ``lambda p, b: model.apply(p, b["x"])``.
      loss_from_outputs: ``(outputs, batch) -> losses (K,)``, row-wise, e.g.
        ``lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])``.
      takes_key: ``apply_fn`` takes the PRNG key as its third argument; None (default):
        read from its signature (three positional parameters, ``takes_key``).
      model_state: ``apply_fn(params, batch, key, model_state) -> (outputs,
        new_model_state)`` (the key is always passed then); the step keeps the new state.
      has_aux: report the model outputs of the batch (the logits: accuracy and other metrics
        without a second forward pass) as the step's ``metrics["aux"]``.

    Calling it, ``ModelLoss(...)(params, batch, key=None)``, returns the (K,) losses.

    References:
      Katharopoulos, Fleuret, "Not All Samples Are Created Equal: Deep Learning with
      Importance Sampling", ICML 2018, §3.3 (the gradient-norm bound from the outputs that
      needs this split); Liu, Wu, Mozafari, NeurIPS 2020, eq. 1 (per-example losses).
    """

    apply_fn: Callable[..., Any]
    loss_from_outputs: Callable[[Any, Any], jax.Array]
    takes_key: bool | None = None
    model_state: bool = False
    has_aux: bool = False

    def outputs(self, params, batch, key: jax.Array | None = None):
        """The model outputs (leading axis K); passes ``key`` iff ``apply_fn`` takes one
        (``takes_key``, or its signature where that is None)."""
        if takes_key(self.apply_fn) if self.takes_key is None else self.takes_key:
            return self.apply_fn(params, batch, key)
        return self.apply_fn(params, batch)

    def __call__(self, params, batch, key: jax.Array | None = None) -> jax.Array:
        return self.loss_from_outputs(self.outputs(params, batch, key), batch)


KEY_NAMES = ("key", "rng", "rngs", "prng_key", "dropout_key")
"""A third positional parameter with a default counts as the key only under these names."""


def takes_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes the PRNG key as a third positional argument (a guess from the
    signature; ``Loss(fn, takes_key=True/False)`` states it instead).

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


AnyLoss = Loss | ModelLoss
"""What the step and the feedback functions take: a ``Loss`` or a ``ModelLoss``."""


def as_loss(loss: Any, *, name: str = "loss_fn") -> AnyLoss:
    """``loss`` as a checked ``Loss`` or ``ModelLoss``: a plain callable is ``Loss(loss)``.

    Raises:
      TypeError: not callable, or a field of the wrong type (the message names it).
    """
    if isinstance(loss, ModelLoss):
        for field in ("apply_fn", "loss_from_outputs"):
            if not callable(getattr(loss, field)):
                raise TypeError(f"{name}.{field} must be callable, got {getattr(loss, field)!r}")
    elif isinstance(loss, Loss):
        if not callable(loss.fn):
            raise TypeError(f"{name}.fn must be callable, got {type(loss.fn).__name__}")
    elif callable(loss):
        loss = Loss(loss)
    else:
        raise TypeError(
            f"{name} must be an ab.Loss, an ab.ModelLoss or a callable (params, batch) -> (K,), "
            f"got {type(loss).__name__}"
        )
    if loss.takes_key is not None and not isinstance(loss.takes_key, bool):
        raise TypeError(f"{name}.takes_key must be None, True or False, got {loss.takes_key!r}")
    for field in ("has_aux", "model_state"):
        if not isinstance(getattr(loss, field), bool):
            raise TypeError(f"{name}.{field} must be a bool, got {getattr(loss, field)!r}")
    return loss


def _stated_key(fn, with_key: bool):
    if with_key:
        return lambda params, batch, key: fn(params, batch, key)
    return lambda params, batch: fn(params, batch)


def loss_callable(loss: AnyLoss) -> PerExampleLoss:
    """What the estimators call: a ``ModelLoss`` itself, a ``Loss``'s ``fn`` with its key
    stated (``Loss.stated``)."""
    return loss if isinstance(loss, ModelLoss) else loss.stated()


def with_key_argument(
    loss_fn: PerExampleLoss | Loss,
) -> Callable[[Any, Any, Any], jax.Array]:
    """``loss_fn`` (a callable, a ``Loss`` of losses only, or a ``ModelLoss``) as
    ``(params, batch, key) -> losses``; the key is dropped if unused.

    Raises:
      TypeError: ``loss_fn`` is not callable, or a ``Loss`` that returns more than the
        losses (``has_aux``, ``model_state``: the per-example tools need the losses alone).
    """
    if isinstance(loss_fn, Loss):
        if loss_fn.has_aux or loss_fn.model_state:
            raise TypeError(
                "loss_fn: this function needs a loss that returns the per-example losses "
                "alone; got an ab.Loss with has_aux or model_state (make_train_step handles "
                "those)"
            )
        loss_fn = loss_fn.stated()
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
    if isinstance(losses, (tuple, list)):
        raise ValueError(
            f"{name} returned a {type(losses).__name__} of {len(losses)}, not the per-example "
            f"losses: a loss that also returns aux says so, ab.Loss(fn, has_aux=True)"
        )
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
