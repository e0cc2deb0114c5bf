"""The owner's budget ledger on its own (connectors/agent/ledger.py, sealroom/audit/ledger.py): the
hash chain, restarts, tampering, refresh windows, and one charge per plan."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from connectors.agent.approvals import Approvals
from connectors.agent.ledger import BudgetLedger, asks_of
from coordinator.planner import CatalogEntry, plan_query
from sealroom.audit.ledger import LEDGER_FILE, read_ledger, within_window
from sealroom.errors import ApprovalError, AuditError, PolicyRefusalError
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy

SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string()), ("amount", pa.float64())])
KEY = "ab" * 32


def _policy(**privacy: object) -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {
                "customer_id": "join_key",
                "segment": {"role": "dimension", "values": ["retail", "sme"]},
                "amount": {"role": "measure", "min": 0, "max": 5000},
            },
            "privacy": {"mode": "dp", "epsilon_budget": 4.0, **privacy},
        },
        source="test.toml",
    )


def _plan(policy: DatasetPolicy, *, epsilon: float = 1.0, analyst: str = "alice", qid: str = "q1") -> Plan:
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", SCHEMA, policy)}
    plan, _ = plan_query(
        "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment",
        query_id=qid,
        analyst=analyst,
        catalog=catalog,
        party_keys={"bank_a": KEY},
        epsilon=epsilon,
    )
    return plan


POLICY = _policy()


def _reserve(ledger: BudgetLedger, plan: Plan, at: float = 1000.0) -> bool:
    return ledger.reserve(plan, asks_of("bank_a", plan, {"loans": POLICY}), at=at, until=time.time() + 60)


def test_reserves_chain_survive_a_restart_and_count_as_spent(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = BudgetLedger(path, party="bank_a")
    plans = [_plan(POLICY, qid=f"q{i}") for i in range(4)]
    assert all(_reserve(ledger, p) for p in plans)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["prev"] == "0" * 64
    again = BudgetLedger(path, party="bank_a")  # a restart reads every reservation back
    assert again.spent("bank_a.loans", "analyst:alice", 1000.0, None) == 4.0
    with pytest.raises(PolicyRefusalError) as err:
        _reserve(again, _plan(POLICY, qid="q5"))
    d = err.value.details
    assert (d["rule"], d["dataset"], d["analyst"], d["epsilon"], d["epsilon_left"]) == (
        "privacy_budget",
        "bank_a.loans",
        "alice",
        1.0,
        0.0,
    )
    assert "bank_a.loans" in err.value.message and "alice" in err.value.message
    # Another analyst has a budget of its own (scope "analyst").
    assert _reserve(again, _plan(POLICY, qid="q6", analyst="bob"))


def test_a_plan_reserved_twice_is_charged_once_and_released_ones_give_back(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / LEDGER_FILE, party="bank_a")
    p = _plan(POLICY)
    assert _reserve(ledger, p) and not _reserve(ledger, p)
    assert ledger.spent("bank_a.loans", "analyst:alice", 1000.0, None) == 1.0
    assert ledger.release(p.hash, "rejected")
    assert ledger.spent("bank_a.loans", "analyst:alice", 1000.0, None) == 0.0
    with pytest.raises(ApprovalError) as err:  # released: no data flows for it
        ledger.commit(p.hash)
    assert err.value.details["check"] == "budget_released"
    assert _reserve(ledger, p)  # approved again: a new reservation
    ledger.commit(p.hash)
    assert not ledger.release(p.hash, "revoked")  # data flowed: never given back
    ledger.commit(p.hash)  # once
    state = read_ledger(tmp_path / LEDGER_FILE)
    assert [r.state for r in state.reservations.values()] == ["committed"]
    assert [json.loads(x)["kind"] for x in (tmp_path / LEDGER_FILE).read_bytes().splitlines()] == [
        "reserve",
        "extend",  # reviewed again: a new lifetime, no new charge
        "release",
        "reserve",
        "commit",
    ]


def test_lapsed_reservations_go_back_at_start_committed_ones_never(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = BudgetLedger(path, party="bank_a")
    asks = asks_of("bank_a", _plan(POLICY), {"loans": POLICY})
    a, b = _plan(POLICY, qid="qa"), _plan(POLICY, qid="qb")
    ledger.reserve(a, asks, at=1.0, until=time.time() - 1)
    ledger.reserve(b, asks, at=1.0, until=time.time() - 1)
    ledger.commit(b.hash)
    restarted = BudgetLedger(path, party="bank_a")
    assert restarted.release_lapsed(time.time()) == [a.hash]
    assert restarted.state_of(a.hash) == {"released"} and restarted.state_of(b.hash) == {"committed"}


@pytest.mark.parametrize("damage", ["edit", "delete", "swap"])
def test_a_tampered_ledger_is_refused_naming_file_and_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = BudgetLedger(path, party="bank_a")
    for i in range(3):
        _reserve(ledger, _plan(POLICY, qid=f"q{i}"))
    lines = path.read_bytes().splitlines()
    if damage == "edit":
        lines[1] = lines[1].replace(b'"epsilon":1.0', b'"epsilon":0.1')
    elif damage == "delete":
        del lines[1]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    with pytest.raises(AuditError) as err:
        BudgetLedger(path, party="bank_a")
    # An edited line breaks the chain at the line after it; a removed or moved one where it was.
    line = 3 if damage == "edit" else 2
    assert err.value.details["check"] == "ledger_chain" and err.value.details["line"] == line
    assert str(path) in err.value.message and f"line {line}" in err.value.message


def test_a_line_torn_by_a_crash_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    _reserve(BudgetLedger(path, party="bank_a"), _plan(POLICY))
    with path.open("ab") as f:
        f.write(b'{"kind":"reserve","plan')
    ledger = BudgetLedger(path, party="bank_a")
    assert _reserve(ledger, _plan(POLICY, qid="q2"))
    assert read_ledger(path).lines == 2


def test_refresh_windows_count_charges_less_than_one_window_away() -> None:
    policy = _policy(refresh="PT1H")
    clock = iter([10_000.0 * i for i in range(100)])  # reserved far apart on the agent's clock
    ledger = BudgetLedger(None, party="bank_a", clock=lambda: next(clock))
    asks = asks_of("bank_a", _plan(policy), {"loans": policy})
    assert asks[0].window == 3600
    for i in range(4):
        ledger.reserve(_plan(policy, qid=f"q{i}"), asks, at=0.0, until=time.time() + 60)
    with pytest.raises(PolicyRefusalError):
        ledger.reserve(_plan(policy, qid="q4"), asks, at=3599.0, until=time.time() + 60)
    assert ledger.reserve(_plan(policy, qid="q5"), asks, at=3600.0, until=time.time() + 60)
    assert within_window(0.0, 3599.9, 3600) and not within_window(0.0, 3600.0, 3600)
    assert within_window(0.0, 1e12, None)


def test_a_coordinator_backdating_its_entries_cannot_spread_todays_charges_over_old_windows() -> None:
    """Twelve queries reserved now, their log entries dated 31 days apart in the past: the agent's
    own clock puts them in one window, so the budget (1) pays for one."""
    policy = _policy(refresh="P30D", epsilon_budget=1.0)
    ledger = BudgetLedger(None, party="bank_a", clock=lambda: 1e9)
    asks = asks_of("bank_a", _plan(policy), {"loans": policy})
    day = 86400.0
    assert ledger.reserve(_plan(policy, qid="q0"), asks, at=1e9, until=1e9 + 60)
    for i in range(1, 12):
        with pytest.raises(PolicyRefusalError) as err:
            ledger.reserve(_plan(policy, qid=f"q{i}"), asks, at=1e9 - i * 31 * day, until=1e9 + 60)
        assert err.value.details["rule"] == "privacy_budget"


def test_concurrent_reservations_cannot_overspend() -> None:
    ledger = BudgetLedger(None, party="bank_a")
    results: list[bool] = []

    def one(i: int) -> None:
        try:
            results.append(_reserve(ledger, _plan(POLICY, qid=f"q{i}")))
        except PolicyRefusalError:
            results.append(False)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 4
    assert ledger.spent("bank_a.loans", "analyst:alice", 1000.0, None) == 4.0


def test_approvals_commit_on_first_flow_and_release_on_reject_revoke_and_lapse(tmp_path: Path) -> None:
    ledger = BudgetLedger(tmp_path / LEDGER_FILE, party="bank_a")
    approvals = Approvals("bank_a", approval_ttl_seconds=0.2, pending_ttl_seconds=0.1, ledger=ledger)
    used, lapsed = _plan(POLICY, qid="qu"), _plan(POLICY, qid="ql")
    for p in (used, lapsed):
        _reserve(ledger, p)
        approvals.hold(p, manual=False, sign=lambda h, pos: b"sig")
    approvals.claim(used.hash, "tee")
    assert ledger.state_of(used.hash) == {"committed"}
    time.sleep(0.3)
    approvals.lapse()
    assert ledger.state_of(lapsed.hash) == {"released"} and ledger.state_of(used.hash) == {"committed"}


def test_an_owners_reject_and_revoke_give_back_what_was_reserved(tmp_path: Path) -> None:
    from sealroom.v1 import party_pb2

    ledger = BudgetLedger(tmp_path / LEDGER_FILE, party="bank_a")
    approvals = Approvals("bank_a", approval_ttl_seconds=60, pending_ttl_seconds=60, ledger=ledger)
    revoked, rejected = _plan(POLICY, qid="qv"), _plan(POLICY, qid="qj")
    for p in (revoked, rejected):
        approvals.hold(p, manual=True, sign=lambda h, pos: b"sig")
        _reserve(ledger, p)  # what the agent does when the owner approves (connectors/agent/party.py)
        approvals.grant(party_pb2.OwnerCommand(query_id=p.query_id), sign=lambda h, pos: b"sig")
    approvals.revoke(party_pb2.OwnerCommand(query_id=revoked.query_id))
    approvals.reject(party_pb2.OwnerCommand(query_id=rejected.query_id))
    assert ledger.state_of(revoked.hash) == {"released"} and ledger.state_of(rejected.hash) == {"released"}
    assert ledger.spent("bank_a.loans", "analyst:alice", 1000.0, None) == 0.0
    whys = [json.loads(x).get("why") for x in (tmp_path / LEDGER_FILE).read_bytes().splitlines()]
    assert whys[-2:] == ["revoked", "rejected"]
