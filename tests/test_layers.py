"""The house's floors: each package imports only the floors below it, and no module imports
itself back through others. Every import counts, the lazy ones inside functions and the
type-checking ones too: a loop a lazy import hides is still a loop."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each package and the packages it may import (every one below it).
FLOORS: dict[str, set[str]] = {
    "runtime": set(),
    "retriever": {"runtime"},
    "reranker": {"retriever", "runtime"},
    "service": {"reranker", "retriever", "runtime"},
    "clients": {"retriever", "runtime"},
    "rankd": {"service", "clients", "reranker", "retriever", "runtime"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in FLOORS:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports() -> dict[str, set[str]]:
    """Each module's imports of other rankd modules (the longest module each names)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            targets |= {t for t in map(owner, names) if t and t != module}
        edges[module] = targets
    return edges


def test_every_package_imports_only_the_floors_below_it() -> None:
    wrong = sorted((module, target) for module, targets in _imports().items()
                   for target in targets
                   if target.split(".")[0] != module.split(".")[0]
                   and target.split(".")[0] not in FLOORS[module.split(".")[0]])
    assert not wrong, f"imports that climb or cross floors: {wrong}"


def test_no_module_imports_itself_back() -> None:
    edges = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not loops, f"import loops: {loops}"
