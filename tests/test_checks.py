"""Tests of adambs_jax.checks: one idiom of argument validation, errors that name the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax import _checks as checks
from adambs_jax.samplers import UniformSamplerState


@pytest.mark.parametrize("value", [1, 7, 2**40])
def test_check_int_returns_the_int(value):
    assert checks.check_int("size", value) == value
    assert type(checks.check_int("size", value)) is int


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "3", None, np.float32(2)])
def test_check_int_refuses_non_ints_bools_and_small_values(value):
    with pytest.raises(ValueError, match=r"size must be an int >= 1, got"):
        checks.check_int("size", value)


def test_check_int_minimum():
    assert checks.check_int("count", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        checks.check_int("count", -1, minimum=0)


def test_check_optional_int():
    assert checks.check_optional_int("chunk_size", None) is None
    assert checks.check_optional_int("chunk_size", 4) == 4
    for bad in (True, 0, 1.5):
        with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1 or None, got"):
            checks.check_optional_int("chunk_size", bad)


def test_check_bool_refuses_truthy_values():
    assert checks.check_bool("jit", True) is True
    assert checks.check_bool("jit", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(TypeError, match="jit must be a bool, got"):
            checks.check_bool("jit", bad)


def test_check_number():
    assert checks.check_number("lr", 3) == 3.0
    assert isinstance(checks.check_number("lr", np.float32(0.5)), float)
    assert checks.check_number("lr", jnp.asarray(0.25)) == 0.25
    assert checks.check_number("bound", float("inf"), finite=False) == float("inf")
    with pytest.raises(ValueError, match="lr must be a number"):
        checks.check_number("lr", True)
    with pytest.raises(ValueError, match="lr must be a number"):
        checks.check_number("lr", "0.1")
    with pytest.raises(ValueError, match="lr must be a number"):
        checks.check_number("lr", jnp.ones(2))
    with pytest.raises(ValueError, match="lr must be a finite number"):
        checks.check_number("lr", float("nan"))
    with pytest.raises(ValueError, match="lr must be a finite number"):
        checks.check_number("lr", float("inf"))
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        checks.check_number("lr", 0.0, positive=True)
    assert checks.check_number("p", 0.0, nonnegative=True) == 0.0
    with pytest.raises(ValueError, match="p must be a finite number >= 0"):
        checks.check_number("p", -1e-9, nonnegative=True)


def test_check_per_draw():
    checks.check_per_draw("feedback", jnp.ones(4), 4)
    with pytest.raises(ValueError, match=r"feedback must have shape \(4,\) \(one entry per draw\)"):
        checks.check_per_draw("feedback", jnp.ones(3), 4)
    with pytest.raises(ValueError, match="indices must have shape"):
        checks.check_per_draw("indices", jnp.ones((4, 1)), 4)


def test_check_state_size():
    state = UniformSamplerState(step=jnp.zeros((), jnp.int32), num_examples=10)
    checks.check_state_size(state, 10)
    checks.check_state_size(jnp.zeros(()), 10)  # a state without a static size fits any
    with pytest.raises(
        ValueError,
        match="state.sampler_state: built for num_examples=10, but the step's sampler has "
        "num_examples=20",
    ):
        checks.check_state_size(state, 20, name="state.sampler_state", owner="the step's sampler")


def test_is_prng_key():
    assert checks.is_prng_key(jax.random.key(0))
    assert checks.is_prng_key(jax.random.split(jax.random.key(0), 3))
    assert checks.is_prng_key(jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    assert not checks.is_prng_key(jax.random.PRNGKey(0))  # raw uint32 keys are not typed
    assert not checks.is_prng_key(jnp.zeros(2))
    assert not checks.is_prng_key(None)
    seen = []  # and on a tracer, at trace time
    jax.jit(lambda key: seen.append(checks.is_prng_key(key)))(jax.random.key(0))
    assert seen == [True]


def test_check_key():
    checks.check_key(jax.random.key(0))
    checks.check_key(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="state.key must be a single PRNG key of shape"):
        checks.check_key(jax.random.split(jax.random.key(0), 2), name="state.key")
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        checks.check_key(jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        checks.check_key(jnp.zeros((2, 2), jnp.uint32))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        checks.check_key(3)
