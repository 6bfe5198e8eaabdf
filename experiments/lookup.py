"""Looking a name up in one of the experiments' registries (configurations, methods, models),
with one error for an unknown name: a KeyError that lists the known ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(
    registry: Mapping[str, T], name: str, kind: str, known: Iterable[str] | None = None
) -> T:
    """``registry[name]``; KeyError ``unknown <kind> 'name'; known: ...`` (``known``, default
    the registry's names in order) if it has no such name."""
    if name not in registry:
        names = registry if known is None else known
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(names)}")
    return registry[name]
