"""Tests of adambs_jax.priority: the stale-score priority sampler against its formula in
float64 (p_j = (1 - lambda) u_j / sum u + lambda / n, u_j = (s_j + eps)^alpha)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import adambs_jax as ab
from adambs_jax.samplers import _priority as priority
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.samplers._priority import priority_sampler

N, K = 20, 8
SCORES = np.geomspace(0.01, 10.0, N)  # a skewed state: p spans about 50x


def expected_p(scores, *, alpha=1.0, uniform_mix=0.1, eps=1e-6):
    u = (np.asarray(scores, np.float64) + eps) ** alpha
    return (1 - uniform_mix) * u / u.sum() + uniform_mix / len(u)


def skewed_state(sampler, scores=SCORES):
    """Every example's score set through ``update``, K at a time."""
    state = sampler.init()
    n = len(scores)
    for start in range(0, n, sampler.batch_size):
        idx = np.arange(start, start + sampler.batch_size) % n
        state = sampler.update(state, jnp.asarray(idx), jnp.asarray(scores[idx], jnp.float32))
    return state


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def draws(sampler, state, num_calls, seed=0):
    """``num_calls`` batches: (indices, probs), each (num_calls * K,)."""
    keys = jax.random.split(jax.random.key(seed), num_calls)
    indices, probs = jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(state, keys)
    return np.asarray(indices).ravel(), np.asarray(probs, np.float64).ravel()


def test_update_sets_the_scores_and_p_follows_the_formula():
    sampler = priority_sampler(N, K, alpha=0.7, uniform_mix=0.3)
    state = skewed_state(sampler)
    p = np.asarray(sampler.probabilities(state), np.float64)
    np.testing.assert_allclose(p, expected_p(SCORES, alpha=0.7, uniform_mix=0.3), rtol=1e-5)
    assert int(state.step) == 3 and int(state.num_dropped_feedback) == 0
    assert sampler.renormalize_every is None and sampler.renormalize is None


def test_draw_frequencies_match_the_mixture():
    sampler = priority_sampler(N, K)
    state = skewed_state(sampler)
    indices, _ = draws(sampler, state, num_calls=5000)
    counts = np.bincount(indices, minlength=N)
    p = np.asarray(sampler.probabilities(state), np.float64)
    assert stats.chisquare(counts, p / p.sum() * counts.sum()).pvalue > 1e-3


def test_probs_are_the_exact_mixture_at_the_indices():
    sampler = priority_sampler(N, K, uniform_mix=0.25)
    state = skewed_state(sampler)
    indices, probs = draws(sampler, state, num_calls=50)
    p = np.asarray(sampler.probabilities(state), np.float64)
    # the mixture, not a component's p (to float32 rounding: jit may fuse differently)
    np.testing.assert_allclose(probs, p[indices], rtol=1e-6)
    assert probs.min() >= 0.25 / N * (1 - 1e-6)


def test_weighted_batch_mean_is_unbiased():
    sampler = priority_sampler(N, K)
    state = skewed_state(sampler)
    g = np.sin(np.arange(N)) + 2.0  # a fixed vector, not proportional to the scores
    num_calls = 4000
    indices, probs = draws(sampler, state, num_calls=num_calls, seed=1)
    estimate = np.mean(g[indices] / (N * probs))
    p = np.asarray(sampler.probabilities(state), np.float64)
    per_draw_var = np.sum(g**2 / (N**2 * p)) - g.mean() ** 2
    tolerance = 5 * np.sqrt(per_draw_var / (num_calls * K))  # 5 standard errors
    assert abs(estimate - g.mean()) < tolerance


