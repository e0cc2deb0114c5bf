"""Refusals and withdrawn approvals in the running platform's log, and the record of processing.

One cluster (enclave, coordinator, three party agents as processes) whose coordinator declares a
collaboration and whose owners declare [processing]: bank_a approves automatically, bank_m and
bank_t by hand with the real CLI (bank_m's approvals last 6 s). A query the planner refuses, an
approval its owner revokes and one that lapses each leave a log entry (identifiers only); `sealroom
audit verify` still exits 0, and `sealroom audit ropa` shows the release, the refusals' counts and
the owners' declarations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.audit.ropa import Collaboration
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.policy import DatasetPolicy, ProcessingRecord
from sealroom.signing import verify_owner_action

pytestmark = pytest.mark.slow

PROCESSING = ProcessingRecord(
    purposes=("credit_risk_statistics",),
    legal_basis="legitimate_interests",
    data_subjects=("credit customers",),
    personal_data=("customer identifier", "segment", "amount"),
    retention="7 years",
)
COLLABORATION = Collaboration(
    name="Withdrawals test collaboration",
    purpose="credit_risk_statistics",
    contact="study@example.org",
    recipients=("risk analysts",),
    result_retention="1 year",
    log_retention="10 years",
)
# bank_m and bank_t both decide by hand; bank_a alone approves automatically.
SQL_MT = (
    "SELECT m.segment, COUNT(*) AS n FROM bank_m.loans m JOIN bank_t.loans t ON m.customer_id = t.customer_id "
    "GROUP BY m.segment"
)
SQL_A = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment ORDER BY segment"
REFUSED_SQL = "SELECT customer_id FROM bank_a.loans WHERE segment = 'LITERAL-FROM-THE-SQL'"


def _loans(path: Path) -> str:
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array(range(20), pa.int64()),
                "segment": ["retail"] * 12 + ["sme"] * 8,
                "amount": pa.array([float(i) for i in range(20)]),
            }
        ),
        path,
    )
    return str(path)


def _policy(party: str, approval: str) -> DatasetPolicy:
    processing = dataclasses.replace(PROCESSING, controller=f"{party} Ltd", contact="dpo@x.example")
    return DatasetPolicy(privacy_unit="customer_id", min_group_size=3, approval=approval, processing=processing)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("withdrawals")
    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", _loans(d / "a.parquet"), _policy("bank_a", "auto")),)),
        PartySpec(
            "bank_m",
            (DatasetSpec("loans", _loans(d / "m.parquet"), _policy("bank_m", "manual")),),
            approval_ttl_seconds=6,  # long enough for approve-then-revoke on a loaded machine
        ),
        PartySpec("bank_t", (DatasetSpec("loans", _loans(d / "t.parquet"), _policy("bank_t", "manual")),)),
    ]
    with Cluster(
        d / "state", parties, party_timeout_seconds=30, approval_timeout_seconds=300, collaboration=COLLABORATION
    ) as cluster:
        yield cluster


def owner(platform: Cluster, party: str, *args: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        **platform.owner_env(party),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=300)


def wait_for(client: Any, qid: str, status: str, awaiting: list[str] | None = None, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = client.status(qid)
        if st["status"] == status and (awaiting is None or st["awaiting"] == awaiting):
            return st
        if st["status"] in ("released", "refused", "failed") and st["status"] != status:
            raise AssertionError(f"query {qid} ended {st['status']}: {st['error']}")
        if time.monotonic() > deadline:
            raise AssertionError(f"query {qid} is {st['status']}, not {status}")
        time.sleep(0.05)


def log_entries(platform: Cluster) -> list[dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(f"{(platform.state_dir / 'coordinator' / 'coordinator.db').as_uri()}?mode=ro", uri=True)
    try:
        return [json.loads(r[0]) for r in db.execute("SELECT entry FROM tlog_entries ORDER BY seq")]
    finally:
        db.close()


def test_refusals_and_withdrawn_approvals_are_logged_and_the_log_verifies(platform: Cluster) -> None:
    with platform.client() as client:
        refused = client.submit(REFUSED_SQL).query_id
        assert client.status(refused)["status"] == "refused"

        # bank_m approves by hand, then revokes before execution: the query waits for it again.
        qid = client.submit(SQL_MT).query_id
        wait_for(client, qid, "pending_approval", ["bank_m", "bank_t"])
        owner(platform, "bank_m", "approve", qid)
        wait_for(client, qid, "pending_approval", ["bank_t"])
        owner(platform, "bank_m", "revoke", qid)
        wait_for(client, qid, "pending_approval", ["bank_m", "bank_t"])
        # Approved again, bank_m's approval lapses after its 6 s while bank_t has not decided.
        owner(platform, "bank_m", "approve", qid)
        deadline = time.monotonic() + 30
        while not any(e["type"] == "approval_lapsed" for e in log_entries(platform)):
            assert time.monotonic() < deadline, "the approval did not lapse"
            time.sleep(0.1)
        owner(platform, "bank_t", "reject", qid, "--reason", "changed plans")
        wait_for(client, qid, "refused")

        released = client.run(SQL_A, timeout=120)
        assert released.status == "released"

    entries = log_entries(platform)
    types = [e["type"] for e in entries]
    assert types[0] == "collaboration_declared"
    (refusal,) = [e["event"] for e in entries if e["type"] == "query_refused"]
    assert refusal["query_id"] == refused and refusal["analyst"] == "analyst" and refusal["code"] == "invalid_query"
    (revocation,) = [e["event"] for e in entries if e["type"] == "approval_revoked"]
    assert revocation["query_id"] == qid and revocation["party"] == "bank_m"
    # The owner's own signature over the revocation is in the log, and verifies with its key.
    verify_owner_action(
        public_key_hex(load_signing_key(platform.key_path("bank_m"))),
        bytes.fromhex(revocation["owner_signature"]),
        "revoke",
        query_id=qid,
        party="bank_m",
        plan_hash=revocation["plan_hash"],
        issued_at_ms=revocation["issued_at_ms"],
    )
    (lapse,) = [e["event"] for e in entries if e["type"] == "approval_lapsed"]
    assert lapse == {"query_id": qid, "party": "bank_m", "plan_hash": revocation["plan_hash"], "cause": "expired"}
    assert "LITERAL-FROM-THE-SQL" not in json.dumps(entries) and "changed plans" not in json.dumps(entries)

    state = str(platform.state_dir)
    verified = cli("audit", "verify", "--state-dir", state)
    assert verified.returncode == 0, verified.stderr
    assert "1 query_refused" in verified.stdout and "1 approval_revoked" in verified.stdout
    assert "1 collaboration_declared" in verified.stdout

    listed = json.loads(cli("audit", "list", "--state-dir", state, "--json").stdout)
    kinds = [(e["type"], e["query_id"]) for e in listed["events"]]
    assert kinds == [
        ("query_refused", refused),
        ("approval_revoked", qid),
        ("approval_lapsed", qid),
        ("rejected", qid),
    ]
    shown = cli("audit", "show", qid, "--state-dir", state)
    assert shown.returncode == 1 and "bank_m revoked its approval (signed request)" in shown.stdout
    assert "the approval of bank_m lapsed: its expiry passed" in shown.stdout

    ropa = cli("audit", "ropa", "--state-dir", state, "--format", "json")
    assert ropa.returncode == 0, ropa.stderr
    (rec,) = json.loads(ropa.stdout)["records"]
    assert rec["log"]["status"] == "verified" and rec["collaboration"]["name"] == COLLABORATION.name
    assert rec["declaration"]["matches_log"] is True
    s = rec["summary"]
    assert (s["releases"], s["queries_refused"], s["approvals_revoked"], s["approvals_lapsed"]) == (1, 1, 1, 1)
    assert [d["processing"]["controller"] for d in rec["datasets"]] == ["bank_a Ltd", "bank_m Ltd", "bank_t Ltd"]
    checks = {g["check"] for g in rec["gaps"]}
    assert not checks & {"no_processing_record", "purpose_not_declared", "no_collaboration", "policy_not_logged"}
    (activity,) = rec["activities"]
    assert activity["datasets"] == ["bank_a.loans"] and activity["status"] == "verified"
    assert rec["recipients"]["received_releases"][0]["analyst"] == "analyst"
