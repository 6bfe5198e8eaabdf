"""Tests of adambs_jax.step_stages: each stage of the train step on its own."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.feedback import _estimators as estimators
from adambs_jax.feedback._estimators import Estimate
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.step import _stages as step_stages

NUM_EXAMPLES, BATCH_SIZE = 10, 4


def _loss(params, batch):
    return jnp.square(batch["x"] * params["w"] - batch["y"])


def _config(**changes):
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
    config = step_stages.StepConfig(
        loss_fn=_loss,
        optimizer=optax.sgd(1.0),
        sampler=sampler,
        estimate=estimators.estimate_with_loss,
        score_feedback="loss",
        probabilities=None,
        skip_non_finite=True,
        mesh=None,
        data_axis="data",
    )
    return config._replace(**changes)


def _state(config):
    return ab.TrainState.create(
        params={"w": jnp.asarray(2.0)}, optimizer=config.optimizer, sampler=config.sampler
    )


def _data():
    x = jnp.arange(NUM_EXAMPLES, dtype=jnp.float32)
    return {"x": x, "y": 3.0 * x}


def test_step_key_uses_the_given_key_or_advances_the_state_s():
    key = jax.random.key(1)
    state_key, step_key = step_stages.step_key(None, key)
    assert state_key is None and step_key is key
    own = jax.random.key(2)
    next_own, step_key = step_stages.step_key(own, None)
    expected_next, expected_step = jax.random.split(own)
    np.testing.assert_array_equal(jax.random.key_data(next_own), jax.random.key_data(expected_next))
    np.testing.assert_array_equal(jax.random.key_data(step_key), jax.random.key_data(expected_step))
    with pytest.raises(ValueError, match="key: pass a PRNG key to the step"):
        step_stages.step_key(None, None)
    with pytest.raises(ValueError, match="state.key must be a PRNG key"):
        step_stages.step_key(jnp.ones(3), None)


def test_draw_batch_gathers_the_drawn_rows_with_their_weights():
    config = _config()
    state = _state(config)
    draw = step_stages.draw_batch(config, state, _data(), jax.random.key(0), jax.random.key(1))
    indices, probs = config.sampler.sample(state.sampler_state, jax.random.key(0))
    np.testing.assert_array_equal(draw.indices, indices)
    np.testing.assert_allclose(draw.weights, 1.0 / (NUM_EXAMPLES * probs), rtol=1e-6)
    np.testing.assert_allclose(draw.batch["x"], _data()["x"][indices])
    assert draw.sampled_state is state.sampler_state  # a plain sampler's sample keeps it


def _estimate(value):
    return Estimate(
        losses=jnp.full((BATCH_SIZE,), value),
        gradient={"w": jnp.asarray(value)},
        feedback=jnp.full((BATCH_SIZE,), 1.0),
        per_example=False,
    )


@pytest.mark.parametrize("skip_non_finite", [True, False])
def test_guarded_apply_applies_a_finite_update(skip_non_finite):
    config = _config(skip_non_finite=skip_non_finite)
    state = _state(config)
    draw = step_stages.draw_batch(config, state, _data(), jax.random.key(0), None)
    applied = step_stages.guarded_apply(config, state, draw, _estimate(0.5))
    np.testing.assert_allclose(applied.params["w"], 2.0 - 0.5)  # sgd(1.0)
    assert int(applied.skipped) == 0
    assert int(applied.sampler_state.step) == 1
    assert applied.scores.dtype == jnp.float32


def test_guarded_apply_skips_a_non_finite_update_only_when_asked():
    config = _config()
    state = _state(config)
    draw = step_stages.draw_batch(config, state, _data(), jax.random.key(0), None)
    skipped = step_stages.guarded_apply(config, state, draw, _estimate(jnp.nan))
    np.testing.assert_allclose(skipped.params["w"], 2.0)
    assert int(skipped.skipped) == 1
    assert int(skipped.sampler_state.step) == 0
    np.testing.assert_array_equal(skipped.sampler_state.tree, state.sampler_state.tree)
    forced = step_stages.guarded_apply(
        config._replace(skip_non_finite=False), state, draw, _estimate(jnp.nan)
    )
    assert np.isnan(forced.params["w"]) and int(forced.skipped) == 0
    assert int(forced.sampler_state.step) == 1


def test_guarded_apply_refuses_feedback_of_the_wrong_shape():
    config = _config()
    state = _state(config)
    draw = step_stages.draw_batch(config, state, _data(), jax.random.key(0), None)
    bad = _estimate(0.5)._replace(feedback=jnp.ones(BATCH_SIZE + 1))
    with pytest.raises(ValueError, match="feedback must give one score per example"):
        step_stages.guarded_apply(config, state, draw, bad)


def test_next_state_counts_steps_and_skips():
    config = _config()
    state = _state(config)
    applied = step_stages.Applied(
        params={"w": jnp.asarray(1.0)},
        opt_state=state.opt_state,
        sampler_state=state.sampler_state,
        scores=jnp.ones(BATCH_SIZE),
        skipped=jnp.asarray(1, jnp.int32),
    )
    new, metrics = step_stages.next_state(state, applied, None, {})
    assert int(new.step) == 1 and int(new.skipped_steps) == 1
    assert int(metrics["skipped"]) == 1 and int(metrics["skipped_steps"]) == 1
    _, metrics = step_stages.next_state(state._replace(skipped_steps=None), applied, None, {})
    assert "skipped_steps" not in metrics


def test_step_metrics_report_the_sampler_s_own_metrics():
    config = _config()
    state = _state(config)
    weights = jnp.ones(BATCH_SIZE)
    metrics = step_stages.step_metrics(
        _estimate(0.5),
        weights,
        jnp.asarray([1.0, jnp.nan, -1.0, 2.0]),
        state.sampler_state,
        None,
        config.sampler.metrics,
    )
    assert int(metrics["num_dropped_feedback"]) == 2
    np.testing.assert_allclose(metrics["mean_feedback"], 1.5)
    assert "grad_norm_bound" in metrics and "max_prob" not in metrics
    uniform_state = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE).init()
    metrics = step_stages.step_metrics(
        _estimate(0.5),
        weights,
        jnp.ones(BATCH_SIZE),
        uniform_state,
        lambda state: jnp.full((NUM_EXAMPLES,), 1.0 / NUM_EXAMPLES),
    )
    assert "grad_norm_bound" not in metrics
    np.testing.assert_allclose(metrics["effective_sample_size"], 1.0, rtol=1e-6)


def _primitives(jaxpr):
    """Names of every primitive in ``jaxpr`` and its sub-jaxprs (scan bodies, pjit, ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


_SAMPLERS = {
    "exp3": lambda: ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10),
    "uniform": lambda: ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE),
    "priority": lambda: ab.priority_sampler(NUM_EXAMPLES, BATCH_SIZE),
    "infobatch": lambda: ab.infobatch_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10),
}


