"""Tests of adambs_jax.model_state: model state (linen batch_stats, NNX graph state) and
auxiliary outputs in the train step, on the batch as a whole."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adambs_jax as ab

NUM_EXAMPLES, BATCH_SIZE, NUM_STEPS = 64, 8, 4


def _data():
    kx, kw = jax.random.split(jax.random.key(0))
    x = 3.0 * jax.random.normal(kx, (NUM_EXAMPLES, 5)) + 1.0
    return {"x": x, "y": jnp.argmax(x @ jax.random.normal(kw, (5, 3)), axis=1)}


def _cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(
            nn.Dense(8, use_bias=False)(x)
        )
        return nn.Dense(3)(nn.Dropout(0.2, deterministic=not train)(nn.relu(x)))


LINEN = LinenNet()


def _linen_apply(params, batch, key, batch_stats):
    logits, updates = LINEN.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["x"],
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
    )
    return logits, updates["batch_stats"]


def _linen_setup():
    variables = LINEN.init(jax.random.key(1), _data()["x"][:2], train=False)
    return variables["params"], variables["batch_stats"], _linen_apply


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 8, use_bias=False, rngs=rngs)  # BatchNorm follows
        self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def _nnx_setup():
    graphdef, params, rest = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)

    def apply_fn(params, batch, key, rest):  # the module holds its own Rngs: key unused
        del key
        module = nnx.merge(graphdef, params, rest, copy=True)
        return module(batch["x"]), nnx.state(module, nnx.Not(nnx.Param))

    return params, rest, apply_fn


SETUPS = {"linen": functools.cache(_linen_setup), "nnx": functools.cache(_nnx_setup)}


def _plain_training(apply_fn, optimizer, params, model_state, keys):
    """Plain Flax training on uniform batches drawn with the step's key split: the mean loss
    of one batched forward (batch statistics of the batch), ``value=`` the batch loss."""
    data, sampler = _data(), ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    if isinstance(optimizer, optax.MultiSteps):
        optimizer = optimizer.gradient_transformation()

    @jax.jit
    def step(params, opt_state, model_state, key):
        sample_key, model_key, _ = jax.random.split(key, 3)
        indices, _ = sampler.sample(sampler.init(), sample_key)
        batch = jax.tree.map(lambda leaf: leaf[indices], data)

        def mean_loss(p):
            logits, new_state = apply_fn(p, batch, model_key, model_state)
            return jnp.mean(_cross_entropy(logits, batch)), new_state

        (loss, new_state), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=loss)
        return optax.apply_updates(params, updates), opt_state, new_state

    opt_state = optimizer.init(params)
    for key in keys:
        params, opt_state, model_state = step(params, opt_state, model_state, key)
    return params, model_state


@functools.partial(jax.jit, static_argnums=0)
def _mean_loss(apply_fn, params, model_state):
    data = _data()
    logits, _ = apply_fn(params, data, jax.random.key(9), model_state)
    return jnp.mean(_cross_entropy(logits, data))


def _full_loss(apply_fn, params, model_state):
    return float(_mean_loss(apply_fn, params, model_state))


def _train(setup, optimizer, feedback="loss", sampler=None, steps=NUM_STEPS):
    params, model_state, apply_fn = SETUPS[setup]()
    loss = ab.ModelLoss(apply_fn, _cross_entropy, model_state=True)
    sampler = sampler or ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    step = ab.make_train_step(loss, optimizer, sampler, feedback=feedback)
    state = step.init(params, model_state=model_state)
    keys = [jax.random.key(50 + t) for t in range(steps)]
    for key in keys:
        state, metrics = step(state, _data(), key)
    return state, metrics, (params, model_state, apply_fn, keys)


def _key_data(tree):
    """PRNG keys (NNX's RngKey) as their raw data, to compare trees."""
    return jax.tree.map(
        lambda leaf: (
            jax.random.key_data(leaf)
            if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)
            else leaf
        ),
        tree,
    )


