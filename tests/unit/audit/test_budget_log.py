"""privacy_charge entries in the transparency log: appended with a dp release, checked against the
release's plan, re-added per dataset, scope and refresh window, and compared with an owner's ledger."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from connectors.agent.ledger import BudgetLedger, asks_of
from coordinator.planner import CatalogEntry, plan_query
from sealroom.audit.budget import verify_ledger
from sealroom.audit.entries import LogEntry
from sealroom.audit.ledger import read_ledger
from sealroom.audit.log import TransparencyLog, load_export
from sealroom.audit.notes import NoteSigner
from sealroom.audit.receipts import plan_charges
from sealroom.audit.store import SQLiteLogStore
from sealroom.audit.verify import verify_log
from sealroom.errors import AuditError
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy

SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string())])


def _policy(budget: float = 2.0, refresh: str = "never") -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {"customer_id": "join_key", "segment": {"role": "dimension", "values": ["a", "b"]}},
            "privacy": {"mode": "dp", "epsilon_budget": budget, "refresh": refresh},
        },
        source="t.toml",
    )


def _plan(qid: str, policy: DatasetPolicy, epsilon: float = 1.0) -> Plan:
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", SCHEMA, policy)}
    plan, _ = plan_query(
        "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment",
        query_id=qid,
        analyst="alice",
        catalog=catalog,
        party_keys={"bank_a": "ab" * 32},
        epsilon=epsilon,
    )
    return plan


class Clock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        self.t += 10.0
        return self.t


def _release(log: TransparencyLog, plan: Plan, charges: Any = None) -> None:
    log.append(
        "query_submitted", query_id=plan.query_id, analyst=plan.analyst, sql_sha256="a" * 64, plan_hash=plan.hash
    )
    receipt = {
        "query": {"id": plan.query_id, "plan_hash": plan.hash},
        "plan": plan.to_dict(),
        "result": {"sha256": "b" * 64},
        "simulated": False,
        "disclosure": {"suppressed": []},
        "privacy": {"charges": plan_charges(plan) if charges is None else charges},
    }
    log.append_release(receipt)


def _log(tmp_path: Path) -> TransparencyLog:
    db = sqlite3.connect(str(tmp_path / "c.db"), isolation_level=None)
    return TransparencyLog(SQLiteLogStore(db), NoteSigner("test/log", Ed25519PrivateKey.generate()), clock=Clock())


def _verify(log: TransparencyLog) -> Any:
    return verify_log(load_export(json.dumps(log.export())), log_key=log.signer.verifier)


def test_a_dp_release_logs_its_charges_and_verify_readds_them(tmp_path: Path) -> None:
    log = _log(tmp_path)
    policy = _policy()
    _release(log, _plan("q1", policy))
    _release(log, _plan("q2", policy))
    report = _verify(log)
    assert report.entries_by_type["privacy_charge"] == 2
    assert [dict(b) for b in report.budgets] == [
        {
            "dataset": "bank_a.loans",
            "scope": "analyst:alice",
            "epsilon_budget": 2.0,
            "refresh": "never",
            "spent": 2.0,
            "charges": 2,
        }
    ]
    _release(log, _plan("q3", policy))  # a third: over the budget of 2.0
    with pytest.raises(AuditError) as err:
        _verify(log)
    assert err.value.details["check"] == "privacy_budget" and "bank_a.loans" in err.value.message


def test_charges_in_another_refresh_window_do_not_add_up(tmp_path: Path) -> None:
    log = _log(tmp_path)
    policy = _policy(budget=1.0, refresh="PT30S")
    for i in range(3):
        _release(log, _plan(f"q{i}", policy))  # submissions 40 s apart (the test clock)
    assert _verify(log).budgets[0]["charges"] == 3


def test_a_charge_that_is_not_its_plans_is_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    plan = _plan("q1", _policy())
    forged = [{**plan_charges(plan)[0], "epsilon": 0.01}]  # logged (and signed) as smaller than it was
    _release(log, plan, charges=forged)
    with pytest.raises(AuditError) as err:
        _verify(log)
    assert err.value.details["check"] == "privacy_charge" and err.value.details["query_id"] == "q1"


def test_an_edited_charge_breaks_the_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _release(log, _plan("q1", _policy()))
    export = log.export()
    charge = next(e for e in export["entries"] if e["type"] == "privacy_charge")
    charge["event"]["epsilon"] = 0.5
    with pytest.raises(AuditError) as err:
        verify_log(load_export(json.dumps(export)), log_key=log.signer.verifier)
    assert err.value.details["check"] == "checkpoint_root"


def test_an_owners_ledger_against_the_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    policy = _policy()
    path = tmp_path / "budget.jsonl"
    ledger = BudgetLedger(path, party="bank_a")
    released, failed = _plan("q1", policy), _plan("q2", policy)
    for p in (released, failed):
        ledger.reserve(p, asks_of("bank_a", p, {"loans": policy}), at=1.0, until=time.time() + 60)
        ledger.commit(p.hash)
    _release(log, released)
    entries = [LogEntry.from_dict(e) for e in log.export()["entries"]]
    summary = verify_ledger(read_ledger(path), entries, party="bank_a")
    assert summary["committed"] == 2 and summary["committed_not_released"] == 1
    # A ledger that lost the released plan's commit (rewritten from scratch) disagrees with the log.
    fresh = BudgetLedger(tmp_path / "other.jsonl", party="bank_a")
    with pytest.raises(AuditError) as err:
        verify_ledger(read_ledger(tmp_path / "other.jsonl"), entries, party="bank_a")
    assert err.value.details["check"] == "ledger_charges" and fresh.path is not None
