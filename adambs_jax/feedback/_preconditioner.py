"""The diagonal preconditioner of an adaptive optimizer, from its optax state and the
hyperparameters it was built with.

An adaptive optimizer scales each coordinate of its (momentum) gradient by a diagonal
preconditioner P computed from v, its running estimate of the squared gradient. The
``"preconditioned_grad_norm"`` feedback is the norm of the *preconditioned* per-example
gradient,

    f_k = || P * g_k ||_2,

the size of the step example k would make: the gradient norm ||g_k|| makes p^GN the
variance-optimal distribution for SGD, not for an adaptive method (Lahire), whose update is
the preconditioned gradient. P, as optax computes it (elementwise; t the optimizer's count):

* Adam, AdamW, NAdam, LAMB, RAdam (``optax.scale_by_adam`` / ``scale_by_radam``,
  ``ScaleByAdamState``; Kingma & Ba, Algorithm 1): v_t = b2 v_{t-1} + (1 - b2) g_t^2,
  v_hat = v_t / (1 - b2^t), P = 1 / (sqrt(v_hat + eps_root) + eps);
* AMSGrad (``ScaleByAmsgradState``; Reddi, Kale, Kumar): P = 1 / (sqrt(v_max + eps_root) +
  eps), v_max the running maximum of v_hat that optax keeps (no b2 needed);
* RMSProp (``ScaleByRmsState``; Tieleman & Hinton): P = 1 / sqrt(v + eps) with optax's
  default ``eps_in_sqrt=True``, P = 1 / (sqrt(v) + eps) with ``eps_in_sqrt=False`` (PyTorch);
  with ``bias_correction=True`` (``ScaleByRmsWithCountState``) v is first divided by
  1 - decay^t; centered RMSProp (``ScaleByRStdDevState``; Graves, §4) uses
  v - m^2, m the running mean of g (bias-corrected the same way).

Transforms after the preconditioner (learning rate, weight decay, LAMB's trust ratio,
RAdam's rectification factor) are no part of f_k. Before the first update (count 0, or
RMSProp's v all 0) f_k is the plain ||g_k||. A parameter no second moment covers (masked
out, or given to another optimizer by ``multi_transform``) enters unscaled.

Where the hyperparameters come from. An optax state records v, not b2, eps or eps_root, and
none of them can be assumed (b2 = 0.95 instead of 0.999 scales f_k by about 0.15; eps = 1e-3
instead of 1e-8 changes the ranking of the examples):

1. ``optax.inject_hyperparams`` keeps them in its state: they are read from there, at every
   step, under optax's argument names (``b2``/``decay``, ``eps``, ``eps_root``);
2. otherwise the user states them on the feedback,
   ``ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8)`` (``Stated``); without them the
   feedback is refused, with that fix in the message. ``eps_root`` is 0 unless stated (every
   optax alias defaults to 0), and ``eps_in_sqrt`` (RMSProp) must be stated;
3. what the optimizer object shows is checked when the step is built
   (``inspect_optimizer``): optax's transforms are recognized by the code of their update
   functions, found through the closures of ``chain``, ``masked``, ``multi_transform``,
   ``inject_hyperparams``, ``MultiSteps``, ... A stated value that differs from the one a
   transform was built with is refused, naming both; so are Adamax, Yogi and ADOPT, whose
   ``ScaleByAdamState`` holds no Adam second moment (Adamax: the infinity norm
   u_t = max(b2 u_{t-1}, |g_t| + eps), no square root). A ``ScaleByAdamState`` is used only
   when the optimizer shows it is Adam's (or ``kind="adam"`` is stated): the state type alone
   cannot tell Adam from Adamax. The closures are only checked against, never read as the
   values: they are optax's internals, not its interface.

Refused as well: an optimizer without a second moment (``optax.sgd``), and a parameter
covered by more than one second moment (e.g. ``chain(adam, rmsprop)``).

Exact per-example gradients (``jax.vmap``) are needed: ghost norms compute ||g_k|| from
per-layer factors (e.g. ||a_k||^2 ||delta_k||^2 for a dense layer), which a diagonal
preconditioner does not factor through in general, so they cannot give f_k.

References:
  Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (v_hat, Algorithm 1;
  AdaMax, §7.1); Reddi, Kale, Kumar, "On the Convergence of Adam and Beyond", ICLR 2018
  (AMSGrad); Tieleman, Hinton, Lecture 6.5 "RMSProp", COURSERA 2012; Graves, "Generating
  Sequences With Recurrent Neural Networks", 2013 (centered RMSProp); Lahire, "Non-Uniform
  Sampling and Adaptive Optimizers in Deep Learning" (p^GN is optimal for SGD, not for
  adaptive optimizers).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import jax
import jax.core  # jax imports it; named here so type checkers see jax.core
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
from optax._src.transform import (
    ScaleByRmsWithCountState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
)

from adambs_jax._checks import check_bool, check_number
from adambs_jax._tree_utils import per_example_norms

__all__ = [
    "KINDS",
    "DEFAULT_EPS",
    "DEFAULT_B2",
    "DEFAULT_RMS_DECAY",
    "Stated",
    "NOTHING_STATED",
    "check_stated",
    "Transform",
    "OptimizerFacts",
    "inspect_optimizer",
    "check_against_optimizer",
    "SecondMoment",
    "second_moments",
    "inverse_preconditioner",
    "preconditioned_norms",
]

KINDS = ("adam", "amsgrad", "rmsprop")
"""The second moments the feedback reads: Adam's (``ScaleByAdamState``, also AdamW, NAdam,
LAMB, RAdam), AMSGrad's (``ScaleByAmsgradState``) and RMSProp's (``ScaleByRmsState`` and its
bias-corrected and centered variants)."""

DEFAULT_EPS = 1e-8
"""optax's default eps of Adam and RMSProp: shown in messages, never assumed."""

