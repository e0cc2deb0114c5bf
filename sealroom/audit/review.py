"""The compliance reviewer's view of coordinators' logs (``sealroom receipt verify`` and ``sealroom
audit verify/list/show/export/ropa``): how receipts' attestation evidence is appraised, what a log is
verified with, and every release and notable event described in words with its verification status.

The options are typed records built at the command line's edge; nothing here reads an argument.
Unusable input (a state directory that holds no coordinator) is a
:class:`~sealroom.errors.ConfigError`; a log or receipt that does not verify is an
:class:`~sealroom.errors.AuditError` naming the check, or a status string
(``refused (CHECK)``) where a listing goes on past it. A description holds what a receipt holds
(identifiers, digests, counts, the SQL), read defensively: a tampered receipt still gets a row.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from sealroom.attestation import AppraisalPolicy
from sealroom.audit.events import notable_events, query_history
from sealroom.audit.jsondoc import at_path, listed
from sealroom.audit.notes import NoteVerifier, SignedCheckpoint
from sealroom.audit.receipts import receipt_sha256, verify_receipt
from sealroom.audit.ropa import CoordinatorState
from sealroom.audit.state import StateLog, load_state_log, read_catalog, read_declaration, state_dirs
from sealroom.audit.verify import LogReport, verify_log
from sealroom.errors import AuditError, ConfigError

__all__ = [
    "EVENT_KEYS",
    "RELEASE_KEYS",
    "ReceiptAppraisal",
    "VerifyOptions",
    "ReleaseFilter",
    "read_state_logs",
    "verify_export",
    "log_status",
    "audit_releases",
    "audit_events",
    "query_histories",
    "ropa_states",
]

# The columns of ``sealroom audit list``: a release's, and a notable event's.
RELEASE_KEYS = (
    "query_id",
    "released_at",
    "analyst",
    "datasets",
    "rows",
    "suppressed_cells",
    "simulated",
    "status",
    "log",
)
EVENT_KEYS = ("entry", "time", "type", "query_id", "party", "dataset", "analyst", "rule", "text", "log")


@dataclass(frozen=True)
class ReceiptAppraisal:
    """How receipts' attestation evidence is appraised: with the reviewer's ``[trust]`` policy
    (``trust``), and/or accepting SIMULATED evidence that chains to a pinned dev root
    (``simulated_root``). Neither: the evidence is bound but not appraised."""

    trust: AppraisalPolicy | None = None
    simulated_root: x509.Certificate | None = None

    @property
    def appraises(self) -> bool:
        return self.trust is not None or self.simulated_root is not None

    def policy_for(self, receipt: Any) -> AppraisalPolicy | None:
        """The appraisal policy for one receipt (``None``: not appraised)."""
        root = self.simulated_root
        if root is None:
            return self.trust
        if self.trust is not None:
            return dataclasses.replace(
                self.trust, allow_simulated=True, simulated_roots=(*self.trust.simulated_roots, root)
            )
        # No trust policy: the chain to the dev root and the key binding are checked; the measurement
        # is the one the receipt states (not pinned).
        stages = receipt.get("stages") if isinstance(receipt, dict) else None
        measurements = {
            s["measurement"] for s in stages or [] if isinstance(s, dict) and isinstance(s.get("measurement"), str)
        }
        return AppraisalPolicy(measurements=frozenset(measurements), allow_simulated=True, simulated_roots=(root,))


@dataclass(frozen=True)
class VerifyOptions:
    """What a log is verified with: the pinned log key and receipts' countersigning key (hex; None:
    the key the state directory published), the witnesses whose co-signatures count and their
    quorum (None: all), checkpoints seen elsewhere, and how receipts' evidence is appraised."""

    log_key: str | None = None
    coordinator_key: str | None = None
    witnesses: tuple[NoteVerifier, ...] = ()
    quorum: int | None = None
    trusted: tuple[SignedCheckpoint, ...] = ()
    appraisal: ReceiptAppraisal = ReceiptAppraisal()

    def key_for(self, log: StateLog) -> str:
        """The log key a state directory's log is checked with: the pinned one, else the published one."""
        return self.log_key or log.published_key


@dataclass(frozen=True)
class ReleaseFilter:
    """Which releases and events ``sealroom audit list`` shows: at or after ``since``, reading
    ``dataset`` (``PARTY.DATASET``), by ``analyst``; None keeps all."""

    since: datetime | None = None
    dataset: str | None = None
    analyst: str | None = None

    def keeps_release(self, r: Mapping[str, Any]) -> bool:
        if self.since is not None and not (
            isinstance(r["released_ts"], int | float) and r["released_ts"] >= self.since.timestamp()
        ):
            return False
        if self.dataset and self.dataset not in r["datasets"]:
            return False
        return not (self.analyst and r["analyst"] != self.analyst)

    def keeps_event(self, ev: Mapping[str, Any]) -> bool:
        if self.since is not None and not (
            type(ev["time_ms"]) is int and ev["time_ms"] >= self.since.timestamp() * 1000
        ):
            return False
        if self.analyst and ev["analyst"] != self.analyst:
            return False
        if not self.dataset:
            return True
        if ev["type"] == "query_refused":
            return bool((ev["party"], ev["dataset"]) == tuple(self.dataset.split(".")))
        return bool(ev["party"] == self.dataset.split(".")[0])


