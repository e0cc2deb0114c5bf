"""The coordinator's view of the owners' budgets (coordinator/budget.py): from the log's
privacy_charge entries and the registered policies, per dataset and scope, within the refresh window."""

from __future__ import annotations

import pyarrow as pa

from coordinator.budget import budget_lines, remaining_lines
from coordinator.planner import CatalogEntry, plan_query
from sealroom.audit.entries import LogEntry
from sealroom.policy import DatasetPolicy

SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string())])
DAY = 86400


def _policy(**privacy: object) -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {"customer_id": "join_key", "segment": {"role": "dimension", "values": ["a", "b"]}},
            "privacy": {"mode": "dp", "epsilon_budget": 3.0, **privacy},
        },
        source="t.toml",
    )


def _entries(*charges: tuple[str, str, float, float]) -> list[LogEntry]:
    """(query id, scope, epsilon, submitted at) -> the query_submitted and privacy_charge entries."""
    out: list[LogEntry] = []
    for qid, scope, eps, at in charges:
        out.append(
            LogEntry(
                len(out), int(at * 1000), "query_submitted", {"query_id": qid, "analyst": "x", "sql_sha256": "a" * 64}
            )
        )
        out.append(
            LogEntry(
                len(out),
                int(at * 1000) + 1,
                "privacy_charge",
                {
                    "query_id": qid,
                    "plan_hash": "b" * 64,
                    "dataset": "bank_a.loans",
                    "scope": scope,
                    "epsilon": eps,
                    "delta": 0.0,
                },
            )
        )
    return out


def test_spent_and_left_per_scope_within_the_window() -> None:
    policy = _policy(refresh="P30D")
    entries = _entries(
        ("q1", "analyst:alice", 1.0, 0.0), ("q2", "analyst:alice", 0.5, 20 * DAY), ("q3", "analyst:bob", 1.0, 0.0)
    )
    (alice,) = budget_lines([("bank_a.loans", policy)], entries, analyst="alice", now=25 * DAY)
    assert (alice.scope, alice.spent, alice.left, alice.charges) == ("analyst:alice", 1.5, 1.5, 2)
    (later,) = budget_lines([("bank_a.loans", policy)], entries, analyst="alice", now=40 * DAY)
    assert (later.spent, later.charges) == (0.5, 1)  # q1 left the 30-day window
    everyone = budget_lines([("bank_a.loans", policy)], entries, analyst=None, now=25 * DAY)
    assert [(b.scope, b.spent) for b in everyone] == [("analyst:alice", 1.5), ("analyst:bob", 1.0)]
    shared = budget_lines([("bank_a.loans", _policy(scope="collaboration"))], entries, analyst="alice", now=0)
    assert [b.scope for b in shared] == ["collaboration"] and shared[0].spent == 0.0
    assert budget_lines([("bank_a.loans", DatasetPolicy())], entries, analyst="alice") == []  # threshold mode


def test_explain_says_what_is_left_before_and_after_the_query() -> None:
    policy = _policy()
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", SCHEMA, policy)}
    plan, _ = plan_query(
        "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment",
        query_id="q9",
        analyst="alice",
        catalog=catalog,
        party_keys={"bank_a": "ab" * 32},
        epsilon=1.0,
    )
    (line,) = remaining_lines(plan, _entries(("q1", "analyst:alice", 2.5, 0.0)), now=10.0)
    assert "bank_a.loans: epsilon 0.5 of 3 left for analyst alice" in line and "will refuse" in line
    (line,) = remaining_lines(plan, [], now=10.0)
    assert "epsilon 3 of 3 left" in line and "2 left after it" in line
