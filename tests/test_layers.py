"""The floor plan holds: each package imports only from its own layer and the ones below, no
module imports itself back through others, and no module grows past one screenful of jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# lowest first; a module may import from its own layer and the layers before it
LAYERS = [
    ("ground", ["pipeline.errors", "pipeline.records", "pipeline.keys", "pipeline.atomic",
                "pipeline.faults", "pipeline.secrets"]),
    ("state", ["pipeline.state"]),
    ("job", ["pipeline.job"]),
    ("readers", ["pipeline.readers"]),
    ("chunking", ["pipeline.chunking"]),
    ("plan", ["pipeline.plan"]),
    ("embedders", ["pipeline.embedders"]),
    ("sinks", ["pipeline.sinks"]),
    ("run", ["pipeline.run"]),
    ("commands", ["pipeline.commands"]),
    ("cli", ["pipeline.cli", "pipeline"]),
]
# Type-only imports load nothing; the one kind allowed upward: the plug-in settings' make()
# naming what it returns (the job file's sections sit below the stages they configure).
TYPE_ONLY_UPWARD = {("pipeline.job.sections", "pipeline.embedders.base"),
                    ("pipeline.job.sections", "pipeline.sinks.base")}
MAX_LINES = 360


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, module
    return best[0]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(imports that run, imports under ``if TYPE_CHECKING:``) of pipeline modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    run, typed = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "pipeline" or name.startswith("pipeline."):
                (typed if id(node) in typing_only else run).add(name)
    return run, typed


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_never_up(module: str) -> None:
    run, typed = _imports(MODULES[module])
    mine = _layer(module)
    up = sorted(m for m in run if _layer(m) > mine)
    assert not up, f"{module} ({LAYERS[mine][0]}) imports from a layer above it: {up}"
    up_typed = sorted(m for m in typed if _layer(m) > mine and (module, m) not in TYPE_ONLY_UPWARD)
    assert not up_typed, f"{module}: type-only imports from above: {up_typed}"


def test_no_import_cycle() -> None:
    # A package's lazy factory importing one of its own modules is no cycle: Python has
    # loaded the package before any of its modules.
    graph = {m: {i for i in _imports(p)[0] if i in MODULES and i != m
                 and not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, p in MODULES.items()}
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_does_one_job(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines > {MAX_LINES}; split it along its jobs"
