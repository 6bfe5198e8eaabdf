"""The default train step on models as users write them: tied weights, ``Embed.attend``,
``DenseGeneral(batch_dims=...)``. One ``make_train_step`` step (``feedback="grad_norm"``,
ghost norms by default, SGD with learning rate 1, uniform sampling: weights 1) applies
-G_hat, which must equal ``jax.grad`` of the mean loss of the batch it drew, and the ghost
norms must equal the ``vmap`` norms; both at rtol 1e-4 in float32.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adambs_jax as ab

N, K, WIDTH, CLASSES = 16, 8, 6, 5


def _data(inputs):
    labels = jax.random.randint(jax.random.key(1), (N,), 0, CLASSES)
    return {"x": inputs, "y": labels}


def _features():
    return jax.random.normal(jax.random.key(0), (N, WIDTH))


def _tokens():
    return jax.random.randint(jax.random.key(2), (N, 7), 0, 11)


def _cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def _check_step_and_norms(loss_fn, params, data):
    """One default step's update is -jax.grad of the drawn batch's mean loss, and the ghost
    norms of that batch are the vmap norms; returns the ghost coverage."""
    sampler = ab.uniform_sampler(N, K)
    step = ab.make_train_step(loss_fn, optax.sgd(1.0), sampler)
    key = jax.random.key(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are tested by the coverage below
        state, _ = step(step.init(params), data, key)
        sample_key = jax.random.split(key, 3)[0]  # as make_train_step splits its key
        indices, _ = sampler.sample(sampler.init(), sample_key)
        batch = jax.tree.map(lambda leaf: leaf[indices], data)
        norms = ab.feedback.ghost.per_example_grad_norms(loss_fn, params, batch)
    expected_grad = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    update = jax.tree.map(jnp.subtract, params, state.params)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(expected_grad))
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6 * scale),
        update,
        expected_grad,
    )
    expected = ab.feedback.ghost.per_example_grad_norms(loss_fn, params, batch, method="vmap")
    np.testing.assert_allclose(np.asarray(norms), np.asarray(expected), rtol=1e-4)
    return ab.feedback.ghost.ghost_coverage(loss_fn, params, batch)


class _TiedLinears(nnx.Module):
    """Two NNX Linear layers sharing one kernel ``Param``, the usual NNX way to tie."""

    def __init__(self, rngs):
        self.a = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.b = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.b.kernel = self.a.kernel
        self.out = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.b(jnp.tanh(self.a(x)))))


def test_nnx_linears_sharing_a_kernel_param():
    graphdef, params, rest = nnx.split(_TiedLinears(nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(p, batch):
        return _cross_entropy(nnx.merge(graphdef, p, rest)(batch["x"]), batch)

    coverage = _check_step_and_norms(loss_fn, params, _data(_features()))
    assert "['a']['kernel'].value" in coverage.ghost and not coverage.fallback


class _LinenTiedDense(nn.Module):
    """A linen Dense and a second Dense applied with the first one's kernel."""

    @nn.compact
    def __call__(self, x):
        first = nn.Dense(WIDTH, use_bias=False, name="first")
        h = jnp.tanh(first(x))
        tied = {"params": {"kernel": first.variables["params"]["kernel"]}}
        h = jnp.tanh(nn.Dense(WIDTH, use_bias=False).apply(tied, h))
        return nn.Dense(CLASSES)(h)


def test_linen_parameter_read_by_two_dense_layers():
    model = _LinenTiedDense()
    params = model.init(jax.random.key(0), _features()[:1])

    def loss_fn(p, batch):
        return _cross_entropy(model.apply(p, batch["x"]), batch)

    coverage = _check_step_and_norms(loss_fn, params, _data(_features()))
    assert "['params']['first']['kernel']" in coverage.ghost and not coverage.fallback


def test_two_linen_modules_applied_at_the_top_level():
    """An encoder and a head applied separately: both layers have the empty module path."""
    encoder, head = nn.Dense(WIDTH), nn.Dense(CLASSES)
    x = _features()
    params = {
        "encoder": encoder.init(jax.random.key(0), x[:1]),
        "head": head.init(jax.random.key(1), x[:1]),
    }

    def loss_fn(p, batch):
        h = jnp.tanh(encoder.apply(p["encoder"], batch["x"]))
        return _cross_entropy(head.apply(p["head"], h), batch)

    coverage = _check_step_and_norms(loss_fn, params, _data(x))
    assert len(coverage.ghost) == 4 and not coverage.fallback


class _TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, WIDTH)
        h = jnp.tanh(nn.Dense(WIDTH)(embed(tokens).mean(axis=1)))
        return embed.attend(h)[:, :CLASSES]


def test_linen_embed_attend_as_the_output_layer():
    model = _TiedEmbedding()
    params = model.init(jax.random.key(0), _tokens()[:1])

    def loss_fn(p, batch):
        return _cross_entropy(model.apply(p, batch["x"]), batch)

    coverage = _check_step_and_norms(loss_fn, params, _data(_tokens()))
    assert coverage.fallback == ("['params']['Embed_0']['embedding']",)
    assert len(coverage.ghost) == 2


class _PerHeadDense(nn.Module):
    """A projection per head: heads first, ``DenseGeneral(batch_dims=0)`` (an int, as flax
    allows), kernel (heads, in, out)."""

    @nn.compact
    def __call__(self, x):
        heads = x.reshape(x.shape[0], 2, WIDTH // 2).swapaxes(0, 1)
        h = nn.DenseGeneral(4, batch_dims=0)(heads)  # (2, batch, 4)
        h = jnp.tanh(h.swapaxes(0, 1).reshape(x.shape[0], -1))
        return nn.Dense(CLASSES)(h)


def test_dense_general_with_integer_batch_dims():
    model = _PerHeadDense()
    params = model.init(jax.random.key(0), _features()[:1])

    def loss_fn(p, batch):
        return _cross_entropy(model.apply(p, batch["x"]), batch)

    coverage = _check_step_and_norms(loss_fn, params, _data(_features()))
    assert len(coverage.ghost) == 4 and not coverage.fallback