DEFAULT_B2 = 0.999
"""optax's default b2 of Adam: shown in messages, never assumed."""

DEFAULT_RMS_DECAY = 0.9
"""optax's default decay of RMSProp: shown in messages, never assumed."""

_FEEDBACK = "ab.feedback.PreconditionedGradNorm"
_NAMES = ("b2", "eps", "eps_root", "eps_in_sqrt")
_RTOL = 1e-6  # a float32 copy of a stated value is the same value


# ------------------------------------------------------------------- what the user states


class Stated(NamedTuple):
    """The hyperparameters stated on the feedback (None: not stated).

    Attributes:
      kind: ``"adam"``, ``"amsgrad"`` or ``"rmsprop"``: the optimizer's second moment
        (needed only where the optimizer cannot show it: an Adam ``ScaleByAdamState`` behind
        an optimizer this module cannot see through).
      b2: the decay of the second moment's moving average (Adam's b2, RMSProp's ``decay``),
        for the bias correction 1 / (1 - b2^t).
      eps: the eps of the preconditioner.
      eps_root: the eps inside Adam's and AMSGrad's square root (None: 0, optax's default).
      eps_in_sqrt: RMSProp's eps inside (True, optax's default) or outside the root.
    """

    kind: str | None = None
    b2: float | None = None
    eps: float | None = None
    eps_root: float | None = None
    eps_in_sqrt: bool | None = None


NOTHING_STATED = Stated()
"""The default: every hyperparameter read from the state (``inject_hyperparams``) or refused."""


def check_stated(stated: Stated) -> Stated:
    """``stated`` validated, numbers as floats.

    Raises:
      ValueError / TypeError: a value out of range or of the wrong type, naming it.
    """
    kind, b2, eps, eps_root, eps_in_sqrt = stated
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if b2 is not None:
        b2 = check_number("b2", b2)
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"b2 must be in [0, 1), got {b2!r}")
    if eps is not None:
        eps = check_number("eps", eps, nonnegative=True)
    if eps_root is not None:
        eps_root = check_number("eps_root", eps_root, nonnegative=True)
    if eps_in_sqrt is not None:
        check_bool("eps_in_sqrt", eps_in_sqrt)
    if kind == "rmsprop" and eps_root:
        raise ValueError(
            "eps_root is the eps inside Adam's and AMSGrad's square root; RMSProp has none "
            "(its eps_in_sqrt=True puts eps itself inside the root)"
        )
    if kind in ("adam", "amsgrad") and eps_in_sqrt:
        raise ValueError(
            f"eps_in_sqrt=True is RMSProp's; {kind} adds eps outside the square root "
            "(its eps_root goes inside)"
        )
    return Stated(kind, b2, eps, eps_root, eps_in_sqrt)


def _fix(stated: Stated, needed: dict) -> str:
    """``feedback=ab.feedback.PreconditionedGradNorm(...)`` with the stated and ``needed``
    fields."""
    fields = {n: getattr(stated, n) for n in _NAMES if getattr(stated, n) is not None}
    fields.update(needed)
    if stated.kind is not None:
        fields["kind"] = stated.kind
    args = ", ".join(f"{n}={fields[n]!r}" for n in (*_NAMES, "kind") if n in fields)
    return f"feedback={_FEEDBACK}({args})"


