"""Tests of adambs_jax.ghost.api: ghost norms equal vmap norms on whole models.

Every model is compared with ``feedback.per_example_grad_norms`` (per-example gradients by
``vmap``; the same per-example dropout keys) at rtol 1e-4 in float32, and G_hat with
``jax.grad`` of the weighted mean loss.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.feedback import _kinds as feedback
from adambs_jax.feedback import ghost

K = 6
NUM_CLASSES = 5


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.3, deterministic=not train)(x)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(NUM_CLASSES)(x)


class _CifarCNN(nn.Module):
    """The AdamBS paper's CIFAR CNN, scaled down: conv 3x3 blocks, max-pool, dropout, dense."""

    @nn.compact
    def __call__(self, x, train=False):
        for features in (8, 16):
            x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
            x = nn.relu(nn.Conv(features, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(0.25, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(NUM_CLASSES)(x)


class _GRUClassifier(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
        x = nn.Embed(20, 8)(tokens)
        x = nn.RNN(nn.GRUCell(12))(x)
        return nn.Dense(NUM_CLASSES)(x[:, -1])


class _TransformerBlock(nn.Module):
    """Embedding, single-head self-attention from Dense layers, LayerNorm, MLP, mean pool."""

    width: int = 16

    @nn.compact
    def __call__(self, tokens, train=False):
        x = nn.Embed(30, self.width)(tokens)
        x = x + self.param("position", nn.initializers.normal(0.1), (tokens.shape[1], self.width))
        h = nn.LayerNorm()(x)
        q, k, v = (nn.Dense(self.width, name=name)(h) for name in ("query", "key", "value"))
        attention = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(self.width))
        attention = nn.Dropout(0.2, deterministic=not train)(attention)
        x = x + nn.Dense(self.width, name="out")(jnp.einsum("bts,bsd->btd", attention, v))
        h = nn.LayerNorm()(x)
        x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(h)))
        return nn.Dense(NUM_CLASSES)(nn.LayerNorm()(x).mean(axis=1))


def _images(key):
    return jax.random.normal(key, (K, 12, 12, 3))


def _tokens(key, vocab=20, length=7):
    return jax.random.randint(key, (K, length), 0, vocab)


def _problem(model, make_inputs, *, param_dtype=None):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = {"x": make_inputs(kx), "y": jax.random.randint(ky, (K,), 0, NUM_CLASSES)}
    params = model.init(kp, batch["x"][:1])
    if param_dtype is not None:
        params = jax.tree.map(lambda p: p.astype(param_dtype), params)

    def loss_fn(p, b, key):
        logits = model.apply(p, b["x"], train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

    return loss_fn, params, batch


MODELS = {
    "mlp": (_MLP(), lambda key: jax.random.normal(key, (K, 10))),
    "cifar_cnn": (_CifarCNN(), _images),
    "gru": (_GRUClassifier(), _tokens),
    "transformer": (_TransformerBlock(), lambda key: _tokens(key, vocab=30)),
}


def _weights():
    return jax.random.uniform(jax.random.key(7), (K,), minval=0.5, maxval=3.0)


def _assert_close(actual, expected, rtol=1e-4, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# the CNN, GRU and transformer are slow (compiling them); the MLP is the fast tier's
@pytest.mark.parametrize(
    "name",
    [
        name if name == "mlp" else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(MODELS)
    ],
)
def test_norms_losses_and_gradient_match_vmap(name):
    loss_fn, params, batch = _problem(*MODELS[name])
    key, weights = jax.random.key(3), _weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GRU cell falls back (tested below)
        losses, grad, norms = jax.jit(
            lambda p: ghost.ghost_losses_grad_and_norms(loss_fn, p, batch, weights, key)
        )(params)
    _assert_close(
        norms, feedback.per_example_grad_norms(loss_fn, params, batch, key, method="vmap")
    )
    expected_losses = feedback.per_example_losses(loss_fn, params, batch, key)
    _assert_close(losses, expected_losses, rtol=1e-6)

    def weighted_mean_loss(p):
        return jnp.mean(weights * feedback.per_example_losses(loss_fn, p, batch, key))

    expected_grad = jax.grad(weighted_mean_loss)(params)
    jax.tree.map(lambda a, b: _assert_close(a, b, rtol=1e-4, atol=1e-7), grad, expected_grad)


def test_norms_differ_between_examples_and_dropout_keys():
    """Guards against a test that cannot fail: the norms depend on the example and the key."""
    loss_fn, params, batch = _problem(*MODELS["mlp"])
    first = ghost.per_example_grad_norms(loss_fn, params, batch, jax.random.key(1))
    second = ghost.per_example_grad_norms(loss_fn, params, batch, jax.random.key(2))
    assert np.unique(np.round(np.asarray(first), 5)).size == K
    assert not np.allclose(first, second)


def test_gru_cell_under_scan_falls_back_with_a_warning_naming_it():
    loss_fn, params, batch = _problem(*MODELS["gru"])
    coverage = ghost.ghost_coverage(loss_fn, params, batch, jax.random.key(0))
    assert any("Embed_0" in name for name in coverage.ghost)
    assert any("Dense_0" in name for name in coverage.ghost)
    assert coverage.fallback and all(
        "GRUCell" in name or "cell" in name for name in coverage.fallback
    )
    with pytest.warns(UserWarning, match="no layer rule covers the parameters.*(cell|GRUCell)"):
        ghost.per_example_grad_norms(loss_fn, params, batch, jax.random.key(0), method="ghost")


def test_transformer_coverage_puts_layer_norms_on_the_direct_path():
    loss_fn, params, batch = _problem(*MODELS["transformer"])
    coverage = ghost.ghost_coverage(loss_fn, params, batch, jax.random.key(0))
    assert {name.split("']")[1] for name in coverage.direct} == {
        "['LayerNorm_0",
        "['LayerNorm_1",
        "['LayerNorm_2",
    }
    assert coverage.fallback == ("['params']['position']",)  # a raw self.param
    assert len(coverage.ghost) == 2 * 7 + 1  # 7 Dense (kernel, bias) and the embedding


@pytest.mark.parametrize("name", ["mlp", pytest.param("cifar_cnn", marks=pytest.mark.slow)])
def test_bfloat16_params_give_float32_norms_of_the_float32_gradient(name):
    """Mixed precision: the norms are those of the gradient before rounding to bfloat16. With
    float32 inputs the layers compute in float32, so that is the float32 gradient at the same
    (bfloat16-representable) values held in float32."""
    loss_fn, params, batch = _problem(*MODELS[name], param_dtype=jnp.bfloat16)
    key = jax.random.key(4)
    norms = ghost.per_example_grad_norms(loss_fn, params, batch, key, method="ghost")
    assert norms.dtype == jnp.float32
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    _assert_close(
        norms, feedback.per_example_grad_norms(loss_fn, params32, batch, key, method="vmap")
    )
    rounded = feedback.per_example_grad_norms(
        loss_fn, params, batch, key, method="vmap"
    )  # bf16 gradients
    _assert_close(norms, rounded, rtol=2e-2)


def _problem_in(name, dtype):
    """A model of ``MODELS`` whose parameters and float inputs are ``dtype``: its layers
    compute in ``dtype``."""
    loss_fn, params, batch = _problem(*MODELS[name], param_dtype=dtype)
    if jnp.issubdtype(batch["x"].dtype, jnp.floating):
        batch = dict(batch, x=batch["x"].astype(dtype))
    return loss_fn, params, batch


def _ghost_and_vmap(loss_fn, params, batch, key):
    weights = _weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, grad, norms = ghost.ghost_losses_grad_and_norms(
            loss_fn, params, batch, weights, key, method="ghost"
        )
    _, vmap_grad, vmap_norms = ghost.ghost_losses_grad_and_norms(
        loss_fn, params, batch, weights, key, method="vmap"
    )  # G_hat by jax.grad, norms of the vmap per-example gradients
    return (grad, norms), (vmap_grad, vmap_norms)


def _relative_error(actual, expected) -> float:
    actual, expected = (
        np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(t)])
        for t in (actual, expected)
    )
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("name", ["mlp", "cifar_cnn", "transformer"])
def test_bfloat16_computation_agrees_with_vmap_to_bfloat16_resolution(name):
    """bfloat16 parameters and inputs: the layers compute in bfloat16, and the per-example
    gradient is only defined to bfloat16 rounding (vmap rounds each one to bfloat16, the
    ghost pass sums products of the bfloat16 rows in float32). Measured: norms within
    7.3e-3 relative of vmap's, G_hat within 4.7e-3 of jax.grad's (MLP, CNN, transformer,
    GRU, 3 seeds); bfloat16's resolution is 2^-8 = 3.9e-3. The docs quote this bound."""
    loss_fn, params, batch = _problem_in(name, jnp.bfloat16)
    (grad, norms), (vmap_grad, vmap_norms) = _ghost_and_vmap(
        loss_fn, params, batch, jax.random.key(4)
    )
    _assert_close(norms, vmap_norms, rtol=1e-2)
    assert _relative_error(grad, vmap_grad) < 1e-2


def test_float64_norms_and_gradient_are_exact_to_float64_rounding():
    """The scale w_k / K is applied in the norms' dtype (in float32 it bounded the error of
    float64 norms by 7e-8)."""
    with jax.enable_x64(True):
        loss_fn, params, batch = _problem_in("mlp", jnp.float64)
        (grad, norms), (vmap_grad, vmap_norms) = _ghost_and_vmap(
            loss_fn, params, batch, jax.random.key(4)
        )
        assert norms.dtype == jnp.float64
        _assert_close(norms, vmap_norms, rtol=1e-12)
        assert _relative_error(grad, vmap_grad) < 1e-12


def test_gradient_keeps_the_parameter_dtypes():
    loss_fn, params, batch = _problem(*MODELS["transformer"], param_dtype=jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, grad, _ = ghost.ghost_losses_grad_and_norms(
            loss_fn, params, batch, _weights(), jax.random.key(0)
        )
    assert jax.tree.map(lambda g: g.dtype, grad) == jax.tree.map(lambda p: p.dtype, params)


@pytest.mark.parametrize("method", ["vmap", "auto", "ghost"])
def test_methods_agree_and_vmap_is_todays_feedback(method):
    loss_fn, params, batch = _problem(*MODELS["cifar_cnn"])
    key = jax.random.key(5)
    norms = ghost.per_example_grad_norms(loss_fn, params, batch, key, method=method)
    expected = feedback.per_example_grad_norms(loss_fn, params, batch, key, method="vmap")
    if method == "vmap":
        np.testing.assert_array_equal(np.asarray(norms), np.asarray(expected))
    _assert_close(norms, expected)


def test_loss_without_key_and_plain_function_loss():
    """A loss without a key, and a loss with no flax layer at all (auto: vmap; ghost: all
    parameters by per-example copies, still exact)."""
    x = jax.random.normal(jax.random.key(0), (K, 3))
    params = {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.ones(2)}

    def loss_fn(p, b):
        return jnp.sum(jnp.tanh(b @ p["w"] + p["b"]) ** 2, axis=1)

    expected = feedback.per_example_grad_norms(loss_fn, params, x, method="vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: plain vmap, nothing to report
        _assert_close(ghost.per_example_grad_norms(loss_fn, params, x), expected)
    with pytest.warns(UserWarning, match=r"\['b'\], \['w'\]"):
        ghost_norms = ghost.per_example_grad_norms(loss_fn, params, x, method="ghost")
    _assert_close(ghost_norms, expected)


def test_weights_rescale_gradient_not_norms():
    loss_fn, params, batch = _problem(*MODELS["mlp"])
    key = jax.random.key(0)
    _, grad_one, norms_one = ghost.ghost_losses_grad_and_norms(
        loss_fn, params, batch, jnp.ones(K), key
    )
    _, grad_two, norms_two = ghost.ghost_losses_grad_and_norms(
        loss_fn, params, batch, 2 * jnp.ones(K), key
    )
    _assert_close(norms_two, norms_one, rtol=1e-6)
    jax.tree.map(lambda a, b: _assert_close(a, 2 * b, rtol=1e-6), grad_two, grad_one)


def test_argument_errors():
    loss_fn, params, batch = _problem(*MODELS["mlp"])
    with pytest.raises(ValueError, match="method must be one of"):
        ghost.per_example_grad_norms(loss_fn, params, batch, method="fast")
    with pytest.raises(ValueError, match=r"weights must have shape \(6,\)"):
        ghost.ghost_losses_grad_and_norms(loss_fn, params, batch, jnp.ones(K + 1))


def test_model_loss_and_zero_weight():
    """A ``ModelLoss`` works as a loss; an example of weight 0 gets a NaN norm (its output
    gradients are lost in the weighted backward pass), which samplers drop as feedback."""
    model, make_inputs = MODELS["mlp"]
    loss_fn, params, batch = _problem(model, make_inputs)
    model_loss = ab.ModelLoss(
        lambda p, b: model.apply(p, b["x"]),
        lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]),
    )
    weights = jnp.ones(K).at[2].set(0.0)
    _, _, norms = ghost.ghost_losses_grad_and_norms(model_loss, params, batch, weights)
    expected = np.asarray(feedback.per_example_grad_norms(model_loss, params, batch, method="vmap"))
    assert np.isnan(norms[2])
    _assert_close(np.delete(np.asarray(norms), 2), np.delete(expected, 2))
