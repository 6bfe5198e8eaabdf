"""The validated, static configuration of AdamBS Algorithm 2 (``adambs_jax.exp3``).

``exp3_config`` turns the arguments of ``adambs_jax.exp3_sampler`` into a frozen
``Exp3Config``: n, K, p_min, eta0, the bound L's mode (``BOUND_MODES``), the tree's layout, and
``renormalize_every``, the static number of updates after which the weights must be scaled
back (``renormalization_period``, the derivation in its docstring).

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 2 and Lemma 1.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from adambs_jax._checks import check_bool, check_int, check_number
from adambs_jax.samplers import _sumtree as sumtree

__all__ = [
    "INITIAL_LOG_ROOT",
    "LEAF_FLOOR_LOG",
    "MIN_RENORMALIZATION_BUDGET",
    "Exp3Config",
    "exp3_config",
    "renormalization_period",
    "default_step_size",
    "tree_layout",
    "BOUND_MODES",
    "DEFAULT_BOUND_QUANTILE",
    "DEFAULT_BOUND_LEARNING_RATE",
    "EXP3_PRESETS",
    "preset_options",
]

INITIAL_LOG_ROOT = 100 * math.log(2.0)
"""log of the root after ``init`` and after every ``renormalize`` (p is scale-free)."""

LEAF_FLOOR_LOG = -100 * math.log(2.0)
"""No leaf may fall below 2^-100 (far above float32's smallest normal number, 1.2e-38)."""

MIN_RENORMALIZATION_BUDGET = 20.0
"""The smallest budget log(2^100 p_min / 2^-100) (nats of root shrinkage) ``p_min`` may leave."""


BOUND_MODES = ("fixed", "running_max", "quantile")
"""How L is kept: a fixed number, the running max of the valid feedback (the paper), or a
running tau-quantile of it (the default: one outlier cannot set L for good)."""

DEFAULT_BOUND_QUANTILE = 0.9
"""tau of the default "quantile" bound: clipping at the 90th percentile of the feedback
lowers the variance term V(p) (docs/algorithm.md, ``experiments/demo_sampler``)."""

DEFAULT_BOUND_LEARNING_RATE = 0.01
"""eta_L of the "quantile" bound: log L moves by at most eta_L per update."""


EXP3_PRESETS = {
    "paper": {"p_min_times_n": 0.1, "grad_norm_bound": "running_max"},
    "low_variance": {"p_min_times_n": 0.5, "grad_norm_bound": "quantile"},
}
"""Named settings of ``exp3_sampler(..., preset=NAME)``: p_min = ``p_min_times_n`` / n and
the bound L's mode. ``"paper"``: Algorithm 2 as published (p_min = 0.1/n, L = the running
max of the feedback). ``"low_variance"``: p_min = 0.5/n and the clipped bound (L = the
running 0.9-quantile, ``DEFAULT_BOUND_QUANTILE``), the settings docs/algorithm.md found to
lower V(p)/V(uniform) from 1.61 (the paper's settings) to 0.69 (docs/algorithm.md)."""


def preset_options(preset: str | None, num_examples: int, p_min, grad_norm_bound):
    """``(p_min, grad_norm_bound)`` of ``preset`` (``EXP3_PRESETS``) where the caller gave
    None; an explicit value wins. ``preset`` None: both as given.

    Raises:
      ValueError: an unknown preset (the message lists ``EXP3_PRESETS``).
    """
    if preset is None:
        return p_min, grad_norm_bound
    if preset not in EXP3_PRESETS:
        raise ValueError(f"preset must be None or one of {tuple(EXP3_PRESETS)}, got {preset!r}")
    settings = EXP3_PRESETS[preset]
    num_examples = check_int("num_examples", num_examples)
    if p_min is None:
        p_min = settings["p_min_times_n"] / num_examples
    if grad_norm_bound is None:
        grad_norm_bound = settings["grad_norm_bound"]
    return p_min, grad_norm_bound


class Exp3Config(NamedTuple):
    """The validated, static configuration of an ``exp3_sampler`` (see ``exp3_config``).

    Attributes:
      num_examples: n >= 1.
      batch_size: K >= 1.
      p_min: the probability floor, 0 < p_min <= 1/n.
      step_size: eta0 > 0; alpha_p = eta0 p_min^2 / L^2.
      grad_norm_bound: the fixed L > 0 ("fixed" mode), else None (L is kept in the state).
      bound_mode: one of ``BOUND_MODES``.
      bound_quantile: tau in (0, 1) of the "quantile" mode.
      bound_learning_rate: eta_L > 0 of the "quantile" mode (log L moves by <= eta_L).
      stratified: one draw per slice of the mass (True) or i.i.d. draws (False).
      layout: the tree's static ``sumtree.TreeLayout`` (its arity B and level sizes).
      renormalize_every: M >= 1, renormalize at least every M updates; 0: ``update``
        renormalizes itself on every call (the root could shrink too fast for any M).
    """

    num_examples: int
    batch_size: int
    p_min: float
    step_size: float
    grad_norm_bound: float | None
    stratified: bool
    layout: sumtree.TreeLayout
    renormalize_every: int
    bound_mode: str = "running_max"
    bound_quantile: float = DEFAULT_BOUND_QUANTILE
    bound_learning_rate: float = DEFAULT_BOUND_LEARNING_RATE

    @property
    def adaptive_bound(self) -> bool:
        """Whether L is learned from the feedback (no fixed ``grad_norm_bound``)."""
        return self.bound_mode != "fixed"

    @property
    def log_p_min(self) -> float:
        """log p_min: the floor of the log-weights relative to log(root Z)."""
        return math.log(self.p_min)


def default_step_size(num_examples: int, num_steps: int) -> float:
    """eta0 = sqrt(2 log(n) / (n T)): Lemma 1's alpha_p = sqrt(2 R^2 p_min^4 / (n T L^4))
    with R^2 = log n, written as alpha_p = eta0 p_min^2 / L^2."""
    return math.sqrt(2.0 * math.log(max(num_examples, 2)) / (num_examples * num_steps))


def _checked_step_size(num_examples: int, step_size, num_steps) -> float:
    if step_size is None:
        if num_steps is None:
            raise ValueError(
                "exp3_sampler needs step_size (eta0) or num_steps (T), from which the "
                "default eta0 = sqrt(2 log(n) / (n T)) of the paper's Lemma 1 is computed"
            )
        step_size = default_step_size(num_examples, check_int("num_steps", num_steps))
    return check_number("step_size", step_size, positive=True)


def _checked_p_min(num_examples: int, p_min) -> float:
    p_min = check_number("p_min", 0.1 / num_examples if p_min is None else p_min, positive=True)
    if p_min * num_examples > 1 + 1e-12:
        raise ValueError(
            f"p_min * num_examples must be <= 1 (a distribution cannot give every example "
            f"more than 1/n), got p_min={p_min} with num_examples={num_examples}"
        )
    smallest = math.exp(MIN_RENORMALIZATION_BUDGET + LEAF_FLOOR_LOG - INITIAL_LOG_ROOT)
    if p_min < smallest:
        raise ValueError(
            f"p_min={p_min} is too small: a floored leaf p_min x root must stay far above "
            f"float32's smallest number between renormalizations; the smallest allowed p_min "
            f"is {smallest:.3g}"
        )
    return p_min


def renormalization_period(
    num_examples: int, batch_size: int, p_min: float, step_size: float
) -> int:
    """M: how many updates may run between two ``renormalize`` calls (0: every update).

    The root S only shrinks, by the projection's normalizer Z per update, and
    Z >= R + sum_I w_j >= 1 - eta0 (w_j >= p_j (1 - alpha_p h_j), sum_j alpha_p h_j p_j <=
    eta0) and Z >= R >= (n - K) p_min (the unsampled mass), so per update log S falls by at
    most drift = -log max(1 - eta0, (n - K) p_min). A leaf is >= p_min S, and S starts at
    2^100 after each renormalization, so leaves stay >= 2^-100 for budget / drift updates,
    budget = log(2^100 p_min / 2^-100). M takes half of that (and 1% for rounding), so that a
    caller whose count restarts mid-period (a restored checkpoint, a new ``TrainStep``) is
    still safe after M more updates.
    """
    floor = max(1.0 - step_size, (num_examples - batch_size) * p_min)
    if floor <= 0:
        return 0  # the root could fall without bound in one update
    drift = -math.log(min(floor, 1.0))
    budget = INITIAL_LOG_ROOT + math.log(p_min) - LEAF_FLOOR_LOG
    if drift == 0:
        return 2**31 - 1
    return min(int(budget / (2.02 * drift)), 2**31 - 1)


def _checked_bound(grad_norm_bound, bound_quantile, bound_learning_rate) -> dict:
    """The bound's fields of ``Exp3Config``: ``grad_norm_bound`` None means "quantile"."""
    if grad_norm_bound is None:
        grad_norm_bound = "quantile"
    if isinstance(grad_norm_bound, str):
        if grad_norm_bound not in BOUND_MODES[1:]:
            raise ValueError(
                f'grad_norm_bound must be a number > 0 (a fixed L), "running_max" or '
                f'"quantile" (or None: "quantile"), got {grad_norm_bound!r}'
            )
        mode, fixed = grad_norm_bound, None
    else:
        mode, fixed = "fixed", check_number("grad_norm_bound", grad_norm_bound, positive=True)
    quantile = check_number("bound_quantile", bound_quantile)
    if not 0 < quantile < 1:
        raise ValueError(f"bound_quantile must be in (0, 1), got {bound_quantile!r}")
    return dict(
        grad_norm_bound=fixed,
        bound_mode=mode,
        bound_quantile=quantile,
        bound_learning_rate=check_number("bound_learning_rate", bound_learning_rate, positive=True),
    )


def exp3_config(
    num_examples,
    batch_size,
    *,
    p_min,
    step_size,
    num_steps,
    grad_norm_bound,
    stratified,
    arity=None,
    bound_quantile=DEFAULT_BOUND_QUANTILE,
    bound_learning_rate=DEFAULT_BOUND_LEARNING_RATE,
    preset=None,
) -> Exp3Config:
    """Validates the arguments of ``exp3_sampler`` into an ``Exp3Config`` (same meaning; the
    factory's defaults are the only ones), filling in p_min = 0.1 / n, eta0, the tree's
    arity (``sumtree.default_arity()``) and the bound mode ("quantile") where None; a
    ``preset`` (``EXP3_PRESETS``) first fills ``p_min`` and ``grad_norm_bound`` where None.

    Raises:
      ValueError: an argument out of range, named in the message (a tree too large for
        int32 indices names ``num_examples`` and the limit; a ``p_min`` too small for the
        float32 leaves names the smallest allowed; ``grad_norm_bound``, ``bound_quantile``,
        ``bound_learning_rate`` out of range).
      TypeError: ``stratified`` is not a bool.
    """
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    p_min, grad_norm_bound = preset_options(preset, num_examples, p_min, grad_norm_bound)
    p_min = _checked_p_min(num_examples, p_min)
    step_size = _checked_step_size(num_examples, step_size, num_steps)
    bound = _checked_bound(grad_norm_bound, bound_quantile, bound_learning_rate)
    arity = sumtree.default_arity() if arity is None else arity
    return Exp3Config(
        num_examples=num_examples,
        batch_size=batch_size,
        p_min=p_min,
        step_size=step_size,
        stratified=check_bool("stratified", stratified),
        layout=tree_layout(num_examples, arity),
        renormalize_every=renormalization_period(num_examples, batch_size, p_min, step_size),
        **bound,
    )


@functools.lru_cache(maxsize=64)
def tree_layout(num_examples: int, arity: int) -> sumtree.TreeLayout:
    """``sumtree.layout_for`` (cached: the static layout of a state's tree)."""
    return sumtree.layout_for(num_examples, arity)
