"""Attack 1 of issue 13, "queries without the coordinator", against the running platform (real
processes on 127.0.0.1): no approval and no release outside the transparency log.

The bypass script fetches the catalog once, plans a query with the planner's own code for an
analyst the owners allow (but the coordinator does not know), calls each agent's ``ReviewPlan``,
creates an enclave job, asks the agents to ``Contribute`` and calls ``Execute``. Every step that
would move data or release a cell is refused: the agents approve nothing the coordinator's log does
not show, and a malicious coordinator that signs a checkpoint of a log of its own (with its real log
key) is refused too, because each agent checks the checkpoint against the log it witnessed. The
legitimate query still releases, and its receipt and ``sealroom audit verify`` check the log
position its approvals and the enclave's result bind. One entry is one release: whoever runs the
coordinator cannot replay a released query's approvals and log position in a second enclave job.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.planner import plan_query
from coordinator.service import catalog_of
from coordinator.store import DatasetRecord, log_origin
from sealroom import pki
from sealroom.app.cli import main
from sealroom.audit.entries import LogEntry
from sealroom.audit.merkle import inclusion_proof, root_hash
from sealroom.audit.notes import Checkpoint, NoteSigner, NoteVerifier, SignedCheckpoint
from sealroom.audit.receipts import verify_receipt
from sealroom.auth import bearer
from sealroom.keys import load_signing_key
from sealroom.planning.plan import Plan
from sealroom.rpc import fetch_server_certificate
from sealroom.signing import LogPosition
from sealroom.v1 import common_pb2, coordinator_pb2_grpc, enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

pytestmark = pytest.mark.slow

SQL = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment"
)
PARTIES = ("bank_a", "bank_b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
    from sealroom.policy import DatasetPolicy

    d = tmp_path_factory.mktemp("logbound")
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 3,
            "columns": {"customer_id": "join_key", "segment": "dimension"},
        }
    )
    specs = []
    for name in PARTIES:
        table = pa.table({"customer_id": pa.array(range(12), pa.int64()), "segment": ["retail"] * 8 + ["sme"] * 4})
        pq.write_table(table, d / f"{name}.parquet")
        specs.append(PartySpec(name, (DatasetSpec("loans", str(d / f"{name}.parquet"), policy),)))
    with Cluster(d / "state", specs, party_timeout_seconds=60) as running:
        yield running


def _catalog_and_parties(cluster: Any) -> tuple[Any, dict[str, Any]]:
    """What the bypass script fetched once: the catalog and the parties (address, key)."""
    with cluster.dial("coordinator") as ch:
        resp = coordinator_pb2_grpc.CoordinatorStub(ch).ListDatasets(
            common_pb2.Empty(), metadata=bearer(cluster.token()), timeout=30
        )
    records = [
        DatasetRecord(
            d.party,
            d.name,
            bytes(d.arrow_schema),
            bytes(d.policy_json),
            d.policy_digest,
            d.description,
            d.approximate_rows,
        )
        for d in resp.datasets
    ]
    return catalog_of(records), {p.name: p for p in resp.parties}


def _bypass_plan(cluster: Any) -> tuple[Plan, dict[str, Any]]:
    catalog, parties = _catalog_and_parties(cluster)
    plan, _ = plan_query(
        SQL,
        query_id="q_bypass" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:8],
        analyst="mallory",  # the owners allow every analyst; the coordinator knows no mallory
        catalog=catalog,
        party_keys={name: bytes(p.signing_public_key).hex() for name, p in parties.items()},
    )
    return plan, parties


def _review(cluster: Any, party: str, request: party_pb2.ReviewPlanRequest) -> party_pb2.ReviewPlanResponse:
    """ReviewPlan at ``party``'s agent with the coordinator's own certificate: the log binding must
    hold even against whoever runs the coordinator."""
    with cluster.dial(f"party-{party}") as ch:
        return party_pb2_grpc.PartyAgentStub(ch).ReviewPlan(request, timeout=30)


def _contribute_refused(
    cluster: Any, party: str, plan_json: bytes, job_id: str, certificate: bytes = b""
) -> grpc.RpcError:
    """Contribute at ``party``'s agent, as the coordinator, which must refuse it."""
    with cluster.dial(f"party-{party}") as ch, pytest.raises(grpc.RpcError) as info:
        party_pb2_grpc.PartyAgentStub(ch).Contribute(
            party_pb2.ContributeRequest(
                plan_json=plan_json,
                job_id=job_id,
                enclave_address=cluster.enclave_address,
                enclave_tls_certificate=certificate,
            ),
            timeout=60,
        )
    return info.value