def test_duplicates_last_valid_one_wins_and_invalid_ones_take_the_batch_mean():
    sampler = priority_sampler(6, 6, uniform_mix=0.5)
    state = sampler.init()
    idx = jnp.array([1, 1, 2, 2, 3, 7], jnp.int32)
    feedback = jnp.array([4.0, 9.0, 3.0, jnp.nan, -1.0, 2.0])
    state = sampler.update(state, idx, feedback)
    # 1: the last wins; 2: its valid entry wins over its NaN; 3: its -1 takes the mean of
    # the valid entries (4, 9, 3); index 7 (out of range) writes nothing
    scores = np.array([1.0, 9.0, 3.0, 16.0 / 3.0, 1.0, 1.0])
    p = np.asarray(sampler.probabilities(state), np.float64)
    np.testing.assert_allclose(p, expected_p(scores, uniform_mix=0.5), rtol=1e-5)
    assert int(state.num_dropped_feedback) == 3  # NaN, negative, index 7 of n = 6
    state = sampler.update(
        state, jnp.array([0, 0, 0, 0, 0, 0]), jnp.array([5.0, 6.0, jnp.inf, -2.0, jnp.nan, jnp.inf])
    )
    scores[0] = 6.0  # invalid entries after the last valid one do not undo it
    p = np.asarray(sampler.probabilities(state), np.float64)
    np.testing.assert_allclose(p, expected_p(scores, uniform_mix=0.5), rtol=1e-5)
    assert int(state.num_dropped_feedback) == 7
    with pytest.raises(TypeError, match="indices"):
        sampler.update(state, jnp.zeros(6), jnp.ones(6))


@pytest.mark.parametrize("jit", [False, True])
def test_apply_false_leaves_the_state_bitwise_unchanged(jit):
    sampler = priority_sampler(N, K)
    state = skewed_state(sampler)
    update = jax.jit(sampler.update) if jit else sampler.update
    idx = jnp.array([0, 3, 3, 5, 19, 19, 25, -1])
    feedback = jnp.array([100.0, 0.0, 2.0, jnp.nan, 7.0, 1e3, 1.0, 1.0])
    kept = update(state, idx, feedback, apply=jnp.asarray(False))
    assert_bitwise_equal(kept, state)
    changed = update(state, idx, feedback, apply=jnp.asarray(True))
    assert not np.array_equal(np.asarray(changed.tree), np.asarray(state.tree))
    # every parent of the tree is still bitwise what a fresh build gives
    layout = sumtree.layout_for(N, state.arity)
    rebuilt = sumtree.build(sumtree.leaf_values(changed.tree, layout), layout)
    np.testing.assert_array_equal(np.asarray(changed.tree), np.asarray(rebuilt))


def test_uniform_mix_one_is_exactly_uniform():
    sampler = priority_sampler(N, K, uniform_mix=1.0)
    state = skewed_state(sampler)
    np.testing.assert_array_equal(
        np.asarray(sampler.probabilities(state)), np.full(N, np.float32(1.0) / N, np.float32)
    )
    _, probs = sampler.sample(state, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(probs), np.full(K, np.float32(1.0) / N))


