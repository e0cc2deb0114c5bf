"""Receipts and a log written by the code before the restructuring still verify (tests/data/receipts,
whose README says how they were made): the one canonical JSON encoder writes the bytes the old
encoders signed, for ASCII documents and for a policy holding non-ASCII text, and the export's
format name is the one old exports carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sealroom.app.cli import main
from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.audit.log import load_export
from sealroom.audit.notes import NoteVerifier, SignedCheckpoint
from sealroom.audit.receipts import load_receipt, receipt_sha256, verify_receipt
from sealroom.audit.verify import verify_log
from sealroom.canonical import canonical_json
from sealroom.errors import AuditError

DATA = Path(__file__).resolve().parents[1] / "data" / "receipts"
TAGS = ("ascii", "non-ascii")


def sealroom(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return int(info.value.code or 0)


def stored(tag: str) -> dict:
    return load_receipt((DATA / f"receipt-{tag}.json").read_bytes())


def appraisal(receipt: dict) -> AppraisalPolicy:
    measurements = frozenset(s["measurement"] for s in receipt["stages"])
    root = load_root_certificate(DATA / "dev-root.crt")
    return AppraisalPolicy(measurements=measurements, allow_simulated=True, simulated_roots=(root,))


def test_the_non_ascii_receipt_really_holds_non_ascii_text() -> None:
    text = (DATA / "receipt-non-ascii.json").read_text(encoding="utf-8")
    assert "Données de santé" in text and "Hôpital Saint-Éloi" in text
    assert all(c.isascii() for c in (DATA / "receipt-ascii.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("tag", TAGS)
def test_todays_encoder_writes_the_bytes_the_old_code_wrote(tag: str) -> None:
    data = (DATA / f"receipt-{tag}.json").read_bytes()
    assert canonical_json(json.loads(data)) + b"\n" == data


@pytest.mark.parametrize("tag", TAGS)
def test_sealroom_receipt_verify_accepts_an_old_receipt(tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sealroom("receipt", "verify", str(DATA / f"receipt-{tag}.json")) == 0
    assert f"verified the receipt of query q_old_{tag.replace('-', '_')}" in capsys.readouterr().out


@pytest.mark.parametrize("tag", TAGS)
def test_an_old_receipt_verifies_pinned_and_appraised_with_its_result(
    tag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = sealroom(
        "receipt", "verify", str(DATA / f"receipt-{tag}.json"), "--json",
        "--coordinator-key", str(DATA / "coordinator.pub"),
        "--allow-simulated", "--dev-root", str(DATA / "dev-root.crt"),
        "--result", str(DATA / f"result-{tag}.arrow"),
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verified"] is True
    assert out["coordinator_key_pinned"] and out["evidence_appraised"] and out["result_file_checked"]


@pytest.mark.parametrize("tag", TAGS)
def test_an_old_receipt_with_one_byte_changed_is_refused(tag: str) -> None:
    receipt = stored(tag)
    receipt["query"]["sql"] += " "
    key = (DATA / "coordinator.pub").read_text().strip()
    with pytest.raises(AuditError) as info:
        verify_receipt(receipt, appraisal=appraisal(receipt), coordinator_key=key)
    assert info.value.details["check"] == "plan_summary"


def test_sealroom_audit_verify_accepts_the_old_log(capsys: pytest.CaptureFixture[str]) -> None:
    code = sealroom(
        "audit", "verify", "--json", "--log", str(DATA / "log.json"),
        "--log-key", str(DATA / "log.vkey"), "--checkpoint", str(DATA / "checkpoint.txt"),
        "--allow-simulated", "--dev-root", str(DATA / "dev-root.crt"),
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verified"] is True and out["log_key_pinned"] is True
    assert out["receipts"] == 2 and out["size"] == 12


def test_the_old_log_records_the_stored_receipts() -> None:
    export = load_export((DATA / "log.json").read_bytes())
    assert export["format"] == "sealroom.tlog-export"
    key = NoteVerifier.from_vkey((DATA / "log.vkey").read_text())
    trusted = SignedCheckpoint.from_text((DATA / "checkpoint.txt").read_text())
    report = verify_log(export, log_key=key, trusted=[trusted])
    recorded = {r["query_id"]: r["receipt_sha256"] for r in report.releases}
    assert recorded == {f"q_old_{t.replace('-', '_')}": receipt_sha256(stored(t)) for t in TAGS}
