"""Tests of adambs_jax.samplers against the math of AdamBS Algorithm 2 (DESIGN §1)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _sumtree as sumtree


def layout_of(state):
    return exp3.tree_layout(state.num_examples, state.arity)


def with_distribution(state, p):
    """A sampler state whose distribution is p (test helper), at the root 2^100 of init."""
    log_weights = jnp.log(jnp.asarray(p, jnp.float32)) + exp3.INITIAL_LOG_ROOT
    tree = sumtree.build(jnp.exp(log_weights), layout_of(state))
    return state.replace(log_weights=log_weights, tree=tree)


def assert_tree_is_exact(state):
    """Every parent is bitwise what a fresh build of the leaves gives (no drift)."""
    layout = layout_of(state)
    rebuilt = sumtree.build(sumtree.leaf_values(state.tree, layout), layout)
    np.testing.assert_array_equal(np.asarray(state.tree), np.asarray(rebuilt))


def random_distribution(n, p_min, seed, concentration=1.0):
    rng = np.random.default_rng(seed)
    return p_min + (1 - n * p_min) * rng.dirichlet(np.full(n, concentration))


def reference_update(p, indices, feedback, *, p_min, step_size, bound, batch_size):
    """AdamBS Algorithm 2, lines 2-5, literally, in float64 over all n arms."""
    n = len(p)
    counts = np.bincount(indices, minlength=n)
    f = np.zeros(n)
    f[indices] = np.minimum(feedback, bound)  # duplicates carry equal feedback here
    loss = np.where(counts > 0, bound**2 / p_min**2 - f**2 / p**2, 0.0)  # line 2
    # l >= 0 since p >= p_min; a float32 state can hold p = p_min (1 - 1e-7): clip like DESIGN
    loss = np.maximum(loss, 0.0)
    h = loss * counts / (batch_size * p)  # line 3
    alpha = step_size * p_min**2 / bound**2
    w = p * np.exp(-alpha * h)  # line 4
    exponent = alpha * h
    # line 5: KL projection onto {q >= p_min, sum q = 1}: q = max(p_min, w / Z), bisection
    lo, hi = 1e-300, 10.0
    for _ in range(400):
        z = math.sqrt(lo * hi)
        if np.maximum(p_min, w / z).sum() > 1:
            lo = z
        else:
            hi = z
    return np.maximum(p_min, w / z), exponent


# ---------------------------------------------------------------- drawing


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize(
    "n,num_draws,bins",
    [
        (7, 20_000, 7),
        (1000, 100_000, 1000),
        pytest.param(100_000, 200_000, 1000, marks=pytest.mark.slow),
    ],
)
def test_draw_frequencies_match_distribution(n, num_draws, bins, stratified):
    batch_size = 100
    sampler = ab.exp3_sampler(n, batch_size, step_size=0.1, stratified=stratified)
    p = random_distribution(n, 0.1 / n, seed=n, concentration=2.0)
    state = with_distribution(sampler.init(), p)
    keys = jax.random.split(jax.random.PRNGKey(n + stratified), num_draws // batch_size)
    indices, probs = jax.jit(jax.vmap(lambda k: sampler.sample(state, k)))(keys)
    indices, probs = np.asarray(indices).ravel(), np.asarray(probs).ravel()
    assert indices.dtype == np.int32 and indices.min() >= 0 and indices.max() < n
    p_model = np.asarray(ab.samplers.probabilities(state), np.float64)
    np.testing.assert_allclose(probs, p_model[indices], rtol=1e-5)  # probs = p[indices]
    # chi-square on `bins` groups of consecutive examples (>= 5 expected per group)
    group = np.arange(n) * bins // n
    observed = np.bincount(group[indices], minlength=bins)
    expected = np.bincount(group, weights=p_model, minlength=bins)
    expected = expected / expected.sum() * observed.sum()
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_stratified_batch_has_one_draw_per_mass_slice():
    n, batch_size = 64, 8
    sampler = ab.exp3_sampler(n, batch_size, step_size=0.1, stratified=True)
    state = sampler.init()  # uniform: slice k of the mass is examples 8k..8k+7
    indices, _ = sampler.sample(state, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(indices) // 8, np.arange(8))


def test_zero_probability_examples_are_never_drawn():
    n = 50
    sampler = ab.exp3_sampler(n, 64, step_size=0.1)
    p = np.zeros(n)
    p[::7] = 1.0
    state = with_distribution(sampler.init(), p / p.sum())
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    indices = np.asarray(jax.vmap(lambda k: sampler.sample(state, k)[0])(keys))
    assert np.all(indices % 7 == 0)


# ---------------------------------------------------------------- the update rule


@pytest.mark.parametrize("seed", range(6))
def test_update_matches_algorithm_2_in_float64(seed):
    rng = np.random.default_rng(seed)
    n = [5, 12, 40, 200, 1000, 3][seed]
    batch_size = [4, 16, 8, 32, 64, 8][seed]
    p_min = [0.1, 0.5, 0.9, 0.1, 0.1, 1.0][seed] / n  # includes heavy clipping and p_min n = 1
    step_size = [0.05, 1.0, 5.0, 0.3, 0.01, 0.5][seed]
    bound = 2.0
    sampler = ab.exp3_sampler(
        n, batch_size, p_min=p_min, step_size=step_size, grad_norm_bound=bound
    )
    p = random_distribution(n, p_min, seed, concentration=0.5)
    state = with_distribution(sampler.init(), p)
    per_example_feedback = rng.uniform(0, 3.0, size=n)  # some above the bound: clipped
    update = jax.jit(sampler.update)
    for _ in range(5):
        p = np.asarray(ab.samplers.probabilities(state), np.float64)
        indices = rng.integers(0, n, size=batch_size)  # duplicates likely
        feedback = per_example_feedback[indices]
        expected, exponent = reference_update(
            p,
            indices,
            feedback,
            p_min=p_min,
            step_size=step_size,
            bound=bound,
            batch_size=batch_size,
        )
        state = update(state, jnp.asarray(indices), jnp.asarray(feedback, jnp.float32))
        # float32: a relative error e in p becomes e * alpha h_j in p exp(-alpha h_j), so the
        # tolerance is 1e-5 plus a float32 ulp (1.2e-7) per unit of the exponent
        rtol = 1e-5 + 1.2e-7 * exponent
        actual = np.asarray(ab.samplers.probabilities(state), np.float64)
        assert np.all(np.abs(actual - expected) <= rtol * expected), np.max(
            np.abs(actual / expected - 1) - rtol
        )


@pytest.mark.parametrize("seed", range(4))
def test_update_when_every_arm_is_drawn_and_weights_are_tiny(seed):
    # R = 0 exactly; a float32 rounding of 1 - sum(p) (~1e-7) would dwarf w ~ e^-40 here
    n, batch_size, p_min, step_size, bound = 6, 12, 0.005, 100.0, 2.0
    sampler = ab.exp3_sampler(
        n, batch_size, p_min=p_min, step_size=step_size, grad_norm_bound=bound
    )
    state = with_distribution(sampler.init(), random_distribution(n, p_min, seed))
    p = np.asarray(ab.samplers.probabilities(state), np.float64)
    indices = np.tile(np.arange(n), 2)
    feedback = np.random.default_rng(seed).uniform(0, 0.1, size=n)[indices]
    expected, exponent = reference_update(
        p, indices, feedback, p_min=p_min, step_size=step_size, bound=bound, batch_size=batch_size
    )
    assert exponent.min() > 20  # all w = p e^-exponent far below the float32 precision of 1 - sum p
    state = jax.jit(sampler.update)(state, jnp.asarray(indices), jnp.asarray(feedback, jnp.float32))
    actual = np.asarray(ab.samplers.probabilities(state), np.float64)
    np.testing.assert_allclose(actual, expected, rtol=1e-5 + 1.2e-7 * exponent.max())


def test_update_touches_only_sampled_leaves():
    n = 300
    sampler = ab.exp3_sampler(n, 16, step_size=0.5)
    state = with_distribution(sampler.init(), random_distribution(n, 0.1 / n, 1))
    indices = jnp.array([3, 3, 17, 250, 8, 9, 10, 11, 12, 13, 14, 15, 16, 40, 41, 42])
    new = jax.jit(sampler.update)(state, indices, jnp.linspace(0.1, 2.0, 16))
    untouched = np.setdiff1d(np.arange(n), np.asarray(indices))
    np.testing.assert_array_equal(
        np.asarray(new.log_weights)[untouched], np.asarray(state.log_weights)[untouched]
    )


def test_running_max_bound_and_fixed_bound_clips():
    sampler = ab.exp3_sampler(10, 3, step_size=0.1, grad_norm_bound="running_max")
    state = sampler.init()
    update = jax.jit(sampler.update)
    state = update(state, jnp.array([0, 1, 2]), jnp.array([0.5, 2.5, 1.0]))
    assert float(state.grad_norm_bound) == 2.5
    state = update(state, jnp.array([0, 1, 2]), jnp.array([0.1, 0.2, 0.3]))
    assert float(state.grad_norm_bound) == 2.5
    fixed = ab.exp3_sampler(10, 3, step_size=0.1, grad_norm_bound=1.0)
    fixed_state = jax.jit(fixed.update)(
        fixed.init(), jnp.array([0, 1, 2]), jnp.array([0.5, 9.0, 1.0])
    )
    assert float(fixed_state.grad_norm_bound) == 1.0
    p = np.asarray(ab.samplers.probabilities(fixed_state))
    assert p[1] == pytest.approx(p[2], rel=1e-6)  # 9.0 is clipped to the bound, like 1.0


def test_default_step_size_is_lemma_1():
    n, steps = 5000, 2000
    sampler = ab.exp3_sampler(n, 8, num_steps=steps)
    assert ab.samplers.default_step_size(n, steps) == pytest.approx(
        math.sqrt(2 * math.log(n) / (n * steps))
    )
    # the default step is what the update uses: compare with an explicit step_size
    explicit = ab.exp3_sampler(n, 8, step_size=ab.samplers.default_step_size(n, steps))
    idx, f = jnp.arange(8), jnp.linspace(0, 1, 8)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(sampler.update)(sampler.init(), idx, f).log_weights),
        np.asarray(jax.jit(explicit.update)(explicit.init(), idx, f).log_weights),
    )
    assert sampler.init().p_min == pytest.approx(0.1 / n)


# ---------------------------------------------------------------- long runs


def _random_updates(sampler, n, num_updates, seed, bad_fraction=0.0):
    def body(state, key):
        k1, k2, k3 = jax.random.split(key, 3)
        indices = jax.random.randint(k1, (sampler.batch_size,), 0, n)
        feedback = jax.random.exponential(k2, (sampler.batch_size,))
        bad = jax.random.uniform(k3, (sampler.batch_size,)) < bad_fraction
        poison = jnp.array([jnp.nan, jnp.inf, -1.0])[indices % 3]
        return sampler.update(state, indices, jnp.where(bad, poison, feedback)), None

    keys = jax.random.split(jax.random.PRNGKey(seed), num_updates)
    return scan_with_renormalization(sampler, body, sampler.init(), keys)[0]


def scan_with_renormalization(sampler, body, state, keys):
    """``lax.scan(body, state, keys)`` that renormalizes after every
    ``sampler.renormalize_every`` steps, as a caller of ``sampler.update`` must."""
    every = sampler.renormalize_every
    num_chunks = keys.shape[0] // every

    def chunk(state, chunk_keys):
        state, ys = jax.lax.scan(body, state, chunk_keys)
        return sampler.renormalize(state), ys

    def run(state, keys):
        chunked = keys[: num_chunks * every].reshape((num_chunks, every) + keys.shape[1:])
        state, ys = jax.lax.scan(chunk, state, chunked)
        state, rest = jax.lax.scan(body, state, keys[num_chunks * every :])
        flat = lambda y, r: jnp.concatenate([y.reshape((-1,) + y.shape[2:]), r])
        return state, jax.tree.map(flat, ys, rest)

    return jax.jit(run)(state, keys)


@pytest.mark.slow  # 1e5 updates
@pytest.mark.parametrize(
    "step_size,bad_fraction",
    [(0.05, 0.0), (3.0, 0.05)],  # the second forces many O(n) rescales and bad feedback
)
def test_invariants_after_1e5_random_updates(step_size, bad_fraction):
    n = 1000
    sampler = ab.exp3_sampler(n, 16, step_size=step_size)
    state = _random_updates(sampler, n, 100_000, seed=1, bad_fraction=bad_fraction)
    assert_tree_is_exact(state)
    # leaves are exp(log_weights) (XLA's exp and numpy's may differ by an ulp)
    leaves = np.asarray(sumtree.leaf_values(state.tree, layout_of(state)))
    np.testing.assert_allclose(leaves, np.exp(np.asarray(state.log_weights)), rtol=1e-6)
    p = np.asarray(ab.samplers.probabilities(state), np.float64)
    assert np.all(np.isfinite(p))
    assert abs(p.sum() - 1) <= 1e-5
    assert p.min() >= state.p_min * (1 - 1e-5)
    assert int(state.step) == 100_000
    if step_size > 1:
        assert int(state.num_rescales) > 0
        assert int(state.num_dropped_feedback) > 0
    assert leaves.min() >= 2.0**-100


@pytest.mark.slow  # 2 x 300,000 updates
def test_fixed_feedback_drives_p_to_the_variance_optimal_distribution():
    """E[update] is mirror descent on sum_j f_j^2 / p_j; its minimizer over {p >= p_min} is
    p_j = max(p_min, f_j / lambda) (p proportional to f, clipped). With a small constant step
    the time-averaged iterate approaches it, and the gap shrinks with the step."""
    n, batch_size = 10, 4
    f = jnp.array([0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0])
    p_min = 0.05
    lo, hi = 1e-9, 1e9  # water-filling for lambda
    for _ in range(200):
        lam = math.sqrt(lo * hi)
        lo, hi = (lam, hi) if np.maximum(p_min, np.asarray(f) / lam).sum() > 1 else (lo, lam)
    target = np.maximum(p_min, np.asarray(f) / lam)

    def averaged_p(step_size, num_steps=300_000):
        sampler = ab.exp3_sampler(
            n, batch_size, p_min=p_min, step_size=step_size, grad_norm_bound=4.0
        )

        def body(state, key):
            indices, _ = sampler.sample(state, key)
            state = sampler.update(state, indices, f[indices])
            return state, ab.samplers.probabilities(state)

        keys = jax.random.split(jax.random.PRNGKey(0), num_steps)
        _, ps = scan_with_renormalization(sampler, body, sampler.init(), keys)
        return np.asarray(ps[num_steps // 2 :].mean(0))

    gaps = [np.abs(averaged_p(eta) - target).max() for eta in (0.01, 0.0003)]
    assert gaps[1] < gaps[0]
    assert gaps[1] < 0.01  # from 0.05 at uniform p (max |1/n - target|) ...
    assert np.abs(np.full(n, 1 / n) - target).max() > 0.15  # ... to this


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_examples=0, batch_size=4), "num_examples"),
        (dict(num_examples=10, batch_size=0), "batch_size"),
        (dict(num_examples=10, batch_size=4, p_min=0.2), "p_min"),
        (dict(num_examples=10, batch_size=4, p_min=0.0), "p_min"),
        (dict(num_examples=10, batch_size=4, p_min=-1e-3), "p_min"),
        (dict(num_examples=10, batch_size=4, step_size=-1.0), "step_size"),
        (dict(num_examples=10, batch_size=4, step_size=float("nan")), "step_size"),
        (dict(num_examples=10, batch_size=4, num_steps=0), "num_steps"),
        (dict(num_examples=10, batch_size=4), "num_steps"),
        (
            dict(num_examples=10, batch_size=4, step_size=0.1, grad_norm_bound=0.0),
            "grad_norm_bound",
        ),
        (dict(num_examples=2.5, batch_size=4, step_size=0.1), "num_examples"),
        (
            dict(num_examples=10, batch_size=4, step_size=0.1, grad_norm_bound="max"),
            'grad_norm_bound must be a number > 0 .*"running_max" or "quantile"',
        ),
        (dict(num_examples=10, batch_size=4, step_size=0.1, bound_quantile=1.0), "bound_quantile"),
        (dict(num_examples=10, batch_size=4, step_size=0.1, bound_quantile=0.0), "bound_quantile"),
        (
            dict(num_examples=10, batch_size=4, step_size=0.1, bound_learning_rate=0.0),
            "bound_learning_rate",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ab.exp3_sampler(**kwargs)


def test_the_bound_options_set_the_mode():
    cases = [
        (None, "quantile", 0.0),
        ("quantile", "quantile", 0.0),
        ("running_max", "running_max", 0.0),
        (2.5, "fixed", 2.5),
    ]
    for option, mode, initial in cases:
        state = ab.exp3_sampler(10, 4, step_size=0.1, grad_norm_bound=option).init()
        assert state.bound_mode == mode and float(state.grad_norm_bound) == initial
    # bound_quantile and bound_learning_rate reach the update
    idx, f = jnp.arange(4), jnp.array([1.0, 2.0, 3.0, 4.0])
    bounds = [
        float(
            ab.exp3_sampler(10, 4, step_size=0.1, bound_quantile=q)
            .update(ab.exp3_sampler(10, 4, step_size=0.1).init(), idx, f)
            .grad_norm_bound
        )
        for q in (0.5, 0.9)
    ]
    assert bounds == [2.0, 4.0]
    state = ab.exp3_sampler(10, 4, step_size=0.1).init().replace(grad_norm_bound=jnp.float32(1.0))
    moved = ab.exp3_sampler(10, 4, step_size=0.1, bound_learning_rate=0.5).update(state, idx, f)
    assert math.log(float(moved.grad_norm_bound)) == pytest.approx(0.5 * (0.75 - 0.1), rel=1e-5)


def _exp3_config_of(sampler):
    """The ``Exp3Config`` an ``exp3_sampler`` bound into its functions."""
    return sampler.sample.args[0]


@pytest.mark.parametrize(
    "preset, p_min_times_n, bound",
    [
        ("low_variance", 0.5, "quantile"),
        ("paper", 0.1, "running_max"),
    ],
)
def test_exp3_presets_set_p_min_and_the_bound(preset, p_min_times_n, bound):
    n = 40
    config = _exp3_config_of(ab.exp3_sampler(n, 4, num_steps=100, preset=preset))
    expected = exp3.exp3_config(
        n,
        4,
        p_min=p_min_times_n / n,
        step_size=None,
        num_steps=100,
        grad_norm_bound=bound,
        stratified=False,
    )
    assert config == expected
    assert config.p_min == pytest.approx(p_min_times_n / n) and config.bound_mode == bound
    assert config.bound_quantile == 0.9  # the clipped bound at the 90th percentile


def test_explicit_arguments_override_the_preset():
    n = 40
    config = _exp3_config_of(
        ab.exp3_sampler(
            n, 4, num_steps=100, preset="low_variance", p_min=0.2 / n, grad_norm_bound=3.0
        )
    )
    assert config.p_min == pytest.approx(0.2 / n)
    assert config.bound_mode == "fixed" and config.grad_norm_bound == 3.0
    only_bound = _exp3_config_of(
        ab.exp3_sampler(n, 4, num_steps=100, preset="low_variance", grad_norm_bound="running_max")
    )
    assert only_bound.p_min == pytest.approx(0.5 / n) and only_bound.bound_mode == "running_max"
    with pytest.raises(ValueError, match="preset must be None or one of"):
        ab.exp3_sampler(n, 4, num_steps=100, preset="fast")


def test_uniform_sampler_validates_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        ab.uniform_sampler(10, 0)
    with pytest.raises(ValueError, match="num_examples"):
        ab.uniform_sampler(0, 3)


@pytest.mark.parametrize(
    "make", [lambda: ab.exp3_sampler(10, 4, step_size=0.1), lambda: ab.uniform_sampler(10, 4)]
)
def test_wrong_shapes_are_rejected(make):
    sampler = make()
    state = sampler.init()
    with pytest.raises(ValueError, match="feedback"):
        sampler.update(state, jnp.arange(4), jnp.ones(3))
    with pytest.raises(ValueError, match="feedback"):
        sampler.update(state, jnp.arange(4), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="indices"):
        sampler.update(state, jnp.arange(5), jnp.ones(4))


def test_state_of_another_size_is_rejected():
    small, large = ab.exp3_sampler(10, 4, step_size=0.1), ab.exp3_sampler(20, 4, step_size=0.1)
    with pytest.raises(ValueError, match="state"):
        large.update(small.init(), jnp.arange(4), jnp.ones(4))
    with pytest.raises(ValueError, match="state"):
        large.sample(small.init(), jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="state"):
        large.sample(ab.uniform_sampler(20, 4).init(), jax.random.PRNGKey(0))


def test_nan_inf_negative_feedback_is_dropped_and_counted():
    n = 20
    sampler = ab.exp3_sampler(n, 4, step_size=0.5)
    state = with_distribution(sampler.init(), random_distribution(n, 0.1 / n, 0))
    update = jax.jit(sampler.update)
    bad = update(state, jnp.array([1, 2, 3, 4]), jnp.array([jnp.nan, jnp.inf, -2.0, 1.0]))
    assert int(bad.num_dropped_feedback) == 3
    assert float(bad.grad_norm_bound) == 1.0  # NaN/Inf do not enter the running max
    assert np.all(np.isfinite(np.asarray(bad.log_weights)))
    p_bad = np.asarray(ab.samplers.probabilities(bad))
    # dropped draws take the batch's mean valid feedback (here the one valid value, 1.0):
    # the same update as if every draw had reported it (so a silent arm gains no mass)
    typical = update(state, jnp.array([1, 2, 3, 4]), jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(bad.log_weights), np.asarray(typical.log_weights))
    np.testing.assert_array_equal(np.asarray(bad.tree), np.asarray(typical.tree))
    # ... and training goes on normally afterwards: no poisoning
    for i in range(50):
        bad = update(bad, jnp.array([i % n, (3 * i) % n, 5, 6]), jnp.array([0.5, 1.0, 2.0, 0.1]))
    p = np.asarray(ab.samplers.probabilities(bad))
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-5 and p.min() >= 0.1 / n * (1 - 1e-5)
    assert not np.allclose(p, p_bad)


def test_all_nan_feedback_leaves_distribution_unchanged():
    n = 8
    sampler = ab.exp3_sampler(n, 4, step_size=0.5)
    state = with_distribution(sampler.init(), random_distribution(n, 0.1 / n, 2))
    new = jax.jit(sampler.update)(state, jnp.array([0, 1, 1, 5]), jnp.full(4, jnp.nan))
    np.testing.assert_allclose(
        np.asarray(ab.samplers.probabilities(new)),
        np.asarray(ab.samplers.probabilities(state)),
        rtol=1e-6,
    )
    assert int(new.num_dropped_feedback) == 4


# ---------------------------------------------------------------- jit, uniform sampler, helpers


class CompileOnceTest(chex.TestCase):
    def test_sample_and_update_trace_once(self):
        n, batch_size = 500, 8
        sampler = ab.exp3_sampler(n, batch_size, step_size=0.1)
        traces = []

        @jax.jit
        def step(state, key):
            traces.append(1)
            indices, probs = sampler.sample(state, key)
            return sampler.update(state, indices, probs * 10)

        state = sampler.init()
        for i in range(5):
            state = step(state, jax.random.PRNGKey(i))
        self.assertLen(traces, 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_uniform_sampler(self):
        sampler = ab.uniform_sampler(30, 6)
        state = sampler.init()
        indices, probs = self.variant(sampler.sample)(state, jax.random.PRNGKey(0))
        chex.assert_shape(indices, (6,))
        np.testing.assert_allclose(np.asarray(probs), 1 / 30)
        np.testing.assert_allclose(np.asarray(ab.importance_weights(probs, 30)), 1.0, rtol=1e-6)
        state = self.variant(sampler.update)(state, indices, jnp.ones(6))
        self.assertEqual(int(state.step), 1)
        np.testing.assert_allclose(np.asarray(ab.samplers.probabilities(state)), 1 / 30)


def test_uniform_sampler_frequencies():
    sampler = ab.uniform_sampler(7, 50)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    indices = np.asarray(jax.vmap(lambda k: sampler.sample(sampler.init(), k)[0])(keys)).ravel()
    assert stats.chisquare(np.bincount(indices, minlength=7)).pvalue > 1e-3


def test_importance_weights_are_inverse_n_p():
    probs = jnp.array([0.5, 0.25, 0.125])
    np.testing.assert_allclose(np.asarray(ab.importance_weights(probs, 4)), [0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="num_examples"):
        ab.importance_weights(probs, 0)
    with pytest.raises(ValueError, match="probs"):
        ab.importance_weights(jnp.ones((2, 3)), 4)


def test_probabilities_rejects_non_states():
    with pytest.raises(TypeError, match="state"):
        ab.samplers.probabilities(jnp.ones(3))


# ---------------------------------------------------------------- the typed contract


def test_factories_build_base_samplers_with_their_distribution():
    from adambs_jax.samplers import _base as base

    for sampler in (ab.uniform_sampler(6, 2), ab.exp3_sampler(6, 2, step_size=0.1)):
        assert isinstance(sampler, base.Sampler)
        state = sampler.update(sampler.init(), jnp.array([0, 0]), jnp.array([1.0, 3.0]))
        np.testing.assert_array_equal(
            sampler.probabilities(state), ab.samplers.probabilities(state)
        )


def test_probabilities_asks_the_state_and_names_other_types():
    gn = ab.gradient_norm_sampler(4, 2)
    np.testing.assert_allclose(ab.samplers.probabilities(gn.init()), np.full(4, 0.25))
    for not_a_distribution in (ab.adam_impt_sampler(4, 2).init(), {"distribution": jnp.ones(4)}):
        with pytest.raises(TypeError, match=type(not_a_distribution).__name__):
            ab.samplers.probabilities(not_a_distribution)
