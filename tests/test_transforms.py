"""Tests of adambs_jax.transforms: the importance-weighted mean and the optimizers built on it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import adambs_jax as ab

NUM_EXAMPLES = 8
NUM_FEATURES = 3


def _problem():
    """A tiny least-squares problem: per-example loss (x_j . w + b - y_j)^2."""
    kx, ky, kw = jax.random.split(jax.random.key(0), 3)
    data = {
        "x": jax.random.normal(kx, (NUM_EXAMPLES, NUM_FEATURES)),
        "y": jax.random.normal(ky, (NUM_EXAMPLES,)),
    }
    params = {"w": jax.random.normal(kw, (NUM_FEATURES,)), "b": jnp.asarray(0.5)}

    def loss_fn(params, batch):
        return jnp.square(batch["x"] @ params["w"] + params["b"] - batch["y"])

    return params, data, loss_fn


def _per_example_grads(batch_size=5, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    grads = {
        "w": jax.random.normal(k1, (batch_size, 4, 2)),
        "b": jax.random.normal(k2, (batch_size,)),
    }
    weights = jnp.linspace(0.5, 2.0, batch_size)
    return grads, weights


def _assert_matches_on_g_hat(tx, reference, params, num_steps=4):
    """``tx`` == ``reference`` on the averaged gradients G_hat of several batches."""
    state, reference_state = tx.init(params), reference.init(params)
    for seed in range(num_steps):
        g_hat = ab.transforms.weighted_mean(*_per_example_grads(seed=seed))
        updates, state = tx.update(g_hat, state, params)
        expected, reference_state = reference.update(g_hat, reference_state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)


class WeightedMeanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        grads, weights = _per_example_grads()
        mean = self.variant(ab.transforms.weighted_mean)(grads, weights)
        for name in grads:
            expected = np.tensordot(np.asarray(weights), np.asarray(grads[name]), axes=1) / 5
            np.testing.assert_allclose(mean[name], expected, rtol=1e-6, atol=1e-6)
            self.assertEqual(mean[name].shape, grads[name].shape[1:])

    @chex.variants(with_jit=True, without_jit=True)
    def test_unit_weights_give_the_plain_mean(self):
        grads, _ = _per_example_grads()
        mean = self.variant(ab.transforms.weighted_mean)(grads, jnp.ones(5))
        chex.assert_trees_all_close(
            mean, jax.tree.map(lambda g: g.mean(0), grads), rtol=1e-6, atol=1e-6
        )

    def test_keeps_leaf_dtype(self):
        grads = {"w": jnp.ones((3, 2), jnp.bfloat16)}
        mean = ab.transforms.weighted_mean(grads, jnp.asarray([1.0, 2.0, 3.0]))
        self.assertEqual(mean["w"].dtype, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(mean["w"], np.float32), 2.0)

    def test_missing_weights_is_a_type_error(self):
        grads, _ = _per_example_grads()
        with pytest.raises(TypeError, match="importance_weights"):
            ab.transforms.weighted_mean(grads, None)

    def test_weights_of_wrong_rank_are_rejected(self):
        grads, weights = _per_example_grads()
        with pytest.raises(ValueError, match=r"weights must have shape \(K,\)"):
            ab.transforms.weighted_mean(grads, weights[:, None])

    def test_weights_of_wrong_length_are_rejected(self):
        grads, weights = _per_example_grads()
        with pytest.raises(ValueError, match=r"leading axis K=4 .*\['b'\]"):
            ab.transforms.weighted_mean(grads, weights[:4])

    def test_updates_without_batch_axis_are_rejected(self):
        with pytest.raises(ValueError, match="per-example"):
            ab.transforms.weighted_mean({"b": jnp.asarray(1.0)}, jnp.ones(1))


class ChainTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_composes_in_chain_and_passes_extra_args_through(self):
        params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(())}
        g_hat = ab.transforms.weighted_mean(*_per_example_grads())
        seen = {}

        def record_extra_args():  # a later stage with its own extra argument
            def update(updates, state, params=None, *, scale, **extra):
                seen["extra"] = sorted(extra)
                return jax.tree.map(lambda u: scale * u, updates), state

            return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

        tx = optax.chain(
            ab.transforms.importance_weighted_mean(), optax.scale(2.0), record_extra_args()
        )
        state = tx.init(params)
        update = self.variant(lambda g, s: tx.update(g, s, params, scale=-1.0, other="x"))
        out, new_state = update(g_hat, state)
        chex.assert_trees_all_close(
            out, jax.tree.map(lambda m: -2.0 * m, g_hat), rtol=1e-6, atol=1e-6
        )
        self.assertEqual(seen["extra"], ["other"])
        self.assertIsInstance(new_state[0], optax.EmptyState)

    def test_adambs_is_adam_on_g_hat(self):
        params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(())}
        tx, reference = ab.adambs(1e-2, b1=0.8, b2=0.99), optax.adam(1e-2, b1=0.8, b2=0.99)
        _assert_matches_on_g_hat(tx, reference, params)

    def test_adambs_accepts_a_schedule(self):
        params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(())}
        schedule = optax.linear_schedule(1e-1, 1e-3, transition_steps=3)
        tx = ab.adambs(schedule)
        reference = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))
        state, reference_state = tx.init(params), reference.init(params)
        step = jax.jit(lambda g, s: tx.update(g, s, params))
        magnitudes = []
        for seed in range(5):
            g_hat = ab.transforms.weighted_mean(*_per_example_grads(seed=seed))
            updates, state = step(g_hat, state)
            expected, reference_state = reference.update(g_hat, reference_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
            magnitudes.append(float(jnp.abs(updates["b"])))
        # the first Adam step has |m_hat / sqrt(v_hat)| = 1, so |update| = lr(0) exactly
        np.testing.assert_allclose(magnitudes[0], 1e-1, rtol=1e-4)

    @parameterized.named_parameters(
        ("sgd", lambda: optax.sgd(0.1)),
        ("momentum", lambda: optax.sgd(0.1, momentum=0.9)),
        ("rmsprop", lambda: optax.rmsprop(0.01)),
        ("adamw", lambda: optax.adamw(0.01, weight_decay=0.1)),  # uses params
        ("amsgrad", lambda: optax.amsgrad(0.01)),
    )
    def test_with_importance_weighting_is_the_optimizer_on_g_hat(self, make_optimizer):
        params = {"w": jnp.full((4, 2), 0.3), "b": jnp.asarray(-1.0)}
        tx, reference = ab.with_importance_weighting(make_optimizer()), make_optimizer()
        self.assertIsInstance(tx, ab.transforms.ImportanceWeightedTransformation)
        state, reference_state = tx.init(params), reference.init(params)
        for seed in range(3):
            g_hat = ab.transforms.weighted_mean(*_per_example_grads(seed=seed))
            updates, state = tx.update(g_hat, state, params)
            expected, reference_state = reference.update(g_hat, reference_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)
            params = optax.apply_updates(params, updates)

    def test_amsgradbs_is_amsgrad_on_g_hat(self):
        params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(())}
        tx, reference = ab.amsgradbs(1e-2), optax.amsgrad(1e-2)
        _assert_matches_on_g_hat(tx, reference, params)

    def test_with_importance_weighting_rejects_bad_optimizers(self):
        with pytest.raises(TypeError, match="optimizer"):
            ab.with_importance_weighting(lambda g: g)
        with pytest.raises(ValueError, match="already importance-weighted"):
            ab.with_importance_weighting(ab.adambs(1e-3))


class UnbiasednessTest(chex.TestCase):
    """E_p[G_hat] = G (AdamBS eq. 1), checked by Monte Carlo with a derived tolerance.

    One draw of the estimator with K i.i.d. indices is G_hat = (1/K) sum_k X_k with
    X = g_J / (n p_J), J ~ p. Per coordinate, E[X] = G and
        Var[X] = sum_j p_j (g_j / (n p_j))^2 - G^2,   Var[G_hat] = Var[X] / K,
    so the mean of D independent draws has standard deviation sqrt(Var[X] / (K D)); the
    test asserts |mean - G| <= 5 of those (a false alarm has probability ~6e-7 per
    coordinate) plus 1e-6 for float32 rounding.
    """

    NUM_DRAWS = 20_000
    BATCH_SIZE = 4

    def _setup(self):
        params, data, loss_fn = _problem()
        _, per_example = ab.feedback.per_example_losses_and_grads(loss_fn, params, data)
        full_gradient = jax.grad(lambda p: loss_fn(p, data).mean())(params)
        p = jnp.asarray([0.30, 0.02, 0.05, 0.20, 0.08, 0.15, 0.12, 0.08])
        chex.assert_trees_all_close(jnp.sum(p), 1.0, atol=1e-6)
        return per_example, full_gradient, p

    def _draws(self, per_example, p, weighted):
        def one_draw(key):
            indices = jax.random.choice(key, NUM_EXAMPLES, (self.BATCH_SIZE,), p=p)
            weights = ab.importance_weights(p[indices], NUM_EXAMPLES)
            if not weighted:
                weights = jnp.ones_like(weights)
            batch_grads = jax.tree.map(lambda g: g[indices], per_example)
            return ab.transforms.weighted_mean(batch_grads, weights)

        keys = jax.random.split(jax.random.key(42), self.NUM_DRAWS)
        return jax.jit(jax.vmap(one_draw))(keys)

    def _tolerance(self, per_example, full_gradient, p):
        def std_of_mean(g, mean):
            g = np.asarray(g, np.float64)
            q = np.asarray(p, np.float64).reshape((-1,) + (1,) * (g.ndim - 1))
            second_moment = np.sum(q * np.square(g / (NUM_EXAMPLES * q)), axis=0)
            variance = np.maximum(second_moment - np.square(np.asarray(mean, np.float64)), 0)
            return np.sqrt(variance / (self.BATCH_SIZE * self.NUM_DRAWS))

        return jax.tree.map(std_of_mean, per_example, full_gradient)

    def test_reweighted_estimate_is_unbiased(self):
        per_example, full_gradient, p = self._setup()
        draws = self._draws(per_example, p, weighted=True)
        std = self._tolerance(per_example, full_gradient, p)
        for name in full_gradient:
            mean = np.asarray(draws[name], np.float64).mean(axis=0)
            error = np.abs(mean - np.asarray(full_gradient[name]))
            bound = 5 * std[name] + 1e-6
            self.assertTrue(np.all(error <= bound), f"{name}: error {error} > bound {bound}")

    def test_the_check_detects_the_bias_of_unweighted_sampling(self):
        # without the 1/(n p) weights the mean is sum_j p_j g_j != G: the same tolerance
        # must reject it, or the test above would prove nothing
        per_example, full_gradient, p = self._setup()
        draws = self._draws(per_example, p, weighted=False)
        std = self._tolerance(per_example, full_gradient, p)
        rejected = []
        for name in full_gradient:
            mean = np.asarray(draws[name], np.float64).mean(axis=0)
            error = np.abs(mean - np.asarray(full_gradient[name]))
            rejected.append(np.any(error > 5 * std[name] + 1e-6))
        self.assertTrue(any(rejected))


def test_docstring_examples_run():
    import doctest

    from adambs_jax import transforms

    results = doctest.testmod(transforms, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0, results


def _hand_loop():
    """The user's side of the problem: params, the per-example stack, its weights and G_hat.

    The gradients are large (norm ~500 for G_hat), so a clip at 1.0 always acts."""
    params, data, loss_fn = _problem()
    weights = jnp.linspace(0.5, 1.5, NUM_EXAMPLES)
    big_loss = ab.Loss(lambda p, b: 100.0 * loss_fn(p, b))
    losses, g_hat = ab.importance_weighted_grad(big_loss, params, data, weights)
    _, stack = ab.feedback.per_example_losses_and_grads(big_loss, params, data)
    chex.assert_trees_all_close(g_hat, ab.transforms.weighted_mean(stack, weights), rtol=1e-5)
    assert losses.shape == (NUM_EXAMPLES,)
    assert float(optax.tree.norm(g_hat)) > 10.0
    return params, stack, weights, g_hat


# what every refusal must name: the two ways to compute G_hat and the call that takes it
_FIX_TEXT = (
    r"importance_weighted_grad.*weighted_mean\(per_example_grads, weights\).*tx\.update\(g_hat"
)
_FIX = "(?s)" + _FIX_TEXT

# the cases that went wrong: a stage before the averaging, a wrapper around it, no wrapper
_WRAPS = {
    "clip_before": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    "masked_bias_out": lambda tx: optax.masked(tx, {"w": True, "b": False}),
    "masked_weights_out": lambda tx: optax.masked(tx, {"w": False, "b": True}),
    "multi_steps": lambda tx: optax.MultiSteps(tx, 2).gradient_transformation(),
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, 3),
    "schedule_free": lambda tx: optax.contrib.schedule_free(tx, 0.1),
    "unwrapped": lambda tx: tx,
}
_OURS_AND_THEIRS = {
    "adambs": (lambda: ab.adambs(0.1), lambda: optax.adam(0.1)),
    "amsgradbs": (lambda: ab.amsgradbs(0.1), lambda: optax.amsgrad(0.1)),
    "sgd": (
        lambda: ab.with_importance_weighting(optax.sgd(1.0, momentum=0.5)),
        lambda: optax.sgd(1.0, momentum=0.5),
    ),
}
_CASES = [(f"{wrap}_{opt}", wrap, opt) for wrap in _WRAPS for opt in _OURS_AND_THEIRS]


class StackRefusedTest(parameterized.TestCase):
    """A per-example stack never enters an optimizer (the regression "a chained per-example stack
    is processed silently as a gradient"): with ``weights=`` or without, under any wrapper, it
    is refused with a message that says how to compute G_hat."""

    def test_a_clip_before_with_importance_weighting_refuses_the_stack(self):
        # before: the clip clipped the stack; the update's norm was 0.354 there (0.19 here),
        # not the clip's 1
        params, stack, weights, _ = _hand_loop()
        tx = optax.chain(
            optax.clip_by_global_norm(1.0), ab.with_importance_weighting(optax.sgd(1.0))
        )
        with pytest.raises(TypeError, match=r"(?s)clip_by_global_norm.*as if it were a gradient"):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(TypeError, match=_FIX):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(ValueError, match=_FIX):
            tx.update(stack, tx.init(params), params)

    def test_a_clip_before_adambs_refuses_the_stack(self):
        # before: chain(clip, adambs) on the stack was 16-45% off chain(clip, adam) on G_hat
        params, stack, weights, _ = _hand_loop()
        tx = optax.chain(optax.clip_by_global_norm(1.0), ab.adambs(0.1))
        with pytest.raises(TypeError, match=_FIX):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(8,\)"):
            tx.update(stack, tx.init(params), params)

    def test_masked_adambs_refuses_the_stack(self):
        # before: the masked-out bias came back as its stack and apply_updates made it (K,)
        params, stack, weights, _ = _hand_loop()
        tx = optax.masked(ab.adambs(0.1), {"w": True, "b": False})
        with pytest.raises(TypeError, match=_FIX):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(ValueError, match=r"(?s)leaf \['w'\] has shape \(8, 3\).*" + _FIX_TEXT):
            tx.update(stack, tx.init(params), params)

    def test_adambs_refuses_the_stack_with_weights(self):
        params, stack, weights, _ = _hand_loop()
        tx = ab.adambs(0.1)
        with pytest.raises(TypeError, match=_FIX):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(TypeError, match=_FIX):  # under jit too (shapes are static)
            jax.jit(lambda g, s, w: tx.update(g, s, params, weights=w))(
                stack, tx.init(params), weights
            )

    def test_weights_are_refused_even_with_g_hat(self):
        params, _, weights, g_hat = _hand_loop()
        tx = ab.transforms.importance_weighted_mean()
        with pytest.raises(TypeError, match=_FIX):
            tx.update(g_hat, tx.init(params), params, weights=weights)

    def test_an_update_without_params_is_refused(self):
        params, _, _, g_hat = _hand_loop()
        tx = ab.adambs(0.1)
        with pytest.raises(TypeError, match=r"(?s)params: required.*" + _FIX_TEXT):
            tx.update(g_hat, tx.init(params))

    def test_a_stack_of_another_structure_is_refused(self):
        params, _, _, g_hat = _hand_loop()
        tx = ab.adambs(0.1)
        with pytest.raises(ValueError, match="structure of params"):
            tx.update({"w": g_hat["w"]}, tx.init(params), params)

    @parameterized.named_parameters(*_CASES)
    def test_every_wrapper_refuses_the_stack(self, wrap, opt):
        params, stack, weights, _ = _hand_loop()
        tx = _WRAPS[wrap](_OURS_AND_THEIRS[opt][0]())
        with pytest.raises(TypeError, match=_FIX):
            tx.update(stack, tx.init(params), params, weights=weights)
        with pytest.raises(ValueError, match=_FIX):
            tx.update(stack, tx.init(params), params)


class AveragedGradientPathTest(parameterized.TestCase):
    """The importance weights enter the loss (``importance_weighted_grad``) or the stack is
    averaged first (``weighted_mean``), so every optax wrapper around these transforms sees the
    averaged gradient G_hat and they equal plain optax on it."""

    def test_a_clip_before_the_weighting_clips_g_hat(self):
        # the first case done right: the update's norm is the clip's 1.0
        params, stack, weights, g_hat = _hand_loop()
        tx = optax.chain(
            optax.clip_by_global_norm(1.0), ab.with_importance_weighting(optax.sgd(1.0))
        )
        for gradient in (g_hat, ab.transforms.weighted_mean(stack, weights)):
            updates, _ = tx.update(gradient, tx.init(params), params)
            np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)

    def test_masked_adambs_keeps_a_masked_out_scalar_s_shape(self):
        params, _, _, g_hat = _hand_loop()
        tx = optax.masked(ab.adambs(0.1), {"w": True, "b": False})
        updates, _ = tx.update(g_hat, tx.init(params), params)
        self.assertEqual(updates["b"].shape, ())
        self.assertEqual(updates["w"].shape, (NUM_FEATURES,))
        chex.assert_trees_all_equal_shapes(optax.apply_updates(params, updates), params)

    @parameterized.named_parameters(*_CASES)
    def test_wrapped_equals_wrapped_optax_on_g_hat(self, wrap, opt):
        params, _, _, g_hat = _hand_loop()
        make_ours, make_theirs = _OURS_AND_THEIRS[opt]
        ours, theirs = _WRAPS[wrap](make_ours()), _WRAPS[wrap](make_theirs())
        state, their_state = ours.init(params), theirs.init(params)
        # G_hat's norm changes across steps, so a clip acts differently in each
        for scale in (1.0, 1e-3, 0.3, 1.5e-3):
            gradient = {name: scale * g for name, g in g_hat.items()}
            got, state = ours.update(gradient, state, params)
            want, their_state = theirs.update(gradient, their_state, params)
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

    def test_inject_hyperparams_adambs_equals_inject_hyperparams_adam(self):
        params, _, _, g_hat = _hand_loop()
        ours = optax.inject_hyperparams(ab.adambs)(learning_rate=0.1)
        theirs = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
        got, _ = jax.jit(ours.update)(g_hat, ours.init(params), params)
        want, _ = theirs.update(g_hat, theirs.init(params), params)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
        _, stack, weights, _ = _hand_loop()
        with pytest.raises(TypeError, match=_FIX):
            ours.update(stack, ours.init(params), params, weights=weights)
