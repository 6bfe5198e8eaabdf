"""Tests of adambs_jax.train_state: the TrainState pytree and the TrainStep that
make_train_step returns (the optimizer and sampler given once, ``step.init(params)``)."""

import copy
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _sumtree as sumtree
from adambs_jax.step._state import TrainStep

NUM_EXAMPLES, BATCH_SIZE = 12, 4


def _loss(params, batch):
    return jnp.square(batch["x"] @ params["w"] - batch["y"])


def _problem():
    x = jnp.linspace(-1.0, 1.0, 2 * NUM_EXAMPLES).reshape(NUM_EXAMPLES, 2)
    return {"w": jnp.ones(2)}, {"x": x, "y": x[:, 0]}


def _step(**options):
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, num_steps=10)
    return ab.make_train_step(_loss, optax.adam(0.1), sampler, feedback="loss", **options)


def test_make_train_step_returns_a_train_step_holding_optimizer_and_sampler():
    optimizer = optax.sgd(0.1)
    sampler = ab.uniform_sampler(NUM_EXAMPLES, BATCH_SIZE)
    step = ab.make_train_step(_loss, optimizer, sampler, feedback="loss")
    assert isinstance(step, TrainStep) and ab.step.TrainStep is TrainStep
    assert step.optimizer is optimizer and step.sampler is sampler


def test_init_is_train_state_create_with_the_step_s_optimizer_and_sampler():
    params, _ = _problem()
    step = _step()
    state = step.init(params, key=jax.random.key(3))
    expected = ab.TrainState.create(
        params=params, optimizer=step.optimizer, sampler=step.sampler, key=jax.random.key(3)
    )
    assert isinstance(state, ab.TrainState)
    chex.assert_trees_all_equal(_comparable(state), _comparable(expected))
    assert step.init(params).key is None
    assert state.params["w"] is not params["w"]  # copied: the step donates its state


def _comparable(state):
    return state._replace(key=None if state.key is None else jax.random.key_data(state.key))


def test_init_validates_like_create():
    params, _ = _problem()
    with pytest.raises(ValueError, match="key"):
        _step().init(params, key=jnp.ones(2))
    with pytest.raises(TypeError):
        _step().init(params, jax.random.key(0))  # key is keyword-only


def test_a_state_from_init_trains_like_one_from_create():
    params, data = _problem()
    step = _step()
    from_init = step.init(params)
    from_create = ab.TrainState.create(
        params=params, optimizer=optax.adam(0.1), sampler=step.sampler
    )
    for t in range(3):
        from_init, _ = step(from_init, data, jax.random.key(t))
        from_create, _ = step(from_create, data, key=jax.random.key(t))
    np.testing.assert_allclose(from_init.params["w"], from_create.params["w"], rtol=1e-6)
    assert int(from_init.step) == 3


def test_the_jitted_step_keeps_the_jit_api():
    params, data = _problem()
    step = _step()
    state = step.init(params)
    compiled = step.lower(state, data, jax.random.key(0)).compile()
    state, metrics = compiled(state, data, jax.random.key(0))
    assert int(state.step) == 1 and np.isfinite(metrics["loss"])
    assert step.__name__ == "step"


def test_the_pure_step_composes_in_a_user_jit_under_its_own_name():
    params, data = _problem()
    pure = _step(jit=False)
    assert not hasattr(pure.step_fn, "lower")
    lowered = jax.jit(pure).lower(pure.init(params), data, jax.random.key(0))
    assert lowered.as_text().startswith("module @jit_step")


def test_copy_and_pickle_see_a_plain_object():
    step = _step(jit=False)
    assert copy.copy(step) == step
    with pytest.raises(AttributeError):
        step.__no_such_dunder__  # noqa: B018
    with pytest.raises(AttributeError):
        step.no_such_attribute  # noqa: B018
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(step)  # closures are not picklable; the error must not be a recursion


def _drifting_step(**options):
    # eta0 = 5 >= 1: each update may shrink the root by (n - K) p_min, M is a few steps
    sampler = ab.exp3_sampler(NUM_EXAMPLES, BATCH_SIZE, step_size=5.0, p_min=1e-3)
    return ab.make_train_step(_loss, optax.adam(0.1), sampler, feedback="loss", **options)


def _assert_sampler_state_is_sound(sampler_state):
    layout = exp3.tree_layout(sampler_state.num_examples, sampler_state.arity)
    leaves = np.asarray(sumtree.leaf_values(sampler_state.tree, layout))
    assert np.all(np.isfinite(leaves)) and leaves.min() >= 2.0**-100
    p = np.asarray(ab.samplers.probabilities(sampler_state), np.float64)
    assert p.min() > 0 and abs(p.sum() - 1) < 1e-5


@pytest.mark.parametrize("steps_per_call", [1, 1000])
def test_the_step_renormalizes_every_m_steps_without_a_sync(steps_per_call):
    params, data = _problem()
    step = _drifting_step(steps_per_call=steps_per_call)
    every = step.sampler.renormalize_every
    assert every is not None and every < 50
    state = step.init(params, key=jax.random.key(0))
    num_calls = 10**4 // steps_per_call
    for _ in range(num_calls):
        state, _ = step(state, data)
    assert int(state.step) == 10**4
    assert int(state.sampler_state.num_rescales) >= 10**4 // every - 1
    _assert_sampler_state_is_sound(state.sampler_state)


def test_a_pure_step_leaves_renormalization_to_the_caller():
    params, data = _problem()
    step = _drifting_step(jit=False)
    assert step.renormalize is None
    state = step.init(params)
    state, _ = jax.jit(step)(state, data, jax.random.key(0))
    assert int(state.sampler_state.num_rescales) == 0


