"""Runs the ``Examples:`` of every docstring in adambs_jax as doctests.

Only modules that have examples are collected, one test each; a failing example fails its
module's test with doctest's report.
"""

import doctest
import importlib
import io
import pkgutil

import pytest

import adambs_jax

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _all_modules() -> list[str]:
    names = ["adambs_jax"]
    for info in pkgutil.walk_packages(adambs_jax.__path__, "adambs_jax."):
        names.append(info.name)
    return sorted(names)


def _examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    # The finder skips objects imported from elsewhere: each is tested in its own module.
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    return [test for test in tests if test.examples]


MODULES = [name for name in _all_modules() if _examples(name)]


def _run_examples(module_name: str) -> doctest.TestResults:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for test in _examples(module_name):
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, report.getvalue()
    return results


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    assert _run_examples(module_name).attempted > 0


def test_the_examples_are_found():
    """The harness is not vacuous: the checkpoint functions' and the step's examples are
    collected."""
    assert "adambs_jax.checkpoint._checkpoint" in MODULES
    assert "adambs_jax.step._train_step" in MODULES
    assert _run_examples("adambs_jax.checkpoint._checkpoint").attempted >= 2
