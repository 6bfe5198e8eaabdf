"""Tests of adambs_jax.feedback and adambs_jax.losses: per-example scores for the sampler."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax import _tree_utils as tree_utils
from adambs_jax.feedback import _estimators as estimators
from adambs_jax.feedback import _kinds as fb
from adambs_jax.feedback._losses import check_losses, takes_key, with_key_argument

BATCH_SIZE = 6
NUM_CLASSES = 4


class _MLP(nn.Module):
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = jnp.tanh(nn.Dense(5)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES)(x)


def _setup(dropout_rate=0.0):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = {
        "x": jax.random.normal(kx, (BATCH_SIZE, 3)),
        "y": jax.random.randint(ky, (BATCH_SIZE,), 0, NUM_CLASSES),
    }
    model = _MLP(dropout_rate)
    params = model.init(kp, batch["x"][:1])
    model_loss = ab.ModelLoss(
        apply_fn=lambda p, b: model.apply(p, b["x"]),
        loss_from_outputs=lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]),
    )
    return model, params, batch, model_loss


def _one_at_a_time_grads(loss_fn, params, batch):
    grad_of_first = jax.jit(jax.grad(lambda p, example: loss_fn(p, example)[0]))
    grads, host_batch = [], jax.device_get(batch)
    for k in range(BATCH_SIZE):
        example = jax.tree.map(lambda leaf, k=k: leaf[k : k + 1], host_batch)
        grads.append(grad_of_first(params, example))
    return grads


def _flat_norm(tree):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    return float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in leaves)))


class PerExampleGradsTest(chex.TestCase):
    @chex.variants(with_jit=True)
    def test_grads_and_norms_equal_one_example_at_a_time(self):
        _, params, batch, model_loss = _setup()
        losses, grads = self.variant(
            lambda p, b: ab.feedback.per_example_losses_and_grads(model_loss, p, b)
        )(params, batch)
        norms = self.variant(lambda p, b: ab.feedback.per_example_grad_norms(model_loss, p, b))(
            params, batch
        )
        chex.assert_shape(losses, (BATCH_SIZE,))
        chex.assert_shape(norms, (BATCH_SIZE,))
        np.testing.assert_allclose(losses, model_loss(params, batch), rtol=1e-5)
        grads = jax.device_get(grads)
        for k, expected in enumerate(_one_at_a_time_grads(model_loss, params, batch)):
            chex.assert_trees_all_close(
                jax.tree.map(lambda g, k=k: g[k], grads), expected, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(norms[k], _flat_norm(expected), rtol=1e-5)

    def test_each_example_gets_its_own_key(self):
        model, params, batch, _ = _setup(dropout_rate=0.5)
        key = jax.random.key(3)

        def loss_fn(p, b, k):
            logits = model.apply(p, b["x"], train=True, rngs={"dropout": k})
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

        losses, grads = jax.jit(
            lambda p, b, k: ab.feedback.per_example_losses_and_grads(loss_fn, p, b, k)
        )(params, batch, key)
        grads = jax.device_get(grads)  # index on the host: no compile per example
        keys = jax.random.split(key, BATCH_SIZE)
        reference = jax.jit(jax.value_and_grad(lambda p, e, k: loss_fn(p, e, k)[0]))
        host_batch, keys = jax.device_get(batch), list(keys)
        for k in range(BATCH_SIZE):
            example = jax.tree.map(lambda leaf, k=k: leaf[k : k + 1], host_batch)
            expected_loss, expected = reference(params, example, keys[k])
            np.testing.assert_allclose(losses[k], expected_loss, rtol=1e-5)
            chex.assert_trees_all_close(
                jax.tree.map(lambda g, k=k: g[k], grads), expected, rtol=1e-5, atol=1e-6
            )

    def test_tree_norms(self):
        tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.asarray([[3.0], [4.0]])}
        expected = [np.sqrt(0 + 1 + 4 + 9), np.sqrt(9 + 16 + 25 + 16)]
        np.testing.assert_allclose(ab.feedback.tree_norms(tree), expected, rtol=1e-6)

    def test_tree_norms_rejects_mismatched_leading_axes(self):
        with pytest.raises(ValueError, match="different leading axes"):
            ab.feedback.tree_norms({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})

    def test_scalar_loss_is_rejected_with_a_clear_error(self):
        _, params, batch, model_loss = _setup()
        with pytest.raises(ValueError, match=r"per-example losses of shape \(1,\)"):
            ab.feedback.per_example_losses_and_grads(
                lambda p, b: model_loss(p, b).mean(), params, batch
            )


class LogitGradNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_autodiff_on_the_logits(self):
        model, params, batch, model_loss = _setup()
        bound = self.variant(lambda p, b: ab.feedback.logit_grad_norms(model_loss, p, b))(
            params, batch
        )
        logits = model.apply(params, batch["x"])
        host_logits, labels = jax.device_get((logits, batch["y"]))
        grad_of_loss = jax.jit(jax.grad(optax.softmax_cross_entropy_with_integer_labels))
        for k in range(BATCH_SIZE):
            grad_k = grad_of_loss(host_logits[k], labels[k])
            np.testing.assert_allclose(bound[k], np.linalg.norm(grad_k), rtol=1e-5)
        # for softmax cross-entropy the gradient is softmax(z) - onehot(y)
        closed_form = jnp.linalg.norm(
            jax.nn.softmax(logits) - jax.nn.one_hot(batch["y"], NUM_CLASSES), axis=1
        )
        np.testing.assert_allclose(bound, closed_form, rtol=1e-5)

    def test_output_grads_are_per_row(self):
        _, params, batch, model_loss = _setup()
        outputs = model_loss.outputs(params, batch)
        losses, output_grads = fb.losses_and_output_grads(model_loss, outputs, batch)
        full_jacobian = jax.jacrev(lambda z: model_loss.loss_from_outputs(z, batch))(outputs)
        chex.assert_shape(full_jacobian, (BATCH_SIZE, BATCH_SIZE, NUM_CLASSES))
        output_grads, full_jacobian = jax.device_get((output_grads, full_jacobian))
        for k in range(BATCH_SIZE):
            np.testing.assert_allclose(output_grads[k], full_jacobian[k, k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(losses, model_loss(params, batch), rtol=1e-6)

    def test_needs_a_model_loss(self):
        _, params, batch, model_loss = _setup()
        with pytest.raises(TypeError, match="ModelLoss"):
            ab.feedback.logit_grad_norms(lambda p, b: model_loss(p, b), params, batch)


class FeedbackFunctionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_kinds(self):
        _, params, batch, model_loss = _setup()
        run = lambda kind: self.variant(fb.feedback_function(kind, model_loss))(params, batch)
        np.testing.assert_allclose(
            run("grad_norm"),
            ab.feedback.per_example_grad_norms(model_loss, params, batch),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            run("logit_grad_norm"),
            ab.feedback.logit_grad_norms(model_loss, params, batch),
            rtol=1e-6,
        )
        np.testing.assert_allclose(run("loss"), model_loss(params, batch), rtol=1e-6)
        np.testing.assert_allclose(
            run(lambda p, b, losses: 2 * losses + 1), 2 * model_loss(params, batch) + 1, rtol=1e-6
        )

    def test_bad_kinds(self):
        _, _, _, model_loss = _setup()
        with pytest.raises(ValueError, match="feedback must be one of"):
            fb.feedback_function("gradnorm", model_loss)
        with pytest.raises(ValueError, match="ModelLoss"):
            fb.feedback_function("logit_grad_norm", lambda p, b: model_loss(p, b))
        with pytest.raises(TypeError, match="feedback"):
            fb.feedback_function(3, model_loss)

    def test_non_callable_loss_is_refused_when_the_function_is_built(self):
        with pytest.raises(TypeError, match="loss_fn must be callable"):
            fb.feedback_function("loss", 3)


class FeedbackObjectsTest(chex.TestCase):
    """Each kind is an object carrying its settings: how it is scored alone and estimated in
    the step; the names of FEEDBACK_KINDS are shorthand for the default objects."""

    def test_the_shorthand_names_are_the_default_objects(self):
        self.assertIsInstance(fb.FEEDBACK_KINDS, tuple)
        kinds = [fb.as_feedback(name) for name in fb.FEEDBACK_KINDS]
        self.assertEqual([kind.name for kind in kinds], list(fb.FEEDBACK_KINDS))
        self.assertEqual(
            kinds,
            [
                ab.feedback.GradNorm(),
                ab.feedback.LogitGradNorm(),
                ab.feedback.LossValue(),
                ab.feedback.PreconditionedGradNorm(),
            ],
        )
        self.assertIs(ab.feedback.FEEDBACK_KINDS, fb.FEEDBACK_KINDS)

    def test_grad_norm_carries_its_method_and_estimator(self):
        GradNorm = ab.feedback.GradNorm
        self.assertIs(GradNorm().estimator(), estimators.estimate_with_ghost_norms)
        self.assertIs(GradNorm("ghost").estimator(), estimators.estimate_with_forced_ghost_norms)
        self.assertIs(GradNorm("vmap").estimator(), estimators.estimate_with_vmap_norms)
        reuse = GradNorm(reuse_per_example_grads=True)
        self.assertIs(reuse.estimator(), estimators.estimate_with_per_example_grads)
        self.assertIs(
            GradNorm("vmap", reuse_per_example_grads=True).estimator(),
            estimators.estimate_with_per_example_grads,
        )
        self.assertTrue(GradNorm.per_example_evaluation)

    def test_grad_norm_refuses_what_it_cannot_do(self):
        with pytest.raises(ValueError, match="method must be one of"):
            ab.feedback.GradNorm("exact")
        with pytest.raises(TypeError, match="reuse_per_example_grads must be a bool"):
            ab.feedback.GradNorm(reuse_per_example_grads=1)
        with pytest.raises(ValueError, match='cannot be combined with method="ghost"'):
            ab.feedback.GradNorm("ghost", reuse_per_example_grads=True)

    def test_grad_norm_scores_with_its_method(self):
        _, params, batch, model_loss = _setup()
        by_vmap = ab.feedback.GradNorm("vmap").scores(model_loss, params, batch)
        by_ghost = ab.feedback.GradNorm("ghost").scores(model_loss, params, batch)
        np.testing.assert_allclose(by_ghost, by_vmap, rtol=1e-5)

    def test_the_other_kinds_have_their_estimators(self):
        self.assertTrue(ab.feedback.LogitGradNorm.needs_model_loss)
        self.assertIs(ab.feedback.LogitGradNorm().estimator(), estimators.estimate_with_logit_bound)
        self.assertIs(ab.feedback.LossValue().estimator(), estimators.estimate_with_loss)
        self.assertIs(
            ab.feedback.PreconditionedGradNorm().estimator(),
            estimators.estimate_with_preconditioned_norms,
        )

    def test_preconditioned_grad_norm_carries_the_optimizer_s_hyperparameters(self):
        PGN = ab.feedback.PreconditionedGradNorm
        feedback = PGN(b2=np.float32(0.95), eps=1e-8)
        self.assertEqual((feedback.b2, feedback.eps), (float(np.float32(0.95)), 1e-8))
        self.assertIsInstance(feedback.b2, float)
        self.assertEqual(feedback, PGN(b2=float(np.float32(0.95)), eps=1e-8))
        self.assertEqual(fb.as_feedback("preconditioned_grad_norm"), PGN())
        self.assertTrue(PGN.per_example_evaluation)
        # the estimator of the default object reads everything from an injected state
        self.assertIsNot(feedback.estimator(), estimators.estimate_with_preconditioned_norms)
        self.assertIsInstance(
            feedback.estimator_for(optax.adam(0.1, b2=0.95)), estimators.OptimizerAwareEstimator
        )
        with pytest.raises(
            ValueError, match=r"\(b2=0\.95, eps=1e-08\)"
        ):  # the fix: the optimizer's
            PGN().estimator_for(optax.adam(0.1, b2=0.95))

    def test_preconditioned_grad_norm_refuses_impossible_hyperparameters(self):
        PGN = ab.feedback.PreconditionedGradNorm
        with pytest.raises(ValueError, match="kind must be one of"):
            PGN(kind="adamax")
        with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
            PGN(b2=1.0)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            PGN(eps=-1e-8)
        with pytest.raises(ValueError, match="eps_root must be a finite number"):
            PGN(eps_root=float("nan"))
        with pytest.raises(TypeError, match="eps_in_sqrt must be a bool"):
            PGN(eps_in_sqrt=1)
        with pytest.raises(ValueError, match="b2 must be a number"):
            PGN(b2="0.9")
        with pytest.raises(ValueError, match="RMSProp has none"):
            PGN(kind="rmsprop", eps_root=1e-8)
        with pytest.raises(ValueError, match="eps_in_sqrt=True is RMSProp's"):
            PGN(kind="adam", eps_in_sqrt=True)

    def test_a_callable_is_a_kind_of_its_own(self):
        _, params, batch, model_loss = _setup()
        user = lambda p, b, losses: losses + 1.0
        kind = fb.as_feedback(user, model_loss)
        self.assertEqual(kind, ab.feedback.CustomFeedback(user))
        np.testing.assert_allclose(
            kind.scores(model_loss, params, batch), model_loss(params, batch) + 1.0, rtol=1e-6
        )
        estimate = kind.estimator()(model_loss, params, batch, jnp.ones(BATCH_SIZE), None)
        np.testing.assert_allclose(estimate.feedback, model_loss(params, batch) + 1.0, rtol=1e-6)

    def test_errors_name_the_argument(self):
        _, _, _, model_loss = _setup()
        with pytest.raises(ValueError, match="sampler.score_feedback must be one of"):
            fb.as_feedback("norm", model_loss, name="sampler.score_feedback")
        with pytest.raises(ValueError, match="score_feedback='logit_grad_norm' needs the model"):
            fb.as_feedback("logit_grad_norm", lambda p, b: 0, name="score_feedback")
        with pytest.raises(TypeError, match="feedback must be one of"):
            fb.as_feedback(3)
        with pytest.raises(TypeError, match="fn must be callable"):
            ab.feedback.CustomFeedback(3)

    def test_tree_norms_is_the_shared_helper(self):
        self.assertIs(fb.tree_norms, tree_utils.per_example_norms)


class LossInterfaceTest(chex.TestCase):
    def test_takes_key(self):
        self.assertFalse(takes_key(lambda params, batch: 0))
        self.assertTrue(takes_key(lambda params, batch, key: 0))
        self.assertTrue(takes_key(lambda params, batch, key=None: 0))
        model = object()
        self.assertFalse(takes_key(lambda params, batch, model=model: 0))  # a default, not a key
        self.assertTrue(takes_key(lambda *args: 0))
        self.assertFalse(takes_key(lambda params, batch, *, key=None: 0))
        _, _, _, model_loss = _setup()
        self.assertTrue(takes_key(model_loss))

    def test_with_key_argument_drops_the_key_when_unused(self):
        loss = with_key_argument(lambda params, batch: params * batch)
        self.assertEqual(loss(2, 3, jax.random.key(0)), 6)
        with pytest.raises(TypeError, match="loss_fn must be callable"):
            with_key_argument(3)

    def test_model_loss_passes_the_key_to_apply_fn_only_if_it_takes_one(self):
        seen = []
        with_key = ab.ModelLoss(lambda p, b, k: seen.append(k) or b, lambda z, b: z)
        without_key = ab.ModelLoss(lambda p, b: b, lambda z, b: 2 * z)
        key = jax.random.key(0)
        with_key(None, jnp.ones(2), key)
        self.assertIs(seen[0], key)
        np.testing.assert_allclose(without_key(None, jnp.ones(2), key), [2.0, 2.0])

    def test_check_losses(self):
        with pytest.raises(ValueError, match="do not take the mean"):
            check_losses(jnp.asarray(1.0), 3)
        with pytest.raises(TypeError, match="floating"):
            check_losses(jnp.arange(3), 3)
        check_losses(jnp.ones(3), 3)


def _adam_state_after_one_update(params):
    optimizer = optax.adam(0.1)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) + 0.1 * p, params)
    return optimizer.update(grads, optimizer.init(params), params)[1]


def _preconditioned_reference(grads_one_at_a_time, opt_state):
    """||g_k / (sqrt(nu / (1 - 0.999)) + 1e-8)|| in float64, g_k one example at a time."""
    nu = opt_state[0].nu
    norms = []
    for g in grads_one_at_a_time:
        scaled = jax.tree.map(
            lambda gk, v: (
                np.asarray(gk, np.float64)
                / (np.sqrt(np.asarray(v, np.float64) / (1 - 0.999)) + 1e-8)
            ),
            g,
            nu,
        )
        norms.append(_flat_norm(scaled))
    return np.asarray(norms)


def test_preconditioned_grad_norms_match_a_float64_reference():
    _, params, batch, model_loss = _setup()
    opt_state = _adam_state_after_one_update(params)
    expected = _preconditioned_reference(_one_at_a_time_grads(model_loss, params, batch), opt_state)
    got = ab.feedback.preconditioned_grad_norms(
        model_loss, params, batch, opt_state, optimizer=optax.adam(0.1), b2=0.999, eps=1e-8
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4)
    assert "preconditioned_grad_norm" in fb.FEEDBACK_KINDS


def test_the_preconditioned_estimator_reads_the_optimizer_state():
    _, params, batch, model_loss = _setup()
    opt_state = _adam_state_after_one_update(params)
    weights = jnp.linspace(0.5, 2.0, BATCH_SIZE)
    feedback = fb.as_feedback(ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8), model_loss)
    estimate = feedback.estimator_for(optax.adam(0.1))
    assert isinstance(estimate, estimators.OptimizerAwareEstimator)
    result = estimate(model_loss, params, batch, weights, None, opt_state=opt_state)
    losses, gradient = ab.importance_weighted_grad(model_loss, params, batch, weights)
    chex.assert_trees_all_close(result.gradient, gradient, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-6)
    np.testing.assert_allclose(
        result.feedback,
        ab.feedback.preconditioned_grad_norms(
            model_loss, params, batch, opt_state, b2=0.999, eps=1e-8, kind="adam"
        ),
        rtol=1e-6,
    )
    assert not result.per_example
    with pytest.raises(ValueError, match="opt_state"):
        estimate(model_loss, params, batch, weights, None)


def test_a_scoring_sampler_cannot_score_with_the_preconditioned_norm():
    _, params, batch, model_loss = _setup()
    score = fb.feedback_function("preconditioned_grad_norm", model_loss)
    with pytest.raises(ValueError, match="reads the optimizer state"):
        score(params, batch)
