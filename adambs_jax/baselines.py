"""The baselines AdamBS is compared against, as samplers of the same train step.

Every method is a sampler for ``make_train_step``, so an experiment switches method by
name and measures all of them the same way (Liu, Wu, Mozafari, "Adam with Bandit Sampling
for Deep Learning", NeurIPS 2020, §5; Lahire, "Non-Uniform Sampling and Adaptive
Optimizers in Deep Learning"):

* uniform (plain Adam, SGD, RMSProp, ...): ``ab.uniform_sampler``;
* AdamBS: ``ab.exp3_sampler`` in front of ``optax.adam``;
* Adam-impt (Katharopoulos & Fleuret, "Not All Samples Are Created Equal: Deep Learning with
  Importance Sampling", ICML 2018; the AdamBS paper's baseline): ``adam_impt_sampler``, a
  uniform presample of B = presample K examples scored with the logit-gradient bound and
  resampled K proportionally to the scores, switched on by a moving average of the
  estimated variance reduction;
* p^GN (Lahire's oracle): ``gradient_norm_sampler``, the exact gradient norm of every
  training example each step, K drawn proportionally.

Both are ``ScoringSampler`` s: their ``sample(state, key, score_fn)`` scores examples with
the current model through ``score_fn`` inside the one jitted step, and returns probs such
that 1 / (n probs) is each draw's unbiased importance weight (``adambs_jax.scoring``).
This module only gathers them: each lives in its own module (``adambs_jax.adam_impt``,
``adambs_jax.gradient_norm``), and the drawing steps they share in
``adambs_jax.scored_draws``.

    sampler = ab.adam_impt_sampler(n, K)                     # or ab.gradient_norm_sampler(n, K)
    step = ab.make_train_step(model_loss, optax.adam(1e-3), sampler,
                              feedback="logit_grad_norm")   # K&F's training-pass scores
    state = ab.TrainState.create(params=params, optimizer=optax.adam(1e-3), sampler=sampler)
"""

from __future__ import annotations

from adambs_jax.adam_impt import (
    UNIFORM_PHASE_SCORES,
    AdamImptState,
    adam_impt_sampler,
    variance_reduction,
)
from adambs_jax.gradient_norm import GradientNormSamplerState, gradient_norm_sampler
from adambs_jax.scored_draws import resample_proportional

__all__ = [
    "AdamImptState",
    "GradientNormSamplerState",
    "UNIFORM_PHASE_SCORES",
    "adam_impt_sampler",
    "gradient_norm_sampler",
    "variance_reduction",
    "resample_proportional",
]
