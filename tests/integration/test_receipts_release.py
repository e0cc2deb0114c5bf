"""Receipts and the transparency log around real releases: an in-process enclave worker releases two
joint queries, the coordinator's side records them in a SQLite-backed log with receipts and witness
co-signatures, and the reviewer's commands (``sealroom receipt verify``, ``sealroom audit verify``)
verify the exports offline, and name what was tampered with."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.app.cli import main
from sealroom.audit.log import TransparencyLog
from sealroom.audit.notes import NoteSigner, SignedCheckpoint, Witness
from sealroom.audit.store import SQLiteLogStore
from sealroom.canonical import canonical_json
from sealroom.errors import AuditError
from sealroom.keys import public_key_hex
from sealroom.planning.plan import Plan
from sealroom.signing import LogPosition
from tests.harness.enclave import EnclaveHandle, PartyData
from tests.unit.audit.test_receipts import Release, release_once

ORIGIN = "coordinator.sealroom.test/log"


def submitter(log: TransparencyLog) -> Callable[[Plan, list[PartyData]], LogPosition]:
    """What the coordinator appends before the approvals (registration, the query's submission);
    returns the query's log position, which the approvals and the enclave then sign."""

    def submit(plan: Plan, parties: list[PartyData]) -> LogPosition:
        for p in parties:
            log.append(
                "dataset_registered",
                party=p.name,
                dataset="loans",
                policy_digest=p.policies["loans"].digest(),
                owner_key_sha256=hashlib.sha256(bytes.fromhex(p.public_key_hex)).hexdigest(),
            )
        entry = log.append(
            "query_submitted",
            query_id=plan.query_id,
            analyst=plan.analyst,
            sql_sha256=hashlib.sha256(plan.sql.encode()).hexdigest(),
            plan_hash=plan.hash,
        )
        return LogPosition(entry.seq, log.size, log.root())

    return submit


def record(log: TransparencyLog, rel: Release) -> None:
    """What the coordinator appends for one query after its submission, up to its release."""
    plan, receipt = rel.plan, rel.receipt
    for a in receipt["approvals"]:
        log.append(
            "approved", query_id=plan.query_id, party=a["party"], plan_hash=a["plan_hash"], signature=a["signature"]
        )
    stage = receipt["stages"][0]
    log.append(
        "stage_executed",
        query_id=plan.query_id,
        stage=stage["id"],
        kind="tee",
        plan_hash=plan.hash,
        measurement=stage["measurement"],
        platform=stage["format"],
        simulated=stage["simulated"],
        evidence_sha256=stage["result"]["attestation"]["evidence_sha256"],
        result_doc_sha256=hashlib.sha256(canonical_json(stage["result"])).hexdigest(),
    )
    log.append_release(receipt)


@dataclass
class Audit:
    releases: list[Release]
    log: TransparencyLog
    db: sqlite3.Connection
    key: Ed25519PrivateKey
    dev_dir: Path
    directory: Path

    @property
    def key_hex(self) -> str:
        return public_key_hex(self.key)

    def export(self, name: str = "log.json") -> Path:
        path = self.directory / name
        path.write_text(json.dumps(self.log.export(), indent=1))
        return path

    def entry_of(self, qid: str, type_: str) -> int:
        for i, data in enumerate(self.log.store.entries()):
            doc = json.loads(data)
            if doc["type"] == type_ and doc["event"].get("query_id") == qid:
                return i
        raise LookupError(qid)


@pytest.fixture
def audit(enclave: EnclaveHandle, dev_dir: Path, tmp_path: Path) -> Iterator[Audit]:
    key = Ed25519PrivateKey.generate()  # the coordinator's: signs checkpoints and countersigns receipts
    db = sqlite3.connect(str(tmp_path / "coordinator.db"), isolation_level=None)
    log = TransparencyLog(SQLiteLogStore(db), NoteSigner(ORIGIN, key))
    releases = []
    for t, o in (("a", 0.0), ("b", 1000.0)):
        releases.append(release_once(enclave, dev_dir, key, tag=t, offset=o, submit=submitter(log)))
        record(log, releases[-1])
    log.append("compliance_decision", query_id=releases[0].plan.query_id, reviewer="dpo", decision="accepted")
    yield Audit(releases, log, db, key, dev_dir, tmp_path)
    db.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def _simulated(audit: Audit) -> list[str]:
    return ["--allow-simulated", "--dev-root", str(audit.dev_dir / "dev-root.crt")]


def test_receipt_verify_cli(audit: Audit, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rel = audit.releases[0]
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps(rel.receipt, indent=2))
    result = tmp_path / "result.arrow"
    result.write_bytes(rel.table)
    code, out, err = run(
        capsys, "receipt", "verify", str(receipt), "--result", str(result), "--coordinator-key", audit.key_hex,
        *_simulated(audit), "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verified"] and doc["result_file_checked"] and doc["evidence_appraised"] and doc["simulated"]
    assert doc["query_id"] == rel.plan.query_id and doc["claims"][0]["platform"] == "simulated"
    assert any("SIMULATED" in w for w in doc["warnings"])

    # The trust file an owner uses pins the measurement.
    measurement = rel.receipt["stages"][0]["measurement"]
    trust = tmp_path / "trust.toml"
    simulated = f'allow_simulated = true\ndev_root = "{audit.dev_dir}/dev-root.crt"\n'
    trust.write_text(f'[trust]\nmeasurements = ["{measurement}"]\n{simulated}')
    code, out, _ = run(
        capsys, "receipt", "verify", str(receipt), "--trust", str(trust), "--coordinator-key", audit.key_hex
    )
    assert code == 0 and "verified the receipt of query" in out
    trust.write_text(
        f'[trust]\nmeasurements = ["{"ab" * 48}"]\nallow_simulated = true\ndev_root = "{audit.dev_dir}/dev-root.crt"\n'
    )
    code, _, err = run(capsys, "receipt", "verify", str(receipt), "--trust", str(trust))
    assert code == 1 and "refused (evidence)" in err and "measurement" in err
    trust.write_text(f'[trust]\nmeasurements = ["{measurement}"]\n')
    code, _, err = run(capsys, "receipt", "verify", str(receipt), "--trust", str(trust))
    assert code == 1 and "refused (evidence)" in err and "simulated" in err

    # Another result file, another coordinator key: refused, naming the check.
    other = tmp_path / "other.arrow"
    other.write_bytes(audit.releases[1].table)
    code, out, err = run(capsys, "receipt", "verify", str(receipt), "--result", str(other), "--json")
    assert code == 1 and "refused (result_file)" in err and json.loads(out)["check"] == "result_file"
    key_file = tmp_path / "coordinator.pub"
    key_file.write_text(public_key_hex(Ed25519PrivateKey.generate()) + "\n")
    code, _, err = run(capsys, "receipt", "verify", str(receipt), "--coordinator-key", str(key_file))
    assert code == 1 and "refused (coordinator_key)" in err

    # Unusable input: exit 2.
    receipt.write_text("{not json")
    assert run(capsys, "receipt", "verify", str(receipt))[0] == 2
    assert run(capsys, "receipt", "verify", str(tmp_path / "missing.json"))[0] == 2
    assert run(capsys, "receipt", "verify", str(result), "--allow-simulated")[0] == 2


def test_audit_verify_cli_on_a_clean_log(audit: Audit, capsys: pytest.CaptureFixture[str]) -> None:
    path = audit.export()
    code, out, err = run(
        capsys, "audit", "verify", "--log", str(path), "--log-key", audit.key_hex, *_simulated(audit), "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verified"] and doc["size"] == audit.log.size == 15 and doc["receipts"] == 2
    assert doc["entries_by_type"] == {
        "dataset_registered": 4, "query_submitted": 2, "approved": 4, "stage_executed": 2, "released": 2,
        "compliance_decision": 1,
    }  # fmt: skip
    assert [r["query_id"] for r in doc["releases"]] == [r.plan.query_id for r in audit.releases]
    # The same through the installed command, in its own process.
    proc = subprocess.run(
        [sys.executable, "-c", "from sealroom.app.cli import main; main()", "audit", "verify", "--log", str(path),
         "--log-key", audit.key_hex],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "verified log coordinator.sealroom.test/log: 15 entries" in proc.stdout
    assert "not appraised" in proc.stdout
    # Unusable: not an export; a key that is no key.
    assert run(capsys, "audit", "verify", "--log", str(audit.directory / "nope.json"))[0] == 2
    assert run(capsys, "audit", "verify", "--log", str(path), "--log-key", "xyz")[0] == 2


def test_audit_verify_names_the_tampered_entry(audit: Audit, capsys: pytest.CaptureFixture[str]) -> None:
    qid = audit.releases[1].plan.query_id
    n = audit.entry_of(qid, "released")
    original = audit.log.store.entries(n, n + 1)[0]
    # One byte of a stored entry changed (inside the receipt hash it records).
    i = original.index(b'"receipt_sha256":"') + 20
    changed = original[:i] + (b"0" if original[i : i + 1] != b"0" else b"1") + original[i + 1 :]
    audit.db.execute("UPDATE tlog_entries SET entry = ? WHERE seq = ?", (changed, n))
    code, _, err = run(capsys, "audit", "verify", "--log", str(audit.export()), "--log-key", audit.key_hex)
    assert code == 1
    assert (
        f"refused (checkpoint_root): entry {n} (released, query {qid}): leaf hash not in the tree of checkpoint" in err
    )
    audit.db.execute("UPDATE tlog_entries SET entry = ? WHERE seq = ?", (original, n))
    assert run(capsys, "audit", "verify", "--log", str(audit.export()), "--log-key", audit.key_hex)[0] == 0


def test_audit_verify_names_a_swapped_receipt(audit: Audit, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = (audit.entry_of(r.plan.query_id, "released") for r in audit.releases)
    receipts = audit.log.store.receipts()
    audit.db.execute("DELETE FROM tlog_receipts")
    audit.db.execute("INSERT INTO tlog_receipts(seq, receipt) VALUES (?, ?), (?, ?)", (a, receipts[b], b, receipts[a]))
    code, _, err = run(capsys, "audit", "verify", "--log", str(audit.export()), "--log-key", audit.key_hex)
    assert code == 1 and f"refused (receipt_hash): entry {a} (released, query {audit.releases[0].plan.query_id})" in err


def test_audit_verify_checks_every_receipt(audit: Audit, capsys: pytest.CaptureFixture[str]) -> None:
    """A receipt in the log whose evidence the reviewer's trust refuses, or countersigned by another key."""
    path = audit.export()
    trust = audit.directory / "trust.toml"
    trust.write_text(
        f'[trust]\nmeasurements = ["{"ab" * 48}"]\nallow_simulated = true\ndev_root = "{audit.dev_dir}/dev-root.crt"\n'
    )
    code, _, err = run(capsys, "audit", "verify", "--log", str(path), "--log-key", audit.key_hex, "--trust", str(trust))
    first = audit.entry_of(audit.releases[0].plan.query_id, "released")
    assert code == 1 and f"refused (receipt): entry {first} (released, query {audit.releases[0].plan.query_id})" in err
    assert "its receipt does not verify (evidence)" in err
    other = public_key_hex(Ed25519PrivateKey.generate())
    code, _, err = run(
        capsys, "audit", "verify", "--log", str(path), "--log-key", audit.key_hex, "--coordinator-key", other
    )
    assert code == 1 and "does not verify (coordinator_key)" in err
    # Without pinning the log key, another key's export is only self-consistent; pinned, it is refused.
    forged = TransparencyLog(
        SQLiteLogStore(audit.directory / "forged.db"), NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    )
    forged.append("compliance_decision", query_id="q_x", reviewer="dpo", decision="accepted")
    (audit.directory / "forged.json").write_text(json.dumps(forged.export()))
    forged.store.close()  # type: ignore[attr-defined]
    assert run(capsys, "audit", "verify", "--log", str(audit.directory / "forged.json"))[0] == 0
    code, _, err = run(
        capsys, "audit", "verify", "--log", str(audit.directory / "forged.json"), "--log-key", audit.key_hex
    )
    assert code == 1 and "refused (checkpoint_signature): checkpoint 0" in err


def test_witnesses_cosign_and_a_fork_shown_to_one_owner_is_caught(
    audit: Audit, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each owner's agent co-signs after checking consistency with what it saw; a reviewer pins their keys.
    Then the coordinator rewrites history for the next release: the witness refuses it, and the reviewer,
    holding the witness's checkpoint, refuses the rewritten export."""
    log = audit.log
    witnesses = {name: Witness(NoteSigner(f"{name}.witness", Ed25519PrivateKey.generate()), log.signer.verifier)
                 for name in ("bank_a", "bank_b")}  # fmt: skip
    for w in witnesses.values():  # their first checkpoint: nothing to be consistent with yet
        log.add_cosigned(w.cosign(log.checkpoint()))
    keys = [f"{w.signer.name}={w.signer.verifier.public_key.hex()}" for w in witnesses.values()]
    args = ["audit", "verify", "--log", str(audit.export()), "--log-key", audit.key_hex]
    code, out, err = run(capsys, *args, *[x for k in keys for x in ("--witness-key", k)], "--json")
    assert code == 0, err
    assert json.loads(out)["witnessed_size"] == log.size
    seen = tmp_path / "bank_a.checkpoint"
    seen.write_text(witnesses["bank_a"].state())

    # A new event the witnesses did not co-sign yet: a quorum of both now fails, the quorum of 0 does not.
    log.append("compliance_decision", query_id=audit.releases[1].plan.query_id, reviewer="dpo", decision="flagged")
    code, _, err = run(capsys, "audit", "verify", "--log", str(audit.export()), "--log-key", audit.key_hex,
                       *[x for k in keys for x in ("--witness-key", k)])  # fmt: skip
    assert code == 1 and "refused (witness_quorum)" in err
    proof = log.consistency_proof(witnesses["bank_a"].latest.checkpoint.size)  # type: ignore[union-attr]
    log.add_cosigned(witnesses["bank_a"].cosign(log.checkpoint(), proof=proof))

    # The coordinator rewrites the first release's entry in a copy of history it shows bank_b.
    rewritten_db = sqlite3.connect(str(tmp_path / "rewritten.db"), isolation_level=None)
    rewritten = TransparencyLog(SQLiteLogStore(rewritten_db), log.signer)
    for data in log.store.entries()[:5]:
        doc = json.loads(data)
        rewritten.append(doc["type"], **doc["event"])
    rewritten.append(
        "compliance_decision", query_id=audit.releases[0].plan.query_id, reviewer="dpo", decision="withdrawn"
    )
    while rewritten.size < log.size:
        rewritten.append("compliance_decision", query_id="q_pad", reviewer="dpo", decision="accepted")
    with pytest.raises(AuditError) as info:
        bank_b_size = witnesses["bank_b"].latest.checkpoint.size  # type: ignore[union-attr]
        witnesses["bank_b"].cosign(rewritten.checkpoint(), proof=rewritten.consistency_proof(bank_b_size))
    assert info.value.details["check"] == "consistency_proof"
    path = tmp_path / "rewritten.json"
    path.write_text(json.dumps(rewritten.export()))
    rewritten_db.close()
    assert run(capsys, "audit", "verify", "--log", str(path), "--log-key", audit.key_hex)[0] == 0  # consistent alone
    code, _, err = run(
        capsys, "audit", "verify", "--log", str(path), "--log-key", audit.key_hex, "--checkpoint", str(seen)
    )
    assert code == 1 and "refused (fork)" in err
    assert SignedCheckpoint.from_text(seen.read_text()).checkpoint.size == 15


def test_audit_verify_refuses_a_release_bound_to_another_entry_than_its_submission(
    enclave: EnclaveHandle, dev_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinator that binds a release to a log position that is not the query's submission (the
    owners and the enclave signed what it showed them, so the receipt alone verifies): the log
    verification names the release."""
    key = Ed25519PrivateKey.generate()
    db = sqlite3.connect(str(tmp_path / "coordinator.db"), isolation_level=None)
    log = TransparencyLog(SQLiteLogStore(db), NoteSigner(ORIGIN, key))
    honest = submitter(log)

    def elsewhere(plan: Plan, parties: list[PartyData]) -> LogPosition:
        position = honest(plan, parties)
        return LogPosition(0, position.tree_size, position.root_hash)  # entry 0: a registration

    rel = release_once(enclave, dev_dir, key, tag="x", submit=elsewhere)
    record(log, rel)
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log.export()))
    code, _, err = run(capsys, "audit", "verify", "--log", str(path), "--log-key", public_key_hex(key))
    assert code == 1 and "refused (release_log_position)" in err and "not the query_submitted entry" in err
    db.close()
