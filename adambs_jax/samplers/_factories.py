"""Samplers: a distribution p over the n training examples, drawn from and learned online.

A sampler is a NamedTuple of pure functions (``adambs_jax.base.Sampler``), in the style of
``optax.GradientTransformation``:

    sampler = exp3_sampler(num_examples, batch_size, num_steps=T)
    state = sampler.init()
    indices, probs = sampler.sample(state, key)           # (K,) int32, (K,) p[indices]
    state = sampler.update(state, indices, feedback)       # feedback (K,) >= 0
    p = sampler.probabilities(state)                       # (n,), O(n)
    state = sampler.renormalize(state)   # exp3: at least every sampler.renormalize_every

All of them work under ``jax.jit`` and compile once for a fixed n and K. Each factory here
only validates its arguments into a frozen config and binds the module-level functions of
its algorithm to it: ``adambs_jax.exp3`` (AdamBS Algorithm 2, step by step) and
``adambs_jax.uniform``.

``exp3_sampler`` is AdamBS Algorithm 2 (Liu, Wu, Mozafari, NeurIPS 2020): EXP3 with multiple
plays on the n arms, with loss l_j = L^2/p_min^2 - f_j^2/p_j^2, an importance-weighted loss
estimate, a multiplicative step and an exact KL projection onto {q >= p_min, sum q = 1}.
Per step it costs O(K log K + K B log_B n): only the sampled leaves of a B-ary prefix-sum tree
change, and normalization is lazy (p = leaf / root).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _infobatch as infobatch
from adambs_jax.samplers import _priority as priority
from adambs_jax.samplers import _uniform as uniform
from adambs_jax.samplers._base import Sampler
from adambs_jax.samplers._exp3 import (  # re-exported: their home is adambs_jax.exp3
    Exp3SamplerState,
    default_step_size,
)
from adambs_jax.samplers._gradient_norm import GradientNormSamplerState
from adambs_jax.samplers._infobatch import InfobatchSamplerState
from adambs_jax.samplers._priority import PrioritySamplerState
from adambs_jax.samplers._uniform import UniformSamplerState

__all__ = [
    "Sampler",
    "Exp3SamplerState",
    "UniformSamplerState",
    "exp3_sampler",
    "uniform_sampler",
    "probabilities",
    "importance_weights",
    "default_step_size",
]


def probabilities(state) -> jax.Array:
    """The full distribution p (n,) of a sampler state. O(n): for tests, metrics, plots.

    Dispatches on the library's state classes: ``UniformSamplerState`` (1/n),
    ``Exp3SamplerState`` (leaves / root), ``GradientNormSamplerState`` (the distribution
    of its latest draw), ``PrioritySamplerState`` (the mixture with its static lambda) and
    ``InfobatchSamplerState`` (this epoch's leaves / root), ``GroupSamplerState`` (each
    example of group g: q_g / m, q its base state's distribution). Adam-impt's ``AdamImptState``
    has no full distribution (the marginal of its presample-and-resample draw is not
    computed). A sampler's own
    ``sampler.probabilities`` (None where it has no distribution) is the typed way to ask.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2 (p); Lahire, "Non-Uniform Sampling and Adaptive Optimizers in Deep
      Learning" (p^GN).

    Raises:
      TypeError: ``state`` is none of those classes (the message names its type).
    """
    if isinstance(state, UniformSamplerState):
        return uniform.distribution(state)
    if isinstance(state, Exp3SamplerState):
        return exp3.distribution(state)
    if isinstance(state, GradientNormSamplerState):
        return state.distribution
    if isinstance(state, PrioritySamplerState):
        return priority.state_distribution(state)
    if isinstance(state, InfobatchSamplerState):
        return infobatch.distribution(state)
    from adambs_jax.samplers import _groups as groups

    if isinstance(state, groups.GroupSamplerState):
        return groups.state_distribution(state, probabilities(state.base))
    raise TypeError(
        f"state: not a sampler state with a full distribution (UniformSamplerState, "
        f"Exp3SamplerState, GradientNormSamplerState, PrioritySamplerState or "
        f"InfobatchSamplerState, or a GroupSamplerState of one): {type(state).__name__}"
    )


def importance_weights(probs: jax.Array, num_examples: int) -> jax.Array:
    """w = 1 / (n p): the weights that make (1/K) sum_k w_k g_{i_k} unbiased for the mean
    gradient (AdamBS eq. 1). With p uniform, w = 1.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, eq. (1).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if jnp.ndim(probs) != 1:
        raise ValueError(f"probs must have shape (K,), got {jnp.shape(probs)}")
    return 1.0 / (num_examples * probs)


def uniform_sampler(num_examples: int, batch_size: int) -> Sampler:
    """Draws K indices i.i.d. uniformly from {0..n-1}; probs = 1/n, so the importance
    weights are 1 and training is plain mini-batch training. ``update`` learns nothing.

    Indices are int32, or int64 when n > 2^31 - 1 (which needs ``jax_enable_x64``; without
    it such an n is refused, naming ``num_examples``).

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, §5
      (the uniform baselines: Adam, SGD, RMSProp).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.uniform_sampler(10, 4)
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> indices.shape, indices.dtype, [round(float(p), 6) for p in probs]
      ((4,), dtype('int32'), [0.1, 0.1, 0.1, 0.1])
      >>> int(sampler.update(state, indices, jnp.ones(4)).step)
      1
    """
    config = uniform.uniform_config(num_examples, batch_size)
    bound = (functools.partial(f, config) for f in (uniform.init, uniform.sample, uniform.update))
    return Sampler(*bound, config.num_examples, config.batch_size, uniform.distribution)


def exp3_sampler(
    num_examples: int,
    batch_size: int,
    *,
    p_min: float | None = None,
    step_size: float | None = None,
    num_steps: int | None = None,
    grad_norm_bound: float | str | None = None,
    stratified: bool = False,
    arity: int | None = None,
    bound_quantile: float = exp3.DEFAULT_BOUND_QUANTILE,
    bound_learning_rate: float = exp3.DEFAULT_BOUND_LEARNING_RATE,
    preset: str | None = None,
) -> Sampler:
    """The AdamBS bandit sampler (Algorithm 2 of Liu, Wu, Mozafari, NeurIPS 2020).

    Each ``update(state, I, f)`` with draws I = (i_1..i_K) and feedback f_k >= 0 (the
    per-example gradient norm ||g_{i_k}||, or an upper bound of it) does, for every distinct
    drawn arm j with count c_j:

      loss      l_j = L^2 / p_min^2 - min(f_j, L)^2 / p_j^2                (>= 0)
      estimate  h_j = l_j c_j / (K p_j)       (h_j = 0 for arms not drawn)
      step      w_j = p_j exp(-alpha_p h_j),  alpha_p = eta0 p_min^2 / L^2
      project   p'  = argmin_{q >= p_min, sum q = 1} KL(q || w)    (exact, O(K log K))

    If one arm is drawn several times with different feedback, h_j sums l over its draws,
    which is l_j c_j / (K p_j) when the feedback agrees. In expectation over the draws the
    step is mirror descent on sum_j f_j^2 / p_j, whose minimizer is p_j proportional to f_j
    (clipped at p_min): the variance-optimal sampling distribution (paper §4.2). The steps
    are the functions of ``adambs_jax.exp3``, bound to a validated ``Exp3Config``.

    Bad feedback: an entry that is negative, NaN or infinite, or whose index is outside
    [0, n) (checked in the indices' own dtype), is dropped (treated as if that draw had not
    happened: it adds nothing to h) and counted in ``state.num_dropped_feedback``; float
    indices are a TypeError. If an update would still produce a non-finite weight,
    the whole update is skipped and the state returned unchanged (except ``step``).

    Args:
      num_examples: n >= 1.
      batch_size: K >= 1 (K > n is fine: draws are with replacement).
      p_min: the probability floor; default 0.1 / n. Must satisfy 0 < p_min <= 1/n.
      step_size: eta0 (dimensionless); default sqrt(2 log(n) / (n T)) (Lemma 1 with
        R^2 = log n), which needs ``num_steps``.
      num_steps: T, the planned number of training steps; only used for the default eta0.
      grad_norm_bound: L, the bound feedback is clipped to (so l_j >= 0), kept in
        ``state.grad_norm_bound``: a number > 0 (fixed); ``"running_max"``, the max of all
        valid feedback seen (the paper's choice: one outlier, e.g. 1e30, then sets L for
        good and every ratio f/L is ~0, so the sampler stops learning); or ``"quantile"``
        (the default, also for None): a running ``bound_quantile``-quantile of the valid
        feedback, learned by stochastic approximation in log space (``exp3.quantile_bound``;
        one update moves log L by at most ``bound_learning_rate``), started at the first
        batch's quantile. ``exp3.clipped_fraction(feedback, L)`` is the clipped share.
      bound_quantile: tau in (0, 1) of the "quantile" bound; default 0.9 (clipping at the
        90th percentile lowers V(p), docs/algorithm.md).
      bound_learning_rate: eta_L > 0 of the "quantile" bound, the largest move of log L per
        update; default 0.01 (L follows a change of the feedback's scale by a factor e in
        about 1 / (eta_L (1 - tau)) = 1000 updates at worst).
      stratified: draw one index in each of K equal slices of the probability mass
        (lower variance, still marginally p); default i.i.d. with replacement.
      arity: B, children per node of the prefix-sum tree (2, 4, ..., 128); default
        ``sumtree.default_arity()``: 32 on GPU/TPU, 16 on CPU (docs/performance.md). The
        largest n is about 2^31 (B - 1) / B (int32 node indices); larger is refused.
      preset: named settings of ``p_min`` and ``grad_norm_bound`` (``exp3_config.EXP3_PRESETS``),
        used where those arguments are None (an explicit value overrides the preset):
        ``"paper"`` (p_min = 0.1/n, ``"running_max"``: Algorithm 2 as published) or
        ``"low_variance"`` (p_min = 0.5/n, ``"quantile"``: the clipped bound; the settings
        docs/algorithm.md found to reduce the variance term V(p)). None (default): the
        defaults above.

    Renormalization: the tree's root shrinks with every update, so the state must be
    ``sampler.renormalize``-d (O(n)) at least every ``sampler.renormalize_every`` updates (a
    static count from the configuration, usually millions; ``exp3.renormalization_period``).
    ``make_train_step``'s jitted step does it; call it yourself when you drive
    ``sampler.update`` (or a ``jit=False`` step) in your own loop. ``update(..., apply=False)``
    returns the state bitwise unchanged (the train step's non-finite guard).

    Returns:
      A ``Sampler`` whose ``probabilities(state)`` is p = leaves / root, with
      ``renormalize_every`` (None when ``update`` renormalizes itself, for a configuration
      whose root could shrink without bound in one update) and ``renormalize``.

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
      Algorithm 2 and Lemma 1; Auer et al., "The Nonstochastic Multiarmed Bandit Problem",
      SIAM J. Comput. 2002 (EXP3); Namkoong et al., "Adaptive Sampling Probabilities for
      Non-Smooth Optimization", ICML 2017 (the floored projection on a tree).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.exp3_sampler(100, 8, num_steps=1000)
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> indices.shape, indices.dtype, probs.dtype
      ((8,), dtype('int32'), dtype('float32'))
      >>> state = sampler.update(state, indices, jnp.ones(8))
      >>> p = sampler.probabilities(state)
      >>> p.shape, round(float(p.sum()), 5), int(state.step)
      ((100,), 1.0, 1)
    """
    config = exp3.exp3_config(
        num_examples,
        batch_size,
        p_min=p_min,
        step_size=step_size,
        num_steps=num_steps,
        grad_norm_bound=grad_norm_bound,
        stratified=stratified,
        arity=arity,
        bound_quantile=bound_quantile,
        bound_learning_rate=bound_learning_rate,
        preset=preset,
    )
    bound = (functools.partial(f, config) for f in (exp3.init, exp3.sample, exp3.update))
    return Sampler(
        *bound,
        config.num_examples,
        config.batch_size,
        exp3.distribution,
        renormalize_every=config.renormalize_every or None,
        renormalize=functools.partial(exp3.renormalize, config),
    )
