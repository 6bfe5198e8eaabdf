"""Tests of adambs_jax.ghost.linen: every supported layer configuration is exact, and every
unsupported one falls back (exactly) and is reported."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adambs_jax.feedback import _kinds as feedback
from adambs_jax.feedback import ghost
from adambs_jax.feedback.ghost import _layer_norms as layer_norms

K = 4


def _coverage_and_check(model, inputs, *, batch_stats=False):
    """Ghost norms of sum(sin(model(x))) per example equal the vmap norms, and G_hat the
    gradient of the weighted mean loss; returns the coverage."""
    variables = model.init(jax.random.key(0), inputs[:1])
    params = {"params": variables["params"]}
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p, x):
        if batch_stats:
            out, _ = model.apply({**p, **state}, x, mutable=["batch_stats"])
        else:
            out = model.apply({**p, **state}, x)
        return jnp.sum(jnp.sin(out).reshape(out.shape[0], -1), axis=1)

    weights = jnp.linspace(0.5, 2.0, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, grad, norms = ghost.ghost_losses_grad_and_norms(loss_fn, params, inputs, weights)
    expected = feedback.per_example_grad_norms(loss_fn, params, inputs, method="vmap")
    np.testing.assert_allclose(np.asarray(norms), np.asarray(expected), rtol=1e-4)
    assert np.all(np.asarray(expected) > 0)
    expected_grad = jax.grad(
        lambda p: jnp.mean(weights * feedback.per_example_losses(loss_fn, p, inputs))
    )(params)
    _assert_gradients_close(grad, expected_grad)
    return ghost.ghost_coverage(loss_fn, params, inputs)


def _assert_gradients_close(actual, expected):
    """rtol 1e-4, and float32 summation error (1e-5 of the largest entry of all leaves) for
    tiny entries (e.g. the bias of a convolution followed by batch statistics, ~0)."""
    atol = 1e-5 * max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(expected))
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=atol),
        actual,
        expected,
    )


def _images(shape=(K, 9, 9, 3)):
    return jax.random.normal(jax.random.key(1), shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(kernel_size=(3, 3), strides=2, padding="SAME"), marks=pytest.mark.slow),
        pytest.param(
            dict(kernel_size=(3, 2), kernel_dilation=2, padding=((1, 2), (0, 1))),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(kernel_size=(2, 2), input_dilation=2, padding=1, use_bias=False),
            marks=pytest.mark.slow,
        ),
        dict(kernel_size=(1, 1), padding="VALID"),
    ],
)
def test_conv_configurations_are_covered_and_exact(kwargs):
    coverage = _coverage_and_check(nn.Conv(5, **kwargs), _images())
    assert not coverage.fallback and coverage.ghost


def test_conv_1d_on_sequences_uses_the_explicit_form_and_is_exact():
    assert not layer_norms.use_ghost_form(16, 3 * 3, 4)  # T = 16 rows > d p / 2
    coverage = _coverage_and_check(nn.Conv(4, kernel_size=3), _images((K, 16, 3)))
    assert not coverage.fallback


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(nn.Conv(4, (3, 3), padding="CIRCULAR"), marks=pytest.mark.slow),
        pytest.param(nn.Conv(6, (3, 3), feature_group_count=3), marks=pytest.mark.slow),
        nn.Conv(6, (3, 3), mask=np.tril(np.ones((3, 3, 3, 6)))),
    ],
)
def test_unsupported_conv_configurations_fall_back_exactly(module):
    coverage = _coverage_and_check(module, _images())
    assert coverage.fallback and not coverage.ghost


@pytest.mark.parametrize("length,width", [(3, 8), (12, 4)])  # ghost form, explicit form
def test_dense_on_sequences(length, width):
    inputs = jax.random.normal(jax.random.key(2), (K, length, width))
    coverage = _coverage_and_check(nn.Dense(width), inputs)
    assert len(coverage.ghost) == 2 and not coverage.fallback


@pytest.mark.slow  # compiles a transformer block
def test_dense_general_and_flax_attention_are_covered():
    inputs = jax.random.normal(jax.random.key(3), (K, 5, 2, 3))
    coverage = _coverage_and_check(nn.DenseGeneral((3, 2), axis=(-1, -2)), inputs)
    assert len(coverage.ghost) == 2
    attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    coverage = _coverage_and_check(attention, inputs.reshape(K, 5, 6))
    assert len(coverage.ghost) == 8 and not coverage.fallback


class _SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(x.shape[-1])
        return dense(jnp.tanh(dense(x)))  # one kernel, two calls: g_k = [A1; A2]^T [B1; B2]


class _TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 6)
        return embed.attend(jnp.tanh(embed(tokens)))


class _RematDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(nn.Dense)(3)(nn.Dense(3)(x))


class _MyDense(nn.Dense):
    pass


def test_a_layer_called_twice_is_covered_exactly():
    coverage = _coverage_and_check(_SharedDense(), jax.random.normal(jax.random.key(4), (K, 5)))
    assert len(coverage.ghost) == 2 and not coverage.fallback


def test_tied_embedding_attend_falls_back():
    tokens = jax.random.randint(jax.random.key(5), (K, 7), 0, 11)
    coverage = _coverage_and_check(_TiedEmbedding(), tokens)
    assert coverage.fallback == ("['params']['Embed_0']['embedding']",)


def test_embedding_with_repeated_tokens_is_exact():
    tokens = jnp.array([[1, 1, 2, 1], [3, 3, 3, 3], [0, 1, 2, 3], [5, 0, 5, 0]])
    coverage = _coverage_and_check(nn.Embed(6, 3), tokens)
    assert coverage.ghost == ("['params']['embedding']",)


def test_remat_and_subclassed_layers_fall_back():
    inputs = jax.random.normal(jax.random.key(6), (K, 5))
    coverage = _coverage_and_check(_RematDense(), inputs)
    assert all("Dense_0" in name for name in coverage.ghost) and len(coverage.ghost) == 2
    assert len(coverage.fallback) == 2
    coverage = _coverage_and_check(_MyDense(3), inputs)
    assert len(coverage.fallback) == 2 and not coverage.ghost


class _BatchNormCNN(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not self.train)(x)
        return nn.Dense(2)(nn.relu(x).mean(axis=(1, 2)))


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_params_take_the_direct_path(train):
    coverage = _coverage_and_check(_BatchNormCNN(train), _images(), batch_stats=True)
    assert {name.split("']")[1] for name in coverage.direct} == {"['BatchNorm_0"}
    assert not coverage.fallback and len(coverage.ghost) == 4


def test_a_kernel_also_read_by_the_loss_falls_back_exactly():
    """A weight-decay term inside the per-example loss reads the kernel outside its layer."""
    model = nn.Sequential([nn.Dense(4), jnp.tanh, nn.Dense(3)])
    inputs = jax.random.normal(jax.random.key(7), (K, 5))
    params = model.init(jax.random.key(0), inputs[:1])

    def loss_fn(p, x):
        decay = 0.1 * jnp.sum(p["params"]["layers_0"]["kernel"] ** 2)
        return jnp.sum(jnp.sin(model.apply(p, x)), axis=1) + decay

    coverage = ghost.ghost_coverage(loss_fn, params, inputs)
    assert coverage.fallback == (
        "['params']['layers_0']['bias']",
        "['params']['layers_0']['kernel']",
    )
    assert len(coverage.ghost) == 2
    weights = jnp.linspace(0.5, 2.0, K)
    with pytest.warns(UserWarning, match="layers_0"):
        _, grad, norms = ghost.ghost_losses_grad_and_norms(loss_fn, params, inputs, weights)
    expected = feedback.per_example_grad_norms(loss_fn, params, inputs, method="vmap")
    np.testing.assert_allclose(np.asarray(norms), np.asarray(expected), rtol=1e-4)
    expected_grad = jax.grad(
        lambda p: jnp.mean(weights * feedback.per_example_losses(loss_fn, p, inputs))
    )(params)
    _assert_gradients_close(grad, expected_grad)


def test_a_model_applied_under_an_inner_jit_falls_back_exactly():
    model = nn.Dense(3)
    inputs = jax.random.normal(jax.random.key(8), (K, 5))
    params = model.init(jax.random.key(0), inputs[:1])

    @jax.jit
    def outputs(p, x):
        return model.apply(p, x)

    def loss_fn(p, x):
        return jnp.sum(jnp.sin(outputs(p, x)), axis=1)

    coverage = ghost.ghost_coverage(loss_fn, params, inputs)
    assert not coverage.ghost and len(coverage.fallback) == 2
    norms = ghost.per_example_grad_norms(loss_fn, params, inputs, method="auto")
    np.testing.assert_allclose(
        np.asarray(norms),
        np.asarray(feedback.per_example_grad_norms(loss_fn, params, inputs, method="vmap")),
        rtol=1e-4,
    )