def test_extreme_scores_stay_finite():
    sampler = priority_sampler(4, 4, alpha=8.0, uniform_mix=0.5)
    state = sampler.update(sampler.init(), jnp.arange(4), jnp.array([0.0, 1e-3, 1e20, 3e38]))
    p = np.asarray(sampler.probabilities(state), np.float64)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0, rel=1e-6)
    assert np.isfinite(float(sumtree.total(state.tree)))
    # 0 and 1e-3 give ~0 (the floor, 1e-24) next to 1e20 and 3e38, both capped at 1e30
    np.testing.assert_allclose(p, [0.125, 0.125, 0.375, 0.375], rtol=1e-6)
    indices, probs = sampler.sample(state, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(p, np.float32)[indices])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(uniform_mix=0.0), "uniform_mix"),
        (dict(uniform_mix=1.5), "uniform_mix"),
        (dict(eps=0.0), "eps"),
        (dict(initial_score=float("nan")), "initial_score"),
        (dict(initial_score=-1.0), "initial_score"),
        (dict(arity=3), "arity"),
        (dict(uniform_mix="adaptive"), "uniform_mix"),
        (dict(min_uniform_mix=0.0), "min_uniform_mix"),
        (dict(min_uniform_mix=2.0), "min_uniform_mix"),
        (dict(mix_decay=1.0), "mix_decay"),
        (dict(mix_decay=-0.1), "mix_decay"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        priority_sampler(N, K, **kwargs)


def test_bad_sizes_and_states_are_refused():
    with pytest.raises(ValueError, match="num_examples"):
        priority_sampler(0, K)
    with pytest.raises(ValueError, match="batch_size"):
        priority_sampler(N, True)
    sampler = priority_sampler(N, K)
    with pytest.raises(ValueError, match="num_examples=30"):
        sampler.sample(priority_sampler(30, K).init(), jax.random.key(0))
    with pytest.raises(TypeError, match="PrioritySamplerState"):
        sampler.update(ab.uniform_sampler(N, K).init(), jnp.arange(K), jnp.ones(K))


def test_config_holds_the_validated_values():
    config = priority.priority_config(N, K, alpha=1, uniform_mix=1, eps=1e-6, initial_score=2)
    assert config.alpha == 1.0 and isinstance(config.alpha, float)
    assert config.layout == sumtree.layout_for(N, sumtree.default_arity())
    assert priority.max_priority(10**9) == pytest.approx(1e28)
    np.testing.assert_allclose(
        priority.priorities(config, jnp.array([0.0, 3.0])), [1e-6, 3.0 + 1e-6], rtol=1e-6
    )


def test_trains_a_linear_model_with_adam_and_loss_feedback():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    def loss_fn(params, batch):
        return jnp.square(batch["x"] @ params["w"] + params["b"] - batch["y"])

    sampler = priority_sampler(64, 16)
    step = ab.make_train_step(loss_fn, optax.adam(0.05), sampler, feedback="loss")
    state = step.init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    full_loss = lambda params: float(jnp.mean(loss_fn(params, data)))  # noqa: E731
    before = full_loss(state.params)
    for key in jax.random.split(jax.random.key(0), 30):
        state, metrics = step(state, data, key)
    assert full_loss(state.params) < 0.5 * before
    assert int(state.sampler_state.step) == 30
    assert not np.allclose(np.asarray(sampler.probabilities(state.sampler_state)), 1 / 64)


def test_ab_probabilities_reads_the_state_alone():
    sampler = priority_sampler(N, K, alpha=0.5, uniform_mix=0.4)
    state = skewed_state(sampler)
    assert state.uniform_mix == 0.4  # static: the state carries what p needs
    np.testing.assert_array_equal(
        np.asarray(ab.samplers.probabilities(state)), np.asarray(sampler.probabilities(state))
    )
    np.testing.assert_allclose(
        np.asarray(ab.samplers.probabilities(state), np.float64),
        expected_p(SCORES, alpha=0.5, uniform_mix=0.4),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="uniform_mix=0.4, but this sampler has uniform_mix=0.1"):
        priority_sampler(N, K, uniform_mix=0.1).sample(state, jax.random.key(0))


def test_refresh_rescores_every_example_once_in_m_steps():
    m = 4
    sampler = priority_sampler(N, K, uniform_mix=0.2, refresh_every=m)
    assert isinstance(sampler, ab.ScoringSampler) and sampler.batch_size == K
    assert sampler.sample.args[0].refresh_chunk == 5  # ceil(20 / 4)
    table = jnp.asarray(SCORES, jnp.float32)
    seen = []

    def score_fn(indices):
        seen.append(np.asarray(indices))
        return table[indices]

    state = sampler.init()
    for t in range(m):
        indices, probs, state = sampler.sample(state, jax.random.key(t), score_fn)
        p = np.asarray(sampler.probabilities(state))
        np.testing.assert_allclose(np.asarray(probs), p[np.asarray(indices)], rtol=1e-6)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N))  # each once
    assert int(state.cursor) == 0
    np.testing.assert_allclose(
        np.asarray(sampler.probabilities(state), np.float64),
        expected_p(SCORES, uniform_mix=0.2),
        rtol=1e-5,
    )
    # an invalid refreshed score keeps the old priority
    bad = lambda indices: jnp.full(indices.shape, jnp.nan)  # noqa: E731
    _, _, after = sampler.sample(state, jax.random.key(9), bad)
    np.testing.assert_array_equal(np.asarray(after.tree), np.asarray(state.tree))
    with pytest.raises(ValueError, match="need refresh_every"):
        priority_sampler(N, K, score_feedback="loss")
    with pytest.raises(ValueError, match="refresh_every"):
        priority_sampler(N, K, refresh_every=0)


