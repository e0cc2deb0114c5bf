"""The shape of the product's code, read from the source (nothing is imported): no import cycle
between modules, no module importing another module's private name, and no file or function too
long to read. Generated wire stubs (``sealroom/v1``) are not product code and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_boundaries import REPO, Import, imports_of, module_name, project_modules, source_files

MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 80
PRODUCT_DIRS = ("sealroom", "coordinator", "enclave_worker", "connectors", "mpc", "benchmarks", "scripts")


def product_files() -> list[Path]:
    files = []
    for folder in PRODUCT_DIRS:
        files += [p for p in sorted((REPO / folder).rglob("*.py")) if "v1" not in p.relative_to(REPO).parts]
    return files


def _project_target(target: str, modules: set[str]) -> str | None:
    """The project module an import lands on (the longest known prefix of ``target``), or None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def landings(imp: Import, modules: set[str]) -> set[str]:
    """The project modules one import arrow lands on: ``from pkg import sub`` lands on the submodule
    ``pkg.sub`` where there is one, ``from mod import name`` on ``mod``."""
    out = set()
    subs = {f"{imp.target}.{n}" for n in imp.names}
    if not imp.names or not subs <= modules:
        out.add(_project_target(imp.target, modules))
    out |= subs & modules
    return {m for m in out if m is not None and m != imp.module}


def import_graph() -> dict[str, set[str]]:
    modules = set(project_modules())
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in source_files():
        for imp in imports_of(path):
            graph[imp.module] |= landings(imp, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    # not a vacuous pass: the graph has the arrows, lazy and package ones included
    assert "sealroom.attestation.appraisal" in graph["sealroom.attestation.hardware"]
    assert "coordinator.servicer" in graph["sealroom.app.cli.serve"]
    assert "connectors.agent.party" in graph["connectors.agent"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def private_names_used(path: Path, source: str, modules: set[str]) -> list[str]:
    """Where the module at ``path`` takes another project module's private (``_name``) name:
    ``from mod import _name``, or ``mod._name`` through a module it imported."""
    own = module_name(path)
    rel = path.relative_to(REPO)
    found = []
    aliases: dict[str, str] = {}  # local name -> project module
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.asname and a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            target = _project_target(node.module, modules)
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif target not in (None, own) and a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{rel}:{node.lineno}: {own} imports {node.module}.{a.name}")
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id, own) != own
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{rel}:{node.lineno}: {own} uses {aliases[node.value.id]}.{node.attr}")
    return found


def private_imports() -> list[str]:
    modules = set(project_modules())
    return [f for path in source_files() for f in private_names_used(path, path.read_text(encoding="utf-8"), modules)]


def test_no_module_imports_another_modules_private_name() -> None:
    assert private_imports() == []


def too_long() -> list[str]:
    found = []
    for path in product_files():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        lines = text.count("\n")
        if lines > MAX_FILE_LINES:
            found.append(f"{rel}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_file_or_function_too_long_to_read() -> None:
    assert too_long() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from sealroom.errors import _private\n", ["imports sealroom.errors._private"]),
        ("from sealroom import errors\nerrors._private()\n", ["uses sealroom.errors._private"]),
        ("import sealroom.errors as e\ne._private\n", ["uses sealroom.errors._private"]),
        ("from sealroom.errors import SealroomError\nfrom sealroom import errors\nerrors.__name__\n", []),
    ],
)
def test_the_private_name_check_sees_each_form(source: str, expected: list[str]) -> None:
    found = private_names_used(REPO / "sealroom" / "probe.py", source, set(project_modules()))
    assert len(found) == len(expected), found
    for line, want in zip(found, expected, strict=True):
        assert want in line
