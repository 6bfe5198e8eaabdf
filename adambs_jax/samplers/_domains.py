"""The domain sampler: a bandit over D domains of unequal sizes, uniform within each domain.

For corpora too large to keep one weight per example, the n examples are partitioned into
D domains (sources, languages, tasks, shards) of sizes n_1..n_D >= 1, laid out contiguously:
domain d holds the examples [o_d, o_d + n_d), o_d = n_1 + ... + n_{d-1}
(``contiguous_domains`` turns a domain id per example into this layout once, on the host).
A per-arm sampler (the "base": exp3 as in online data mixing, priority, uniform, or any
factory) keeps a mixture q over the D domains. Each of the K draws is independent:

    d_k ~ q (the base's draw),   i_k = o_{d_k} + u_k,   u_k ~ Uniform{0, ..., n_{d_k} - 1},

so example j of domain d is drawn with probability p_j = q_d / n_d, the probs ``sample``
returns, and the library's weight is

    w_j = 1 / (n p_j) = n_d / (n q_d).

Unbiasedness of the step's estimate (1/K) sum_k w_k g_{i_k}: one draw's expectation is

    sum_d q_d sum_{j in d} (1/n_d) g_j n_d / (n q_d) = (1/n) sum_j g_j,

the full mean gradient, for any q > 0 (``tests/samplers/test_domains.py`` checks it by Monte
Carlo with domains of 1 to 10^6 examples).

Feedback (``update``). The variance of one draw's estimate is

    E||w g||^2 - ||gbar||^2 = (1/n^2) sum_d n_d^2 S_d^2 / q_d - ||gbar||^2,
    S_d^2 = (1/n_d) sum_{j in d} ||g_j||^2,

minimized over the simplex by q_d proportional to n_d S_d. Each domain d drawn in the batch
therefore gets one feedback value

    F_d = (n_d / nbar) RMS_d,   RMS_d = sqrt(mean of f_k^2 over the batch's valid draws of d),

nbar = n / D: RMS_d^2 is an unbiased estimate of S_d^2 when f_k = ||g_{i_k}|| (the draws of
d are uniform within d); the size factor makes the base's variance-optimal point (exp3's
stationary point: q_d proportional to F_d, AdamBS §4.2) the one above, and it is 1 for equal
sizes. With feedback that does not vary, q tends to q_d = n_d / n: plain example-uniform
training. A domain drawn c_d times passes F_d with each of its c_d draws (the copies agree),
so exp3's estimate h_d = l_d c_d / (K q_d) is the one of Algorithm 2. Invalid feedback
(negative, NaN, infinite, or of an index outside [0, n)) is left out of its domain's RMS; a
domain with no valid draw in the batch gets NaN, which the base drops (exp3 imputes the
batch's typical value, priority keeps the old score): it never enters the state. The RMS is
scaled by the domain's largest value, so feedback of any float32 scale neither overflows
nor underflows when squared.

Memory: O(D) (the base's state over the D arms and the offsets (D + 1,) int32), whatever n.
Per step: O(K log K + K log D) plus the base's O(K log D) (the domain of an index is a
binary search in the offsets). Indices are int32: n = n_1 + ... + n_D must be at most
2^31 - 1 (refused by name otherwise). The initial mixture is the base's (uniform over the
domains for exp3 and priority, as online data mixing starts), not n_d / n.

Relation to ``group_sampler``: with D equal sizes m, p (n,) of a base state is the same
(q_g / m per example), but the draws are not: a group sampler reads each drawn group whole
(a contiguous run of m), this one draws K independent examples. With every n_d = 1 it is
the base sampler itself (same draws from the same key, same updates).

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
§4.1 (eq. 1), §4.2 and Algorithm 2; Albalak, Pan, Raffel, Wang, "Efficient Online Data
Mixing For Language Model Pre-Training", 2023 (EXP3 over data domains); Katharopoulos,
Fleuret, "Not All Samples Are Created Equal", ICML 2018 (variance-optimal importance
sampling).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from flax import struct

from adambs_jax._checks import check_int, check_key, check_per_draw
from adambs_jax._tree_utils import select
from adambs_jax.samplers._base import Sampler, SamplerStateBase, accepts_apply
from adambs_jax.samplers._exp3 import exp3_sampler
from adambs_jax.samplers._groups import build_arm_sampler
from adambs_jax.samplers._priority import priority_sampler
from adambs_jax.samplers._uniform import INT32_MAX, uniform_sampler

__all__ = [
    "BASE_SAMPLERS",
    "DomainSamplerState",
    "DomainConfig",
    "domain_config",
    "sizes_digest",
    "contiguous_domains",
    "domain_of",
    "domain_feedback",
    "init",
    "sample",
    "update",
    "state_distribution",
    "domain_sampler",
]

BASE_SAMPLERS = {"exp3": exp3_sampler, "uniform": uniform_sampler, "priority": priority_sampler}
"""The base samplers by name; ``domain_sampler`` also takes a factory ``(D, K, **kw)``."""


def sizes_digest(sizes: np.ndarray) -> str:
    """A short fingerprint of the domain sizes (16 hex digits of SHA-256 of their int64
    bytes): the state's static field that checkpoints compare, O(1) whatever D."""
    return hashlib.sha256(np.asarray(sizes, np.int64).tobytes()).hexdigest()[:16]


