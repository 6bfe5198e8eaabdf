"""Tests of adambs_jax.base: the typed sampler contract."""

import jax.numpy as jnp
import pytest

import adambs_jax as ab
from adambs_jax.samplers import _base as base


def _functions():
    return dict(
        init=lambda: jnp.zeros(()),
        sample=lambda state, key: (jnp.zeros(2, jnp.int32), jnp.full(2, 0.25)),
        update=lambda state, indices, feedback: state + 1,
    )


def test_sampler_fields_and_default_probabilities():
    sampler = base.Sampler(**_functions(), num_examples=4, batch_size=2)
    assert sampler._fields == (
        "init",
        "sample",
        "update",
        "num_examples",
        "batch_size",
        "probabilities",
        "renormalize_every",
        "renormalize",
        "metrics",
    )
    assert sampler.probabilities is None  # no full distribution unless the sampler says so
    assert sampler.renormalize_every is None and sampler.renormalize is None
    assert sampler.metrics is None
    uniform = lambda state: jnp.full((4,), 0.25)
    with_p = sampler._replace(probabilities=uniform)
    assert with_p.probabilities(with_p.init()).shape == (4,)


def test_scoring_sampler_fields_and_defaults():
    sampler = base.ScoringSampler(**_functions(), num_examples=4, batch_size=2)
    assert sampler._fields == (
        "init",
        "sample",
        "update",
        "num_examples",
        "batch_size",
        "score_feedback",
        "score_chunk_size",
        "probabilities",
        "renormalize_every",
        "renormalize",
        "metrics",
    )
    assert sampler.renormalize_every is None and sampler.renormalize is None
    assert sampler.score_feedback is None
    assert sampler.score_chunk_size is None
    assert sampler.probabilities is None


def test_the_two_kinds_are_distinct_types():
    # the train step tells them apart with isinstance: a ScoringSampler's sample takes score_fn
    plain = base.Sampler(**_functions(), num_examples=4, batch_size=2)
    scoring = base.ScoringSampler(**_functions(), num_examples=4, batch_size=2)
    assert not isinstance(plain, base.ScoringSampler)
    assert not isinstance(scoring, base.Sampler)
    assert isinstance(plain, base.AnySampler.__args__)
    assert isinstance(scoring, base.AnySampler.__args__)


def test_accepts_apply_reads_the_signature():
    assert base.accepts_apply(lambda state, indices, feedback, *, apply=True: state)
    assert base.accepts_apply(lambda state, indices, feedback, **extra: state)
    assert not base.accepts_apply(_functions()["update"])  # a user's sampler of the old contract
    assert not base.accepts_apply(print)  # a builtin without a signature: the old contract


@pytest.mark.parametrize(
    "factory",
    [
        ab.uniform_sampler,
        lambda n, k: ab.exp3_sampler(n, k, num_steps=10),
        ab.priority_sampler,
        lambda n, k: ab.infobatch_sampler(n, k, num_steps=10),
        ab.adam_impt_sampler,
        ab.gradient_norm_sampler,
        lambda n, k: ab.group_sampler(n, k, 2, num_steps=10),
    ],
    ids=["uniform", "exp3", "priority", "infobatch", "adam_impt", "gradient_norm", "groups"],
)
def test_every_library_sampler_takes_apply(factory):
    """The contract (``UpdateFn``) says every library sampler's update takes ``apply``."""
    assert base.accepts_apply(factory(8, 2).update)
