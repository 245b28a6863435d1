"""No module of the package imports another that imports it back, at run time.

The imports are read from the source with :mod:`ast`: top-level ones and those inside
function bodies (a function-level import hides a cycle, it does not remove it); imports
under ``if TYPE_CHECKING:`` are left out, since they never run. A cycle is a strongly
connected component of more than one module in the graph of these imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hetgraph

PACKAGE = Path(hetgraph.__file__).parent
PACKAGE_NAME = "hetgraph"

#: Cycles still present, each as the sorted tuple of its modules, with why it is allowed
#: for now. An entry that no longer matches a cycle fails the test, so the list only shrinks.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST):
    """Every ``import``/``from`` node of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_targets(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports at run time."""
    importer = module_name(path)
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            source = _absolute(node, importer, path.name == "__init__.py")
            # `from package import submodule` imports the submodule; any other name
            # comes from the package's ``__init__``.
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        targets.update(name for name in names if name in modules)
    targets.discard(importer)
    return targets


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): import_targets(path, modules) for path in paths}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the package is deeper than nothing, shallower than
    the recursion limit, but an explicit stack keeps that from mattering)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def import_cycles() -> list[tuple[str, ...]]:
    return sorted(
        tuple(sorted(component))
        for component in strongly_connected_components(import_graph())
        if len(component) > 1
    )


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [("a", "b", "c")]),
        ({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}, [("c", "d")]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_components_of_small_graphs(graph, expected):
    found = [tuple(sorted(c)) for c in strongly_connected_components(graph) if len(c) > 1]
    assert sorted(found) == expected


def test_function_level_imports_count_and_type_checking_ones_do_not(tmp_path):
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from hetgraph.b import B\n"
        "def f():\n    from . import c\n    from .d import thing\n    import hetgraph.e\n"
    )
    path = PACKAGE / "a.py"
    tree_targets = set()
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            tree_targets.add(_absolute(node, module_name(path), is_package=False))
        else:
            tree_targets.update(alias.name for alias in node.names)
    assert tree_targets == {"typing", "hetgraph", "hetgraph.d", "hetgraph.e"}


def test_no_runtime_import_cycles_inside_the_package():
    cycles = import_cycles()
    unexpected = [cycle for cycle in cycles if cycle not in ALLOWED_CYCLES]
    assert unexpected == [], "modules that import each other at run time: " + "; ".join(
        " <-> ".join(cycle) for cycle in unexpected
    )
    stale = [cycle for cycle in ALLOWED_CYCLES if cycle not in cycles]
    assert stale == [], f"allowed cycles that are gone (remove them from the list): {stale}"
