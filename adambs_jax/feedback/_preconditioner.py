"""The diagonal preconditioner of an adaptive optimizer, read from its optax state.

Adam and RMSProp scale each coordinate of the gradient by 1 / (sqrt(v_hat) + eps), with
v_hat their running estimate of the squared gradient (Adam: bias-corrected,
v_hat = nu / (1 - b2^t) after t updates). The ``"preconditioned_grad_norm"`` feedback is the
norm of the *preconditioned* per-example gradient,

    f_k = || g_k / (sqrt(v_hat) + eps) ||_2,

the size of the step example k would make: the gradient norm ||g_k|| makes p^GN the
variance-optimal distribution for SGD, not for an adaptive method (Lahire), where the
update is the preconditioned gradient.

``second_moments(opt_state)`` finds every second moment in any optax state tree (chains,
``inject_hyperparams``, ``masked``, ``multi_transform``): the ``nu`` of
``optax.ScaleByAdamState`` (bias-corrected with its ``count``), the ``nu_max`` of
``ScaleByAmsgradState`` (already bias-corrected), the ``nu`` of ``ScaleByRmsState`` (no
correction) and of RMSProp's ``bias_correction=True`` state (corrected with its count).
eps, b2 (Adam) and decay (RMSProp with bias correction) are read from an enclosing
``inject_hyperparams`` state where it has them; otherwise the optax defaults
``DEFAULT_EPS`` = 1e-8, ``DEFAULT_B2`` = 0.999, ``DEFAULT_RMS_DECAY`` = 0.9 are assumed
(the plain optax state does not store them). v_hat is the one of the state the step sees
(before this step's update). A parameter no second moment covers (masked out, or given to
another optimizer by ``multi_transform``) enters unscaled. Before the first update (Adam's
count 0, or RMSProp's nu all 0), f_k is the plain gradient norm ||g_k||.

Exact per-example gradients (``jax.vmap``) are needed: ghost norms compute ||g_k|| from
per-layer factors (e.g. ||a_k||^2 ||delta_k||^2 for a dense layer), which a diagonal
preconditioner does not factor through in general, so they cannot give f_k.

References:
  Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (v_hat);
  Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep Learning" (p^GN is optimal
  for SGD, not for adaptive optimizers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from optax._src.transform import ScaleByRmsWithCountState

from adambs_jax._tree_utils import per_example_norms

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_B2",
    "DEFAULT_RMS_DECAY",
    "SecondMoment",
    "second_moments",
    "inverse_preconditioner",
    "preconditioned_norms",
]

DEFAULT_EPS = 1e-8
"""eps of 1 / (sqrt(v_hat) + eps) when the state does not carry it (optax.adam's default)."""

DEFAULT_B2 = 0.999
"""Adam's b2 for the bias correction when the state does not carry it (optax's default)."""

DEFAULT_RMS_DECAY = 0.9
"""RMSProp's decay for its optional bias correction when the state does not carry it."""

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


class SecondMoment(NamedTuple):
    """One second-moment estimate found in an optimizer state.

    Attributes:
      nu_hat: the bias-corrected estimate, a tree like the parameters (``optax.MaskedNode``
        where it does not cover a parameter).
      eps: the eps of 1 / (sqrt(nu_hat) + eps).
      fresh: bool scalar, True before the optimizer's first update.
    """

    nu_hat: Any
    eps: Any
    fresh: ArrayLike  # optax types a state's count broadly (chex.Array), so count == 0 too


def _bias_corrected(nu, count, decay):
    """nu / (1 - decay^count) (count >= 1; count 0 is ``fresh`` and divides by 1)."""
    correction = 1.0 - jnp.power(decay, jnp.maximum(count, 1).astype(jnp.float32))
    return jax.tree.map(lambda v: v / correction.astype(v.dtype), nu)


def _all_zero(nu) -> jax.Array:
    leaves = jax.tree.leaves(nu)
    return jnp.all(jnp.stack([jnp.all(v == 0) for v in leaves])) if leaves else jnp.asarray(True)


def _moment_of(state, hyper: dict):
    """The ``SecondMoment`` of one optax moment state, or None if it is not one."""
    eps = hyper.get("eps", DEFAULT_EPS)
    if isinstance(state, optax.ScaleByAmsgradState):
        return SecondMoment(state.nu_max, eps, state.count == 0)
    if isinstance(state, optax.ScaleByAdamState):
        nu_hat = _bias_corrected(state.nu, state.count, hyper.get("b2", DEFAULT_B2))
        return SecondMoment(nu_hat, eps, state.count == 0)
    if isinstance(state, ScaleByRmsWithCountState):
        nu_hat = _bias_corrected(state.nu, state.count, hyper.get("decay", DEFAULT_RMS_DECAY))
        return SecondMoment(nu_hat, eps, state.count == 0)
    if isinstance(state, optax.ScaleByRmsState):
        return SecondMoment(state.nu, eps, _all_zero(state.nu))
    return None


def _walk(state, hyper: dict) -> Iterator[SecondMoment]:
    if isinstance(state, _INJECT_STATES):  # its hyperparameters hold eps, b2 if injected
        yield from _walk(state.inner_state, {**hyper, **dict(state.hyperparams)})
        return
    moment = _moment_of(state, hyper)
    if moment is not None:
        yield moment
    elif isinstance(state, (tuple, list)):  # chains, MaskedState, other NamedTuples
        for inner in state:
            yield from _walk(inner, hyper)
    elif isinstance(state, dict):  # multi_transform's inner states
        for inner in state.values():
            yield from _walk(inner, hyper)


def second_moments(opt_state) -> list[SecondMoment]:
    """Every second-moment estimate in ``opt_state``, in tree order (module docstring)."""
    return list(_walk(opt_state, {}))


def inverse_preconditioner(params, opt_state):
    """``(scale, fresh)``: scale = 1 / (sqrt(v_hat) + eps), a tree like ``params`` (1 where no
    second moment covers a parameter: the first moment that covers a leaf wins), and
    ``fresh`` (bool scalar: no update yet).

    Raises:
      ValueError: ``opt_state`` holds no second moment (e.g. ``optax.sgd``).
    """
    moments = second_moments(opt_state)
    if not moments:
        raise ValueError(
            'feedback="preconditioned_grad_norm" needs an optimizer with a second-moment '
            "estimate (optax.adam, adamw, amsgrad, rmsprop, ...: an optax ScaleByAdamState, "
            "ScaleByAmsgradState or ScaleByRmsState in its state); this optimizer's state has "
            'none (e.g. optax.sgd). Use feedback="grad_norm" with it'
        )

    def leaf_scale(param, *nus):
        for moment, nu in zip(moments, nus):
            if not isinstance(nu, optax.MaskedNode):
                return 1.0 / (jnp.sqrt(nu) + jnp.asarray(moment.eps, nu.dtype))
        return jnp.ones_like(param)

    scale = jax.tree.map(leaf_scale, params, *(m.nu_hat for m in moments))
    fresh = jnp.all(jnp.stack([jnp.asarray(m.fresh) for m in moments]))
    return scale, fresh


def preconditioned_norms(per_example_grads, params, opt_state) -> jax.Array:
    """(K,) f_k = ||g_k / (sqrt(v_hat) + eps)||_2 of per-example gradients (leaves (K, ...)),
    or ||g_k|| before the optimizer's first update (module docstring)."""
    scale, fresh = inverse_preconditioner(params, opt_state)
    scaled = jax.tree.map(lambda g, s: g * s.astype(g.dtype), per_example_grads, scale)
    return jnp.where(fresh, per_example_norms(per_example_grads), per_example_norms(scaled))
