"""Tests of adambs_jax.infobatch: InfoBatch (Qin et al., ICLR 2024) as importance sampling,
p_j proportional to 1 - r for a below-mean last loss, 1 otherwise, with exact weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers._infobatch import infobatch_sampler

N, K = 20, 5
LOSSES = np.linspace(0.1, 2.0, N) ** 2  # mean 1.4: 11 examples below it


def expected_p(scores, prune_ratio, seen=None):
    """The rule in float64: 1 - r below the mean of the seen scores (and their max), else 1."""
    scores = np.asarray(scores, np.float64)
    seen = np.ones(len(scores), bool) if seen is None else np.asarray(seen)
    mean = scores[seen].mean()
    below = seen & (scores < mean) & (scores < scores[seen].max())
    u = np.where(below, 1.0 - prune_ratio, 1.0)
    return u / u.sum()


def scored_state(sampler, scores=LOSSES):
    """Every example's loss recorded through ``update``, K at a time (no epoch boundary)."""
    state = sampler.init()
    for start in range(0, len(scores), sampler.batch_size):
        idx = np.arange(start, start + sampler.batch_size) % len(scores)
        state = sampler.update(state, jnp.asarray(idx), jnp.asarray(scores[idx], jnp.float32))
    return state


def draws(sampler, state, num_calls, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_calls)
    indices, probs = jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(state, keys)
    return np.asarray(indices).ravel(), np.asarray(probs, np.float64).ravel()


@pytest.mark.parametrize("prune_ratio", [0.5, 0.8])
def test_an_epoch_boundary_down_weights_the_below_mean_losses(prune_ratio):
    sampler = infobatch_sampler(N, K, prune_ratio=prune_ratio, num_steps=1000)
    state = scored_state(sampler)
    # within the epoch p stays uniform: the scores only change p at the boundary
    np.testing.assert_allclose(np.asarray(sampler.probabilities(state)), 1 / N, rtol=1e-6)
    state = sampler.renormalize(state)
    p = np.asarray(sampler.probabilities(state), np.float64)
    np.testing.assert_allclose(p, expected_p(LOSSES, prune_ratio), rtol=1e-6)
    below = LOSSES < LOSSES.mean()
    assert below.sum() == 11
    np.testing.assert_allclose(p[below] / p[~below].max(), 1 - prune_ratio, rtol=1e-6)
    assert sampler.renormalize_every == math.ceil(N / K)


def test_unseen_examples_are_never_down_weighted_nor_in_the_mean():
    sampler = infobatch_sampler(N, K, num_steps=1000)
    state = sampler.init()
    idx = jnp.arange(K)  # only the first K examples seen
    state = sampler.renormalize(sampler.update(state, idx, jnp.asarray(LOSSES[:K], jnp.float32)))
    seen = np.arange(N) < K
    np.testing.assert_allclose(
        np.asarray(sampler.probabilities(state), np.float64),
        expected_p(np.where(seen, LOSSES, 0.0), 0.5, seen),
        rtol=1e-6,
    )
    # nothing seen, or all scores equal: uniform
    for s in (sampler.init(), scored_state(sampler, np.full(N, 0.3))):
        np.testing.assert_allclose(
            np.asarray(sampler.probabilities(sampler.renormalize(s))), 1 / N, rtol=1e-6
        )


def test_draw_frequencies_match_p():
    sampler = infobatch_sampler(N, K, prune_ratio=0.7, num_steps=1000)
    state = sampler.renormalize(scored_state(sampler))
    indices, probs = draws(sampler, state, num_calls=4000)
    p = np.asarray(sampler.probabilities(state), np.float64)
    counts = np.bincount(indices, minlength=N)
    assert stats.chisquare(counts, p / p.sum() * counts.sum()).pvalue > 1e-3
    np.testing.assert_allclose(probs, p[indices], rtol=1e-6)  # the exact p of each draw


def test_weighted_batch_mean_is_unbiased():
    sampler = infobatch_sampler(N, K, prune_ratio=0.7, num_steps=1000)
    state = sampler.renormalize(scored_state(sampler))
    g = np.cos(np.arange(N)) + 1.5
    num_calls = 4000
    indices, probs = draws(sampler, state, num_calls=num_calls, seed=1)
    estimate = np.mean(g[indices] / (N * probs))
    p = np.asarray(sampler.probabilities(state), np.float64)
    per_draw_var = np.sum(g**2 / (N**2 * p)) - g.mean() ** 2
    assert abs(estimate - g.mean()) < 5 * np.sqrt(per_draw_var / (num_calls * K))
    # the weights are InfoBatch's rescaling: 1 / (1 - r) for a below-mean example
    weights = np.asarray(ab.importance_weights(jnp.asarray(p), N))
    below = LOSSES < LOSSES.mean()
    np.testing.assert_allclose(weights[below] / weights[~below].max(), 1 / 0.3, rtol=1e-5)


