"""The party agent's approvals on their own: the state of a held plan and the plans an agent holds
(no agent, no coordinator)."""

from __future__ import annotations

import time

import pytest

from connectors.agent.approvals import Approvals, HeldPlan, PlanState
from sealroom.errors import ApprovalError
from sealroom.keys import generate_signing_key
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy
from sealroom.signing import sign_owner_command
from sealroom.v1 import party_pb2
from tests.harness.enclave import make_party, make_plan, secret_loans

SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
KEY = generate_signing_key()


def plan() -> Plan:
    data = make_party("bank_a", secret_loans(12), policy=DatasetPolicy(approval="manual"), key=KEY)
    return make_plan(SQL, [data])


def approvals(ttl: float = 600.0) -> Approvals:
    return Approvals("bank_a", approval_ttl_seconds=ttl, pending_ttl_seconds=3600.0)


def sign(plan_hash: str, log: object = None) -> bytes:
    return b"signed " + plan_hash.encode()


def test_a_held_plan_has_one_state_and_each_transition_moves_it() -> None:
    held = HeldPlan(plan(), True, time.time())
    assert held.state is PlanState.PENDING and not held.approved and held.awaits_owner
    held.grant(b"sig", time.time() + 60)
    assert held.state is PlanState.APPROVED and held.approved and held.awaits_owner
    held.withdraw()
    assert held.state is PlanState.PENDING and held.signature is None and held.expires_at == 0.0
    held.grant(b"sig", time.time() + 60)
    held.mark_used()  # data moved: it no longer waits for a decision
    assert held.state is PlanState.USED and held.approved and not held.awaits_owner
    held.withdraw()  # lapsed or revoked after data moved
    assert held.state is PlanState.SPENT and not held.approved and not held.awaits_owner
    held.grant(b"sig2", time.time() + 60)
    assert held.state is PlanState.USED and held.signature == b"sig2"
    automatic = HeldPlan(plan(), False, time.time())
    automatic.grant(b"sig", time.time() + 60)
    assert automatic.approved and not automatic.awaits_owner  # only manual plans are the owner's to list


def test_an_automatic_approval_is_held_until_it_lapses() -> None:
    a = approvals(ttl=0.2)
    p = plan()
    signature, expires_at = a.hold(p, manual=False, sign=sign)
    assert signature == sign(p.hash) and expires_at > time.time()
    assert a.approved_plan(p.to_json()) == p
    time.sleep(0.3)
    with pytest.raises(ApprovalError) as info:
        a.approved_plan(p.to_json())
    assert info.value.details["check"] == "approval_expired"
    assert a.held(p.hash) is None  # a lapsed automatic approval is dropped


def test_a_manual_plan_waits_for_its_owner_and_a_query_has_one() -> None:
    a = approvals()
    p = plan()
    assert a.hold(p, manual=True, sign=sign) == (None, 0.0)
    with pytest.raises(ApprovalError) as info:
        a.approved_plan(p.to_json())
    assert info.value.details["check"] == "own_approval" and "awaits the owner's decision" in info.value.message
    (listed,) = a.pending()
    assert (listed.query_id, listed.plan_hash, listed.state) == (p.query_id, p.hash, "pending")
    assert [i.dataset for i in listed.inputs] == ["loans"]
    other = make_plan(SQL, [make_party("bank_a", secret_loans(12), key=KEY)], query_id=p.query_id)
    with pytest.raises(ApprovalError) as info:
        a.hold(other, manual=True, sign=sign)
    assert info.value.details["check"] == "query_plan"


def test_the_owners_commands_move_the_plan_and_a_used_plan_leaves_the_list() -> None:
    a = approvals()
    p = plan()
    a.hold(p, manual=True, sign=sign)
    command = party_pb2.OwnerCommand(query_id=p.query_id)
    grant = a.grant(command, sign=sign)
    assert grant.fresh and grant.signature == sign(p.hash) and a.approved_plan(p.to_json()) == p
    assert not a.grant(command, sign=sign).fresh  # approved already: the same approval
    a.mark_used(p.hash)
    assert a.pending() == []  # data moved: no longer the owner's to decide
    a.revoke(command)
    assert a.held(p.hash).state is PlanState.SPENT  # type: ignore[union-attr]
    with pytest.raises(ApprovalError) as info:
        a.approved_plan(p.to_json())
    assert info.value.details["check"] == "approval_revoked"
    a.reject(command)
    assert a.held(p.hash) is None
    with pytest.raises(ApprovalError) as info:
        a.hold(p, manual=True, sign=sign)
    assert info.value.details["rule"] == "rejected_by_owner"


def test_an_owner_command_is_accepted_once() -> None:
    a = approvals()
    issued = int(time.time() * 1000)
    command = party_pb2.OwnerCommand(
        query_id="q_1",
        issued_at_ms=issued,
        signature=sign_owner_command(KEY, "approve", party="bank_a", query_id="q_1", issued_at_ms=issued),
    )
    public = KEY.public_key().public_bytes_raw().hex()
    a.accept_command("approve", command, public_key_hex=public)
    with pytest.raises(ApprovalError) as info:
        a.accept_command("approve", command, public_key_hex=public)
    assert info.value.details["check"] == "replay"
    with pytest.raises(ApprovalError) as info:
        a.accept_command(
            "approve", command, public_key_hex=generate_signing_key().public_key().public_bytes_raw().hex()
        )
    assert info.value.details["check"] == "owner_command_signature"


def test_each_use_of_a_plans_data_is_claimed_once() -> None:
    """A coordinator replaying an approved plan (a second enclave job, a second run of an MPC player)
    gets no second release from the query's one log entry; other uses of the same plan still go."""
    a = approvals()
    p = plan()
    a.hold(p, manual=False, sign=sign)
    for use in ("tee", "mpc:s1:0", "mpc:s1:1"):
        a.claim(p.hash, use)
    for use in ("tee", "mpc:s1:0"):
        with pytest.raises(ApprovalError) as info:
            a.claim(p.hash, use)
        assert info.value.details == {"party": "bank_a", "check": "once_per_plan"}
    assert a.approved_plan(p.to_json()) == p  # the approval itself stands: nothing else changes


def test_a_claim_outlives_a_new_review_and_a_lapsed_approval() -> None:
    """The coordinator sends the same plan (with its same log entry) for review again, before or
    after the approval lapsed: the agent approves it anew, but what its data went to stays claimed."""
    a = approvals(ttl=0.2)
    p = plan()
    a.hold(p, manual=False, sign=sign)
    a.claim(p.hash, "tee")
    a.hold(p, manual=False, sign=sign)  # reviewed again while live
    with pytest.raises(ApprovalError):
        a.claim(p.hash, "tee")
    time.sleep(0.3)
    with pytest.raises(ApprovalError):
        a.approved_plan(p.to_json())  # lapsed: dropped
    a.hold(p, manual=False, sign=sign)  # reviewed again after it lapsed
    with pytest.raises(ApprovalError):
        a.claim(p.hash, "tee")
