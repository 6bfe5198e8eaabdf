"""The groups sampler: the same bandit over G fixed groups of contiguous examples.

The n examples are cut into G = n / m fixed groups of m = ``group_size`` contiguous
examples, group g = {g m, ..., g m + m - 1}. A per-arm sampler (the "base": exp3, uniform,
or any factory) runs over the G groups and draws B = K / m groups per step; each drawn
group g contributes its m examples. This is Adam-APT of the AdamBS paper (§4.3, Table 1:
adaptive sampling over prefixed mini-batches, after Namkoong et al. 2017) when m = K, and
in general a bandit over contiguous chunks of an on-disk file, so that a drawn batch is
read as B sequential runs of m records instead of K random records.

Weights (the library's convention: every draw k carries probs_k and weight 1 / (n probs_k)).
The base draws groups g_1..g_B i.i.d. from q (G,); ``sample`` returns for every example j
of a drawn group g the probability probs_j = q_g / m, so the step's weight is

    w_j = 1 / (n q_g / m) = m / (n q_g) = 1 / (G q_g)          (n = G m).

Unbiasedness of the step's estimate (1/K) sum_k w_k grad_{i_k} with K = B m:

    E[(1/K) sum_{b=1}^B sum_{j in g_b} grad_j / (G q_{g_b})]
      = (B/K) sum_g q_g (1/(G q_g)) sum_{j in g} grad_j
      = (1/(m G)) sum_g sum_{j in g} grad_j = (1/n) sum_{j=1}^n grad_j,

the full mean gradient, for any q > 0 (``tests/samplers/test_groups.py`` checks it by Monte Carlo).

Feedback (``update``): the K per-example feedback values f_j (gradient norms, or upper
bounds of them) are reduced to one per drawn group, their root mean square

    F_g = sqrt((1/m) sum_{j in g} f_j^2),

because (1) it is an upper bound of the norm of the group's mean gradient gbar_g, the
quantity whose proportional q minimizes the estimate's variance
(1/B) ((1/G^2) sum_g ||gbar_g||^2 / q_g - ||gbar||^2) (gbar: the full mean gradient):
||(1/m) sum_j g_j|| <= (1/m) sum_j ||g_j|| (triangle inequality) <= F_g (power means); the paper
lets an upper bound stand in for the norm (§5); (2) with it the group bandit's objective sum_g F_g^2
/ q_g equals, up to the constant m^2, AdamBS's per-example objective sum_j f_j^2 / p_j restricted to
distributions constant on each group (p_j = q_g / m); (3) with m = 1 it is f itself. A group with
any invalid feedback value (negative, NaN, infinite) gets NaN feedback, which exp3 drops (never
squared into a valid one). With m = 1 the feedback passes unchanged: the sampler is the base sampler
exactly.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
§4.1 (eq. 1), §4.3 and Table 1 (Adam-APT); Namkoong, Sinha, Yadlowsky, Duchi, "Adaptive
Sampling Probabilities for Non-Smooth Optimization", ICML 2017.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import check_int, check_per_draw
from adambs_jax._tree_utils import select
from adambs_jax.samplers._base import Sampler, SamplerStateBase, accepts_apply
from adambs_jax.samplers._exp3 import exp3_sampler
from adambs_jax.samplers._uniform import index_dtype, uniform_sampler

__all__ = [
    "GroupSamplerState",
    "GroupConfig",
    "group_config",
    "BASE_SAMPLERS",
    "build_arm_sampler",
    "group_sampler",
    "expand_groups",
    "group_feedback",
    "drawn_groups",
    "state_distribution",
]

BASE_SAMPLERS = {"exp3": exp3_sampler, "uniform": uniform_sampler}
"""The base samplers by name; ``group_sampler`` also takes a factory ``(G, B, **kw)``."""


@struct.dataclass
class GroupSamplerState(SamplerStateBase):
    """State of ``group_sampler``: the base sampler's state over the G groups.

    ``num_examples`` (n) and ``group_size`` (m) are static, so a state of another dataset
    size does not fit a compiled step (``_checks.check_state_size`` reads ``num_examples``).
    """

    base: Any
    num_examples: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)

    def probabilities(self) -> jax.Array:
        if not isinstance(self.base, SamplerStateBase):
            raise TypeError(
                f"state: the base sampler's state ({type(self.base).__name__}) has no full "
                f"distribution to ask for"
            )
        return state_distribution(self, self.base.probabilities())


class GroupConfig(NamedTuple):
    """The validated sizes: n, K, m, G = n / m groups, B = K / m groups drawn per step."""

    num_examples: int
    batch_size: int
    group_size: int
    num_groups: int
    groups_per_batch: int


def group_config(num_examples: int, batch_size: int, group_size: int) -> GroupConfig:
    """Validates n, K and m (ints >= 1, m dividing both n and K); ValueError naming them."""
    num_examples = check_int("num_examples", num_examples)
    batch_size = check_int("batch_size", batch_size)
    group_size = check_int("group_size", group_size)
    for name, value in (("num_examples", num_examples), ("batch_size", batch_size)):
        if value % group_size:
            raise ValueError(
                f"{name}={value} is not divisible by group_size={group_size}: the groups "
                f"are fixed runs of group_size examples, drawn whole"
            )
    return GroupConfig(
        num_examples, batch_size, group_size, num_examples // group_size, batch_size // group_size
    )


def expand_groups(config: GroupConfig, groups, group_probs):
    """``(indices (K,), probs (K,))``: group g -> g m + (0..m-1), each with q_g / m."""
    m = config.group_size
    offsets = jnp.arange(m, dtype=index_dtype(config.num_examples))
    indices = groups.astype(offsets.dtype)[:, None] * m + offsets
    probs = jnp.repeat(group_probs / m, m, total_repeat_length=config.batch_size)
    return indices.reshape(-1), probs


def drawn_groups(config: GroupConfig, indices):
    """The B groups of the K indices ``sample`` returned: the group of each run's first."""
    return indices[:: config.group_size] // config.group_size


