"""The docs name real code: every Python file or code folder the README and docs/ point to exists,
and no doc still names a module by a path it had before the restructuring (ADR 0005)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").rglob("*.md")])
ROOTS = ("sealroom", "coordinator", "enclave_worker", "connectors", "mpc", "tests", "benchmarks", "scripts", "proto")
# A path into the tree: ends in .py or names a folder (trailing slash).
PATH = re.compile(r"(?<![\w./-])((?:{})/(?:[\w-]+/)*(?:[\w-]+\.py|))(?![\w/])".format("|".join(ROOTS)))
# Modules that moved: naming one of these (as a module, not as a longer name, and not as a quoted
# document format such as "sealroom.ropa" or "sealroom.tlog-export") is out of date.
MOVED = (
    "sealroom.plan",
    "sealroom.sqlplan",
    "sealroom.disclosure",
    "sealroom.tlog",
    "sealroom.receipts",
    "sealroom.audit_events",
    "sealroom.ropa",
    "sealroom.client",
    "sealroom.output",
    "sealroom.demo",
    "sealroom.demo_data",
    "sealroom.cluster",
    "sealroom.local",
    "mpc.spec",
    "mpc.bounds",
    "coordinator.server",
    "connectors.databases",
)
OLD = re.compile(r"(?<![\w.\"])({})(?![\w\"-])".format("|".join(re.escape(m) for m in MOVED)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_code_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = sorted({m.group(1) for m in PATH.finditer(text) if not (REPO / m.group(1)).exists()})
    # Decision records describe the state they changed, old names included.
    old = [] if doc.parent.name == "adr" else sorted({m.group(1) for m in OLD.finditer(text)})
    assert missing == [], f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"
    assert old == [], f"{doc.relative_to(REPO)} names modules by their old paths: {old}"


def test_the_path_check_reads_paths() -> None:
    text = "see `sealroom/planning/plan.py`, mpc/ and tests/unit/ (not sealroom/v1/approval), sealroom.plan"
    assert {m.group(1) for m in PATH.finditer(text)} == {"sealroom/planning/plan.py", "mpc/", "tests/unit/"}
    others = ', sealroom.planning.plan, sealroom.local_platform, "sealroom.ropa", "sealroom.tlog-export"'
    assert {m.group(1) for m in OLD.finditer(text + others)} == {"sealroom.plan"}
