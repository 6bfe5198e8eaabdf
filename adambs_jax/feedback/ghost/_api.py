"""Exact per-example gradient norms at about the cost of one backward pass (ghost norms).

For a per-example loss ``loss_fn(params, batch[, key]) -> (K,)`` and weights w (K,) (the
importance weights 1 / (n p) of AdamBS), ``ghost_losses_grad_and_norms`` returns in ONE
forward and ONE backward pass

* the losses loss_k,
* G_hat = d/d params (1/K) sum_k w_k loss_k, the gradient the train step applies, and
* the K exact norms ||d loss_k / d params||_2 of the UNWEIGHTED per-example losses (the
  ``"grad_norm"`` feedback of AdamBS, Liu, Wu, Mozafari, NeurIPS 2020, Algorithm 2).

How: the loss is evaluated per example under ``jax.vmap`` (the same semantics and dropout
keys as ``per_example_grad_norms``: example k gets ``jax.random.split(key, K)[k]``),
every supported layer call is intercepted (``_linen``, ``_nnx``) and a zero
perturbation z is added to its output, and the weighted loss is differentiated w.r.t. z. The
gradient w.r.t. z_k is (w_k / K) b_k with b_k = d loss_k / d output_k; the layer rules
(``ghost.layer_norms``: Goodfellow 2015; Li et al. 2022 ghost clipping; Bu et al. 2023
book-keeping) give from it and the captured layer input each layer's weighted per-example
squared norm, divided by (w_k / K)^2 at the end, and the layer's share of G_hat. A parameter
read by several covered calls (a layer called twice, weights tied across layers, found by
identity) gets the sum of the calls' contributions, cross terms included. Parameters
no rule covers (custom layers, RNN cells under ``scan``, normalization layers, leaves also
read outside their layer) get one copy per example, differentiated too: the gradient w.r.t.
copy k is (w_k / K) times example k's gradient, exact, in the same backward pass (the cost
of ``vmap`` for those parameters only). The squared norms of all parameters add up: exact.

Weights must be non-zero (1 / (n p) always is): an example of weight 0 gets a NaN norm, which
the samplers drop as invalid feedback. Norms are of the gradient before rounding to the
parameters' dtype (bfloat16 parameters: float32 norms of the float32 gradient).

Exact means equal to the ``vmap`` norms and to ``jax.grad``'s G_hat up to the rounding of
the dtype the layers compute in: rtol 1e-4 in float32, 1e-12 in float64 (tested). When the
layers compute in bfloat16 (bfloat16 parameters and inputs), a per-example gradient is only
defined to bfloat16 rounding: ``vmap`` rounds each one to bfloat16, this pass sums products
of the bfloat16 layer inputs and output gradients in float32. The two agree within 1e-2
relative (measured at most 7.3e-3 for the norms, 4.7e-3 for G_hat; bfloat16's resolution is
2^-8 = 3.9e-3).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from adambs_jax._tree_utils import batch_size_of, per_example_norms
from adambs_jax.feedback._losses import PerExampleLoss, check_losses, with_key_argument
from adambs_jax.feedback._per_example import (
    per_example_losses_and_grads,
    vmap_grads_and_weighted_grad,
)
from adambs_jax.feedback.ghost import _linen as linen
from adambs_jax.feedback.ghost import _nnx as nnx
from adambs_jax.feedback.ghost import _sites as sites
from adambs_jax.feedback.ghost._layer_norms import norm_dtype

__all__ = [
    "METHODS",
    "GhostCoverage",
    "ghost_coverage",
    "ghost_losses_grad_and_norms",
    "per_example_grad_norms",
]

METHODS = ("ghost", "vmap", "auto")


class GhostCoverage(NamedTuple):
    """Which parameter leaves (``jax.tree_util.keystr`` paths) take which path: ``ghost``
    (layer rules), ``direct`` (normalization layers, per-example copies) and ``fallback``
    (per-example copies, reported by a warning)."""

    ghost: tuple
    direct: tuple
    fallback: tuple


@contextlib.contextmanager
def _interception(handler):
    with contextlib.ExitStack() as stack:
        stack.enter_context(linen.interception(handler))
        stack.enter_context(nnx.interception(handler))
        yield


def _per_example_keys(key, batch_size):
    if key is None:
        return None, None
    return jax.random.split(key, batch_size), 0


def _one_example_loss(loss, params, example, example_key):
    one = jax.tree.map(lambda leaf: leaf[None], example)
    return check_losses(loss(params, one, example_key), 1)[0]


def _plan(loss, params, batch, keys, key_axis) -> sites.GhostPlan:
    """Records the layer calls of one abstract per-example trace (``sites.Recorder``), then
    uncovers the layers whose leaves are also read elsewhere (``sites.Skipper``)."""
    leaves, treedef = jax.tree.flatten(params)
    recorders = []

    def record(leaf_list, example, example_key):
        recorder = sites.Recorder({id(leaf): i for i, leaf in enumerate(leaf_list)})
        with _interception(recorder):
            value = _one_example_loss(loss, treedef.unflatten(leaf_list), example, example_key)
        recorders.append(recorder)
        return value

    jax.eval_shape(jax.vmap(record, in_axes=(None, 0, key_axis)), leaves, batch, keys)
    recorded, bad_leaves = recorders[0].sites, set(recorders[0].bad_leaves)
    plan = sites.build_plan(recorded, bad_leaves, len(leaves))
    if not plan.perturbed:
        return plan

    def skip(leaf_list, example, example_key):
        with _interception(sites.Skipper(plan, {})):
            return _one_example_loss(loss, treedef.unflatten(leaf_list), example, example_key)

    jaxpr = jax.make_jaxpr(jax.vmap(skip, in_axes=(None, 0, key_axis)))(leaves, batch, keys)
    read_elsewhere = sites.outside_reads(jaxpr, len(leaves)) & plan.covered
    if not read_elsewhere:
        return plan
    return sites.build_plan(recorded, bad_leaves | read_elsewhere, len(leaves))


def _leaf_names(params, indices) -> tuple:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    return tuple(paths[i] for i in sorted(indices))


def _warn_fallback(params, plan) -> None:
    if not plan.fallback:
        return
    names = _leaf_names(params, plan.fallback)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    warnings.warn(
        f"ghost norms: no layer rule covers the parameters {shown}; their per-example "
        f"gradients come from per-example copies (exact, at the cost of vmap for them). "
        f"Covered: linen Dense, DenseGeneral, Conv, Embed, NNX Linear, Conv, Embed (exact "
        f"types, called outside scan/remat, parameters read by no other operation) and "
        f"normalization layers.",
        stacklevel=3,
    )


def ghost_coverage(
    loss_fn: PerExampleLoss, params: Any, batch: Any, key: jax.Array | None = None
) -> GhostCoverage:
    """Which parameters the ghost pass covers by layer rules, directly, or by fallback."""
    loss = with_key_argument(loss_fn)
    keys, key_axis = _per_example_keys(key, batch_size_of(batch))
    plan = _plan(loss, params, batch, keys, key_axis)
    return GhostCoverage(
        _leaf_names(params, plan.covered),
        _leaf_names(params, plan.direct),
        _leaf_names(params, plan.fallback),
    )


def _ghost_pass(loss, params, batch, weights, keys, key_axis, plan):
    """(losses, G_hat, (K,) squared norms) in one backward pass (see the module docstring).

    Autodiff runs w.r.t. the perturbations and the per-example copies only: the covered
    leaves' gradients come from the captured rows (``sites.site_norms_and_grads``), so their
    weight-gradient products are not computed twice (book-keeping, Bu et al. 2023).
    """
    batch_size = weights.shape[0]
    leaves, treedef = jax.tree.flatten(params)
    copies = {
        i: jnp.broadcast_to(leaf, (batch_size,) + jnp.shape(leaf))
        for i, leaf in enumerate(leaves)
        if i not in plan.covered
    }
    zeros = {
        key: jnp.zeros((batch_size,) + site.output.shape, site.output.dtype)
        for key, site in plan.perturbed.items()
    }

    def one_example(copies_, zeros_, example, example_key):
        merged = [copies_[i] if i in copies_ else leaf for i, leaf in enumerate(leaves)]
        perturber = sites.Perturber(plan, zeros_)
        with _interception(perturber):
            value = _one_example_loss(loss, treedef.unflatten(merged), example, example_key)
        return value, perturber.captured

    def weighted_loss(copies_, zeros_):
        losses, captured = jax.vmap(one_example, in_axes=(0, 0, 0, key_axis))(
            copies_, zeros_, batch, keys
        )
        return jnp.mean(weights.astype(losses.dtype) * losses), (losses, captured)

    (_, (losses, captured)), (copy_grads, cotangents) = jax.value_and_grad(
        weighted_loss, argnums=(0, 1), has_aux=True
    )(copies, zeros)
    sq_norms, grads = sites.site_norms_and_grads(
        plan, captured, cotangents, [jnp.shape(leaf) for leaf in leaves]
    )
    for i, g in copy_grads.items():
        g = g.astype(norm_dtype(g.dtype))
        sq_norms.append(jnp.sum(jnp.square(g).reshape(batch_size, -1), axis=1))
        grads[i] = jnp.sum(g, axis=0)
    dtype = jnp.result_type(*sq_norms) if sq_norms else jnp.float32  # float32, or float64
    scale = weights.astype(dtype) / batch_size  # d weighted loss / d loss_k
    # the sum of a non-empty list of arrays: an array (typeshed adds sum's start, 0)
    total = cast(jax.Array, sum(sq_norms)) if sq_norms else jnp.zeros((batch_size,), jnp.float32)
    gradient = treedef.unflatten([grads[i].astype(leaf.dtype) for i, leaf in enumerate(leaves)])
    return losses, gradient, total / jnp.square(scale)


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _vmap_losses_grad_and_norms(loss_fn, params, batch, weights, key):
    """The vmap path: per-example gradients for the norms, G_hat from one more ``jax.grad``."""
    losses, gradient, grads = vmap_grads_and_weighted_grad(loss_fn, params, batch, weights, key)
    return losses, gradient, per_example_norms(grads)


def ghost_losses_grad_and_norms(
    loss_fn: PerExampleLoss,
    params: Any,
    batch: Any,
    weights: jax.Array,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
) -> tuple[jax.Array, Any, jax.Array]:
    """``(losses (K,), G_hat, norms (K,))`` of a per-example loss in one backward pass.

    Args:
      loss_fn: ``(params, batch[, key]) -> (K,)`` or a ``ModelLoss``; called on one example
        at a time (leaves (1, ...)) under ``jax.vmap``, like ``ab.feedback.per_example_losses``.
      params: the parameters (any pytree of float arrays).
      batch: a pytree with leading axis K.
      weights: (K,) non-zero weights w_k; G_hat = d/d params (1/K) sum_k w_k loss_k.
      key: optional PRNG key; example k gets ``jax.random.split(key, K)[k]``.
      method: ``"ghost"`` (layer rules, per-example copies for the rest, with a warning
        naming those), ``"vmap"`` (per-example gradients by ``vmap``, G_hat by one more
        ``jax.grad``) or ``"auto"`` (ghost if a layer rule covers any parameter, else vmap
        without a warning).

    Returns:
      The losses, G_hat (like params) and the exact norms ||d loss_k / d params||_2 (float32;
      float64 for float64 parameters): exact to the rounding of the layers' dtype (rtol 1e-4
      in float32, 1e-12 in float64); in a bfloat16 computation within 1e-2 of the ``vmap``
      norms and of ``jax.grad`` (measured at most 7.3e-3; see the module docstring).
    """
    _check_method(method)
    batch_size = batch_size_of(batch)
    if jnp.shape(weights) != (batch_size,):
        raise ValueError(f"weights must have shape ({batch_size},), got {jnp.shape(weights)}")
    if method == "vmap":
        return _vmap_losses_grad_and_norms(loss_fn, params, batch, weights, key)
    loss = with_key_argument(loss_fn)
    keys, key_axis = _per_example_keys(key, batch_size)
    plan = _plan(loss, params, batch, keys, key_axis)
    if method == "auto" and not plan.covered:
        return _vmap_losses_grad_and_norms(loss_fn, params, batch, weights, key)
    _warn_fallback(params, plan)
    losses, grads, sq_norms = _ghost_pass(loss, params, batch, weights, keys, key_axis, plan)
    return losses, grads, jnp.sqrt(sq_norms)


def per_example_grad_norms(
    loss_fn: PerExampleLoss,
    params: Any,
    batch: Any,
    key: jax.Array | None = None,
    *,
    method: str = "auto",
) -> jax.Array:
    """(K,) exact per-example gradient norms ||d loss_k / d params||_2 over all parameters
    (float32; float64 for float64 parameters).

    The ``"grad_norm"`` feedback of AdamBS (Algorithm 2). ``method``: ``"ghost"`` (per-layer
    ghost norms from one backward pass, ``ghost_losses_grad_and_norms`` with unit weights,
    whose unused G_hat is dropped under ``jit``; parameters no layer rule covers get
    per-example copies, with a warning naming them, at trace time), ``"vmap"`` (norms of
    ``vmap`` per-example gradients, K x params memory) or ``"auto"`` (default: ghost when a
    layer rule covers any parameter, else vmap). All three are exact: they agree to the
    rounding of the dtype the layers compute in (rtol 1e-4 in float32, 1e-12 in float64); in
    a bfloat16 computation only to bfloat16 resolution (within 1e-2, measured at most
    7.3e-3). See ``ghost_losses_grad_and_norms`` for the other arguments.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2 (feedback f = ||g_{i_k}||); Goodfellow, "Efficient Per-Example Gradient
      Computations", 2015; Bu et al., "Differentially Private Optimization on Large Model
      at Small Cost" (book-keeping), ICML 2023.
    """
    _check_method(method)
    if method == "vmap":
        _, grads = per_example_losses_and_grads(loss_fn, params, batch, key)
        return per_example_norms(grads)
    weights = jnp.ones((batch_size_of(batch),), jnp.float32)
    _, _, norms = ghost_losses_grad_and_norms(loss_fn, params, batch, weights, key, method=method)
    return norms