@struct.dataclass
class DomainSamplerState(SamplerStateBase):
    """State of ``domain_sampler``: the base sampler's state over the D domains and the
    domains' offsets.

    Attributes:
      base: the base sampler's state (over D arms).
      offsets: (D + 1,) int32, o_0 = 0, o_d = n_1 + ... + n_d, o_D = n: domain d holds the
        examples [o_d, o_{d+1}).
      num_dropped_feedback: int32 scalar, how many per-example feedback entries were left
        out of their domain's RMS (negative, NaN, infinite, or an index outside [0, n)).
      num_examples, num_domains: n and D (static).
      sizes_digest: the fingerprint of the sizes (``sizes_digest``, static): a checkpoint of
        another partition of the same n is refused by the metadata comparison, before any
        array is read.
    """

    base: Any
    offsets: jax.Array
    num_dropped_feedback: jax.Array
    num_examples: int = struct.field(pytree_node=False)
    num_domains: int = struct.field(pytree_node=False)
    sizes_digest: str = struct.field(pytree_node=False)

    @property
    def step(self) -> Any:
        """The base's count of updates (``ab.Sampling`` resumes its schedule from it); 0
        when the base keeps none."""
        return getattr(self.base, "step", 0)

    def healthy(self) -> jax.Array:
        if isinstance(self.base, SamplerStateBase):
            return self.base.healthy()
        return jnp.asarray(True)

    def domain_probabilities(self) -> jax.Array:
        """q (D,): the mixture over the domains (O(D); for logs and plots).

        Raises:
          TypeError: the base's state has no full distribution.
        """
        if not isinstance(self.base, SamplerStateBase):
            raise TypeError(
                f"state: the base sampler's state ({type(self.base).__name__}) has no full "
                f"distribution to ask for"
            )
        return self.base.probabilities()

    def probabilities(self) -> jax.Array:
        return state_distribution(self, self.domain_probabilities())

    def restored(self, like: Any, saved_config: dict, where: str) -> DomainSamplerState:
        """Checks that the restored offsets are those the sizes digest names (the metadata
        comparison already refused another partition); the base restored itself."""
        del like, saved_config
        offsets = self.offsets
        if isinstance(offsets, jax.Array) and not offsets.is_fully_addressable:
            offsets = offsets.addressable_data(0)  # replicated over hosts: the local copy
        offsets = np.asarray(offsets)
        if (
            offsets.shape != (self.num_domains + 1,)
            or sizes_digest(np.diff(offsets.astype(np.int64))) != self.sizes_digest
        ):
            raise ValueError(
                f"{where}: the domain sampler state's offsets do not match its sizes digest "
                f"{self.sizes_digest!r} (a damaged checkpoint?); restore an earlier one"
            )
        return self


class DomainConfig(NamedTuple):
    """The validated sizes: n, K, D, the sizes (D,) and offsets (D + 1,) (host int64),
    their digest, and nbar = n / D."""

    num_examples: int
    batch_size: int
    num_domains: int
    sizes: np.ndarray
    offsets: np.ndarray
    digest: str
    mean_size: float


