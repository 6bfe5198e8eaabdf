"""Layer calls seen while tracing a per-example loss, and which parameters they cover.

The ghost-norm pass (``_api``) traces the loss three times. The first, abstract
trace (``Recorder``) records every call of a supported layer (a *site*: module path, call
number, the layer's rule and configuration, the parameter leaves the layer read, the shapes of
its per-example input and output, and whether it ran in the loss's own trace rather than inside a
``scan``/``remat``/nested transform). ``build_plan`` turns the sites into a ``GhostPlan``:

* a parameter leaf is *covered* (its per-example gradient norm comes from the layer rule) iff
  every call that reads it is a supported call in the loss's own trace — a layer applied
  inside ``nn.scan`` (an RNN cell) or under ``nn.remat`` is not, and neither is an ``Embed``
  whose ``attend`` (tied output layer) is also used. Leaves are identified by identity, not
  by the layer's path: a leaf read by several calls (a layer called twice, two layers sharing
  a weight) is covered if the calls' rows stack (same factor layout), and its per-example
  gradient is the sum of the calls' contributions, sum_s A_s^T B_s = [A_1; A_2; ...]^T [B_1;
  B_2; ...] (cross terms included);
* the leaves of normalization layers (LayerNorm, BatchNorm, ...) are *direct*: small, they
  get exact per-example gradients through per-example copies, without a warning;
* every other leaf is *fallback*: per-example copies too (exact, the cost of ``vmap`` for
  those leaves only), and reported.

A second abstract trace (``Skipper``) replaces the covered layers' calls by zeros: a covered
leaf still read there is also read outside its layers (e.g. a weight-decay term in the loss, a
weight tied by a transpose), and its layers fall back too (``outside_reads``).

The real trace (``Perturber``) adds a zero perturbation to the output of each covered site and
captures its input; the perturbation's gradient is the site's (weighted) output gradient, from
which ``site_norms_and_grads`` gives the norms and the covered leaves' share of G_hat.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core  # jax imports it; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
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
    """One recorded layer call (see the module docstring); ``(path, call)`` identifies the
    call in every trace of the loss, ``leaves`` the parameters it reads (by identity)."""

    path: str
    call: int
    rule: LayerRule | None  # None: a normalization layer (direct)
    config: Any
    leaves: tuple  # (parameter name, index into the flattened params; -1: not found there)
    output: jax.ShapeDtypeStruct | None  # per-example output
    in_loss_trace: bool
    input: jax.ShapeDtypeStruct | None = None  # per-example first argument

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
            and self.input is not None
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


def _shape_of(value) -> jax.ShapeDtypeStruct | None:
    if isinstance(value, jax.Array) or hasattr(value, "aval"):
        return jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value))
    return None


class Recorder:
    """Interception handler of the abstract trace: records every site (see ``Site``) and the
    leaves read by other methods of a covered layer class (``bad_leaves``)."""

    def __init__(self, leaf_ids: dict):
        self.leaf_ids = leaf_ids
        self.loss_trace = current_trace()
        self.sites: list = []
        self.bad_leaves: set = set()
        self._calls = collections.Counter()

    def _indices(self, own_leaves) -> tuple:
        return tuple((name, self.leaf_ids.get(id(leaf), -1)) for name, leaf in own_leaves().items())

    def on_call(self, path, rule, config, inputs, call_next, own_leaves):
        outputs = call_next()
        call = self._calls[path]
        self._calls[path] += 1
        in_loss_trace = current_trace() == self.loss_trace
        self.sites.append(
            Site(
                path,
                call,
                rule,
                config,
                self._indices(own_leaves),
                _shape_of(outputs),
                in_loss_trace,
                _shape_of(inputs),
            )
        )
        return outputs

    def on_other_method(self, own_leaves) -> None:
        """A covered layer's parameters used by another method (e.g. ``Embed.attend``)."""
        self.bad_leaves.update(index for _, index in self._indices(own_leaves) if index >= 0)


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

    def on_other_method(self, own_leaves) -> None:
        del own_leaves


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


# The axis of a factor's rows (left, right): rows of calls reading one leaf stack along it.
_ROW_AXES = {"matmul": (-2, -2), "sum": (None, -2), "embed": (-1, -2)}


