"""Tests of adambs_jax.train_loop: N steps in one jitted lax.scan
(``make_train_step(..., steps_per_call=N)``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab

NUM_EXAMPLES, BATCH_SIZE = 16, 4


def _loss(params, batch):
    return jnp.square(batch["x"] @ params["w"] - batch["y"])


def _problem():
    x = jnp.linspace(-1.0, 1.0, 2 * NUM_EXAMPLES).reshape(NUM_EXAMPLES, 2)
    return {"w": jnp.ones(2)}, {"x": x, "y": x[:, 0] - 0.5 * x[:, 1]}


def _steps(sampler, steps_per_call, **options):
    return ab.make_train_step(
        _loss, optax.adam(0.1), sampler, feedback="loss", steps_per_call=steps_per_call, **options
    )


def _assert_same(many, single):
    np.testing.assert_allclose(many.params["w"], single.params["w"], rtol=1e-5)
    chex.assert_trees_all_equal(many.sampler_state, single.sampler_state)
    assert int(many.step) == int(single.step)


@pytest.mark.parametrize("step_size", [0.5, 5.0])  # 5.0: M < N, renormalized inside the scan
def test_n_steps_in_one_call_equal_n_single_steps_with_the_split_keys(step_size):
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, step_size=step_size, p_min=1e-3)
    params, data = _problem()
    num_steps = 25
    many = _steps(sampler, num_steps)
    state, metrics = many(many.init(params), data, jax.random.key(7))
    assert metrics["loss"].shape == (num_steps,) and metrics["skipped"].shape == (num_steps,)
    single = _steps(sampler, 1, jit=False)  # pure: renormalize where the scan does
    expected = single.init(params)
    every = sampler.renormalize_every
    for t, key in enumerate(jax.random.split(jax.random.key(7), num_steps)):
        expected, _ = jax.jit(single)(expected, data, key)
        if num_steps > every and (t + 1) % every == 0:
            expected = expected._replace(sampler_state=sampler.renormalize(expected.sampler_state))
    _assert_same(state, expected)
    assert (int(state.sampler_state.num_rescales) > 0) == (num_steps > every)


def test_without_a_key_the_state_key_advances_each_step():
    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    params, data = _problem()
    many = _steps(sampler, 5)
    state, metrics = many(many.init(params, key=jax.random.key(1)), data)
    single = _steps(sampler, 1)
    expected = single.init(params, key=jax.random.key(1))
    for _ in range(5):
        expected, _ = single(expected, data)
    _assert_same(state, expected)
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(expected.key))
    assert metrics["loss"].shape == (5,)


def test_steps_per_call_is_validated():
    with pytest.raises(ValueError, match="steps_per_call"):
        _steps(ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE), 0)


def test_has_aux_metrics_are_stacked_per_step():
    def loss_with_aux(params, batch):
        residual = batch["x"] @ params["w"] - batch["y"]
        return jnp.square(residual), {"max_residual": jnp.max(jnp.abs(residual))}

    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    params, data = _problem()
    keys = jax.random.split(jax.random.key(3), 4)
    many = ab.make_train_step(
        ab.Loss(loss_with_aux, has_aux=True),
        optax.adam(0.1),
        sampler,
        feedback="loss",
        steps_per_call=4,
    )
    state, metrics = many(many.init(params), data, jax.random.key(3))
    single = ab.make_train_step(
        ab.Loss(loss_with_aux, has_aux=True), optax.adam(0.1), sampler, feedback="loss"
    )
    expected, aux = single.init(params), []
    for key in keys:
        expected, step_metrics = single(expected, data, key)
        aux.append(float(step_metrics["aux"]["max_residual"]))
    _assert_same(state, expected)
    assert metrics["aux"]["max_residual"].shape == (4,)
    np.testing.assert_allclose(metrics["aux"]["max_residual"], aux, rtol=1e-5)
