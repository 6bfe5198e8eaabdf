"""Samplers: a distribution p over the n training examples, drawn from and learned online.

A sampler is a NamedTuple of pure functions, in the style of ``optax.GradientTransformation``
(the contract: ``Sampler``, ``ScoringSampler`` and the Protocols of their functions):

    sampler = exp3_sampler(num_examples, batch_size, num_steps=T)
    state = sampler.init()
    indices, probs = sampler.sample(state, key)           # (K,) int32, (K,) p[indices]
    state = sampler.update(state, indices, feedback)       # feedback (K,) >= 0
    p = sampler.probabilities(state)                       # (n,), O(n)

The factories: ``exp3_sampler`` (AdamBS Algorithm 2: EXP3 with multiple plays, an exact KL
projection onto {p >= p_min} on a B-ary prefix-sum tree), ``uniform_sampler`` (plain
mini-batch training), ``priority_sampler`` (stale scores, exact weights),
``infobatch_sampler`` (InfoBatch as importance sampling), ``group_sampler`` (any per-arm
sampler over contiguous groups), ``domain_sampler`` (any per-arm sampler over D domains of
unequal sizes, uniform within each), and the papers' model-aware baselines
``adam_impt_sampler`` (Katharopoulos & Fleuret) and ``gradient_norm_sampler`` (Lahire's
p^GN). ``sharded(sampler, mesh, axis)`` splits an exp3 or priority sampler's state by
examples over a mesh axis. ``importance_weights(probs, n)`` = 1 / (n p) makes the gradient
estimate unbiased.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from adambs_jax.samplers._adam_impt import AdamImptState, adam_impt_sampler, variance_reduction
from adambs_jax.samplers._base import (
    AnySampler,
    FeedbackFn,
    InitFn,
    MetricsFn,
    ProbabilitiesFn,
    RenormalizeFn,
    SampleFn,
    Sampler,
    SamplerState,
    SamplerStateBase,
    ScoreFn,
    ScoringSampleFn,
    ScoringSampler,
    UpdateFn,
    accepts_apply,
    check_healthy,
    importance_weights,
    probabilities,
)
from adambs_jax.samplers._domains import DomainSamplerState, contiguous_domains, domain_sampler
from adambs_jax.samplers._exp3 import (
    EXP3_PRESETS,
    Exp3SamplerState,
    default_step_size,
    exp3_sampler,
)
from adambs_jax.samplers._gradient_norm import GradientNormSamplerState, gradient_norm_sampler
from adambs_jax.samplers._groups import GroupSamplerState, group_sampler
from adambs_jax.samplers._infobatch import InfobatchSamplerState, infobatch_sampler
from adambs_jax.samplers._priority import PrioritySamplerState, priority_sampler
from adambs_jax.samplers._projection import ProjectionResult, project_onto_floored_simplex
from adambs_jax.samplers._scored_draws import resample_proportional
from adambs_jax.samplers._sharded import ShardedExp3State, ShardedPriorityState, sharded
from adambs_jax.samplers._sumtree import default_arity, max_leaves
from adambs_jax.samplers._uniform import UniformSamplerState, uniform_sampler

__all__ = [
    # the contract
    "Sampler",
    "ScoringSampler",
    "AnySampler",
    "SamplerState",
    "FeedbackFn",
    "InitFn",
    "SampleFn",
    "ScoreFn",
    "ScoringSampleFn",
    "UpdateFn",
    "ProbabilitiesFn",
    "RenormalizeFn",
    "MetricsFn",
    "SamplerStateBase",
    "accepts_apply",
    "importance_weights",
    "probabilities",
    "check_healthy",
    # the factories and their states
    "exp3_sampler",
    "Exp3SamplerState",
    "EXP3_PRESETS",
    "default_step_size",
    "uniform_sampler",
    "UniformSamplerState",
    "priority_sampler",
    "PrioritySamplerState",
    "infobatch_sampler",
    "InfobatchSamplerState",
    "group_sampler",
    "GroupSamplerState",
    "domain_sampler",
    "DomainSamplerState",
    "contiguous_domains",
    "adam_impt_sampler",
    "AdamImptState",
    "variance_reduction",
    "gradient_norm_sampler",
    "GradientNormSamplerState",
    "resample_proportional",
    # the state split by examples over a mesh axis
    "sharded",
    "ShardedExp3State",
    "ShardedPriorityState",
    # the pieces a sampler is built from
    "project_onto_floored_simplex",
    "ProjectionResult",
    "default_arity",
    "max_leaves",
]
