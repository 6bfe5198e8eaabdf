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

# Issue 3: importance-weighted optax transforms, per-example feedback, the jitted train step.
from adambs_jax import feedback, losses, scoring
from adambs_jax.feedback import (
    FEEDBACK_KINDS,
    logit_grad_norms,
    per_example_grad_norms,
    per_example_losses,
    per_example_losses_and_grads,
    tree_norms,
)
from adambs_jax.losses import ModelLoss
from adambs_jax.scoring import ScoreFn, ScoringSampler, make_score_fn
from adambs_jax.train_step import TrainState, make_train_step
from adambs_jax.transforms import (
    ImportanceWeightedTransformation,
    adambs,
    amsgradbs,
    importance_weighted_mean,
    weighted_mean,
    with_importance_weighting,
)

# Issue: the baselines the papers compare against (Adam-impt, p^GN), as scoring samplers.
from adambs_jax import baselines
from adambs_jax.baselines import (
    AdamImptState,
    GradientNormSamplerState,
    adam_impt_sampler,
    gradient_norm_sampler,
    resample_proportional,
    variance_reduction,
)

# Issue 6: data parallelism on a mesh, checkpoints, non-finite steps.
from adambs_jax import checkpoint, sharding
from adambs_jax.checkpoint import (
    CheckpointManager,
    read_checkpoint_metadata,
    restore_checkpoint,
    save_checkpoint,
)
from adambs_jax.sharding import data_parallel_mesh, replicate
from adambs_jax.train_step import check_key
