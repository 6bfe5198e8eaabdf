"""The model's own state and auxiliary outputs in the train step: what a loss returns besides
its per-example losses, computed on the batch as a whole.

A real training loop carries more than parameters: Flax linen's mutable collections
(``batch_stats`` of ``BatchNorm``), NNX's non-``Param`` graph state (``BatchStat``, the
``RngState`` counters of ``nnx.Rngs``), EMA parameters, a loader position. A
``Loss(fn, model_state=True)`` is

    fn(params, batch, key, model_state) -> (losses (K,), new_model_state)

(``has_aux=True`` too: ``-> (losses, aux, new_model_state)``), a ``ModelLoss(...,
model_state=True)`` has ``apply_fn(params, batch, key, model_state) -> (outputs,
new_model_state)``; a ``Loss(fn, has_aux=True)`` alone is ``fn(params, batch[, key]) ->
(losses, aux)``.

G_hat = grad (1/K) sum_k w_k loss_k (Liu, Wu, Mozafari, NeurIPS 2020, eq. 1) is then the
gradient of one batched forward pass of the weighted loss (batch statistics over the batch,
as in plain Flax training), and the new model state and ``aux`` come from the same batched
forward at the same parameters, key and model state (a forward that XLA shares with the
gradient's where the computations coincide). A per-example computation (``vmap`` for the
exact ``"grad_norm"`` feedback, ghost or not) would see batches of one and per-example batch
statistics, so ``make_train_step`` refuses ``"grad_norm"`` with model state at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core  # jax imports it; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np

from adambs_jax._tree_utils import batch_size_of
from adambs_jax.feedback._losses import AnyLoss, ModelLoss, PerExampleLoss, with_key_argument

__all__ = [
    "LossParts",
    "loss_parts",
    "check_model_state_options",
    "batch_coupling",
    "check_examples_independent",
]


class LossParts(NamedTuple):
    """A loss split for one step.

    Attributes:
      losses_only: ``(params, batch, key) -> (K,)`` (a ``ModelLoss`` for a ``ModelLoss``),
        what the estimators differentiate.
      extras: ``(params, batch, key) -> (aux, new_model_state)`` (either None when not
        asked), or None when the loss returns nothing else.
    """

    losses_only: PerExampleLoss
    extras: Callable[[Any, Any, Any], tuple[Any, Any]] | None


def check_model_state_options(
    loss: AnyLoss, feedback_name: str, scoring: bool, *, per_example_feedback: bool = False
) -> None:
    """The build-time refusals of a loss's ``has_aux`` / ``model_state`` (``make_train_step``).

    Raises:
      ValueError: a feedback kind that evaluates examples one at a time
        (``per_example_feedback``: ``"grad_norm"``, ``"preconditioned_grad_norm"``) with
        model state (per-example gradients would compute per-example batch statistics),
        model state with a scoring sampler (it scores subsets of examples).
    """
    if not loss.model_state:
        return
    if per_example_feedback:  # the kind evaluates the model one example at a time
        raise ValueError(
            f'feedback="{feedback_name}" with a model_state loss is ill-defined: the exact '
            "per-example gradient norms evaluate the model one example at a time, so batch "
            'statistics (BatchNorm) would be per-example; use feedback="logit_grad_norm" '
            '(with a ModelLoss) or feedback="loss"'
        )
    if scoring:
        raise ValueError(
            "a model_state loss with a ScoringSampler is not supported: the sampler scores "
            "subsets of examples, which would change batch statistics"
        )


def loss_parts(loss: AnyLoss, state: Any) -> LossParts:
    """``loss`` split into the losses the estimators differentiate and the extras
    (``aux``, the new model state) of the same batched forward, at model state ``state``."""
    if isinstance(loss, ModelLoss):
        return _model_loss_parts(loss, state)
    fn, has_aux = loss.stated(), loss.has_aux
    if loss.model_state:

        def call(p, b, k):
            return fn(p, b, k, state)

        def extras(p, b, k):
            out = call(p, b, k)
            return (out[1], out[2]) if has_aux else (None, out[1])

        return LossParts(lambda p, b, k: call(p, b, k)[0], extras)
    if has_aux:
        keyed = with_key_argument(fn)  # not `call`: the def above declares that name
        return LossParts(
            lambda p, b, k: _losses_and_aux(keyed(p, b, k))[0],
            lambda p, b, k: (_losses_and_aux(keyed(p, b, k))[1], None),
        )
    return LossParts(fn, None)


def _losses_and_aux(out):
    """A ``has_aux`` loss's ``(losses, aux)``, or an error that says what it returned."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        what = (
            f"a {type(out).__name__} of {len(out)}"
            if isinstance(out, (tuple, list))
            else f"an array of shape {jnp.shape(out)}"
        )
        raise ValueError(
            f"loss_fn: with has_aux=True the loss must return (losses, aux), got {what}"
        )
    return out


