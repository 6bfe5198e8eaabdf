"""Tests of adambs_jax.train_step (and the scoring hook): one jitted AdamBS training step."""

import pathlib
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import adambs_jax as ab
from adambs_jax.feedback._scoring import make_score_fn
from tests.helpers import run_api_doc_example

NUM_EXAMPLES = 96
BATCH_SIZE = 8
NUM_FEATURES = 5
NUM_CLASSES = 3
API_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _linear_model(params, batch):
    return batch["x"] @ params["w"] + params["b"]


def _cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


# module-level functions, so that jitted references compile once for all tests
MODEL_LOSS = ab.ModelLoss(apply_fn=_linear_model, loss_from_outputs=_cross_entropy)


def _problem(seed=0):
    """A linearly separable 3-class problem and a linear softmax model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
    labels = np.argmax(x @ rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), axis=1)
    data = {"x": jnp.asarray(x), "y": jnp.asarray(labels)}
    params = {
        "w": jnp.asarray(0.1 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), jnp.float32),
        "b": jnp.zeros((NUM_CLASSES,)),
    }
    return params, data, MODEL_LOSS


@jax.jit
def _reference_estimate(params, batch, weights):
    """Independent of the step: G_hat and every feedback kind, from vmap'ed gradients."""
    losses, per_example = ab.feedback.per_example_losses_and_grads(MODEL_LOSS, params, batch)
    feedback = {
        "grad_norm": ab.feedback.tree_norms(per_example),
        "logit_grad_norm": ab.feedback.logit_grad_norms(MODEL_LOSS, params, batch),
        "loss": losses,
    }
    return losses, ab.transforms.weighted_mean(per_example, weights), feedback


def _full_loss(model_loss, params, data):
    return float(jnp.mean(model_loss(params, data)))


def _fixed_distribution_sampler(probabilities):
    """A ``Sampler`` drawing i.i.d. from a fixed, non-uniform p (nothing is learned)."""
    n = probabilities.shape[0]

    def sample(state, key):
        del state
        indices = jax.random.choice(key, n, (BATCH_SIZE,), p=probabilities).astype(jnp.int32)
        return indices, probabilities[indices]

    return ab.Sampler(
        init=lambda: jnp.zeros((), jnp.int32),
        sample=sample,
        update=lambda state, indices, feedback: state + 1,
        num_examples=n,
        batch_size=BATCH_SIZE,
    )


class UniformIsPlainTrainingTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("adam_loss_feedback", lambda: optax.adam(0.05), "loss"),
        ("adam_grad_norm", lambda: optax.adam(0.05), "grad_norm"),
        ("adambs_logit_grad_norm", lambda: ab.adambs(0.05), "logit_grad_norm"),
    )
    def test_matches_a_hand_written_adam_loop(self, make_optimizer, feedback):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        optimizer = make_optimizer()
        step = ab.make_train_step(model_loss, optimizer, sampler, feedback=feedback)
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)

        reference = optax.adam(0.05)

        @jax.jit
        def reference_step(params, opt_state, key):
            sample_key = jax.random.split(key, 3)[0]  # the step's documented key split
            indices, _ = sampler.sample(sampler.init(), sample_key)
            batch = jax.tree.map(lambda leaf: leaf[indices], data)
            grads = jax.grad(lambda p: jnp.mean(model_loss(p, batch)))(params)
            updates, opt_state = reference.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        reference_params, reference_state = params, reference.init(params)
        for t in range(10):
            key = jax.random.key(100 + t)
            state, metrics = step(state, data, key)
            reference_params, reference_state = reference_step(
                reference_params, reference_state, key
            )
            chex.assert_trees_all_close(state.params, reference_params, atol=1e-6, rtol=1e-6)
        self.assertEqual(int(state.step), 10)
        np.testing.assert_allclose(metrics["sampled_loss"], metrics["loss"], rtol=1e-5)


