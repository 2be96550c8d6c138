"""The import graph of softserve has no cycle: a module never needs, even lazily or for typing only,
a module that needs it back (two modules that need each other are one module, or want a seam)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str = "softserve") -> dict[str, set[str]]:
    """module -> the softserve modules it imports anywhere in its file (module level, in functions,
    under TYPE_CHECKING): each import resolves to the longest name that is a module of the package."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        here = module.split(".") if is_package else module.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
                # `from pkg import mod` needs mod; `from pkg import name` needs pkg itself (its __init__)
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for end in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:end])
                    if candidate in paths:
                        if candidate != module:
                            targets.add(candidate)
                        break
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_of_softserve_has_no_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, " -> ".join(cycle)


def test_the_check_sees_a_cycle_even_a_lazy_or_typing_only_one(tmp_path):
    package = tmp_path / "softserve"
    (package / "jobs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs" / "__init__.py").write_text("")
    (package / "jobs" / "manager.py").write_text("def run():\n    from .runner import JobRun\n")
    (package / "jobs" / "runner.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from softserve.jobs.manager import run\n")
    (package / "other.py").write_text("from softserve.jobs import manager\nfrom softserve import jobs\nimport softserve.x\n")
    graph = import_graph(tmp_path)
    assert graph["softserve.other"] == {"softserve.jobs", "softserve.jobs.manager", "softserve"}
    assert find_cycle(graph) == ["softserve.jobs.manager", "softserve.jobs.runner", "softserve.jobs.manager"]
    (package / "jobs" / "runner.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path)) is None