def group_feedback(config: GroupConfig, feedback):
    """F_g = sqrt(mean of f_j^2 over the group's m examples) (B,); NaN for a group with any
    negative, NaN or infinite f_j; f itself when m = 1 (module docstring: why RMS)."""
    feedback = jnp.asarray(feedback, jnp.float32)
    if config.group_size == 1:
        return feedback
    per_group = feedback.reshape(config.groups_per_batch, config.group_size)
    valid = jnp.all(jnp.isfinite(per_group) & (per_group >= 0), axis=1)
    per_group = jnp.where(valid[:, None], per_group, 0.0)
    # scaled by the group's largest value: squares of f above ~1.8e19 overflowed float32 and
    # below ~1e-23 underflowed to 0, and a whole run learned nothing
    scale = jnp.max(per_group, axis=1)
    safe = jnp.where(scale > 0, scale, 1.0)
    rms = safe * jnp.sqrt(jnp.mean(jnp.square(per_group / safe[:, None]), axis=1))
    return jnp.where(valid, rms, jnp.nan)


def build_arm_sampler(
    base: str | Callable[..., Sampler],
    names: dict[str, Callable[..., Sampler]],
    num_arms: int,
    num_draws: int,
    kwargs: dict,
    *,
    arms: str,
    draws: str,
) -> Sampler:
    """The per-arm sampler of a sampler over arms (groups, domains): ``base`` a name in
    ``names`` or a factory, called as ``factory(num_arms, num_draws, **kwargs)`` and checked
    to be a plain ``Sampler`` of that size (``arms``, ``draws``: the words of the errors)."""
    if isinstance(base, str):
        if base not in names:
            raise ValueError(f"base must be one of {sorted(names)} or a factory, got {base!r}")
        factory = names[base]
    elif callable(base):
        factory = base
    else:
        raise TypeError(f"base must be a name or a sampler factory, got {type(base).__name__}")
    sampler = factory(num_arms, num_draws, **kwargs)
    if not isinstance(sampler, Sampler):
        raise TypeError(
            f"base: the factory must return an ab.samplers.Sampler (a scoring sampler "
            f"is not supported over {arms}), got {type(sampler).__name__}"
        )
    if (sampler.num_examples, sampler.batch_size) != (num_arms, num_draws):
        raise ValueError(
            f"base: the factory was called with ({num_arms}, {num_draws}) "
            f"({arms}, {draws}) but built a sampler of ({sampler.num_examples}, "
            f"{sampler.batch_size})"
        )
    return sampler


def _base(base: str | Callable[..., Sampler], config: GroupConfig, kwargs) -> Sampler:
    return build_arm_sampler(
        base,
        BASE_SAMPLERS,
        config.num_groups,
        config.groups_per_batch,
        kwargs,
        arms="groups",
        draws="groups per batch",
    )


def _check_state(config: GroupConfig, state) -> None:
    if not isinstance(state, GroupSamplerState):
        raise TypeError(
            f"state must be a GroupSamplerState (sampler.init()), got {type(state).__name__}"
        )
    if (state.num_examples, state.group_size) != (config.num_examples, config.group_size):
        raise ValueError(
            f"state: built for num_examples={state.num_examples}, group_size="
            f"{state.group_size}, but this sampler has num_examples={config.num_examples}, "
            f"group_size={config.group_size}"
        )