def _batch_stats_changed(old, new):
    stats = lambda tree: [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)  # noqa
        if "mean" in jax.tree_util.keystr(path)
    ]
    return any(float(jnp.max(jnp.abs(a - b))) > 1e-3 for a, b in zip(stats(old), stats(new)))


def _assert_equals_plain_and_trains(state, want_params, want_state, params, model_state, apply_fn):
    """The step's params and model state equal plain training's, the batch statistics moved
    and the full-data loss went down."""
    chex.assert_trees_all_close(state.params, want_params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        _key_data(state.model_state), _key_data(want_state), atol=1e-5, rtol=1e-5
    )
    assert _batch_stats_changed(model_state, state.model_state)
    assert _full_loss(apply_fn, state.params, state.model_state) < _full_loss(
        apply_fn, params, model_state
    )


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_trains_and_equals_plain_flax_training_when_uniform(setup):
    state, _, (params, model_state, apply_fn, keys) = _train(setup, optax.adam(0.05), steps=8)
    want_params, want_state = _plain_training(apply_fn, optax.adam(0.05), params, model_state, keys)
    _assert_equals_plain_and_trains(state, want_params, want_state, params, model_state, apply_fn)


def test_nnx_rng_counter_advances_with_the_model_state():
    state, _, (_, model_state, _, _) = _train("nnx", optax.adam(0.05))
    count = lambda s: int(s["dropout"]["rngs"]["count"][...])  # noqa: E731
    assert count(state.model_state) == count(model_state) + NUM_STEPS


def test_a_skipped_step_keeps_the_model_state():
    params, model_state, apply_fn = _linen_setup()
    loss = ab.ModelLoss(apply_fn, lambda z, b: _cross_entropy(z, b) * jnp.nan, model_state=True)
    step = ab.make_train_step(
        loss, optax.adam(0.05), ab.uniform_sampler(NUM_EXAMPLES, 4), feedback="loss"
    )
    state, metrics = step(step.init(params, model_state=model_state), _data(), jax.random.key(0))
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(state.model_state, model_state)


def test_plain_loss_with_state_and_aux():
    params, model_state, apply_fn = _linen_setup()

    def loss_fn(params, batch, key, batch_stats):
        logits, new_stats = apply_fn(params, batch, key, batch_stats)
        return _cross_entropy(logits, batch), {"logits": logits}, new_stats

    step = ab.make_train_step(
        ab.Loss(loss_fn, model_state=True, has_aux=True),
        optax.adam(0.05),
        ab.uniform_sampler(NUM_EXAMPLES, 4),
        feedback="loss",
    )
    state, metrics = step(step.init(params, model_state=model_state), _data(), jax.random.key(0))
    assert metrics["aux"]["logits"].shape == (4, 3)
    assert _batch_stats_changed(model_state, state.model_state)


def test_has_aux_without_model_state_reaches_the_metrics():
    params, data = {"w": jnp.zeros((5, 3))}, _data()

    def loss_fn(params, batch):
        logits = batch["x"] @ params["w"]
        return _cross_entropy(logits, batch), {"max_logit": jnp.max(logits)}

    for feedback in ("grad_norm", "loss"):
        step = ab.make_train_step(
            ab.Loss(loss_fn, has_aux=True),
            optax.sgd(0.1),
            ab.uniform_sampler(NUM_EXAMPLES, 4),
            feedback=ab.feedback.GradNorm("vmap") if feedback == "grad_norm" else feedback,
        )
        _, metrics = step(step.init(params), data, jax.random.key(0))
        assert float(metrics["aux"]["max_logit"]) == 0.0
        np.testing.assert_allclose(metrics["loss"], np.log(3.0), rtol=1e-6)


