"""Tests of the package face (adambs_jax/__init__.py, version.py) and of the wheel it builds."""

import ast
import importlib
import importlib.metadata
import inspect
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import adambs_jax as ab
from adambs_jax import version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adambs_jax"

PUBLIC_SUBPACKAGES = ("samplers", "feedback", "step", "host", "checkpoint")


def _modules():
    """Every module of the library, as paths relative to the package (``samplers/_exp3.py``)."""
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


def _public_modules():
    """The modules a user may import: no path component starts with an underscore."""
    names = ["adambs_jax"]
    for path in _modules():
        parts = path.removesuffix(".py").split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and not any(part.startswith("_") for part in parts):
            names.append("adambs_jax." + ".".join(parts))
    return sorted(set(names))


def test_all_lists_only_existing_names_once():
    assert len(ab.__all__) == len(set(ab.__all__))
    missing = [name for name in ab.__all__ if not hasattr(ab, name)]
    assert not missing


def test_the_face_is_small():
    """At most 40 names at the top level: the step, the sampler factories and their
    contract, the hand-loop tools, checkpoints, sharding, the version, the subpackages."""
    assert len(ab.__all__) <= 40, len(ab.__all__)


def test_at_most_eight_modules_directly_under_the_package():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 8, top


def test_every_public_module_has_a_docstring_and_an_all():
    for name in _public_modules():
        module = importlib.import_module(name)
        assert (module.__doc__ or "").strip(), f"{name} has no docstring"
        assert hasattr(module, "__all__"), name
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, (name, missing)


def test_the_public_subpackages_are_in_the_face():
    for name in PUBLIC_SUBPACKAGES + ("transforms", "sharding"):
        assert name in ab.__all__, name
        assert getattr(ab, name).__name__ == f"adambs_jax.{name}"


def test_every_object_is_public_under_at_most_two_paths():
    """Its home and the face: ``ab.samplers.exp3_sampler`` and ``ab.exp3_sampler``, never a
    third alias (deprecated paths warn and are not public)."""
    paths = {}
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.ismodule(obj) or isinstance(obj, (int, float, str, tuple, dict)):
                continue
            paths.setdefault(id(obj), (obj, []))[1].append(f"{name}.{attr}")
    over = {entry[1][0]: entry[1] for entry in paths.values() if len(entry[1]) > 2}
    assert not over, over


def test_init_carries_no_issue_comments():
    for path in PACKAGE.rglob("*.py"):
        assert not re.search(r"\bissues? \d+", path.read_text(), re.I), path


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def test_the_version_is_written_once():
    assert ab.__version__ == version.__version__
    pyproject = _pyproject()
    assert pyproject["project"]["dynamic"] == ["version"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "adambs_jax.version.__version__"
    }
    versions = [p for p in PACKAGE.rglob("*.py") if "__version__ = " in p.read_text()]
    assert versions == [PACKAGE / "version.py"]


def test_the_installed_metadata_has_this_version():
    try:
        installed = importlib.metadata.version("adambs_jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("adambs_jax is not installed (tests run from the source tree)")
    assert installed == ab.__version__


def test_pyproject_ships_the_library_only():
    """No top-level ``experiments`` package and no console script (it needs the extras and
    the checkout: ``python -m experiments``); py.typed and the LICENSE are shipped."""
    pyproject = _pyproject()
    setuptools = pytest.importorskip("setuptools")
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(where=str(ROOT), include=include)
    assert "adambs_jax" in packages
    assert all(name.split(".")[0] == "adambs_jax" for name in packages), packages
    assert "scripts" not in pyproject["project"] and "entry-points" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["package-data"]["adambs_jax"] == ["py.typed"]
    assert (PACKAGE / "py.typed").is_file()
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def _setuptools_builds_wheels_offline() -> bool:
    try:
        import setuptools  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77  # what pyproject's build-system requires (SPDX license, bdist_wheel)


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    """A wheel built from a copy of the sources with the installed setuptools (no network,
    no build isolation: the build backend is called directly), next to an experiments/
    package that must stay out of it."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, source / "adambs_jax", ignore=ignore)
    (source / "experiments").mkdir()
    (source / "experiments" / "__init__.py").write_text("")
    build = "import setuptools.build_meta as backend; print(backend.build_wheel('dist'))"
    result = subprocess.run(
        [sys.executable, "-c", build],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return source / "dist" / result.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # builds a wheel in a subprocess
@pytest.mark.skipif(
    not _setuptools_builds_wheels_offline(),
    reason="needs setuptools>=77 installed (the dev extra has it)",
)
def test_the_wheel_holds_the_library_only(tmp_path):
    wheel = _build_wheel(tmp_path)
    dist_info = f"adambs_jax-{ab.__version__}.dist-info"
    assert wheel.name.startswith(f"adambs_jax-{ab.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        license_text = archive.read(f"{dist_info}/licenses/LICENSE").decode()
    assert {name.split("/")[0] for name in names} == {"adambs_jax", dist_info}
    assert "adambs_jax/py.typed" in names
    assert {f"adambs_jax/{m}" for m in _modules()} <= set(names)
    assert f"{dist_info}/entry_points.txt" not in names  # no console script
    assert "Apache License" in license_text
    assert f"Version: {ab.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    for requirement in _pyproject()["project"]["dependencies"]:
        assert f"Requires-Dist: {requirement}" in metadata


# the module each runtime dependency is imported as; jaxlib is jax's backend (jax imports it)
IMPORTED_AS = {"orbax-checkpoint": "orbax.checkpoint", "jaxlib": None}


def _imported_modules() -> set[str]:
    """The absolute imports of the library's modules, as dotted names."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_every_runtime_dependency_is_imported_by_the_library():
    """No unused dependency: a package the library does not import (a test helper such as
    chex) belongs in an extra."""
    imported = _imported_modules()
    for requirement in _pyproject()["project"]["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        module = IMPORTED_AS.get(name, name.replace("-", "_"))
        if module is None:
            continue
        assert any(m == module or m.startswith(module + ".") for m in imported), requirement
    assert "chex" not in {m.split(".")[0] for m in imported}


def test_the_readme_asks_for_the_python_that_pyproject_requires():
    requires = _pyproject()["project"]["requires-python"]
    assert requires.startswith(">=")
    assert f"Python >= {requires[2:]}" in (ROOT / "README.md").read_text()
    assert _pyproject()["tool"]["ruff"]["target-version"] == "py" + requires[2:].replace(".", "")
