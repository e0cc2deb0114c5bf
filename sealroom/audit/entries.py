"""The transparency log's entries: one canonical JSON object each, of a fixed, typed shape.

An entry is ``{"v": 1, "seq": n, "time_ms": t, "type": ..., "event": {...}}``. The event fields of
each type are fixed and typed (identifiers, SHA-256 digests, signatures, counts): the constructor
refuses any other field, so an entry can hold no row value, no exact pre-suppression value, no free
text and no secret key. An entry's canonical bytes are its Merkle leaf (:mod:`sealroom.audit.merkle`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sealroom.audit.merkle import leaf_hash
from sealroom.canonical import canonical_json

__all__ = ["ENTRY_VERSION", "EVENT_TYPES", "DECISIONS", "LAPSE_CAUSES", "REGISTRATION_CHANGES", "LogEntry", "is_ident"]

ENTRY_VERSION = 1
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")
DECISIONS = ("accepted", "flagged", "withdrawn", "retained", "erased")

# type -> field -> kind; a trailing "?" marks an optional field. Kinds admit identifiers, digests,
# public signatures and public keys, counts and flags only: never free text, a value from the data,
# or a secret key.
EVENT_TYPES: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "dataset_registered": {
            "party": "ident",
            "dataset": "ident",
            "policy_digest": "sha256",
            "schema_sha256": "sha256?",
            "owner_key_sha256": "sha256?",
        },
        # A party's own signed registration (sealroom.signing.Registration: every field it signs, and
        # its signature by ``owner_key``, the Ed25519 public key it registers), logged when the name
        # is enrolled, its key changes (a new enrolment), or its address or datasets change.
        "party_registered": {
            "party": "ident",
            "owner_key": "public_key",
            "address_sha256": "sha256",
            "datasets_sha256": "sha256",
            "datasets": "count",
            "issued_at_ms": "count",
            "signature": "hex",
            "change": "registration_change",
        },
        "query_submitted": {"query_id": "ident", "analyst": "ident", "sql_sha256": "sha256", "plan_hash": "sha256?"},
        "approved": {"query_id": "ident", "party": "ident", "plan_hash": "sha256", "signature": "hex?"},
        "rejected": {"query_id": "ident", "party": "ident", "plan_hash": "sha256?", "rule": "ident?"},
        "stage_executed": {
            "query_id": "ident",
            "stage": "ident",
            "kind": "stage_kind",
            "plan_hash": "sha256",
            "measurement": "hex?",
            "platform": "ident?",
            "simulated": "bool",
            "evidence_sha256": "sha256?",
            "result_doc_sha256": "sha256?",
            "players": "count?",
        },
        "released": {
            "query_id": "ident",
            "plan_hash": "sha256",
            "receipt_sha256": "sha256",
            "result_sha256": "sha256",
            "simulated": "bool",
            "suppressed_cells": "count",
        },
        "compliance_decision": {
            "query_id": "ident",
            "reviewer": "ident",
            "decision": "decision",
            "reason_sha256": "sha256?",
        },
        # The planner (or a policy) refused a submitted query: no plan exists. ``code`` is the error
        # code, ``rule`` the rule it named; ``party``/``dataset`` only when they are registered.
        "query_refused": {
            "query_id": "ident",
            "analyst": "ident",
            "sql_sha256": "sha256",
            "code": "ident",
            "rule": "ident?",
            "party": "ident?",
            "dataset": "ident?",
        },
        # An owner withdrew its stored approval before execution, with its own signed request
        # (``owner_signature`` over the owner-action message of ``issued_at_ms``: sealroom.planning.plan).
        "approval_revoked": {
            "query_id": "ident",
            "party": "ident",
            "plan_hash": "sha256",
            "issued_at_ms": "count?",
            "owner_signature": "hex?",
        },
        # A stored approval stopped counting: its expiry passed (``expired``), or the owner's agent no
        # longer holds it (``not_held_by_agent``: lapsed or revoked at the agent).
        "approval_lapsed": {"query_id": "ident", "party": "ident", "plan_hash": "sha256", "cause": "lapse_cause"},
        # What a released dp plan charged one dataset's privacy budget (one entry per dataset, in the
        # release's transaction, right after its released entry): the charge of
        # sealroom.planning.privacy.charges, never a value.
        "privacy_charge": {
            "query_id": "ident",
            "plan_hash": "sha256",
            "dataset": "ident",
            "scope": "ident",
            "epsilon": "number",
            "delta": "number",
        },
        # The operator's declaration of the collaboration (``collaboration.json``, for the record of
        # processing) as published at the coordinator's start, when it changed.
        "collaboration_declared": {"declaration_sha256": "sha256"},
    }
)
LAPSE_CAUSES = ("expired", "not_held_by_agent")
# A party_registered entry's change: the name's first registration (with the operator's enrolment),
# a new key (with a new enrolment), or a new address or datasets under the same key.
REGISTRATION_CHANGES = ("enrolled", "key_changed", "updated")


def is_ident(value: Any) -> bool:
    """True when ``value`` can be an entry's identifier field (party, dataset, analyst, query id, rule)."""
    return isinstance(value, str) and _IDENT.fullmatch(value) is not None


