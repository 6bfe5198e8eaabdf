"""Tests of adambs_jax.host_step: the train step on a gathered batch, drawing L steps ahead."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax import _tree_utils as tree_utils
from adambs_jax.host._step import Draws, draw_from
from tests.step.test_stages import _primitives

NUM_EXAMPLES, BATCH_SIZE = 32, 4


def _data(n=NUM_EXAMPLES):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)}


_loss = ab.ModelLoss(
    lambda params, batch: batch["x"] @ params,
    lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
)


def _gathered(data, draws):
    indices = np.asarray(draws.indices)
    return {name: leaf[indices] for name, leaf in data.items()}


def _params():
    return jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)


def _run_host(step, params, key, call_keys, data):
    """Every call of ``step`` by hand: ``(state, metrics of each call)``."""
    state, pending = step.init(params, key)
    history = []
    for call_key in call_keys:
        draws = pending.pop(0)
        state, metrics, later = step(state, _gathered(data, draws), draws, call_key)
        pending.append(later)
        history.append(metrics)
    return state, history


def _reference_keys(init_key, call_keys, lookahead):
    """The keys with which make_train_step draws what the host step draws: the init's
    first L, then call t's key at step t + L."""
    return list(jax.random.split(init_key, lookahead + 1)[1:]) + list(call_keys)


@pytest.mark.parametrize(
    "lookahead",
    [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)],
)
def test_a_uniform_sampler_gives_make_train_steps_result(lookahead):
    data, num_steps = _data(), 7
    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    init_key = jax.random.key(3)
    call_keys = list(jax.random.split(jax.random.key(4), num_steps))
    host = ab.make_host_train_step(_loss, optax.adam(0.1), sampler, lookahead=lookahead)
    host_state, host_metrics = _run_host(host, _params(), init_key, call_keys, data)

    reference = ab.make_train_step(_loss, optax.adam(0.1), sampler)
    state = reference.init(_params())
    device_data = jax.tree.map(jnp.asarray, data)
    for key in _reference_keys(init_key, call_keys, lookahead)[:num_steps]:
        state, metrics = reference(state, device_data, key)
    np.testing.assert_array_equal(host_state.params, state.params)
    assert int(host_state.step) == num_steps == int(state.sampler_state.step)
    for name in ("loss", "sampled_loss", "mean_feedback", "max_weight"):
        np.testing.assert_array_equal(host_metrics[-1][name], metrics[name])


@pytest.mark.parametrize(
    "feedback",
    [
        "loss",
        pytest.param(
            ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8), marks=pytest.mark.slow
        ),
    ],
    ids=str,
)
def test_exp3_with_lookahead_one_gives_make_train_steps_result(feedback):
    # L = 1: the draws of step t come from the state after step t - 1, as in make_train_step;
    # the optimizer-aware feedback gets the optimizer state in both steps
    data, num_steps = _data(), 6
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=20, step_size=0.5)
    init_key = jax.random.key(5)
    call_keys = list(jax.random.split(jax.random.key(6), num_steps))
    host = ab.make_host_train_step(_loss, optax.adam(0.1), sampler, lookahead=1, feedback=feedback)
    host_state, _ = _run_host(host, _params(), init_key, call_keys, data)

    reference = ab.make_train_step(_loss, optax.adam(0.1), sampler, feedback=feedback)
    state = reference.init(_params())
    device_data = jax.tree.map(jnp.asarray, data)
    for key in _reference_keys(init_key, call_keys, 1)[:num_steps]:
        state, _ = reference(state, device_data, key)
    np.testing.assert_allclose(host_state.params, state.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        ab.samplers.probabilities(host_state.sampler_state),
        ab.samplers.probabilities(state.sampler_state),
        rtol=1e-6,
    )
    assert float(jnp.max(ab.samplers.probabilities(state.sampler_state))) > 1.5 / NUM_EXAMPLES


def _full_gradient(params, data):
    return jax.grad(lambda p: jnp.mean(_loss(p, data)))(params)


