"""Layer calls seen while tracing a per-example loss, and which parameters they cover.

The ghost-norm pass (``_api``) traces the loss three times. The first, abstract
trace (``Recorder``) records every call of a supported layer (a *site*: module path, call
number, the layer's rule and configuration, the parameter leaves the layer read, the shape of
its per-example output, and whether it ran in the loss's own trace rather than inside a
``scan``/``remat``/nested transform). ``build_plan`` turns the sites into a ``GhostPlan``:

* a parameter leaf is *covered* (its per-example gradient norm comes from the layer rule) iff
  every call that reads it is a supported call in the loss's own trace — a layer applied
  inside ``nn.scan`` (an RNN cell) or under ``nn.remat`` is not, and neither is an ``Embed``
  whose ``attend`` (tied output layer) is also used;
* the leaves of normalization layers (LayerNorm, BatchNorm, ...) are *direct*: small, they
  get exact per-example gradients through per-example copies, without a warning;
* every other leaf is *fallback*: per-example copies too (exact, the cost of ``vmap`` for
  those leaves only), and reported.

A second abstract trace (``Skipper``) replaces the covered layers' calls by zeros: a covered
leaf still read there is also read outside its layer (e.g. a weight-decay term in the loss, a
weight tied by hand), and its layer falls back too (``outside_reads``).

The real trace (``Perturber``) adds a zero perturbation to the output of each covered site and
captures its input; the perturbation's gradient is the site's (weighted) output gradient, from
which ``site_norms_and_grads`` gives the norms and the covered leaves' share of G_hat.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from adambs_jax.feedback.ghost import _layer_norms as layer_norms

__all__ = [
    "Factor",
    "LayerRule",
    "Site",
    "GhostPlan",
    "Recorder",
    "Perturber",
    "Skipper",
    "build_plan",
    "outside_reads",
    "current_trace",
    "site_norms_and_grads",
]


class Factor(NamedTuple):
    """One parameter's per-example gradient as rows: ``kind`` is ``"matmul"`` (A_k^T B_k,
    left A (K, T, d), right B (K, T, p)), ``"sum"`` (sum_t b_t, left None) or ``"embed"``
    (left tokens (K, T), right B (K, T, F)); see ``_layer_norms``."""

    kind: str
    left: jax.Array | None
    right: jax.Array


class LayerRule(NamedTuple):
    """How one layer class's per-example gradients factor.

    Attributes:
      name: e.g. ``"Dense"``.
      config: ``module -> hashable`` configuration, or None if this instance is unsupported
        (e.g. a convolution with feature groups); then its leaves fall back.
      factors: ``(config, inputs (K, ...), output_grads (K, ...)) -> {param name: Factor}``,
        per-example stacks of one call's first argument and d loss_k / d output_k.
    """

    name: str
    config: Callable[[Any], Any]
    factors: Callable[[Any, jax.Array, jax.Array], dict]


class Site(NamedTuple):
    """One recorded layer call (see the module docstring)."""

    path: str
    call: int
    rule: LayerRule | None  # None: a normalization layer (direct)
    config: Any
    leaves: tuple  # (parameter name, index into the flattened params; -1: not found there)
    output: jax.ShapeDtypeStruct | None  # per-example output
    in_loss_trace: bool

    @property
    def key(self) -> tuple:
        return (self.path, self.call)

    @property
    def leaf_indices(self) -> tuple:
        return tuple(index for _, index in self.leaves)

    @property
    def ghost_able(self) -> bool:
        return (
            self.rule is not None
            and self.config is not None
            and self.in_loss_trace
            and -1 not in self.leaf_indices
            and self.output is not None
        )


class GhostPlan(NamedTuple):
    """Sites to perturb (by key) and the partition of the parameter leaves (indices)."""

    perturbed: dict
    covered: frozenset
    direct: frozenset
    fallback: tuple


def current_trace() -> Any:
    """An opaque token of the innermost JAX trace, comparable with ``==`` (to tell the loss's
    own trace from a nested ``scan`` / ``remat`` / ``jit`` body); as ``flax.core.tracers``."""
    get_state = getattr(jax_core, "get_opaque_trace_state", None)
    if get_state is None:  # pragma: no cover - JAX before 0.10
        get_state = jax.core.get_opaque_trace_state
    return get_state(convention="flax")


class Recorder:
    """Interception handler of the abstract trace: records every site (see ``Site``)."""

    def __init__(self, leaf_ids: dict):
        self.leaf_ids = leaf_ids
        self.loss_trace = current_trace()
        self.sites: list = []
        self.bad_paths: set = set()
        self._calls = collections.Counter()

    def on_call(self, path, rule, config, inputs, call_next, own_leaves):
        del inputs
        outputs = call_next()
        call = self._calls[path]
        self._calls[path] += 1
        indices = tuple(
            (name, self.leaf_ids.get(id(leaf), -1)) for name, leaf in own_leaves().items()
        )
        output = None
        if isinstance(outputs, jax.Array) or hasattr(outputs, "aval"):
            output = jax.ShapeDtypeStruct(jnp.shape(outputs), jnp.result_type(outputs))
        in_loss_trace = current_trace() == self.loss_trace
        self.sites.append(Site(path, call, rule, config, indices, output, in_loss_trace))
        return outputs

    def on_other_method(self, path: str) -> None:
        """A covered layer's parameters used by another method (e.g. ``Embed.attend``)."""
        self.bad_paths.add(path)