def test_a_donated_state_stepped_again_is_named():
    """Reusing a state whose buffers the jitted step donated gets an error that
    says what happened and what to do, not XLA's buffer error."""
    import optax

    import adambs_jax as ab

    data = {"x": jnp.ones((8, 2)), "y": jnp.zeros((8,))}
    step = ab.make_train_step(
        lambda p, b: jnp.square(b["x"] @ p["w"] - b["y"]),
        optax.sgd(0.1),
        ab.uniform_sampler(8, 4),
        feedback="loss",
    )
    state = step.init({"w": jnp.ones((2,))})
    new_state, _ = step(state, data, jax.random.key(0))
    with pytest.raises(ValueError, match="state: its arrays were donated to an earlier step"):
        step(state, data, jax.random.key(1))
    step(new_state, data, jax.random.key(1))  # the returned state is fine


def test_integer_params_are_named():
    import optax

    import adambs_jax as ab

    data = {"x": jnp.ones((8, 2)), "y": jnp.zeros((8,))}
    step = ab.make_train_step(
        lambda p, b: jnp.square(b["x"] @ p["w"] - b["y"]),
        optax.sgd(0.1),
        ab.uniform_sampler(8, 4),
        feedback="loss",
    )
    state = step.init({"w": jnp.ones((2,)), "count": jnp.zeros((), jnp.int32)})
    with pytest.raises(TypeError, match=r"state.params: leaf \['count'\] has dtype int32"):
        step(state, data, jax.random.key(0))


def _restart_run(num_processes, steps_per_process, restore):
    """Trains an exp3 step (M = 27) in ``num_processes`` processes of ``steps_per_process``
    steps, each with a new step object and the state handed over by ``restore``."""
    n, k = 1000, 32
    sampler = ab.exp3_sampler(n, k, step_size=2.0)
    loss = lambda params, batch: jnp.sum((batch["x"] - params) ** 2, axis=1)  # noqa: E731
    data = {"x": jax.random.normal(jax.random.key(0), (n, 2))}
    feedback = lambda params, batch, losses: losses  # noqa: E731
    state, t = None, 0
    for _ in range(num_processes):
        step = ab.make_train_step(loss, optax.sgd(0.01), sampler, feedback=feedback)
        state = step.init(jnp.zeros(2)) if state is None else restore(state)
        for _ in range(steps_per_process):
            state, _ = step(state, data, jax.random.key(t))
            t += 1
    return sampler, state


@pytest.mark.slow
def test_restarts_keep_the_renormalization_schedule():
    """Regression: the schedule was a count in the step object, 0 in every new process, so
    25 restarts every 0.9 M steps never renormalized and exp3's probabilities fell below p_min
    (93 of 1,000 reached 0). Now it is read from the state's step: the restarted run
    renormalizes exactly as the uninterrupted one, and their states are equal bitwise."""
    m = ab.exp3_sampler(1000, 32, step_size=2.0).renormalize_every
    per_process = int(0.9 * m)
    copy = lambda state: jax.tree.map(jnp.copy, state)  # noqa: E731  (a restored state)
    sampler, restarted = _restart_run(10, per_process, copy)
    _, straight = _restart_run(1, 10 * per_process, copy)
    assert int(restarted.sampler_state.num_rescales) == (10 * per_process - 1) // m
    chex.assert_trees_all_equal(restarted, straight)
    p = sampler.probabilities(restarted.sampler_state)
    assert float(jnp.min(p)) >= restarted.sampler_state.p_min * (1 - 1e-5)


@pytest.mark.slow
def test_a_restored_checkpoint_resumes_the_schedule(tmp_path):
    m = ab.exp3_sampler(1000, 32, step_size=2.0).renormalize_every
    saves = iter(range(100))

    def through_a_checkpoint(state):
        path = tmp_path / str(next(saves))
        ab.save_checkpoint(path, state)
        return ab.restore_checkpoint(path, state)

    _, restarted = _restart_run(3, int(0.9 * m), through_a_checkpoint)
    assert int(restarted.sampler_state.num_rescales) == (3 * int(0.9 * m) - 1) // m


@pytest.mark.slow
def test_a_sampler_state_gone_bad_is_reported_at_the_next_renormalization():
    """Regression: a NaN written into exp3's tree was never detected: every later step was
    skipped silently. The step reports invalid_draws on every step, and the step object
    raises at its next renormalization (one host read every M steps)."""
    n, k = 1000, 32
    sampler = ab.exp3_sampler(n, k, step_size=2.0)  # M = 27
    loss = lambda params, batch: jnp.sum((batch["x"] - params) ** 2, axis=1)  # noqa: E731
    data = {"x": jax.random.normal(jax.random.key(0), (n, 2))}
    step = ab.make_train_step(loss, optax.sgd(0.01), sampler, feedback="loss")
    state = step.init(jnp.zeros(2))
    layout = exp3.tree_layout(n, state.sampler_state.arity)
    leaves = sumtree.leaf_values(state.sampler_state.tree, layout).at[5].set(jnp.nan)
    bad = state.sampler_state.replace(tree=sumtree.build(leaves, layout))  # written by hand
    state = state._replace(sampler_state=bad)
    state, metrics = step(state, data, jax.random.key(0))
    assert int(metrics["invalid_draws"]) == 1 and int(metrics["skipped"]) == 1
    with pytest.raises(RuntimeError, match="sampler state is not finite"):
        for t in range(1, sampler.renormalize_every + 1):
            state, metrics = step(state, data, jax.random.key(t))
