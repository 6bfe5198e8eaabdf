"""Tests of adambs_jax.adam_impt: Katharopoulos & Fleuret's Adam-impt, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _adam_impt as adam_impt
from tests.helpers import config_with_factory_defaults


def config_of(num_examples, batch_size, **options):
    """The config of adam_impt_sampler(num_examples, batch_size, **options) (its defaults)."""
    return config_with_factory_defaults(
        ab.adam_impt_sampler, adam_impt.adam_impt_config, num_examples, batch_size, **options
    )


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


# --- the config and the steps ----------------------------------------------------------------


def test_config_fills_presample_size_and_default_threshold():
    config = config_of(100, 8, presample=2.5)
    assert config.presample_size == 20  # int(2.5 * 8)
    assert config.tau_threshold == pytest.approx((20 + 24) / 24)
    assert config.momentum == 0.9 and not config.score_presample_always
    assert config_of(100, 8, uniform_phase_scores="presample").score_presample_always
    assert config_of(100, 8, tau_threshold=3).tau_threshold == 3.0
    with pytest.raises(AttributeError):
        config.momentum = 0.5
    with pytest.raises(ValueError, match="score_chunk_size"):
        config_of(100, 8, score_chunk_size=0)


def test_moving_average_is_momentum_weighted():
    average = adam_impt.moving_average(0.9, jnp.float32(2.0), jnp.float32(4.0))
    np.testing.assert_allclose(average, 0.9 * 2.0 + 0.1 * 4.0, rtol=1e-6)


def test_importance_draw_probs_are_presample_size_q_over_n():
    config = config_of(50, 4, presample=2)
    presample_indices, scores = adam_impt.scored_presample(
        config, jax.random.key(0), lambda i: (i % 3).astype(jnp.float32) + 1.0
    )
    assert presample_indices.shape == (8,) and scores.shape == (8,)
    np.testing.assert_array_equal(scores, np.asarray(presample_indices) % 3 + 1.0)
    indices, probs, valid = adam_impt.importance_draw(
        config, jax.random.key(1), presample_indices, scores
    )
    assert bool(valid)
    assert set(np.asarray(indices).tolist()) <= set(np.asarray(presample_indices).tolist())
    scores = np.asarray(scores, np.float64)
    q = scores / scores.sum()
    # every drawn index has prob 8 q / 50 of (one of) the presample positions holding it
    presample_indices = np.asarray(presample_indices)
    possible = {(int(j), round(8 * q[i] / 50, 6)) for i, j in enumerate(presample_indices)}
    assert all((int(j), round(float(p), 6)) in possible for j, p in zip(indices, probs))


def test_uniform_draw_is_uniform_with_probs_one_over_n():
    config = config_of(7, 5)
    indices, probs = adam_impt.uniform_draw(config, jax.random.key(0))
    assert indices.dtype == jnp.int32 and indices.shape == (5,)
    np.testing.assert_allclose(probs, np.full(5, 1 / 7), rtol=1e-7)


def test_sampler_has_no_full_distribution():
    sampler = ab.adam_impt_sampler(10, 2)
    assert sampler.probabilities is None
    with pytest.raises(TypeError, match="AdamImptState"):
        ab.samplers.probabilities(sampler.init())


# --- the variance-reduction estimate ---------------------------------------------------------


def test_variance_reduction_matches_katharopoulos_fleuret_formula():
    rng = np.random.default_rng(0)
    variance_reduction = jax.jit(ab.samplers.variance_reduction)
    for scores in (rng.exponential(size=6), rng.uniform(size=6) ** 4, np.ones(6), [0, 0, 3.0] * 2):
        scores = np.asarray(scores, np.float64)
        g = scores / scores.sum()
        u = 1.0 / len(scores)
        expected = 1.0 / np.sqrt(1.0 - np.sum((g - u) ** 2) / np.sum(g**2))
        np.testing.assert_allclose(variance_reduction(jnp.asarray(scores)), expected, rtol=1e-5)
    # degenerate scores: tau = 1 (K&F's value for all-zero scores), never NaN
    for bad in ([0.0] * 4, [1.0, np.nan, 2.0, 1.0], [1.0, np.inf, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0]):
        assert float(variance_reduction(jnp.asarray(bad, jnp.float32))) == 1.0


# --- the sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("uniform_phase_scores", ["batch", "presample"])
def test_adam_impt_switches_on_when_the_moving_average_crosses_the_threshold(
    uniform_phase_scores,
):
    n, batch_size, num_steps = 100, 8, 20
    sampler = ab.adam_impt_sampler(n, batch_size, uniform_phase_scores=uniform_phase_scores)
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
    np.testing.assert_allclose(ab.samplers.variance_reduction(presample_pattern), tau, rtol=1e-6)
    np.testing.assert_allclose(ab.samplers.variance_reduction(batch_feedback), tau, rtol=1e-6)
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
        state.replace(variance_reduction_ema=jnp.asarray(9.0)),
        jax.random.key(0),
        _fixed_score_fn(np.arange(1, 21, dtype=np.float32)),  # B = int(2.5 * 8) = 20
    )
    assert probs.shape == (8,)
    with pytest.raises(ValueError, match="score_fn"):
        sampler.sample(
            state.replace(variance_reduction_ema=jnp.asarray(9.0)),
            jax.random.key(0),
            lambda indices: jnp.ones((3,)),
        )


@pytest.mark.parametrize("uniform_phase_scores", ["batch", "presample"])
def test_update_with_apply_false_keeps_the_state(uniform_phase_scores):
    """A skipped (non-finite) step: ``apply`` False keeps the state bitwise, step count
    included; True is the default."""
    sampler = ab.adam_impt_sampler(20, 4, uniform_phase_scores=uniform_phase_scores)
    indices, _, state = sampler.sample(
        sampler.init(), jax.random.key(0), _table_score_fn(np.arange(20.0))
    )
    feedback = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    update = jax.jit(sampler.update)
    kept = update(state, indices, feedback, apply=jnp.asarray(False))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    applied = update(state, indices, feedback, apply=jnp.asarray(True))
    default = update(state, indices, feedback)
    for a, b in zip(jax.tree.leaves(applied), jax.tree.leaves(default)):
        np.testing.assert_array_equal(a, b)
    assert int(applied.step) == 1
    if uniform_phase_scores == "batch":  # the uniform phase learned from the batch feedback
        assert float(applied.variance_reduction_ema) > 0