@pytest.mark.slow  # Monte Carlo
def test_stale_exp3_draws_give_an_unbiased_gradient():
    # L = 2: step 2 uses draws from the state after step 0, weighted by that state's p;
    # with sgd(1), params_3 = params_2 - G_hat, and E[G_hat] must be the full gradient
    data = jax.tree.map(jnp.asarray, _data(16))
    sampler = ab.exp3_sampler(16, BATCH_SIZE, num_steps=10, step_size=2.0)
    step = ab.make_host_train_step(
        _loss, optax.sgd(1.0), sampler, lookahead=2, jit=False, feedback="loss"
    )
    state, (first, second) = step.init(_params(), jax.random.key(0))

    def gradient_estimate(call_key):
        after_0, _, stale = step(state, tree_utils.gather(data, first.indices), first, call_key)
        after_1, _, _ = step(
            after_0, tree_utils.gather(data, second.indices), second, jax.random.key(1)
        )
        after_2, _, _ = step(
            after_1, tree_utils.gather(data, stale.indices), stale, jax.random.key(2)
        )
        p_stale = ab.samplers.probabilities(after_0.sampler_state)
        p_now = ab.samplers.probabilities(after_1.sampler_state)
        return after_1.params, after_1.params - after_2.params, stale.probs, p_stale, p_now

    keys = jax.random.split(jax.random.key(7), 2000)
    params_2, estimates, probs, p_stale, p_now = jax.jit(jax.vmap(gradient_estimate))(keys)
    np.testing.assert_array_equal(params_2[0], params_2[-1])  # step 2 is the same for all
    assert float(jnp.max(jnp.abs(p_stale[0] - p_now[0]))) > 1e-3  # the draws are stale
    assert float(jnp.max(probs) / jnp.min(probs)) > 1.5  # and not uniform
    expected = _full_gradient(params_2[0], data)
    mean = jnp.mean(estimates, axis=0)
    standard_error = jnp.std(estimates, axis=0) / np.sqrt(estimates.shape[0])
    assert bool(jnp.all(jnp.abs(mean - expected) <= 4.0 * standard_error + 1e-6)), (
        mean,
        expected,
        standard_error,
    )


def test_refusals_by_name():
    with pytest.raises(ValueError, match="ScoringSampler"):
        ab.make_host_train_step(_loss, optax.sgd(0.1), ab.adam_impt_sampler(NUM_EXAMPLES, 4))
    for lookahead in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="lookahead"):
            ab.make_host_train_step(
                _loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4), lookahead=lookahead
            )
    with pytest.raises(ValueError, match="feedback"):
        ab.make_host_train_step(
            _loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4), feedback="no such feedback"
        )


def test_a_batch_of_the_wrong_size_is_refused():
    step = ab.make_host_train_step(_loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4))
    state, (draws, _) = step.init(_params(), jax.random.key(0))
    data = _data()
    with pytest.raises(ValueError, match="batch: every leaf must have leading axis K"):
        step(state, {name: leaf[:3] for name, leaf in data.items()}, draws)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        step(state, _gathered(data, draws), Draws(draws.indices[:2], draws.probs[:2]))


@pytest.mark.parametrize("sampler_name", ["exp3", "uniform"])
@pytest.mark.parametrize("skip_non_finite", [True, False])
def test_the_step_has_no_while_loop_or_cond(sampler_name, skip_non_finite):
    sampler = (
        ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
        if sampler_name == "exp3"
        else ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    )
    step = ab.make_host_train_step(
        _loss, optax.adam(0.1), sampler, jit=False, skip_non_finite=skip_non_finite
    )
    state, (draws, _) = step.init(_params(), jax.random.key(0))
    jaxpr = jax.make_jaxpr(step.step_fn)(state, _gathered(_data(), draws), draws, jax.random.key(1))
    primitives = _primitives(jaxpr.jaxpr)
    # the walk sees the sampler: its tree write (the updates no longer sort)
    assert "scatter" in primitives or sampler_name == "uniform"
    assert not primitives & {"while", "cond"}, primitives & {"while", "cond"}


