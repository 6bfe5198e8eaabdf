"""Old import paths, kept for one release: each one warns (``DeprecationWarning``) and
resolves to the object's new home, as optax keeps moved names behind a module
``__getattr__``.

Two kinds of old paths: modules that no longer exist (``adambs_jax.exp3``,
``adambs_jax.train_step``, ...: a finder on ``sys.meta_path`` answers ``import`` and
``from ... import`` with a module that forwards every attribute to the new private module)
and names that a face no longer exports (``ab.probabilities``, ``ab.FEEDBACK_KINDS``, ...:
the face's ``__getattr__``). CHANGELOG.md lists every move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["OLD_MODULES", "install", "forwarding_getattr"]

OLD_MODULES: dict[str, tuple[str, str]] = {
    # old module: (the modules that hold its names now, comma-separated, searched in order;
    # where to import them from)
    "adambs_jax.adam_impt": ("adambs_jax.samplers._adam_impt", "adambs_jax.samplers"),
    "adambs_jax.base": ("adambs_jax.samplers._base", "adambs_jax.samplers"),
    "adambs_jax.baselines": (
        "adambs_jax.samplers,adambs_jax.samplers._adam_impt",
        "adambs_jax.samplers",
    ),
    "adambs_jax.checkpoint_metadata": ("adambs_jax.checkpoint._metadata", "adambs_jax.checkpoint"),
    "adambs_jax.checkpoint_restore": ("adambs_jax.checkpoint._restore", "adambs_jax.checkpoint"),
    "adambs_jax.checkpoint_storage": ("adambs_jax.checkpoint._storage", "adambs_jax.checkpoint"),
    "adambs_jax.checks": ("adambs_jax._checks", "adambs_jax"),
    "adambs_jax.estimators": ("adambs_jax.feedback._estimators", "adambs_jax.feedback"),
    "adambs_jax.exp3": ("adambs_jax.samplers._exp3", "adambs_jax.samplers"),
    "adambs_jax.exp3_bound": ("adambs_jax.samplers._exp3", "adambs_jax.samplers"),
    "adambs_jax.exp3_config": ("adambs_jax.samplers._exp3", "adambs_jax.samplers"),
    "adambs_jax.exp3_health": ("adambs_jax.samplers._exp3", "adambs_jax.samplers"),
    "adambs_jax.ghost": ("adambs_jax.feedback.ghost", "adambs_jax.feedback.ghost"),
    "adambs_jax.ghost.api": ("adambs_jax.feedback.ghost._api", "adambs_jax.feedback.ghost"),
    "adambs_jax.ghost.layer_norms": (
        "adambs_jax.feedback.ghost._layer_norms",
        "adambs_jax.feedback.ghost",
    ),
    "adambs_jax.ghost.linen": ("adambs_jax.feedback.ghost._linen", "adambs_jax.feedback.ghost"),
    "adambs_jax.ghost.nnx": ("adambs_jax.feedback.ghost._nnx", "adambs_jax.feedback.ghost"),
    "adambs_jax.ghost.rules": ("adambs_jax.feedback.ghost._rules", "adambs_jax.feedback.ghost"),
    "adambs_jax.ghost.sites": ("adambs_jax.feedback.ghost._sites", "adambs_jax.feedback.ghost"),
    "adambs_jax.grain_source": ("adambs_jax.host._grain_source", "adambs_jax.host"),
    "adambs_jax.gradient_norm": ("adambs_jax.samplers._gradient_norm", "adambs_jax.samplers"),
    "adambs_jax.groups": ("adambs_jax.samplers._groups", "adambs_jax.samplers"),
    "adambs_jax.host_loop": ("adambs_jax.host._loop", "adambs_jax.host"),
    "adambs_jax.host_step": ("adambs_jax.host._step", "adambs_jax.host"),
    "adambs_jax.infobatch": ("adambs_jax.samplers._infobatch", "adambs_jax.samplers"),
    "adambs_jax.jsonable": ("adambs_jax._jsonable", "adambs_jax"),
    "adambs_jax.losses": ("adambs_jax.feedback._losses", "adambs_jax.feedback"),
    "adambs_jax.model_state": ("adambs_jax.feedback._model_state", "adambs_jax.feedback"),
    "adambs_jax.per_example": ("adambs_jax.feedback._per_example", "adambs_jax.feedback"),
    "adambs_jax.preconditioner": ("adambs_jax.feedback._preconditioner", "adambs_jax.feedback"),
    "adambs_jax.priority": ("adambs_jax.samplers._priority", "adambs_jax.samplers"),
    "adambs_jax.projection": ("adambs_jax.samplers._projection", "adambs_jax.samplers"),
    "adambs_jax.scored_draws": ("adambs_jax.samplers._scored_draws", "adambs_jax.samplers"),
    "adambs_jax.scoring": (
        "adambs_jax.feedback._scoring,adambs_jax.samplers._base,adambs_jax._tree_utils",
        "adambs_jax.feedback",
    ),
    "adambs_jax.sources": ("adambs_jax.host._sources", "adambs_jax.host"),
    "adambs_jax.step_stages": ("adambs_jax.step._stages", "adambs_jax.step"),
    "adambs_jax.sumtree": ("adambs_jax.samplers._sumtree", "adambs_jax.samplers"),
    "adambs_jax.train_loop": ("adambs_jax.step._loop", "adambs_jax.step"),
    "adambs_jax.train_state": ("adambs_jax.step._state", "adambs_jax.step"),
    "adambs_jax.train_step": (
        "adambs_jax.step._train_step,adambs_jax.step._options,adambs_jax.step._state,"
        "adambs_jax._checks",
        "adambs_jax.step",
    ),
    "adambs_jax.tree_utils": ("adambs_jax._tree_utils", "adambs_jax"),
    "adambs_jax.uniform": ("adambs_jax.samplers._uniform", "adambs_jax.samplers"),
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new} "
        f"(CHANGELOG.md lists the moves)",
        DeprecationWarning,
        stacklevel=3,
    )


class _ForwardingModule(types.ModuleType):
    """An old module: every attribute is the one of the module that holds it now."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for holder in _holders(self.__name__):
            module = importlib.import_module(holder)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for h in _holders(self.__name__) for n in dir(importlib.import_module(h))})


def _holders(old: str) -> list[str]:
    return OLD_MODULES[old][0].split(",")


class _OldModuleLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _ForwardingModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        _warn(module.__name__, OLD_MODULES[module.__name__][1])


class _OldModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in OLD_MODULES:
            return None
        is_package = any(other.startswith(fullname + ".") for other in OLD_MODULES)
        return importlib.machinery.ModuleSpec(fullname, _OldModuleLoader(), is_package=is_package)


def install() -> None:
    """Puts the finder of old module paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _OldModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldModuleFinder())


def forwarding_getattr(face: str, moved: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A face's module ``__getattr__``: an old name in ``moved`` (name -> (the module that
    holds it now, what to use instead)) warns and resolves; an old submodule of ``face``
    (``ab.exp3``) is imported through the finder, which warns; any other unknown name is an
    ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        if name in moved:
            holder, home = moved[name]
            _warn(f"{face}.{name}", home)
            return getattr(importlib.import_module(holder), name)
        if f"{face}.{name}" in OLD_MODULES:
            return importlib.import_module(f"{face}.{name}")
        raise AttributeError(f"module {face!r} has no attribute {name!r}")

    return __getattr__
