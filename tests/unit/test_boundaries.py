"""The rooms of DESIGN.md and the arrows between them, checked by reading the source (nothing is
imported). A module's room is given by its folder, never by a list of module names:

| room             | folder                                    | may import                          |
|------------------|-------------------------------------------|-------------------------------------|
| kernel           | ``sealroom/`` outside the three below     | third-party only                    |
| planning         | ``sealroom/planning/``                    | kernel                              |
| audit            | ``sealroom/audit/``                       | kernel, planning                    |
| mpc              | ``mpc/``                                  | kernel, planning                    |
| enclave_worker   | ``enclave_worker/``                       | kernel, planning, the mpc adapter   |
| coordinator      | ``coordinator/``                          | kernel, planning, audit, mpc        |
| connectors       | ``connectors/``                           | kernel, planning, audit, mpc        |
| app              | ``sealroom/app/`` (and ``sealroom/cli.py``, the console script's old entry point) | everything |

Every ``import``/``from ... import`` anywhere in a file counts (also inside functions: a lazy
import is still an arrow), relative imports are resolved, and so are ``importlib.import_module``
and ``__import__`` calls with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("sealroom", "coordinator", "enclave_worker", "connectors", "mpc")
ROOMS = ("kernel", "planning", "audit", "mpc", "enclave_worker", "coordinator", "connectors", "app")
MAY_IMPORT: dict[str, frozenset[str]] = {
    "kernel": frozenset({"kernel"}),
    "planning": frozenset({"kernel", "planning"}),
    "audit": frozenset({"kernel", "planning", "audit"}),
    "mpc": frozenset({"kernel", "planning", "mpc"}),
    "enclave_worker": frozenset({"kernel", "planning", "mpc", "enclave_worker"}),
    "coordinator": frozenset({"kernel", "planning", "audit", "mpc", "coordinator"}),
    "connectors": frozenset({"kernel", "planning", "audit", "mpc", "connectors"}),
    "app": frozenset(ROOMS),
}
# Third-party packages a room must never load (the enclave's TCB stays small; MPyC only in players).
NEVER: dict[str, frozenset[str]] = {"enclave_worker": frozenset({"pandas", "mpyc"})}


def room_of(module: str) -> str | None:
    """The room of a project module (``None``: not ours, a third-party or standard library module)."""
    parts = module.split(".")
    if parts[0] in ("coordinator", "enclave_worker", "connectors", "mpc"):
        return parts[0]
    if parts[0] != "sealroom":
        return None
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("planning", "audit"):
        return sub
    if sub in ("app", "cli"):
        return "app"
    return "kernel"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. enclave_worker.jobs
    path: Path
    line: int
    target: str  # the imported module, absolute
    names: tuple[str, ...] = ()  # for `from target import a, b`: a, b

    @property
    def top(self) -> str:
        return self.target.split(".")[0]


def module_name(path: Path) -> str:
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
    module = module_name(path)
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node.level, node.module)
            out.append(Import(module, path, node.lineno, target, tuple(a.name for a in node.names)))
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


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in source_files()}


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(REPO)}:{imp.line}: {imp.module} imports {imp.target}"


def violations(files: Iterable[Path] | None = None) -> list[str]:
    found = []
    for path in files if files is not None else source_files():
        for imp in imports_of(path):
            owner = room_of(imp.module)
            assert owner is not None
            target = room_of(imp.target)
            if target is not None and target not in MAY_IMPORT[owner]:
                found.append(f"{_where(imp)} ({owner} must not import {target})")
            if imp.top in NEVER.get(owner, ()):
                found.append(f"{_where(imp)} ({owner} must never load {imp.top})")
    return found


def test_every_module_is_in_a_room_and_the_rooms_are_the_folders() -> None:
    rooms = {room_of(m) for m in project_modules()}
    assert rooms == set(ROOMS)
    for folder, room in (("sealroom/planning", "planning"), ("sealroom/audit", "audit"), ("sealroom/app", "app")):
        assert (REPO / folder / "__init__.py").is_file()
        assert all(room_of(module_name(p)) == room for p in (REPO / folder).rglob("*.py"))


def test_no_import_arrow_runs_up_a_layer() -> None:
    assert violations() == []


# What the enclave worker may use of mpc/ (its player for hybrid plans): the partials, the player's
# identity and the adapter that starts ``python -m mpc.player`` as its own process. Never the
# modules that import MPyC (whose runtime reads sys.argv on import).
ENCLAVE_MPC = frozenset({"mpc.partials", "mpc.result", "mpc.session", "mpc.tls"})


def test_enclave_worker_uses_only_the_mpc_adapter() -> None:
    used = set()
    for path in source_files():
        for imp in imports_of(path):
            if imp.module.startswith("enclave_worker") and imp.top == "mpc":
                assert imp.target in ENCLAVE_MPC, _where(imp)
                used.add(imp.target)
    assert "mpc.session" in used  # the walker sees the enclave's player (not a vacuous pass)
    for module in ENCLAVE_MPC:  # ...and none of those modules reaches MPyC
        for imp in imports_of(REPO / (module.replace(".", "/") + ".py")):
            assert imp.top != "mpyc" and imp.target not in ("mpc.player", "mpc.program"), _where(imp)


def test_coordinator_and_enclave_worker_never_import_each_other() -> None:
    for path in source_files():
        for imp in imports_of(path):
            pair = {imp.module.split(".")[0], imp.top}
            assert pair != {"coordinator", "enclave_worker"}, _where(imp)


def test_the_walker_sees_imports() -> None:
    """Guard against a vacuous pass: the walker finds real arrows, relative and lazy ones included."""
    assert len(source_files()) > 20
    jobs = {i.target for i in imports_of(REPO / "enclave_worker" / "jobs.py")}
    assert {"sealroom.planning.plan", "sealroom.sealed", "enclave_worker.engine"} <= jobs
    serve = {i.target for i in imports_of(REPO / "sealroom" / "app" / "cli" / "serve.py")}
    assert "coordinator.servicer" in serve and "connectors.agent" in serve  # lazy imports inside functions


def test_a_wrong_arrow_is_caught(tmp_path: Path) -> None:
    """The check itself fails on each kind of wrong arrow (so its passing means something)."""
    bad = {
        "sealroom/policy.py": "from sealroom.planning.plan import Plan",
        "sealroom/planning/plan.py": "def f():\n    from sealroom.audit import receipts",
        "sealroom/audit/receipts.py": "import coordinator.store",
        "enclave_worker/jobs.py": "from connectors import agent",
        "mpc/session.py": "from sealroom.app import cli",
    }
    for rel, source in bad.items():
        path = REPO / rel
        found = [v for v in violations([path]) if "must not import" in v]
        assert found == [], found  # the real file is clean...
        module = module_name(path)
        imports = imports_of(path, source)
        owner = room_of(module)
        assert owner is not None
        assert any(room_of(i.target) not in MAY_IMPORT[owner] for i in imports), rel  # ...the bad one is not


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("sealroom/attestation/policy.py", "from .simulated import x", "sealroom.attestation.simulated"),
        ("sealroom/attestation/__init__.py", "from . import policy", "sealroom.attestation.policy"),
        ("sealroom/planning/checks.py", "from .. import policy", "sealroom.policy"),
        (
            "sealroom/planning/plan.py",
            "import importlib\nimportlib.import_module('coordinator.store')",
            "coordinator.store",
        ),
        ("sealroom/planning/plan.py", "def f():\n    from enclave_worker import jobs", "enclave_worker"),
    ],
)
def test_the_walker_resolves(path: str, source: str, expected: str) -> None:
    assert expected in {i.target for i in imports_of(REPO / path, source)}
