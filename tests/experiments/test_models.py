"""Tests for experiments.models: every model at tiny input size."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import get_model, init_params, list_models, model_spec
from experiments.models.recurrent import PixelSequenceLSTM

# name -> (tiny input shape, num_classes, model kwargs). Binary models use num_classes=2.
TINY_CASES = {
    "lahire-mlp": ((4,), 3, {}),
    "mnist1d-mlp": ((40,), 10, {}),
    "digits-mlp": ((64,), 10, {}),
    "regression-mlp": ((10,), 1, {}),
    "digits-cnn": ((8, 8, 1), 10, {}),
    "heavy-tailed-neuron": ((16,), 2, {}),
    "cifar-cnn": ((12, 12, 3), 7, {}),
    "fashion-cnn": ((8, 8, 1), 10, {"conv_dropout": 0.25, "dense_dropout": 0.5}),
    "row-lstm": ((6, 6, 1), 10, {"pixels_per_step": 6, "hidden_size": 8}),
    "pixel-lstm": ((3, 3, 1), 10, {"hidden_size": 8}),
    "imdb-rcnn": ((24,), 2, {"vocab_size": 50, "embedding_size": 8, "lstm_size": 6}),
    "byte-transformer": ((6,), 11, {"max_length": 6, "width": 8, "num_heads": 2, "num_layers": 1}),
}
HAS_DROPOUT = {"cifar-cnn", "fashion-cnn", "imdb-rcnn"}
BATCH = 5


def make_input(name: str, shape) -> jnp.ndarray:
    spec = model_spec(name)
    key = jax.random.key(42)
    if np.dtype(spec.input_dtype).kind == "i":
        _, num_classes, kwargs = TINY_CASES[name]
        vocab = kwargs.get("vocab_size", num_classes)  # a language model's vocabulary: classes
        return jax.random.randint(key, (BATCH, *shape), 0, vocab)
    return jax.random.normal(key, (BATCH, *shape))


def random_params(shapes, seed: int):
    """Scaled Gaussian parameters (std 1/sqrt(fan_in)) with the given shapes."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), dtype=leaf.dtype)

    return jax.tree.map(draw, shapes)


@functools.cache
def probe(name: str):
    """Build ``name`` at tiny size and run everything the tests inspect in ONE
    jitted function (one compilation per model keeps the suite fast on CPU)."""
    shape, num_classes, kwargs = TINY_CASES[name]
    model = get_model(name, num_classes, **kwargs)
    example = model_spec(name).example_input(2, shape)
    # Tracing init (eval_shape) checks the init path without compiling Flax's
    # truncated-normal initializers, which costs seconds per shape on CPU; the
    # parameter values are then drawn with numpy (real init: test_real_init_is_seeded).
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), example))
    params = random_params(shapes, seed=0)
    x = make_input(name, shape)
    rng_a, rng_b = jax.random.key(1), jax.random.key(2)

    @jax.jit
    def run(params, x):
        def apply(p, train, rng=None):
            rngs = None if rng is None else {"dropout": rng}
            return model.apply({"params": p}, x, train=train, rngs=rngs)

        def loss(p):
            return jnp.sum(apply(p, True, rng_a) ** 2)

        return {
            "eval": apply(params, False),
            "eval_rng_a": apply(params, False, rng_a),
            "train_a": apply(params, True, rng_a),
            "train_b": apply(params, True, rng_b),
            "grads": jax.grad(loss)(params),
        }

    return model, params, x, num_classes, jax.device_get(run(params, x))


def test_every_registered_model_is_tested():
    assert set(list_models()) == set(TINY_CASES)


# the two largest models are slow to compile: the rest are the fast tier's
CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in ("cifar-cnn", "imdb-rcnn") else name
    for name in sorted(TINY_CASES)
]


@pytest.mark.parametrize("name", CASES)
def test_output_shape_and_finite_under_jit(name):
    _, _, x, num_classes, out = probe(name)
    task = model_spec(name).task
    expected = {"binary": (BATCH,), "regression": (BATCH,), "next_token": (*x.shape, num_classes)}
    assert out["eval"].shape == expected.get(task, (BATCH, num_classes))
    assert np.all(np.isfinite(out["eval"])) and np.all(np.isfinite(out["train_a"]))


@pytest.mark.parametrize("name", CASES)
def test_dropout_only_in_train_mode(name):
    out = probe(name)[-1]
    np.testing.assert_array_equal(out["eval_rng_a"], out["eval"])
    if name in HAS_DROPOUT:
        assert not np.allclose(out["train_a"], out["train_b"])
        assert not np.allclose(out["train_a"], out["eval"])
    else:
        np.testing.assert_allclose(out["train_a"], out["eval"], rtol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_gradients_are_finite_and_nonzero(name):
    grads = probe(name)[-1]["grads"]
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)


