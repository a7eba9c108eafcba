"""No import cycles between the project's modules, type-only imports included.

Every ``.py`` file of the source packages is parsed with :mod:`ast`; every ``import`` and
``from ... import`` anywhere in it (module level, inside functions, under ``TYPE_CHECKING``) is an
edge to the project module it names (``from a.b import c`` is an edge to ``a.b.c`` when that is a
module, else to ``a.b``). A cycle is a strongly connected component of more than one module, or a
module importing itself. The layering between the top-level packages is checked here too
(docs/CONTRACTS.md "Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "service", "training", "cli", "benchmarks")
# top-level package -> the project packages it may import (besides itself)
LAYERS = {
    "models": set(),
    "service": {"models"},
    "training": {"models"},
    "benchmarks": {"models", "service", "training"},
    "cli": {"models", "service", "training", "benchmarks"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in files:  # `import a.b.c` where c is an attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                elif target == name:
                    graph[name].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_type_only_and_function_level_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d"]]
    project = import_graph()
    assert "models.index" in project["models.search.beam"]
    assert len(project) > 100


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, f"import cycles (break them by moving the shared part down a layer): {found}"


def package_graph(graph: dict[str, set[str]], root: str) -> dict[str, set[str]]:
    """The graph between ``root``'s direct parts (a sub-package, or a module at its root)."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module.split(".")[0] != root:
            continue
        parts.setdefault(part(module), set()).update(
            part(t) for t in targets if t.split(".")[0] == root and part(t) != part(module)
        )
    return parts


def test_sub_packages_import_each_other_without_cycles() -> None:
    """The rooms of ``models`` and ``service`` (and of every package) form no circle either: a
    sub-package's docstring can say what it may import, and the tree reads as the diagram."""
    graph = import_graph()
    found = {root: cycles(package_graph(graph, root)) for root in PACKAGES}
    assert not any(found.values()), f"sub-package cycles: { {k: v for k, v in found.items() if v} }"
    assert "service.engine" in package_graph(graph, "service")["service.http"]  # the graph sees them


def test_packages_import_only_the_layers_below() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] != module.split(".")[0]
        and target.split(".")[0] not in LAYERS[module.split(".")[0]]
    )
    assert not wrong, f"imports against the layering: {wrong}"
