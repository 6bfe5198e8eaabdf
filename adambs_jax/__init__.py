"""adambs_jax: adaptive mini-batch selection with bandit sampling (AdamBS) for JAX/Optax/Flax.

What is exported, as in optax: the names a training script needs are top-level
(``ab.exp3_sampler``, ``ab.adambs``, ``ab.make_train_step``, ``ab.save_checkpoint``, ...),
and every module of the package is a documented submodule, reachable as ``ab.<module>``
(``ab.samplers``, ``ab.checkpoint``, ``ab.tree_utils``, ...) for the rest. ``__all__`` lists
both; the version is ``ab.__version__`` (written once, in ``adambs_jax/version.py``).

References:
  R. Liu, T. Wu, B. Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from adambs_jax import (
    adam_impt,
    base,
    baselines,
    checkpoint,
    checkpoint_metadata,
    checkpoint_restore,
    checkpoint_storage,
    checks,
    estimators,
    exp3,
    exp3_bound,
    exp3_config,
    exp3_health,
    feedback,
    ghost,
    gradient_norm,
    grain_source,
    groups,
    host_loop,
    host_step,
    infobatch,
    jsonable,
    losses,
    model_state,
    per_example,
    preconditioner,
    priority,
    projection,
    samplers,
    scored_draws,
    scoring,
    sharding,
    sources,
    step_stages,
    sumtree,
    train_loop,
    train_state,
    train_step,
    transforms,
    tree_utils,
    uniform,
)
from adambs_jax.baselines import (
    AdamImptState,
    GradientNormSamplerState,
    adam_impt_sampler,
    gradient_norm_sampler,
    resample_proportional,
    variance_reduction,
)
from adambs_jax.checkpoint import (
    CheckpointManager,
    read_checkpoint_metadata,
    restore_checkpoint,
    save_checkpoint,
)
from adambs_jax.checks import check_key
from adambs_jax.estimators import importance_weighted_grad
from adambs_jax.feedback import (
    FEEDBACK_KINDS,
    logit_grad_norms,
    per_example_grad_norms,
    per_example_losses,
    per_example_losses_and_grads,
    preconditioned_grad_norms,
    tree_norms,
)
from adambs_jax.groups import GroupSamplerState, group_sampler
from adambs_jax.host_loop import HostLoader, run_host_loop
from adambs_jax.host_step import Draws, HostTrainStep, make_host_train_step
from adambs_jax.infobatch import InfobatchSamplerState, infobatch_sampler
from adambs_jax.losses import ModelLoss
from adambs_jax.priority import PrioritySamplerState, priority_sampler
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
from adambs_jax.scoring import ScoreFn, ScoringSampler, make_score_fn
from adambs_jax.sharding import data_parallel_mesh, replicate
from adambs_jax.train_step import TrainState, TrainStep, make_train_step
from adambs_jax.transforms import (
    ImportanceWeightedTransformation,
    adambs,
    amsgradbs,
    importance_weighted_mean,
    weighted_mean,
    with_importance_weighting,
)
from adambs_jax.version import __version__

__all__ = [
    # submodules
    "adam_impt",
    "base",
    "baselines",
    "checkpoint",
    "checkpoint_metadata",
    "checkpoint_restore",
    "checkpoint_storage",
    "checks",
    "estimators",
    "exp3",
    "exp3_bound",
    "exp3_config",
    "exp3_health",
    "feedback",
    "ghost",
    "grain_source",
    "gradient_norm",
    "groups",
    "host_loop",
    "host_step",
    "infobatch",
    "jsonable",
    "losses",
    "model_state",
    "per_example",
    "preconditioner",
    "priority",
    "projection",
    "samplers",
    "scored_draws",
    "scoring",
    "sharding",
    "sources",
    "step_stages",
    "sumtree",
    "train_loop",
    "train_state",
    "train_step",
    "transforms",
    "tree_utils",
    "uniform",
    # samplers (Algorithm 2 of the paper) and the projection they use
    "Exp3SamplerState",
    "Sampler",
    "UniformSamplerState",
    "default_step_size",
    "exp3_sampler",
    "importance_weights",
    "probabilities",
    "uniform_sampler",
    "GroupSamplerState",
    "group_sampler",
    "PrioritySamplerState",
    "priority_sampler",
    "InfobatchSamplerState",
    "infobatch_sampler",
    "ProjectionResult",
    "project_onto_floored_simplex",
    # samplers that score candidates with the model, and the baselines of the papers
    "ScoreFn",
    "ScoringSampler",
    "make_score_fn",
    "AdamImptState",
    "GradientNormSamplerState",
    "adam_impt_sampler",
    "gradient_norm_sampler",
    "resample_proportional",
    "variance_reduction",
    # per-example feedback and losses
    "FEEDBACK_KINDS",
    "logit_grad_norms",
    "per_example_grad_norms",
    "per_example_losses",
    "per_example_losses_and_grads",
    "preconditioned_grad_norms",
    "tree_norms",
    "ModelLoss",
    # importance-weighted optimizers (Algorithm 1)
    "ImportanceWeightedTransformation",
    "adambs",
    "amsgradbs",
    "importance_weighted_grad",
    "importance_weighted_mean",
    "weighted_mean",
    "with_importance_weighting",
    # the jitted train step, data parallelism, checkpoints
    "TrainState",
    "TrainStep",
    "check_key",
    "make_train_step",
    "Draws",
    "HostLoader",
    "HostTrainStep",
    "make_host_train_step",
    "run_host_loop",
    "data_parallel_mesh",
    "replicate",
    "CheckpointManager",
    "read_checkpoint_metadata",
    "restore_checkpoint",
    "save_checkpoint",
]
