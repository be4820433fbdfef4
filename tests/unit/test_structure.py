"""The shim's structure: no import cycle, counting every import (lazy ones inside
functions and those only for type checking too: each is a dependency of design),
and rooms of a livable size."""

from __future__ import annotations

import ast
from pathlib import Path

SHIM = Path(__file__).resolve().parents[2] / "shim"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SHIM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for p in SHIM.rglob("*.py") if "_pb" not in p.relative_to(SHIM).parts
    }


def _resolve(name: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """The shim modules that importing `name` from `importer` depends on: it and its
    parent packages, except the importer's own packages (a submodule importing a
    sibling by its full name is inside its package, not above it)."""
    own = {".".join(importer.split(".")[:end]) for end in range(1, importer.count(".") + 1)}
    found = set()
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if candidate in modules and candidate not in own:
            found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                graph[name] |= _resolve(target, name, modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "shim.pod" in graph["shim.task"]
    assert "shim.bundle" in graph["shim.delete"] and "shim.bundle" in graph["shim.cli"]
    assert "shim.delete" in graph["shim.cli"]  # a lazy import inside a function counts


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_shim_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


MAX_CLASS_LINES = 400
MAX_POD_LINES = 300  # pod.py is a facade: sandbox.py and container.py do the work


def test_no_class_is_too_big() -> None:
    big = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big.append(f"{name}.{node.name}: {lines} lines")
    assert big == []


def test_pod_stays_a_facade() -> None:
    assert len((SHIM / "pod.py").read_text().splitlines()) <= MAX_POD_LINES