def test_renormalizes_every_m_calls_without_changing_the_draws():
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10, step_size=1.0)
    every = sampler.renormalize_every
    built = ab.make_host_train_step(_loss, optax.adam(0.1), sampler, lookahead=2, feedback="loss")
    calls = []

    def counting(state):
        calls.append(int(state.step))
        return built.renormalize(state)

    step = dataclasses.replace(built, renormalize=counting)
    num_calls = 2 * every + 3
    keys = jax.random.split(jax.random.key(2), num_calls)
    state, _ = _run_host(step, _params(), jax.random.key(1), keys, _data())
    assert calls == [every, 2 * every]  # before the call that would pass M updates
    assert int(state.step) == num_calls
    np.testing.assert_allclose(
        float(jnp.sum(ab.samplers.probabilities(state.sampler_state))), 1.0, rtol=1e-5
    )


def test_draw_from_uses_the_steps_sample_key():
    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    key = jax.random.key(9)
    draws = draw_from(sampler, sampler.init(), key)
    expected, _ = sampler.sample(sampler.init(), jax.random.split(key, 3)[0])
    np.testing.assert_array_equal(draws.indices, expected)
    np.testing.assert_allclose(draws.probs, 1.0 / NUM_EXAMPLES)


def _bad_draws(draws, kind):
    """``draws`` with one wrong entry of ``kind``, as numpy arrays."""
    indices = np.array(draws.indices)
    probs = np.array(draws.probs)
    if kind == "negative":
        probs[1] = -probs[1]  # would step up the loss
    elif kind == "million_times":
        probs = probs * 1e6  # p > 1: a near-zero step
    elif kind == "nan":
        probs[0] = np.nan
    elif kind == "index":
        indices[2] = NUM_EXAMPLES
    return Draws(indices, probs)


BAD_KINDS = ["negative", "million_times", "nan", "index"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_host_draws_with_invalid_values_are_refused_before_the_state_is_touched(kind):
    step = ab.make_host_train_step(_loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4))
    state, (draws, _) = step.init(_params(), jax.random.key(0))
    bad = _bad_draws(draws, kind)
    match = "draws.indices" if kind == "index" else r"draws.probs\[\d\] = .*in \(0, 1\]"
    with pytest.raises(ValueError, match=match):
        step(state, _gathered(_data(), Draws(np.asarray(draws.indices), bad.probs)), bad)
    assert not state.params.is_deleted()  # refused before the jitted step donated it
    step(state, _gathered(_data(), draws), draws)  # the valid draws still train


@pytest.mark.parametrize(
    "sampler_name, kind", [("exp3", kind) for kind in BAD_KINDS] + [("uniform", "negative")]
)
def test_device_draws_with_invalid_values_skip_the_step_and_count_it(kind, sampler_name):
    sampler = (
        ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10, step_size=0.5)
        if sampler_name == "exp3"
        else ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    )
    step = ab.make_host_train_step(_loss, optax.adam(0.1), sampler, feedback="loss")
    state, (draws, _) = step.init(_params(), jax.random.key(0))
    bad = _bad_draws(draws, kind)
    batch = _gathered(_data(), Draws(np.asarray(draws.indices), bad.probs))
    params = np.asarray(state.params)
    probabilities = np.asarray(ab.samplers.probabilities(state.sampler_state))
    on_device = Draws(jnp.asarray(bad.indices), jnp.asarray(bad.probs))
    state, metrics, _ = step(state, batch, on_device)
    np.testing.assert_array_equal(state.params, params)  # no step up the loss, no zero step
    np.testing.assert_array_equal(ab.samplers.probabilities(state.sampler_state), probabilities)
    assert int(metrics["skipped"]) == 1 == int(state.skipped_steps)
    assert int(metrics["invalid_draws"]) == 1 and int(state.step) == 1
    good = Draws(jnp.asarray(draws.indices), jnp.asarray(draws.probs))
    state, metrics, _ = step(state, _gathered(_data(), draws), good)
    assert int(metrics["invalid_draws"]) == 0 == int(metrics["skipped"])
    assert float(jnp.max(jnp.abs(state.params - params))) > 0  # valid draws train
