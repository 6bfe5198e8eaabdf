"""adambs_jax: adaptive mini-batch selection with bandit sampling (AdamBS) for JAX/Optax/Flax.

Reference: R. Liu, T. Wu, B. Mozafari, "Adam with Bandit Sampling for Deep Learning",
NeurIPS 2020.
"""

from adambs_jax import sumtree
from adambs_jax.projection import ProjectionResult, project_onto_floored_simplex
from adambs_jax.samplers import (
    Exp3SamplerState,
    Sampler,
    UniformSamplerState,
    default_step_size,
    exp3_sampler,
    importance_weights,
    probabilities,
    uniform_sampler,
)

__version__ = "0.1.0"