def domain_config(sizes: Sequence[int] | np.ndarray, batch_size: int) -> DomainConfig:
    """Validates the domain sizes and K.

    Raises:
      ValueError: ``sizes`` is not a non-empty 1-D sequence of ints, has an entry <= 0 (the
        message gives its position), or sums to more than 2^31 - 1 (int32 indices);
        ``batch_size`` is not an int >= 1.
    """
    batch_size = check_int("batch_size", batch_size)
    if isinstance(sizes, (str, bytes)) or isinstance(sizes, jax.core.Tracer):
        raise ValueError(f"sizes must be a 1-D sequence of ints (a host array), got {sizes!r}")
    array = np.asarray(sizes)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"sizes must be a non-empty 1-D sequence of ints (one per domain), got shape "
            f"{array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"sizes must hold ints, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if np.any(array <= 0):
        first = int(np.argmax(array <= 0))
        raise ValueError(
            f"sizes must all be >= 1 (a domain without examples cannot be drawn from), got "
            f"sizes[{first}]={int(array[first])}"
        )
    total = int(array.sum(dtype=np.int64))
    if total > INT32_MAX or np.any(array > INT32_MAX):
        raise ValueError(
            f"sizes: the domains hold n={total} examples in all, more than int32 indices "
            f"address (at most {INT32_MAX}); split the corpus into several samplers or "
            f"sample domains here and examples within them on the host"
        )
    offsets = np.concatenate([[0], np.cumsum(array)]).astype(np.int64)
    return DomainConfig(
        num_examples=total,
        batch_size=batch_size,
        num_domains=int(array.size),
        sizes=array,
        offsets=offsets,
        digest=sizes_digest(array),
        mean_size=total / array.size,
    )


def contiguous_domains(domain_ids, num_domains: int | None = None):
    """``(sizes (D,), order (n,))`` from a domain id per example (host side, O(n) once).

    Reorder the dataset once by ``order`` (``data[order]``, a stable sort by domain id):
    then domain d holds the examples [o_d, o_d + n_d) that ``domain_sampler(sizes, K)``
    expects, and the sampler's index i is the original example ``order[i]``. The sampler
    itself never holds the (n,) ids.

    Args:
      domain_ids: (n,) ints in [0, D).
      num_domains: D; default max id + 1.

    Raises:
      ValueError: ``domain_ids`` is not a non-empty 1-D int array with ids >= 0 (and
        < ``num_domains`` when given), or some domain has no example.
    """
    ids = np.asarray(domain_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"domain_ids must be a non-empty 1-D array of ints, got shape {ids.shape} and "
            f"dtype {ids.dtype}"
        )
    if ids.min() < 0:
        raise ValueError(f"domain_ids must be >= 0, got {int(ids.min())}")
    if num_domains is None:
        num_domains = int(ids.max()) + 1
    num_domains = check_int("num_domains", num_domains)
    if ids.max() >= num_domains:
        raise ValueError(f"domain_ids must be < num_domains={num_domains}, got {int(ids.max())}")
    sizes = np.bincount(ids, minlength=num_domains)
    if np.any(sizes == 0):
        empty = np.flatnonzero(sizes == 0)
        raise ValueError(
            f"domain_ids: domains {empty[:6].tolist()} have no example (every domain needs "
            f"one); renumber the domains"
        )
    return sizes, np.argsort(ids, kind="stable")


def domain_of(offsets, indices, num_examples: int):
    """``(domains (K,) int32, in_range (K,) bool)``: the domain of each index, by binary
    search in the offsets (D + 1,), O(K log D); an index outside [0, n) gets the nearest
    domain and ``in_range`` False. The range is checked in the indices' own dtype, before
    the cast to int32 (an int64 index 2^32 + 3 is out of range, not wrapped to 3).

    Raises:
      TypeError: ``indices`` are not integers.
    """
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    num_domains = offsets.shape[0] - 1
    largest = min(num_examples - 1, int(jnp.iinfo(indices.dtype).max))
    in_range = (indices >= 0) & (indices <= largest)
    clipped = jnp.clip(indices, 0, largest).astype(jnp.int32)
    domains = jnp.searchsorted(offsets, clipped, side="right") - 1
    return jnp.clip(domains, 0, num_domains - 1).astype(jnp.int32), in_range