def _layout(site: Site, name: str) -> tuple:
    """The kind and the row-less shapes of one parameter's factor at ``site``."""
    rule, site_input, output = site.rule, site.input, site.output
    assert rule is not None and site_input is not None and output is not None  # ghost-able
    example = [jax.ShapeDtypeStruct((1,) + s.shape, s.dtype) for s in (site_input, output)]
    kinds = []

    def factor(inputs, output_grads):
        result = rule.factors(site.config, inputs, output_grads)[name]
        kinds.append(result.kind)
        return result.left, result.right

    left, right = jax.eval_shape(factor, *example)
    axes = _ROW_AXES[kinds[0]]
    shapes = [
        None if x is None else tuple(np.delete(x.shape, axis))
        for x, axis in zip((left, right), axes)
    ]
    return (kinds[0], *shapes)


def _name_of(site: Site, index: int) -> str:
    return next(name for name, i in site.leaves if i == index)


def _unstackable(readers: dict) -> set:
    """Leaves read by several supported calls whose rows do not stack (e.g. one table read as
    an ``Embed`` and as a ``Dense`` kernel): they fall back."""
    unstackable = set()
    for index, sites in readers.items():
        calls = [site for site in sites if site.ghost_able]
        if len(calls) > 1:
            layouts = {_layout(site, _name_of(site, index)) for site in calls}
            if len(layouts) > 1:
                unstackable.add(index)
    return unstackable


def build_plan(sites: list, bad_leaves: set, num_leaves: int) -> GhostPlan:
    """The ``GhostPlan`` of recorded sites (fixed point: a site is perturbed iff it is
    ghost-able and reads covered leaves only; a leaf is covered iff it is not bad and every
    site reading it is perturbed). ``bad_leaves``: indices read outside their layers."""
    readers = collections.defaultdict(list)
    for site in sites:
        for index in site.leaf_indices:
            readers[index].append(site)
    bad = set(bad_leaves) | _unstackable(readers)
    perturbed = {site.key for site in sites if site.ghost_able}
    while True:
        covered = {
            i
            for i, reading in readers.items()
            if i >= 0 and i not in bad and all(site.key in perturbed for site in reading)
        }
        leaky = {s.key for s in sites if s.key in perturbed and not set(s.leaf_indices) <= covered}
        if not leaky:
            break
        perturbed -= leaky
    direct = {
        i
        for i, reading in readers.items()
        if i >= 0 and i not in covered and all(site.rule is None for site in reading)
    }
    fallback = tuple(i for i in range(num_leaves) if i not in covered and i not in direct)
    perturbed_sites = {site.key: site for site in sites if site.key in perturbed}
    return GhostPlan(perturbed_sites, frozenset(covered), frozenset(direct), fallback)


def site_norms_and_grads(
    plan: GhostPlan, captured: dict, cotangents: dict, leaf_shapes: list
) -> tuple[list, dict]:
    """``([(K,) squared norms], {leaf index: gradient})`` of the covered leaves.

    ``cotangents`` are the perturbations' gradients (w_k / K) b_k: the squared norms are
    then those of the weighted per-example gradients (divide by (w_k / K)^2), and the
    gradients the covered leaves' share of G_hat. The calls reading one leaf (a layer applied
    twice, layers sharing a weight) are concatenated along the rows: g_k = sum_s A_s^T B_s =
    [A_1; A_2]^T [B_1; B_2], whose norm has the cross terms.
    """
    by_leaf = collections.defaultdict(list)  # in order of first read
    for key, site in plan.perturbed.items():
        factors = site.rule.factors(site.config, captured[key], cotangents[key])
        indices = dict(site.leaves)
        for name, factor in factors.items():
            by_leaf[indices[name]].append(factor)
    sq_norms, grads = [], {}
    for index, factors in by_leaf.items():
        shape = leaf_shapes[index]
        sq, total = _factor_norms_and_sum(factors, shape)
        sq_norms.append(sq)
        grads[index] = total.reshape(shape)
    return sq_norms, grads


def _factor_norms_and_sum(factors: list, shape: tuple):
    kind = factors[0].kind
    left_axis, right_axis = _ROW_AXES[kind]
    right = jnp.concatenate([f.right for f in factors], axis=right_axis)
    if kind == "sum":
        return layer_norms.sum_sq_norms_and_sum(right)
    left = jnp.concatenate([f.left for f in factors], axis=left_axis)
    if kind == "matmul":
        return layer_norms.matmul_sq_norms_and_sum(left, right)
    return layer_norms.embed_sq_norms_and_sum(left, right, shape[0])
