"""Tests of adambs_jax.step._hand_loop: value_and_grad (the unbiased loss, G_hat and the
feedback of a loop you keep) and Sampling (draw, gather, learn, the schedule)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adambs_jax as ab

N, K = 32, 8


def _data():
    x = jax.random.normal(jax.random.key(0), (N, 3))
    return {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32)}


def _loss(w, batch):  # per-example cross-entropy of a linear model
    return optax.softmax_cross_entropy_with_integer_labels(batch["x"] @ w, batch["y"])


def _batch(indices=(0, 3, 3, 7, 9, 12, 20, 31)):
    return jax.tree.map(lambda leaf: leaf[jnp.asarray(indices)], _data())


WEIGHTS = jnp.linspace(0.5, 2.0, K)
W0 = 0.1 * jax.random.normal(jax.random.key(1), (3, 2))


def _reference(fun, w, weights, *args):
    return jax.value_and_grad(lambda p: jnp.mean(weights * fun(p, *args)))(w)


@pytest.mark.parametrize("jit", [False, True])
def test_the_value_and_grad_are_the_weighted_mean_and_its_gradient(jit):
    grad_fn = ab.value_and_grad(_loss)
    if jit:
        grad_fn = jax.jit(grad_fn)
    (value, extras), grads = grad_fn(W0, _batch(), weights=WEIGHTS)
    ref_value, ref_grads = _reference(_loss, W0, WEIGHTS, _batch())
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(extras.losses, _loss(W0, _batch()), rtol=1e-6)
    np.testing.assert_allclose(extras.feedback, extras.losses, rtol=1e-6)  # feedback="loss"


def test_unit_weights_give_plain_jax_value_and_grad_of_the_mean():
    (value, _), grads = ab.value_and_grad(_loss)(W0, _batch(), weights=jnp.ones(K))
    ref_value, ref_grads = jax.value_and_grad(lambda p: jnp.mean(_loss(p, _batch())))(W0)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-6)


def test_a_closure_loss_with_aux():
    batch = _batch()

    def loss_fn(w):  # the batch closed over, as in a linen TrainState step
        logits = batch["x"] @ w
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), logits

    (value, extras), grads = ab.value_and_grad(loss_fn, has_aux=True)(W0, weights=WEIGHTS)
    np.testing.assert_allclose(extras.aux, batch["x"] @ W0, rtol=1e-6)
    np.testing.assert_allclose(grads, _reference(_loss, W0, WEIGHTS, batch)[1], rtol=1e-5)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_grad_norm_feedback_is_the_exact_per_example_norm(method):
    grad_fn = jax.jit(ab.value_and_grad(_loss, feedback=ab.feedback.GradNorm(method)))
    (value, extras), grads = grad_fn(W0, _batch(), weights=WEIGHTS)
    per_example = jax.vmap(
        jax.grad(lambda p, b: _loss(p, jax.tree.map(lambda x: x[None], b))[0]), in_axes=(None, 0)
    )(W0, _batch())
    norms = jnp.sqrt(jnp.sum(jnp.square(per_example), axis=(1, 2)))
    np.testing.assert_allclose(extras.feedback, norms, rtol=1e-4)
    np.testing.assert_allclose(grads, _reference(_loss, W0, WEIGHTS, _batch())[1], rtol=1e-5)
    np.testing.assert_allclose(value, _reference(_loss, W0, WEIGHTS, _batch())[0], rtol=1e-6)


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x)))


def test_a_batch_coupled_loss_is_refused_under_per_example_feedback():
    model = _BatchNormNet()
    variables = model.init(jax.random.key(0), _batch()["x"])

    def loss_fn(params, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["x"],
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    grad_fn = jax.jit(ab.value_and_grad(loss_fn, feedback="grad_norm"))
    with pytest.raises(ValueError, match="couples the examples of a batch"):
        grad_fn(variables["params"], _batch(), weights=WEIGHTS)
    # the batch as a whole ("loss" feedback) is what plain training computes: accepted
    (value, _), _ = jax.jit(ab.value_and_grad(loss_fn))(
        variables["params"], _batch(), weights=WEIGHTS
    )
    assert np.isfinite(float(value))


def test_bad_calls_name_the_argument():
    grad_fn = ab.value_and_grad(_loss, feedback="grad_norm")
    with pytest.raises(TypeError, match="weights"):
        grad_fn(W0, _batch())
    with pytest.raises(ValueError, match="weights must have shape"):
        grad_fn(W0, _batch(), weights=jnp.ones(K + 1))
    with pytest.raises(ValueError, match="per-example losses"):
        ab.value_and_grad(lambda w, b: jnp.mean(_loss(w, b)))(W0, _batch(), weights=WEIGHTS)
    with pytest.raises(ValueError, match="needs the model outputs"):
        ab.value_and_grad(_loss, feedback="logit_grad_norm")
    with pytest.raises(TypeError, match="opt_state"):
        ab.value_and_grad(_loss, feedback="preconditioned_grad_norm")(W0, _batch(), weights=WEIGHTS)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def _nnx_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), logits


def test_an_nnx_module_equals_nnx_value_and_grad_of_the_weighted_loss():
    model, twin = _NnxNet(nnx.Rngs(0)), _NnxNet(nnx.Rngs(0))
    (value, extras), grads = ab.value_and_grad(_nnx_loss, has_aux=True)(
        model, _batch(), weights=WEIGHTS
    )

    def weighted(m):
        losses, _ = _nnx_loss(m, _batch())
        return jnp.mean(WEIGHTS * losses)

    ref_value, ref_grads = nnx.value_and_grad(weighted)(twin)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads), rtol=1e-5)
    # BatchNorm statistics and the Rngs moved on in the module, as with nnx.value_and_grad
    for kind in (nnx.BatchStat, nnx.RngCount):
        chex.assert_trees_all_close(
            nnx.to_pure_dict(nnx.state(model, kind)),
            nnx.to_pure_dict(nnx.state(twin, kind)),
            rtol=1e-6,
        )
    assert extras.aux.shape == (K, 2)


def test_an_nnx_loop_with_nnx_optimizer_and_eval_between_steps():
    """The NNX tutorial's shape: nnx.Optimizer, an nnx.jit step that returns nothing, eval
    between steps; the feedback leaves the step in the batch and the next draw learns it."""
    model = _NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    sampling = ab.Sampling(ab.exp3_sampler(N, K, num_steps=20), _data(), seed=0)

    @nnx.jit
    def train_step(model, optimizer, batch):
        grad_fn = ab.value_and_grad(_nnx_loss, has_aux=True)
        (loss, logits), grads = grad_fn(model, batch)
        assert logits.shape == (K, 2)
        optimizer.update(model, grads)

    @nnx.jit
    def eval_loss(model, data):
        return jnp.mean(_nnx_loss(model, data)[0])

    model.eval()
    before = float(eval_loss(model, _data()))
    for _ in range(20):
        model.train()
        train_step(model, optimizer, sampling.draw())
        model.eval()
        eval_loss(model, _data())  # the module stays usable between steps
    assert float(eval_loss(model, _data())) < before
    assert int(sampling.state.step) == 20  # every step's feedback was learned


def _explicit_run(sampler, steps, jit_step):
    """The reference loop: the feedback returned by the step and given to learn."""
    sampling = ab.Sampling(sampler, _data(), seed=5)
    w, losses = W0, []
    for _ in range(steps):
        batch = sampling.draw()
        (loss, extras), grads = jit_step(w, batch.data, weights=batch.weights)
        sampling.learn(extras.feedback)
        w, losses = w - 0.5 * grads, losses + [loss]
    return w, losses, sampling.state


@pytest.mark.parametrize("factory", ["exp3", "priority", "infobatch"])
def test_the_batch_carries_the_feedback_out_of_a_jitted_step(factory):
    """A jax.jit step that returns no feedback: the next draw learns what the step wrote
    into the batch, and the run equals the one that returns the feedback and calls learn
    (the same draws, losses, parameters and sampler state, renormalizations included)."""
    sampler = {
        "exp3": lambda: ab.exp3_sampler(N, K, step_size=2.0),  # renormalizes every 3
        "priority": lambda: ab.priority_sampler(N, K),
        "infobatch": lambda: ab.infobatch_sampler(N, K, num_steps=13),  # epochs of 4 steps
    }[factory]()
    steps = 13
    explicit = jax.jit(ab.value_and_grad(_loss))

    @jax.jit
    def train_step(w, batch):
        loss, grads = ab.value_and_grad(_loss)(w, batch)
        return w - 0.5 * grads, loss

    sampling = ab.Sampling(sampler, _data(), seed=5)
    w, losses = W0, []
    for _ in range(steps):
        w, loss = train_step(w, sampling.draw())
        losses.append(loss)
    ref_w, ref_losses, ref_state = _explicit_run(sampler, steps, explicit)
    np.testing.assert_allclose(np.stack(losses), np.stack(ref_losses), rtol=1e-6)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)
    chex.assert_trees_all_close(sampling.state, ref_state, rtol=1e-6)
    assert int(sampling.state.step) == steps


def test_a_closure_binds_its_batch():
    """A loss that closes over the batch (the linen TrainState step) names it with batch=:
    the same value and G_hat as the explicit weights, the feedback written to the batch."""
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=1)

    @jax.jit
    def train_step(w, batch):
        def loss_fn(params):
            losses = _loss(params, batch)
            return losses, losses.sum()

        (loss, aux), grads = ab.value_and_grad(loss_fn, has_aux=True, batch=batch)(w)
        return loss, grads, aux

    batch = sampling.draw()
    loss, grads, aux = train_step(W0, batch)
    ref_value, ref_grads = _reference(_loss, W0, batch.weights, batch.data)
    np.testing.assert_allclose(loss, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batch.feedback[...], _loss(W0, batch.data), rtol=1e-6)
    np.testing.assert_allclose(aux, jnp.sum(_loss(W0, batch.data)), rtol=1e-6)


def test_a_per_example_feedback_kind_writes_its_norms():
    """feedback=GradNorm() on a SampledBatch: the loss sees the plain data and the slot
    holds the exact per-example gradient norms."""
    sampling = ab.Sampling(ab.priority_sampler(N, K), _data(), seed=2)
    batch = sampling.draw()
    grad_fn = jax.jit(ab.value_and_grad(_loss, feedback=ab.feedback.GradNorm()))
    loss, grads = grad_fn(W0, batch)
    norms = jax.vmap(
        lambda b: jnp.linalg.norm(
            jax.grad(lambda w: _loss(w, jax.tree.map(lambda x: x[None], b))[0])(W0)
        )
    )(batch.data)
    np.testing.assert_allclose(batch.feedback[...], norms, rtol=1e-4)
    ref_value, ref_grads = _reference(_loss, W0, batch.weights, batch.data)
    np.testing.assert_allclose(loss, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)


def test_a_batch_whose_feedback_never_came_back_is_refused_at_the_next_draw():
    """A step that uses jax.value_and_grad on the batch's weights writes nothing: the next
    draw says so (once, at the first learn) instead of learning nothing in silence."""
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=0)

    @jax.jit
    def train_step(w, batch):
        return jax.value_and_grad(lambda p: jnp.mean(batch.weights * _loss(p, batch.data)))(w)

    train_step(W0, sampling.draw())
    with pytest.raises(RuntimeError, match="never came back"):
        sampling.draw()
    # learning by hand is the other way
    sampling.learn(jnp.ones(K))
    sampling.draw()


def test_reading_the_state_includes_the_last_step_but_not_a_batch_not_trained_on():
    """A checkpoint read after a step holds its feedback (a restart resumes exactly); read
    between draw and step, the batch stays pending and is learned at the next draw."""
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=0)
    train_step = jax.jit(lambda w, batch: ab.value_and_grad(_loss)(w, batch)[1])
    for _ in range(3):
        train_step(W0, sampling.draw())
    assert int(sampling.state.step) == 3  # after the step: learned
    batch = sampling.draw()
    p_before = sampling.probabilities()  # before the step: nothing to learn yet
    assert int(sampling.state.step) == 3
    train_step(W0, batch)
    assert int(sampling.state.step) == 4
    assert not np.allclose(sampling.probabilities(), p_before)
    sampling.draw()  # the pending batch was learned once, not twice
    assert int(sampling.state.step) == 4


def test_sampling_draws_gathers_and_learns():
    data = _data()
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), data, key=jax.random.key(3))
    batch = sampling.draw()
    np.testing.assert_array_equal(batch["x"], data["x"][sampling.indices])
    np.testing.assert_array_equal(batch.indices, sampling.indices)
    weights = batch.weights
    assert weights.shape == (K,) and np.all(np.asarray(weights) > 0)
    p = sampling.probabilities()
    np.testing.assert_allclose(weights, 1.0 / (N * p[sampling.indices]), rtol=1e-5)
    sampling.learn(jnp.arange(K, dtype=jnp.float32))
    assert int(sampling.state.step) == 1
    assert not np.allclose(sampling.probabilities(), p)
    indices = ab.Sampling(ab.uniform_sampler(N, K), seed=0).draw().data
    assert indices.shape == (K,) and jnp.issubdtype(indices.dtype, jnp.integer)


def test_sampling_renormalizes_on_schedule_and_resumes_it():
    sampler = ab.exp3_sampler(1000, 32, step_size=2.0)  # M = 27
    m = sampler.renormalize_every
    sampling = ab.Sampling(sampler, key=jax.random.key(0))
    for _ in range(3 * m):
        sampling.draw()
        sampling.learn(jnp.linspace(0.1, 1.0, 32))
    assert int(sampling.state.num_rescales) == 3
    restored = ab.Sampling(sampler, key=jax.random.key(1))
    restored.state = jax.tree.map(jnp.copy, sampling.state)  # a restored checkpoint
    for _ in range(m):
        restored.draw().feedback[...] = jnp.linspace(0.1, 1.0, 32)  # written, as a step does
    restored.draw()  # learns the last one
    assert int(restored.state.num_rescales) == 4
    p = restored.probabilities()
    assert float(jnp.min(p)) >= restored.state.p_min * (1 - 1e-5)


def test_sampling_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="ScoringSampler"):
        ab.Sampling(ab.adam_impt_sampler(N, K), _data(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="leading axis n"):
        ab.Sampling(ab.uniform_sampler(N + 1, K), _data(), key=jax.random.key(0))
    sampling = ab.Sampling(ab.uniform_sampler(N, K), _data(), key=jax.random.key(0))
    with pytest.raises(RuntimeError, match="draw"):
        sampling.learn(jnp.ones(K))
    sampling.draw()
    with pytest.raises(ValueError, match="feedback must have shape"):
        sampling.learn(jnp.ones(K + 1))
    for kwargs in ({}, {"seed": 0, "key": jax.random.key(0)}):
        with pytest.raises(TypeError, match="exactly one of key= .* and seed="):
            ab.Sampling(ab.uniform_sampler(N, K), _data(), **kwargs)
    with pytest.raises(TypeError, match="seed must be an int"):
        ab.Sampling(ab.uniform_sampler(N, K), _data(), seed=0.5)


def test_value_and_grad_refuses_an_ambiguous_batch():
    batch = ab.Sampling(ab.uniform_sampler(N, K), _data(), seed=0).draw()
    other = ab.Sampling(ab.uniform_sampler(N, K), _data(), seed=1).draw()
    grad_fn = ab.value_and_grad(_loss)
    with pytest.raises(TypeError, match="carries its weights"):
        grad_fn(W0, batch, weights=WEIGHTS)
    with pytest.raises(TypeError, match="2 SampledBatch"):
        ab.value_and_grad(_loss, batch=other)(W0, batch)
    with pytest.raises(TypeError, match="batch must be the SampledBatch"):
        ab.value_and_grad(_loss, batch=_batch())
    with pytest.raises(TypeError, match="no importance weights"):
        grad_fn(W0, _batch())


def test_each_draw_has_its_own_unwritten_slot():
    """A slot is made from a fresh device array at each draw: what a step writes into one
    batch never shows in the next batch's slot."""
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=0)
    first = sampling.draw()
    first.feedback[...] = jnp.full(K, 3.0)
    second = sampling.draw()
    np.testing.assert_array_equal(second.feedback[...], np.full(K, -1.0))
    second.feedback[...] = jnp.full(K, 5.0)
    third = sampling.draw()
    np.testing.assert_array_equal(third.feedback[...], np.full(K, -1.0))
    np.testing.assert_array_equal(first.feedback[...], np.full(K, 3.0))
    assert int(sampling.state.step) == 2


def test_a_donated_batch_fails_at_the_first_call_not_in_silence():
    """docs/api.md: the batch's slot cannot be donated; XLA refuses when the step is
    compiled (the parameters can be donated)."""
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=0)

    def step(w, batch):
        loss, grads = ab.value_and_grad(_loss)(w, batch)
        return w - 0.1 * grads, loss

    with pytest.raises(Exception, match="alias"):
        jax.jit(step, donate_argnums=(0, 1))(jnp.copy(W0), sampling.draw())
    sampling = ab.Sampling(ab.exp3_sampler(N, K, step_size=0.5), _data(), seed=0)
    donating = jax.jit(step, donate_argnums=0)
    w = jnp.copy(W0)
    for _ in range(3):
        w, loss = donating(w, sampling.draw())
    assert np.isfinite(float(loss)) and int(sampling.state.step) == 3  # the last step too
