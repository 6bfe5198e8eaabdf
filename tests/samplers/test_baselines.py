"""Tests of adambs_jax.baselines with a real model: p^GN's exact per-example norms and both
baselines inside make_train_step (each baseline's own steps: test_adam_impt.py,
test_gradient_norm.py, test_scored_draws.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.feedback._scoring import make_score_fn


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
    norms = np.array(
        [
            np.sqrt(
                sum(
                    np.sum(np.square(np.asarray(g, np.float64)))
                    for g in jax.tree.leaves(grad_of_one(params, j))
                )
            )
            for j in range(n)
        ]
    )
    expected = (1 - n * p_floor) * norms / norms.sum() + p_floor

    score_fn = make_score_fn(
        MODEL_LOSS, sampler.score_feedback, params, data, chunk_size=sampler.score_chunk_size
    )
    indices, probs, state = jax.jit(lambda s, k: sampler.sample(s, k, score_fn))(
        sampler.init(), jax.random.key(7)
    )
    np.testing.assert_allclose(state.distribution, expected, rtol=2e-5, atol=1e-8)
    np.testing.assert_allclose(probs, np.asarray(state.distribution)[np.asarray(indices)])
    assert np.all(np.asarray(state.distribution) >= p_floor * (1 - 1e-6))
    assert int(state.num_fallbacks) == 0


# --- inside the train step ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("adam_impt", marks=pytest.mark.slow),  # tests/samplers/test_adam_impt.py
        pytest.param("adam_impt/presample", marks=pytest.mark.slow),
        "gradient_norm",
    ],
)
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
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["sampled_loss"]))
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
