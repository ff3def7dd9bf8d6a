"""Imports inside alrun go one way, from higher layers to lower ones, and never in a cycle.

types/errors/io -> data -> detectors/engine -> acquisition/supervision/oracle/pool -> loop -> cli.
A module may import its own layer or lower ones. A new top-level module not listed here is
treated as loop-level (it may import everything but the CLI; no lower layer may import it).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

LAYERS = {
    "alrun.types": 0, "alrun.errors": 0, "alrun.io": 0, "alrun.progress": 0, "alrun.params": 0,
    "alrun.seeding": 0, "alrun.distributed": 0, "alrun.resolvers": 0,
    "alrun.data": 1,
    "alrun.detectors": 2, "alrun.engine": 2,
    "alrun.acquisition": 3, "alrun.supervision": 3, "alrun.oracle": 3, "alrun.pool": 3,
    "alrun.budget": 3, "alrun.metrics": 3, "alrun.recorded_oracle": 3, "alrun.annotation": 3,
    "alrun.truth": 3, "alrun.regions": 3,
    "alrun.loop": 4, "alrun.rundir": 4, "alrun.ranks": 4, "alrun.resume": 4,
    "alrun.cli": 5, "alrun.config": 5, "alrun.report": 5, "alrun.callbacks": 5,
}  # fmt: skip


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return 4


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alrun"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alrun"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((REPO / "alrun").rglob("*.py"))}


def test_no_import_goes_up_a_layer():
    upward = [
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in graph().items()
        for dep in sorted(deps)
        if layer(dep) > layer(mod)
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    modules = set(edges)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(edges.get(mod, ())):
            dep = dep if dep in modules else dep.rsplit(".", 1)[0]
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [mod, dep])
            elif dep in modules and dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(modules):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_layer_rules_catch_an_upward_import():
    assert layer("alrun.data.coco") == 1 and layer("alrun.acquisition.context") == 3
    assert layer("alrun.newthing") == 4 and layer("alrun.cli") > layer("alrun.loop")
