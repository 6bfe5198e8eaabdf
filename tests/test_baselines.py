"""Tests of adambs_jax.baselines: Adam-impt (Katharopoulos & Fleuret) and p^GN (Lahire)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.scoring import make_score_fn


class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


MLP = _TinyMLP()


def _cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


MODEL_LOSS = ab.ModelLoss(
    apply_fn=lambda params, batch: MLP.apply(params, batch["x"]),
    loss_from_outputs=_cross_entropy,
)


def _separable_problem(num_examples, seed=0):
    """A linearly separable 3-class problem and the tiny MLP's initial parameters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, 4)).astype(np.float32)
    labels = np.argmax(x @ rng.normal(size=(4, 3)), axis=1).astype(np.int32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(labels)}
    params = MLP.init(jax.random.key(seed), data["x"][:1])
    return params, data


def _fixed_score_fn(pattern):
    """A score_fn that returns ``pattern`` (M,) whatever the indices (for the tau switch)."""
    pattern = jnp.asarray(pattern, jnp.float32)

    def score_fn(indices):
        assert indices.shape == pattern.shape
        return pattern

    return score_fn


def _table_score_fn(table):
    """A score_fn whose score of example j is ``table[j]``."""
    table = jnp.asarray(table, jnp.float32)
    return lambda indices: table[indices]


# --- the variance-reduction estimate and the resample ------------------------------------


def test_variance_reduction_matches_katharopoulos_fleuret_formula():
    rng = np.random.default_rng(0)
    variance_reduction = jax.jit(ab.variance_reduction)
    for scores in (rng.exponential(size=6), rng.uniform(size=6) ** 4, np.ones(6), [0, 0, 3.0] * 2):
        scores = np.asarray(scores, np.float64)
        g = scores / scores.sum()
        u = 1.0 / len(scores)
        expected = 1.0 / np.sqrt(1.0 - np.sum((g - u) ** 2) / np.sum(g**2))
        np.testing.assert_allclose(variance_reduction(jnp.asarray(scores)), expected, rtol=1e-5)
    # degenerate scores: tau = 1 (K&F's value for all-zero scores), never NaN
    for bad in ([0.0] * 4, [1.0, np.nan, 2.0, 1.0], [1.0, np.inf, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0]):
        assert float(variance_reduction(jnp.asarray(bad, jnp.float32))) == 1.0


def test_resample_weights_are_unbiased_over_the_presample():
    """(1/K) sum_k v_{pos_k} / (B q_{pos_k}) has mean (1/B) sum_i v_i over the presample."""
    presample_size, num_draws, num_estimates = 24, 8, 20_000
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=presample_size).astype(np.float32) + 0.05
    values = rng.normal(size=(presample_size, 3)).astype(np.float32) * scores[:, None]

    @jax.jit
    def estimates(keys):
        def one(key):
            positions, q, valid = ab.resample_proportional(key, scores, num_draws)
            weights = 1.0 / (presample_size * q[positions])
            return jnp.mean(weights[:, None] * jnp.asarray(values)[positions], axis=0), valid

        return jax.vmap(one)(keys)

    draws, valid = estimates(jax.random.split(jax.random.key(2), num_estimates))
    assert bool(jnp.all(valid))
    q = scores.astype(np.float64) / scores.sum()
    target = values.mean(axis=0, dtype=np.float64)
    # exact per-coordinate variance of one weighted draw X = v_i / (B q_i), i ~ q
    second_moment = np.sum(values.astype(np.float64) ** 2 / (presample_size**2 * q[:, None]), 0)
    estimator_std = np.sqrt((second_moment - target**2) / num_draws)
    error = np.abs(np.asarray(draws, np.float64).mean(axis=0) - target)
    assert np.all(error <= 5 * estimator_std / np.sqrt(num_estimates)), (error, estimator_std)


def test_resample_never_draws_zero_scores_and_falls_back_to_uniform():
    key = jax.random.key(3)
    resample = jax.jit(ab.resample_proportional, static_argnums=2)
    scores = jnp.asarray([0.0, 2.0, 0.0, 0.0, 1.0, 0.0])
    positions, q, valid = resample(key, scores, 5000)
    assert bool(valid)
    assert set(np.unique(np.asarray(positions)).tolist()) == {1, 4}
    np.testing.assert_allclose(q, [0, 2 / 3, 0, 0, 1 / 3, 0], rtol=1e-6)
    for bad in ([0.0] * 6, [1.0, np.nan, 1.0, 1.0, 1.0, 1.0], [1.0, np.inf, 0, 0, 0, 0]):
        positions, q, valid = resample(key, jnp.asarray(bad, jnp.float32), 64)
        assert not bool(valid)
        np.testing.assert_allclose(q, np.full(6, 1 / 6), rtol=1e-6)
        assert np.all((np.asarray(positions) >= 0) & (np.asarray(positions) < 6))


