"""The import graph of the package: one role per folder, arrows only downward, no cycle.

Every import counts, including imports inside functions (deferring an import hides a cycle
but does not remove it) and imports for type checking only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package name (strategies/, scenarios/ and edge/ are mapped into the clbench namespace)
FOLDERS = {"clbench": "clbench", "strategies": "clbench.strategies", "scenarios": "clbench.scenarios",
           "edge": "clbench.edge"}

# Layers from the bottom; a module may import only modules of its own layer or below.
LAYERS = [
    ("foundation", ["clbench._version", "clbench._discovery", "clbench.errors", "clbench.types", "clbench.config",
                    "clbench.registry", "clbench.metrics", "clbench.datasets", "clbench.distributed"]),
    ("models", ["clbench.models"]),
    ("strategy contract", ["clbench.base"]),
    ("tasks", ["clbench.tasks"]),
    ("reporting", ["clbench.reporting"]),
    ("components", ["clbench.strategies", "clbench.scenarios", "clbench.auxiliary", "clbench.edge"]),
    ("engine", ["clbench.engine"]),
    ("entry points", ["clbench.cli", "clbench"]),
]
FOLDER_PACKAGES = ("clbench.engine", "clbench.reporting", "clbench.models", "clbench.tasks", "clbench.strategies",
                   "clbench.scenarios", "clbench.edge", "clbench.auxiliary")


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def imported(name: str, path: Path, known: dict[str, Path] = MODULES) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # attribute paths: the longest module prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"module {module} is in no layer; add it to LAYERS"
    return best[0]


def folder_of(module: str) -> str:
    return next((p for p in FOLDER_PACKAGES if module == p or module.startswith(p + ".")), module)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_walk_sees_the_package():
    assert {"clbench.engine.runner", "clbench.reporting.leaderboard", "clbench.models.buffers", "clbench.tasks.detection",
            "clbench.strategies.er", "clbench.scenarios.digits", "clbench.edge.profiler"} <= set(MODULES)
    assert "clbench.models.freeze" in GRAPH["clbench.models.adapters"]
    assert "clbench.reporting.leaderboard" in GRAPH["clbench.reporting.plots"]
    assert "clbench.base" in GRAPH["clbench.strategies.er"]


def test_no_import_cycle_between_modules():
    assert cycles(GRAPH) == []


def test_no_import_cycle_between_folders():
    folders: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        folders.setdefault(folder_of(a), set()).update(folder_of(b) for b in targets if folder_of(b) != folder_of(a))
    assert cycles(folders) == []


def test_imports_point_only_downward():
    upward = sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                    for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_model_code_knows_no_strategy():
    offenders = sorted(m for m in MODULES if m.startswith("clbench.models.")
                       and GRAPH[m] & {"clbench.base", "clbench.engine.runner"} | {s for s in GRAPH[m] if s.startswith("clbench.strategies")})
    assert offenders == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_an_import_inside_a_function_is_an_edge(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from clbench.engine import runner\n    return runner\n")
    assert imported("clbench.models.fake", path) == {"clbench.engine.runner"}
    assert layer("clbench.engine.runner") > layer("clbench.models.fake")
