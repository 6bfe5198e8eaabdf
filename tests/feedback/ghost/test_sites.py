"""Tests of adambs_jax.ghost.sites: which recorded layer calls cover which parameters."""

import jax
import jax.numpy as jnp
import numpy as np

from adambs_jax.feedback.ghost import _rules as rules
from adambs_jax.feedback.ghost import _sites as sites

RULE = sites.LayerRule("Dense", lambda module: (), lambda config, x, b: {})
OUT = jax.ShapeDtypeStruct((1, 3), jnp.float32)
IN = jax.ShapeDtypeStruct((1, 2), jnp.float32)


def _site(path, leaves, call=0, rule=RULE, config=(), in_loss_trace=True):
    named = tuple((f"param{n}", index) for n, index in enumerate(leaves))
    return sites.Site(path, call, rule, config, named, OUT, in_loss_trace, IN)


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
        ([_site("a", (0,))], {0}),  # a leaf also read by another method or outside
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


DENSE = sites.LayerRule("Dense", lambda module: ((-1,), False, 0), rules.dense_factors)
EMBED = sites.LayerRule("Embed", lambda module: (), rules.embed_factors)


def _layer_site(path, rule, config, leaf, inputs, output):
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (inputs, output)]
    return sites.Site(path, 0, rule, config, (leaf,), shapes[1], True, shapes[0])


def _dense_site(path, index, width=3):
    shape = ((1, width), jnp.float32)
    return _layer_site(path, DENSE, ((-1,), False, 0), ("kernel", index), shape, shape)


def test_a_leaf_shared_by_two_layers_is_covered_once_and_both_calls_perturbed():
    plan = sites.build_plan([_dense_site("a", 0), _dense_site("b", 0)], set(), 1)
    assert plan.covered == {0} and set(plan.perturbed) == {("a", 0), ("b", 0)}


def test_a_leaf_read_with_factors_that_do_not_stack_falls_back():
    """One (3, 3) table read as an embedding and as a Dense kernel: rows of different kinds."""
    tokens, rows = ((1, 2), jnp.int32), ((1, 2, 3), jnp.float32)
    embed = _layer_site("e", EMBED, (), ("embedding", 0), tokens, rows)
    plan = sites.build_plan([embed, _dense_site("d", 0)], set(), 1)
    assert plan.fallback == (0,) and not plan.perturbed


def test_shared_leaf_gradient_and_norm_include_the_cross_terms():
    """g_k = A1_k^T B1_k + A2_k^T B2_k: the norm of the sum, not the sum of the norms."""
    plan = sites.build_plan([_dense_site("a", 0), _dense_site("b", 0)], set(), 1)
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = {site: jax.random.normal(k, (4, 3)) for site, k in zip(plan.perturbed, keys[:2])}
    grads = {site: jax.random.normal(k, (4, 3)) for site, k in zip(plan.perturbed, keys[2:])}
    sq_norms, total = sites.site_norms_and_grads(plan, inputs, grads, [(3, 3)])
    per_example = sum(jnp.einsum("kd,kp->kdp", inputs[s], grads[s]) for s in plan.perturbed)
    np.testing.assert_allclose(sq_norms[0], jnp.sum(per_example**2, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(total[0], per_example.sum(axis=0), rtol=1e-5, atol=1e-6)