# --- Adam-impt ----------------------------------------------------------------------------


@pytest.mark.parametrize("uniform_phase_scores", ["batch", "presample"])
def test_adam_impt_switches_on_when_the_moving_average_crosses_the_threshold(
    uniform_phase_scores,
):
    n, batch_size, num_steps = 100, 8, 20
    sampler = ab.adam_impt_sampler(
        n, batch_size, uniform_phase_scores=uniform_phase_scores
    )
    presample_size = 3 * batch_size
    tau_threshold = (presample_size + 3 * batch_size) / (3 * batch_size)
    assert tau_threshold == 2.0
    # 3 nonzero of B = 24 presample scores: tau = sqrt(24 * 3) / 3 = 2 sqrt(2);
    # 1 nonzero of K = 8 batch feedback: tau = sqrt(8) = 2 sqrt(2) as well
    presample_pattern = np.zeros(presample_size, np.float32)
    presample_pattern[[2, 11, 20]] = 1.0
    batch_feedback = np.zeros(batch_size, np.float32)
    batch_feedback[0] = 1.0
    tau = 2.0 * np.sqrt(2.0)
    np.testing.assert_allclose(ab.variance_reduction(presample_pattern), tau, rtol=1e-6)
    np.testing.assert_allclose(ab.variance_reduction(batch_feedback), tau, rtol=1e-6)
    # tau_hat after t updates: tau (1 - 0.9^t); the first t with tau_hat > 2 is 12
    expected_ema = tau * (1 - 0.9 ** np.arange(num_steps + 1))
    first_on = int(np.argmax(expected_ema > tau_threshold))
    assert first_on == 12

    score_calls = []

    def score_fn(indices):
        jax.debug.callback(lambda: score_calls.append(1))
        return _fixed_score_fn(presample_pattern)(indices)

    sample = jax.jit(lambda state, key: sampler.sample(state, key, score_fn))
    update = jax.jit(sampler.update)
    state = sampler.init()
    for t in range(num_steps):
        np.testing.assert_allclose(state.variance_reduction_ema, expected_ema[t], rtol=1e-5)
        indices, probs, state = sample(state, jax.random.key(t))
        assert bool(state.importance_sampling_on) == (t >= first_on), t
        if t < first_on:
            np.testing.assert_array_equal(probs, np.full(batch_size, 1.0 / n, np.float32))
        else:  # B q / n with q = 1/3 on the three scored positions
            expected = np.full(batch_size, presample_size / 3 / n)
            np.testing.assert_allclose(probs, expected, rtol=1e-6)
        assert np.all((np.asarray(indices) >= 0) & (np.asarray(indices) < n))
        state = update(state, indices, jnp.asarray(batch_feedback))
    jax.effects_barrier()
    np.testing.assert_allclose(state.variance_reduction_ema, expected_ema[num_steps], rtol=1e-5)
    assert int(state.step) == num_steps and int(state.num_fallbacks) == 0
    # K&F's behaviour: no presample is scored while uniform; "presample" scores every step
    expected_calls = num_steps - first_on if uniform_phase_scores == "batch" else num_steps
    assert len(score_calls) == expected_calls


def test_adam_impt_is_unbiased_for_the_full_mean():
    """End to end: the draws' 1/(n probs)-weighted mean of any v is unbiased for mean_j v_j."""
    n, batch_size, num_estimates = 50, 4, 20_000
    sampler = ab.adam_impt_sampler(n, batch_size, tau_threshold=1.0)
    rng = np.random.default_rng(4)
    table = rng.exponential(size=n).astype(np.float32) + 0.1
    values = (table * rng.normal(size=n)).astype(np.float32)
    score_fn = _table_score_fn(table)
    state = sampler.init().replace(variance_reduction_ema=jnp.asarray(5.0))  # IS on

    @jax.jit
    def estimates(keys):
        def one(key):
            indices, probs, new_state = sampler.sample(state, key, score_fn)
            estimate = jnp.mean(jnp.asarray(values)[indices] / (n * probs))
            return estimate, new_state.importance_sampling_on

        return jax.vmap(one)(keys)

    draws, on = estimates(jax.random.split(jax.random.key(5), num_estimates))
    assert bool(jnp.all(on))
    draws = np.asarray(draws, np.float64)
    tolerance = 5 * draws.std() / np.sqrt(num_estimates)
    assert abs(draws.mean() - values.mean(dtype=np.float64)) <= tolerance