def _refusal(resp: party_pb2.ReviewPlanResponse) -> dict[str, Any]:
    assert not resp.approved and not resp.signature and not resp.pending
    doc: dict[str, Any] = json.loads(resp.error_json)
    return doc


def _log_entries(cluster: Any) -> list[bytes]:
    from sealroom.audit.store import SQLiteLogStore

    store = SQLiteLogStore(cluster.state_dir / "coordinator" / "coordinator.db")
    try:
        return store.entries()
    finally:
        store.close()


def test_the_bypass_script_gets_no_approval_no_stream_and_no_release(cluster: Any) -> None:
    plan, parties = _bypass_plan(cluster)
    plan_json = plan.to_json()
    # 1. ReviewPlan at each owner's agent, as the script did: no log entry, no approval.
    for name in PARTIES:
        doc = _refusal(_review(cluster, name, party_pb2.ReviewPlanRequest(plan_json=plan_json, query_id=plan.query_id)))
        assert doc["code"] == "approval"
        assert doc["details"] == {"party": name, "check": "log_entry_missing", "rule": "not_in_log"}
    # 2. An entry of its own making, in a tree of its own, signed by a key of its own.
    entry = LogEntry(
        0,
        int(time.time() * 1000),
        "query_submitted",
        {"query_id": plan.query_id, "analyst": plan.analyst, "sql_sha256": "0" * 64, "plan_hash": plan.hash},
    )
    leaf = entry.canonical()
    cp = Checkpoint(
        log_origin(load_signing_key(cluster.state_dir / "coordinator" / "log.key")), 1, root_hash([entry.leaf_hash()])
    )
    from sealroom.keys import generate_signing_key

    stranger = NoteSigner(cp.origin, generate_signing_key())
    forged = party_pb2.ReviewPlanRequest(
        plan_json=plan_json,
        query_id=plan.query_id,
        log_entry=leaf,
        log_checkpoint=SignedCheckpoint(cp, (stranger.sign(cp.body()),)).to_text(),
    )
    for name in PARTIES:
        doc = _refusal(_review(cluster, name, forged))
        assert doc["details"]["check"] == "inclusion_checkpoint" and doc["details"]["rule"] == "not_in_log"
    # 3. No approval held: the agents stream nothing to a job the script creates.
    with cluster.dial("enclave") as ch:
        enclave = enclave_pb2_grpc.EnclaveStub(ch)
        job = enclave.CreateJob(enclave_pb2.CreateJobRequest(plan_json=plan_json), timeout=30)
        for name in PARTIES:
            refused = _contribute_refused(cluster, name, plan_json, job.job_id)
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION or "approv" in (refused.details() or "")
        # 4. Execute: without a log position (and without approvals) the enclave releases nothing.
        with pytest.raises(grpc.RpcError) as info:
            enclave.Execute(enclave_pb2.ExecuteRequest(job_id=job.job_id, job_token=job.job_token), timeout=30)
        assert "log position" in (info.value.details() or "")
    # The log never saw it, and nothing was released.
    assert all(plan.query_id not in e.decode() for e in _log_entries(cluster))


