"""Tests of adambs_jax._deprecated: every old import path still works for one release, warns
with a DeprecationWarning that names the new home, and gives the very object of the new one."""

import importlib
import subprocess
import sys
import warnings

import pytest

import adambs_jax as ab
from adambs_jax import _deprecated


@pytest.mark.parametrize("old", sorted(_deprecated.OLD_MODULES))
def test_an_old_module_warns_and_forwards(old):
    holder, home = _deprecated.OLD_MODULES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {home}"):
        module = importlib.import_module(old)
    target = importlib.import_module(holder)
    name = next(n for n in getattr(target, "__all__", dir(target)) if not n.startswith("_"))
    assert getattr(module, name) is getattr(target, name)


def test_from_an_old_module_import_a_name():
    sys.modules.pop("adambs_jax.train_step", None)
    with pytest.warns(DeprecationWarning, match="adambs_jax.train_step"):
        from adambs_jax.train_step import make_train_step  # noqa: PLC0415
    assert make_train_step is ab.make_train_step


def test_an_old_module_as_an_attribute_of_the_face():
    sys.modules.pop("adambs_jax.sumtree", None)
    vars(ab).pop("sumtree", None)  # an earlier import set it on the package
    with pytest.warns(DeprecationWarning, match="adambs_jax.sumtree"):
        max_leaves = ab.sumtree.max_leaves
    assert max_leaves is ab.samplers.max_leaves


@pytest.mark.parametrize(
    "name, home",
    [("probabilities", ab.samplers), ("FEEDBACK_KINDS", ab.feedback), ("Draws", ab.host)],
)
def test_a_name_the_face_no_longer_exports_warns_and_forwards(name, home):
    with pytest.warns(DeprecationWarning, match=f"adambs_jax.{name} is deprecated"):
        obj = getattr(ab, name)
    assert obj is getattr(home, name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        ab.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        importlib.import_module("adambs_jax.no_such_module")


@pytest.mark.slow  # a subprocess
def test_importing_the_package_warns_nothing():
    code = "import warnings; warnings.simplefilter('error'); import adambs_jax"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_new_paths_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ab.__all__:
            getattr(ab, name)