class GradientEstimateTest(parameterized.TestCase):
    """With SGD(lr=1) the parameter change is -G_hat: check it for every feedback kind."""

    @parameterized.named_parameters(
        ("grad_norm", "grad_norm", False, True),
        ("grad_norm_recomputed_mean", "grad_norm", False, False),
        ("logit_grad_norm", "logit_grad_norm", False, True),
        ("loss", "loss", False, True),
        # an optimizer of per-example gradients: fed them directly (grad_norm), or fed the
        # already averaged gradient as a batch of one with weight 1 (the other kinds)
        ("grad_norm_per_example_optimizer", "grad_norm", True, True),
        ("logit_grad_norm_per_example_optimizer", "logit_grad_norm", True, True),
    )
    def test_step_applies_the_importance_weighted_mean_gradient(
        self, feedback, per_example_optimizer, reuse_per_example_grads
    ):
        params, data, model_loss = _problem()
        p = jnp.linspace(1.0, 3.0, NUM_EXAMPLES)
        p = p / jnp.sum(p)
        sampler = _fixed_distribution_sampler(p)
        optimizer = optax.sgd(1.0)
        if per_example_optimizer:
            optimizer = ab.with_importance_weighting(optimizer)
        kind = feedback
        if feedback == "grad_norm":
            kind = ab.feedback.GradNorm(reuse_per_example_grads=reuse_per_example_grads)
        step = ab.make_train_step(model_loss, optimizer, sampler, feedback=kind)
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        key = jax.random.key(7)
        new_state, metrics = step(state, data, key)

        indices, probs = sampler.sample(None, jax.random.split(key, 3)[0])
        weights = ab.importance_weights(probs, NUM_EXAMPLES)
        batch = jax.tree.map(lambda leaf: leaf[indices], data)
        losses, expected_gradient, expected_feedback = _reference_estimate(params, batch, weights)
        step_gradient = jax.tree.map(lambda old, new: old - new, params, new_state.params)
        chex.assert_trees_all_close(step_gradient, expected_gradient, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(metrics["sampled_loss"], jnp.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(metrics["loss"], jnp.mean(weights * losses), rtol=1e-5)
        np.testing.assert_allclose(metrics["max_weight"], jnp.max(weights), rtol=1e-6)
        np.testing.assert_allclose(metrics["min_weight"], jnp.min(weights), rtol=1e-6)
        np.testing.assert_allclose(
            metrics["mean_feedback"], jnp.mean(expected_feedback[feedback]), rtol=1e-5
        )

    def test_pure_step_composes_in_scan(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        optimizer = optax.sgd(0.1)
        pure_step = ab.make_train_step(model_loss, optimizer, sampler, feedback="loss", jit=False)
        keys = jax.random.split(jax.random.key(0), 3)

        @jax.jit
        def run(state):
            return jax.lax.scan(lambda s, k: pure_step(s, data, k), state, keys)

        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        scanned, metrics = run(state)
        chex.assert_shape(metrics["loss"], (3,))
        step = ab.make_train_step(model_loss, optimizer, sampler, feedback="loss")
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        for key in keys:
            state, _ = step(state, data, key)
        chex.assert_trees_all_close(scanned.params, state.params, atol=1e-6)


class Exp3StepTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("sgd", lambda: optax.sgd(0.3)),
        ("rmsprop", lambda: optax.rmsprop(0.02)),
        ("adam", lambda: optax.adam(0.05)),
        ("amsgrad", lambda: optax.amsgrad(0.05)),
        ("adamw", lambda: optax.adamw(0.05, weight_decay=1e-3)),
    )
    @pytest.mark.slow  # a matrix of optimizers (under the absl decorator, which copies it)
    def test_loss_decreases_with_exp3_sampling_and_compiles_once(self, make_optimizer):
        params, data, model_loss = _problem()
        num_steps = 40
        sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=num_steps)
        optimizer = make_optimizer()
        traces = []

        def counting_loss(p, batch):
            traces.append(1)  # a Python side effect: runs only while tracing
            return model_loss(p, batch)

        step = ab.make_train_step(counting_loss, optimizer, sampler, feedback="grad_norm")
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        initial_loss = _full_loss(model_loss, params, data)
        state, _ = step(state, data, jax.random.key(0))
        traces_after_first_call = len(traces)
        self.assertGreater(traces_after_first_call, 0)
        for t in range(1, num_steps):
            previous = state
            state, metrics = step(state, data, jax.random.key(t))
        self.assertEqual(len(traces), traces_after_first_call)  # compiled once: no retrace
        self.assertTrue(previous.params["w"].is_deleted())  # the step donated its input state
        self.assertFalse(params["w"].is_deleted())  # TrainState.create copied the params
        self.assertEqual(int(state.step), num_steps)
        self.assertEqual(int(state.sampler_state.step), num_steps)
        self.assertEqual(int(metrics["num_dropped_feedback"]), 0)
        final_loss = _full_loss(model_loss, state.params, data)
        self.assertLess(final_loss, 0.7 * initial_loss)
        for value in metrics.values():
            self.assertTrue(np.isfinite(value))
        # the sampler learned something: p is no longer uniform
        self.assertGreater(float(metrics["max_prob"]), 1.0 / NUM_EXAMPLES)

    def test_bad_feedback_is_dropped_and_counted(self):
        params, data, model_loss = _problem()

        def corrupted(p, batch, losses):  # one NaN, one infinite, one negative score per step
            return losses.at[0].set(jnp.nan).at[1].set(jnp.inf).at[2].set(-1.0)

        sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
        optimizer = optax.adam(0.05)
        step = ab.make_train_step(
            model_loss, optimizer, sampler, feedback=corrupted, diagnostics=True
        )
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        for t in range(5):
            state, metrics = step(state, data, jax.random.key(t))
            self.assertEqual(int(metrics["num_dropped_feedback"]), 3)
        self.assertEqual(int(state.sampler_state.num_dropped_feedback), 15)
        p = ab.samplers.probabilities(state.sampler_state)
        self.assertTrue(bool(jnp.all(jnp.isfinite(p))))
        np.testing.assert_allclose(metrics["max_prob"], jnp.max(p), rtol=1e-6)
        np.testing.assert_allclose(metrics["min_prob"], jnp.min(p), rtol=1e-6)
        np.testing.assert_allclose(
            metrics["effective_sample_size"], 1.0 / (NUM_EXAMPLES * jnp.sum(p**2)), rtol=1e-5
        )
        self.assertGreaterEqual(float(metrics["min_prob"]), 0.1 / NUM_EXAMPLES * (1 - 1e-5))
        self.assertTrue(np.isfinite(metrics["mean_feedback"]))
        np.testing.assert_allclose(
            metrics["grad_norm_bound"], state.sampler_state.grad_norm_bound, rtol=1e-6
        )


class StateAndOptionsTest(parameterized.TestCase):
    def test_key_from_the_state(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss")
        state = ab.TrainState.create(
            params=params, optimizer=optax.sgd(0.1), sampler=sampler, key=jax.random.key(0)
        )
        first_key = jax.random.key_data(state.key)
        state, _ = step(state, data)
        second_key = jax.random.key_data(state.key)
        state, _ = step(state, data)
        self.assertFalse(np.array_equal(first_key, second_key))
        self.assertFalse(np.array_equal(second_key, jax.random.key_data(state.key)))
        keyless = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
        with pytest.raises(ValueError, match="key"):
            step(keyless, data)

    def test_diagnostics_options(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        optimizer = optax.sgd(0.1)
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        on = ab.make_train_step(model_loss, optimizer, sampler, feedback="loss", diagnostics=True)
        _, metrics = on(state, data, jax.random.key(0))
        np.testing.assert_allclose(metrics["effective_sample_size"], 1.0, rtol=1e-5)
        np.testing.assert_allclose(metrics["max_prob"], 1.0 / NUM_EXAMPLES, rtol=1e-6)
        np.testing.assert_allclose(metrics["min_prob"], 1.0 / NUM_EXAMPLES, rtol=1e-6)
        off = ab.make_train_step(model_loss, optimizer, sampler, feedback="loss", diagnostics=False)
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        _, metrics = off(state, data, jax.random.key(0))
        self.assertNotIn("effective_sample_size", metrics)
        self.assertNotIn("max_prob", metrics)
        self.assertIn("loss", metrics)

    def test_diagnostics_default_off_for_large_datasets(self):
        n = ab.step.FULL_DIAGNOSTICS_MAX_EXAMPLES + 1
        data = {"x": jnp.ones((n, 1)), "y": jnp.zeros((n,), jnp.int32)}
        model_loss = ab.ModelLoss(lambda p, b: b["x"] @ p, _cross_entropy)
        sampler = ab.uniform_sampler(n, BATCH_SIZE)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss")
        state = ab.TrainState.create(
            params=jnp.ones((1, 2)), optimizer=optax.sgd(0.1), sampler=sampler
        )
        _, metrics = step(state, data, jax.random.key(0))
        self.assertNotIn("effective_sample_size", metrics)
        self.assertIn("max_weight", metrics)

    def test_build_time_errors(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        plain_loss = lambda p, b: model_loss(p, b)
        with pytest.raises(ValueError, match="ModelLoss"):
            ab.make_train_step(plain_loss, optax.sgd(0.1), sampler, feedback="logit_grad_norm")
        with pytest.raises(ValueError, match="feedback must be one of"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="norm")
        with pytest.raises(TypeError, match="optimizer"):
            ab.make_train_step(model_loss, lambda g: g, sampler)
        with pytest.raises(TypeError, match="sampler"):
            ab.make_train_step(model_loss, optax.sgd(0.1), object())
        with pytest.raises(TypeError, match="loss_fn"):
            ab.make_train_step(3, optax.sgd(0.1), sampler)
        with pytest.raises(TypeError, match="reuse_per_example_grads"):
            ab.feedback.GradNorm(reuse_per_example_grads=None)
        with pytest.raises(TypeError, match="unexpected keyword argument.*learning_rate"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, learning_rate=0.1)
        with pytest.raises(TypeError, match="options must be an ab.StepOptions"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, options={"jit": False})
        with pytest.raises(TypeError, match="diagnostics"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, diagnostics="yes")
        with pytest.raises(TypeError, match="optimizer"):
            ab.TrainState.create(params=params, optimizer=None, sampler=sampler)

    def test_trace_time_errors(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss", jit=False)
        short = jax.tree.map(lambda leaf: leaf[:-1], data)
        with pytest.raises(ValueError, match="data"):
            step(state, short, jax.random.key(0))
        mean_loss = lambda p, b: jnp.mean(model_loss(p, b))
        step = ab.make_train_step(mean_loss, optax.sgd(0.1), sampler, feedback="loss", jit=False)
        with pytest.raises(ValueError, match="per-example losses"):
            step(state, data, jax.random.key(0))
        wrong_size = ab.Sampler(
            init=sampler.init,
            sample=lambda state, key: (
                jnp.zeros((BATCH_SIZE + 1,), jnp.int32),
                jnp.ones((BATCH_SIZE + 1,)),
            ),
            update=sampler.update,
            num_examples=NUM_EXAMPLES,
            batch_size=BATCH_SIZE,
        )
        step = ab.make_train_step(
            model_loss, optax.sgd(0.1), wrong_size, feedback="loss", jit=False
        )
        with pytest.raises(ValueError, match="sampler.sample"):
            step(state, data, jax.random.key(0))
        bad_feedback = lambda p, b, losses: losses[:2]
        step = ab.make_train_step(
            model_loss, optax.sgd(0.1), sampler, feedback=bad_feedback, jit=False
        )
        with pytest.raises(ValueError, match="feedback"):
            step(state, data, jax.random.key(0))


class ScoringHookTest(parameterized.TestCase):
    def test_score_fn_matches_the_feedback_functions_with_and_without_chunks(self):
        params, data, model_loss = _problem()
        indices = jnp.asarray([3, 0, 95, 17, 17, 42, 8], jnp.int32)
        batch = jax.tree.map(lambda leaf: leaf[indices], data)
        expected = ab.feedback.logit_grad_norms(model_loss, params, batch)
        for chunk_size in (None, 3):  # 3: two full chunks and a padded one
            score_fn = make_score_fn(
                model_loss,
                "logit_grad_norm",
                params,
                data,
                jax.random.key(0),
                chunk_size=chunk_size,
            )
            # float32 on CPU; a GPU's TF32 matmuls differ by ~4e-5 between the two programs
            rtol = 1e-6 if jax.default_backend() == "cpu" else 1e-4
            np.testing.assert_allclose(jax.jit(score_fn)(indices), expected, rtol=rtol)
        score_fn = make_score_fn(model_loss, "grad_norm", params, data, None, chunk_size=2)
        np.testing.assert_allclose(
            jax.jit(score_fn)(indices),
            _reference_estimate(params, batch, jnp.ones(7))[2]["grad_norm"],
            rtol=1e-5,
        )
        with pytest.raises(ValueError, match="chunk_size"):
            make_score_fn(model_loss, "loss", params, data, chunk_size=0)

    def test_scoring_sampler_gets_scores_of_the_current_model(self):
        params, data, model_loss = _problem()
        presample = jnp.arange(3 * BATCH_SIZE, dtype=jnp.int32)

        def sample(state, key, score_fn):  # the K best-scored of a fixed presample
            del key
            scores = score_fn(presample)
            chosen = presample[jnp.argsort(-scores)[:BATCH_SIZE]]
            state = state._replace(scores=scores)  # sample may update the state
            return chosen, jnp.full((BATCH_SIZE,), 1.0 / NUM_EXAMPLES), state

        class State(NamedTuple):
            scores: jax.Array
            drawn: jax.Array

        sampler = ab.ScoringSampler(
            init=lambda: State(jnp.zeros((3 * BATCH_SIZE,)), jnp.zeros((BATCH_SIZE,), jnp.int32)),
            sample=sample,
            # update sees the state returned by sample; it remembers the drawn indices
            update=lambda state, indices, feedback: state._replace(drawn=indices),
            num_examples=NUM_EXAMPLES,
            batch_size=BATCH_SIZE,
            score_feedback="logit_grad_norm",
            score_chunk_size=5,
        )
        step = ab.make_train_step(model_loss, optax.sgd(0.5), sampler, feedback="loss")
        state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.5), sampler=sampler)
        for t in range(2):
            current_params = jax.tree.map(jnp.copy, state.params)
            state, _ = step(state, data, jax.random.key(t))
            batch = jax.tree.map(lambda leaf: leaf[presample], data)
            scores = ab.feedback.logit_grad_norms(model_loss, current_params, batch)
            expected = presample[jnp.argsort(-scores)[:BATCH_SIZE]]
            np.testing.assert_array_equal(state.sampler_state.drawn, expected)
            np.testing.assert_allclose(state.sampler_state.scores, scores, rtol=1e-6)


def _api_examples():
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)
    assert len(blocks) >= 5, "docs/api.md lost its examples"
    return blocks


# Every ```python block of docs/api.md starts with the comment that names it; the test that
# runs it, by that name:
API_DOC_EXAMPLES = {
    "# hand-written loop example": "here",
    "# linen example": "here",
    "# linen logit example": "here",
    "# nnx example": "here",
    "# scoring sampler example": "here",
    "# checkpoint example": "here",
    "# groups sampler example": "tests/samplers/test_groups.py",
    "# domain sampler example": "tests/samplers/test_domains.py",
    "# host data example": "tests/host/test_loop.py",
    "# memmap dataset example": "tests/host/test_sources.py",
    "# array_record example": "tests/host/test_grain_source.py",
}


def test_every_api_doc_example_is_named_and_run():
    """No block of docs/api.md goes unrun: each starts with one of the names above."""
    names = [block.split(":")[0] for block in _api_examples()]
    assert sorted(names) == sorted(API_DOC_EXAMPLES), names


@pytest.mark.parametrize(
    "marker",
    [
        "# hand-written loop example",
        "# linen example",
        "# linen logit example",
        "# nnx example",
        "# scoring sampler example",
    ],
)
def test_api_doc_example_runs(marker):
    """The examples of docs/api.md (linen with dropout, NNX, ...) run and their asserts hold."""
    run_api_doc_example(marker)


# ---------------------------------------------------------------------------- non-finite steps


def _poisoned(data, value):
    """``data`` with every feature replaced by ``value`` (NaN or inf): every loss and
    gradient of a batch drawn from it is non-finite."""
    return {"x": jnp.full_like(data["x"], value), "y": data["y"]}


def _copy(tree):
    """A host copy (the step donates its input); typed keys become their raw data."""

    def copy(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return np.array(jax.random.key_data(leaf))
        return np.array(leaf)

    return jax.tree.map(copy, tree)


def _norm_penalised_loss(params, batch):
    """Cross-entropy + sqrt(s_k ||w||^2): with s_k = 0 the loss is finite (the term is 0)
    but its gradient is NaN (0 * d sqrt(0) = 0 * inf)."""
    penalty = jnp.sqrt(batch["s"] * jnp.sum(jnp.square(params["w"])))
    return MODEL_LOSS(params, batch) + penalty


class NonFiniteStepTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("exp3_nan_loss_grad_norm", "exp3", "grad_norm", jnp.nan),
        ("exp3_inf_loss_logit_bound", "exp3", "logit_grad_norm", jnp.inf),
        ("uniform_nan_loss", "uniform", "loss", jnp.nan),
    )
    def test_a_non_finite_step_changes_nothing_and_training_continues(
        self, sampler_kind, feedback, bad_value
    ):
        params, data, model_loss = _problem()
        if sampler_kind == "exp3":
            sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=20)
        else:
            sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        optimizer = optax.adam(0.05)
        step = ab.make_train_step(model_loss, optimizer, sampler, feedback=feedback)
        state = ab.TrainState.create(
            params=params, optimizer=optimizer, sampler=sampler, key=jax.random.key(0)
        )
        initial_loss = _full_loss(model_loss, params, data)
        for _ in range(3):
            state, metrics = step(state, data)
            self.assertEqual(int(metrics["skipped"]), 0)
        before = _copy(state)
        state, metrics = step(state, _poisoned(data, bad_value))  # the injected fault
        self.assertEqual(int(metrics["skipped"]), 1)
        self.assertEqual(int(metrics["skipped_steps"]), 1)
        self.assertFalse(np.isfinite(metrics["loss"]))
        for name in ("params", "opt_state", "sampler_state"):  # bitwise unchanged
            chex.assert_trees_all_equal(getattr(state, name), getattr(before, name))
        self.assertEqual(int(state.step), 4)  # a skipped step still counts as a step
        self.assertFalse(np.array_equal(jax.random.key_data(state.key), before.key))  # moved on
        for _ in range(16):  # and training goes on
            state, metrics = step(state, data)
            self.assertEqual(int(metrics["skipped"]), 0)
        self.assertEqual(int(state.skipped_steps), 1)
        self.assertEqual(int(state.step), 20)
        self.assertEqual(int(state.sampler_state.step), 19)  # one update skipped
        self.assertLess(_full_loss(model_loss, state.params, data), 0.8 * initial_loss)
        self.assertTrue(
            all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
        )

    def test_finite_loss_with_non_finite_gradient_is_skipped(self):
        params, data, _ = _problem()
        data = dict(data, s=jnp.ones((NUM_EXAMPLES,)))
        sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
        optimizer = optax.sgd(0.1)
        step = ab.make_train_step(_norm_penalised_loss, optimizer, sampler, feedback="loss")
        state = ab.TrainState.create(params=params, optimizer=optimizer, sampler=sampler)
        state, metrics = step(state, data, jax.random.key(0))
        self.assertEqual(int(metrics["skipped"]), 0)
        before = _copy(state)
        bad = dict(data, s=jnp.zeros((NUM_EXAMPLES,)))
        state, metrics = step(state, bad, jax.random.key(1))
        self.assertTrue(np.isfinite(metrics["loss"]))  # the loss is fine, its gradient is not
        self.assertEqual(int(metrics["skipped"]), 1)
        chex.assert_trees_all_equal(state.params, before.params)
        chex.assert_trees_all_equal(state.sampler_state, before.sampler_state)

    def test_without_skipping_the_fault_reaches_the_parameters(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        step = ab.make_train_step(
            model_loss, optax.sgd(0.1), sampler, feedback="loss", skip_non_finite=False
        )
        state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
        state, metrics = step(state, _poisoned(data, jnp.nan), jax.random.key(0))
        self.assertEqual(int(metrics["skipped"]), 0)
        self.assertFalse(bool(jnp.all(jnp.isfinite(state.params["w"]))))

    def test_scoring_sampler_state_is_kept_on_a_skipped_step(self):
        params, data, model_loss = _problem()

        def sample(state, key, score_fn):  # sample changes the state: a counter of draws
            indices = jax.random.randint(key, (BATCH_SIZE,), 0, NUM_EXAMPLES)
            return indices, jnp.full((BATCH_SIZE,), 1.0 / NUM_EXAMPLES), state.at[0].add(1)

        sampler = ab.ScoringSampler(
            init=lambda: jnp.zeros((2,), jnp.int32),
            sample=sample,
            update=lambda state, indices, feedback: state.at[1].add(1),
            num_examples=NUM_EXAMPLES,
            batch_size=BATCH_SIZE,
        )
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss")
        state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
        state, _ = step(state, data, jax.random.key(0))
        np.testing.assert_array_equal(state.sampler_state, [1, 1])
        state, metrics = step(state, _poisoned(data, jnp.nan), jax.random.key(1))
        self.assertEqual(int(metrics["skipped"]), 1)
        np.testing.assert_array_equal(state.sampler_state, [1, 1])  # sample's change undone
        state, _ = step(state, data, jax.random.key(2))
        np.testing.assert_array_equal(state.sampler_state, [2, 2])

    def test_hand_built_state_without_counter(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss")
        state = ab.TrainState(
            params=jax.tree.map(jnp.copy, params),
            opt_state=optax.sgd(0.1).init(params),
            sampler_state=sampler.init(),
            step=jnp.zeros((), jnp.int32),
        )
        state, metrics = step(state, _poisoned(data, jnp.nan), jax.random.key(0))
        self.assertIsNone(state.skipped_steps)
        self.assertEqual(int(metrics["skipped"]), 1)
        self.assertNotIn("skipped_steps", metrics)


class ValidationTest(parameterized.TestCase):
    """Trace-time checks name the bad argument."""

    def test_bad_keys_and_states(self):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss", jit=False)
        state = ab.TrainState.create(params=params, optimizer=optax.sgd(0.1), sampler=sampler)
        with pytest.raises(ValueError, match="key must be a PRNG key"):
            step(state, data, jnp.zeros((3,), jnp.float32))
        with pytest.raises(ValueError, match="key must be a single PRNG key"):
            step(state, data, jax.random.split(jax.random.key(0), 2))
        step(state, data, jax.random.PRNGKey(0))  # raw uint32 keys are fine
        with pytest.raises(TypeError, match="state must be an ab.TrainState"):
            step(tuple(state), data, jax.random.key(0))
        with pytest.raises(ValueError, match="state.step"):
            step(state._replace(step=jnp.zeros((2,), jnp.int32)), data, jax.random.key(0))
        with pytest.raises(ValueError, match="key"):
            ab.TrainState.create(
                params=params, optimizer=optax.sgd(0.1), sampler=sampler, key=jnp.ones(2)
            )
        other = ab.uniform_sampler(2 * NUM_EXAMPLES, BATCH_SIZE)
        with pytest.raises(ValueError, match="state.sampler_state: built for num_examples=192"):
            step(state._replace(sampler_state=other.init()), data, jax.random.key(0))

    def test_bad_build_options(self):
        _, _, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        with pytest.raises(TypeError, match="skip_non_finite"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, skip_non_finite=1)
        with pytest.raises(TypeError, match="jit"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, jit="no")
        with pytest.raises(TypeError, match="mesh"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, mesh="data")
        mesh = ab.data_parallel_mesh()
        with pytest.raises(ValueError, match="data_axis"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, mesh=mesh, data_axis="batch")


def test_api_doc_checkpoint_example_runs():
    """The checkpoint/resume example of docs/api.md runs and its asserts hold."""
    blocks = [block for block in _api_examples() if block.startswith("# checkpoint example")]
    assert len(blocks) == 1, "docs/api.md lost its checkpoint example"
    exec(compile(blocks[0], f"{API_DOC.name}[checkpoint]", "exec"), {"__name__": "doc"})


class SamplerContractTest(parameterized.TestCase):
    """The step asks the sampler (its ``probabilities`` field) instead of probing its state."""

    def test_diagnostics_need_a_sampler_with_a_distribution(self):
        params, data, model_loss = _problem()
        sampler = _fixed_distribution_sampler(jnp.full((NUM_EXAMPLES,), 1.0 / NUM_EXAMPLES))
        self.assertIsNone(sampler.probabilities)
        with pytest.raises(ValueError, match="diagnostics=True needs a sampler with a full"):
            ab.make_train_step(model_loss, optax.sgd(0.1), sampler, diagnostics=True)
        step = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss")
        state = step.init(params)
        _, metrics = step(state, data, jax.random.key(0))  # default: no diagnostics, no error
        self.assertNotIn("effective_sample_size", metrics)
        self.assertNotIn("grad_norm_bound", metrics)  # not an EXP3 state
        self.assertIn("max_weight", metrics)

    def test_diagnostics_read_the_sampler_s_probabilities(self):
        params, data, model_loss = _problem()
        p = jnp.linspace(1.0, 2.0, NUM_EXAMPLES)
        p = p / jnp.sum(p)
        sampler = _fixed_distribution_sampler(p)._replace(probabilities=lambda state: p)
        step = ab.make_train_step(
            model_loss, optax.sgd(0.1), sampler, feedback="loss", diagnostics=True
        )
        _, metrics = step(step.init(params), data, jax.random.key(0))
        np.testing.assert_allclose(metrics["max_prob"], jnp.max(p), rtol=1e-6)
        np.testing.assert_allclose(metrics["min_prob"], jnp.min(p), rtol=1e-6)
        np.testing.assert_allclose(
            metrics["effective_sample_size"], 1.0 / (NUM_EXAMPLES * jnp.sum(p**2)), rtol=1e-5
        )


def test_score_fn_chunk_size_must_be_an_int():
    params, data, model_loss = _problem()
    for bad in (True, 2.0, -1):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None"):
            make_score_fn(model_loss, "loss", params, data, chunk_size=bad)


def _plain_optax_loop(model_loss, optimizer, sampler, params, data, keys, extra_args=False):
    """Plain mini-batch training with ``optimizer`` on the mean gradient (uniform draws with
    the step's key split), ``value=`` the batch mean loss when ``extra_args``."""

    @jax.jit
    def reference_step(params, opt_state, key):
        indices, _ = sampler.sample(sampler.init(), jax.random.split(key, 3)[0])
        batch = jax.tree.map(lambda leaf: leaf[indices], data)
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model_loss(p, batch)))(params)
        kwargs = {"value": loss} if extra_args else {}
        updates, opt_state = optimizer.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for key in keys:
        params, opt_state = reference_step(params, opt_state, key)
    return params


WRAPPERS = {  # each wrapper around ab.adambs equals it around optax.adam
    "chain_clip": lambda adam: optax.chain(optax.clip_by_global_norm(0.5), adam(0.05)),
    "chain_after": lambda adam: optax.chain(adam(0.05), optax.add_decayed_weights(1e-3)),
    "inject_hyperparams": lambda adam: optax.inject_hyperparams(adam)(learning_rate=0.05),
    "apply_if_finite": lambda adam: optax.apply_if_finite(adam(0.05), 3),
    "masked": lambda adam: optax.chain(  # masked-out leaves get the raw gradient: zero it
        optax.masked(adam(0.05), {"w": True, "b": False}),
        optax.masked(optax.set_to_zero(), {"w": False, "b": True}),
    ),
    "multi_steps": lambda adam: optax.MultiSteps(adam(0.05), 2),
    "schedule_free": lambda adam: optax.contrib.schedule_free(adam(0.05), 0.05),
    "reduce_on_plateau": lambda adam: optax.chain(
        adam(0.05), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    ),
}


class OptaxWrapperTest(parameterized.TestCase):
    @parameterized.named_parameters(*WRAPPERS.items())
    @pytest.mark.slow  # a matrix of optax wrappers (tests/feedback/test_model_state.py has another)
    def test_wrapped_adambs_is_plain_optax_training_when_uniform(self, wrap):
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        optimizer = wrap(ab.adambs)
        step = ab.make_train_step(model_loss, optimizer, sampler, feedback="loss")
        state = step.init(params)
        keys = [jax.random.key(200 + t) for t in range(6)]
        for key in keys:
            state, _ = step(state, data, key)
        reference = wrap(optax.adam)
        if isinstance(reference, optax.MultiSteps):
            reference = reference.gradient_transformation()
        want = _plain_optax_loop(model_loss, reference, sampler, params, data, keys, True)
        chex.assert_trees_all_close(state.params, want, atol=1e-6, rtol=1e-6)
        self.assertLess(
            _full_loss(model_loss, state.params, data), _full_loss(model_loss, params, data)
        )

    def test_masked_out_scalar_keeps_its_shape_in_the_step(self):
        params, data, model_loss = _problem()
        params = dict(params, s=jnp.asarray(0.0))
        optimizer = optax.masked(ab.adambs(0.05), {"w": True, "b": True, "s": False})
        step = ab.make_train_step(
            model_loss, optimizer, ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=5)
        )
        state, _ = step(step.init(params), data, jax.random.key(0))
        self.assertEqual(state.params["s"].shape, ())

    def test_reduce_on_plateau_gets_the_unbiased_loss_as_value(self):
        params, data, model_loss = _problem()
        seen = []
        optimizer = optax.contrib.reduce_on_plateau()
        step = ab.make_train_step(
            model_loss,
            optimizer,
            ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=5),
            jit=False,
            optimizer_extra_args=lambda m: seen.append(sorted(m)) or {"value": m["loss"]},
        )
        step(step.init(params), data, jax.random.key(0))
        self.assertEqual(seen, [["loss", "losses", "sampled_loss", "weights"]])
        with pytest.raises(TypeError, match="optimizer_extra_args"):
            ab.make_train_step(
                model_loss,
                optimizer,
                ab.uniform_sampler(NUM_EXAMPLES, 4),
                optimizer_extra_args={"value": 1.0},
            )


