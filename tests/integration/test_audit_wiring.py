"""The compliance kernel in the running platform: a real coordinator (its own process) logs every
step of a real release in its SQLite database, countersigns the release's receipt with its log key,
serves it to the analyst, and a reviewer verifies both from the state directory alone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cli import main
from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.audit.log import export_store
from sealroom.audit.notes import NoteVerifier
from sealroom.audit.receipts import verify_receipt
from sealroom.audit.store import SQLiteLogStore
from sealroom.audit.verify import verify_log
from sealroom.errors import AuditError

pytestmark = pytest.mark.slow

SQL = """SELECT a.segment, COUNT(*) AS n, SUM(a.amount + b.amount) AS total
FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id
GROUP BY a.segment ORDER BY a.segment"""


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
    from sealroom.policy import DatasetPolicy

    d = tmp_path_factory.mktemp("audit")
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 3,
            "columns": {
                "customer_id": "join_key",
                # a public domain: the suppressed cell is listed by its key
                "segment": {"role": "dimension", "values": ["retail", "solo"]},
                "amount": {"role": "measure", "aggregates": ["sum"], "min": 0, "max": 1000},
            },
        }
    )
    parties = []
    for name in ("bank_a", "bank_b"):
        table = pa.table(
            {
                "customer_id": pa.array(range(12), pa.int64()),
                "segment": ["retail"] * 10 + ["solo"] * 2,
                "amount": pa.array([float(i) for i in range(12)]),
            }
        )
        pq.write_table(table, d / f"{name}.parquet")
        parties.append(PartySpec(name, (DatasetSpec("loans", str(d / f"{name}.parquet"), policy),)))
    state = d / "state"
    with Cluster(state, parties, party_timeout_seconds=60) as cluster, cluster.client() as client:
        result = client.run(SQL, timeout=120)
        measurement = cluster.measurement
    return state, result, measurement


def coordinator_dir(state: Path) -> Path:
    return state / "coordinator"


def events(state: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(str(coordinator_dir(state) / "coordinator.db"))
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT entry FROM tlog_entries ORDER BY seq")]
    finally:
        db.close()


def test_a_release_is_logged_step_by_step(released: Any) -> None:
    state, result, measurement = released
    assert result.status == "released"
    log = events(state)
    assert [e["seq"] for e in log] == list(range(len(log)))
    kinds = [(e["type"], e["event"].get("party")) for e in log]
    # Each party's signed registration (enrolled) and its dataset, one party after the other.
    registrations = sorted(kinds[:4], key=lambda k: (str(k[1]), k[0] != "party_registered"))
    assert registrations == [
        ("party_registered", "bank_a"),
        ("dataset_registered", "bank_a"),
        ("party_registered", "bank_b"),
        ("dataset_registered", "bank_b"),
    ]
    assert {e["event"]["change"] for e in log[:4] if e["type"] == "party_registered"} == {"enrolled"}
    assert [t for t, _ in kinds[4:]] == ["query_submitted", "approved", "approved", "stage_executed", "released"]
    qid = result.query_id
    assert {e["event"]["query_id"] for e in log[4:]} == {qid}
    stage = log[7]["event"]
    assert stage["kind"] == "tee" and stage["simulated"] is True and stage["platform"] == "simulated"
    assert stage["measurement"] == measurement
    release = log[8]["event"]
    assert release["suppressed_cells"] == 1 and release["simulated"] is True
    # No free text, no value: the SQL appears only as its hash.
    text = json.dumps(log)
    assert "retail" not in text and "SELECT" not in text


def test_the_served_receipt_verifies_with_the_published_log_key(released: Any) -> None:
    state, result, measurement = released
    receipt = result.receipt["countersigned"]
    assert result.receipt["result"]["query_id"] == result.query_id  # the former shape is kept
    vkey = NoteVerifier.from_vkey((coordinator_dir(state) / "log.vkey").read_text())
    info = json.loads((coordinator_dir(state) / "log.json").read_text())
    assert info["origin"] == vkey.name and info["public_key"] == vkey.public_key.hex()
    appraisal = AppraisalPolicy(
        measurements=frozenset({measurement}),
        allow_simulated=True,
        simulated_roots=(load_root_certificate(state / "dev" / "dev-root.crt"),),
    )
    out = verify_receipt(receipt, appraisal=appraisal, coordinator_key=vkey.public_key, result_bytes=None)
    assert out.query_id == result.query_id and out.parties == ("bank_a", "bank_b")
    assert out.evidence_appraised and out.simulated and out.suppressed_cells == 1
    # Another key does not verify it.
    with pytest.raises(AuditError, match="another key"):
        verify_receipt(receipt, appraisal=None, coordinator_key="00" * 32)
    # The log holds exactly this receipt for the release.
    db = sqlite3.connect(f"{(coordinator_dir(state) / 'coordinator.db').as_uri()}?mode=ro", uri=True)
    try:
        export = export_store(SQLiteLogStore(db), origin=vkey.name, log_key=vkey)
    finally:
        db.close()
    report = verify_log(
        export,
        log_key=vkey,
        verify_receipt=lambda r: verify_receipt(r, appraisal=appraisal, coordinator_key=vkey.public_key),
    )
    assert report.receipts == 1 and report.releases[0]["query_id"] == result.query_id
    assert list(export["receipts"].values()) == [receipt]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_reviewer_commands_on_the_state_dir(released: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state, result, _ = released
    qid = result.query_id
    dev_root = str(state / "dev" / "dev-root.crt")
    code, out, err = run(
        capsys, "audit", "verify", "--state-dir", str(state), "--allow-simulated", "--dev-root", dev_root
    )
    assert code == 0, err
    assert "9 entries" in out and "1 release receipt(s) verified" in out

    code, out, err = run(capsys, "audit", "list", "--state-dir", str(state), "--json")
    assert code == 0, err
    rows = json.loads(out)["releases"]
    assert [
        (r["query_id"], r["analyst"], r["rows"], r["suppressed_cells"], r["simulated"], r["status"]) for r in rows
    ] == [(qid, "analyst", 1, 1, True, "verified")]
    assert rows[0]["datasets"] == ["bank_a.loans", "bank_b.loans"]
    assert (
        run(capsys, "audit", "list", "--state-dir", str(state), "--dataset", "bank_c.loans", "--json")[1].count(qid)
        == 0
    )
    assert run(capsys, "audit", "list", "--state-dir", str(state), "--analyst", "bob", "--json")[1].count(qid) == 0
    assert qid not in run(capsys, "audit", "list", "--state-dir", str(state), "--since", "2999-01-01")[1]
    code, out, _ = run(capsys, "audit", "list", "--state-dir", str(state))
    assert code == 0 and qid in out and "verified" in out

    code, out, err = run(capsys, "audit", "show", qid, "--state-dir", str(state), "--json")
    assert code == 0, err
    doc = json.loads(out)
    sql = result.receipt["countersigned"]["query"]["sql"]  # the plan's (normalised) SQL
    assert "JOIN bank_b.loans" in sql
    assert doc["sql"] == sql and doc["parties"] == ["bank_a", "bank_b"] and doc["status"] == "verified"
    assert [a["party"] for a in doc["approvals"]] == ["bank_a", "bank_b"]
    assert doc["stages"][0]["kind"] == "tee" and doc["stages"][0]["simulated"] is True
    assert doc["suppressed"] == [
        {
            "stage": "s1",
            "group": {"segment": "solo"},
            "rule": doc["suppressed"][0]["rule"],
            "reason": doc["suppressed"][0]["reason"],
        }
    ]
    code, out, _ = run(capsys, "audit", "show", qid, "--state-dir", str(state))
    assert code == 0 and "SIMULATED" in out and "solo" in out and "bank_b" in out
    assert run(capsys, "audit", "show", "q_nope", "--state-dir", str(state))[0] == 1

    html = tmp_path / "report.html"
    code, _, err = run(capsys, "audit", "export", "--format", "html", "--state-dir", str(state), "-o", str(html))
    assert code == 0, err
    page = html.read_text()
    code, out, _ = run(
        capsys, "audit", "export", "--format", "html", "--state-dir", str(state), "-o", str(html), "--json"
    )
    assert code == 0 and json.loads(out)["releases"] == [{"query_id": qid, "status": "verified"}]
    assert run(capsys, "audit", "export", "--format", "html", "--state-dir", str(state), "--json")[0] == 2
    assert page.startswith("<!DOCTYPE html>") and qid in page and "solo" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page and " src=" not in page
    assert html_escape(sql) in page and "verified" in page

    exported = tmp_path / "log.json"
    code, _, err = run(capsys, "audit", "export", "--format", "json", "--state-dir", str(state), "-o", str(exported))
    assert code == 0, err
    key = (coordinator_dir(state) / "log.vkey").read_text().strip()
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "audit", "verify", "--log", str(exported), "--log-key", key],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def _verify_state(capsys: pytest.CaptureFixture[str], state: Path) -> tuple[int, str, str]:
    return run(capsys, "audit", "verify", "--state-dir", str(state))


def test_an_owner_rejection_is_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
    from tests.integration.test_manual_approval import AUTO, MANUAL, SQL_AM, _loans, status_is, wait_until

    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", _loans(tmp_path / "a.parquet"), AUTO),)),
        PartySpec("bank_m", (DatasetSpec("loans", _loans(tmp_path / "m.parquet"), MANUAL),)),
    ]
    with Cluster(tmp_path / "state", parties, party_timeout_seconds=30) as cluster, cluster.client() as client:
        qid = client.submit(SQL_AM).query_id
        wait_until(status_is(client, qid, "pending_approval", ["bank_m"]))
        proc = subprocess.run(
            [sys.executable, "-m", "sealroom.cli", "reject", qid, "--reason", "not before the audit closes",
             "--agent", cluster.addresses["party-bank_m"], "--party-config", str(cluster.party_config_path("bank_m"))],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        wait_until(status_is(client, qid, "refused"))
    log = events(tmp_path / "state")
    mine = [(e["type"], e["event"].get("party")) for e in log if e["event"].get("query_id") == qid]
    assert mine == [("query_submitted", None), ("approved", "bank_a"), ("rejected", "bank_m")]
    rejected = log[-1]["event"]
    assert rejected["rule"] == "rejected_by_owner" and "plan_hash" in rejected
    assert "audit closes" not in json.dumps(log)  # the owner's free-text reason stays out of the log
    code, out, err = _verify_state(capsys, tmp_path / "state")
    assert code == 0 and "1 rejected" in out and "0 release receipt(s)" in out, err
    listed = run(capsys, "audit", "list", "--state-dir", str(tmp_path / "state"))[1]
    assert listed.startswith("no releases\n")  # the rejection is listed below the (no) releases
    assert "refused queries and withdrawn approvals (1)" in listed
    assert "rejected by bank_m (rejected_by_owner)" in listed
    assert "audit closes" not in listed


@pytest.mark.parametrize("hospitals", [3, 2], ids=["three_owners", "two_owners_and_a_helper"])
def test_an_mpc_release_has_a_verifiable_receipt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hospitals: int
) -> None:
    from sealroom.app.cluster import Cluster
    from tests.integration.test_mpc_runtime import _platform, _sql

    parties, _ = _platform(tmp_path, hospitals)
    state = tmp_path / "state"
    with Cluster(state, parties, log=lambda _m: None) as cluster, cluster.client() as client:
        result = client.run(_sql(hospitals))
    assert result.status == "released", result.error
    vkey = NoteVerifier.from_vkey((coordinator_dir(state) / "log.vkey").read_text())
    receipt = result.receipt["countersigned"]
    out = verify_receipt(receipt, appraisal=None, coordinator_key=vkey.public_key)
    assert not out.simulated and out.suppressed_cells == 1
    assert receipt["stages"][0]["kind"] == "mpc" and "honest majority" in receipt["stages"][0]["trust_assumption"]
    stage = [e for e in events(state) if e["type"] == "stage_executed"]
    assert [(s["event"]["kind"], s["event"]["players"], s["event"]["simulated"]) for s in stage] == [("mpc", 3, False)]
    code, _, err = _verify_state(capsys, state)
    assert code == 0, err
    code, text, err = run(capsys, "audit", "show", result.query_id, "--state-dir", str(state), "--json")
    assert code == 0, err
    shown = json.loads(text)
    assert shown["status"] == "verified" and shown["stages"][0]["kind"] == "mpc"
    assert len(shown["stages"][0]["players"]) == 3 and shown["suppressed"][0]["rule"] == "min_group_size"