def domain_feedback(domains, feedback, valid, domain_sizes, mean_size: float):
    """F_{d_k} (K,) for each draw: (n_d / nbar) times the RMS of the valid feedback of the
    batch's draws of the same domain (module docstring: why); NaN where the draw's domain
    has no valid draw in the batch. O(K log K): the draws are sorted by domain and each run
    of equal domains reduced (K segments, never D).

    Args:
      domains: (K,) int32, the domain of each draw.
      feedback: (K,) per-draw feedback f_k.
      valid: (K,) bool, which f_k may enter the RMS.
      domain_sizes: (K,) n_{d_k}.
      mean_size: nbar = n / D.
    """
    num_draws = domains.shape[0]
    feedback = jnp.asarray(feedback, jnp.float32)
    valid = valid & jnp.isfinite(feedback) & (feedback >= 0)
    order = jnp.argsort(domains, stable=True)
    sorted_domains = domains[order]
    values = jnp.where(valid, feedback, 0.0)[order]
    takes_part = valid[order]
    is_first = jnp.concatenate([jnp.array([True]), sorted_domains[1:] != sorted_domains[:-1]])
    run = jnp.cumsum(is_first) - 1
    segment = functools.partial(jax.ops.segment_sum, segment_ids=run, num_segments=num_draws)
    # scaled by the run's largest value: squares of f above ~1.8e19 overflow float32 and
    # those below ~1e-23 underflow to 0
    scale = jax.ops.segment_max(values, run, num_segments=num_draws)
    safe = jnp.where(scale > 0, scale, 1.0)
    sum_squares = segment(jnp.square(values / safe[run]))
    count = segment(takes_part.astype(jnp.float32))
    rms = safe * jnp.sqrt(sum_squares / jnp.maximum(count, 1.0))
    size_factor = (jnp.asarray(domain_sizes, jnp.float32) / jnp.float32(mean_size))[order]
    per_draw = jnp.where(count[run] > 0, rms[run] * size_factor, jnp.nan)
    return jnp.zeros_like(per_draw).at[order].set(per_draw)


def _base(base: str | Callable[..., Sampler], config: DomainConfig, kwargs) -> Sampler:
    return build_arm_sampler(
        base,
        BASE_SAMPLERS,
        config.num_domains,
        config.batch_size,
        kwargs,
        arms="domains",
        draws="draws per batch",
    )


def _check_state(config: DomainConfig, state) -> None:
    if not isinstance(state, DomainSamplerState):
        raise TypeError(
            f"state must be a DomainSamplerState (sampler.init()), got {type(state).__name__}"
        )
    if (state.num_examples, state.num_domains, state.sizes_digest) != (
        config.num_examples,
        config.num_domains,
        config.digest,
    ):
        raise ValueError(
            f"state: built for num_examples={state.num_examples} in num_domains="
            f"{state.num_domains} (sizes digest {state.sizes_digest}), but this sampler has "
            f"num_examples={config.num_examples} in num_domains={config.num_domains} (sizes "
            f"digest {config.digest})"
        )


def init(config: DomainConfig, base: Sampler) -> DomainSamplerState:
    """The base's initial state and the offsets."""
    return DomainSamplerState(
        base=base.init(),
        offsets=jnp.asarray(config.offsets, jnp.int32),
        num_dropped_feedback=jnp.zeros((), jnp.int32),
        num_examples=config.num_examples,
        num_domains=config.num_domains,
        sizes_digest=config.digest,
    )


def sample(config: DomainConfig, base: Sampler, state: DomainSamplerState, key: jax.Array):
    """K domains from the base's q, an example uniformly within each: ``(indices (K,)
    int32, probs (K,) = q_d / n_d)``. The base draws with the first half of ``split(key)``."""
    _check_state(config, state)
    check_key(key, name="key")
    base_key, within_key = jax.random.split(key)
    domains, domain_probs = base.sample(state.base, base_key)
    domains = domains.astype(jnp.int32)
    start = state.offsets[domains]
    size = state.offsets[domains + 1] - start
    offset = jax.random.randint(within_key, (config.batch_size,), 0, size, dtype=jnp.int32)
    probs = jnp.asarray(domain_probs, jnp.float32) / size.astype(jnp.float32)
    return start + offset, probs


def update(
    config: DomainConfig,
    base: Sampler,
    state: DomainSamplerState,
    indices,
    feedback,
    *,
    apply=True,
) -> DomainSamplerState:
    """The base's update with the draws' domains and their domain feedback F_d (K,)
    (``domain_feedback``); ``indices`` (K,) may be any examples' indices (their domains are
    looked up), out-of-range ones count as invalid feedback."""
    _check_state(config, state)
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    domains, in_range = domain_of(state.offsets, indices, config.num_examples)
    feedback = jnp.asarray(feedback).astype(jnp.float32)
    valid = in_range & jnp.isfinite(feedback) & (feedback >= 0)
    sizes = state.offsets[domains + 1] - state.offsets[domains]
    per_draw = domain_feedback(domains, feedback, valid, sizes, config.mean_size)
    if accepts_apply(base.update):
        new_base = base.update(state.base, domains, per_draw, apply=apply)
    else:  # a user sampler without ``apply``: keep the old state where not applied
        new_base = select(
            jnp.asarray(apply, bool), base.update(state.base, domains, per_draw), state.base
        )
    dropped = jnp.sum(~valid).astype(jnp.int32) * jnp.asarray(apply, bool).astype(jnp.int32)
    return state.replace(base=new_base, num_dropped_feedback=state.num_dropped_feedback + dropped)


