"""Log entries in words, for the reviewer's commands (``sealroom audit list/show/export``).

The entries hold identifiers, digests, counts and flags only (``sealroom.audit.entries.EVENT_TYPES``), so
what is said here holds nothing else either. Entries are read from a log export defensively: this
describes, :func:`sealroom.audit.verify.verify_log` judges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["WITHDRAWALS", "describe", "event_row", "query_history", "notable_events"]

# The events that end a query without a release or take an approval back: what a reviewer lists
# next to the releases.
WITHDRAWALS = ("query_refused", "rejected", "approval_revoked", "approval_lapsed")

_LAPSE = {"expired": "its expiry passed", "not_held_by_agent": "the owner's agent no longer holds it"}


def _iso(ms: Any) -> str:
    if type(ms) is not int:
        return "?"
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return "?"


def _short(digest: Any) -> str:
    return f"{digest[:12]}…" if isinstance(digest, str) and len(digest) > 12 else str(digest)


def describe(entry: Mapping[str, Any]) -> str:
    """One entry in words, e.g. ``bank_b revoked its approval (signed request)``."""
    t = entry.get("type")
    ev = entry.get("event")
    ev = ev if isinstance(ev, Mapping) else {}
    g = ev.get
    if t == "party_registered":
        what = {"enrolled": "was enrolled", "key_changed": "registered a new key (new enrolment)"}
        change = what.get(str(g("change")), "changed its address or datasets")
        return f"{g('party')} {change}, signed by its key {_short(g('owner_key'))} ({g('datasets')} dataset(s))"
    if t == "dataset_registered":
        return f"{g('party')} registered {g('dataset')} (policy {_short(g('policy_digest'))})"
    if t == "query_submitted":
        return f"submitted by {g('analyst')} and planned (plan {_short(g('plan_hash'))})"
    if t == "query_refused":
        where = f"{g('party')}.{g('dataset')}" if g("dataset") else g("party")
        return (
            f"submitted by {g('analyst')} and refused by the planner ({g('code')}"
            + (f", rule {g('rule')}" if g("rule") else "")
            + (f", {where}" if where else "")
            + ")"
        )
    if t == "approved":
        return f"approved by {g('party')}"
    if t == "rejected":
        return f"rejected by {g('party')}" + (f" ({g('rule')})" if g("rule") else "")
    if t == "approval_revoked":
        signed = " (signed request)" if g("owner_signature") else ""
        return f"{g('party')} revoked its approval{signed}"
    if t == "approval_lapsed":
        return f"the approval of {g('party')} lapsed: {_LAPSE.get(str(g('cause')), str(g('cause')))}"
    if t == "stage_executed":
        how = "enclave" if g("kind") == "tee" else "MPC"
        if g("simulated"):
            extra = ", SIMULATED attestation"
        elif g("platform"):
            extra = f", {g('platform')}"
        else:
            extra = f", {g('players')} players" if g("players") else ""
        return f"stage {g('stage')} executed ({how}{extra})"
    if t == "released":
        return f"released ({g('suppressed_cells')} cell(s) suppressed{', SIMULATED' if g('simulated') else ''})"
    if t == "compliance_decision":
        return f"{g('reviewer')}: {g('decision')}"
    if t == "collaboration_declared":
        return f"collaboration declared (sha256 {_short(g('declaration_sha256'))})"
    return str(t)


def event_row(entry: Mapping[str, Any], *, analyst: str | None = None) -> dict[str, Any]:
    """The entry as a row for listing: seq, time, type, query, party, dataset, analyst, rule (or the
    lapse's cause, or the refusal's code), and the words."""
    ev = entry.get("event")
    ev = ev if isinstance(ev, Mapping) else {}
    return {
        "entry": entry.get("seq"),
        "time": _iso(entry.get("time_ms")),
        "time_ms": entry.get("time_ms"),
        "type": entry.get("type"),
        "query_id": ev.get("query_id"),
        "party": ev.get("party"),
        "dataset": ev.get("dataset"),
        "analyst": ev.get("analyst", analyst),
        "rule": ev.get("rule") or ev.get("cause") or ev.get("code"),
        "text": describe(entry),
    }


def _entries(export: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    entries = export.get("entries")
    return [
        e
        for e in (entries if isinstance(entries, list) else [])
        if isinstance(e, Mapping) and isinstance(e.get("event"), Mapping)
    ]


def query_history(export: Mapping[str, Any], query_id: str) -> list[dict[str, Any]]:
    """Every entry about one query, in log order."""
    return [event_row(e) for e in _entries(export) if e["event"].get("query_id") == query_id]


def notable_events(export: Mapping[str, Any], types: Sequence[str] = WITHDRAWALS) -> list[dict[str, Any]]:
    """The entries of these types, in log order, each with the analyst of its query where the log
    names one (``query_submitted`` or ``query_refused``)."""
    entries = _entries(export)
    analysts = {
        e["event"].get("query_id"): e["event"].get("analyst")
        for e in entries
        if e.get("type") in ("query_submitted", "query_refused")
    }
    return [event_row(e, analyst=analysts.get(e["event"].get("query_id"))) for e in entries if e.get("type") in types]