class LossOptionsTest(parameterized.TestCase):
    def test_a_default_argument_is_not_taken_for_the_key(self):
        params, data, _ = _problem()
        models = {"m": _linear_model}
        loss = lambda p, b, model=models["m"]: _cross_entropy(model(p, b), b)  # noqa: E731
        step = ab.make_train_step(loss, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4))
        state, metrics = step(step.init(params), data, jax.random.key(0))
        self.assertTrue(np.isfinite(float(metrics["loss"])))

    def test_loss_takes_key_states_the_signature(self):
        params, data, _ = _problem()
        calls = []

        def loss(p, b, *args):
            calls.append(len(args))
            return _cross_entropy(_linear_model(p, b), b)

        for takes_key, want in ((True, 1), (False, 0)):
            step = ab.make_train_step(
                ab.Loss(loss, takes_key=takes_key),
                optax.sgd(0.1),
                ab.uniform_sampler(NUM_EXAMPLES, 4),
                feedback="loss",
                jit=False,
            )
            step(step.init(params), data, jax.random.key(0))
            self.assertEqual(calls[-1], want)
        with pytest.raises(TypeError, match="takes_key"):
            ab.make_train_step(
                ab.Loss(loss, takes_key="yes"), optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4)
            )
        with pytest.warns(DeprecationWarning, match="loss_takes_key= is deprecated"):
            step = ab.make_train_step(
                loss,
                optax.sgd(0.1),
                ab.uniform_sampler(NUM_EXAMPLES, 4),
                feedback="loss",
                loss_takes_key=False,
                jit=False,
            )
        step(step.init(params), data, jax.random.key(0))
        self.assertEqual(calls[-1], 0)

    @pytest.mark.filterwarnings("ignore:ghost norms. no layer rule covers")
    def test_grad_norm_methods_give_the_same_step(self):
        params, data, model_loss = _problem()
        results = {}
        for method in ("vmap", "ghost", "auto"):
            sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=5)
            step = ab.make_train_step(
                model_loss, optax.adam(0.05), sampler, feedback=ab.feedback.GradNorm(method)
            )
            state, metrics = step(step.init(params), data, jax.random.key(3))
            results[method] = (state.params, metrics["mean_feedback"])
        for method in ("ghost", "auto"):
            chex.assert_trees_all_close(results[method], results["vmap"], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="method must be one of"):
            ab.feedback.GradNorm("exact")

    def test_the_old_grad_norm_keywords_warn_or_are_refused(self):
        """grad_norm_method= / reuse_per_example_grads= still set the grad-norm feedback for a
        release (with a warning); with another feedback, where they were ignored, they are
        refused."""
        params, data, model_loss = _problem()
        sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
        with pytest.warns(DeprecationWarning, match="grad_norm_method= is deprecated"):
            old = ab.make_train_step(model_loss, optax.sgd(0.1), sampler, grad_norm_method="vmap")
        new = ab.make_train_step(
            model_loss, optax.sgd(0.1), sampler, feedback=ab.feedback.GradNorm("vmap")
        )
        results = [
            step(step.init(params), data, jax.random.key(1))[0].params for step in (old, new)
        ]
        chex.assert_trees_all_equal(*results)
        for keyword in ({"grad_norm_method": "vmap"}, {"reuse_per_example_grads": True}):
            with (
                pytest.warns(DeprecationWarning),
                pytest.raises(ValueError, match="only the grad_norm feedback has these settings"),
            ):
                ab.make_train_step(model_loss, optax.sgd(0.1), sampler, feedback="loss", **keyword)


