"""Tests of adambs_jax.exp3: each numbered step of AdamBS Algorithm 2 on its own, against
the math in float64 (the whole update is tested against Algorithm 2 in test_samplers.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _sumtree as sumtree
from tests.helpers import config_with_factory_defaults


def config_of(num_examples, batch_size, **options):
    """The config of exp3_sampler(num_examples, batch_size, **options) (its defaults)."""
    return config_with_factory_defaults(
        ab.exp3_sampler, exp3.exp3_config, num_examples, batch_size, **options
    )


def state_with(config, p, log_root=exp3.INITIAL_LOG_ROOT):
    """An Exp3SamplerState of ``config`` whose distribution is p, with root e^log_root."""
    log_weights = jnp.log(jnp.asarray(p, jnp.float32)) + log_root
    tree = sumtree.build(jnp.exp(log_weights), config.layout)
    return exp3.init(config).replace(log_weights=log_weights, tree=tree)


def assert_tree_is_exact(tree, layout):
    """Every parent is bitwise what a fresh build of the leaves gives (no drift)."""
    rebuilt = sumtree.build(sumtree.leaf_values(tree, layout), layout)
    np.testing.assert_array_equal(np.asarray(tree), np.asarray(rebuilt))


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def floored_distribution(n, p_min, seed):
    rng = np.random.default_rng(seed)
    return p_min + (1 - n * p_min) * rng.dirichlet(np.full(n, 0.7))


def project_float64(w, p_min):
    """argmin_{q >= p_min, sum q = 1} KL(q || w) = max(p_min, w / Z), Z by bisection."""
    lo, hi = 1e-300, 10.0
    for _ in range(400):
        z = math.sqrt(lo * hi)
        lo, hi = (z, hi) if np.maximum(p_min, w / z).sum() > 1 else (lo, z)
    return np.maximum(p_min, w / z)


# ---------------------------------------------------------------- the config


def test_config_fills_defaults_and_is_frozen():
    config = config_of(200, 8, num_steps=50)
    assert config.p_min == pytest.approx(0.1 / 200)
    assert config.step_size == pytest.approx(math.sqrt(2 * math.log(200) / (200 * 50)))
    assert config.adaptive_bound and config.grad_norm_bound is None
    assert config.layout == sumtree.layout_for(200, sumtree.default_arity())
    assert config.stratified is False
    assert config.log_p_min == pytest.approx(math.log(0.1 / 200))
    with pytest.raises(AttributeError):
        config.p_min = 0.1
    fixed = config_of(200, 8, step_size=1, grad_norm_bound=2)
    assert fixed.step_size == 1.0 and fixed.grad_norm_bound == 2.0 and not fixed.adaptive_bound


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(step_size=0.1, stratified=1), TypeError, "stratified"),
        (dict(step_size=0.1, p_min=True), ValueError, "p_min"),
        (dict(num_steps=True), ValueError, "num_steps"),
        (dict(step_size=float("inf")), ValueError, "step_size"),
        (dict(step_size=0.1, grad_norm_bound=float("nan")), ValueError, "grad_norm_bound"),
    ],
)
def test_config_names_the_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        config_of(10, 4, **kwargs)


def test_init_is_uniform_and_check_state_rejects_other_states():
    config = config_of(5, 2, step_size=0.1, grad_norm_bound=3.0)
    state = exp3.init(config)
    np.testing.assert_allclose(exp3.distribution(state), np.full(5, 0.2), rtol=1e-6)
    assert float(state.grad_norm_bound) == 3.0 and int(state.step) == 0
    with pytest.raises(TypeError, match="Exp3SamplerState"):
        exp3.check_state(config, object())
    with pytest.raises(ValueError, match="num_examples=9"):
        exp3.check_state(config, exp3.init(config_of(9, 2, step_size=0.1)))
    with pytest.raises(ValueError, match="tree"):
        exp3.check_state(config, state.replace(tree=jnp.zeros(32)))


# ---------------------------------------------------------------- step 1: clean the feedback


def test_clean_feedback_drops_bad_entries_and_counts_them():
    indices = jnp.array([-1, 0, 5, 3, 2, 4, 1])
    feedback = jnp.array([1.0, jnp.nan, 2.0, -1.0, jnp.inf, 0.0, 0.5])
    clean = exp3.clean_feedback(indices, feedback, num_examples=5)
    expected_valid = np.array([False, False, False, False, False, True, True])
    np.testing.assert_array_equal(clean.valid, expected_valid)
    np.testing.assert_array_equal(clean.indices, [0, 0, 4, 3, 2, 4, 1])  # clipped into [0, n)
    np.testing.assert_array_equal(clean.feedback, [0, 0, 0, 0, 0, 0, 0.5])
    assert clean.indices.dtype == jnp.int32 and clean.feedback.dtype == jnp.float32
    assert int(exp3.count_dropped(clean.valid)) == 5


# ------------------------------------------- step 2: the bound modes in the update (exp3_bound)


def _half_high(n):
    return jnp.where(jnp.arange(n) < n // 2, 1.0, 0.1).astype(jnp.float32)


def _run_after_an_outlier(mode, feedback, num_chunks=4, n=100, k=32):
    """Mass on the high-feedback half after an update with a 1e30 outlier, then
    ``num_chunks`` x 500 updates with ``feedback``."""
    sampler = ab.exp3_sampler(n, k, p_min=0.5 / n, step_size=0.05, grad_norm_bound=mode)

    @jax.jit
    def chunk(state, key):
        def body(s, key):
            indices, _ = sampler.sample(s, key)
            return sampler.update(s, indices, feedback[indices]), None

        return sampler.renormalize(jax.lax.scan(body, state, jax.random.split(key, 500))[0])

    state = sampler.init()
    indices, _ = sampler.sample(state, jax.random.key(5))
    state = sampler.update(state, indices, feedback[indices].at[0].set(1e30))
    masses = []
    for c in range(num_chunks):
        state = chunk(state, jax.random.key(1 + c))
        masses.append(float(jnp.sum(ab.samplers.probabilities(state)[: n // 2])))
    return state, masses


@pytest.mark.slow  # long runs of the sampler
def test_a_huge_outlier_no_longer_freezes_learning():
    # with the running max, one 1e30 sets L for good and every ratio f / L is then 0
    feedback = _half_high(100)
    state, masses = _run_after_an_outlier("quantile", feedback)
    assert float(state.grad_norm_bound) == pytest.approx(1.0, rel=0.05)
    assert np.mean(masses[1:]) > 0.57  # p moves towards f (optimum: 0.75, uniform 0.5)
    old, old_masses = _run_after_an_outlier("running_max", feedback)
    assert float(old.grad_norm_bound) == pytest.approx(1e30)
    assert np.mean(old_masses[1:]) < np.mean(masses[1:]) - 0.05
    # running max: the feedback no longer matters at all; the quantile bound still uses it
    for mode, same in [("running_max", True), ("quantile", False)]:
        a, _ = _run_after_an_outlier(mode, feedback, num_chunks=1)
        b, _ = _run_after_an_outlier(mode, feedback[::-1], num_chunks=1)
        assert np.array_equal(np.asarray(a.log_weights), np.asarray(b.log_weights)) == same


def test_running_max_mode_is_the_old_running_max_bitwise():
    # the max comes first: from then on the running max is the fixed L = max, bitwise
    n, k = 50, 8
    feedback = jnp.linspace(0.1, 3.0, n)
    running = ab.exp3_sampler(n, k, step_size=0.5, grad_norm_bound="running_max")
    fixed = ab.exp3_sampler(n, k, step_size=0.5, grad_norm_bound=3.0)
    a, b = running.init(), fixed.init()
    assert float(a.grad_norm_bound) == 0.0 and a.bound_mode == "running_max"
    for t in range(30):
        indices, _ = running.sample(a, jax.random.key(t))
        f = feedback[indices].at[0].set(3.0 if t == 0 else feedback[indices][0])
        a, b = running.update(a, indices, f), fixed.update(b, indices, f)
        np.testing.assert_array_equal(a.log_weights, b.log_weights)
        np.testing.assert_array_equal(a.tree, b.tree)
        assert float(a.grad_norm_bound) == 3.0


# The fast tier runs the quantile bound at step size 0.5 (every feedback); the rest is slow.
@pytest.mark.parametrize(
    "mode",
    [
        "quantile",
        pytest.param("running_max", marks=pytest.mark.slow),
        pytest.param(1.0, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize(
    "feedback", [jnp.nan, jnp.inf, -jnp.inf, 1e30, 3e38], ids=["nan", "inf", "-inf", "1e30", "3e38"]
)
@pytest.mark.parametrize("step_size", [0.5, pytest.param(1e30, marks=pytest.mark.slow)])
def test_an_update_never_writes_a_non_finite_leaf(mode, feedback, step_size):
    n, k = 30, 8
    sampler = ab.exp3_sampler(n, k, step_size=step_size, grad_norm_bound=mode)
    state = sampler.init()
    update = jax.jit(sampler.update)
    for t in range(6):
        indices, _ = sampler.sample(state, jax.random.key(t))
        f = jnp.linspace(0.0, 2.0, k).at[t % k].set(feedback)
        state = update(state, indices, f)
        exp3.check_state_finite(state)  # finite log-weights, tree, root > 0, L
        assert np.all(np.isfinite(np.asarray(ab.samplers.probabilities(state))))


# ---------------------------------------------------------------- step 3: merge duplicates


def test_merge_duplicate_draws_sorts_stably_and_numbers_the_arms():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 6, size=16).astype(np.int32)
    ratio = rng.uniform(size=16).astype(np.float32)
    valid = rng.uniform(size=16) > 0.3
    draws = exp3.merge_duplicate_draws(jnp.asarray(indices), jnp.asarray(ratio), jnp.asarray(valid))
    order = np.argsort(indices, kind="stable")
    np.testing.assert_array_equal(draws.indices, indices[order])
    np.testing.assert_array_equal(draws.ratio, ratio[order])
    np.testing.assert_array_equal(draws.valid, valid[order])
    arms, first, run = np.unique(indices[order], return_index=True, return_inverse=True)
    np.testing.assert_array_equal(np.flatnonzero(draws.is_first), first)
    np.testing.assert_array_equal(draws.run, run)


# ---------------------------------------------------------------- step 4: alpha_p h_j


def test_shifted_loss_estimate_is_alpha_p_times_h_in_float64():
    n, batch_size, p_min, step_size, bound = 8, 12, 0.02, 0.7, 3.0
    rng = np.random.default_rng(1)
    p_all = floored_distribution(n, p_min, 1)
    indices = np.sort(rng.integers(0, n, size=batch_size)).astype(np.int32)
    feedback = rng.uniform(0, bound, size=batch_size)  # agreeing per arm is not needed: h sums
    valid = rng.uniform(size=batch_size) > 0.2
    draws = exp3.merge_duplicate_draws(
        jnp.asarray(indices), jnp.asarray(feedback / bound, jnp.float32), jnp.asarray(valid)
    )
    p = p_all[indices]
    alpha_h = exp3.shifted_loss_estimate(
        jnp.asarray(p, jnp.float32), draws, p_min=p_min, step_size=step_size, batch_size=batch_size
    )
    # Algorithm 2, lines 2-4: l = L^2/p_min^2 - f^2/p^2, h_j = sum over draws of j of
    # l / (K p_j), alpha_p = eta0 p_min^2 / L^2
    loss = bound**2 / p_min**2 - feedback**2 / p**2
    per_draw = np.where(valid, loss / (batch_size * p), 0.0)
    h = np.array([per_draw[indices == j].sum() for j in indices])
    expected = step_size * p_min**2 / bound**2 * h
    np.testing.assert_allclose(alpha_h, expected, rtol=1e-5)


# ---------------------------------------------------------------- step 5: project and write


def test_project_and_write_is_the_exact_kl_projection_in_float64():
    n, p_min = 12, 0.01
    config = config_of(n, 6, p_min=p_min, step_size=1.0)
    p_all = floored_distribution(n, p_min, 2)
    state = state_with(config, p_all)
    indices = jnp.array([1, 1, 4, 7, 7, 7], jnp.int32)
    draws = exp3.merge_duplicate_draws(indices, jnp.zeros(6), jnp.ones(6, bool))
    exponent = np.array([2.0, 2.0, 0.5, 6.0, 6.0, 6.0])  # alpha_p h_j, equal within an arm
    root = sumtree.total(state.tree)
    p = sumtree.get_leaves(state.tree, draws.indices, config.layout) / root
    log_scaled_w = state.log_weights[draws.indices] - exponent
    log_weights, tree, ok = exp3.project_and_write(
        config, state, draws, p, log_scaled_w, jnp.log(root)
    )
    assert bool(ok)
    w = p_all * np.exp(-np.bincount([1, 4, 7], weights=[2.0, 0.5, 6.0], minlength=n))
    expected = project_float64(w, p_min)
    leaves = np.asarray(sumtree.leaf_values(tree, config.layout), np.float64)
    np.testing.assert_allclose(leaves / leaves.sum(), expected, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(n), [1, 4, 7])
    np.testing.assert_array_equal(
        np.asarray(log_weights)[untouched], np.asarray(state.log_weights)[untouched]
    )
    assert_tree_is_exact(tree, config.layout)


def test_project_and_write_keeps_the_old_leaves_when_the_result_is_not_finite():
    config = config_of(6, 2, step_size=1.0)
    state = state_with(config, floored_distribution(6, config.p_min, 3))
    indices = jnp.array([0, 3], jnp.int32)
    draws = exp3.merge_duplicate_draws(indices, jnp.zeros(2), jnp.ones(2, bool))
    root = sumtree.total(state.tree)
    p = sumtree.get_leaves(state.tree, draws.indices, config.layout) / root
    log_scaled_w = jnp.array([jnp.nan, 0.0])
    log_weights, tree, ok = exp3.project_and_write(
        config, state, draws, p, log_scaled_w, jnp.log(root)
    )
    assert not bool(ok)
    np.testing.assert_array_equal(log_weights, state.log_weights)
    np.testing.assert_array_equal(tree, state.tree)


# ---------------------------------------------------------------- renormalization


def test_renormalize_restores_the_root_and_keeps_p():
    config = config_of(20, 4, step_size=0.1)
    p = floored_distribution(20, config.p_min, 4)
    tiny = state_with(config, p, log_root=-30.0)
    renormalized = exp3.renormalize(config, tiny)
    assert int(renormalized.num_rescales) == 1
    assert float(jnp.log(sumtree.total(renormalized.tree))) == pytest.approx(
        exp3.INITIAL_LOG_ROOT, abs=1e-4
    )
    np.testing.assert_allclose(exp3.distribution(renormalized), p, rtol=1e-5)
    assert_tree_is_exact(renormalized.tree, config.layout)


def test_renormalization_period_follows_the_drift_bound():
    budget = exp3.INITIAL_LOG_ROOT + math.log(1e-4) - exp3.LEAF_FLOOR_LOG
    # drift = -log max(1 - eta0, (n - K) p_min) per update; M = budget / (2.02 drift)
    assert exp3.renormalization_period(1000, 8, 1e-4, 0.1) == int(budget / (2.02 * -math.log(0.9)))
    assert exp3.renormalization_period(1000, 8, 1e-4, 5.0) == int(
        budget / (2.02 * -math.log(992e-4))
    )
    assert exp3.renormalization_period(4, 8, 0.25, 1.0) == 0  # unbounded: every update
    assert config_of(10**4, 128, num_steps=10**5).renormalize_every > 10**5  # default eta0


def test_tiny_p_min_is_refused_with_the_smallest_allowed():
    smallest = math.exp(
        exp3.MIN_RENORMALIZATION_BUDGET + exp3.LEAF_FLOOR_LOG - exp3.INITIAL_LOG_ROOT
    )
    with pytest.raises(ValueError, match=r"p_min=1e-60.*smallest allowed p_min is"):
        config_of(10, 2, step_size=0.1, p_min=1e-60)
    assert config_of(10, 2, step_size=0.1, p_min=smallest * 1.01).p_min > 0


def test_renormalizing_every_update_when_the_drift_is_unbounded():
    # n <= K and eta0 >= 1: one update may shrink the root without bound
    sampler = ab.exp3_sampler(4, 8, step_size=2.0)
    assert sampler.renormalize_every is None
    state = sampler.init()
    indices = jnp.array([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32)
    feedback = jnp.array([0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0])
    for _ in range(50):
        state = sampler.update(state, indices, feedback)
    assert int(state.num_rescales) == 50
    assert float(jnp.log(sumtree.total(state.tree))) == pytest.approx(
        exp3.INITIAL_LOG_ROOT, abs=1e-3
    )
    skipped = sampler.update(state, indices, feedback, apply=False)
    assert_bitwise_equal(skipped, state)


# ---------------------------------------------------------------- sample and update


def test_sample_and_update_are_the_bound_steps():
    config = config_of(30, 5, step_size=0.5)
    state = exp3.init(config)
    indices, probs = exp3.sample(config, state, jax.random.key(0))
    np.testing.assert_allclose(probs, np.full(5, 1 / 30), rtol=1e-6)
    new = exp3.update(config, state, indices, jnp.array([0.1, jnp.nan, 1.0, 2.0, 0.5]))
    assert int(new.step) == 1 and int(new.num_dropped_feedback) == 1
    assert float(new.grad_norm_bound) == 2.0
    p = np.asarray(exp3.distribution(new), np.float64)
    assert abs(p.sum() - 1) < 1e-5 and p.min() >= config.p_min * (1 - 1e-5)


# ---------------------------------------------------------------- apply, indices, keys


@pytest.mark.parametrize("jit", [False, True])
def test_update_with_apply_false_is_bitwise_unchanged(jit):
    sampler = ab.exp3_sampler(50, 8, step_size=0.5, arity=4)
    state = sampler.update(sampler.init(), jnp.arange(8), jnp.linspace(0.0, 2.0, 8))
    update = jax.jit(sampler.update) if jit else sampler.update
    indices = jnp.array([3, 3, 7, 49, 0, 12, 12, 5], jnp.int32)
    feedback = jnp.array([1.0, 2.0, jnp.nan, 5.0, 0.1, 3.0, 3.0, -1.0])
    assert_bitwise_equal(update(state, indices, feedback, apply=False), state)
    applied = update(state, indices, feedback, apply=True)
    assert int(applied.step) == int(state.step) + 1
    assert int(applied.num_dropped_feedback) == int(state.num_dropped_feedback) + 2
    assert_bitwise_equal(applied, sampler.update(state, indices, feedback))


def test_int64_index_beyond_int32_is_dropped_not_wrapped():
    with jax.enable_x64(True):  # jax.experimental.enable_x64 in older jax
        sampler = ab.exp3_sampler(10, 2, step_size=0.5)
        state = sampler.init()
        indices = jnp.array([2**32 + 3, 1], jnp.int64)
        new = sampler.update(state, indices, jnp.array([1.0, 1.0]))
        assert int(new.num_dropped_feedback) == 1
        # arm 3 is untouched (it was not drawn), arm 1 learned
        assert float(new.log_weights[3]) == float(state.log_weights[3])
        assert float(new.log_weights[1]) != float(state.log_weights[1])


def test_small_and_unsigned_index_dtypes_are_range_checked():
    sampler = ab.exp3_sampler(1000, 3, step_size=0.5)
    new = sampler.update(sampler.init(), jnp.array([5, 120, -3], jnp.int8), jnp.ones(3))
    assert int(new.num_dropped_feedback) == 1
    new = sampler.update(sampler.init(), jnp.array([5, 999, 1000], jnp.uint32), jnp.ones(3))
    assert int(new.num_dropped_feedback) == 1


def test_float_indices_and_non_keys_are_refused_by_name():
    sampler = ab.exp3_sampler(10, 2, step_size=0.5)
    with pytest.raises(TypeError, match="indices"):
        sampler.update(sampler.init(), jnp.array([1.0, 2.0]), jnp.ones(2))
    with pytest.raises(ValueError, match="key"):
        sampler.sample(sampler.init(), jnp.zeros(3))


def test_largest_trees_are_refused_naming_num_examples():
    with pytest.raises(ValueError, match="num_examples=2147483647.*arity 2"):
        config_of(2**31 - 1, 8, step_size=0.1, arity=2)
    config = config_of(10**9, 8, step_size=0.1, arity=32)  # 10^9 examples fit with B = 32
    assert config.layout.size < 2**31


@pytest.mark.slow  # 3000 updates
def test_tiny_p_min_never_gives_zero_probabilities():
    # a regression: p_min = 1e-30 (a floor "turned off") and 3000 skewed updates gave
    # exact zeros
    n, batch_size = 1000, 32
    sampler = ab.exp3_sampler(n, batch_size, p_min=1e-30, step_size=0.5)
    feedback = jnp.where(jnp.arange(n) < 10, 100.0, 1e-3)

    def body(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, feedback[indices]), None

    keys = jax.random.split(jax.random.key(0), 3000)
    every = sampler.renormalize_every
    state = sampler.init()
    run = jax.jit(lambda s, k: jax.lax.scan(body, s, k)[0])
    for start in range(0, 3000, every):
        state = sampler.renormalize(run(state, keys[start : start + every]))
    p = np.asarray(exp3.distribution(state), np.float64)
    assert p.min() > 0 and abs(p.sum() - 1) < 1e-5
    assert np.asarray(sumtree.leaf_values(state.tree, sampler_layout(state))).min() >= 2.0**-100


def sampler_layout(state):
    return exp3.tree_layout(state.num_examples, state.arity)


def _share_of_silent_examples(sampler, num_updates, bad_value, seed=0):
    """The sampling mass held by 10 of 1,000 examples whose feedback is always ``bad_value``
    (the others report a fixed, varied feedback), after ``num_updates`` updates in a scan."""
    n, silent = sampler.num_examples, jnp.arange(10)
    feedback = jnp.linspace(0.5, 2.0, n).at[silent].set(bad_value)

    def body(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, feedback[indices]), None

    @jax.jit
    def run(state, keys):
        state, _ = jax.lax.scan(body, state, keys)
        if sampler.renormalize is not None:
            state = sampler.renormalize(state)
        return state

    state = sampler.init()
    every = sampler.renormalize_every or num_updates
    for start in range(0, num_updates, every):
        keys = jax.random.split(jax.random.key(seed + start), min(every, num_updates - start))
        state = run(state, keys)
    return float(jnp.sum(sampler.probabilities(state)[silent])), state


@pytest.mark.slow
@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf, -1.0])
@pytest.mark.parametrize("preset", [None, "paper"])
def test_an_example_that_never_reports_does_not_gain_mass(bad_value, preset):
    """Regression: 10 of 1,000 examples whose feedback is always NaN, inf or negative ended
    with 90% of the mass after 20,000 updates (a dropped draw took no part in the update, so
    it looked like an arm with loss 0 while every other arm paid the shift L^2/p_min^2)."""
    sampler = ab.exp3_sampler(1000, 32, num_steps=20_000, preset=preset)
    share, state = _share_of_silent_examples(sampler, 20_000, bad_value)
    assert share < 0.02, share  # they started with 1%
    assert int(state.num_dropped_feedback) > 0  # still counted as dropped


def test_a_batch_without_valid_feedback_changes_nothing():
    sampler = ab.exp3_sampler(50, 4, step_size=0.5)
    state = sampler.init()
    indices, _ = sampler.sample(state, jax.random.key(0))
    new = sampler.update(state, indices, jnp.full(4, jnp.nan))
    np.testing.assert_array_equal(new.log_weights, state.log_weights)
    np.testing.assert_array_equal(new.tree, state.tree)
    assert int(new.num_dropped_feedback) == 4


def test_a_preset_that_is_not_a_name_is_refused_by_name():
    with pytest.raises(ValueError, match=r"preset must be None or one of.*\['paper'\]"):
        ab.exp3_sampler(10, 2, num_steps=5, preset=["paper"])


def test_group_duplicate_draws_keeps_draw_order_and_names_arms_by_first_draw():
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 6, size=16).astype(np.int32)
    ratio = rng.uniform(size=16).astype(np.float32)
    valid = rng.uniform(size=16) > 0.3
    draws = exp3.group_duplicate_draws(jnp.asarray(indices), jnp.asarray(ratio), jnp.asarray(valid))
    np.testing.assert_array_equal(draws.indices, indices)
    np.testing.assert_array_equal(draws.ratio, ratio)
    np.testing.assert_array_equal(draws.valid, valid)
    first = [list(indices).index(j) for j in indices]
    np.testing.assert_array_equal(draws.run, first)
    np.testing.assert_array_equal(draws.is_first, np.array(first) == np.arange(16))
