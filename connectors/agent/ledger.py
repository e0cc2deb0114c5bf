"""The owner's privacy budgets, kept by its own agent: what each dp dataset has spent, per scope.

An owner whose dataset is in ``dp`` mode (``[privacy] epsilon_budget``) trusts nobody else to count
what its data has spent, so its agent keeps a ledger (``budget.jsonl`` in its state directory; the
format and its hash chain are :mod:`sealroom.audit.ledger`) and decides with it:

- at review, a plan whose charge (its epsilon, to each of this owner's dp datasets it reads, in the
  scope the owner chose) would take a dataset past its budget is refused (rule ``privacy_budget``,
  naming the dataset, the analyst, the epsilon asked and the epsilon left);
- when the agent signs an approval (automatic, at review; manual, when the owner approves) it
  **reserves** the charge first: the line is on disk (flushed and fsynced) before the signature
  leaves the agent, and a reservation counts as spent, so approvals given at the same time cannot
  overspend (check and reserve hold one lock);
- when its data first flows for the plan (sealed to an enclave, or into an MPC stage) it
  **commits** the reservation, again on disk before the first byte moves;
- when the plan is rejected or revoked by this owner, or its approval lapses before any data
  flowed (checked at every review and approval, and at the agent's start), it **releases** it.

A plan reserved twice (reviewed again, retried) is charged once: a plan with a live reservation
is not charged again (a new approval only extends it). A restart keeps every line: the agent reads
the whole ledger at start, and refuses to start on a ledger whose chain is broken (naming the file
and the line), rather than trust it or begin a new one, which would give every budget back.

What a committed charge means, honestly: once the owner's data flowed for a plan, the agent cannot
tell a query that failed afterwards from one that was released and whose release a dishonest
operator hides from it; so a committed charge is never given back, even for a query that failed.
A query refused or failed before any of this owner's data flowed charges nothing: this owner's
refusal reserves nothing; a reservation made for a query another owner or the enclave then refused
counts until its approval lapses (``approval_ttl_seconds``; the coordinator does not tell the agent
that a query ended, and the agent does not take its word for it), and is then released.

The coordinator logs each released charge (``privacy_charge`` entries), and ``sealroom audit verify
--ledger budget.jsonl`` checks that the ledger's chain holds and that the log's charges are committed
in it. The chain shows a line edited, removed or reordered, not a last line edited or removed: that
is what comparing with the log (and backups of the file) is for.

Refresh windows (``refresh = "P30D"``) are rolling. A charge has two times: the query's submission
time in the coordinator's log (the ``query_submitted`` entry the agent witnessed; never later than
the agent's own clock, so a coordinator cannot date queries ahead into fresh windows), which
``sealroom audit verify`` reads too, and the agent's own clock when it reserved. A new charge is
checked against every charge less than one window away, on either side, by either clock
(:func:`sealroom.audit.ledger.within_window`), so a coordinator that dates entries in the past,
one window further each time, cannot spread today's charges over old windows either.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealroom.audit.ledger import LedgerState, chain_line, read_ledger
from sealroom.errors import ApprovalError, PolicyRefusalError
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import charges
from sealroom.policy import DatasetPolicy

__all__ = ["Ask", "BudgetLedger", "asks_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ask:
    """What a plan asks of one of this owner's dp datasets: its charge and the budget it meets."""

    dataset: str  # party.dataset
    scope: str
    epsilon: float
    delta: float
    budget: float
    window: int | None  # the refresh window, seconds (None: never refreshed)
    refresh: str = "never"  # as the owner wrote it ("P30D")


def asks_of(party: str, plan: Plan, policies: Mapping[str, DatasetPolicy]) -> list[Ask]:
    """The charges ``plan`` makes to this owner's dp datasets (empty for a plan without privacy)."""
    if plan.privacy is None:
        return []
    mine = [i for i in plan.inputs() if i.party == party]
    out = []
    for c in charges(plan.analyst, mine, plan.privacy):
        rule = policies[c.dataset.split(".", 1)[1]].dp
        assert rule is not None and rule.epsilon_budget is not None  # charges() keeps dp inputs only
        out.append(Ask(c.dataset, c.scope, c.epsilon, c.delta, rule.epsilon_budget, rule.refresh_seconds, rule.refresh))
    return out


