"""The house rules of the library's imports, read from the source (so that docs/architecture.md
keeps only the prose): floors, no cycles, no imports of the library inside functions, nothing
from experiments/.

Floors, lowest first: the ground floor (``version``, ``_checks``, ``_jsonable``,
``_tree_utils``, ``_deprecated``, ``transforms``, ``sharding``), then ``samplers``,
``feedback``, ``step``, ``host``, ``checkpoint``, and the face ``adambs_jax/__init__.py`` on
top. A module imports only from its own floor or below.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "adambs_jax"
FLOORS = ["", "samplers", "feedback", "step", "host", "checkpoint", "__face__"]
OPTIONAL_IMPORTS_INSIDE_FUNCTIONS = {"grain", "array_record"}  # the [data] extra


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _floor(module: str) -> int:
    if module == "adambs_jax":
        return FLOORS.index("__face__")
    sub = module.split(".")[1]
    return FLOORS.index(sub) if sub in FLOORS else 0


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The library modules an ``import`` names (a name that is a submodule counts as one)."""
    if node.level:
        base = module.split(".")
        if not MODULES[module].name == "__init__.py":
            base = base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("adambs_jax"):
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    names_of_target = len(submodules) < len(node.names)  # some name is not a submodule
    return submodules + ([target] if names_of_target or not submodules else [])


def _imports(module: str, *, inside_functions: bool):
    tree = ast.parse(MODULES[module].read_text())
    functions = [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    inner = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if (id(node) in inner) != inside_functions:
            continue
        if isinstance(node, ast.ImportFrom):
            yield node, _resolve(module, node)
        elif isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]


def _graph() -> dict[str, set[str]]:
    return {
        module: {
            target
            for _, targets in _imports(module, inside_functions=False)
            for target in targets
            if target.startswith("adambs_jax") and target != module
        }
        for module in MODULES
    }


def test_no_module_of_the_library_is_imported_inside_a_function():
    found = [
        (module, targets)
        for module in MODULES
        for _, targets in _imports(module, inside_functions=True)
        if any(t.split(".")[0] not in OPTIONAL_IMPORTS_INSIDE_FUNCTIONS for t in targets)
        and any(t.startswith("adambs_jax") for t in targets)
    ]
    assert not found, found


def test_imports_inside_functions_are_optional_dependencies_only():
    found = [
        (module, targets)
        for module in MODULES
        for _, targets in _imports(module, inside_functions=True)
        if not all(t.split(".")[0] in OPTIONAL_IMPORTS_INSIDE_FUNCTIONS for t in targets)
    ]
    assert not found, found


def test_the_import_graph_has_no_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target) :] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_every_module_imports_only_from_its_floor_or_below():
    upward = [
        f"{module} (floor {FLOORS[_floor(module)] or 'ground'}) imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(module)
    ]
    assert not upward, upward


def test_the_library_never_imports_experiments():
    found = [
        module
        for module in MODULES
        for inside in (False, True)
        for _, targets in _imports(module, inside_functions=inside)
        if any(t.split(".")[0] == "experiments" for t in targets)
    ]
    assert not found, found


def test_the_rules_see_the_imports():
    """Not vacuous: the step imports the samplers, the checkpoints the step."""
    graph = _graph()
    assert any(t.startswith("adambs_jax.samplers") for t in graph["adambs_jax.step._stages"])
    assert any(t.startswith("adambs_jax.step") for t in graph["adambs_jax.checkpoint._metadata"])
    assert len(MODULES) > 40