def test_a_coordinator_that_skips_the_log_is_refused_even_with_its_own_log_key(cluster: Any) -> None:
    """The coordinator itself, with its real log key, shows the agents a checkpoint of a log of its
    own that holds the query (its real log does not): each agent compares that checkpoint with the log
    it witnesses, and refuses."""
    plan, parties = _bypass_plan(cluster)
    key = load_signing_key(cluster.state_dir / "coordinator" / "log.key")
    signer = NoteSigner(log_origin(key), key)
    real = _log_entries(cluster)
    entry = LogEntry(
        len(real) - 1,
        int(time.time() * 1000),
        "query_submitted",
        {"query_id": plan.query_id, "analyst": plan.analyst, "sql_sha256": "0" * 64, "plan_hash": plan.hash},
    )
    from sealroom.audit.merkle import leaf_hash

    # (a) The real history with its last entry swapped for the query: same size, another root.
    # (b) The real history plus the query: a checkpoint newer than the log the agents see.
    for leaves in (
        [*map(leaf_hash, real[:-1]), entry.leaf_hash()],
        [*map(leaf_hash, real), LogEntry(len(real), entry.time_ms, entry.type, entry.event).leaf_hash()],
    ):
        index = len(leaves) - 1
        fake_entry = LogEntry(index, entry.time_ms, entry.type, entry.event)
        cp = Checkpoint(signer.name, len(leaves), root_hash(leaves))
        request = party_pb2.ReviewPlanRequest(
            plan_json=plan.to_json(),
            query_id=plan.query_id,
            log_entry=fake_entry.canonical(),
            log_checkpoint=SignedCheckpoint(cp, (signer.sign(cp.body()),)).to_text(),
            inclusion_proof=inclusion_proof(leaves, index),
        )
        for name in PARTIES:
            doc = _refusal(_review(cluster, name, request))
            assert doc["details"]["rule"] in ("not_in_log", "log_witness")
            assert doc["details"]["check"] in ("consistency_proof", "inclusion_checkpoint")


def test_the_legitimate_query_releases_bound_to_its_log_position(
    cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with cluster.client() as client:
        result = client.run(SQL, timeout=120)
    assert result.status == "released"
    receipt = result.receipt["countersigned"]
    vkey = NoteVerifier.from_vkey((cluster.state_dir / "coordinator" / "log.vkey").read_text())
    out = verify_receipt(receipt, appraisal=None, coordinator_key=vkey.public_key)
    assert out.version == 2 and out.log_position is not None
    entries = _log_entries(cluster)
    submitted = json.loads(entries[out.log_position.leaf_index])
    assert submitted["type"] == "query_submitted" and submitted["event"]["query_id"] == result.query_id
    assert submitted["event"]["plan_hash"] == out.plan_hash and submitted["event"]["analyst"] == "analyst"
    # The enclave signed the same position its approvals sign.
    assert receipt["stages"][0]["result"]["log"] == receipt["log"]
    # sealroom audit verify, from the state directory: every release bound to its submission.
    dev_root = str(cluster.state_dir / "dev" / "dev-root.crt")
    argv = ["audit", "verify", "--state-dir", str(cluster.state_dir), "--allow-simulated", "--dev-root", dev_root]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    rows = [r for log in json.loads(out)["logs"] for r in log["releases"]]
    assert [(r["log_bound"], r["receipt_version"]) for r in rows if r["query_id"] == result.query_id] == [(True, 2)]


def test_the_coordinator_cannot_replay_a_released_query_for_a_second_release(cluster: Any) -> None:
    with cluster.client() as client:
        first = client.run(SQL, timeout=120)
    assert first.status == "released"
    receipt = first.receipt["countersigned"]
    plan_json = Plan.from_json(json.dumps(receipt["plan"]).encode()).to_json()
    approvals = [
        enclave_pb2.Approval(party=a["party"], plan_hash=a["plan_hash"], signature=bytes.fromhex(a["signature"]))
        for a in receipt["approvals"]
    ]
    certificate = fetch_server_certificate(cluster.enclave_address, cluster.tls_config(pki.coordinator()))
    with cluster.dial("enclave") as ch:
        enclave = enclave_pb2_grpc.EnclaveStub(ch)
        job = enclave.CreateJob(enclave_pb2.CreateJobRequest(plan_json=plan_json), timeout=30)
        for name in PARTIES:
            refused = _contribute_refused(cluster, name, plan_json, job.job_id, certificate)
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already sent its data" in (refused.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            enclave.Execute(
                enclave_pb2.ExecuteRequest(
                    job_id=job.job_id,
                    approvals=approvals,
                    job_token=job.job_token,
                    log_position=LogPosition.from_dict(receipt["log"]).to_proto(),
                ),
                timeout=60,
            )
        assert "did not arrive" in (info.value.details() or "")
    # The legitimate path: the same SQL submitted again is a new logged query, and releases.
    with cluster.client() as client:
        second = client.run(SQL, timeout=120)
    assert second.status == "released" and second.query_id != first.query_id
