"""Runs the ``Examples:`` of every docstring in adambs_jax as doctests.

Each module of the package is one test; a module without examples passes trivially, a
failing example fails its module's test with doctest's report.
"""

import doctest
import importlib
import io
import pkgutil

import pytest

import adambs_jax

MODULES = ["adambs_jax"] + sorted(
    f"adambs_jax.{info.name}" for info in pkgutil.iter_modules(adambs_jax.__path__)
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _run_examples(module_name: str) -> doctest.TestResults:
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    # The finder skips objects imported from elsewhere: each is tested in its own module.
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, module_name):
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, report.getvalue()
    return results


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    _run_examples(module_name)


def test_the_examples_are_found():
    """The harness is not vacuous: the checkpoint functions' examples are collected."""
    assert _run_examples("adambs_jax.checkpoint").attempted >= 2
    assert _run_examples("adambs_jax.checkpoint_metadata").attempted >= 1