class BudgetLedger:
    """The ledger of one agent (thread-safe). ``path`` None: memory only (tools and tests)."""

    def __init__(self, path: Path | None, *, party: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.party = party
        self._clock = clock  # the agent's own clock: when it reserves
        self._lock = threading.Lock()
        # Raises AuditError naming the file and line when the chain is broken: the agent does not start.
        self._state = read_ledger(path) if path is not None else LedgerState()
        if self._state.torn and path is not None:
            # A line torn by a crash recorded a decision that never took effect: cut it off.
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            log.warning("the budget ledger %s ends in a line torn by a crash; it is dropped", path)
            with path.open("r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            self._state.torn = False

    # -- reading ---------------------------------------------------------------------------------

    def left(self, ask: Ask, at: float) -> float:
        with self._lock:
            return max(0.0, ask.budget - self._state.spent(ask.dataset, ask.scope, at, ask.window, now=self._clock()))

    def spent(self, dataset: str, scope: str, at: float, window: int | None) -> float:
        with self._lock:
            return self._state.spent(dataset, scope, at, window)

    def state_of(self, plan_hash: str) -> set[str]:
        """The states of the plan's reservations (empty: it reserved nothing)."""
        with self._lock:
            return {r.state for r in self._state.of_plan(plan_hash)}

    # -- deciding --------------------------------------------------------------------------------

    def check(self, plan: Plan, asks: Sequence[Ask], at: float) -> None:
        """Refuse (``privacy_budget``) a plan whose charge does not fit what is left; a plan that holds
        a live reservation already fits (it is charged once)."""
        with self._lock:
            if not self._state.live(plan.hash):
                self._check(plan, asks, at)

    def _check(self, plan: Plan, asks: Sequence[Ask], at: float) -> None:
        for ask in asks:
            spent = self._state.spent(ask.dataset, ask.scope, at, ask.window, now=self._clock())
            if spent + ask.epsilon > ask.budget * (1 + 1e-9):
                raise budget_refusal(self.party, plan.analyst, ask, max(0.0, ask.budget - spent))

    def reserve(self, plan: Plan, asks: Sequence[Ask], *, at: float, until: float) -> bool:
        """Check and reserve the plan's charges, on disk before this returns (the caller signs only
        then). True when this call reserved; False when the plan held a live reservation already
        (charged once: its lifetime is extended to ``until``)."""
        if not asks:
            return False
        with self._lock:
            live = self._state.live(plan.hash)
            if live:
                if any(r.state == "reserved" and r.until < until for r in live):
                    self._write([{"kind": "extend", "plan_hash": plan.hash, "until": until}])
                return False
            self._check(plan, asks, at)
            self._write(
                [
                    {
                        "kind": "reserve",
                        "plan_hash": plan.hash,
                        "query_id": plan.query_id,
                        "dataset": a.dataset,
                        "scope": a.scope,
                        "epsilon": a.epsilon,
                        "delta": a.delta,
                        "at": at,
                        "reserved_at": self._clock(),
                        "until": until,
                    }
                    for a in asks
                ]
            )
        log.info("reserved epsilon %g of %d dataset(s) for plan %s", asks[0].epsilon, len(asks), plan.hash[:12])
        return True

    def commit(self, plan_hash: str) -> None:
        """The owner's data is about to flow for the plan: its reservation is spent for good (on disk
        before this returns). A plan that reserved nothing (no dp dataset of this owner) passes; one
        whose reservation was released (revoked, lapsed) is refused: no data flows for it."""
        with self._lock:
            held = self._state.of_plan(plan_hash)
            if not held:
                return
            states = {r.state for r in held}
            if states == {"released"}:
                raise ApprovalError(
                    f"{self.party} gave back the privacy budget it reserved for this plan (its approval was "
                    "revoked or lapsed); it sends no data for it: submit the query again",
                    details={"party": self.party, "check": "budget_released"},
                )
            if "reserved" in states:
                self._write([{"kind": "commit", "plan_hash": plan_hash}])

    def release(self, plan_hash: str, why: str) -> bool:
        """Give back the plan's reservation (its data never flowed): True if one was released."""
        with self._lock:
            if not any(r.state == "reserved" for r in self._state.of_plan(plan_hash)):
                return False
            self._write([{"kind": "release", "plan_hash": plan_hash, "why": why}])
        log.info("released the privacy budget reserved for plan %s (%s)", plan_hash[:12], why)
        return True

    def release_lapsed(self, now: float, keep: Iterable[str] = ()) -> list[str]:
        """Give back every reservation whose approval lapsed before any data flowed (except the plans
        in ``keep``, whose approvals the agent holds live); the plan hashes released."""
        keep = set(keep)
        with self._lock:
            lapsed = sorted(
                {
                    r.plan_hash
                    for r in self._state.reservations.values()
                    if r.state == "reserved" and r.until <= now and r.plan_hash not in keep
                }
            )
            if lapsed:
                self._write([{"kind": "release", "plan_hash": h, "why": "expired"} for h in lapsed])
        for h in lapsed:
            log.info("released the privacy budget reserved for plan %s (its approval lapsed)", h[:12])
        return lapsed

    # -- the file --------------------------------------------------------------------------------

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Under _lock: append ``records``, chained, flushed and fsynced, then apply them."""
        head = self._state.head
        lines = []
        for record in records:
            line = chain_line(record, head)
            head = hashlib.sha256(line).hexdigest()
            lines.append(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(line + b"\n" for line in lines))
                os.fsync(fd)
            finally:
                os.close(fd)
        for record in records:
            self._state.apply(record)
        self._state.head = head
        self._state.lines += len(records)


def budget_refusal(party: str, analyst: str, ask: Ask, left: float) -> PolicyRefusalError:
    """The refusal of a plan that would take ``ask.dataset`` past its budget."""
    who = f"analyst {analyst}" if ask.scope.startswith("analyst:") else "the collaboration (all analysts)"
    window = "" if ask.window is None else f", refreshed over a rolling window of {ask.refresh}"
    left = math.floor(left * 1e9) / 1e9
    hint = f"ask with a smaller --epsilon (at most {left:g})" if left > 0 else "wait for the budget to refresh"
    if ask.window is None and left <= 0:
        hint = "the budget is spent"
    return PolicyRefusalError(
        f"{ask.dataset} has epsilon {left:g} left for {who} (budget {ask.budget:g}{window}); this query asks "
        f"for {ask.epsilon:g}: {hint}, or ask the owner of {ask.dataset} for a larger epsilon_budget",
        details={
            "party": party,
            "dataset": ask.dataset,
            "analyst": analyst,
            "scope": ask.scope,
            "epsilon": ask.epsilon,
            "epsilon_left": left,
            "epsilon_budget": ask.budget,
            "rule": "privacy_budget",
            "suggestion": f"--epsilon {left:g}" if left > 0 else "ask the owner for more budget",
        },
    )