def test_adam_impt_degenerate_scores_fall_back_to_uniform_over_the_presample():
    n, batch_size = 30, 4
    sampler = ab.adam_impt_sampler(n, batch_size)
    sample = jax.jit(lambda state, key, scores: sampler.sample(state, key, lambda i: scores))
    for bad in (0.0, np.nan, np.inf):
        state = sampler.init().replace(variance_reduction_ema=jnp.asarray(10.0))
        scores = jnp.full((12,), bad, jnp.float32).at[3].set(1.0 if bad != 0 else 0.0)
        indices, probs, state = sample(state, jax.random.key(0), scores)
        np.testing.assert_allclose(probs, np.full(batch_size, 1.0 / n), rtol=1e-6)
        assert bool(state.importance_sampling_on) and int(state.num_fallbacks) == 1
        assert float(state.variance_reduction) == 1.0
        assert np.isfinite(float(state.variance_reduction_ema))


def test_adam_impt_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="presample"):
        ab.adam_impt_sampler(100, 8, presample=0.5)
    with pytest.raises(ValueError, match="momentum"):
        ab.adam_impt_sampler(100, 8, momentum=1.0)
    with pytest.raises(ValueError, match="tau_threshold"):
        ab.adam_impt_sampler(100, 8, tau_threshold=0.0)
    with pytest.raises(ValueError, match="uniform_phase_scores"):
        ab.adam_impt_sampler(100, 8, uniform_phase_scores="always")
    with pytest.raises(ValueError, match="num_examples"):
        ab.adam_impt_sampler(0, 8)
    with pytest.raises(TypeError, match="score_feedback"):
        ab.adam_impt_sampler(100, 8, score_feedback=3)
    sampler = ab.adam_impt_sampler(100, 8, presample=2.5, tau_threshold=None)
    state = sampler.init()
    _, probs, _ = sampler.sample(
        state.replace(variance_reduction_ema=jnp.asarray(9.0)), jax.random.key(0),
        _fixed_score_fn(np.arange(1, 21, dtype=np.float32)),  # B = int(2.5 * 8) = 20
    )
    assert probs.shape == (8,)
    with pytest.raises(ValueError, match="score_fn"):
        sampler.sample(state.replace(variance_reduction_ema=jnp.asarray(9.0)),
                       jax.random.key(0), lambda indices: jnp.ones((3,)))


