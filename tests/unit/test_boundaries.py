"""The dependency arrows of DESIGN.md's component table, checked by reading the source (nothing is imported).

| package          | may import                 |
|------------------|----------------------------|
| sealroom kernel  | third-party only           |
| coordinator      | kernel, mpc (planning)     |
| enclave_worker   | kernel, mpc adapter (hybrid plans: never mpc.player/program, never MPyC) |
| mpc              | kernel                     |
| connectors       | kernel, mpc                |
| composition root | everything (sealroom.cli, client, demo, demo_data, cluster, output) |

Every ``import``/``from ... import`` anywhere in a file counts (also inside functions: a lazy
import is still an arrow), relative imports are resolved, and so are ``importlib.import_module``
and ``__import__`` calls with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("sealroom", "coordinator", "enclave_worker", "connectors", "mpc")
COMPONENTS = frozenset({"coordinator", "enclave_worker", "connectors", "mpc"})
COMPOSITION_ROOT = frozenset({f"sealroom.{m}" for m in ("cli", "client", "demo", "demo_data", "cluster", "output")})
FORBIDDEN: dict[str, frozenset[str]] = {
    "sealroom": COMPONENTS,  # the kernel imports no component
    "coordinator": frozenset({"enclave_worker", "connectors"}),
    "enclave_worker": frozenset({"coordinator", "connectors", "pandas", "mpyc"}),
    "connectors": frozenset({"coordinator", "enclave_worker"}),
    "mpc": frozenset({"coordinator", "enclave_worker", "connectors"}),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. enclave_worker.jobs
    path: Path
    line: int
    target: str  # the imported module, absolute

    @property
    def top(self) -> str:
        return self.target.split(".")[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    module = _module_name(path)
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node.level, node.module)
            out.append(Import(module, path, node.lineno, target))
            if node.module is None:  # from . import x: each name is a module of the package
                out += [Import(module, path, node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append(Import(module, path, node.lineno, node.args[0].value))
    return out


def source_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return files


def violations() -> list[str]:
    found = []
    for path in source_files():
        for imp in imports_of(path):
            owner = imp.module.split(".")[0]
            if imp.module in COMPOSITION_ROOT:
                continue
            if imp.top in FORBIDDEN[owner]:
                rel = path.relative_to(REPO)
                where = "the kernel" if owner == "sealroom" else owner
                found.append(f"{rel}:{imp.line}: {imp.module} imports {imp.target} ({where} must not import {imp.top})")
    return found


def test_no_forbidden_import_arrow() -> None:
    assert violations() == []


# What the enclave worker may use of mpc/ (its player for hybrid plans): the partials, the player's
# identity and the adapter that starts ``python -m mpc.player`` as its own process. Never the
# modules that import MPyC (whose runtime reads sys.argv on import).
ENCLAVE_MPC = frozenset({"mpc.bounds", "mpc.partials", "mpc.result", "mpc.session", "mpc.spec", "mpc.tls"})


def test_enclave_worker_uses_only_the_mpc_adapter() -> None:
    used = set()
    for path in source_files():
        for imp in imports_of(path):
            if imp.module.startswith("enclave_worker") and imp.top == "mpc":
                assert imp.target in ENCLAVE_MPC, f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}"
                used.add(imp.target)
    assert "mpc.session" in used  # the walker sees the enclave's player (not a vacuous pass)
    for module in ENCLAVE_MPC:  # ...and none of those modules reaches MPyC
        for imp in imports_of(REPO / (module.replace(".", "/") + ".py")):
            assert imp.top != "mpyc" and imp.target not in ("mpc.player", "mpc.program"), (
                f"{module} imports {imp.target}"
            )


def test_coordinator_and_enclave_worker_never_import_each_other() -> None:
    for path in source_files():
        for imp in imports_of(path):
            pair = {imp.module.split(".")[0], imp.top}
            assert pair != {"coordinator", "enclave_worker"}, f"{path.relative_to(REPO)}:{imp.line}"


def test_the_walker_sees_imports() -> None:
    """Guard against a vacuous pass: the walker finds real arrows, relative and lazy ones included."""
    assert len(source_files()) > 20
    jobs = {i.target for i in imports_of(REPO / "enclave_worker" / "jobs.py")}
    assert {"sealroom.plan", "sealroom.sealed", "enclave_worker.engine"} <= jobs
    cli = {i.target for i in imports_of(REPO / "sealroom" / "cli.py")}
    assert "coordinator.server" in cli and "connectors.agent" in cli  # lazy imports inside functions


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("sealroom/attestation/policy.py", "from .simulated import x", "sealroom.attestation.simulated"),
        ("sealroom/attestation/__init__.py", "from . import policy", "sealroom.attestation.policy"),
        ("sealroom/attestation/policy.py", "from .. import plan", "sealroom.plan"),
        ("sealroom/plan.py", "import importlib\nimportlib.import_module('coordinator.store')", "coordinator.store"),
        ("sealroom/plan.py", "def f():\n    from enclave_worker import jobs", "enclave_worker"),
    ],
)
def test_the_walker_resolves(path: str, source: str, expected: str) -> None:
    assert expected in {i.target for i in imports_of(REPO / path, source)}