def state_distribution(state: DomainSamplerState, domain_probs) -> jax.Array:
    """p (n,) from q (D,): every example of domain d has q_d / n_d. O(n)."""
    sizes = jnp.diff(state.offsets)
    return jnp.repeat(
        jnp.asarray(domain_probs, jnp.float32) / sizes.astype(jnp.float32),
        sizes,
        total_repeat_length=state.num_examples,
    )


def probabilities(config: DomainConfig, base: Sampler, state: DomainSamplerState) -> jax.Array:
    """p (n,): every example of domain d has q_d / n_d. O(n)."""
    _check_state(config, state)
    assert base.probabilities is not None  # bound only for a base that has them
    return state_distribution(state, base.probabilities(state.base))


def renormalize(base: Sampler, state: DomainSamplerState) -> DomainSamplerState:
    assert base.renormalize is not None  # bound only for a base that renormalizes
    return state.replace(base=base.renormalize(state.base))


def domain_sampler(
    sizes: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    base: str | Callable[..., Sampler] = "exp3",
    **base_kwargs,
) -> Sampler:
    """A sampler over D domains of unequal sizes n_1..n_D: a per-arm sampler picks the
    domain of each draw, the example is uniform within it (online data mixing with exact
    importance weights).

    Domain d holds the contiguous examples [o_d, o_d + n_d), o_d = n_1 + ... + n_{d-1}
    (``contiguous_domains`` builds this layout from a domain id per example). Each of the
    K draws picks d ~ q (the base's mixture over the D domains) and then an example
    uniformly in d, so p_j = q_d / n_d and the step's weight is w = 1 / (n p_j) =
    n_d / (n q_d): the gradient estimate is unbiased for any q > 0. ``update`` gives the
    base, for each draw, its domain and F_d = (n_d / nbar) RMS_d, nbar = n / D, RMS_d the
    root mean square of the batch's valid feedback of domain d: the base's variance-optimal
    mixture q_d proportional to F_d is then the one that minimizes the variance of the
    estimate, q_d proportional to n_d sqrt(mean_{j in d} ||g_j||^2) (module docstring).
    Invalid feedback never enters a domain's RMS; a domain without valid feedback in the
    batch passes NaN, which the base drops.

    Memory O(D) whatever n (n <= 2^31 - 1, int32 indices); per step O(K log K + K log D)
    plus the base's.

    Args:
      sizes: n_d >= 1 per domain, a 1-D sequence of D >= 1 ints (host values).
      batch_size: K >= 1 draws per step (with replacement: a domain may be drawn often).
      base: ``"exp3"`` (``ab.exp3_sampler``, the default: EXP3 as in online data mixing),
        ``"priority"`` (``ab.priority_sampler``), ``"uniform"`` (q_d = 1/D) or a factory
        ``(num_examples=D, batch_size=K, **base_kwargs) -> ab.samplers.Sampler``.
      **base_kwargs: passed to the base factory (e.g. exp3's ``num_steps``, ``step_size``,
        ``p_min``; they are per domain: exp3's default p_min is 0.1 / D).

    Returns:
      An ``ab.samplers.Sampler`` over the n examples (state ``DomainSamplerState``, whose
      ``domain_probabilities()`` is q (D,)); ``probabilities`` (n,), ``renormalize_every``
      and ``renormalize`` come from the base's (None where the base has none).

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. (1)
      and Algorithm 2; Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For
      Language Model Pre-Training", 2023.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.samplers.domain_sampler([1, 3, 6], 4, num_steps=100)   # n = 10
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> indices.dtype, [round(float(p), 4) for p in sampler.probabilities(state)[:4]]
      (dtype('int32'), [0.3333, 0.1111, 0.1111, 0.1111])
      >>> state = sampler.update(state, indices, jnp.ones(4))
      >>> round(float(state.domain_probabilities().sum()), 5)
      1.0
    """
    config = domain_config(sizes, batch_size)
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
