"""Manual approvals against the real platform: an owner decides by hand, with its own key.

One cluster (enclave, coordinator, three party agents as processes): bank_a approves automatically,
bank_m and bank_t by hand (bank_t's approvals last 1 s). The owner's commands go through the CLI
(`sealroom pending/approve/reject/revoke`, as subprocesses); forged and misdirected approvals go
straight to the coordinator's RPCs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.audit.merkle import leaf_hash, root_hash
from sealroom.audit.store import SQLiteLogStore
from sealroom.auth import bearer
from sealroom.errors import ApprovalError
from sealroom.keys import generate_signing_key, load_signing_key, public_key_hex
from sealroom.policy import DatasetPolicy
from sealroom.rpc import unwrap
from sealroom.signing import (
    LogPosition,
    sign_approval,
    sign_owner_action,
    sign_owner_command,
    sign_owner_read,
    verify_approval,
)
from sealroom.v1 import coordinator_pb2, coordinator_pb2_grpc, party_pb2, party_pb2_grpc

pytestmark = pytest.mark.slow

AUTO = DatasetPolicy(privacy_unit="customer_id", min_group_size=3)
MANUAL = DatasetPolicy(privacy_unit="customer_id", min_group_size=3, approval="manual")

# bank_a (auto) with bank_m (manual): only bank_m's owner holds the query.
SQL_AM = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_m.loans m ON a.customer_id = m.customer_id "
    "GROUP BY a.segment ORDER BY a.segment"
)
# bank_m with bank_t: two owners decide by hand.
SQL_MT = (
    "SELECT m.segment, COUNT(*) AS n FROM bank_m.loans m JOIN bank_t.loans t ON m.customer_id = t.customer_id "
    "GROUP BY m.segment"
)


def _loans(path) -> str:
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


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("manual")
    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", _loans(d / "a.parquet"), AUTO),)),
        PartySpec("bank_m", (DatasetSpec("loans", _loans(d / "m.parquet"), MANUAL),)),
        PartySpec("bank_t", (DatasetSpec("loans", _loans(d / "t.parquet"), MANUAL),), approval_ttl_seconds=1),
    ]
    with Cluster(
        d / "state", parties, party_timeout_seconds=30, approval_timeout_seconds=300, analysts=("analyst", "alice")
    ) as cluster:
        yield cluster


def owner(platform: Cluster, party: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sealroom ARGS` as ``party``'s owner (its agent's address and its key in the environment)."""
    env = dict(
        os.environ,
        **platform.owner_env(party),
    )
    if key:
        env["SEALROOM_PARTY_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def owner_json(platform: Cluster, party: str, *args: str) -> dict[str, Any]:
    proc = owner(platform, party, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def status_is(client, qid: str, status: str, awaiting: list[str] | None = None) -> Callable[[], Any]:
    def check() -> Any:
        st = client.status(qid)
        if st["status"] in ("released", "refused", "failed") and st["status"] != status:
            raise AssertionError(f"query {qid} ended {st['status']}, not {status}: {st['error']}")
        return st if st["status"] == status and (awaiting is None or st["awaiting"] == awaiting) else None

    return check


def plan_json(platform: Cluster, qid: str) -> bytes:
    """The query's plan, as the analyst who submitted it reads it."""
    with platform.dial("coordinator") as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        for analyst in platform.analysts:
            try:
                resp = stub.GetResult(
                    coordinator_pb2.QueryRef(query_id=qid), timeout=10, metadata=bearer(platform.token(analyst))
                )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                continue
            return bytes(resp.plan_json)
    raise AssertionError(f"no analyst of the platform owns {qid}")


def contribute_refused(platform: Cluster, party: str, plan: bytes):
    """Ask ``party``'s agent to stream ``plan`` (as the coordinator would); it must refuse."""
    with platform.dial(f"party-{party}") as ch:
        try:
            party_pb2_grpc.PartyAgentStub(ch).Contribute(
                party_pb2.ContributeRequest(plan_json=plan, job_id="j_none", enclave_address=platform.enclave_address),
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code(), unwrap(exc, peer=party)
    raise AssertionError(f"{party} streamed for a plan it must not stream for")


def coordinator_refuses(platform: Cluster, method: str, request: Any):
    with platform.dial("coordinator") as ch:
        try:
            getattr(coordinator_pb2_grpc.CoordinatorStub(ch), method)(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), unwrap(exc, peer="coordinator")
    raise AssertionError(f"the coordinator accepted a {method} it must refuse")


def submit_pending(platform: Cluster, client, sql: str, awaiting: list[str]) -> str:
    qid = client.submit(sql).query_id
    wait_until(status_is(client, qid, "pending_approval", awaiting))
    return qid


def test_query_waits_for_the_manual_owner_and_runs_once_approved(platform):
    with platform.client("alice") as client:
        qid = submit_pending(platform, client, SQL_AM, ["bank_m"])
        st = client.status(qid)
        assert st["approved_by"] == ["bank_a"] and "awaiting bank_m" in st["progress"]
        # The analyst's `sealroom status` shows who approved and who is awaited.
        env = dict(os.environ, **platform.analyst_env("alice"))
        shown = subprocess.run(
            [sys.executable, "-m", "sealroom.cli", "status", qid],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert "pending_approval" in shown.stdout and "bank_m" in shown.stdout

        # The owner sees the plan: SQL, analyst, and exactly the columns bank_m would send.
        listed = owner_json(platform, "bank_m", "pending")
        (plan,) = [p for p in listed["plans"] if p["query_id"] == qid]
        assert listed["party"] == "bank_m" and plan["state"] == "pending" and plan["analyst"] == "alice"
        assert "bank_m" in plan["sql"] and plan["sends"] == {"loans": ["customer_id"]}
        assert plan["parties"] == ["bank_a", "bank_m"]
        text = owner(platform, "bank_m", "pending").stdout
        assert qid in text and "bank_m would send loans: customer_id" in text

        doc = owner_json(platform, "bank_m", "approve", qid, "--plan-hash", plan["plan_hash"][:16])
        assert doc["state"] == "approved" and doc["plan_hash"] == plan["plan_hash"]
        assert doc["expires_at"] > time.time() + 3000  # the default lifetime: an hour
        wait_until(status_is(client, qid, "released"))
        released = client.result(qid)
        assert released.rows() == [["retail", 12], ["sme", 8]]
        assert client.status(qid)["approved_by"] == ["bank_a", "bank_m"]
        assert [a["party"] for a in released.receipt["result"]["approvals"]] == ["bank_a", "bank_m"]

    # Once the agent has streamed, the plan no longer awaits a decision, and revoking is too late.
    assert qid not in [p["query_id"] for p in owner_json(platform, "bank_m", "pending")["plans"]]
    late = owner(platform, "bank_m", "revoke", qid)
    assert late.returncode == 1 and "execution has started" in late.stderr


def test_owner_rejects_with_a_reason(platform):
    with platform.client() as client:
        qid = submit_pending(platform, client, SQL_AM, ["bank_m"])
        doc = owner_json(platform, "bank_m", "reject", qid, "--reason", "not before the audit closes")
        assert doc["state"] == "rejected"
        st = wait_until(status_is(client, qid, "refused"))
        assert st["error"]["code"] == "approval"
        assert st["error"]["details"]["party"] == "bank_m"
        assert st["error"]["details"]["rule"] == "rejected_by_owner"
        assert "not before the audit closes" in st["error"]["message"]
        result = client.result(qid)
        assert result.status == "refused" and result.table is None
    assert qid not in [p["query_id"] for p in owner_json(platform, "bank_m", "pending")["plans"]]
    # A reason is required.
    proc = owner(platform, "bank_m", "reject", qid)
    assert proc.returncode == 2


def test_revoke_before_execution_puts_the_query_back_to_pending(platform):
    with platform.client() as client:
        qid = submit_pending(platform, client, SQL_MT, ["bank_m", "bank_t"])
        owner_json(platform, "bank_m", "approve", qid)
        st = wait_until(status_is(client, qid, "pending_approval", ["bank_t"]))
        assert st["approved_by"] == ["bank_m"]

        doc = owner_json(platform, "bank_m", "revoke", qid)
        assert doc["state"] == "pending" and doc["awaiting"] == ["bank_m", "bank_t"]
        st = wait_until(status_is(client, qid, "pending_approval", ["bank_m", "bank_t"]))
        assert st["approved_by"] == []
        # The agent no longer honours its approval: it refuses to stream for the plan...
        code, err = contribute_refused(platform, "bank_m", plan_json(platform, qid))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "approval_revoked"
        # ...and the plan waits for its owner again.
        (plan,) = [p for p in owner_json(platform, "bank_m", "pending")["plans"] if p["query_id"] == qid]
        assert plan["state"] == "pending"
        # A revoke with nothing approved is refused.
        assert owner(platform, "bank_m", "revoke", qid).returncode == 1
        owner_json(platform, "bank_t", "reject", qid, "--reason", "cleanup")
        wait_until(status_is(client, qid, "refused"))


def test_an_expired_approval_is_dropped(platform):
    with platform.client() as client:
        qid = submit_pending(platform, client, SQL_MT, ["bank_m", "bank_t"])
        doc = owner_json(platform, "bank_t", "approve", qid)  # bank_t's approvals last 1 s
        assert doc["expires_at"] <= time.time() + 1.5
        plan = plan_json(platform, qid)
        time.sleep(max(0.0, doc["expires_at"] - time.time()) + 0.3)
        code, err = contribute_refused(platform, "bank_t", plan)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "approval_expired"
        assert "expired" in err.message
        # The coordinator dropped it too, and awaits bank_t again; its owner may approve anew.
        st = wait_until(status_is(client, qid, "pending_approval", ["bank_m", "bank_t"]))
        assert st["approved_by"] == []
        (held,) = [p for p in owner_json(platform, "bank_t", "pending")["plans"] if p["query_id"] == qid]
        assert held["state"] == "pending"
        owner_json(platform, "bank_m", "reject", qid, "--reason", "cleanup")
        wait_until(status_is(client, qid, "refused"))


def logged_position(platform: Cluster, qid: str, party: str) -> LogPosition:
    """The log position the coordinator showed the owners for ``qid``, found as a reviewer would: the
    query's query_submitted entry, and the tree size whose root ``party``'s logged approval signs."""
    store = SQLiteLogStore(platform.state_dir / "coordinator" / "coordinator.db")
    try:
        entries = store.entries()
    finally:
        store.close()
    docs = [json.loads(e) for e in entries]
    (index,) = [i for i, d in enumerate(docs) if d["type"] == "query_submitted" and d["event"]["query_id"] == qid]
    (approved,) = [d["event"] for d in docs if d["type"] == "approved" and d["event"]["query_id"] == qid]
    assert approved["party"] == party
    key = dict(platform_keys(platform))[party]
    leaves = [leaf_hash(e) for e in entries]
    for size in range(index + 1, len(entries) + 1):
        position = LogPosition(index, size, root_hash(leaves[:size]))
        try:
            verify_approval(key, approved["plan_hash"], bytes.fromhex(approved["signature"]), party=party, log=position)
        except ApprovalError:
            continue
        return position
    raise AssertionError(f"no log position verifies the approval of {party}")


def platform_keys(platform: Cluster) -> list[tuple[str, str]]:
    return [(p.name, public_key_hex(load_signing_key(platform.key_path(p.name)))) for p in platform.parties]


def _approval_request(qid: str, party: str, plan_hash: str, *, key, owner_key=None, issued=None, log=None):
    issued = issued or int(time.time() * 1000)
    expires = int((time.time() + 600) * 1000)
    return coordinator_pb2.SubmitApprovalRequest(
        query_id=qid,
        party=party,
        plan_hash=plan_hash,
        signature=sign_approval(key, plan_hash, log),
        expires_at_ms=expires,
        issued_at_ms=issued,
        owner_signature=sign_owner_action(
            owner_key or key,
            "approve",
            query_id=qid,
            party=party,
            plan_hash=plan_hash,
            issued_at_ms=issued,
            expires_at_ms=expires,
        ),
    )


def test_coordinator_accepts_only_the_partys_own_approval_of_this_plan(platform):
    key_m = load_signing_key(platform.key_path("bank_m"))
    key_a = load_signing_key(platform.key_path("bank_a"))
    forger = generate_signing_key()
    with platform.client() as client:
        qid = submit_pending(platform, client, SQL_AM, ["bank_m"])
        plan_hash = hashlib.sha256(plan_json(platform, qid)).hexdigest()
        other_hash = hashlib.sha256(b"another plan").hexdigest()

        cases = {
            # a forged approval, even inside a request bank_m signed
            "approval_signature": _approval_request(qid, "bank_m", plan_hash, key=forger, owner_key=key_m),
            # a request not signed by bank_m at all
            "owner_signature": _approval_request(qid, "bank_m", plan_hash, key=forger),
            # bank_m's genuine signatures, for another plan
            "approval_plan_hash": _approval_request(qid, "bank_m", other_hash, key=key_m),
        }
        for check, request in cases.items():
            code, err = coordinator_refuses(platform, "SubmitApproval", request)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, check
            assert err.details.get("check") == check and err.details.get("party") == "bank_m"
        # Another party's key, approving for bank_m, is refused.
        code, err = coordinator_refuses(
            platform, "SubmitApproval", _approval_request(qid, "bank_m", plan_hash, key=key_a)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "owner_signature"
        # So are rejections and revocations not signed by the party they name.
        issued = int(time.time() * 1000)
        reject = coordinator_pb2.RejectQueryRequest(
            query_id=qid,
            party="bank_m",
            plan_hash=plan_hash,
            reason="forged",
            issued_at_ms=issued,
            owner_signature=sign_owner_action(
                key_a, "reject", query_id=qid, party="bank_m", plan_hash=plan_hash, issued_at_ms=issued, reason="forged"
            ),
        )
        code, err = coordinator_refuses(platform, "RejectQuery", reject)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "owner_signature"
        revoke = coordinator_pb2.RevokeApprovalRequest(
            query_id=qid,
            party="bank_a",
            plan_hash=plan_hash,
            issued_at_ms=issued,
            owner_signature=sign_owner_action(
                key_m, "revoke", query_id=qid, party="bank_a", plan_hash=plan_hash, issued_at_ms=issued
            ),
        )
        code, err = coordinator_refuses(platform, "RevokeApproval", revoke)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "owner_signature"
        st = client.status(qid)
        assert st["status"] == "pending_approval" and st["approved_by"] == ["bank_a"]

        # A genuine approval that bank_m's agent never gave: accepted once (never replayed), but the
        # agent does not hold it, so the coordinator does not run the query on it.
        logged = logged_position(platform, qid, "bank_a")  # the position bank_a's agent approved at
        genuine = _approval_request(qid, "bank_m", plan_hash, key=key_m, log=logged)
        with platform.dial("coordinator") as ch:
            coordinator_pb2_grpc.CoordinatorStub(ch).SubmitApproval(genuine, timeout=10)
        code, err = coordinator_refuses(platform, "SubmitApproval", genuine)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and err.details["check"] == "replay"
        time.sleep(0.5)
        st = wait_until(status_is(client, qid, "pending_approval", ["bank_m"]))
        assert st["approved_by"] == ["bank_a"]
        owner_json(platform, "bank_m", "reject", qid, "--reason", "cleanup")
        wait_until(status_is(client, qid, "refused"))


def test_agent_obeys_only_its_owners_key(platform):
    with platform.client() as client:
        qid = submit_pending(platform, client, SQL_AM, ["bank_m"])
        # The CLI with another party's key: refused before anything is sent.
        wrong = owner(platform, "bank_m", "approve", qid, key=str(platform.key_path("bank_a")))
        assert wrong.returncode == 1 and "not the signing key" in wrong.stderr
        # Anyone who reaches the agent's port (the coordinator included) cannot approve for the owner.
        intruder = generate_signing_key()
        issued = int(time.time() * 1000)
        command = party_pb2.OwnerCommand(
            query_id=qid,
            issued_at_ms=issued,
            signature=sign_owner_command(intruder, "approve", party="bank_m", query_id=qid, issued_at_ms=issued),
        )
        with platform.dial("party-bank_m") as ch:
            stub = party_pb2_grpc.PartyAgentStub(ch)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Approve(command, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # refused before any work
            assert unwrap(caught.value).details["check"] == "owner_command_signature"
            # A genuine command is obeyed once; its replay is refused.
            key_m = load_signing_key(platform.key_path("bank_m"))
            issued = int(time.time() * 1000)
            reason = "replayed"
            genuine = party_pb2.OwnerCommand(
                query_id=qid,
                reason=reason,
                issued_at_ms=issued,
                signature=sign_owner_command(
                    key_m, "reject", party="bank_m", query_id=qid, issued_at_ms=issued, reason=reason
                ),
            )
            assert stub.Reject(genuine, timeout=30).state == "rejected"
            with pytest.raises(grpc.RpcError) as caught:
                stub.Reject(genuine, timeout=10)
            assert unwrap(caught.value).details["check"] == "replay"
            # The agent still answers its owner, and only its owner, what awaits it.
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListPending(party_pb2.ListPendingRequest(issued_at_ms=issued), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            read = party_pb2.ListPendingRequest(
                issued_at_ms=issued,
                signature=sign_owner_read(key_m, "pending", party="bank_m", issued_at_ms=issued),
            )
            assert stub.ListPending(read, timeout=10) is not None
        wait_until(status_is(client, qid, "refused"))


def test_approval_timeout_fails_the_query_naming_who_did_not_approve(tmp_path):
    parties = [PartySpec("bank_m", (DatasetSpec("loans", _loans(tmp_path / "m.parquet"), MANUAL),))]
    with Cluster(tmp_path / "state", parties, approval_timeout_seconds=1.5) as cluster, cluster.client() as client:
        qid = client.submit("SELECT segment, COUNT(*) AS n FROM bank_m.loans GROUP BY segment").query_id
        st = wait_until(status_is(client, qid, "failed"), timeout=30)
        assert st["error"]["code"] == "job_failed"
        assert "bank_m did not approve" in st["error"]["message"]
        assert st["error"]["details"]["awaiting"] == ["bank_m"]
        assert st["awaiting"] == []


def test_auto_approvals_lapse_too_and_the_agent_forgets_them(tmp_path):
    """In process, no coordinator needed: automatic approvals get the same lifetime, and lapsed ones
    are dropped from the agent's memory (it does not grow with every query it ever approved)."""
    from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
    from sealroom.errors import ApprovalError
    from sealroom.policy import TrustPolicy
    from tests.harness.enclave import make_party, make_plan, secret_loans

    table = secret_loans(30)
    pq.write_table(table, tmp_path / "a.parquet")
    key = generate_signing_key()
    config = PartyConfig(
        name="bank_a",
        coordinator="127.0.0.1:9",  # never contacted
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("loans", str(tmp_path / "a.parquet"), AUTO),),
        approval_ttl_seconds=1,
        unsafe_no_witness=True,  # no coordinator, so no log to witness
    )
    agent = PartyAgent(config, signing_key=key)
    data = make_party("bank_a", table, policy=AUTO, key=key)
    plans = [make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [data]) for _ in range(5)]
    for plan in plans:
        plan_hash, signature, expires_at = agent.review(plan.to_json())
        assert signature is not None and expires_at <= time.time() + 1
    assert len(agent.approvals._held) == 5
    time.sleep(1.1)
    with pytest.raises(ApprovalError) as caught:
        agent.contribute(plans[0].to_json(), "j_none", "127.0.0.1:9")
    assert caught.value.details["check"] == "approval_expired"
    assert agent.approvals._held == {} and agent.approvals._manual == {}
