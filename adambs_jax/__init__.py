"""adambs_jax: adaptive mini-batch selection with bandit sampling (AdamBS) for JAX/Optax/Flax.

The face, as in optax: what a training script needs is top-level (``ab.exp3_sampler``,
``ab.make_train_step``, ``ab.adambs``, ``ab.save_checkpoint``, ...); the rest lives in the
public subpackages, each a face over private modules:

* ``ab.samplers``: the sampler contract, every sampler factory, their states;
* ``ab.feedback``: per-example losses and feedback (ghost norms in ``ab.feedback.ghost``);
* ``ab.step``: the jitted train step and its state;
* ``ab.host``: data on the host (sources, the step on a gathered batch, the loader loop);
* ``ab.checkpoint``: orbax checkpoints;
* ``ab.transforms``: the importance-weighted optax transformations;
* ``ab.sharding``: data parallelism on a ``jax.sharding.Mesh``.

The version is ``ab.__version__`` (written once, in ``adambs_jax/version.py``). Old import
paths still work for one release and warn (``adambs_jax._deprecated``, CHANGELOG.md).

References:
  R. Liu, T. Wu, B. Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from adambs_jax import _deprecated, checkpoint, feedback, host, samplers, sharding, step, transforms
from adambs_jax.checkpoint import CheckpointManager, restore_checkpoint, save_checkpoint
from adambs_jax.feedback import Loss, ModelLoss, importance_weighted_grad
from adambs_jax.host import make_host_train_step, run_host_loop
from adambs_jax.samplers import (
    Sampler,
    ScoringSampler,
    adam_impt_sampler,
    exp3_sampler,
    gradient_norm_sampler,
    group_sampler,
    importance_weights,
    infobatch_sampler,
    priority_sampler,
    uniform_sampler,
)
from adambs_jax.sharding import data_parallel_mesh, replicate
from adambs_jax.step import (
    Sampling,
    StepOptions,
    TrainState,
    TrainStep,
    make_train_step,
    value_and_grad,
)
from adambs_jax.transforms import adambs, amsgradbs, with_importance_weighting
from adambs_jax.version import __version__

__all__ = [
    "__version__",
    # the public subpackages
    "samplers",
    "feedback",
    "step",
    "host",
    "checkpoint",
    "transforms",
    "sharding",
    # samplers (AdamBS Algorithm 2 and the others) and their contract
    "Sampler",
    "ScoringSampler",
    "exp3_sampler",
    "uniform_sampler",
    "priority_sampler",
    "infobatch_sampler",
    "group_sampler",
    "adam_impt_sampler",
    "gradient_norm_sampler",
    "importance_weights",
    # losses, the train step and the tools of a hand-written loop
    "Loss",
    "ModelLoss",
    "make_train_step",
    "StepOptions",
    "TrainState",
    "TrainStep",
    "importance_weighted_grad",
    "value_and_grad",
    "Sampling",
    # the importance-weighted optimizers (Algorithm 1, appendix D)
    "adambs",
    "amsgradbs",
    "with_importance_weighting",
    # data on the host, data parallelism, checkpoints
    "make_host_train_step",
    "run_host_loop",
    "data_parallel_mesh",
    "replicate",
    "save_checkpoint",
    "restore_checkpoint",
    "CheckpointManager",
]

_deprecated.install()

_MOVED = {
    # a name the face no longer exports: (the module that holds it, what to use instead)
    **{
        name: ("adambs_jax.samplers", f"adambs_jax.samplers.{name}")
        for name in (
            "Exp3SamplerState UniformSamplerState GroupSamplerState PrioritySamplerState "
            "InfobatchSamplerState AdamImptState GradientNormSamplerState default_step_size "
            "probabilities ProjectionResult project_onto_floored_simplex ScoreFn "
            "resample_proportional variance_reduction"
        ).split()
    },
    **{
        name: ("adambs_jax.feedback", f"adambs_jax.feedback.{name}")
        for name in (
            "FEEDBACK_KINDS logit_grad_norms per_example_grad_norms per_example_losses "
            "per_example_losses_and_grads preconditioned_grad_norms tree_norms make_score_fn"
        ).split()
    },
    **{
        name: ("adambs_jax.transforms", f"adambs_jax.transforms.{name}")
        for name in (
            "ImportanceWeightedTransformation",
            "importance_weighted_mean",
            "weighted_mean",
        )
    },
    **{
        name: ("adambs_jax.host", f"adambs_jax.host.{name}")
        for name in "Draws HostLoader HostTrainStep".split()
    },
    "read_checkpoint_metadata": (
        "adambs_jax.checkpoint",
        "adambs_jax.checkpoint.read_checkpoint_metadata",
    ),
    "check_key": ("adambs_jax._checks", "a typed key from jax.random.key (checked by the step)"),
}

__getattr__ = _deprecated.forwarding_getattr("adambs_jax", _MOVED)
