"""Tests of the package face (adambs_jax/__init__.py, version.py) and of the wheel it builds."""

import importlib.metadata
import pathlib
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

# Every name ``import adambs_jax`` gave before __all__ existed: none may disappear.
NAMES_EXPORTED_BEFORE = """
    sumtree ProjectionResult project_onto_floored_simplex Exp3SamplerState Sampler
    UniformSamplerState default_step_size exp3_sampler importance_weights probabilities
    uniform_sampler __version__ feedback losses scoring FEEDBACK_KINDS logit_grad_norms
    per_example_grad_norms per_example_losses per_example_losses_and_grads tree_norms
    ModelLoss ScoreFn ScoringSampler make_score_fn TrainState make_train_step
    ImportanceWeightedTransformation adambs amsgradbs importance_weighted_mean weighted_mean
    with_importance_weighting baselines AdamImptState GradientNormSamplerState
    adam_impt_sampler gradient_norm_sampler resample_proportional variance_reduction
    checkpoint sharding CheckpointManager read_checkpoint_metadata restore_checkpoint
    save_checkpoint data_parallel_mesh replicate check_key
""".split()


def _modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "version"))


def test_all_lists_only_existing_names_once():
    assert len(ab.__all__) == len(set(ab.__all__))
    missing = [name for name in ab.__all__ if not hasattr(ab, name)]
    assert not missing


def test_every_name_exported_before_is_still_exported():
    assert [name for name in NAMES_EXPORTED_BEFORE if not hasattr(ab, name)] == []
    assert set(NAMES_EXPORTED_BEFORE) - {"__version__"} <= set(ab.__all__)


def test_every_module_is_a_documented_submodule():
    """The export policy: each module of the package is reachable as ``ab.<module>``,
    listed in ``__all__``, and has a docstring."""
    for name in _modules():
        assert name in ab.__all__, name
        module = getattr(ab, name)
        assert module.__name__ == f"adambs_jax.{name}"
        assert (module.__doc__ or "").strip(), f"adambs_jax.{name} has no docstring"


def test_init_carries_no_issue_comments():
    assert "# Issue" not in (PACKAGE / "__init__.py").read_text()


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
    assert {f"adambs_jax/{m}.py" for m in _modules()} <= set(names)
    assert f"{dist_info}/entry_points.txt" not in names  # no console script
    assert "Apache License" in license_text
    assert f"Version: {ab.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    for requirement in _pyproject()["project"]["dependencies"]:
        assert f"Requires-Dist: {requirement}" in metadata
