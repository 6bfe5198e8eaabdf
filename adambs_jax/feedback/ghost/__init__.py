"""Ghost norms: exact per-example gradient norms from one backward pass.

``per_example_grad_norms(loss_fn, params, batch, key=None, method="ghost"|"vmap"|"auto")``
and, for the train step, ``ghost_losses_grad_and_norms(loss_fn, params, batch, weights, key)
-> (losses, G_hat, norms)``. Modules: ``_layer_norms`` (the per-layer math), ``_sites`` (which
layer calls cover which parameters), ``_linen`` / ``_nnx`` (interception of Flax layers without
changing model code), ``_api`` (the public functions).
"""

from adambs_jax.feedback.ghost._api import (
    METHODS,
    GhostCoverage,
    ghost_coverage,
    ghost_losses_grad_and_norms,
    per_example_grad_norms,
)

__all__ = [
    "METHODS",
    "GhostCoverage",
    "ghost_coverage",
    "ghost_losses_grad_and_norms",
    "per_example_grad_norms",
]