def init(config: GroupConfig, base: Sampler) -> GroupSamplerState:
    return GroupSamplerState(base.init(), config.num_examples, config.group_size)


def sample(config: GroupConfig, base: Sampler, state: GroupSamplerState, key: jax.Array):
    """B groups from the base's q, expanded: ``(indices (K,), probs (K,) = q_g / m)``."""
    _check_state(config, state)
    groups, group_probs = base.sample(state.base, key)
    return expand_groups(config, groups, group_probs)


def update(
    config: GroupConfig, base: Sampler, state: GroupSamplerState, indices, feedback, *, apply=True
) -> GroupSamplerState:
    """The base's update with the drawn groups and their RMS feedback (B,); ``indices``
    must be the K indices ``sample`` returned (runs of m contiguous examples)."""
    _check_state(config, state)
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    groups = drawn_groups(config, indices)
    per_group = group_feedback(config, feedback)
    if accepts_apply(base.update):
        new_base = base.update(state.base, groups, per_group, apply=apply)
    else:  # a user sampler without ``apply``: keep the old state where not applied
        new_base = select(
            jnp.asarray(apply, bool), base.update(state.base, groups, per_group), state.base
        )
    return state.replace(base=new_base)


def state_distribution(state: GroupSamplerState, group_probs) -> jax.Array:
    """p (n,) from the base's q (G,): every example of group g has q_g / m. O(n)."""
    return jnp.repeat(
        group_probs / state.group_size, state.group_size, total_repeat_length=state.num_examples
    )


def probabilities(config: GroupConfig, base: Sampler, state: GroupSamplerState) -> jax.Array:
    """p (n,): every example of group g has q_g / m. O(n)."""
    _check_state(config, state)
    assert base.probabilities is not None  # group_sampler binds this only where the base has one
    return state_distribution(state, base.probabilities(state.base))


def renormalize(base: Sampler, state: GroupSamplerState) -> GroupSamplerState:
    assert base.renormalize is not None  # group_sampler binds this only where the base has one
    return state.replace(base=base.renormalize(state.base))


def group_sampler(
    num_examples: int,
    batch_size: int,
    group_size: int,
    *,
    base: str | Callable[..., Sampler] = "exp3",
    **base_kwargs,
) -> Sampler:
    """A sampler over G = n / m fixed groups of m = ``group_size`` contiguous examples
    (Adam-APT of the AdamBS paper, §4.3), built on any per-arm sampler.

    Args:
      num_examples: n, divisible by ``group_size``.
      batch_size: K, divisible by ``group_size``; B = K / m groups are drawn per step.
      group_size: m >= 1; m = 1 is the base sampler itself.
      base: ``"exp3"`` (``ab.exp3_sampler``), ``"uniform"`` (``ab.uniform_sampler``) or a
        factory ``(num_examples=G, batch_size=B, **base_kwargs) -> ab.samplers.Sampler``.
      **base_kwargs: passed to the base factory (e.g. exp3's ``num_steps``, ``p_min``; they
        are per group: exp3's default p_min is 0.1 / G).

    Returns:
      An ``ab.samplers.Sampler`` over the n examples: ``sample`` gives the B drawn groups'
      K = B m indices (group g -> g m, ..., g m + m - 1, so every run of m is contiguous)
      and probs q_g / m, hence weights 1 / (G q_g) (unbiased: module docstring);
      ``update`` passes the drawn groups and the RMS of each group's feedback to the
      base's ``update`` (with ``apply``); ``probabilities`` (n,), ``renormalize_every`` and
      ``renormalize`` come from the base's (None where the base has none).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.group_sampler(12, 6, 3, num_steps=100)   # 4 groups, 2 drawn
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> [int(i) % 3 for i in indices], [round(float(p), 4) for p in probs[:3]]
      ([0, 1, 2, 0, 1, 2], [0.0833, 0.0833, 0.0833])
      >>> state = sampler.update(state, indices, jnp.ones(6))
      >>> round(float(sampler.probabilities(state).sum()), 5)
      1.0
    """
    config = group_config(num_examples, batch_size, group_size)
    base_sampler = _base(base, config, base_kwargs)
    bind = functools.partial
    return Sampler(
        bind(init, config, base_sampler),
        bind(sample, config, base_sampler),
        bind(update, config, base_sampler),
        config.num_examples,
        config.batch_size,
        probabilities=(
            bind(probabilities, config, base_sampler)
            if base_sampler.probabilities is not None
            else None
        ),
        renormalize_every=base_sampler.renormalize_every,
        renormalize=(
            bind(renormalize, base_sampler) if base_sampler.renormalize is not None else None
        ),
    )