def test_real_init_is_seeded():
    """Real Flax init (compiled) on the cheapest model: finite, key-dependent."""
    model = get_model("heavy-tailed-neuron", 2)
    example = model_spec("heavy-tailed-neuron").example_input(2, (16,))
    params = init_params(model, jax.random.key(0), example)
    (theta,) = jax.tree.leaves(params)
    assert theta.shape == (16, 1) and np.all(np.isfinite(theta)) and np.any(theta != 0)
    (other,) = jax.tree.leaves(init_params(model, jax.random.key(1), example))
    assert not np.array_equal(theta, other)


def test_lstm_models_use_relu_cell_activation():
    for name in ("row-lstm", "pixel-lstm"):
        model = get_model(name, 10)
        assert model.activation_fn is jax.nn.relu and model.hidden_size == 100
    assert get_model("row-lstm", 10).pixels_per_step == 28
    assert get_model("pixel-lstm", 10).pixels_per_step == 1


def test_eager_apply_matches_jit():
    model, params, x, _, out = probe("lahire-mlp")
    np.testing.assert_allclose(
        model.apply({"params": params}, x), out["eval"], rtol=1e-5, atol=1e-6
    )


def test_specs_give_default_input_shapes():
    expected = {
        "lahire-mlp": (4,),
        "mnist1d-mlp": (40,),
        "digits-cnn": (8, 8, 1),
        "heavy-tailed-neuron": (100,),
        "cifar-cnn": (32, 32, 3),
        "fashion-cnn": (28, 28, 1),
        "row-lstm": (28, 28, 1),
        "pixel-lstm": (28, 28, 1),
        "imdb-rcnn": (400,),
        "byte-transformer": (64,),
    }
    for name, shape in expected.items():
        spec = model_spec(name)
        assert spec.input_shape == shape
        assert spec.example_input(3).shape == (3, *shape)
    assert model_spec("imdb-rcnn").example_input().dtype == jnp.int32


def param_shapes(name, num_classes, example, **kwargs):
    model = get_model(name, num_classes, **kwargs)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), example))
    return model, shapes


def test_full_size_default_inputs_give_expected_outputs():
    for name in list_models():
        spec = model_spec(name)
        num_classes = {"binary": 2, "regression": 1}.get(spec.task, 10)
        model, shapes = param_shapes(name, num_classes, spec.example_input())
        out = jax.eval_shape(
            lambda p, model=model, spec=spec: model.apply({"params": p}, spec.example_input(4)),
            shapes,
        )
        expected = {
            "binary": (4,),
            "regression": (4,),
            "next_token": (4, *spec.input_shape, num_classes),
        }
        assert out.shape == expected.get(spec.task, (4, num_classes)), name


def test_lahire_mlp_layer_sizes():
    _, shapes = param_shapes("lahire-mlp", 3, jnp.zeros((1, 13)))
    kernels = [
        leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        if "kernel" in jax.tree_util.keystr(path)
    ]
    assert kernels == [(13, 10), (10, 10), (10, 3)]


def test_heavy_tailed_neuron_is_relu_of_linear_score():
    _, params, x, _, out = probe("heavy-tailed-neuron")
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 1 and leaves[0].shape == (16, 1)  # theta only, no bias
    expected = np.maximum(np.asarray(x) @ np.asarray(leaves[0][:, 0]), 0.0)
    np.testing.assert_allclose(out["eval"], expected, rtol=1e-5, atol=1e-6)
    assert np.all(out["eval"] >= 0)


@pytest.mark.parametrize(
    "name, keras_count",
    [
        ("cifar-cnn", 1_250_858),  # Keras cifar10_cnn.py, 10 classes
        ("fashion-cnn", 1_199_882),  # Keras mnist_cnn.py
        ("imdb-rcnn", 2_638_895),  # Keras imdb_cnn_lstm.py (Dense(1))
    ],
)
def test_parameter_counts_match_keras_examples(name, keras_count):
    spec = model_spec(name)
    _, shapes = param_shapes(name, 2 if spec.task == "binary" else 10, spec.example_input(1))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == keras_count


def test_binary_models_reject_multiclass():
    with pytest.raises(ValueError):
        get_model("imdb-rcnn", 10)
    with pytest.raises(KeyError):
        get_model("no-such-model", 10)


def test_pixel_lstm_rejects_uneven_steps():
    model = PixelSequenceLSTM(num_classes=2, hidden_size=4, pixels_per_step=5)
    with pytest.raises(ValueError):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 3, 1)))
