"""Tests for the domain sampler: a bandit over D domains of unequal sizes, uniform within."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers import _domains as domains
from adambs_jax.samplers._domains import DomainSamplerState, contiguous_domains, domain_sampler
from tests.helpers import run_api_doc_example

SIZES = [1, 2, 5, 12]  # n = 20, D = 4
K = 8


def _domain_ids(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def _trained_state(sampler, sizes, updates=60, seed=0):
    """A state whose mixture is far from uniform: the feedback grows with the domain."""
    ids = jnp.asarray(_domain_ids(sizes))

    def one_update(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, (ids[indices] + 1.0) ** 2), None

    keys = jax.random.split(jax.random.key(seed), updates)
    return jax.jit(lambda state: jax.lax.scan(one_update, state, keys)[0])(sampler.init())


def _draws(sampler, state, num_draws, seed=1):
    keys = jax.random.split(jax.random.key(seed), num_draws)
    return jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(state, keys)


@pytest.fixture(scope="module")
def exp3_domains():
    sampler = domain_sampler(SIZES, K, num_steps=100, step_size=0.5)
    return sampler, _trained_state(sampler, SIZES)


def _fixed_mixture(q):
    """A base factory whose mixture is the fixed ``q`` (D,): no learning."""

    def factory(num_examples, batch_size):
        logits = jnp.log(jnp.asarray(q, jnp.float32))

        def sample(state, key):
            arms = jax.random.categorical(key, logits, shape=(batch_size,)).astype(jnp.int32)
            return arms, jnp.exp(logits)[arms]

        return ab.samplers.Sampler(
            init=lambda: {"seen": jnp.zeros((), jnp.int32)},
            sample=sample,
            update=lambda state, i, f, *, apply=True: state,
            num_examples=num_examples,
            batch_size=batch_size,
            probabilities=lambda state: jnp.exp(logits),
        )

    return factory


# --- draws and weights ----------------------------------------------------------------------


def test_draw_frequencies_are_q_over_the_domain_size(exp3_domains):
    sampler, state = exp3_domains
    q = np.asarray(state.domain_probabilities())
    assert q.max() / q.min() > 1.5  # a non-uniform state
    ids = _domain_ids(SIZES)
    p = np.asarray(sampler.probabilities(state))
    np.testing.assert_allclose(p, q[ids] / np.asarray(SIZES)[ids], rtol=1e-6)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(ab.samplers.probabilities(state), p)
    indices, probs = (np.asarray(a) for a in _draws(sampler, state, 20000))
    np.testing.assert_allclose(probs, p[indices], rtol=1e-6)
    counts = np.bincount(indices.ravel(), minlength=sum(SIZES))
    expected = counts.sum() * p.astype(np.float64) / p.astype(np.float64).sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3


@settings(max_examples=6, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=20),
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_every_draw_lies_in_its_domain_with_probability_q_over_n_d(sizes, batch_size, seed):
    sampler = domain_sampler(sizes, batch_size, base="uniform")
    state = sampler.init()
    indices, probs = sampler.sample(state, jax.random.key(seed))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    domain = np.searchsorted(offsets, np.asarray(indices), side="right") - 1
    assert indices.dtype == jnp.int32
    assert np.all((np.asarray(indices) >= 0) & (np.asarray(indices) < offsets[-1]))
    expected = 1.0 / (len(sizes) * np.asarray(sizes)[domain])
    np.testing.assert_allclose(np.asarray(probs), expected, rtol=1e-6)
    found, in_range = domains.domain_of(state.offsets, indices, int(offsets[-1]))
    np.testing.assert_array_equal(found, domain)
    assert bool(jnp.all(in_range))
    weights = ab.importance_weights(probs, sampler.num_examples)  # n_d / (n q_d)
    np.testing.assert_allclose(
        weights, np.asarray(sizes)[domain] * len(sizes) / offsets[-1], rtol=1e-5
    )


def _linear_gradients(sizes, slopes, intercepts):
    """g_j = a_d + b_d t / n_d for the t-th example of domain d (closed form, no (n,) array):
    the exact mean and second moment S_d^2 of every domain."""
    sizes = np.asarray(sizes, np.float64)
    mean_u = (sizes - 1) / (2 * sizes)
    mean_u2 = (sizes - 1) * (2 * sizes - 1) / (6 * sizes**2)
    means = intercepts + slopes * mean_u
    second = intercepts**2 + 2 * intercepts * slopes * mean_u + slopes**2 * mean_u2
    return means, second


def test_the_weighted_gradient_is_unbiased_with_domains_of_1_to_a_million_examples():
    sizes = np.array([1, 7, 1000, 10**6, 30])
    q = np.array([0.3, 0.1, 0.2, 0.15, 0.25])  # far from n_d / n (the big domain: 0.15)
    slopes = np.array([0.0, 2.0, -3.0, 4.0, 1.0])
    intercepts = np.array([5.0, -1.0, 2.0, 0.5, -4.0])
    n, batch_size, rounds = int(sizes.sum()), 64, 10000
    sampler = domain_sampler(sizes, batch_size, base=_fixed_mixture(q))
    indices, probs = _draws(sampler, sampler.init(), rounds, seed=5)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    idx = np.asarray(indices)
    d = np.searchsorted(offsets, idx, side="right") - 1
    grads = intercepts[d] + slopes[d] * (idx - offsets[d]) / sizes[d]
    weights = np.asarray(ab.importance_weights(probs.reshape(-1), n)).reshape(idx.shape)
    np.testing.assert_allclose(weights, sizes[d] / (n * q[d]), rtol=1e-4)
    estimates = (weights * grads).mean(axis=1)  # (rounds,)
    means, second = _linear_gradients(sizes, slopes, intercepts)
    exact = float(np.sum(sizes * means) / n)
    standard_error = estimates.std() / np.sqrt(rounds)
    assert abs(estimates.mean() - exact) < 4.5 * standard_error
    # the unweighted batch mean is biased here: the test can fail
    assert abs(grads.mean() - exact) > 20 * standard_error
    # and the variance is (1/K) ((1/n^2) sum_d n_d^2 S_d^2 / q_d - gbar^2) (module docstring)
    variance = (np.sum(sizes**2 * second / q) / n**2 - exact**2) / batch_size
    np.testing.assert_allclose(estimates.var(), variance, rtol=0.05)


# --- feedback -------------------------------------------------------------------------------


def test_domain_feedback_is_the_size_scaled_rms_of_each_domains_draws():
    draws = jnp.array([2, 0, 2, 1, 2, 1], jnp.int32)
    f = jnp.array([3.0, 7.0, 4.0, jnp.nan, -1.0, -2.0])
    valid = jnp.isfinite(f) & (f >= 0)
    sizes = jnp.array([20, 10, 20, 5, 20, 5])  # n_d of each draw
    out = np.asarray(domains.domain_feedback(draws, f, valid, sizes, 10.0))
    rms = np.sqrt((9 + 16) / 2)  # domain 2's valid draws: 3 and 4 (the -1 is left out)
    np.testing.assert_allclose(out[[0, 2, 4]], 2.0 * rms, rtol=1e-6)  # n_d / nbar = 2
    np.testing.assert_allclose(out[1], 7.0, rtol=1e-6)
    assert np.all(np.isnan(out[[3, 5]]))  # domain 1: no valid draw
    for scale in (1e30, 1e-35):  # squared naively, these overflow / underflow float32
        scaled = np.asarray(domains.domain_feedback(draws, f * scale, valid, sizes, 10.0))
        np.testing.assert_allclose(scaled[[0, 1, 2]], out[[0, 1, 2]] * scale, rtol=1e-5)


def test_invalid_feedback_never_poisons_the_state(exp3_domains):
    sampler, state = exp3_domains
    indices, _ = sampler.sample(state, jax.random.key(7))
    bad = jnp.array([jnp.nan, jnp.inf, -1.0, 1.0, 2.0, jnp.nan, 3.0, 0.5])
    update = jax.jit(sampler.update)  # one compilation for the three updates below
    new = update(state, indices, bad)
    assert bool(new.healthy())
    q = np.asarray(new.domain_probabilities())
    assert np.all(np.isfinite(q)) and abs(q.sum() - 1) < 1e-5
    assert int(new.num_dropped_feedback) == int(state.num_dropped_feedback) + 4
    # nothing valid: the distribution does not move
    nothing = update(state, indices, jnp.full((K,), jnp.nan))
    np.testing.assert_allclose(nothing.domain_probabilities(), state.domain_probabilities())
    # out-of-range indices (int64 beyond int32 too) count as invalid, not wrapped
    far = jnp.array([-1, 20, 3, 0, 0, 0, 0, 0], jnp.int32)
    out = update(state, far, jnp.ones(K))
    assert int(out.num_dropped_feedback) == int(state.num_dropped_feedback) + 2
    assert bool(out.healthy())


@pytest.mark.parametrize("base", ["exp3", "priority"])
def test_nan_feedback_of_a_whole_run_leaves_a_usable_state(base):
    kwargs = {"num_steps": 50, "step_size": 0.5} if base == "exp3" else {}
    sampler = domain_sampler([3, 50, 400], 16, base=base, **kwargs)
    state = sampler.init()

    def one(state, key):
        indices, _ = sampler.sample(state, key)
        f = jnp.where(jnp.arange(16) % 3 == 0, jnp.nan, 1.0 + indices / 100.0)
        return sampler.update(state, indices, f), None

    state, _ = jax.lax.scan(one, state, jax.random.split(jax.random.key(0), 200))
    q = np.asarray(state.domain_probabilities())
    assert bool(state.healthy()) and np.all(np.isfinite(q)) and np.all(q > 0)
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)


def test_constant_feedback_moves_the_mixture_toward_the_domain_sizes():
    """With the same feedback everywhere the variance-optimal q is n_d / n (plain uniform
    training): the size factor n_d / nbar in F_d is what makes exp3 go there (here to the
    floor's cap, [p_min, 1 - p_min] = [0.25, 0.75])."""
    sampler = domain_sampler([20, 180], 16, step_size=0.2, p_min=0.25)

    def one(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, jnp.ones(16)), None

    state, _ = jax.jit(lambda s: jax.lax.scan(one, s, jax.random.split(jax.random.key(0), 800)))(
        sampler.init()
    )
    q = np.asarray(state.domain_probabilities())
    assert q[1] > 0.7, q  # from 0.5 toward 0.9, capped at 0.75


# --- special cases and the contract ---------------------------------------------------------


@pytest.mark.parametrize("base", ["exp3", "uniform"])
def test_domains_of_one_example_are_the_base_sampler_exactly(base):
    n = 24
    kwargs = {"num_steps": 50} if base == "exp3" else {}
    wrapped = domain_sampler([1] * n, K, base=base, **kwargs)
    plain = domains.BASE_SAMPLERS[base](n, K, **kwargs)
    state, reference = wrapped.init(), plain.init()
    feedback = lambda indices: indices.astype(jnp.float32) + 0.5  # noqa: E731

    @jax.jit
    def both(state, reference, key):
        (indices, probs) = wrapped.sample(state, key)
        expected = plain.sample(reference, jax.random.split(key)[0])
        return (
            indices,
            probs,
            expected,
            wrapped.update(state, indices, feedback(indices)),
            plain.update(reference, expected[0], feedback(expected[0])),
        )

    for key in jax.random.split(jax.random.key(3), 5):
        indices, probs, expected, state, reference = both(state, reference, key)
        np.testing.assert_array_equal(indices, expected[0])
        np.testing.assert_array_equal(probs, expected[1])
    jax.tree.map(np.testing.assert_array_equal, state.base, reference)
    np.testing.assert_array_equal(wrapped.probabilities(state), plain.probabilities(reference))


def test_equal_sizes_give_the_group_samplers_distribution():
    """D equal domains of m: the same p (n,) as group_sampler's for one base state (its
    draws differ: whole runs there, independent examples here)."""
    groups = ab.group_sampler(32, 8, 4, num_steps=100, step_size=0.5)

    def one(state, key):
        indices, _ = groups.sample(state, key)
        return groups.update(state, indices, indices.astype(jnp.float32) ** 2), None

    keys = jax.random.split(jax.random.key(0), 20)
    group_state = jax.jit(lambda s: jax.lax.scan(one, s, keys)[0])(groups.init())
    sampler = domain_sampler([4] * 8, 8, num_steps=100, step_size=0.5)
    state = sampler.init().replace(base=group_state.base)
    p = np.asarray(sampler.probabilities(state))
    assert p.max() / p.min() > 1.5
    np.testing.assert_allclose(p, groups.probabilities(group_state), rtol=1e-6)


def test_apply_false_keeps_the_state_and_renormalize_delegates(exp3_domains):
    sampler, state = exp3_domains
    indices, _ = sampler.sample(state, jax.random.key(4))
    f = jnp.array([1.0, jnp.nan, 2, 3, 4, 5, 6, 7])
    same = jax.jit(functools.partial(sampler.update, apply=False))(state, indices, f)
    jax.tree.map(np.testing.assert_array_equal, same, state)
    assert sampler.renormalize_every is not None
    renormalized = jax.jit(sampler.renormalize)(state)
    assert int(renormalized.base.num_rescales) == int(state.base.num_rescales) + 1
    np.testing.assert_allclose(
        sampler.probabilities(renormalized), sampler.probabilities(state), rtol=1e-5
    )
    assert int(state.step) == 60  # the base's count (ab.Sampling's schedule reads it)


def test_contiguous_domains_from_an_id_per_example():
    ids = np.array([2, 0, 2, 1, 0, 2])
    sizes, order = contiguous_domains(ids)
    np.testing.assert_array_equal(sizes, [2, 1, 3])
    np.testing.assert_array_equal(ids[order], [0, 0, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"domain_ids: domains \[1\] have no example"):
        contiguous_domains(np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="domain_ids must be >= 0"):
        contiguous_domains(np.array([0, -1]))
    with pytest.raises(ValueError, match="domain_ids must be < num_domains=2"):
        contiguous_domains(np.array([0, 2]), num_domains=2)
    with pytest.raises(ValueError, match="domain_ids must be a non-empty 1-D array of ints"):
        contiguous_domains(np.array([0.5]))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="sizes must be a non-empty 1-D sequence"):
        domain_sampler([], 4)
    with pytest.raises(ValueError, match="sizes must be a non-empty 1-D sequence"):
        domain_sampler([[1, 2]], 4)
    with pytest.raises(ValueError, match=r"sizes must all be >= 1 .* sizes\[1\]=0"):
        domain_sampler([3, 0, 2], 4)
    with pytest.raises(ValueError, match=r"sizes\[0\]=-5"):
        domain_sampler([-5], 4)
    with pytest.raises(ValueError, match="sizes must hold ints"):
        domain_sampler([1.5, 2.0], 4)
    with pytest.raises(ValueError, match="more than int32 indices"):
        domain_sampler([2**30, 2**30], 4)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        domain_sampler([3, 4], 0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        domain_sampler([3, 4], 2.0)
    with pytest.raises(ValueError, match="base must be one of"):
        domain_sampler([3, 4], 4, base="nope")
    with pytest.raises(TypeError, match="base must be a name or a sampler factory"):
        domain_sampler([3, 4], 4, base=3)
    with pytest.raises(TypeError, match="scoring sampler is not supported"):
        domain_sampler([3, 4], 4, base=lambda n, k: ab.adam_impt_sampler(n, k))
    with pytest.raises(ValueError, match="base: the factory was called with"):
        domain_sampler([3, 4], 4, base=lambda n, k: ab.uniform_sampler(n + 1, k))
    sampler = domain_sampler([3, 4], 4, num_steps=10)
    state = sampler.init()
    indices, _ = sampler.sample(state, jax.random.key(0))
    with pytest.raises(ValueError, match=r"feedback must have shape \(4,\)"):
        sampler.update(state, indices, jnp.ones(3))
    with pytest.raises(ValueError, match=r"indices must have shape \(4,\)"):
        sampler.update(state, indices[:2], jnp.ones(4))
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        sampler.update(state, jnp.zeros(4), jnp.ones(4))
    with pytest.raises(TypeError, match="state must be a DomainSamplerState"):
        sampler.sample(ab.uniform_sampler(7, 4).init(), jax.random.key(0))
    with pytest.raises(ValueError, match="state: built for num_examples=7 in num_domains=2"):
        sampler.sample(domain_sampler([5, 2], 4, num_steps=10).init(), jax.random.key(0))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        sampler.sample(state, 0)


# --- inside the library's step, hand loop and checkpoints -----------------------------------

SIZES_STEP = [4, 12, 48]  # n = 64


def _regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(SIZES_STEP), 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _loss(params, batch):
    return jnp.square(batch["x"] @ params["w"] - batch["y"])


@pytest.mark.parametrize("base", ["exp3", "uniform", "priority"])
def test_trains_inside_make_train_step(base):
    data = _regression()
    kwargs = {"num_steps": 40} if base == "exp3" else {}
    sampler = domain_sampler(SIZES_STEP, 8, base=base, **kwargs)
    step = ab.make_train_step(_loss, optax.adam(0.1), sampler)
    state = step.init({"w": jnp.zeros(3)})
    full_loss = lambda params: float(jnp.mean(_loss(params, data)))  # noqa: E731
    before = full_loss(state.params)
    for key in jax.random.split(jax.random.key(0), 40):
        state, metrics = step(state, data, key)
    assert full_loss(state.params) < 0.2 * before
    assert isinstance(state.sampler_state, DomainSamplerState)
    assert int(state.skipped_steps) == 0


def test_hand_loop_sampling_draws_and_learns():
    data = _regression()
    sampling = ab.Sampling(domain_sampler(SIZES_STEP, 8, num_steps=20), data, key=jax.random.key(0))
    for _ in range(3):
        batch = sampling.draw()
        assert batch["x"].shape == (8, 3) and batch.weights.shape == (8,)
        sampling.learn(jnp.abs(batch["y"]))
    assert int(sampling.state.step) == 3
    np.testing.assert_allclose(float(sampling.probabilities().sum()), 1.0, rtol=1e-5)


def test_a_checkpoint_resumes_bitwise_and_refuses_another_partition(tmp_path):
    data = _regression()
    sampler = domain_sampler(SIZES_STEP, 8, num_steps=20, step_size=0.5)
    step = ab.make_train_step(_loss, optax.adam(0.05), sampler)
    keys = jax.random.split(jax.random.key(1), 12)

    def train(state, keys):
        for key in keys:
            state, _ = step(state, data, key)
        return state

    straight = train(step.init({"w": jnp.zeros(3)}), keys)
    half = train(step.init({"w": jnp.zeros(3)}), keys[:6])
    ab.save_checkpoint(tmp_path / "c", half, sampler=sampler)
    meta = ab.checkpoint.read_checkpoint_metadata(tmp_path / "c")
    assert meta["sampler_kind"] == "DomainSamplerState"
    assert meta["sampler_config"]["num_domains"] == 3
    resumed = ab.restore_checkpoint(tmp_path / "c", step.init({"w": jnp.ones(3)}), sampler=sampler)
    resumed = train(resumed, keys[6:])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(straight.sampler_state.domain_probabilities(), 1 / 3)
    # the same n in another partition: refused before any array is read
    other = domain_sampler([12, 4, 48], 8, num_steps=20, step_size=0.5)
    like = ab.make_train_step(_loss, optax.adam(0.05), other).init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="sizes_digest"):
        ab.restore_checkpoint(tmp_path / "c", like, sampler=other)


def test_a_damaged_offsets_array_is_refused():
    state = domain_sampler(SIZES_STEP, 8, num_steps=5).init()
    damaged = state.replace(offsets=state.offsets.at[1].set(5))
    with pytest.raises(ValueError, match="where: the domain sampler state's offsets"):
        damaged.restored(state, {}, "where")
    assert state.restored(state, {}, "where") is state


def test_api_doc_domains_example_runs():
    run_api_doc_example("# domain sampler example")