def test_a_refreshing_sampler_trains_in_make_train_step():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(x @ np.array([1.0, -1.0, 2.0], np.float32))}

    def loss_fn(params, batch):
        return jnp.square(batch["x"] @ params["w"] - batch["y"])

    sampler = priority_sampler(32, 8, refresh_every=4, score_feedback="loss")
    step = ab.make_train_step(loss_fn, optax.adam(0.05), sampler, feedback="loss")
    state = step.init({"w": jnp.zeros(3)})
    before = float(jnp.mean(loss_fn(state.params, data)))
    for key in jax.random.split(jax.random.key(0), 20):
        state, _ = step(state, data, key)
    assert float(jnp.mean(loss_fn(state.params, data))) < 0.5 * before
    assert int(state.sampler_state.cursor) == 0  # 20 steps of 8 = 5 full passes over 32
    leaves = sumtree.leaf_values(
        state.sampler_state.tree, sumtree.layout_for(32, state.sampler_state.arity)
    )
    assert np.all(
        np.asarray(leaves)
        != priority.priorities(  # every score was refreshed
            sampler.sample.args[0], jnp.asarray(1.0)
        )
    )


@pytest.mark.slow
def test_an_example_that_never_reports_keeps_a_typical_score():
    """Regression: a draw with NaN feedback kept the example's first score (initial_score=1),
    while the others' scores fell (here to 0.05-0.2): 10 of 1,000 silent examples gained mass.
    Now a dropped entry takes the batch's mean valid feedback."""
    n, silent = 1000, jnp.arange(10)
    sampler = ab.priority_sampler(n, 32)
    feedback = jnp.linspace(0.05, 0.2, n).at[silent].set(jnp.nan)

    @jax.jit
    def run(state, keys):
        def body(state, key):
            indices, _ = sampler.sample(state, key)
            return sampler.update(state, indices, feedback[indices]), None

        return jax.lax.scan(body, state, keys)[0]

    state = run(sampler.init(), jax.random.split(jax.random.key(0), 3000))
    share = float(jnp.sum(sampler.probabilities(state)[silent]))
    assert share < 0.015, share  # 1% to start with; about 1% for a typical score
    assert int(state.num_dropped_feedback) > 0


# ----------------------------------------------------------------------------- adaptive mix


def with_mix(state, mix):
    """The state with lambda set by hand (the tree and everything else unchanged)."""
    return state.replace(mix=jnp.asarray(mix, jnp.float32))


def test_auto_is_the_default_starts_uniform_and_has_a_geometric_grid():
    sampler = priority_sampler(N, K)
    config = sampler.update.args[0]
    assert config.uniform_mix == "auto" and config.adaptive
    state = sampler.init()
    assert float(state.mix) == 1.0 and state.mix_ratios.shape == (6,)
    np.testing.assert_allclose(priority.mix_candidates(config), np.geomspace(0.1, 1.0, 6))
    fixed = priority_sampler(N, K, uniform_mix=0.3).update.args[0]
    assert priority.mix_candidates(fixed) == (0.3,) and not fixed.adaptive