@pytest.mark.slow
def test_examples_whose_feedback_is_dropped_do_not_take_over_the_sampler():
    """Regression, through the step: a feedback that returns -1 for 10 of 1,000 examples
    raised their share of exp3's mass from 4.7% to 88% in 5,000 steps, silently."""
    n = 1000
    x = jax.random.normal(jax.random.key(0), (n, 2))
    data = {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32), "id": jnp.arange(n)}
    loss = ab.ModelLoss(_linear_model, _cross_entropy)
    feedback = lambda params, batch, losses: jnp.where(batch["id"] < 10, -1.0, losses)  # noqa: E731
    step = ab.make_train_step(
        loss,
        optax.sgd(0.05),
        ab.exp3_sampler(n, 32, num_steps=5000),
        feedback=feedback,
        steps_per_call=250,
    )
    state = step.init({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    for t in range(20):
        state, metrics = step(state, data, jax.random.key(t))
    share = float(jnp.sum(ab.samplers.probabilities(state.sampler_state)[:10]))
    assert share < 0.03, share  # 1% of the examples; they must not gain mass
    assert int(jnp.sum(metrics["num_dropped_feedback"])) > 0


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.lookahead(optax.adam(1e-3), sync_period=5, slow_step_size=0.5),
        optax.chain(optax.clip_by_global_norm(1.0), optax.lookahead(optax.sgd(0.1), 5, 0.5)),
    ],
)
def test_optax_lookahead_is_refused_when_the_step_is_built(optimizer):
    """Regression: optax.lookahead failed at the first call with a raw pytree-structure
    error; it needs LookaheadParams, which the step's parameters are not."""
    with pytest.raises(ValueError, match="optax.lookahead"):
        ab.make_train_step(MODEL_LOSS, optimizer, ab.uniform_sampler(NUM_EXAMPLES, 4))


