"""The hook for model-aware samplers: samplers that score candidate examples with the
current model before they draw the batch.

Some samplers need the model, not only past feedback, to choose a batch: Katharopoulos &
Fleuret's "Adam-impt" (the AdamBS paper's baseline; Liu, Wu, Mozafari, NeurIPS 2020, §5)
scores a uniform presample of 3K examples with the logit-gradient bound and resamples K of
them; Lahire's p^GN sampler needs the exact gradient norm of all n examples every step. Such
a sampler is a ``ScoringSampler``: its ``sample`` takes a third argument,

    score_fn(indices (M,) int32) -> scores (M,) float32

a closure built by the train step over the current parameters and the on-device dataset,
which returns the feedback of kind ``score_feedback`` of examples ``data[indices]``
(computed in chunks of ``score_chunk_size`` if given, to bound memory). Everything stays
inside the one jitted step.

A scoring sampler's ``sample`` returns ``(indices (K,), probs (K,), state)``: ``probs`` must
be such that ``1 / (n probs)`` is the unbiased importance weight of each draw (for a presample
of B uniform draws resampled with probabilities q: probs = B q / n), and ``state`` may record
what the scores taught it (Adam-impt's moving average of the variance reduction, which
decides when to switch importance sampling on); the step then passes that state to
``update(state, indices, feedback)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from adambs_jax._checks import check_optional_int
from adambs_jax._tree_utils import gather
from adambs_jax.feedback._kinds import feedback_function
from adambs_jax.feedback._losses import PerExampleLoss, as_loss, loss_callable
from adambs_jax.samplers import ScoreFn

__all__ = ["make_score_fn"]


def make_score_fn(
    loss_fn: PerExampleLoss,
    feedback: Any,
    params: Any,
    data: Any,
    key: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
) -> ScoreFn:
    """A ``score_fn(indices) -> (M,)`` scoring ``data[indices]`` at ``params``.

    Args:
      loss_fn: the per-example loss: a ``Loss``, a ``ModelLoss`` (needed for
        ``"logit_grad_norm"``) or a callable ``(params, batch[, key]) -> (K,)``.
      feedback: the kind of score: a ``Feedback``, a name of ``FEEDBACK_KINDS`` or a
        callable ``(params, batch, losses) -> (K,)``.
      params: the current parameters.
      data: the dataset, a pytree with leading axis n, on device.
      key: PRNG key for a stochastic model (chunk c uses ``jax.random.fold_in(key, c)``).
      chunk_size: if given and M > chunk_size, score in ceil(M / chunk_size) sequential
        chunks (the last one padded with index 0 and the padding discarded).

    Returns:
      ``score_fn``; its result is ``jax.lax.stop_gradient``-ed float32.
    """
    chunk_size = check_optional_int("chunk_size", chunk_size)
    score_batch = feedback_function(feedback, loss_callable(as_loss(loss_fn)))

    def score(indices, chunk_key):
        scores = score_batch(params, gather(data, indices), chunk_key)
        if jnp.shape(scores) != indices.shape:
            raise ValueError(
                f"feedback {getattr(feedback, 'name', feedback)!r} (a scoring sampler's "
                f"score_feedback) must give one score per example, shape {indices.shape}, "
                f"got {jnp.shape(scores)}"
            )
        return jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))

    def score_fn(indices: jax.Array) -> jax.Array:
        indices = jnp.asarray(indices, jnp.int32)
        if indices.ndim != 1:
            raise ValueError(f"indices must have shape (M,), got {indices.shape}")
        num = indices.shape[0]
        if chunk_size is None or num <= chunk_size:
            return score(indices, key)
        num_chunks = math.ceil(num / chunk_size)
        padded = jnp.zeros((num_chunks * chunk_size,), jnp.int32).at[:num].set(indices)
        chunks = padded.reshape(num_chunks, chunk_size)
        chunk_ids = jnp.arange(num_chunks)
        if key is None:
            scores = jax.lax.map(lambda args: score(args[0], None), (chunks, chunk_ids))
        else:
            base_key = key  # a local: pyright does not narrow key inside the lambda
            scores = jax.lax.map(
                lambda args: score(args[0], jax.random.fold_in(base_key, args[1])),
                (chunks, chunk_ids),
            )
        return scores.reshape(-1)[:num]

    return score_fn
