"""The shape of the code: the import graph of src/vlp has no cycle (module-level AND function-level
imports), the layers import downwards only (architecture.md), and no module outside `vlp/methods/` names
a registered method (what differs between methods is a capability the method class declares)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vlp.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "vlp").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every vlp module `name` imports, wherever the import statement stands (functions, TYPE_CHECKING)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t in mods and t != name and not name.startswith(t + "."))
    return deps


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_layers_import_downwards():
    edges = graph()
    never = {
        "vlp.models": ("vlp.methods", "vlp.tasks", "vlp.train", "vlp.cli", "vlp.api", "vlp.build", "vlp.pretrain",
                       "vlp.finetune", "vlp.evaluate", "vlp.demo", "vlp.taskdata", "vlp.figures"),
        "vlp.methods": ("vlp.tasks", "vlp.train", "vlp.cli", "vlp.api", "vlp.build", "vlp.pretrain",
                        "vlp.finetune", "vlp.evaluate", "vlp.demo", "vlp.taskdata", "vlp.figures", "vlp.data"),
        "vlp.data": ("vlp.models", "vlp.methods", "vlp.tasks", "vlp.train", "vlp.cli", "vlp.api"),
        "vlp.tasks": ("vlp.methods", "vlp.train", "vlp.cli", "vlp.api"),
        "vlp.train": ("vlp.methods", "vlp.tasks", "vlp.cli", "vlp.api"),
    }
    wrong = [(m, d) for m, deps in edges.items() for layer, banned in never.items()
             if m == layer or m.startswith(layer + ".") for d in deps if d.startswith(banned)]
    assert not wrong, wrong
    # a method never imports another method (shared pieces move down into models/)
    methods = {m for m in edges if m.startswith("vlp.methods.") and m != "vlp.methods.base"}
    crossed = [(m, d) for m in methods for d in edges.get(m, ()) if d in methods]
    assert not crossed, crossed


def test_no_module_outside_methods_names_a_method():
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, METHODS)))
    offenders = []
    for path in (SRC / "vlp").rglob("*.py"):
        if "methods" in path.relative_to(SRC / "vlp").parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
