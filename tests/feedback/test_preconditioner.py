"""Tests of adambs_jax.preconditioner: ||g_k / (sqrt(v_hat) + eps)|| against a float64
reference, for the optimizer states it reads (Adam, AMSGrad, RMSProp; chains,
inject_hyperparams, masked), its fallback before the first update, and its refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adambs_jax.feedback import _preconditioner as preconditioner

K = 4


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    }
    x = rng.normal(size=(K, 3))
    y = rng.normal(size=(K, 2))
    return params, x, y


def _per_example_grads64(params, x, y):
    """g_k of 0.5 ||x_k W + b - y_k||^2 in float64: dW = x_k r_k^T, db = r_k."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    r = x @ w + b - y
    return {"w": x[:, :, None] * r[:, None, :], "b": r}


def _trained_state(optimizer, params, x, y, steps=3):
    """The optimizer state after ``steps`` updates with the (mean) gradients."""
    state = optimizer.init(params)
    grads = jax.tree.map(
        lambda g: jnp.asarray(g.mean(0), jnp.float32), _per_example_grads64(params, x, y)
    )
    for t in range(steps):
        scaled = jax.tree.map(lambda g, t=t: g * (1.0 + t), grads)  # a varying gradient
        _, state = optimizer.update(scaled, state, params)
    return state


def _reference(grads, nu_hat, eps, covered=("w", "b")):
    total = np.zeros(K)
    for name, g in grads.items():
        scale = (
            1.0 / (np.sqrt(np.asarray(nu_hat[name], np.float64)) + eps) if name in covered else 1.0
        )
        total += np.sum(((g * scale).reshape(K, -1)) ** 2, axis=1)
    return np.sqrt(total)


def _norms(grads, params, opt_state):
    grads32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
    return np.asarray(preconditioner.preconditioned_norms(grads32, params, opt_state))


def test_adam_nu_is_bias_corrected_with_its_count_in_a_chain():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    state = _trained_state(
        optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.1)), params, x, y
    )
    adam = state[1][0]
    nu_hat = {k: np.asarray(v, np.float64) / (1 - 0.999**3) for k, v in adam.nu.items()}
    np.testing.assert_allclose(
        _norms(grads, params, state), _reference(grads, nu_hat, 1e-8), rtol=2e-5
    )


def test_injected_b2_and_eps_are_read_from_the_state():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=0.1, b2=0.9, eps=1e-2)
    state = _trained_state(optimizer, params, x, y, steps=2)
    nu_hat = {
        k: np.asarray(v, np.float64) / (1 - 0.9**2) for k, v in state.inner_state[0].nu.items()
    }
    np.testing.assert_allclose(
        _norms(grads, params, state), _reference(grads, nu_hat, 1e-2), rtol=2e-5
    )


def test_rmsprop_and_amsgrad():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    rms = _trained_state(optax.rmsprop(0.1, decay=0.99, eps=1e-8, eps_in_sqrt=False), params, x, y)
    nu = {k: np.asarray(v, np.float64) for k, v in rms[0].nu.items()}  # no bias correction
    np.testing.assert_allclose(_norms(grads, params, rms), _reference(grads, nu, 1e-8), rtol=2e-5)
    ams = _trained_state(optax.amsgrad(0.1), params, x, y)
    nu_max = {k: np.asarray(v, np.float64) for k, v in ams[0].nu_max.items()}
    np.testing.assert_allclose(
        _norms(grads, params, ams), _reference(grads, nu_max, 1e-8), rtol=2e-5
    )


def test_a_masked_out_parameter_enters_unscaled():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    optimizer = optax.masked(optax.adam(0.1), {"w": True, "b": False})
    state = _trained_state(optimizer, params, x, y, steps=2)
    nu_hat = {"w": np.asarray(state.inner_state[0].nu["w"], np.float64) / (1 - 0.999**2)}
    np.testing.assert_allclose(
        _norms(grads, params, state), _reference(grads, nu_hat, 1e-8, covered=("w",)), rtol=2e-5
    )


def test_before_the_first_update_it_is_the_plain_gradient_norm():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    plain = np.sqrt(sum(np.sum(g.reshape(K, -1) ** 2, axis=1) for g in grads.values()))
    for optimizer in (optax.adam(0.1), optax.rmsprop(0.1)):
        np.testing.assert_allclose(_norms(grads, params, optimizer.init(params)), plain, rtol=1e-5)
    # after one update it is not
    state = _trained_state(optax.adam(0.1), params, x, y, steps=1)
    assert not np.allclose(_norms(grads, params, state), plain, rtol=1e-2)


def test_an_optimizer_without_a_second_moment_is_refused():
    params, x, y = _problem()
    grads = _per_example_grads64(params, x, y)
    for optimizer in (optax.sgd(0.1), optax.sgd(0.1, momentum=0.9)):
        with pytest.raises(ValueError, match="needs an optimizer with a second-moment"):
            _norms(grads, params, optimizer.init(params))
    assert preconditioner.second_moments(optax.sgd(0.1).init(params)) == []
