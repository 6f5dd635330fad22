"""The library's import graph: no cycle anywhere in src/closedloop (imports inside functions
included: they are how a cycle hides), and generation's shared types in a leaf module."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """closedloop module -> the closedloop modules it imports, anywhere in its file."""
    files = {module_name(p): p for p in (SRC / "closedloop").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                edges |= {base} | {f"{base}.{a.name}" for a in node.names}  # a module, or a name in one
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first search (none: the graph is acyclic)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_in_the_library():
    graph = import_graph()
    assert len(graph) > 50 and "closedloop.engine" in graph["closedloop.backends"]
    assert cycles(graph) == []


def test_generations_shared_types_are_a_leaf_that_every_backend_imports():
    graph = import_graph()
    assert graph["closedloop.generate"] <= {"closedloop.errors"}
    for backend in ("closedloop.hf_backend", "closedloop.engine.backend", "closedloop.structured",
                    "closedloop.label_scoring"):
        assert "closedloop.generate" in graph[backend], backend