def test_the_anneal_makes_the_last_epochs_uniform():
    sampler = infobatch_sampler(N, K, anneal_fraction=0.25, num_steps=16)
    config = sampler.sample.args[0]
    assert config.anneal_start == 12
    state = scored_state(sampler)  # 4 updates
    state = state.replace(step=jnp.asarray(11, jnp.int32))
    assert not np.allclose(np.asarray(sampler.probabilities(sampler.renormalize(state))), 1 / N)
    state = state.replace(step=jnp.asarray(12, jnp.int32))
    np.testing.assert_allclose(
        np.asarray(sampler.probabilities(sampler.renormalize(state))), 1 / N, rtol=1e-6
    )


def test_update_last_valid_duplicate_wins_invalid_dropped_and_apply_false():
    sampler = infobatch_sampler(6, 6, num_steps=10)
    state = sampler.init()
    idx = jnp.array([2, 2, 3, 3, 4, 9])
    fb = jnp.array([1.0, 5.0, 7.0, jnp.nan, -1.0, 2.0])
    new = sampler.update(state, idx, fb)
    np.testing.assert_array_equal(np.asarray(new.scores), [0, 0, 5, 7, 0, 0])
    np.testing.assert_array_equal(np.asarray(new.seen), [0, 0, 1, 1, 0, 0])
    assert int(new.num_dropped_feedback) == 3 and int(new.step) == 1
    unchanged = jax.jit(lambda s: sampler.update(s, idx, fb, apply=jnp.asarray(False)))(new)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(unchanged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prune_ratio=1.0, num_steps=10), "prune_ratio"),
        (dict(prune_ratio=-0.1, num_steps=10), "prune_ratio"),
        (dict(anneal_fraction=1.5, num_steps=10), "anneal_fraction"),
        (dict(), "num_steps"),
        (dict(num_steps=0), "num_steps"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        infobatch_sampler(N, K, **kwargs)


def test_states_of_other_samplers_are_refused():
    sampler = infobatch_sampler(N, K, num_steps=10)
    with pytest.raises(TypeError, match="InfobatchSamplerState"):
        sampler.sample(ab.uniform_sampler(N, K).init(), jax.random.key(0))
    with pytest.raises(ValueError, match="num_examples"):
        sampler.renormalize(infobatch_sampler(N + 1, K, num_steps=10).init())


def test_trains_in_make_train_step_with_an_epoch_boundary_every_n_over_k_steps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    def loss_fn(params, batch):
        return jnp.square(batch["x"] @ params["w"] + params["b"] - batch["y"])

    sampler = infobatch_sampler(N, K, num_steps=40)
    step = ab.make_train_step(loss_fn, optax.adam(0.05), sampler, feedback="loss")
    state = step.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    full_loss = lambda params: float(jnp.mean(loss_fn(params, data)))  # noqa: E731
    before = full_loss(state.params)
    uniform_until = []
    for key in jax.random.split(jax.random.key(0), 30):
        state, metrics = step(state, data, key)
        p = np.asarray(ab.samplers.probabilities(state.sampler_state))
        uniform_until.append(bool(np.allclose(p, 1 / N)))
    # the TrainStep calls the epoch boundary before steps 4, 8, ... (M = ceil(20 / 5) = 4):
    # p is uniform through the first epoch and, once examples were seen, not after it
    assert all(uniform_until[:4]) and not any(uniform_until[4:])
    assert full_loss(state.params) < 0.5 * before
    assert int(state.sampler_state.step) == 30


@pytest.mark.parametrize(
    "steps_per_call, changed_after",
    [
        (1, [16, 31, 46, 61, 76]),  # boundaries exactly after steps 15, 30, 45, ...
        (5, [20, 35, 50, 65, 80]),  # N divides M: the same boundaries, seen after each call
        # N does not: a boundary before each call whose steps hold a multiple of M (before
        # steps 10, 30, 40, 60, 70: epochs alternate 20 and 10 steps, docs/api.md)
        (10, [20, 40, 50, 70, 80]),
    ],
)
def test_epoch_boundaries_with_steps_per_call(steps_per_call, changed_after):
    """M = ceil(60 / 4) = 15: the step after which p is first seen to change, per call."""
    n, k = 60, 4
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray((x[:, 0] > 0).astype(np.int32))}
    loss = ab.ModelLoss(
        lambda p, b: b["x"] @ p,
        lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]),
    )
    sampler = infobatch_sampler(n, k, num_steps=1000)
    assert sampler.renormalize_every == 15
    step = ab.make_train_step(
        loss, optax.adam(0.01), sampler, feedback="loss", steps_per_call=steps_per_call
    )
    state = step.init(jnp.zeros((3, 2)))
    changes, before = [], np.asarray(sampler.probabilities(state.sampler_state))
    for call in range(80 // steps_per_call):
        state, _ = step(state, data, jax.random.key(call))
        after = np.asarray(sampler.probabilities(state.sampler_state))
        if not np.array_equal(after, before):
            changes.append(int(state.step))
        before = after
    assert changes == changed_after