# --- p^GN -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p_floor", [0.0, 0.01])
def test_gradient_norm_distribution_equals_independent_per_example_norms(p_floor):
    n = 30
    params, data = _separable_problem(n, seed=6)
    sampler = ab.gradient_norm_sampler(n, 5, p_floor=p_floor, chunk_size=7)

    def loss_of_one(p, j):  # one example at a time, no vmap
        example = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, j, 1), data)
        return MODEL_LOSS(p, example)[0]

    grad_of_one = jax.jit(jax.grad(loss_of_one))
    norms = np.array([
        np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                    for g in jax.tree.leaves(grad_of_one(params, j))))
        for j in range(n)
    ])
    expected = (1 - n * p_floor) * norms / norms.sum() + p_floor

    score_fn = make_score_fn(
        MODEL_LOSS, sampler.score_feedback, params, data, chunk_size=sampler.score_chunk_size
    )
    indices, probs, state = jax.jit(
        lambda s, k: sampler.sample(s, k, score_fn)
    )(sampler.init(), jax.random.key(7))
    np.testing.assert_allclose(state.distribution, expected, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(probs, np.asarray(state.distribution)[np.asarray(indices)])
    assert np.all(np.asarray(state.distribution) >= p_floor * (1 - 1e-6))
    assert int(state.num_fallbacks) == 0


def test_gradient_norm_draws_follow_the_distribution():
    """Chi-square goodness of fit of 6400 draws against p = norms / sum(norms)."""
    n, batch_size, num_batches = 12, 16, 400
    norms = np.asarray([0.1, 0.5, 1, 2, 3, 0.2, 0.05, 4, 1.5, 0.7, 0.3, 2.5], np.float32)
    sampler = ab.gradient_norm_sampler(n, batch_size)
    score_fn = _table_score_fn(norms)

    @jax.jit
    def draws(keys):
        return jax.vmap(lambda key: sampler.sample(sampler.init(), key, score_fn)[:2])(keys)

    indices, probs = draws(jax.random.split(jax.random.key(8), num_batches))
    p = norms.astype(np.float64) / norms.sum()
    np.testing.assert_allclose(probs, p.astype(np.float32)[np.asarray(indices)], rtol=1e-5)
    counts = np.bincount(np.asarray(indices).ravel(), minlength=n)
    expected = p * counts.sum()
    _, p_value = stats.chisquare(counts, f_exp=expected * counts.sum() / expected.sum())
    assert p_value > 1e-3, (counts, p_value)


def test_gradient_norm_degenerate_norms_give_uniform():
    n = 10
    sampler = ab.gradient_norm_sampler(n, 4)
    sample = jax.jit(lambda state, key, norms: sampler.sample(state, key, lambda i: norms[i]))
    for bad in (np.zeros(n), np.r_[np.ones(n - 1), np.nan]):
        _, probs, state = sample(sampler.init(), jax.random.key(0), jnp.asarray(bad, jnp.float32))
        np.testing.assert_allclose(state.distribution, np.full(n, 1 / n), rtol=1e-6)
        np.testing.assert_allclose(probs, np.full(4, 1 / n), rtol=1e-6)
        assert int(state.num_fallbacks) == 1


def test_gradient_norm_size_limit_and_floor_errors():
    with pytest.raises(ValueError, match=r"num_examples=10001.*max_examples=10000"):
        ab.gradient_norm_sampler(10_001, 8)
    sampler = ab.gradient_norm_sampler(10_001, 8, max_examples=20_000)
    assert sampler.num_examples == 10_001
    with pytest.raises(ValueError, match="p_floor"):
        ab.gradient_norm_sampler(100, 8, p_floor=0.011)
    with pytest.raises(ValueError, match="p_floor"):
        ab.gradient_norm_sampler(100, 8, p_floor=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ab.gradient_norm_sampler(100, 8, chunk_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        ab.gradient_norm_sampler(100, 8, max_examples=0)
    uniform = ab.gradient_norm_sampler(100, 8, p_floor=0.01)  # p_floor = 1/n: uniform
    _, probs, _ = uniform.sample(
        uniform.init(), jax.random.key(0), _table_score_fn(np.arange(100, dtype=np.float32))
    )
    np.testing.assert_allclose(probs, np.full(8, 0.01), rtol=1e-5)


# --- inside the train step ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["adam_impt", "adam_impt/presample", "gradient_norm"])
def test_baselines_train_inside_make_train_step(method):
    n, batch_size, num_steps = 96, 8, 40
    params, data = _separable_problem(n, seed=9)
    if method.startswith("adam_impt"):
        phase = "presample" if method.endswith("presample") else "batch"
        # a low threshold, so that importance sampling switches on during the run
        sampler = ab.adam_impt_sampler(
            n, batch_size, tau_threshold=1.05, uniform_phase_scores=phase
        )
        feedback = "logit_grad_norm"
    else:
        sampler = ab.gradient_norm_sampler(n, batch_size, p_floor=0.1 / n, chunk_size=40)
        feedback = "loss"
    optimizer = optax.adam(3e-2)
    step = ab.make_train_step(MODEL_LOSS, optimizer, sampler, feedback=feedback)
    state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
    initial_loss = float(jnp.mean(MODEL_LOSS(params, data)))
    switched_on = []
    for t in range(num_steps):
        state, metrics = step(state, data, jax.random.key(t))
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["weighted_loss"]))
        if method.startswith("adam_impt"):
            switched_on.append(bool(state.sampler_state.importance_sampling_on))
    final_loss = float(jnp.mean(MODEL_LOSS(state.params, data)))
    assert step._cache_size() == 1  # jitted once
    assert int(state.step) == num_steps and int(state.sampler_state.step) == num_steps
    assert final_loss < 0.6 * initial_loss, (initial_loss, final_loss)
    if method.startswith("adam_impt"):
        assert not switched_on[0] and any(switched_on)
    else:
        p = np.asarray(state.sampler_state.distribution)
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
        assert p.min() >= 0.1 / n * (1 - 1e-6) and p.max() > 2.0 / n  # not uniform
