"""The owners' privacy budgets as the coordinator can show them: per registered ``dp`` dataset and
budget scope, the ``epsilon_budget`` of its policy, what the log's ``privacy_charge`` entries spent
within the current refresh window, and what is left (``GetBudget``, ``sealroom budget``,
``Client.budget()``, and the lines ``explain`` adds for a dp plan).

This is a view, not the decision: each owner's agent decides with its own ledger
(connectors/agent/ledger.py), which also counts approvals in flight and queries that failed after
its data flowed, so an agent may refuse a little earlier than this view suggests; it never allows
more. A charge's time is its query's submission in the log, as the agents and ``audit verify``
count it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sealroom.audit.budget import LoggedCharge, logged_charges
from sealroom.audit.entries import LogEntry
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import charges
from sealroom.policy import DatasetPolicy

__all__ = ["BudgetLine", "budget_lines", "log_entries", "remaining_lines"]

# Only these entries matter here: the rest of the log is not parsed.
_WANTED = (b'"type":"privacy_charge"', b'"type":"query_submitted"')


@dataclass(frozen=True)
class BudgetLine:
    dataset: str
    scope: str
    epsilon_budget: float
    spent: float
    refresh: str
    charges: int

    @property
    def left(self) -> float:
        return max(0.0, self.epsilon_budget - self.spent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "scope": self.scope,
            "epsilon_budget": self.epsilon_budget,
            "spent": self.spent,
            "left": self.left,
            "refresh": self.refresh,
            "charges": self.charges,
        }


def log_entries(store: Any) -> list[LogEntry]:
    """The store's ``privacy_charge`` and ``query_submitted`` entries (none without a log)."""
    log = getattr(store, "log", None)
    if log is None:
        return []
    return [LogEntry.from_bytes(b) for b in log.store.entries() if any(w in b for w in _WANTED)]


def _spent(found: Sequence[LoggedCharge], dataset: str, scope: str, window: int | None, now: float) -> list[float]:
    return [
        c.epsilon
        for c in found
        if c.dataset == dataset and c.scope == scope and (window is None or c.at > now - window)
    ]


def budget_lines(
    policies: Sequence[tuple[str, DatasetPolicy]],
    entries: Sequence[LogEntry],
    *,
    analyst: str | None,
    dataset: str | None = None,
    now: float | None = None,
) -> list[BudgetLine]:
    """Per dp dataset among ``policies`` (``(party.dataset, policy)``; only ``dataset`` when given)
    and scope: ``analyst``'s own scope and the collaboration's (None: every scope the log charged)."""
    now = time.time() if now is None else now
    found = logged_charges(entries)
    out = []
    for qualified, policy in sorted(policies, key=lambda x: x[0]):
        rule = policy.dp
        if rule is None or rule.epsilon_budget is None or (dataset and qualified != dataset):
            continue
        if rule.scope == "collaboration":
            scopes = ["collaboration"]
        elif analyst is not None:
            scopes = [rule.scope_key(analyst)]
        else:
            scopes = sorted({c.scope for c in found if c.dataset == qualified}) or []
        for scope in scopes:
            spent = _spent(found, qualified, scope, rule.refresh_seconds, now)
            out.append(BudgetLine(qualified, scope, rule.epsilon_budget, math.fsum(spent), rule.refresh, len(spent)))
    return out


def remaining_lines(plan: Plan, entries: Sequence[LogEntry], now: float | None = None) -> list[str]:
    """What ``explain`` says of a dp plan's cost: per dp dataset, the epsilon it spends, what is
    left of its owner's budget for this analyst (from the log's released charges), and what is left
    after this query."""
    if plan.privacy is None:
        return []
    policies = {i.qualified: i.policy for i in plan.inputs()}
    lines = []
    for c in charges(plan.analyst, plan.inputs(), plan.privacy):
        (line,) = budget_lines([(c.dataset, policies[c.dataset])], entries, analyst=plan.analyst, now=now)
        who = f"analyst {plan.analyst}" if c.scope.startswith("analyst:") else "the collaboration"
        after = line.left - c.epsilon
        verdict = f"{max(after, 0.0):g} left after it" if after >= -1e-9 else "its owner will refuse it (over budget)"
        window = "" if line.refresh == "never" else f" (refreshed over {line.refresh})"
        lines.append(
            f"{c.dataset}: epsilon {line.left:g} of {line.epsilon_budget:g} left for {who}{window}; "
            f"this query spends {c.epsilon:g}, {verdict}"
        )
    return lines
