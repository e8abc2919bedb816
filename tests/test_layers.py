"""Imports point one way: down the layers, and never in a cycle.

Every ``import`` in ``src/dpalign`` is read with ``ast`` (module level, inside functions and
inside ``TYPE_CHECKING`` blocks alike), each module is mapped to its layer, and an import of
a higher layer fails the test with its ``file:line``. A second test builds the graph of
imports between dpalign's modules and fails on any cycle, naming the modules in it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dpalign"

# Bottom to top: a module may import from its own layer or the layers below it.
LAYERS = ("io", "track", "world", "data", "models", "losses", "privacy", "eval", "online", "rl",
          "train", "pretrain", "diagnostics", "audit", "study", "report", "cli")
# Modules whose layer is not their package's name (``dpalign.<package>...``): the top-level
# utilities are the bottom layer.
LAYER_OF = {
    "dpalign": "io",
    "dpalign.io": "io",
    "dpalign.progress": "io",
    "dpalign.config": "io",
    "dpalign.kernels": "io",
    "dpalign.rundir": "io",
    "dpalign.cli": "cli",
    # the public API gathers every layer; ``dpalign.__getattr__`` forwards to it on first use
    # (importlib, not an import statement: the package itself stays at the bottom)
    "dpalign.api": "cli",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _layer(module: str) -> str:
    if module in LAYER_OF:
        return LAYER_OF[module]
    package = module.split(".")[1]
    assert package in LAYERS, f"{module}: package {package!r} has no layer in {LAYERS}"
    return package


def _resolve(module: str, target: str) -> str:
    """The dpalign module ``target`` names: itself if it is a module, else its package."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    assert target in MODULES, f"{module} imports {target!r}, which is not a dpalign module"
    return target


def _imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, imported dpalign module) for every import statement anywhere in ``module``."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        targets = {_resolve(module, n) for n in names if n.split(".")[0] == PACKAGE}
        yield from ((node.lineno, target) for target in sorted(targets))


def _graph() -> dict[str, set[str]]:
    return {m: {t for _, t in _imports(m) if t != m} for m in MODULES}


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{MODULES[m].relative_to(SRC)}:{line} ({_layer(m)}) -> {target} ({_layer(target)})"
        for m in MODULES
        for line, target in _imports(m)
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(m))
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one cycle, all its modules) per strongly connected component of 2+ modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(_cycle_in(graph, set(c)), sorted(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A closed path start -> ... -> start through the component (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parent:
                    parent[succ] = node
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"no cycle through {sorted(component)}")


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    lines = [f"{' -> '.join(cycle)}  (all in the cycle: {', '.join(c)})" for cycle, c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_cycle_finder_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    assert _cycles({"a": {"b"}, "b": set()}) == []