class Perturber:
    """Interception handler of the real trace: output + zero perturbation, input captured."""

    def __init__(self, plan: GhostPlan, perturbations: dict):
        self.plan = plan
        self.perturbations = perturbations
        self.captured: dict = {}
        self._calls = collections.Counter()

    def on_call(self, path, rule, config, inputs, call_next, own_leaves):
        del rule, config, own_leaves
        call = self._calls[path]
        self._calls[path] += 1
        if (path, call) not in self.plan.perturbed:
            return call_next()
        self.captured[(path, call)] = inputs
        return call_next() + self.perturbations[(path, call)]

    def on_other_method(self, path: str) -> None:
        del path


class Skipper(Perturber):
    """Interception handler of the reads check: a covered call returns zeros, uncalled."""

    def on_call(self, path, rule, config, inputs, call_next, own_leaves):
        call = self._calls[path]
        self._calls[path] += 1
        site = self.plan.perturbed.get((path, call))
        if site is None:
            return call_next()
        return jnp.zeros(site.output.shape, site.output.dtype)


def outside_reads(jaxpr, num_leaves: int) -> set:
    """Indices of the first ``num_leaves`` inputs of a (closed) jaxpr that any equation or
    output reads (run on the ``Skipper`` trace: reads outside the covered layers)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    position = {var: i for i, var in enumerate(jaxpr.invars[:num_leaves])}
    read = set()
    for var in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
        if isinstance(var, jax_core.Var) and var in position:
            read.add(position[var])
    return read


def build_plan(sites: list, bad_paths: set, num_leaves: int) -> GhostPlan:
    """The ``GhostPlan`` of recorded sites (fixed point: a path is perturbed iff all its calls
    are ghost-able and every leaf it reads is read by perturbed paths only)."""
    readers = collections.defaultdict(set)
    for site in sites:
        for index in site.leaf_indices:
            readers[index].add(site.path)
    ghost_paths = {site.path for site in sites if site.rule is not None} - set(bad_paths)
    ghost_paths -= {site.path for site in sites if site.rule is not None and not site.ghost_able}
    while True:
        covered = {i for i, paths in readers.items() if i >= 0 and paths <= ghost_paths}
        leaky = {
            s.path for s in sites if s.path in ghost_paths and not set(s.leaf_indices) <= covered
        }
        if not leaky:
            break
        ghost_paths -= leaky
    direct_paths = {site.path for site in sites if site.rule is None}
    direct = {
        i for i, paths in readers.items() if i >= 0 and i not in covered and paths <= direct_paths
    }
    fallback = tuple(i for i in range(num_leaves) if i not in covered and i not in direct)
    perturbed = {site.key: site for site in sites if site.path in ghost_paths}
    return GhostPlan(perturbed, frozenset(covered), frozenset(direct), fallback)


def site_norms_and_grads(
    plan: GhostPlan, captured: dict, cotangents: dict, leaf_shapes: list
) -> tuple[list, dict]:
    """``([(K,) squared norms], {leaf index: gradient})`` of the covered leaves.

    ``cotangents`` are the perturbations' gradients (w_k / K) b_k: the squared norms are
    then those of the weighted per-example gradients (divide by (w_k / K)^2), and the
    gradients the covered leaves' share of G_hat. The calls of a path are concatenated
    along the rows (a layer applied twice has g_k = [A1; A2]^T [B1; B2]).
    """
    by_path = collections.defaultdict(list)
    for key, site in plan.perturbed.items():
        by_path[site.path].append(
            (site, site.rule.factors(site.config, captured[key], cotangents[key]))
        )
    sq_norms, grads = [], {}
    for calls in by_path.values():
        indices = dict(calls[0][0].leaves)
        for name in calls[0][1]:
            shape = leaf_shapes[indices[name]]
            sq, total = _factor_norms_and_sum([factors[name] for _, factors in calls], shape)
            sq_norms.append(sq)
            grads[indices[name]] = total.reshape(shape)
    return sq_norms, grads


def _factor_norms_and_sum(factors: list, shape: tuple):
    kind = factors[0].kind
    right = jnp.concatenate([f.right for f in factors], axis=1)
    if kind == "sum":
        return layer_norms.sum_sq_norms_and_sum(right)
    left = jnp.concatenate([f.left for f in factors], axis=1)
    if kind == "matmul":
        return layer_norms.matmul_sq_norms_and_sum(left, right)
    return layer_norms.embed_sq_norms_and_sum(left, right, shape[0])
