"""Tests of adambs_jax.checkpoint_metadata: describing a TrainState, comparing metadata."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adambs_jax as ab
from adambs_jax.checkpoint import _metadata as cm


def _state(sampler=None, key=None, params=None):
    return ab.TrainState.create(
        params={"w": jnp.zeros((3, 2))} if params is None else params,
        optimizer=optax.sgd(0.1),
        sampler=sampler or ab.exp3_sampler(16, 4, num_steps=5),
        key=key,
    )


def test_describe_state_is_json_and_names_every_leaf():
    sampler = ab.exp3_sampler(16, 4, num_steps=5)
    meta = cm.describe_state(_state(sampler, jax.random.key(0)), sampler=sampler)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["format"] == cm.CHECKPOINT_FORMAT and meta["version"] == ab.__version__
    assert meta["sampler_config"] == {
        "num_examples": 16,
        "p_min": pytest.approx(0.1 / 16),
        "arity": sampler.init().arity,
        "bound_mode": "quantile",
    }
    assert meta["batch_size"] == 4
    assert meta["typed_keys"] == {".key": "threefry2x32"}
    leaves = {leaf["path"]: leaf for leaf in meta["leaves"]}
    assert leaves[".params['w']"] == {"path": ".params['w']", "shape": [3, 2], "dtype": "float32"}
    assert leaves[".key"]["dtype"] == "uint32"  # typed keys are described as their raw data


def test_an_abstract_state_has_the_same_description_without_step():
    state = _state(key=jax.random.key(0))
    concrete = cm.describe_state(state)
    abstract = cm.describe_state(jax.eval_shape(lambda: state))
    assert abstract["step"] is None and concrete["step"] == 0
    assert {k: v for k, v in abstract.items() if k not in ("step", "skipped_steps")} == {
        k: v for k, v in concrete.items() if k not in ("step", "skipped_steps")
    }


def test_raw_keys_round_trip():
    state = _state(key=jax.random.key(3))
    raw = cm.raw_keys(state)
    assert raw.key.dtype == jnp.uint32
    back = cm.rewrap_keys(raw, state)
    np.testing.assert_array_equal(jax.random.key_data(back.key), jax.random.key_data(state.key))
    with pytest.raises(ValueError, match="the checkpoint gave"):
        cm.rewrap_keys({"one": 1}, state)


@pytest.mark.parametrize(
    "other, expected",
    [
        (
            lambda: _state(ab.exp3_sampler(32, 4, num_steps=5)),
            ["sampler dataset size (num_examples): checkpoint 16, `like` 32"],
        ),
        (
            lambda: _state(params={"w": jnp.zeros((3, 2), jnp.bfloat16)}),
            [
                "1 arrays differ in shape or dtype: .params['w'] checkpoint float32(3, 2) vs "
                "`like` bfloat16(3, 2)"
            ],
        ),
        (
            lambda: _state(params={"v": jnp.zeros((3, 2))}),
            [
                "1 arrays of `like` are not in the checkpoint (a different model, optimizer or "
                "sampler?): .params['v']",
                "1 arrays of the checkpoint are not in `like`: .params['w']",
            ],
        ),
    ],
    ids=["num_examples", "dtype", "paths"],
)
def test_metadata_differences_lists_each(other, expected):
    saved = cm.describe_state(_state())
    differences = cm.metadata_differences(saved, cm.describe_state(other()))
    assert [d for d in expected if d not in differences] == []
    assert cm.metadata_differences(saved, saved) == []


def test_empty_subtrees_are_recorded_and_compared_when_recorded():
    """adam and adamw have the same arrays; adamw's chain has one more (empty) state."""

    def describe(optimizer):
        return cm.describe_state(
            ab.TrainState.create(
                params={"w": jnp.zeros(3)}, optimizer=optimizer, sampler=ab.uniform_sampler(8, 2)
            )
        )

    adam, adamw = describe(optax.adam(0.1)), describe(optax.adamw(0.1))
    assert {"path": ".opt_state[2]", "type": "EmptyState"} in adamw["empty_subtrees"]
    assert [leaf["path"] for leaf in adam["leaves"]] == [leaf["path"] for leaf in adamw["leaves"]]
    assert cm.metadata_differences(adam, adamw) == [
        "the optimizer states differ (another optimizer, or optax chain, than the "
        "checkpoint's): in `like`, not in the checkpoint: .opt_state[2] (EmptyState, no arrays)"
    ]
    older = {k: v for k, v in adam.items() if k != "empty_subtrees"}  # not recorded: orbax's
    assert cm.metadata_differences(older, adamw) == []


def test_verify_metadata_refuses_what_is_not_a_checkpoint():
    like = _state()
    with pytest.raises(ValueError, match="X is not an adambs_jax checkpoint"):
        cm.verify_metadata({}, like, None, "X")
    with pytest.raises(ValueError, match="X has checkpoint format 99"):
        cm.verify_metadata({**cm.describe_state(like), "format": 99}, like, None, "X")
    cm.verify_metadata(cm.describe_state(like), like, None, "X")


def test_check_train_state_names_the_argument():
    with pytest.raises(TypeError, match="like must be an ab.TrainState"):
        cm.check_train_state({}, "like")
