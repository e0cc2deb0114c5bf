"""Done-when of the compliance kernel in the platform: ``sealroom demo --state-dir DIR`` followed by
``sealroom audit verify --state-dir DIR`` exits 0, and exits 1 naming the entry after any one byte
of a stored entry is changed in the coordinator's SQLite database."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sealroom.app.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("demo") / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "demo", "--scenario", "bank", "--state-dir", str(state), "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    released = [q for q in json.loads(proc.stdout)["queries"] if q["status"] == "released"]
    assert len(released) == 2
    return state


def verify(capsys: pytest.CaptureFixture[str], state: Path) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["audit", "verify", "--state-dir", str(state)])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_demo_then_audit_verify_exits_0(demo_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "verify", "--state-dir", str(demo_dir),
         "--allow-simulated", "--dev-root", str(demo_dir / "bank" / "dev" / "dev-root.crt")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 release receipt(s) verified" in proc.stdout
    assert "2 released" in proc.stdout and "2 stage_executed" in proc.stdout and "3 dataset_registered" in proc.stdout


def test_one_changed_byte_in_a_stored_entry_is_named(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_path = demo_dir / "bank" / "coordinator" / "coordinator.db"
    db = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        seq = 6  # an entry in the middle of the log
        (original,) = db.execute("SELECT entry FROM tlog_entries WHERE seq = ?", (seq,)).fetchone()
        original = bytes(original)
        positions = sorted({0, 1, len(original) // 3, len(original) // 2, len(original) - 2, len(original) - 1})
        for pos in positions:
            changed = bytearray(original)
            changed[pos] ^= 0x01
            db.execute("UPDATE tlog_entries SET entry = ? WHERE seq = ?", (bytes(changed), seq))
            code, _, err = verify(capsys, demo_dir)
            assert code == 1, (pos, err)
            assert f"entry {seq}" in err, (pos, err)
            assert "refused (checkpoint_root)" in err or "refused (entry_format)" in err, (pos, err)
        db.execute("UPDATE tlog_entries SET entry = ? WHERE seq = ?", (original, seq))
        assert verify(capsys, demo_dir)[0] == 0

        # A swapped receipt: the second release's receipt stored under the first release's entry.
        rows = db.execute("SELECT seq, receipt FROM tlog_receipts ORDER BY seq").fetchall()
        (first, first_receipt), (_, second_receipt) = rows
        db.execute("UPDATE tlog_receipts SET receipt = ? WHERE seq = ?", (second_receipt, first))
        code, _, err = verify(capsys, demo_dir)
        assert code == 1 and "refused (receipt_hash)" in err and f"entry {first}" in err
        db.execute("UPDATE tlog_receipts SET receipt = ? WHERE seq = ?", (first_receipt, first))

        # A deleted entry.
        db.execute("DELETE FROM tlog_entries WHERE seq = ?", (seq,))
        code, _, err = verify(capsys, demo_dir)
        assert code == 1 and "refused (entry_sequence)" in err
        db.execute("INSERT INTO tlog_entries(seq, entry) VALUES (?, ?)", (seq, original))
        assert verify(capsys, demo_dir)[0] == 0
    finally:
        db.close()


def test_the_html_report_renders_in_a_headless_browser(demo_dir: Path, chromium: str, tmp_path: Path) -> None:
    """The reviewer's report, opened in a real browser (Debian's chromium, headless): per release its
    id, verification status, query, approvals and execution are on the rendered page, and the page
    loads nothing from anywhere else."""
    import re

    report = tmp_path / "audit.html"
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "export", "--format", "html", "--state-dir", str(demo_dir),
         "-o", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "list", "--state-dir", str(demo_dir), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    releases = doc["releases"] if isinstance(doc, dict) else doc
    ids = [r["query_id"] for r in releases]
    assert len(ids) == 2
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run"]
    dom = subprocess.run([*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert "<title>Sealroom audit report</title>" in rendered
    for qid in ids:
        section = rendered[rendered.index(f'id="{qid}"') :]
        section = section[: section.index("</section>")]
        assert f"Release {qid}" in section and "Verification: <span" in section and ">verified<" in section
        assert "Approvals" in section and "Execution" in section and "SELECT" in section
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", rendered)  # self-contained
    shot = tmp_path / "audit.png"
    png = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert png.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_record_of_processing_renders_in_a_headless_browser(demo_dir: Path, chromium: str, tmp_path: Path) -> None:
    """`sealroom audit ropa` on the demo's state: the collaboration and the owners' declarations that
    the demo's configs and policies carry, both releases as processing activities, the planner's
    refusals counted, and a self-contained page that a real browser renders."""
    import re

    as_json = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "ropa", "--state-dir", str(demo_dir), "--format", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["format"] == "sealroom.ropa" and doc["version"] == 1
    (rec,) = doc["records"]
    assert rec["log"]["status"] == "verified" and rec["declaration"]["matches_log"] is True
    assert rec["collaboration"]["purpose"] == "credit_risk_statistics"
    assert [d["party"] for d in rec["datasets"]] == ["bank_a", "bank_b", "bank_c"]
    assert all(d["processing"]["legal_basis"] == "legitimate_interests" for d in rec["datasets"])
    assert [g["check"] for g in rec["gaps"]] == ["simulated_attestation"]
    assert rec["summary"]["releases"] == 2 and rec["summary"]["queries_refused"] == 2
    ids = [a["query_id"] for a in rec["activities"]]

    report = tmp_path / "ropa.html"
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "ropa", "--state-dir", str(demo_dir), "--format", "html",
         "-o", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gaps: simulated_attestation" in proc.stderr
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run"]
    dom = subprocess.run([*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert "<title>Record of processing activities</title>" in rendered
    assert "Cross-bank credit risk study (synthetic demo)" in rendered
    for heading in ("Controllers", "Datasets and categories of data", "Recipients", "Processing activities",
                    "Transfers", "Technical and organisational measures", "Gaps"):  # fmt: skip
        assert f"{heading}" in rendered
    assert "Bank A (synthetic demo organisation)" in rendered and "legitimate_interests" in rendered
    for qid in ids:
        assert qid in rendered
    assert "SELECT" not in rendered  # no SQL text (it may hold literals): the receipts have it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", rendered) and "<script" not in rendered
    shot = tmp_path / "ropa.png"
    png = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert png.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # The reviewer's audit report lists the planner's refusals next to the releases.
    audit = tmp_path / "audit.html"
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "export", "--format", "html", "--state-dir", str(demo_dir),
         "-o", str(audit)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    page = audit.read_text()
    section = page[page.index('id="withdrawals"') :]
    assert "Refused queries and withdrawn approvals (2)" in section and section.count("query_refused") == 2
    assert "Log history" in page
