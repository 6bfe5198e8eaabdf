"""Tests of adambs_jax.checkpoint._restore: what a restore takes from the checkpoint (learned
state) and what from the sampler configured now (hyperparameters); non-finite states refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _exp3 as exp3
from adambs_jax.samplers import _sumtree as sumtree

N, K = 40, 4


def _state(sampler):
    return ab.TrainState.create(
        params={"w": jnp.zeros(3)}, optimizer=optax.sgd(0.1), sampler=sampler
    )


def _trained(sampler, bound=None, steps=5):
    """A TrainState whose sampler learned a little (and, if given, has L = ``bound``)."""
    state = _state(sampler)
    sampler_state = state.sampler_state
    f = jnp.linspace(0.1, 2.0, N)
    for t in range(steps):
        idx, _ = sampler.sample(sampler_state, jax.random.key(t))
        sampler_state = sampler.update(sampler_state, idx, f[idx])
    if bound is not None:
        sampler_state = sampler_state.replace(grad_norm_bound=jnp.float32(bound))
    return state._replace(sampler_state=sampler_state)


def _save(tmp_path, state, name="c"):
    return ab.save_checkpoint(tmp_path / name, state)


@pytest.mark.parametrize("mode", ["running_max", "quantile"])
def test_a_fixed_bound_overrides_the_stored_adaptive_bound(tmp_path, mode):
    # a regression: an adaptive checkpoint (L = 1.13) restored into grad_norm_bound=100 took
    # the stored bound
    saved = _trained(ab.exp3_sampler(N, K, step_size=0.5, grad_norm_bound=mode), bound=1.13)
    path = _save(tmp_path, saved)
    fixed = ab.exp3_sampler(N, K, step_size=0.5, grad_norm_bound=100.0)
    restored = ab.restore_checkpoint(path, _state(fixed))
    assert float(restored.sampler_state.grad_norm_bound) == 100.0
    assert restored.sampler_state.bound_mode == "fixed"
    np.testing.assert_array_equal(
        restored.sampler_state.log_weights, saved.sampler_state.log_weights
    )
    idx, f = jnp.arange(K), jnp.full((K,), 50.0)
    after = fixed.update(restored.sampler_state, idx, f)
    assert float(after.grad_norm_bound) == 100.0
    # the update ran with L = 100: 50 is not clipped (with L = 1.13 it would be)
    clipped = fixed.update(
        restored.sampler_state.replace(grad_norm_bound=jnp.float32(1.13)), idx, f
    )
    np.testing.assert_array_equal(after.log_weights, clipped.log_weights)  # L from the config


def test_an_abstract_template_with_a_fixed_bound_runs_with_the_new_bound(tmp_path):
    path = _save(tmp_path, _trained(ab.exp3_sampler(N, K, step_size=0.5), bound=1.13))
    fixed = ab.exp3_sampler(N, K, step_size=0.5, grad_norm_bound=100.0)
    restored = ab.restore_checkpoint(path, jax.eval_shape(lambda: _state(fixed)))
    after = fixed.update(restored.sampler_state, jnp.arange(K), jnp.ones(K))
    assert float(after.grad_norm_bound) == 100.0


@pytest.mark.parametrize(
    "saved_mode, new_mode, expected",
    [
        ("quantile", "quantile", 1.13),
        ("running_max", "running_max", 1.13),
        ("running_max", "quantile", 0.0),  # a changed mode restarts L
        ("quantile", "running_max", 0.0),
        (7.0, "quantile", 0.0),
    ],
)
def test_the_adaptive_bound_is_kept_only_for_the_same_mode(
    tmp_path, saved_mode, new_mode, expected
):
    path = _save(
        tmp_path,
        _trained(ab.exp3_sampler(N, K, step_size=0.5, grad_norm_bound=saved_mode), bound=1.13),
    )
    new = ab.exp3_sampler(N, K, step_size=0.5, grad_norm_bound=new_mode)
    restored = ab.restore_checkpoint(path, _state(new))
    assert float(restored.sampler_state.grad_norm_bound) == pytest.approx(expected)
    assert restored.sampler_state.bound_mode == new_mode


def test_step_size_and_stratified_are_the_new_samplers(tmp_path):
    saved = _trained(ab.exp3_sampler(N, K, step_size=0.5))
    path = _save(tmp_path, saved)
    new = ab.exp3_sampler(N, K, step_size=2.0, stratified=True)
    restored = ab.restore_checkpoint(path, _state(new))
    idx, f = jnp.arange(K), jnp.linspace(0.5, 1.5, K)
    expected = new.update(saved.sampler_state, idx, f)
    got = new.update(restored.sampler_state, idx, f)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("saved_arity, new_arity", [(4, 16), (32, 2), (16, 16)])
def test_another_arity_rebuilds_the_tree_from_the_log_weights(tmp_path, saved_arity, new_arity):
    saved = _trained(ab.exp3_sampler(N, K, step_size=0.5, arity=saved_arity), steps=20)
    path = _save(tmp_path, saved)
    new = ab.exp3_sampler(N, K, step_size=0.5, arity=new_arity)
    restored = ab.restore_checkpoint(path, _state(new)).sampler_state
    assert restored.arity == new_arity
    np.testing.assert_array_equal(restored.log_weights, saved.sampler_state.log_weights)
    layout = sumtree.layout_for(N, new_arity)
    if saved_arity == new_arity:  # nothing rebuilt: bitwise the stored tree
        np.testing.assert_array_equal(restored.tree, saved.sampler_state.tree)
    else:
        np.testing.assert_array_equal(
            restored.tree, sumtree.build(jnp.exp(restored.log_weights), layout)
        )
    np.testing.assert_allclose(
        exp3.distribution(restored), exp3.distribution(saved.sampler_state), rtol=1e-5
    )
    idx, _ = new.sample(restored, jax.random.key(0))  # the restored state is usable
    new.update(restored, idx, jnp.ones(K))


def _trained_tree_sampler(sampler, steps=20):
    """A TrainState whose (priority or InfoBatch) sampler learned from varied feedback."""
    state = _state(sampler)
    sampler_state = state.sampler_state
    f = jnp.linspace(0.1, 2.0, N)
    for t in range(steps):
        idx, _ = sampler.sample(sampler_state, jax.random.key(t))
        sampler_state = sampler.update(sampler_state, idx, f[idx])
        if sampler.renormalize_every and (t + 1) % sampler.renormalize_every == 0:
            sampler_state = sampler.renormalize(sampler_state)  # InfoBatch: a new epoch
    return state._replace(sampler_state=sampler_state)


TREE_SAMPLERS = {
    "priority": lambda arity: ab.priority_sampler(N, K, arity=arity),
    "infobatch": lambda arity: ab.infobatch_sampler(N, K, num_steps=100, arity=arity),
    "groups": lambda arity: ab.group_sampler(N, K, 4, base="exp3", step_size=0.5, arity=arity),
}


@pytest.mark.parametrize("kind", sorted(TREE_SAMPLERS))
@pytest.mark.parametrize("saved_arity, new_arity", [(32, 16), (16, 32), (16, 16)])
def test_every_tree_sampler_moves_to_another_arity(tmp_path, kind, saved_arity, new_arity):
    """A checkpoint written on a GPU (arity 32) restores on a CPU (16) and back, for each
    sampler with a tree: the same distribution, a tree of the new arity, a usable state."""
    saved = _trained_tree_sampler(TREE_SAMPLERS[kind](saved_arity))
    path = _save(tmp_path, saved)
    new = TREE_SAMPLERS[kind](new_arity)
    restored = ab.restore_checkpoint(path, _state(new)).sampler_state
    np.testing.assert_allclose(
        new.probabilities(restored), ab.samplers.probabilities(saved.sampler_state), rtol=1e-5
    )
    inner = restored.base if kind == "groups" else restored
    assert inner.arity == new_arity
    assert inner.tree.shape == (sumtree.layout_for(inner.num_examples, new_arity).size,)
    if saved_arity == new_arity:
        saved_inner = saved.sampler_state.base if kind == "groups" else saved.sampler_state
        np.testing.assert_array_equal(inner.tree, saved_inner.tree)
    idx, _ = new.sample(restored, jax.random.key(0))
    new.update(restored, idx, jnp.ones(K))


def test_p_min_and_num_examples_stay_refused(tmp_path):
    path = _save(tmp_path, _trained(ab.exp3_sampler(N, K, step_size=0.5)))
    with pytest.raises(ValueError, match="p_min"):
        ab.restore_checkpoint(path, _state(ab.exp3_sampler(N, K, step_size=0.5, p_min=0.5 / N)))
    with pytest.raises(ValueError, match="num_examples"):
        ab.restore_checkpoint(path, _state(ab.exp3_sampler(N + 1, K, step_size=0.5)))


@pytest.mark.parametrize(
    "field, damage, match",
    [
        (
            "log_weights",
            lambda s: s.replace(log_weights=s.log_weights.at[3].set(jnp.nan)),
            "log_weights has 1 non-finite",
        ),
        ("tree", lambda s: s.replace(tree=s.tree.at[0].set(jnp.inf)), "tree has 1 non-finite"),
        ("root", lambda s: s.replace(tree=jnp.zeros_like(s.tree)), "tree root is 0.0"),
        ("leaf", lambda s: s.replace(tree=s.tree.at[-1].set(-1.0)), "tree has 1 non-finite or neg"),
        (
            "bound",
            lambda s: s.replace(grad_norm_bound=jnp.float32(jnp.nan)),
            "grad_norm_bound is nan",
        ),
    ],
)
def test_a_non_finite_sampler_state_is_refused_naming_the_checkpoint(
    tmp_path, field, damage, match
):
    sampler = ab.exp3_sampler(N, K, step_size=0.5)
    saved = _trained(sampler)
    path = _save(tmp_path, saved._replace(sampler_state=damage(saved.sampler_state)))
    with pytest.raises(ValueError, match=match) as error:
        ab.restore_checkpoint(path, _state(sampler))
    assert str(path) in str(error.value) and "sampler.init()" in str(error.value)
    manager = ab.CheckpointManager(tmp_path / "run")
    manager.save(0, saved._replace(sampler_state=damage(saved.sampler_state)))
    with pytest.raises(ValueError, match=match):
        manager.restore(_state(sampler))
    manager.close()
