"""The uniform sampler as pure functions: p_j = 1/n, nothing learned.

``uniform_config`` validates the arguments of ``uniform_sampler`` into a frozen
``UniformConfig``; ``init``, ``sample`` and ``update`` take it as their first argument, and
the factory binds it. With probs = 1/n the importance weights 1 / (n p) are 1: training with
this sampler is plain mini-batch training, the baseline of every comparison.

Reference: Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020,
§5 (the uniform-sampling baselines Adam, SGD, RMSProp).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from flax import struct

from adambs_jax._checks import check_int, check_key, check_per_draw
from adambs_jax.samplers._base import Sampler, SamplerStateBase

__all__ = [
    "UniformSamplerState",
    "UniformConfig",
    "uniform_config",
    "init",
    "sample",
    "update",
    "distribution",
    "uniform_sampler",
]


@struct.dataclass
class UniformSamplerState(SamplerStateBase):
    """State of ``uniform_sampler``: nothing is learned; p_j = 1/n.

    ``num_examples`` is static (part of the pytree structure), so a state of another
    dataset size does not fit a compiled step or a checkpoint of this one.
    """

    step: jax.Array  # int32 scalar, number of updates seen
    num_examples: int = struct.field(pytree_node=False)

    def probabilities(self) -> jax.Array:
        return distribution(self)


class UniformConfig(NamedTuple):
    """The validated, static configuration of a ``uniform_sampler``: n and K (both >= 1)."""

    num_examples: int
    batch_size: int


INT32_MAX = 2**31 - 1


def uniform_config(num_examples: int, batch_size: int) -> UniformConfig:
    """Validates n and K (ints >= 1, not bools; ValueError naming the argument). n > 2^31 - 1
    needs int64 indices, i.e. ``jax_enable_x64`` on when the sampler is built."""
    num_examples = check_int("num_examples", num_examples)
    # jax's config sets its options as attributes at run time: type checkers cannot see them
    if num_examples > INT32_MAX and not cast(Any, jax.config).jax_enable_x64:
        raise ValueError(
            f"num_examples={num_examples} exceeds int32 indices (at most {INT32_MAX}); "
            f"enable 64-bit types (jax.config.update('jax_enable_x64', True)) for int64 indices"
        )
    return UniformConfig(num_examples, check_int("batch_size", batch_size))


def index_dtype(num_examples: int):
    """int32, or int64 for n > 2^31 - 1."""
    return jnp.int64 if num_examples > INT32_MAX else jnp.int32


def init(config: UniformConfig) -> UniformSamplerState:
    return UniformSamplerState(step=jnp.zeros((), jnp.int32), num_examples=config.num_examples)


def sample(config: UniformConfig, state: UniformSamplerState, key: jax.Array):
    """K indices i.i.d. uniform on {0..n-1} and their probabilities 1/n (K,)."""
    del state
    check_key(key, name="key")
    n, batch_size = config.num_examples, config.batch_size
    indices = jax.random.randint(key, (batch_size,), 0, n, dtype=index_dtype(n))
    return indices, jnp.full((batch_size,), 1.0 / n, jnp.float32)


def update(config: UniformConfig, state: UniformSamplerState, indices, feedback, *, apply=True):
    """Checks the draws and counts the step (not when ``apply`` is False); the feedback is
    not used.

    Raises:
      TypeError: ``indices`` are not integers.
    """
    check_per_draw("indices", indices, config.batch_size)
    check_per_draw("feedback", feedback, config.batch_size)
    if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
        raise TypeError(f"indices must have an integer dtype, got {jnp.result_type(indices)}")
    return state.replace(step=state.step + jnp.asarray(apply, bool).astype(jnp.int32))


def distribution(state: UniformSamplerState) -> jax.Array:
    """p = 1/n (n,)."""
    n = state.num_examples
    return jnp.full((n,), 1.0 / n, jnp.float32)


def uniform_sampler(num_examples: int, batch_size: int) -> Sampler:
    """Draws K indices i.i.d. uniformly from {0..n-1}; probs = 1/n, so the importance
    weights are 1 and training is plain mini-batch training. ``update`` learns nothing.

    Indices are int32, or int64 when n > 2^31 - 1 (which needs ``jax_enable_x64``; without
    it such an n is refused, naming ``num_examples``).

    References:
      Liu, Wu, Mozafari, "Adam with Bandit Sampling for Deep Learning", NeurIPS 2020, §5
      (the uniform baselines: Adam, SGD, RMSProp).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import adambs_jax as ab
      >>> sampler = ab.uniform_sampler(10, 4)
      >>> state = sampler.init()
      >>> indices, probs = sampler.sample(state, jax.random.key(0))
      >>> indices.shape, indices.dtype, [round(float(p), 6) for p in probs]
      ((4,), dtype('int32'), [0.1, 0.1, 0.1, 0.1])
      >>> int(sampler.update(state, indices, jnp.ones(4)).step)
      1
    """
    config = uniform_config(num_examples, batch_size)
    init_fn = functools.partial(init, config)
    sample_fn = functools.partial(sample, config)
    update_fn = functools.partial(update, config)
    return Sampler(
        init_fn, sample_fn, update_fn, config.num_examples, config.batch_size, distribution
    )