def read_state_logs(state_dir: str) -> list[StateLog]:
    """The log of every coordinator state directory under ``state_dir``."""
    return [load_state_log(directory) for directory in state_dirs(state_dir)]


def verify_export(export: Mapping[str, Any], log_key_hex: str | None, options: VerifyOptions) -> LogReport:
    """:func:`~sealroom.audit.verify.verify_log` over one export with the options, every receipt
    verified with its appraisal; raises ``AuditError`` naming the first failure."""
    log_key = NoteVerifier(export["origin"], bytes.fromhex(log_key_hex)) if log_key_hex else None
    # The coordinator countersigns receipts with its log key.
    coordinator_key = options.coordinator_key or log_key_hex

    def check_receipt(receipt: Any) -> None:
        verify_receipt(receipt, appraisal=options.appraisal.policy_for(receipt), coordinator_key=coordinator_key)

    return verify_log(
        export,
        log_key=log_key,
        witnesses=options.witnesses,
        quorum=options.quorum,
        trusted=options.trusted,
        verify_receipt=check_receipt,
    )


def _log_error(log: StateLog, options: VerifyOptions) -> AuditError | None:
    try:
        verify_export(log.export, options.key_for(log), options)
    except AuditError as err:
        return err
    return None


def log_status(log: StateLog, options: VerifyOptions) -> str:
    """``verified``, or ``refused (CHECK): why`` for a log that does not verify."""
    err = _log_error(log, options)
    return "verified" if err is None else f"refused ({err.details.get('check')}): {err.message}"


# --------------------------------------------------------------------------------------------------
# Releases and events in words


def audit_releases(logs: Sequence[StateLog], options: VerifyOptions) -> list[dict[str, Any]]:
    """Every release in the logs, described from its receipt, with its verification status:
    ``verified``, ``refused (CHECK)`` (its receipt), or ``log refused (CHECK)`` (the log)."""
    out: list[dict[str, Any]] = []
    for log in logs:
        log_error = _log_error(log, options)
        entries = [e for e in log.export["entries"] if isinstance(e, dict) and isinstance(e.get("event"), dict)]
        approved_at: dict[tuple[str, str], int] = {}
        for e in entries:
            if e.get("type") == "approved":
                approved_at[(str(e["event"].get("query_id")), str(e["event"].get("party")))] = e.get("time_ms", 0)
        for e in entries:
            if e.get("type") != "released":
                continue
            receipt = log.export["receipts"].get(str(e.get("seq")))
            status = _receipt_status(receipt, e, options.key_for(log), options.appraisal)
            if status == "verified" and log_error is not None:
                status = f"log refused ({log_error.details.get('check')})"
            described = _describe(receipt if isinstance(receipt, dict) else {}, e, status, log, approved_at)
            # Every entry about the query: submitted, approved, revoked or lapsed, executed, released.
            described["history"] = query_history(log.export, str(e["event"].get("query_id")))
            out.append(described)
    return out


def _receipt_status(receipt: Any, entry: Mapping[str, Any], key: str, appraisal: ReceiptAppraisal) -> str:
    """``verified``, or ``refused (CHECK)`` for a release's receipt that is missing, is not the one
    its entry records, or does not verify."""
    if not isinstance(receipt, dict):
        return "refused (receipt_missing)"
    if receipt_sha256(receipt) != entry["event"].get("receipt_sha256"):
        return "refused (receipt_hash)"
    try:
        verify_receipt(receipt, appraisal=appraisal.policy_for(receipt), coordinator_key=key)
    except AuditError as err:
        return f"refused ({err.details.get('check')})"
    return "verified"


def audit_events(logs: Sequence[StateLog]) -> list[dict[str, Any]]:
    """The refused queries and withdrawn approvals (``query_refused``, ``rejected``,
    ``approval_revoked``, ``approval_lapsed``) in the logs, in log order per log."""
    return [
        {**ev, "log": log.origin, "directory": str(log.directory)} for log in logs for ev in notable_events(log.export)
    ]


def query_histories(logs: Sequence[StateLog], query_id: str) -> list[dict[str, Any]]:
    """What the logs say about one query (e.g. one that was not released: refused, rejected,
    approvals withdrawn), each row with its log."""
    return [{**h, "log": log.origin} for log in logs for h in query_history(log.export, query_id)]


