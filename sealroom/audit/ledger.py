"""An owner's privacy budget ledger (``budget.jsonl`` in its agent's state directory): its format,
its hash chain, and what it says was spent.

The agent (:mod:`connectors.agent.ledger`) writes it; ``sealroom audit verify --ledger FILE`` and
the agent at its start read it here. One canonical JSON object a line, each naming the SHA-256 of
the line before it (``prev``; 64 zeros for the first), so a line edited, removed, inserted or
reordered breaks the chain at a line this module names. Records:

- ``reserve``: ``plan_hash``, ``query_id``, ``dataset`` (party.dataset), ``scope``
  (``analyst:<name>`` or ``collaboration``), ``epsilon``, ``delta``, ``at`` (the query's submission
  time in the coordinator's log, unix seconds: what the refresh window counts from) and ``until``
  (when the approval it was made for lapses, unix seconds);
- ``extend``: ``plan_hash``, ``until`` (the plan was approved again, for a new lifetime);
- ``commit``: ``plan_hash`` (the owner's data flowed for the plan: never released after this);
- ``release``: ``plan_hash``, ``why`` (rejected, revoked, expired, refused...: the data never flowed).

A line torn by a crash (the file's last, without its newline) recorded a decision that never took
effect (the agent acts only once a line is on disk), so it is ignored; any other unreadable line
is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealroom.audit.refusals import refuse
from sealroom.canonical import canonical_json

__all__ = ["GENESIS", "LEDGER_FILE", "LedgerState", "Reservation", "chain_line", "read_ledger", "within_window"]

LEDGER_FILE = "budget.jsonl"
GENESIS = "0" * 64
KINDS: Mapping[str, frozenset[str]] = {
    "reserve": frozenset(
        {"plan_hash", "query_id", "dataset", "scope", "epsilon", "delta", "at", "reserved_at", "until"}
    ),
    "extend": frozenset({"plan_hash", "until"}),
    "commit": frozenset({"plan_hash"}),
    "release": frozenset({"plan_hash", "why"}),
}


def chain_line(record: Mapping[str, Any], prev: str) -> bytes:
    """The bytes of one ledger line (without its newline): ``record`` with ``prev``, canonical."""
    return canonical_json({**record, "prev": prev}, allow_nan=False)


@dataclass
class Reservation:
    """What one plan reserved of one dataset's budget."""

    plan_hash: str
    query_id: str
    dataset: str
    scope: str
    epsilon: float
    delta: float
    at: float  # the query's submission time in the log (what audit verify's windows count by)
    until: float
    reserved_at: float = 0.0  # the agent's own clock when it reserved
    state: str = "reserved"  # "reserved" | "committed" | "released"


@dataclass
class LedgerState:
    """What a ledger says: every reservation (the newest per (plan, dataset)), and the hash of its
    last line (what the next line chains to)."""

    reservations: dict[tuple[str, str], Reservation] = field(default_factory=dict)
    head: str = GENESIS
    lines: int = 0
    torn: bool = False

    def apply(self, record: Mapping[str, Any]) -> None:
        kind = record["kind"]
        plan_hash = record["plan_hash"]
        if kind == "reserve":
            key = (plan_hash, record["dataset"])
            self.reservations[key] = Reservation(
                plan_hash,
                record["query_id"],
                record["dataset"],
                record["scope"],
                float(record["epsilon"]),
                float(record["delta"]),
                float(record["at"]),
                float(record["until"]),
                float(record["reserved_at"]),
            )
            return
        for r in self.of_plan(plan_hash):
            if kind == "extend" and r.state == "reserved":
                r.until = max(r.until, float(record["until"]))
            elif kind == "commit" and r.state == "reserved":
                r.state = "committed"
            elif kind == "release" and r.state == "reserved":
                r.state = "released"

    def of_plan(self, plan_hash: str) -> list[Reservation]:
        return [r for (h, _), r in self.reservations.items() if h == plan_hash]

    def live(self, plan_hash: str) -> list[Reservation]:
        """The plan's reservations that count (reserved or committed)."""
        return [r for r in self.of_plan(plan_hash) if r.state != "released"]

    def spent(self, dataset: str, scope: str, at: float, window: int | None, now: float | None = None) -> float:
        """Epsilon that counts against (dataset, scope) for a charge at ``at`` (its log time) reserved
        at ``now`` (the agent's clock; None: not checked): every reservation not released (reserved
        counts as spent) whose log time is within ``window`` of ``at``, or that was reserved within
        ``window`` of ``now`` (None: all). Both clocks count, so the windows of the log (which audit
        verify re-adds) hold, and a coordinator that backdates its entries, one window further each
        time, cannot spread charges reserved today over windows of the past."""
        return math.fsum(
            r.epsilon
            for r in self.reservations.values()
            if r.dataset == dataset
            and r.scope == scope
            and r.state != "released"
            and (within_window(r.at, at, window) or (now is not None and within_window(r.reserved_at, now, window)))
        )

    def committed(self) -> list[Reservation]:
        return [r for r in self.reservations.values() if r.state == "committed"]


def within_window(t: float, at: float, window: int | None) -> bool:
    """Whether a charge at ``t`` can share a refresh window (``window`` seconds, rolling; None:
    never refreshed) with one at ``at``: any window of that length that holds ``at`` holds only
    charges less than ``window`` away, on either side, so an owner that keeps every such set within
    its budget keeps every window within it."""
    return window is None or abs(t - at) < window


def _check_record(doc: Any) -> dict[str, Any] | None:
    """The record of a parsed line, or None when it is not one of the known shapes."""
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or not isinstance(doc.get("prev"), str):
        return None
    fields = KINDS.get(doc["kind"])
    if fields is None or set(doc) != fields | {"kind", "prev"}:
        return None
    for name in fields & {"epsilon", "delta", "at", "reserved_at", "until"}:
        v = doc[name]
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            return None
    for name in fields & {"plan_hash", "query_id", "dataset", "scope", "why"}:
        if not isinstance(doc[name], str):
            return None
    return doc


def read_ledger(path: Path, lines: Iterable[bytes] | None = None) -> LedgerState:
    """Read and check a ledger; AuditError (``check`` ``ledger_chain`` or ``ledger_format``, with
    ``file`` and ``line``, 1-based) at the first line that is malformed or does not chain to the one
    before it. A missing file is an empty ledger."""
    state = LedgerState()
    if lines is None:
        if not path.exists():
            return state
        data = path.read_bytes()
        state.torn = bool(data) and not data.endswith(b"\n")
        lines = data.split(b"\n")[:-1]  # the last piece: "" or a torn line, ignored
    for n, line in enumerate(lines, start=1):
        where = {"file": str(path), "line": n}
        try:
            doc = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            doc = None
        record = _check_record(doc)
        if record is None or canonical_json(record, allow_nan=False) != line:
            raise refuse(
                "ledger_format",
                f"the budget ledger {path} is damaged at line {n}: not a ledger record; it was edited, "
                "so this agent does not trust it (restore the file from a backup; never delete it, which "
                "would give every budget back)",
                **where,
            )
        if record["prev"] != state.head:
            raise refuse(
                "ledger_chain",
                f"the budget ledger {path} is broken at line {n}: it does not follow the line before it "
                "(a line was edited, removed, inserted or reordered); restore the file from a backup (never "
                "delete it, which would give every budget back)",
                **where,
            )
        state.apply(record)
        state.head = hashlib.sha256(line).hexdigest()
        state.lines = n
    return state