@pytest.mark.parametrize(
    "sampler_name, feedback",
    [
        ("exp3", "grad_norm"),
        ("uniform", "grad_norm"),
        ("priority", ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8)),
        ("infobatch", "loss"),
    ],
)
@pytest.mark.parametrize("skip_non_finite", [True, False])
def test_the_step_has_no_while_loop_or_cond(sampler_name, feedback, skip_non_finite):
    # a data-dependent branch makes XLA:GPU copy its predicate to the host
    sampler = _SAMPLERS[sampler_name]()
    step = ab.make_train_step(
        _loss,
        optax.adam(0.1),
        sampler,
        feedback=feedback,
        skip_non_finite=skip_non_finite,
        jit=False,
    )
    state = step.init({"w": jnp.asarray(2.0)})
    primitives = _primitives(jax.make_jaxpr(step.step_fn)(state, _data(), jax.random.key(0)).jaxpr)
    # the walk sees the sampler: its tree write (the updates no longer sort)
    assert "scatter" in primitives or sampler_name == "uniform"
    assert not primitives & {"while", "cond"}, primitives & {"while", "cond"}


def test_a_sampler_without_apply_is_selected():
    base = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)

    def old_update(state, indices, feedback):  # the contract before ``apply``
        return base.update(state, indices, feedback)

    config = _config(sampler=base._replace(update=old_update))
    state = _state(config)
    draw = step_stages.draw_batch(config, state, _data(), jax.random.key(0), None)
    assert (
        int(step_stages.guarded_apply(config, state, draw, _estimate(jnp.nan)).sampler_state.step)
        == 0
    )
    assert (
        int(step_stages.guarded_apply(config, state, draw, _estimate(0.5)).sampler_state.step) == 1
    )


