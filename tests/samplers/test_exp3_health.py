"""Tests of adambs_jax.exp3_health: the host-side finiteness check of an exp3 state."""

import jax.numpy as jnp
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _exp3 as exp3


def test_a_fresh_and_a_trained_state_pass():
    sampler = ab.exp3_sampler(20, 4, step_size=0.5)
    state = sampler.init()
    exp3.check_state_finite(state)
    exp3.check_state_finite(sampler.update(state, jnp.arange(4), jnp.ones(4)))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s.replace(log_weights=s.log_weights.at[0].set(jnp.inf)), "log_weights"),
        (lambda s: s.replace(tree=s.tree.at[1].set(jnp.nan)), "tree has 1 non-finite"),
        (lambda s: s.replace(tree=s.tree.at[0].set(0.0)), "tree root is 0.0"),
        (lambda s: s.replace(tree=s.tree.at[-20:].set(0.0)), "tree has 20 leaves <= 0"),
        (lambda s: s.replace(grad_norm_bound=jnp.float32(-1.0)), "grad_norm_bound is -1.0"),
    ],
)
def test_a_damaged_state_is_refused_naming_the_field(damage, match):
    state = damage(ab.exp3_sampler(20, 4, step_size=0.5, arity=2).init())
    with pytest.raises(ValueError, match=f"my state: the exp3 sampler state's {match}"):
        exp3.check_state_finite(state, where="my state")
