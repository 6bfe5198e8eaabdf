"""Per-example losses and feedback: what the step differentiates and what a sampler learns from.

A loss gives one value per example and says how it is called (``Loss``; ``ModelLoss``: the
split at the model's outputs that the logit bound needs). Feedback is the per-example score
f_k >= 0 a sampler learns p from (AdamBS Algorithm 2 feeds the bandit ||g_{i_k}||): the
exact gradient norm (ghost norms from one backward pass, ``adambs_jax.feedback.ghost``, or
``vmap``), the Katharopoulos–Fleuret logit bound, the loss, the norm preconditioned by the
optimizer, or a callable: each an object carrying its settings
(``GradNorm(method="vmap")``), with shorthand names (``FEEDBACK_KINDS``). The tools here
compute them on their own (``per_example_grad_norms``, ...), for hand-written loops
(``importance_weighted_grad``) and for scoring samplers (``make_score_fn``).

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020.
"""

from adambs_jax import _deprecated
from adambs_jax.feedback import ghost
from adambs_jax.feedback._estimators import importance_weighted_grad
from adambs_jax.feedback._kinds import (
    FEEDBACK_KINDS,
    CustomFeedback,
    Feedback,
    FeedbackFn,
    GradNorm,
    LogitGradNorm,
    LossValue,
    PreconditionedGradNorm,
    logit_grad_norms,
    preconditioned_grad_norms,
    tree_norms,
)
from adambs_jax.feedback._losses import Loss, ModelLoss, PerExampleLoss
from adambs_jax.feedback._per_example import per_example_losses, per_example_losses_and_grads
from adambs_jax.feedback._scoring import make_score_fn
from adambs_jax.feedback.ghost import per_example_grad_norms

__all__ = [
    "ghost",
    # the losses
    "Loss",
    "ModelLoss",
    # the feedback kinds
    "Feedback",
    "GradNorm",
    "LogitGradNorm",
    "LossValue",
    "PreconditionedGradNorm",
    "CustomFeedback",
    "FEEDBACK_KINDS",
    "FeedbackFn",
    # the tools
    "PerExampleLoss",
    "per_example_losses",
    "per_example_losses_and_grads",
    "per_example_grad_norms",
    "logit_grad_norms",
    "preconditioned_grad_norms",
    "tree_norms",
    "importance_weighted_grad",
    "make_score_fn",
]

__getattr__ = _deprecated.forwarding_getattr(
    "adambs_jax.feedback",
    {
        name: ("adambs_jax.feedback._kinds", "the feedback objects of adambs_jax.feedback")
        for name in ("batch_size_of losses_and_output_grads feedback_function").split()
    },
)