_TREE_SAMPLERS = {
    "exp3": lambda n: ab.exp3_sampler(n, 128, num_steps=10),
    "priority": lambda n: ab.priority_sampler(n, 128),  # the adaptive mix reads the tree too
    "priority_fixed_mix": lambda n: ab.priority_sampler(n, 128, uniform_mix=0.1),
    "infobatch": lambda n: ab.samplers.infobatch_sampler(n, 128, num_steps=1000),
}


@pytest.mark.parametrize(
    "name, skip_non_finite, steps_per_call",
    [
        ("exp3", True, 1),
        ("exp3", False, 1),
        ("priority", True, 1),
        ("priority", False, 4),
        ("priority_fixed_mix", True, 1),
        ("infobatch", False, 1),
    ],
)
def test_the_compiled_step_does_not_copy_the_tree(name, skip_non_finite, steps_per_call):
    # every read of the tree must be scheduled before its in-place write; otherwise XLA
    # copies the O(n) tree every step (docs/performance.md, "Non-finite guard")
    n = 100_000
    sampler = _TREE_SAMPLERS[name](n)
    step = ab.make_train_step(
        _loss,
        optax.adam(0.1),
        sampler,
        feedback="loss",
        diagnostics=False,
        skip_non_finite=skip_non_finite,
        steps_per_call=steps_per_call,
    )
    state = step.init({"w": jnp.asarray(2.0)})
    data = {"x": jnp.ones((n,)), "y": jnp.ones((n,))}
    hlo = step.lower(state, data, jax.random.key(0)).compile().as_text()
    tree_size = state.sampler_state.tree.shape[0]
    assert f"f32[{tree_size}]" in hlo
    assert not re.search(rf"f32\[{tree_size}\]\S* copy\(", hlo)


def test_the_preconditioned_feedback_gets_the_step_s_optimizer_state():
    # the sampler learns ||g_k / (sqrt(v_hat) + eps)|| with v_hat of the state the step sees
    sampler = ab.priority_sampler(NUM_EXAMPLES, BATCH_SIZE, alpha=1.0, eps=1e-6)
    feedback = ab.feedback.PreconditionedGradNorm(b2=0.999, eps=1e-8)  # optax.adam's
    step = ab.make_train_step(_loss, optax.adam(0.1), sampler, feedback=feedback, jit=False)
    state, _ = step(step.init({"w": jnp.asarray(2.0)}), _data(), jax.random.key(1))
    key = jax.random.key(2)
    indices, _ = sampler.sample(state.sampler_state, jax.random.split(key, 3)[0])
    batch = jax.tree.map(lambda leaf: leaf[indices], _data())
    expected = ab.feedback.preconditioned_grad_norms(
        _loss, state.params, batch, state.opt_state, optimizer=optax.adam(0.1), b2=0.999, eps=1e-8
    )
    new_state, _ = step(state, _data(), key)
    priorities = sampler.probabilities(new_state.sampler_state)  # p ~ u = f + eps
    tree = new_state.sampler_state.tree
    leaves = sumtree.leaf_values(
        tree, sumtree.layout_for(NUM_EXAMPLES, new_state.sampler_state.arity)
    )
    np.testing.assert_allclose(leaves[indices], expected + 1e-6, rtol=1e-5)
    assert float(priorities.sum()) == pytest.approx(1.0, rel=1e-5)


def test_the_preconditioned_feedback_refuses_sgd_when_traced():
    step = ab.make_train_step(
        _loss,
        optax.sgd(0.1),
        ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE),
        feedback="preconditioned_grad_norm",
    )
    with pytest.raises(ValueError, match="second-moment"):
        step(step.init({"w": jnp.asarray(2.0)}), _data(), jax.random.key(0))
