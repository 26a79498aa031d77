"""The house's joints: no import cycles, the coordinator side never reaches into the trial side, small modules.

Imports are read from the source (module level and inside functions), so a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"optagent": ROOT / "agent", "optagent.plugins": ROOT / "plugins", "optagent.workers": ROOT / "workers"}
# the coordinator side runs in the `optagent search` process: it builds the space and talks to Optuna, the
# database and the executors, and must not load the trial side (torch, models) or the plugins' internals
COORDINATOR_SIDE = ("optagent.search", "optagent.api", "optagent.job", "optagent.protocol")
TRIAL_SIDE = ("optagent.trial",)
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if "__pycache__" not in path.parts:
                found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.add(child if child in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _packages_of(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    trimmed = {m: {d for d in deps if d not in _packages_of(m)} for m, deps in graph.items()}
    assert _cycles(trimmed) == []


def test_the_coordinator_side_does_not_import_the_trial_side() -> None:
    graph = _graph()
    wrong = {m: sorted(d for d in deps if d.startswith(TRIAL_SIDE) or d.startswith("optagent.plugins._"))
             for m, deps in graph.items() if m.startswith(COORDINATOR_SIDE)}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