def _model_loss_parts(loss: ModelLoss, state: Any) -> LossParts:
    """A ``ModelLoss`` split: with ``model_state`` its ``apply_fn`` gets the state and returns
    the new one; with ``has_aux`` the outputs of the batch are the aux."""
    has_aux = loss.has_aux
    if loss.model_state:
        apply_fn = loss.apply_fn
        losses_only = loss._replace(
            apply_fn=lambda p, b, k: apply_fn(p, b, k, state)[0],
            takes_key=True,
            model_state=False,
            has_aux=False,
        )

        def extras(p, b, k):
            outputs, new_state = apply_fn(p, b, k, state)
            return (outputs if has_aux else None), new_state

        return LossParts(losses_only, extras)
    if has_aux:
        plain = loss._replace(has_aux=False)
        return LossParts(plain, lambda p, b, k: (plain.outputs(p, b, k), None))
    return LossParts(loss, None)


def batch_extras(parts: LossParts, params, batch, key):
    """``(aux, new_model_state)`` of the batch, with no gradient flowing into them."""
    if parts.extras is None:
        return None, None
    aux, new_state = parts.extras(params, batch, key)
    _check_arrays("aux", aux)
    return jax.lax.stop_gradient((aux, new_state))


def _check_arrays(name: str, tree) -> None:
    """Raises TypeError naming the first leaf of ``tree`` that is not an array or a number
    (a string in the aux, say), instead of JAX's error without a path."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
            raise TypeError(
                f"loss_fn: {name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}; the "
                f"{name} must be a pytree of arrays (it is returned from the jitted step)"
            )


COUPLING_RTOL = 1e-4
"""How much example 0's loss may move when the rest of its batch changes (float rounding)."""


def _varied_batches(batch):
    """The batch, and two copies whose rows 1..K-1 are all row 1, or all row K-1: the
    statistics of a batch change, example 0 does not."""

    def rows_from(source_row):
        return jax.tree.map(lambda leaf: leaf.at[1:].set(leaf[source_row]), batch)

    return batch, rows_from(1), rows_from(-1)


def batch_coupling(losses_fn: PerExampleLoss, params, batch, key) -> jax.Array:
    """The largest relative change of example 0's loss when the other examples of its batch
    change (0 for a loss whose row k depends on example k only). Jittable; the same key for
    every evaluation, so dropout masks do not count as a change."""
    call = with_key_argument(losses_fn)
    first = [call(params, b, key)[0] for b in _varied_batches(batch)]
    scale = jnp.abs(first[0]) + 1e-6
    return jnp.max(jnp.abs(jnp.stack(first[1:]) - first[0])) / scale


def check_examples_independent(losses_fn: PerExampleLoss, params, batch, key, *, why: str):
    """Raises ValueError when the per-example losses of ``batch`` depend on the rest of the
    batch (a model with batch statistics, BatchNorm in training mode, whose state the loss
    discards). Host side, on concrete arrays, once: one jitted call of three forward passes.

    ``why``: what evaluates the examples one at a time (the feedback kind or the scoring
    sampler), for the message.
    """
    if batch_size_of(batch) < 2 or any(
        isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((params, batch))
    ):
        return  # one example, or traced inside the caller's own jit: nothing to compare
    change = float(jax.jit(batch_coupling, static_argnums=0)(losses_fn, params, batch, key))
    if change > COUPLING_RTOL:
        raise ValueError(
            f"loss_fn: the loss of one example changed by a factor {change:.3g} when the other "
            f"examples of its batch changed: the model couples the examples of a batch "
            f"(BatchNorm in training mode, say). {why} evaluates the model one example at a "
            f"time, so it would compute per-example batch statistics: a silently wrong "
            f"gradient. Describe the model state, ab.Loss(fn, model_state=True) or "
            f"ab.ModelLoss(..., model_state=True), and use feedback='loss' or "
            f"'logit_grad_norm'; or make the loss per-example (BatchNorm in inference mode)"
        )
