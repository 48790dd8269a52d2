"""The layering contract: imports point one way, and no modules import each other in a circle.

Read from the source with ``ast`` (nothing is imported), every import counts: module level,
inside functions, and under ``if TYPE_CHECKING:``. The arrows (DESIGN.md, "Layout"):

    compression  <-  agents, latency_models  <-  engine  <-  service  ->  db
    modeltailor.client / modeltailor: none of them (the SDK talks REST)
    modeltailor.cli: engine and below; service and db only inside the admin commands
        that start or administer a server (imported when the command runs)

Cycles are found among module-level imports that run (``TYPE_CHECKING`` ones do not).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("compression", "agents", "latency_models", "engine", "service", "db", "modeltailor")
BELOW_ENGINE = {"compression", "agents", "latency_models"}
ALLOWED: dict[str, set[str]] = {
    "compression": set(),
    "agents": {"compression"},
    "latency_models": {"compression"},
    "engine": BELOW_ENGINE,
    "service": {"engine", "db"} | BELOW_ENGINE,
    "db": set(),
    "modeltailor": set(),  # the SDK: modeltailor/__init__.py and client.py
    "modeltailor.cli": {"engine"} | BELOW_ENGINE,
}
# Functions of modeltailor.cli that may import service and db when they run: the commands
# that start a server or a worker, or administer the server's database.
CLI_ADMIN_COMMANDS = {"serve", "worker", "create_tenant_cmd"}

# Arrows that still point the wrong way, as (importing module, imported module). Each entry
# must still be needed (the test fails once it is fixed, so that it is removed here).
KNOWN_VIOLATIONS: set[tuple[str, str]] = {
    # service.app reads ``modeltailor.__version__`` for the OpenAPI document; the version
    # belongs in package metadata (importlib.metadata) or a module below service.
    ("service.app", "modeltailor"),
}
# Import cycles that still exist (sorted module names of each); same rule as above.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    function: str | None  # the enclosing function, None at module level
    type_only: bool  # under ``if TYPE_CHECKING:``


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> Iterator[Import]:
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, function: str | None, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, function, type_only)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                for alias in child.names:
                    # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` mod.
                    sub = f"{base}.{alias.name}"
                    yield Import(module, sub if sub in MODULES else base, child.lineno, function, type_only)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, function or child.name, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), function, True)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), function, type_only)
            else:
                yield from visit(child, function, type_only)

    yield from visit(ast.parse(path.read_text(), str(path)), None, False)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return "modeltailor.cli" if module.startswith("modeltailor.cli") else top


def _product(target: str) -> str | None:
    top = target.split(".")[0]
    return top if top in PRODUCT else None


def _allowed(imp: Import) -> bool:
    target = _product(imp.target)
    layer = _layer(imp.importer)
    if target is None or target == imp.importer.split(".")[0]:
        return True  # a third-party module, or the importer's own package (the CLI may use the SDK)
    if layer == "modeltailor.cli" and target in ("service", "db"):
        return imp.function in CLI_ADMIN_COMMANDS
    return target in ALLOWED[layer]


def _violations() -> dict[tuple[str, str], list[Import]]:
    found: dict[tuple[str, str], list[Import]] = {}
    for imp in IMPORTS:
        if not _allowed(imp):
            found.setdefault((imp.importer, imp.target), []).append(imp)
    return found


def _cycles() -> set[tuple[str, ...]]:
    """Strongly connected components of two or more modules (Tarjan), over running module-level imports."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        runs_on_import = imp.function is None and not imp.type_only
        if runs_on_import and imp.target in MODULES and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_import_reader_sees_every_kind_of_import() -> None:
    """Guards the reader itself: function-level, TYPE_CHECKING and relative imports are all seen."""
    seen: dict[tuple[str, str], list[Import]] = {}
    for imp in IMPORTS:
        seen.setdefault((imp.importer, imp.target), []).append(imp)
    # run_job and export_candidate load the torch side when called
    assert {i.function for i in seen[("engine.job", "engine.run")]} == {"run_job", "export_candidate"}
    spec_agents = {(i.function, i.type_only) for i in seen[("engine.spec", "agents")]}
    assert spec_agents == {(None, True), ("objective", False)}  # a type hint, and the lazy import
    assert [i.function for i in seen[("modeltailor.cli.service_cmds", "service.app")]] == ["serve"]
    assert len(MODULES) > 100


def test_imports_point_one_way() -> None:
    found = _violations()
    new = {
        f"{imp.importer} -> {imp.target} (line {imp.line}{f', in {imp.function}()' if imp.function else ''})"
        for key, imps in found.items()
        if key not in KNOWN_VIOLATIONS
        for imp in imps
    }
    assert not new, "imports against the layering (DESIGN.md, Layout):\n" + "\n".join(sorted(new))


def test_known_violations_are_still_needed() -> None:
    fixed = KNOWN_VIOLATIONS - set(_violations())
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(fixed)}"


def test_no_import_cycles() -> None:
    cycles = _cycles()
    new, fixed = sorted(cycles - KNOWN_CYCLES), sorted(KNOWN_CYCLES - cycles)
    assert not new, f"modules importing each other at import time: {new}"
    assert not fixed, f"fixed, remove from KNOWN_CYCLES: {fixed}"


@pytest.mark.parametrize("module", ["engine.spec", "modeltailor.client", "modeltailor"])
def test_light_modules_stay_light(module: str) -> None:
    """The CLI and the SDK load these without torch (read transitively, at module level)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages' __init__ run first
        for imp in IMPORTS:
            if imp.importer == current and imp.function is None and not imp.type_only:
                assert imp.target.split(".")[0] != "torch", f"{module} imports torch through {current}"
                if imp.target in MODULES:
                    todo.append(imp.target)