def test_build_time_refusals():
    params, _, apply_fn = _linen_setup()
    loss = ab.ModelLoss(apply_fn, _cross_entropy, model_state=True)
    sampler = ab.uniform_sampler(NUM_EXAMPLES, 4)
    with pytest.raises(ValueError, match='"logit_grad_norm".*"loss"'):
        ab.make_train_step(loss, optax.adam(0.1), sampler)
    with pytest.raises(ValueError, match='feedback="preconditioned_grad_norm" with a model_state'):
        ab.make_train_step(loss, optax.adam(0.1), sampler, feedback="preconditioned_grad_norm")
    with pytest.raises(ValueError, match="ScoringSampler"):
        ab.make_train_step(
            loss, optax.adam(0.1), ab.adam_impt_sampler(NUM_EXAMPLES, 4), feedback="loss"
        )
    with pytest.raises(TypeError, match="loss_fn.model_state must be a bool"):
        ab.make_train_step(loss._replace(model_state=1), optax.adam(0.1), sampler, feedback="loss")


def test_the_old_keywords_warn_and_describe_the_loss():
    """model_state=True / has_aux=True on the step still work for a release, with a warning,
    and give the very step of the described loss."""
    params, model_state, apply_fn = _linen_setup()
    sampler = ab.uniform_sampler(NUM_EXAMPLES, 4)
    with pytest.warns(DeprecationWarning, match="model_state= is deprecated"):
        old = ab.make_train_step(
            ab.ModelLoss(apply_fn, _cross_entropy),
            optax.adam(0.1),
            sampler,
            feedback="loss",
            model_state=True,
        )
    new = ab.make_train_step(
        ab.ModelLoss(apply_fn, _cross_entropy, model_state=True),
        optax.adam(0.1),
        sampler,
        feedback="loss",
    )
    states = [
        step(step.init(params, model_state=model_state), _data(), jax.random.key(0))[0]
        for step in (old, new)
    ]
    chex.assert_trees_all_equal(states[0].params, states[1].params)


