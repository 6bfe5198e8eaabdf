"""The training step: sample, gather, per-example losses and feedback, the reweighted update
through any optax optimizer, the sampler's update, all in one jitted call.

    step = make_train_step(loss_fn, optax.adam(1e-3), exp3_sampler(n, K, num_steps=T))
    state = step.init(params)
    state, metrics = step(state, data, key)

A loop of your own keeps its step: ``value_and_grad`` gives the unbiased loss, G_hat and the
feedback from one backward pass, ``Sampling`` draws, gathers and learns, one call each.

``StepOptions`` is how a step runs (diagnostics, the non-finite guard, a mesh, jit,
``steps_per_call``, the optimizer's extra arguments), the same for the host-fed step.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
Algorithm 1.
"""

from adambs_jax.step._hand_loop import Extras, Sampling, value_and_grad
from adambs_jax.step._options import FULL_DIAGNOSTICS_MAX_EXAMPLES, StepOptions
from adambs_jax.step._sampled_batch import SampledBatch
from adambs_jax.step._state import TrainState, TrainStep
from adambs_jax.step._train_step import make_train_step

__all__ = [
    "make_train_step",
    "StepOptions",
    "TrainState",
    "TrainStep",
    "FULL_DIAGNOSTICS_MAX_EXAMPLES",
    # a training loop of your own
    "value_and_grad",
    "Extras",
    "Sampling",
    "SampledBatch",
]