def _same(a: float | bool, b: float | bool) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return math.isclose(float(a), float(b), rel_tol=_RTOL, abs_tol=0.0)


# ---------------------------------------------------------- what the optimizer object shows


class Transform(NamedTuple):
    """An optax transform with a second-moment-like state, found in an optimizer.

    Attributes:
      name: e.g. ``"optax.scale_by_adam"``, ``"optax.inject_hyperparams(optax.adam)"``.
      kind: one of ``KINDS``, or ``"adamax"``, ``"yogi"``, ``"adopt"`` (refused).
      built_with: the hyperparameters it was built with, where they can be seen (the
        feedback's names: ``b2`` is RMSProp's ``decay``; and ``bias_correction``).
      injected: the names ``inject_hyperparams`` keeps in the state (read at every step).
      scheduled: the injected names that follow a schedule.
    """

    name: str
    kind: str
    built_with: dict
    injected: frozenset = frozenset()
    scheduled: frozenset = frozenset()


class OptimizerFacts(NamedTuple):
    """What ``inspect_optimizer`` found.

    Attributes:
      transforms: the recognized transforms, in the order found.
      unidentified: the parts that may keep a second moment but were not recognized
        (an ``inject_hyperparams`` of a factory of your own, a transform of your own that
        builds an optax moment state, closures too large to inspect).
    """

    transforms: tuple[Transform, ...]
    unidentified: tuple[str, ...]


_ADAM_NAMES = {"b2": "b2", "eps": "eps", "eps_root": "eps_root"}
_RMS_NAMES = {
    "b2": "decay",
    "eps": "eps",
    "eps_in_sqrt": "eps_in_sqrt",
    "bias_correction": "bias_correction",
}
_REFUSED = {
    "adamax": "Adamax keeps in its ScaleByAdamState the infinity norm "
    "u_t = max(b2 u_{t-1}, |g_t| + eps) and divides by u_t itself (Kingma & Ba, §7.1): "
    "no second moment, no square root",
    "yogi": "Yogi keeps in its ScaleByAdamState the additive estimate "
    "v_t = v_{t-1} - (1 - b2) sign(v_{t-1} - g_t^2) g_t^2, not Adam's moving average",
    "adopt": "ADOPT divides the gradient by the previous, uncorrected second moment before "
    "its momentum, not the momentum by v_hat",
}
_STATE_NAMES = frozenset(
    {
        "ScaleByAdamState",
        "ScaleByAmsgradState",
        "ScaleByRmsState",
        "ScaleByRmsWithCountState",
        "ScaleByRStdDevState",
        "ScaleByRStdDevWithCountState",
    }
)


def _known_transforms():
    """``{update code: (name, kind, names)}`` and the codes of their init functions."""
    rows = [
        (optax.scale_by_adam, "optax.scale_by_adam", "adam", _ADAM_NAMES),
        (optax.scale_by_radam, "optax.scale_by_radam", "adam", _ADAM_NAMES),
        (optax.scale_by_amsgrad, "optax.scale_by_amsgrad", "amsgrad", _ADAM_NAMES),
        (optax.scale_by_rms, "optax.scale_by_rms", "rmsprop", _RMS_NAMES),
        (optax.scale_by_stddev, "optax.scale_by_stddev", "rmsprop", _RMS_NAMES),
        (optax.scale_by_adamax, "optax.scale_by_adamax", "adamax", {}),
        (optax.scale_by_yogi, "optax.scale_by_yogi", "yogi", {}),
        (optax.contrib.scale_by_adopt, "optax.contrib.scale_by_adopt", "adopt", {}),
    ]
    updates, inits = {}, set()
    for factory, name, kind, names in rows:
        transform = factory()
        updates[transform.update.__code__] = (name, kind, names)
        inits.add(transform.init.__code__)
    return updates, frozenset(inits)


def _known_factories():
    """``{factory: (name, kind, names)}``: what ``inject_hyperparams`` may wrap."""
    table = {}
    for kind, names, factories in (
        ("adam", _ADAM_NAMES, ("adam", "adamw", "nadam", "nadamw", "radam", "lamb")),
        ("adam", _ADAM_NAMES, ("scale_by_adam", "scale_by_radam")),
        ("amsgrad", _ADAM_NAMES, ("amsgrad", "scale_by_amsgrad")),
        ("rmsprop", _RMS_NAMES, ("rmsprop", "scale_by_rms", "scale_by_stddev")),
        ("adamax", {}, ("adamax", "adamaxw", "scale_by_adamax")),
        ("yogi", {}, ("yogi", "scale_by_yogi")),
    ):
        for factory in factories:
            table[getattr(optax, factory)] = (f"optax.{factory}", kind, names)
    for factory in ("adopt", "scale_by_adopt"):
        table[getattr(optax.contrib, factory)] = (f"optax.contrib.{factory}", "adopt", {})
    return table