def _iso_time(ts: Any) -> str:
    """A UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (``?`` for anything that is not a time)."""
    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _describe(
    receipt: dict[str, Any],
    entry: dict[str, Any],
    status: str,
    log: StateLog,
    approved_at: Mapping[tuple[str, str], int],
) -> dict[str, Any]:
    """One release in words, from its receipt (defensively: a tampered receipt still gets a row)."""
    qid = at_path(receipt, "query", "id") or at_path(entry, "event", "query_id")
    datasets = sorted(
        {f"{d.get('party')}.{d.get('dataset')}" for d in listed(receipt.get("datasets")) if isinstance(d, dict)}
    )
    suppressed = [c for c in listed(at_path(receipt, "disclosure", "suppressed")) if isinstance(c, dict)]
    return {
        "query_id": qid,
        "released_at": _iso_time(at_path(receipt, "timestamps", "released_at")),
        "released_ts": at_path(receipt, "timestamps", "released_at"),
        "submitted_at": _iso_time(at_path(receipt, "timestamps", "submitted_at")),
        "analyst": at_path(receipt, "query", "analyst"),
        "sql": at_path(receipt, "query", "sql"),
        "plan_hash": at_path(receipt, "query", "plan_hash"),
        "datasets": datasets,
        "parties": sorted({d.split(".", 1)[0] for d in datasets}),
        "approvals": [
            _describe_approval(a, str(qid), approved_at)
            for a in listed(receipt.get("approvals"))
            if isinstance(a, dict)
        ],
        "stages": [_describe_stage(s) for s in listed(receipt.get("stages")) if isinstance(s, dict)],
        "suppressed": suppressed,
        "rules": at_path(receipt, "disclosure", "rules"),
        "rows": at_path(receipt, "result", "rows"),
        "columns": at_path(receipt, "result", "columns"),
        "result_sha256": at_path(receipt, "result", "sha256"),
        "suppressed_cells": len(suppressed),
        "simulated": receipt.get("simulated") if receipt else at_path(entry, "event", "simulated"),
        "status": status,
        "entry": entry.get("seq"),
        "log": log.origin,
        "directory": str(log.directory),
    }


def _describe_approval(
    approval: dict[str, Any], query_id: str, approved_at: Mapping[tuple[str, str], int]
) -> dict[str, Any]:
    """Who approved, with which key, for which plan hash, and when the log recorded it."""
    key = (query_id, str(approval.get("party")))
    return {
        "party": approval.get("party"),
        "public_key": approval.get("public_key"),
        "plan_hash": approval.get("plan_hash"),
        "logged_at": _iso_time(approved_at[key] / 1000) if key in approved_at else None,
    }


def _describe_stage(stage: dict[str, Any]) -> dict[str, Any]:
    """An enclave stage (platform, measurement, evidence) or an MPC stage (players, threshold)."""
    if stage.get("kind") == "tee":
        att = at_path(stage, "result", "attestation") or {}
        return {
            "id": stage.get("id"),
            "kind": "tee",
            "platform": stage.get("format"),
            "measurement": stage.get("measurement"),
            "simulated": stage.get("simulated"),
            "evidence_sha256": att.get("evidence_sha256") if isinstance(att, dict) else None,
            "executed_at": _iso_time(at_path(stage, "result", "executed_at")),
        }
    return {
        "id": stage.get("id"),
        "kind": "mpc",
        "players": [p.get("name") for p in listed(stage.get("players")) if isinstance(p, dict)],
        "threshold": at_path(stage, "result", "threshold"),
        "trust_assumption": stage.get("trust_assumption"),
        "simulated": stage.get("simulated"),
    }


# --------------------------------------------------------------------------------------------------
# The record of processing's input


def ropa_states(
    logs: Sequence[StateLog], options: VerifyOptions, releases: Sequence[Mapping[str, Any]]
) -> list[CoordinatorState]:
    """What :func:`sealroom.audit.ropa.build_ropa` reads about each coordinator: its log and that
    log's status, its published declaration and catalog, and its releases' statuses
    (``releases``: :func:`audit_releases` over the same logs)."""
    states = []
    for log in logs:
        status = log_status(log, options)
        try:
            declaration = read_declaration(log.directory)
            datasets, parties = read_catalog(log.directory)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except sqlite3.Error as exc:
            raise ConfigError(f"{log.directory / 'coordinator.db'}: cannot read the catalog: {exc}") from None
        states.append(
            CoordinatorState(
                directory=str(log.directory),
                export=log.export,
                log_status=status,
                declaration=declaration,
                datasets=datasets,
                parties=parties,
                receipt_status={r["entry"]: r["status"] for r in releases if r["directory"] == str(log.directory)},
            )
        )
    return states