def test_a_model_loss_with_aux_reports_the_outputs():
    """has_aux with a ModelLoss: the batch's outputs (logits) come back as metrics["aux"],
    for accuracy without a second forward pass (it used to be refused)."""
    params, data, _ = _problem()
    loss = ab.ModelLoss(_linear_model, _cross_entropy, has_aux=True)
    step = ab.make_train_step(
        loss,
        optax.sgd(0.1),
        ab.exp3_sampler(NUM_EXAMPLES, 4, num_steps=5),
        feedback="logit_grad_norm",
    )
    state = step.init(params)
    key = jax.random.key(0)
    indices, _ = step.sampler.sample(state.sampler_state, jax.random.split(key, 3)[0])
    _, metrics = step(state, data, key)
    batch = jax.tree.map(lambda leaf: leaf[indices], data)
    np.testing.assert_allclose(metrics["aux"], _linear_model(params, batch), rtol=1e-6)


def test_without_donation_the_old_state_stays_alive():
    """donate=False: code that still holds the arrays of the state passed in (an NNX module
    the state was written back to) can read them after the step."""
    params, data, _ = _problem()
    step = ab.make_train_step(
        MODEL_LOSS, optax.sgd(0.1), ab.uniform_sampler(NUM_EXAMPLES, 4), donate=False
    )
    state = step.init(params)
    new_state, _ = step(state, data, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(state.params["w"])))  # not deleted
    with pytest.raises(TypeError, match="donate must be a bool"):
        ab.StepOptions(donate="no")