def _inject_codes():
    wrapped = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    # optax types init and update as protocols; inject_hyperparams builds plain functions
    functions = (cast(types.FunctionType, wrapped.init), cast(types.FunctionType, wrapped.update))
    return frozenset(fn.__code__ for fn in functions)


_TRANSFORM_CODES, _TRANSFORM_INIT_CODES = _known_transforms()
_FACTORIES = _known_factories()
_INJECT_CODES = _inject_codes()
_MAX_OBJECTS = 20_000
_LEAF_TYPES = (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic)


def _reachable_functions(root) -> tuple[list, bool]:
    """The Python functions reachable from ``root`` through closures, defaults, partials,
    bound methods (and their objects), ``__wrapped__``, containers and callable objects;
    and whether the walk was complete (it stops after ``_MAX_OBJECTS`` objects)."""
    seen: set[int] = set()
    stack, functions = [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (*_LEAF_TYPES, jax.Array, type, types.ModuleType)):
            continue
        seen.add(id(obj))
        if len(seen) > _MAX_OBJECTS:
            return functions, False
        if isinstance(obj, types.FunctionType):
            functions.append(obj)
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
            stack.extend(v for k, v in vars(obj).items() if k == "__wrapped__")
        elif isinstance(obj, types.MethodType):
            stack.extend((obj.__func__, obj.__self__))
        elif isinstance(obj, functools.partial):
            stack.extend((obj.func, *obj.args, *obj.keywords.values()))
        elif isinstance(obj, (tuple, list, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__wrapped__"):  # jax.jit and functools.wraps wrappers
            stack.append(obj.__wrapped__)
        elif callable(obj) or hasattr(obj, "gradient_transformation"):
            stack.extend(getattr(obj, "__dict__", {}).values())  # MultiSteps, your classes
    return functions, True


def _closure(fn) -> dict:
    values = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            values[name] = cell.cell_contents
        except ValueError:
            pass
    return values


def _readable(value):
    """A hyperparameter as a float or bool, or None where it is not a concrete scalar."""
    if isinstance(value, bool):
        return value
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        if np.ndim(value) == 0 and np.isrealobj(value):
            return float(value)
    except TypeError:
        pass
    return None


def _built_with(values: dict, names: dict) -> dict:
    found = {}
    for ours, theirs in names.items():
        if theirs in values and _readable(values[theirs]) is not None:
            found[ours] = _readable(values[theirs])
    return found


def _transform_values(fn) -> dict:
    """The closure of an optax transform's update function, with the closures of its own
    helpers (``scale_by_radam``'s eps sits in its ``_radam_update``)."""
    prefix = fn.__qualname__.split("<locals>")[0]
    values = {}
    for value in _closure(fn).values():
        if isinstance(value, types.FunctionType) and value.__qualname__.startswith(prefix):
            values.update(_closure(value))
    values.update(_closure(fn))
    return values


def _names_a_moment_state(code: types.CodeType) -> bool:
    if _STATE_NAMES.intersection(code.co_names):
        return True
    return any(isinstance(c, types.CodeType) and _names_a_moment_state(c) for c in code.co_consts)


def _factory(obj) -> tuple | None:
    """``(name, kind, names)`` of a known optax factory, or None."""
    try:
        return _FACTORIES.get(obj)
    except TypeError:  # unhashable
        return None


def _qualname(obj) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def inspect_optimizer(optimizer) -> OptimizerFacts:
    """The optax transforms with a second-moment-like state that ``optimizer`` is built
    from, and the parts that could not be recognized (module docstring, point 3).

    optax's own transforms are recognized by the code of their update functions, found
    through the closures of the combinators (``chain``, ``masked``, ``multi_transform``,
    ``inject_hyperparams``, ``apply_if_finite``, ``MultiSteps``, ...), with the values they
    were built with; an ``inject_hyperparams`` by its factory (``optax.adam``, ...).
    """
    functions, complete = _reachable_functions(optimizer)
    transforms, unidentified, injects = [], [], {}
    if not complete:
        unidentified.append(f"closures of more than {_MAX_OBJECTS} objects (not inspected)")
    for fn in functions:
        code = fn.__code__
        if code in _TRANSFORM_CODES:
            name, kind, names = _TRANSFORM_CODES[code]
            transforms.append(Transform(name, kind, _built_with(_transform_values(fn), names)))
        elif code in _INJECT_CODES:  # its init and update functions share these objects
            values = _closure(fn)
            record = injects.setdefault(id(values["sched_hps"]), {})
            record.update(values)
        elif code in _TRANSFORM_INIT_CODES or _factory(fn) is not None:
            continue
        elif _names_a_moment_state(code):
            unidentified.append(f"{fn.__module__}.{fn.__qualname__}")
    for record in injects.values():
        factory = record["inner_factory"]
        known = _factory(factory)
        if known is None:
            unidentified.append(f"optax.inject_hyperparams({_qualname(factory)})")
            continue
        name, kind, names = known
        numeric, scheduled = record.get("numeric_hps", {}), record.get("sched_hps", {})
        values = {**record.get("other_hps", {}), **numeric}
        transforms.append(
            Transform(
                f"optax.inject_hyperparams({name})",
                kind,
                _built_with(values, names),
                frozenset(n for n, t in names.items() if t in numeric or t in scheduled),
                frozenset(n for n, t in names.items() if t in scheduled),
            )
        )
    return OptimizerFacts(tuple(transforms), tuple(dict.fromkeys(unidentified)))


def _needed(kind: str, bias_correction: bool | None) -> tuple[str, ...]:
    """The stated hyperparameters a second moment of ``kind`` needs (eps_root: 0 unless
    stated)."""
    if kind == "adam":
        return ("b2", "eps")
    if kind == "amsgrad":
        return ("eps",)
    return ("b2", "eps", "eps_in_sqrt") if bias_correction else ("eps", "eps_in_sqrt")


def _used(transform: Transform) -> tuple[str, ...]:
    """The hyperparameters P of ``transform`` depends on (RMSProp's decay only with its bias
    correction, AMSGrad's b2 not at all: its v_max is corrected already)."""
    if transform.kind == "adam":
        return ("b2", "eps", "eps_root")
    if transform.kind == "amsgrad":
        return ("eps", "eps_root")
    if transform.built_with.get("bias_correction") is False:
        return ("eps", "eps_in_sqrt")
    return ("b2", "eps", "eps_in_sqrt")


def _hint(kind: str, name: str, built_with: dict):
    """What to suggest for ``name``: the value the optimizer was built with, where seen,
    else optax's default (the message says which)."""
    if name in built_with:
        return built_with[name]
    defaults = {"b2": DEFAULT_RMS_DECAY if kind == "rmsprop" else DEFAULT_B2}
    defaults.update(eps=DEFAULT_EPS, eps_in_sqrt=True)
    return defaults[name]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _missing_message(what: str, missing: dict, stated: Stated, seen: bool) -> str:
    where = (
        "the values this optimizer was built with"
        if seen
        else "the values your optimizer uses (shown: optax's defaults)"
    )
    return (
        f"feedback {_FEEDBACK}: {_listed(list(missing))} of {what} "
        f"{'is' if len(missing) == 1 else 'are'} not known: optax states do not "
        f"record hyperparameters (only optax.inject_hyperparams keeps them in its state), "
        f"and no default is assumed. State {where}: {_fix(stated, missing)}"
    )


def check_against_optimizer(stated: Stated, facts: OptimizerFacts) -> None:
    """The checks of a step's build: ``stated`` against what the optimizer shows.

    Raises:
      ValueError: the optimizer has Adamax, Yogi or ADOPT; a stated value differs from the
        one a transform was built with (naming both) or is stated for a scheduled injected
        one; a stated ``kind`` the optimizer does not have; a hyperparameter a recognized
        transform needs that is neither injected nor stated (with the fix).
    """
    for transform in facts.transforms:
        if transform.kind in _REFUSED:
            raise ValueError(
                f"feedback {_FEEDBACK} cannot precondition with {transform.name}: "
                f'{_REFUSED[transform.kind]}. Use feedback="grad_norm" with it, or an '
                f"optimizer with a second moment (optax.adam, amsgrad, rmsprop)"
            )
    usable = [t for t in facts.transforms if t.kind in KINDS]
    kinds = sorted({t.kind for t in usable})
    if stated.kind is not None and kinds and stated.kind not in kinds and not facts.unidentified:
        names = ", ".join(dict.fromkeys(t.name for t in usable))
        raise ValueError(
            f"feedback {_FEEDBACK}(kind={stated.kind!r}): the optimizer's second moments are "
            f"those of {names} (kind {', '.join(map(repr, kinds))})"
        )
    for name in _NAMES:  # one stated value cannot be right for two different built ones
        built = [
            t.built_with[name]
            for t in usable
            if name in _used(t) and name not in t.injected and name in t.built_with
        ]
        distinct = [v for i, v in enumerate(built) if not any(_same(v, w) for w in built[:i])]
        if len(distinct) > 1:
            raise ValueError(
                f"feedback {_FEEDBACK}: the optimizer's second moments were built with "
                f"different {name} ({', '.join(map(repr, sorted(distinct)))}), and one "
                "feedback states one value. Give each its own through "
                "optax.inject_hyperparams (each state then carries its own, read at every "
                'step), or use feedback="grad_norm"'
            )
    for transform in usable:
        for name in _used(transform):
            _check_value(stated, transform, name)
    for transform in usable:
        hints = _missing_hints(stated, transform)
        if hints:
            seen = all(n in transform.built_with for n in hints)
            raise ValueError(_missing_message(transform.name, hints, stated, seen))


def _missing_hints(stated: Stated, transform: Transform) -> dict:
    """``{name: hint}`` of what ``transform`` needs that is neither stated nor injected."""
    needed = _needed(transform.kind, transform.built_with.get("bias_correction"))
    return {
        n: _hint(transform.kind, n, transform.built_with)
        for n in needed
        if getattr(stated, n) is None and n not in transform.injected
    }


def _check_value(stated: Stated, transform: Transform, name: str) -> None:
    value = getattr(stated, name)
    built = transform.built_with.get(name)
    if name in transform.injected:
        if value is not None and name in transform.scheduled:
            raise ValueError(
                f"feedback {_FEEDBACK}({name}={value!r}): {transform.name} follows a schedule "
                f"for {name}, read from its state at every step; do not state it"
            )
        if value is not None and built is not None and not _same(value, built):
            raise ValueError(
                f"feedback {_FEEDBACK}({name}={value!r}) differs from the {name}={built!r} "
                f"{transform.name} keeps in its state (read at every step): drop {name}= or "
                f"state {built!r}"
            )
        return
    how = "stated"
    if value is None and name == "eps_root" and transform.kind != "rmsprop":
        value, how = 0.0, "the default"  # checked like a stated value
    if value is not None and built is not None and not _same(value, built):
        raise ValueError(
            f"feedback {_FEEDBACK}: {name}={value!r} ({how}) differs from the {name}={built!r} "
            f"the optimizer's {transform.name} was built with; state the optimizer's: "
            f"{_fix(stated, {**_missing_hints(stated, transform), name: built})}"
        )


# ------------------------------------------------------------------- what the state holds


class SecondMoment(NamedTuple):
    """One second-moment state found in an optimizer state.

    Attributes:
      state: the optax state (``ScaleByAdamState``, ``ScaleByAmsgradState``,
        ``ScaleByRmsState``, ... ).
      injected: the hyperparameters of the enclosing ``inject_hyperparams`` states (the
        innermost wins), by optax's names.
    """

    state: Any
    injected: dict


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
_STATE_KINDS = (
    (optax.ScaleByAmsgradState, "amsgrad", "optax.amsgrad's ScaleByAmsgradState"),
    (optax.ScaleByAdamState, "adam", "a ScaleByAdamState"),
    (ScaleByRmsWithCountState, "rmsprop", "optax.rmsprop's ScaleByRmsWithCountState"),
    (optax.ScaleByRmsState, "rmsprop", "optax.rmsprop's ScaleByRmsState"),
    (ScaleByRStdDevWithCountState, "rmsprop", "optax.rmsprop's ScaleByRStdDevWithCountState"),
    (ScaleByRStdDevState, "rmsprop", "optax.rmsprop's ScaleByRStdDevState"),
)


def _has_count(state) -> bool:
    """Whether an optax moment state keeps its update count (a field; every tuple has a
    ``count`` method)."""
    return "count" in type(state)._fields


def _state_kind(state) -> tuple[str, str] | None:
    for state_type, kind, description in _STATE_KINDS:
        if isinstance(state, state_type):
            return kind, description
    return None


def _walk(state, injected: dict) -> Iterator[SecondMoment]:
    if isinstance(state, _INJECT_STATES):  # its hyperparameters hold b2, eps, ... if injected
        yield from _walk(state.inner_state, {**injected, **dict(state.hyperparams)})
        return
    if _state_kind(state) is not None:
        yield SecondMoment(state, injected)
    elif isinstance(state, (tuple, list)):  # chains, MaskedState, other NamedTuples
        for inner in state:
            yield from _walk(inner, injected)
    elif isinstance(state, dict):  # multi_transform's inner states
        for inner in state.values():
            yield from _walk(inner, injected)


def second_moments(opt_state) -> list[SecondMoment]:
    """Every second-moment state in ``opt_state``, in tree order."""
    return list(_walk(opt_state, {}))


def _concrete(value) -> float | None:
    return None if isinstance(value, jax.core.Tracer) else _readable(value)


class _Resolved(NamedTuple):
    kind: str
    b2: Any
    eps: Any
    eps_root: Any
    eps_in_sqrt: bool | None


def _resolve(moment: SecondMoment, stated: Stated, facts: OptimizerFacts | None) -> _Resolved:
    """The hyperparameters of one second moment: injected (read from the state), else
    stated; refused where neither, or where they contradict each other."""
    known = _state_kind(moment.state)
    assert known is not None  # second_moments yields states of a known kind only
    kind, description = known
    if stated.kind is not None and stated.kind != kind:
        raise ValueError(
            f"feedback {_FEEDBACK}(kind={stated.kind!r}): the optimizer state holds "
            f"{description}, a second moment of kind {kind!r}"
        )
    counted = _has_count(moment.state)
    names = _RMS_NAMES if kind == "rmsprop" else _ADAM_NAMES
    values, missing = {}, {}
    for name in _needed(kind, counted) + ("eps_root",):
        if name == "eps_root" and kind == "rmsprop":
            continue
        theirs, value = names.get(name), getattr(stated, name)
        if theirs in moment.injected:
            injected = moment.injected[theirs]
            concrete = _concrete(injected)
            if value is not None and concrete is not None and not _same(value, concrete):
                raise ValueError(
                    f"feedback {_FEEDBACK}({name}={value!r}) differs from the "
                    f"{theirs}={concrete!r} optax.inject_hyperparams keeps in the optimizer "
                    f"state: drop {name}= or state {concrete!r}"
                )
            value = injected
        if value is None and name == "eps_root":
            value = 0.0
        if value is None:
            missing[name] = _hint(kind, name, {})
        values[name] = value
    if kind == "adam" and stated.kind != "adam":
        _check_adam_identified(facts, stated, missing)
    if missing:
        raise ValueError(_missing_message(description, missing, stated, seen=False))
    return _Resolved(
        kind, values.get("b2"), values["eps"], values.get("eps_root"), values.get("eps_in_sqrt")
    )


def _check_adam_identified(facts: OptimizerFacts | None, stated: Stated, missing: dict) -> None:
    """A ``ScaleByAdamState`` is Adam's only where the optimizer shows it (Adamax and Yogi
    keep other things in the same state type) or ``kind="adam"`` is stated."""
    if facts is None:
        why = (
            "no optimizer was given to tell (ab.feedback.preconditioned_grad_norms(..., "
            "optimizer=tx) shows it)"
        )
    elif facts.unidentified:
        why = f"parts of this optimizer could not be recognized ({', '.join(facts.unidentified)})"
    elif not any(t.kind == "adam" for t in facts.transforms):
        why = "no Adam transform was found in this optimizer"
    else:
        return
    raise ValueError(
        f"feedback {_FEEDBACK}: the optimizer state holds a ScaleByAdamState, which optax "
        f"uses for Adam's second moment and for Adamax's infinity norm and Yogi's estimate "
        f"alike, and {why}. If it is Adam's (adam, adamw, nadam, lamb, radam), state it"
        f"{' with the values of the optimizer (shown: optax defaults)' if missing else ''}: "
        f"{_fix(stated._replace(kind='adam'), missing)}"
    )


def _scale_of(moment: SecondMoment, hyper: _Resolved):
    """``(P, fresh)``: P = the preconditioner as a tree like the state's moments
    (``optax.MaskedNode`` where it does not cover a parameter), fresh: no update yet."""
    state = moment.state
    count = state.count if _has_count(state) else None

    def corrected(tree, decay):  # tree / (1 - decay^t) (t >= 1; t = 0 is fresh)
        if count is None:
            return tree
        correction = 1.0 - jnp.power(decay, jnp.maximum(count, 1).astype(jnp.float32))
        return jax.tree.map(lambda v: v / correction.astype(v.dtype), tree)

    def adam_scale(v):
        return 1.0 / (jnp.sqrt(v + jnp.asarray(hyper.eps_root, v.dtype)) + hyper_eps(v))

    def hyper_eps(v):
        return jnp.asarray(hyper.eps, v.dtype)

    def rms_scale(v):
        if hyper.eps_in_sqrt:
            return jax.lax.rsqrt(v + hyper_eps(v))
        return 1.0 / (jnp.sqrt(v) + hyper_eps(v))

    if hyper.kind == "amsgrad":
        return jax.tree.map(adam_scale, state.nu_max), state.count == 0
    if hyper.kind == "adam":
        return jax.tree.map(adam_scale, corrected(state.nu, hyper.b2)), state.count == 0
    nu = corrected(state.nu, hyper.b2)
    if hasattr(state, "mu"):  # centered: the variance v - m^2
        mu = corrected(state.mu, hyper.b2)
        nu = jax.tree.map(lambda v, m: v - jnp.square(jnp.abs(m)), nu, mu)
    fresh = state.count == 0 if count is not None else _all_zero(state.nu)
    return jax.tree.map(rms_scale, nu), fresh


def _all_zero(nu) -> jax.Array:
    leaves = jax.tree.leaves(nu)
    return jnp.all(jnp.stack([jnp.all(v == 0) for v in leaves])) if leaves else jnp.asarray(True)


def inverse_preconditioner(
    params, opt_state, stated: Stated = NOTHING_STATED, facts: OptimizerFacts | None = None
):
    """``(P, fresh)``: P the preconditioner (module docstring) as a tree like ``params``
    (1 where no second moment covers a parameter), ``fresh`` (bool scalar: no update yet).

    Args:
      params: the parameters; opt_state: the optimizer's state.
      stated: the hyperparameters stated on the feedback.
      facts: ``inspect_optimizer`` of the optimizer (None: not known, and a
        ``ScaleByAdamState`` needs ``kind="adam"`` stated).

    Raises:
      ValueError: no second moment (e.g. ``optax.sgd``); one that cannot be identified or
        whose hyperparameters are neither injected nor stated (naming the fix); stated and
        injected values that differ; a parameter covered by more than one second moment.
    """
    moments = second_moments(opt_state)
    if not moments:
        raise ValueError(
            f'feedback {_FEEDBACK} ("preconditioned_grad_norm") needs an optimizer with a '
            "second-moment estimate (optax.adam, adamw, amsgrad, rmsprop, ...: an optax "
            "ScaleByAdamState, ScaleByAmsgradState or ScaleByRmsState in its state); this "
            'optimizer\'s state has none (e.g. optax.sgd). Use feedback="grad_norm" with it'
        )
    scales, fresh = [], []
    for moment in moments:
        scale, is_fresh = _scale_of(moment, _resolve(moment, stated, facts))
        scales.append(scale)
        fresh.append(jnp.asarray(is_fresh))

    def leaf_scale(path, param, *covering):
        found = [s for s in covering if not isinstance(s, optax.MaskedNode)]
        if len(found) > 1:
            raise ValueError(
                f"feedback {_FEEDBACK}: parameter {jax.tree_util.keystr(path)} is covered by "
                f"{len(found)} second moments of the optimizer (e.g. chain(adam, rmsprop)); "
                'its preconditioner is not one diagonal: use feedback="grad_norm"'
            )
        if not found:
            return jnp.ones_like(param)
        if jnp.shape(found[0]) != jnp.shape(param):
            raise ValueError(
                f"feedback {_FEEDBACK}: the optimizer's second moment of parameter "
                f"{jax.tree_util.keystr(path)} has shape {jnp.shape(found[0])}, the parameter "
                f"{jnp.shape(param)}: not a diagonal preconditioner of it"
            )
        return found[0]

    scale = jax.tree_util.tree_map_with_path(leaf_scale, params, *scales)
    return scale, jnp.all(jnp.stack(fresh))


def preconditioned_norms(
    per_example_grads,
    params,
    opt_state,
    stated: Stated = NOTHING_STATED,
    facts: OptimizerFacts | None = None,
) -> jax.Array:
    """(K,) f_k = ||P * g_k||_2 of per-example gradients (leaves (K, ...)), or ||g_k|| before
    the optimizer's first update (module docstring; arguments as ``inverse_preconditioner``)."""
    scale, fresh = inverse_preconditioner(params, opt_state, stated, facts)
    scaled = jax.tree.map(lambda g, s: g * s.astype(g.dtype), per_example_grads, scale)
    return jnp.where(fresh, per_example_norms(per_example_grads), per_example_norms(scaled))
