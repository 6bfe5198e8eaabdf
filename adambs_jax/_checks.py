"""Argument checks shared by every module: one idiom, one message style.

Every check raises ``ValueError`` (a value out of range, a wrong shape) or ``TypeError``
(a wrong kind of object) whose message names the argument and says what was expected, and
returns the value in its normalized form (``float`` for numbers), so a factory reads

    num_examples = check_int("num_examples", num_examples)
    p_min = check_number("p_min", p_min, positive=True)

Checks run in Python at build or trace time; none of them adds work to a compiled step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "check_int",
    "check_optional_int",
    "check_bool",
    "check_number",
    "check_per_draw",
    "check_state_size",
    "is_prng_key",
    "check_key",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools are refused (``True`` is not a size)."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int = 1) -> int | None:
    """None, or ``value`` as an int >= ``minimum`` (e.g. an optional chunk size)."""
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} or None, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` itself if it is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float; refuses bools, non-numbers, NaN and (by default) infinities.

    ``positive``: must be > 0; ``nonnegative``: must be >= 0.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        and not (hasattr(value, "__float__") and jnp.ndim(value) == 0)
    ):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if nonnegative and not number >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_per_draw(name: str, value: Any, batch_size: int) -> None:
    """``value`` has shape (K,): one entry per draw of the batch (indices, feedback, ...)."""
    if jnp.ndim(value) != 1 or jnp.shape(value)[0] != batch_size:
        raise ValueError(
            f"{name} must have shape ({batch_size},) (one entry per draw), got {jnp.shape(value)}"
        )


def check_state_size(
    state: Any, num_examples: int, *, name: str = "state", owner: str = "this sampler"
) -> None:
    """A sampler state built for another dataset size does not fit: its static
    ``num_examples`` (when it has one) must equal ``num_examples``."""
    state_examples = getattr(state, "num_examples", None)
    if _is_int(state_examples) and state_examples != num_examples:
        raise ValueError(
            f"{name}: built for num_examples={state_examples}, but {owner} has "
            f"num_examples={num_examples}"
        )


def is_prng_key(value: Any) -> bool:
    """Whether ``value`` is a typed PRNG key array (``jax.random.key``), abstract or not."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def check_key(key: Any, *, name: str = "key") -> None:
    """Raises ValueError (naming ``name``) unless ``key`` is a PRNG key: a typed key array of
    shape () (``jax.random.key``) or a raw uint32 key of shape (m,) (``jax.random.PRNGKey``)."""
    shape, dtype = jnp.shape(key), getattr(key, "dtype", None)
    if is_prng_key(key):
        if shape != ():
            raise ValueError(
                f"{name} must be a single PRNG key of shape (), got a key array of shape {shape}"
            )
        return
    if dtype != jnp.uint32 or len(shape) != 1:
        raise ValueError(
            f"{name} must be a PRNG key (jax.random.key(seed), or a raw uint32 key of shape "
            f"(m,) from jax.random.PRNGKey), got shape {shape} and dtype {dtype}"
        )