def test_auto_draw_frequencies_and_probs_follow_the_state_mix():
    sampler = priority_sampler(N, K)
    state = with_mix(skewed_state(sampler), 0.1)
    p = np.asarray(sampler.probabilities(state), np.float64)
    np.testing.assert_allclose(p, expected_p(SCORES, uniform_mix=0.1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ab.samplers.probabilities(state), np.float64), p, rtol=1e-6
    )
    indices, probs = draws(sampler, state, num_calls=5000)
    np.testing.assert_allclose(probs, p[indices], rtol=1e-6)
    counts = np.bincount(indices, minlength=N)
    assert stats.chisquare(counts, p / p.sum() * counts.sum()).pvalue > 1e-3


def test_auto_weighted_batch_mean_is_unbiased():
    sampler = priority_sampler(N, K)
    state = with_mix(skewed_state(sampler), 0.1585)
    g = np.cos(np.arange(N)) + 1.5
    num_calls = 4000
    indices, probs = draws(sampler, state, num_calls=num_calls, seed=2)
    estimate = np.mean(g[indices] / (N * probs))
    p = np.asarray(sampler.probabilities(state), np.float64)
    per_draw_var = np.sum(g**2 / (N**2 * p)) - g.mean() ** 2
    assert abs(estimate - g.mean()) < 5 * np.sqrt(per_draw_var / (num_calls * K))


def exact_variance_ratio(q, f, lam):
    """V(p) / V(u) = sum f^2 / (n^2 p) / (sum f^2 / n) for p = (1 - lam) q + lam / n."""
    n = len(q)
    p = (1 - lam) * q + lam / n
    return np.sum(f**2 / (n**2 * p)) / (np.sum(f**2) / n)


@pytest.mark.parametrize("stale", [False, True])
def test_mix_ratios_estimate_the_candidates_variance_ratios(stale):
    """The per-batch rho_c, summed numerator and denominator over many batches drawn from p,
    converge to V(p^(c)) / V(u) of the feedback f (fresh: f = the scores; stale: f reversed)."""
    sampler = priority_sampler(N, K)
    config = sampler.update.args[0]
    state = with_mix(skewed_state(sampler), 0.25)
    q = SCORES / SCORES.sum()  # u = s + 1e-6, negligible here
    f = SCORES[::-1].copy() if stale else SCORES.copy()
    indices, probs = draws(sampler, state, num_calls=4000, seed=3)
    lams = np.asarray(priority.mix_candidates(config))
    # the estimator of the module docstring, in float64, over all draws at once
    weighted = f[indices] ** 2 / (N * probs)
    cand = (1 - lams[:, None]) * q[indices][None, :] * N + lams[:, None]
    estimate = np.sum(weighted[None, :] / cand, axis=1) / np.sum(weighted)
    exact = np.array([exact_variance_ratio(q, f, lam) for lam in lams])
    np.testing.assert_allclose(estimate, exact, rtol=0.05)
    # the library's rho of one batch is the same formula
    idx = jnp.asarray(indices[:K])
    clean = priority.clean_feedback(idx, jnp.asarray(f[indices[:K]], jnp.float32), N)
    rho, informative = priority.mix_ratios(config, state, clean)
    w = f[indices[:K]] ** 2 / (N * probs[:K])
    c = (1 - lams[:, None]) * q[indices[:K]][None, :] * N + lams[:, None]
    np.testing.assert_allclose(np.asarray(rho), np.sum(w / c, axis=1) / np.sum(w), rtol=1e-4)
    assert bool(informative) and float(rho[-1]) == pytest.approx(1.0, rel=1e-6)
    if stale:  # reversed scores: every mix below 1 is worse than uniform
        assert np.all(exact[:-1] > 1)
    else:
        assert exact[0] < 0.75