def _valid(kind: str, value: Any) -> bool:
    if kind == "ident":
        return isinstance(value, str) and _IDENT.fullmatch(value) is not None
    if kind == "sha256":
        return isinstance(value, str) and _SHA256.fullmatch(value) is not None
    if kind == "hex":
        return isinstance(value, str) and _HEX.fullmatch(value) is not None
    if kind == "bool":
        return type(value) is bool
    if kind == "count":
        return type(value) is int and 0 <= value < 1 << 53
    if kind == "stage_kind":
        return value in ("tee", "mpc")
    if kind == "decision":
        return value in DECISIONS
    if kind == "lapse_cause":
        return value in LAPSE_CAUSES
    if kind == "public_key":
        return isinstance(value, str) and _PUBLIC_KEY.fullmatch(value) is not None
    if kind == "registration_change":
        return value in REGISTRATION_CHANGES
    if kind == "number":  # a privacy charge's epsilon or delta: finite, non-negative
        return type(value) in (int, float) and math.isfinite(value) and value >= 0
    raise AssertionError(kind)


@dataclass(frozen=True)
class LogEntry:
    """One event of the log. Refuses unknown types, unknown or missing fields and ill-typed values
    (``ValueError``); ``event`` is frozen."""

    seq: int
    time_ms: int
    type: str
    event: Mapping[str, Any]

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 0:
            raise ValueError("an entry's seq is a non-negative int")
        if type(self.time_ms) is not int or self.time_ms < 0:
            raise ValueError("an entry's time_ms is a non-negative int (unix milliseconds)")
        spec = EVENT_TYPES.get(self.type) if isinstance(self.type, str) else None
        if spec is None:
            raise ValueError(f"unknown event type {self.type!r}; known: {', '.join(EVENT_TYPES)}")
        if not isinstance(self.event, Mapping):
            raise TypeError("an entry's event is a mapping of its fields")
        unknown = sorted(str(k) for k in self.event if k not in spec)
        if unknown:
            raise ValueError(
                f"a {self.type} event has no field {', '.join(unknown)}: the log holds only the fields "
                f"{', '.join(spec)} (never a value from the data, free text or a key)"
            )
        for name, kind in spec.items():
            optional = kind.endswith("?")
            if name not in self.event:
                if optional:
                    continue
                raise ValueError(f"a {self.type} event needs {name}")
            if not _valid(kind.rstrip("?"), self.event[name]):
                raise ValueError(f"the {name} of a {self.type} event must be a {kind.rstrip('?')}")
        object.__setattr__(self, "event", MappingProxyType(dict(self.event)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": ENTRY_VERSION,
            "seq": self.seq,
            "time_ms": self.time_ms,
            "type": self.type,
            "event": dict(self.event),
        }

    def canonical(self) -> bytes:
        """The leaf data: canonical JSON of :meth:`to_dict`."""
        return canonical_json(self.to_dict())

    def leaf_hash(self) -> bytes:
        return leaf_hash(self.canonical())

    @property
    def query_id(self) -> str | None:
        value = self.event.get("query_id")
        return value if isinstance(value, str) else None

    def label(self) -> str:
        """``entry 17 (released, query q_...)``: how errors and reports name this entry."""
        extra = f", query {self.query_id}" if self.query_id else ""
        return f"entry {self.seq} ({self.type}{extra})"

    @classmethod
    def from_dict(cls, doc: Any) -> LogEntry:
        if not isinstance(doc, Mapping) or set(doc) != {"v", "seq", "time_ms", "type", "event"}:
            raise ValueError("an entry is an object with exactly v, seq, time_ms, type and event")
        if doc["v"] != ENTRY_VERSION or type(doc["v"]) is not int:
            raise ValueError(f"entry version {doc['v']!r} is not {ENTRY_VERSION}")
        return cls(doc["seq"], doc["time_ms"], doc["type"], doc["event"])

    @classmethod
    def from_bytes(cls, data: bytes) -> LogEntry:
        """Parse stored bytes, which must be exactly the entry's canonical encoding."""
        try:
            entry = cls.from_dict(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"not a JSON entry ({type(exc).__name__})") from None
        if entry.canonical() != data:
            raise ValueError("the stored entry is not in canonical form")
        return entry