def test_nnx_equals_plain_nnx_training_with_nnx_optimizer():
    state, _, (_, _, _, keys) = _train("nnx", optax.adam(0.05), steps=6)
    model = NnxNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    data, sampler = _data(), ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)

    @nnx.jit
    def train_step(model, optimizer, batch):
        grads = nnx.grad(lambda m: jnp.mean(_cross_entropy(m(batch["x"]), batch)))(model)
        optimizer.update(model, grads)

    model.train()
    for key in keys:
        indices, _ = sampler.sample(sampler.init(), jax.random.split(key, 3)[0])
        train_step(model, optimizer, jax.tree.map(lambda leaf, i=indices: leaf[i], data))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    chex.assert_trees_all_close(state.params, params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(_key_data(state.model_state), _key_data(rest), atol=1e-5, rtol=1e-5)


def _kernels(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _biases(params):
    return jax.tree.map(lambda p: p.ndim <= 1, params)


def _masked(adam):  # the biases are frozen: set_to_zero on what the mask leaves out
    return optax.chain(
        optax.masked(adam(0.05), _kernels), optax.masked(optax.set_to_zero(), _biases)
    )


OPTIMIZERS = {  # the wrappers covered: (ours, the plain optax optimizer it must equal)
    "adam": lambda adam: optax.adam(0.05),
    "adambs": lambda adam: adam(0.05),
    "chain_clip_adam": lambda adam: optax.chain(optax.clip_by_global_norm(0.5), adam(0.05)),
    "inject_hyperparams": lambda adam: optax.inject_hyperparams(adam)(learning_rate=0.05),
    "apply_if_finite": lambda adam: optax.apply_if_finite(adam(0.05), 3),
    "multi_steps": lambda adam: optax.MultiSteps(adam(0.05), 2),
    "masked": _masked,
    "schedule_free": lambda adam: optax.contrib.schedule_free(adam(0.05), 0.05),
    "reduce_on_plateau": lambda adam: optax.chain(
        adam(0.05), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    ),
}
MATRIX_STEPS = 4
_PLAIN = {}  # (setup, optimizer) -> plain training's result, shared by the feedback kinds


# The fast tier runs linen with adambs; the other optimizers and NNX are slow.
@pytest.mark.parametrize("feedback", ["grad_norm", "logit_grad_norm", "loss"])
@pytest.mark.parametrize(
    "optimizer",
    [o if o == "adambs" else pytest.param(o, marks=pytest.mark.slow) for o in sorted(OPTIMIZERS)],
)
@pytest.mark.parametrize(
    "setup",
    [s if s == "linen" else pytest.param(s, marks=pytest.mark.slow) for s in sorted(SETUPS)],
)
def test_matrix_trains_like_plain_optax_or_is_refused_at_build_time(setup, optimizer, feedback):
    """linen and NNX (BatchNorm + Dropout) x feedback kinds x optimizers: each combination
    trains (loss down, batch statistics updated, equal to plain optax training on uniform
    batches) or raises at build time."""
    if feedback == "grad_norm":
        params, _, apply_fn = SETUPS[setup]()
        with pytest.raises(ValueError, match="ill-defined"):
            ab.make_train_step(
                ab.ModelLoss(apply_fn, _cross_entropy, model_state=True),
                OPTIMIZERS[optimizer](ab.adambs),
                ab.uniform_sampler(64, 8),
                feedback=feedback,
            )
        return
    state, _, (params, model_state, apply_fn, keys) = _train(
        setup, OPTIMIZERS[optimizer](ab.adambs), feedback, steps=MATRIX_STEPS
    )
    if (setup, optimizer) not in _PLAIN:
        _PLAIN[setup, optimizer] = _plain_training(
            apply_fn, OPTIMIZERS[optimizer](optax.adam), params, model_state, keys
        )
    want_params, want_state = _PLAIN[setup, optimizer]
    _assert_equals_plain_and_trains(state, want_params, want_state, params, model_state, apply_fn)


class _BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(nn.Dense(16)(x))
        return nn.Dense(3)(nn.relu(x))


@pytest.mark.parametrize(
    "feedback",
    [
        "grad_norm",
        ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8),  # optax.adam's defaults
        ab.feedback.GradNorm("vmap"),
    ],
    ids=["grad_norm", "preconditioned_grad_norm", "vmap"],
)
def test_a_batch_coupled_loss_without_model_state_is_refused(feedback):
    """Regression: a linen model with BatchNorm whose loss applies it in training mode and
    discards the new statistics trained silently wrong under the default per-example
    feedback (full-data loss 2.252 after 100 steps against 0.040 for plain optax): the
    per-example evaluation sees batches of one. Now the first call refuses it, naming the
    fix; feedback="loss" (the batch as a whole) still trains."""
    model, data = _BatchNormMLP(), _data()
    variables = model.init(jax.random.key(0), data["x"][:2])

    def loss_fn(params, batch):  # BatchNorm in training mode; the new statistics dropped
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch["x"],
            mutable=["batch_stats"],
        )
        return _cross_entropy(logits, batch)

    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
    step = ab.make_train_step(loss_fn, optax.adam(0.01), sampler, feedback=feedback)
    state = step.init(variables["params"])
    with pytest.raises(ValueError, match="couples the examples of a batch.*model_state=True"):
        step(state, data, jax.random.key(0))
    step = ab.make_train_step(loss_fn, optax.adam(0.01), sampler, feedback="loss")
    state, metrics = step(step.init(variables["params"]), data, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))


def test_per_example_models_pass_the_coupling_check():
    """Not a false alarm: a per-example model with dropout (a key) and a plain one train
    under the per-example feedback."""
    params, model_state, apply_fn = _linen_setup()
    data = _data()

    def loss_fn(p, batch, key):  # dropout on, BatchNorm on its running averages
        logits = LINEN.apply(
            {"params": p, "batch_stats": model_state},
            batch["x"],
            train=False,
            rngs={"dropout": key},
        )
        return _cross_entropy(logits, batch)

    step = ab.make_train_step(
        ab.Loss(loss_fn, takes_key=True),
        optax.adam(0.01),
        ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE),
        feedback="grad_norm",
    )
    _, metrics = step(step.init(params), data, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
