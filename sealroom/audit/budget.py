"""The owners' privacy budgets as the transparency log records them: every ``privacy_charge`` entry
checked against its release, re-added per (dataset, scope, refresh window), and compared with an
owner's own ledger.

A charge's time is its query's submission (the ``query_submitted`` entry's time), the time the
owner's agent counted it from (connectors/agent/ledger.py). With a rolling refresh window of W
seconds, every window that ends at a charge must hold at most the dataset's ``epsilon_budget`` (the
budget of the policy the plan carries); without refresh, all charges together must.

Checks (``details["check"]``): ``privacy_charge`` (a charge that is not its release's: another
plan, epsilon, delta, scope or dataset, a missing one, or one without a release), ``privacy_budget``
(a dataset's budget exceeded), ``ledger_charges`` (an agent's committed charges are not the log's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sealroom.audit.entries import LogEntry
from sealroom.audit.ledger import LedgerState
from sealroom.audit.receipts import plan_charges
from sealroom.audit.refusals import refuse
from sealroom.canonical import canonical_json
from sealroom.errors import SealroomError
from sealroom.planning.plan import Plan
from sealroom.privacy_rule import PrivacyRule

__all__ = ["LoggedCharge", "Spent", "logged_charges", "verify_budgets", "verify_ledger"]

# Sums of floats: a budget is exceeded only beyond rounding.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class LoggedCharge:
    entry: int
    query_id: str
    plan_hash: str
    dataset: str
    scope: str
    epsilon: float
    delta: float
    at: float  # the query's submission, unix seconds


@dataclass(frozen=True)
class Spent:
    """What one (dataset, scope) spent, as the log shows it."""

    dataset: str
    scope: str
    epsilon_budget: float
    refresh: str
    spent: float  # in the window that ends at the last charge (all charges without refresh)
    charges: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "scope": self.scope,
            "epsilon_budget": self.epsilon_budget,
            "refresh": self.refresh,
            "spent": self.spent,
            "charges": self.charges,
        }


def logged_charges(entries: Sequence[LogEntry]) -> list[LoggedCharge]:
    """Every ``privacy_charge`` entry, with its query's submission time."""
    submitted = {e.query_id: e.time_ms / 1000 for e in entries if e.type == "query_submitted"}
    return [
        LoggedCharge(
            e.seq,
            str(e.query_id),
            str(e.event["plan_hash"]),
            str(e.event["dataset"]),
            str(e.event["scope"]),
            float(e.event["epsilon"]),
            float(e.event["delta"]),
            submitted.get(e.query_id, e.time_ms / 1000),
        )
        for e in entries
        if e.type == "privacy_charge"
    ]


def _plan_of(receipt: Mapping[str, Any]) -> Plan | None:
    if not isinstance(receipt.get("plan"), Mapping):
        return None
    try:
        return Plan.from_json(canonical_json(receipt.get("plan")))
    except (SealroomError, ValueError, TypeError, AttributeError, KeyError):
        return None


def verify_budgets(entries: Sequence[LogEntry], receipts: Mapping[str, Any]) -> list[Spent]:
    """Check every charge against its release's plan and every budget; the spending per (dataset,
    scope). Raises AuditError naming the entry."""
    charges = logged_charges(entries)
    by_query: dict[str, list[LoggedCharge]] = {}
    for c in charges:
        by_query.setdefault(c.query_id, []).append(c)
    rules: dict[tuple[str, str], PrivacyRule] = {}
    for e in entries:
        if e.type != "released":
            continue
        receipt = receipts.get(str(e.seq))
        plan = _plan_of(receipt) if isinstance(receipt, Mapping) else None
        expected = plan_charges(plan) if plan is not None else None
        logged = [
            {"dataset": c.dataset, "scope": c.scope, "epsilon": c.epsilon, "delta": c.delta}
            for c in by_query.pop(str(e.query_id), [])
            if c.plan_hash == e.event["plan_hash"]
        ]
        if json.loads(canonical_json(logged)) != (expected or []):
            raise refuse(
                "privacy_charge",
                f"{e.label()}: its privacy_charge entries are not the charges of its plan (each dp dataset "
                "it reads, the plan's epsilon and delta, the owner's scope): a charge was changed, dropped or "
                "added",
                entry=e.seq,
                query_id=e.query_id,
            )
        if plan is not None:
            for i in plan.inputs():
                if i.policy.dp is not None:
                    rules[(i.qualified, i.policy.dp.scope_key(plan.analyst))] = i.policy.dp
    for rest in by_query.values():
        c = rest[0]
        raise refuse(
            "privacy_charge",
            f"entry {c.entry} (privacy_charge, query {c.query_id}) charges a query the log shows no release of",
            entry=c.entry,
            query_id=c.query_id,
        )
    return [_check_budget(k, rule, [c for c in charges if (c.dataset, c.scope) == k]) for k, rule in rules.items()]


def _check_budget(key: tuple[str, str], rule: PrivacyRule, charges: list[LoggedCharge]) -> Spent:
    """Every refresh window that ends at a charge holds at most the budget."""
    dataset, scope = key
    budget = float(rule.epsilon_budget or 0.0)
    window = rule.refresh_seconds
    ordered = sorted(charges, key=lambda c: (c.at, c.entry))
    spent = 0.0
    for c in ordered:
        spent = math.fsum(o.epsilon for o in ordered if (window is None or c.at - window < o.at) and o.at <= c.at)
        if spent > budget * (1 + TOLERANCE):
            span = "in all" if window is None else f"within one refresh window ({rule.refresh})"
            raise refuse(
                "privacy_budget",
                f"entry {c.entry} (privacy_charge, query {c.query_id}): {dataset} spent epsilon {spent:g} for {scope} "
                f"{span}, over its epsilon_budget of {budget:g}: its owner's budget was exceeded",
                entry=c.entry,
                query_id=c.query_id,
                dataset=dataset,
                scope=scope,
            )
    return Spent(dataset, scope, budget, rule.refresh, spent, len(ordered))


def verify_ledger(state: LedgerState, entries: Sequence[LogEntry], *, party: str | None = None) -> dict[str, Any]:
    """An owner's ledger (already read and its chain checked) against the log: each of its committed
    charges is a charge the log records for that plan, and each charge the log records for its
    datasets is committed in it. Raises AuditError (``ledger_charges``)."""
    committed = {(r.plan_hash, r.dataset, r.scope, r.epsilon, r.delta) for r in state.committed()}
    datasets = {r.dataset for r in state.reservations.values()}
    if party is not None:
        datasets |= {d for d in (c.dataset for c in logged_charges(entries)) if d.split(".", 1)[0] == party}
    logged = {
        (c.plan_hash, c.dataset, c.scope, c.epsilon, c.delta) for c in logged_charges(entries) if c.dataset in datasets
    }
    missing = sorted(logged - committed)
    if missing:
        h, d, *_ = missing[0]
        raise refuse(
            "ledger_charges",
            f"the log charges {d} for plan {h[:16]}..., which the owner's ledger does not record as committed: "
            "the ledger lost a charge, or the log records one the owner never allowed",
            dataset=d,
            plan_hash=h,
        )
    released = {(r.plan_hash, r.dataset) for r in state.committed()} - {(c[0], c[1]) for c in logged}
    return {
        "ledger_lines": state.lines,
        "committed": len(committed),
        "committed_not_released": len(released),  # data flowed, no release logged: failed (or hidden)
        "datasets": sorted(datasets),
    }
