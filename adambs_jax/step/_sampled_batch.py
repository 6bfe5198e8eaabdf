"""A batch that carries its importance weights in and its feedback out of a step you wrote.

``Sampling.draw`` returns a ``SampledBatch``: the gathered examples data[I], read like the
data (``batch["image"]``, ``x, y = batch``), plus what bandit sampling needs around them:
the importance weights w = 1 / (n p_I) (K,), the indices I (K,), and a feedback slot, a
JAX mutable array reference (``jax.Ref``) of K floats. ``ab.value_and_grad`` reads the
weights from the batch and writes the batch's per-example feedback into the slot, on the
device, from inside the user's own ``jax.jit`` or ``nnx.jit`` step: a reference passed into
a jitted function keeps what the function wrote into it, so the feedback leaves the step
without being returned and without a host round trip. ``Sampling`` reads the slot when it
learns.

The slot starts as ``UNWRITTEN`` (-1 in every entry: feedback is never negative, so the
sampler drops such entries as invalid) so that a step which never wrote is told apart from
one whose feedback was NaN.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
eq. 1 (the weights) and Algorithm 2 (the feedback).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "SampledBatch",
    "UNWRITTEN",
    "unwritten_feedback",
    "find_sampled_batch",
]

# what the feedback slot holds until a step writes it (feedback is non-negative)
UNWRITTEN = -1.0


def unwritten_feedback(batch_size: int) -> jax.Array:
    """What a fresh feedback slot holds: ``batch_size`` float32 ``UNWRITTEN`` (the slot is
    ``jax.new_ref`` of it; ``Sampling`` makes it inside its jitted draw)."""
    return jnp.full((batch_size,), UNWRITTEN, jnp.float32)


@jax.tree_util.register_pytree_with_keys_class
class SampledBatch:
    """K examples drawn by ``ab.Sampling``: the data, their weights, indices and feedback slot.

    A pytree (it crosses ``jax.jit`` and ``nnx.jit`` like the dict it wraps), read like its
    data: ``batch[key]``, ``len(batch)``, iteration, and ``keys``/``values``/``items`` when
    the data is a mapping. Give it to ``ab.value_and_grad``'s function (or to
    ``ab.value_and_grad(..., batch=batch)`` when your loss closes over it): the loss receives
    the plain data, the gradient is G_hat with these weights, and the feedback is written
    into the batch for ``Sampling`` to learn from.

    Attributes:
      data: the gathered examples data[I] (the indices I themselves when the ``Sampling``
        has no data).
      weights: (K,) float32, the importance weights 1 / (n p_I).
      indices: (K,) int32, I.
      feedback: the feedback slot, a ``jax.Ref`` (K,) float32 (write ``batch.feedback[...] =
        scores`` yourself if you compute the gradient some other way).
    """

    __slots__ = ("data", "weights", "indices", "feedback")

    def __init__(self, data: Any, weights: Any, indices: Any, feedback: Any):
        self.data, self.weights, self.indices, self.feedback = data, weights, indices, feedback

    def tree_flatten_with_keys(self):
        GetAttrKey = jax.tree_util.GetAttrKey
        children = [(GetAttrKey(name), getattr(self, name)) for name in self.__slots__]
        return children, None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        del aux_data
        return cls(*children)

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __contains__(self, key: Any) -> bool:
        return key in self.data

    def keys(self):
        return self._mapping("keys").keys()

    def values(self):
        return self._mapping("values").values()

    def items(self):
        return self._mapping("items").items()

    def _mapping(self, method: str) -> Mapping:
        if not isinstance(self.data, Mapping):
            raise TypeError(
                f"SampledBatch.{method}(): the data is a {type(self.data).__name__}, not a "
                f"mapping; index it or iterate it as you would the data"
            )
        return self.data

    def __repr__(self) -> str:
        shapes = jax.tree.map(lambda leaf: getattr(leaf, "shape", leaf), self.data)
        return f"SampledBatch(data={shapes}, batch_size={jnp.shape(self.weights)[0]})"


def find_sampled_batch(bound: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """``(batch, args, kwargs)``: the one ``SampledBatch`` given to a gradient function (bound
    at its construction, or among its arguments, at the top level), and the arguments with
    that batch replaced by its plain data (what the user's loss was written for)."""
    found = [bound] if isinstance(bound, SampledBatch) else []
    found += [a for a in args if isinstance(a, SampledBatch)]
    found += [v for v in kwargs.values() if isinstance(v, SampledBatch)]
    if len(found) > 1:
        raise TypeError(
            f"batch: {len(found)} SampledBatch arguments (bound with batch= and/or passed); "
            f"give the gradient function the one batch the loss is computed on"
        )
    if not found:
        return None, args, kwargs

    def plain(value):
        return value.data if isinstance(value, SampledBatch) else value

    return found[0], tuple(plain(a) for a in args), {k: plain(v) for k, v in kwargs.items()}