def _build_and_run(loss, sampler=None, feedback="loss"):
    params, data, _ = _problem()
    sampler = sampler or ab.uniform_sampler(NUM_EXAMPLES, 4)
    step = ab.make_train_step(loss, optax.sgd(0.1), sampler, feedback=feedback)
    return step(step.init(params), data, jax.random.key(0))


def test_errors_of_a_misdescribed_loss_name_the_fix():
    """Regression: these raised JAX's own errors (TracerArrayConversionError, 'not a valid
    JAX type') or a misleading shape error."""
    plain = lambda p, b: _cross_entropy(_linear_model(p, b), b)  # noqa: E731
    with_aux = lambda p, b: (plain(p, b), {"n": jnp.sum(b["x"])})  # noqa: E731
    with_text = lambda p, b: (plain(p, b), {"note": "hello"})  # noqa: E731
    with pytest.raises(ValueError, match=r"has_aux=True the loss must return \(losses, aux\)"):
        _build_and_run(ab.Loss(plain, has_aux=True))
    with pytest.raises(ValueError, match=r"returned a tuple of 2.*ab.Loss\(fn, has_aux=True\)"):
        _build_and_run(with_aux)
    with pytest.raises(TypeError, match=r"aux\['note'\] is a str"):
        _build_and_run(ab.Loss(with_text, has_aux=True))


def test_a_scoring_feedback_of_the_wrong_shape_is_named():
    sampler = ab.priority_sampler(
        NUM_EXAMPLES, 4, refresh_every=4, score_feedback=lambda p, b, losses: losses[:1]
    )
    with pytest.raises(ValueError, match="score_feedback.*one score per example"):
        _build_and_run(MODEL_LOSS, sampler)
