"""kdcli's modules import only modules below them: no cycle, no upward import.

Every import counts, the ones inside functions and under ``TYPE_CHECKING`` included, because a
function-level import that points up is a cycle waiting for its first caller. ``LAYERS`` is the
house plan, top to bottom (docs/design.md describes each module); modules in one layer may not
import each other. A new module must be placed here, which is the point: decide where it lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kdcli

PACKAGE = Path(kdcli.__file__).parent

LAYERS: list[list[str]] = [
    ["kdcli.cli"],
    ["kdcli.pipeline"],
    ["kdcli.tune", "kdcli.push"],
    ["kdcli.card", "kdcli.export"],
    ["kdcli.bench", "kdcli.evaluate", "kdcli.distill", "kdcli.report", "kdcli.catalogue"],
    ["kdcli.teachers"],
    ["kdcli.roles"],
    ["kdcli.train", "kdcli.cache", "kdcli.data.stage"],
    ["kdcli.tasks"],
    ["kdcli.tasks.choice"],
    ["kdcli.tasks.classify", "kdcli.tasks.generate"],
    ["kdcli.tasks.base"],
    ["kdcli.job", "kdcli.exported"],
    ["kdcli.models", "kdcli.metrics"],
    ["kdcli.data"],
    ["kdcli.data.prepare"],
    ["kdcli.data.transfer"],
    ["kdcli.data.read", "kdcli.data.split"],
    ["kdcli.data.generic", "kdcli.data.store"],
    ["kdcli.data.hub", "kdcli.data.fpb", "kdcli.data.winogrande", "kdcli.data.socialiqa", "kdcli.data.aqua",
     "kdcli.data.triviaqa", "kdcli.data.messages"],
    ["kdcli.data.fields"],
    ["kdcli.data.files"],
    ["kdcli.losses", "kdcli.rundir", "kdcli.runtime", "kdcli.lora", "kdcli.batching", "kdcli.progress",
     "kdcli.timing"],
    ["kdcli.recipe"],
    ["kdcli.errors"],
    ["kdcli"],
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kdcli modules ``name`` imports anywhere in its file: ``from kdcli.data import x`` is
    kdcli.data, and kdcli.data.x too when that is a module (as ../shared/tools/import_cycles.py counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), "a module is listed twice in LAYERS"
    assert sorted(set(modules()) - set(placed)) == [], "place these modules in tests/test_layers.py LAYERS"
    assert sorted(set(placed) - set(modules())) == [], "LAYERS names modules that no longer exist"


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_point_down():
    rank = {name: depth for depth, layer in enumerate(LAYERS) for name in layer}
    wrong = [f"{source} -> {target}" for source, targets in sorted(graph().items()) for target in sorted(targets)
             if source in rank and target in rank and rank[target] <= rank[source]]
    assert wrong == [], "imports that point up (or across a layer):\n" + "\n".join(wrong)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "losses.py"
    path.write_text("def f():\n    from kdcli import cli, tasks\n    if cli:\n        import kdcli.data.files\n")
    assert imports("kdcli.losses", path, set(modules())) == {"kdcli", "kdcli.cli", "kdcli.tasks", "kdcli.data.files"}


def test_the_checker_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