def run_updates(sampler, state, feedback_of, num_steps, seed=0):
    """``num_steps`` sample + update steps with feedback ``feedback_of[indices]``."""

    @jax.jit
    def step(state, key):
        indices, _ = sampler.sample(state, key)
        return sampler.update(state, indices, jnp.asarray(feedback_of)[indices]), None

    keys = jax.random.split(jax.random.key(seed), num_steps)
    return jax.lax.scan(step, state, keys)[0]


def test_auto_picks_a_small_mix_for_fresh_scores_and_uniform_for_stale_ones():
    n = 200
    sampler = priority_sampler(n, 16)
    f = np.geomspace(0.01, 10.0, n)
    # the feedback never changes: the stored scores are fresh, sampling by them helps
    state = run_updates(sampler, sampler.init(), f, 400)
    assert float(state.mix) == pytest.approx(0.1, rel=1e-6)
    assert float(state.mix_ratios[0]) < 0.8 < float(state.mix_ratios[-1]) + 1e-6
    # now every score is stale: the feedback is reversed, the tree still says the old order;
    # within 10 steps the estimate sees that small mixes are worse than uniform and moves
    # lambda up; once the redrawn examples have fresh scores, it comes back down
    moved = run_updates(sampler, state, f[::-1].copy(), 10, seed=1)
    assert float(moved.mix) >= 0.5
    assert float(moved.mix_ratios[0]) > 1.5
    recovered = run_updates(sampler, moved, f[::-1].copy(), 300, seed=2)
    assert float(recovered.mix) <= 0.4 and float(recovered.mix_ratios[0]) < 1.0


def test_auto_without_informative_feedback_keeps_the_mix():
    sampler = priority_sampler(N, K)
    state = with_mix(skewed_state(sampler), 0.1)
    kept = sampler.update(state, jnp.arange(K), jnp.zeros(K))
    assert float(kept.mix) == pytest.approx(0.1)
    np.testing.assert_array_equal(np.asarray(kept.mix_ratios), np.asarray(state.mix_ratios))
    nan = sampler.update(state, jnp.arange(K), jnp.full(K, jnp.nan))
    np.testing.assert_array_equal(np.asarray(nan.mix_ratios), np.asarray(state.mix_ratios))


def test_a_state_of_another_min_uniform_mix_is_refused():
    state = priority_sampler(N, K, min_uniform_mix=0.2).init()
    with pytest.raises(ValueError, match="min_uniform_mix=0.2, but this sampler has"):
        priority_sampler(N, K).sample(state, jax.random.key(0))
    with pytest.raises(ValueError, match="uniform_mix='auto', but this sampler has"):
        priority_sampler(N, K, uniform_mix=0.1).sample(
            priority_sampler(N, K).init(), jax.random.key(0)
        )


@pytest.mark.parametrize("uniform_mix", ["auto", 0.1])
def test_update_in_a_scan_does_not_copy_the_tree(uniform_mix):
    """Regression: the adaptive mix read the old root after the update's in-place write was
    issued, and XLA copied the O(n) tree twice per update (~0.7 ms at n = 10^6), in a hand
    loop's jitted ``learn`` as in a scan of updates. The old root now comes from the new one."""
    n, k = 100_000, 128
    sampler = priority_sampler(n, k, uniform_mix=uniform_mix)

    def body(state, key):
        indices = jax.random.randint(key, (k,), 0, n)
        feedback = jnp.abs(jax.random.normal(key, (k,)))
        return sampler.update(state, indices, feedback), None

    run = jax.jit(lambda state, keys: jax.lax.scan(body, state, keys), donate_argnums=0)
    state = sampler.init()
    hlo = run.lower(state, jax.random.split(jax.random.key(0), 4)).compile().as_text()
    size = state.tree.shape[0]
    assert f"f32[{size}]" in hlo
    assert not re.search(rf"f32\[{size}\]\S* copy\(", hlo)
