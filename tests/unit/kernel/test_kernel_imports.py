"""The kernel's own modules (``sealroom/*.py`` and ``sealroom/attestation/``) import one another
without a cycle and without another module's private names, lazy and type-checking imports included
(read from the source with the walker of ``tests/unit/test_boundaries.py``; nothing is imported)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_boundaries import REPO, imports_of, module_name, room_of


def kernel_files() -> list[Path]:
    return sorted(p for p in (REPO / "sealroom").rglob("*.py") if "v1" not in p.parts and _is_kernel(p))


def _is_kernel(path: Path) -> bool:
    return room_of(module_name(path)) == "kernel" and module_name(path) != "sealroom"


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module -> the kernel modules it imports (a name imported from a package counts as its module)."""
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        for imp in imports_of(path):
            for target in (imp.target, *(f"{imp.target}.{n}" for n in imp.names)):
                if target in modules and target != imp.module:
                    graph[imp.module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), package __init__ edges
    to their own submodules excluded (a package re-exporting its modules is not a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def edges(v: str) -> set[str]:
        return {w for w in graph[v] if not w.startswith(v + ".")}

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_kernel_has_no_import_cycle() -> None:
    graph = import_graph(kernel_files())
    assert "sealroom.attestation.appraisal" in graph["sealroom.attestation.hardware"]  # not a vacuous pass
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package importing its own submodule


def test_no_kernel_module_imports_a_private_name() -> None:
    private = [
        f"{imp.path.relative_to(REPO)}:{imp.line}: {imp.module} imports {imp.target}.{name}"
        for path in kernel_files()
        for imp in imports_of(path)
        for name in imp.names
        if name.startswith("_") and not name.startswith("__") and imp.target != imp.module
    ]
    assert private == []
