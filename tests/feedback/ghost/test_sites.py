"""Tests of adambs_jax.ghost.sites: which recorded layer calls cover which parameters."""

import jax
import jax.numpy as jnp

from adambs_jax.feedback.ghost import _sites as sites

RULE = sites.LayerRule("Dense", lambda module: (), lambda config, x, b: {})
OUT = jax.ShapeDtypeStruct((1, 3), jnp.float32)


def _site(path, leaves, call=0, rule=RULE, config=(), in_loss_trace=True):
    named = tuple((f"param{n}", index) for n, index in enumerate(leaves))
    return sites.Site(path, call, rule, config, named, OUT, in_loss_trace)


def test_supported_calls_cover_their_leaves_and_the_rest_falls_back():
    plan = sites.build_plan(
        [_site("a", (0, 1)), _site("n", (2,), rule=None, config=None)], set(), 4
    )
    assert plan.covered == {0, 1} and plan.direct == {2} and plan.fallback == (3,)
    assert set(plan.perturbed) == {("a", 0)}


def test_one_call_under_a_nested_trace_uncovers_the_whole_path():
    recorded = [_site("a", (0,)), _site("a", (0,), call=1, in_loss_trace=False)]
    plan = sites.build_plan(recorded, set(), 1)
    assert not plan.covered and plan.fallback == (0,) and not plan.perturbed


def test_unsupported_config_unknown_leaves_and_other_methods_uncover():
    for recorded, bad in [
        ([_site("a", (0,), config=None)], set()),
        ([_site("a", (0, -1))], set()),
        ([_site("a", (0,))], {"a"}),
    ]:
        plan = sites.build_plan(recorded, bad, 1)
        assert plan.fallback == (0,) and not plan.perturbed


def test_a_leaf_read_by_an_uncovered_path_uncovers_every_path_reading_it():
    recorded = [_site("a", (0, 1)), _site("b", (1, 2), config=None), _site("c", (3,))]
    plan = sites.build_plan(recorded, set(), 4)
    assert plan.covered == {3} and plan.fallback == (0, 1, 2)
    assert set(plan.perturbed) == {("c", 0)}


def test_norm_layer_leaf_also_read_by_a_covered_layer_is_not_direct():
    recorded = [_site("a", (0,)), _site("n", (0,), rule=None, config=None)]
    plan = sites.build_plan(recorded, set(), 1)
    assert plan.fallback == (0,) and not plan.covered and not plan.direct


def test_outside_reads_lists_the_leaves_an_equation_or_output_reads():
    def fn(leaves, x):
        return leaves[0] * x, leaves[2]

    jaxpr = jax.make_jaxpr(fn)([1.0, 2.0, 3.0, 4.0], 5.0)
    assert sites.outside_reads(jaxpr, 4) == {0, 2}
