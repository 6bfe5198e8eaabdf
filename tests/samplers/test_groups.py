"""Tests for adambs_jax.groups: the bandit over fixed groups of contiguous examples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers import _groups as groups
from adambs_jax.samplers._groups import GroupSamplerState, group_sampler
from tests.helpers import run_api_doc_example

N, K, M = 32, 8, 4  # G = 8 groups, B = 2 drawn per step


def _trained_state(sampler, updates=40, seed=0):
    """A state whose group distribution is far from uniform: feedback grows with the index."""

    def one_update(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, (indices.astype(jnp.float32) + 1.0) ** 2), None

    keys = jax.random.split(jax.random.key(seed), updates)
    return jax.jit(lambda state: jax.lax.scan(one_update, state, keys)[0])(sampler.init())


def _draws(sampler, state, num_draws, seed=1):
    keys = jax.random.split(jax.random.key(seed), num_draws)
    return jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(state, keys)


@pytest.fixture(scope="module")
def exp3_groups():
    sampler = group_sampler(N, K, M, num_steps=100, step_size=0.5)
    return sampler, _trained_state(sampler)


def test_drawn_groups_follow_the_base_distribution(exp3_groups):
    sampler, state = exp3_groups
    q = np.asarray(sampler.probabilities(state))[::M] * M  # the base's q (G,)
    np.testing.assert_allclose(q, np.asarray(ab.samplers.probabilities(state.base)), rtol=1e-6)
    np.testing.assert_array_equal(ab.samplers.probabilities(state), sampler.probabilities(state))
    assert q.max() / q.min() > 1.5  # a non-uniform state
    indices, _ = _draws(sampler, state, 20000)
    counts = np.bincount(np.asarray(indices[:, ::M]).ravel() // M, minlength=N // M)
    assert stats.chisquare(counts, counts.sum() * q).pvalue > 1e-3


def test_draws_are_contiguous_runs_with_the_group_probability(exp3_groups):
    sampler, state = exp3_groups
    indices, probs = (np.asarray(a) for a in _draws(sampler, state, 200))
    runs = indices.reshape(200, K // M, M)
    assert np.all(runs[..., 0] % M == 0) and np.all(np.diff(runs, axis=-1) == 1)
    q = np.asarray(ab.samplers.probabilities(state.base))
    np.testing.assert_allclose(probs, q[indices // M] / M, rtol=1e-6)


def test_weighted_gradient_estimate_is_unbiased(exp3_groups):
    sampler, state = exp3_groups
    grads = np.random.default_rng(0).normal(size=(N, 3)) + np.arange(N)[:, None] / 4.0
    indices, probs = _draws(sampler, state, 40000, seed=2)
    weights = np.asarray(jax.vmap(functools.partial(ab.importance_weights, num_examples=N))(probs))
    estimates = np.einsum("rk,rkd->rd", weights, grads[np.asarray(indices)]) / K
    error = estimates.mean(axis=0) - grads.mean(axis=0)
    standard_error = estimates.std(axis=0) / np.sqrt(len(estimates))
    assert np.all(np.abs(error) < 4.5 * standard_error)
    # the unweighted batch mean is biased on this state: the test can fail
    biased = grads[np.asarray(indices)].mean(axis=(0, 1)) - grads.mean(axis=0)
    assert np.any(np.abs(biased) > 20 * standard_error)
    # the exact expectation, sum_g q_g (B/K) sum_{j in g} g_j / (G q_g), is the mean
    q = np.asarray(ab.samplers.probabilities(state.base))
    exact = sum(
        q[g] * (K // M) / K * grads[g * M : (g + 1) * M].sum(0) / (N // M * q[g])
        for g in range(N // M)
    )
    np.testing.assert_allclose(exact, grads.mean(axis=0), rtol=1e-5)
    # and its variance is (1/B) ((1/G^2) sum_g ||gbar_g||^2 / q_g - ||gbar||^2)
    group_means = grads.reshape(N // M, M, 3).mean(axis=1)
    variance = (
        np.sum(np.square(group_means).sum(1) / q) / (N // M) ** 2 - np.square(grads.mean(0)).sum()
    ) / (K // M)
    np.testing.assert_allclose(estimates.var(axis=0).sum(), variance, rtol=0.05)


def test_group_feedback_is_the_root_mean_square_and_invalid_groups_are_nan():
    config = groups.group_config(8, 4, 2)
    out = np.asarray(groups.group_feedback(config, jnp.array([3.0, 4.0, 1.0, -1.0])))
    np.testing.assert_allclose(out[0], np.sqrt(12.5), rtol=1e-6)
    assert np.isnan(out[1])  # a negative value is never squared into valid feedback
    assert np.isnan(np.asarray(groups.group_feedback(config, jnp.array([1, 1, jnp.nan, 1])))[1])
    # the RMS bounds the norm of the group's mean gradient (triangle + power mean)
    g = np.random.default_rng(1).normal(size=(2, 5))
    rms = float(groups.group_feedback(groups.group_config(2, 2, 2), np.linalg.norm(g, axis=1))[0])
    assert np.linalg.norm(g.mean(0)) <= rms


@pytest.mark.parametrize("base", ["exp3", "uniform"])
def test_group_size_one_is_the_base_sampler_exactly(base):
    kwargs = {"num_steps": 50} if base == "exp3" else {}
    wrapped = group_sampler(N, K, 1, base=base, **kwargs)
    plain = groups.BASE_SAMPLERS[base](N, K, **kwargs)
    state, reference = wrapped.init(), plain.init()
    feedback = jnp.arange(K, dtype=jnp.float32) + 0.5

    @jax.jit
    def both(state, reference, key):
        (indices, probs), expected = wrapped.sample(state, key), plain.sample(reference, key)
        return (
            indices,
            probs,
            expected,
            wrapped.update(state, indices, feedback),
            plain.update(reference, expected[0], feedback),
        )

    for key in jax.random.split(jax.random.key(3), 5):
        indices, probs, expected, state, reference = both(state, reference, key)
        np.testing.assert_array_equal(indices, expected[0])
        np.testing.assert_array_equal(probs, expected[1])
    jax.tree.map(np.testing.assert_array_equal, state.base, reference)
    np.testing.assert_array_equal(wrapped.probabilities(state), plain.probabilities(reference))


def test_apply_false_keeps_the_state_and_renormalize_delegates(exp3_groups):
    sampler, state = exp3_groups
    indices, _ = sampler.sample(state, jax.random.key(4))
    same = jax.jit(functools.partial(sampler.update, apply=False))(state, indices, jnp.ones(K))
    jax.tree.map(np.testing.assert_array_equal, same, state)
    assert sampler.renormalize_every is not None
    renormalized = jax.jit(sampler.renormalize)(state)
    assert int(renormalized.base.num_rescales) == int(state.base.num_rescales) + 1
    np.testing.assert_allclose(
        sampler.probabilities(renormalized), sampler.probabilities(state), rtol=1e-5
    )


def test_a_base_factory_without_apply_is_selected_around():
    def factory(num_examples, batch_size):
        plain = ab.exp3_sampler(num_examples, batch_size, num_steps=10)
        return plain._replace(update=lambda s, i, f: plain.update(s, i, f))

    sampler = group_sampler(N, K, M, base=factory)
    state = sampler.init()
    indices, _ = sampler.sample(state, jax.random.key(0))
    update = jax.jit(lambda apply: sampler.update(state, indices, jnp.ones(K), apply=apply))
    jax.tree.map(np.testing.assert_array_equal, update(False), state)
    assert int(update(True).base.step) == 1


@pytest.mark.parametrize("base", ["exp3", "uniform"])
def test_trains_inside_make_train_step(base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(x @ np.array([1.0, -2.0, 0.5], np.float32))}

    def loss_fn(params, batch):
        return jnp.square(batch["x"] @ params["w"] - batch["y"])

    kwargs = {"num_steps": 40} if base == "exp3" else {}
    sampler = group_sampler(N, K, M, base=base, **kwargs)
    step = ab.make_train_step(loss_fn, optax.adam(0.1), sampler)
    state = step.init({"w": jnp.zeros(3)})
    full_loss = lambda params: float(jnp.mean(loss_fn(params, data)))  # noqa: E731
    before = full_loss(state.params)
    for key in jax.random.split(jax.random.key(0), 40):
        state, _ = step(state, data, key)
    assert full_loss(state.params) < 0.2 * before
    assert isinstance(state.sampler_state, GroupSamplerState)
    assert int(state.sampler_state.base.step) == 40


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="num_examples=30 is not divisible by group_size=4"):
        group_sampler(30, 8, 4)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by group_size=4"):
        group_sampler(32, 6, 4)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        group_sampler(32, 8, 0)
    with pytest.raises(ValueError, match="base must be one of"):
        group_sampler(32, 8, 4, base="nope")
    with pytest.raises(TypeError, match="base must be a name or a sampler factory"):
        group_sampler(32, 8, 4, base=3)
    with pytest.raises(TypeError, match="scoring sampler is not supported"):
        group_sampler(32, 8, 4, base=lambda n, k: ab.adam_impt_sampler(n, k))
    with pytest.raises(ValueError, match="base: the factory was called with"):
        group_sampler(32, 8, 4, base=lambda n, k: ab.uniform_sampler(n + 1, k))
    sampler = group_sampler(32, 8, 4, num_steps=10)
    with pytest.raises(TypeError, match="state must be a GroupSamplerState"):
        sampler.sample(ab.uniform_sampler(32, 8).init(), jax.random.key(0))
    with pytest.raises(ValueError, match="state: built for num_examples=64"):
        sampler.sample(group_sampler(64, 8, 4, num_steps=10).init(), jax.random.key(0))
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        sampler.update(sampler.init(), jnp.zeros(8), jnp.ones(8))


def test_api_doc_groups_example_runs():
    run_api_doc_example("# groups sampler example")


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-24, 1e-35])
def test_groups_learn_from_feedback_of_any_float32_scale(scale):
    """Regression: the RMS per group squared the feedback: above ~1.8e19 it overflowed (the
    group's feedback was dropped), below ~1e-23 it underflowed to 0; a whole run learned
    nothing. The RMS is now scaled by the group's largest value."""
    sampler = ab.group_sampler(16, 4, 2, base="exp3", step_size=0.5)
    state = sampler.init()
    indices, _ = sampler.sample(state, jax.random.key(0))
    feedback = scale * jnp.array([1.0, 2.0, 3.0, 4.0])
    new = sampler.update(state, indices, feedback)
    assert int(new.base.num_dropped_feedback) == 0
    reference = sampler.update(state, indices, jnp.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(  # the bound L scales with f, the ratios f/L do not
        sampler.probabilities(new), sampler.probabilities(reference), rtol=1e-4
    )
