"""The record of processing activities (GDPR Article 30) of a collaboration, from a coordinator's state.

Who declares what:

- each data owner declares, per dataset, in its signed policy (``[processing]``,
  :class:`sealroom.policy.ProcessingRecord`): the purposes the dataset may be used for, the lawful
  basis, the categories of data subjects and of personal data, special categories and their Article
  9(2) condition, the retention of the source data, the controller and a contact;
- the coordinator's operator declares the collaboration (``[collaboration]`` in the coordinator's
  config, :class:`Collaboration`): its name, its purpose (one purpose identifier, which each
  dataset's ``processing.purposes`` must list), a description, a contact point, who operates the
  platform, the categories of recipients, the retention of released results and of the log, and any
  transfer to a third country. The coordinator publishes it at every start as
  ``<state_dir>/collaboration.json`` (with the names of the analysts it authenticates) and logs the
  SHA-256 of that document (``collaboration_declared``) whenever it changes.

:func:`build_ropa` then derives the record from what the coordinator holds: the catalog (the
owners' current policies, each checked against its ``dataset_registered`` entry), the transparency
log (releases, refusals, revocations) and the release receipts (who received which release, which
enclave or MPC ran it). The technical and organisational measures are taken from the real policies
and receipts, not from a template. What the record needs and does not find is listed under
``gaps``.

What it reveals: identifiers, counts, dates, digests and what owners and operator declared for
publication. Never a row value, a released value, a key, or the SQL text (which may hold literals):
a reviewer reads those in the receipts (``sealroom audit show``).

The JSON form is canonical (sorted keys, no insignificant whitespace) and versioned
(``format: sealroom.ropa``, ``version``); :mod:`sealroom.audit.report` renders it as Markdown and HTML.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sealroom.audit.jsondoc import at_path, listed
from sealroom.canonical import canonical_json
from sealroom.config import Table
from sealroom.policy import MAX_PROCESSING_TEXT, DatasetPolicy, is_purpose

__all__ = [
    "ROPA_FORMAT",
    "ROPA_VERSION",
    "COLLABORATION_FILE",
    "Collaboration",
    "collaboration_document",
    "declaration_sha256",
    "CoordinatorState",
    "build_ropa",
    "ropa_json",
]

ROPA_FORMAT = "sealroom.ropa"  # the document's format name: fixed, whatever the module's path
ROPA_VERSION = 1
COLLABORATION_FORMAT = "sealroom.collaboration"
COLLABORATION_VERSION = 1
COLLABORATION_FILE = "collaboration.json"  # published next to coordinator.db and log.json


# --------------------------------------------------------------------------------------------------
# The operator's declaration


def _texts(t: Table, key: str, what: str) -> tuple[str, ...]:
    value = t.doc.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() and len(v) <= MAX_PROCESSING_TEXT for v in value
    ):
        raise t.key_error(key, f"a list of {what} (non-empty strings of at most {MAX_PROCESSING_TEXT} characters)")
    return tuple(value)


def _opt_text(t: Table, key: str) -> str | None:
    value = t.doc.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > MAX_PROCESSING_TEXT):
        raise t.key_error(key, f"a non-empty string of at most {MAX_PROCESSING_TEXT} characters")
    return value


@dataclass(frozen=True)
class Collaboration:
    """The operator's ``[collaboration]``: what the record of processing says about the whole
    collaboration (docs/configuration.md). ``purpose`` is a purpose identifier that every involved
    dataset's ``[processing] purposes`` should list."""

    name: str
    purpose: str
    description: str | None = None
    contact: str | None = None
    operator: str | None = None
    recipients: tuple[str, ...] = ()
    result_retention: str | None = None
    log_retention: str | None = None
    transfers: tuple[str, ...] = ()

    KEYS = (
        "name", "purpose", "description", "contact", "operator", "recipients", "result_retention",
        "log_retention", "transfers",
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The declaration as JSON (and as the TOML table's keys): optional keys only when set."""
        out: dict[str, Any] = {"name": self.name, "purpose": self.purpose}
        for key in ("description", "contact", "operator", "result_retention", "log_retention"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.recipients:
            out["recipients"] = list(self.recipients)
        if self.transfers:
            out["transfers"] = list(self.transfers)
        return out

    @classmethod
    def from_table(cls, t: Table) -> Collaboration:
        """Validate a ``[collaboration]`` table; a ConfigError names the file and the key."""
        t.check_keys(set(cls.KEYS))
        name = _opt_text(t, "name")
        if name is None:
            raise t.key_error("name", "the collaboration's name (a non-empty string)")
        purpose = t.doc.get("purpose")
        if not isinstance(purpose, str) or not is_purpose(purpose):
            raise t.key_error(
                "purpose",
                'a purpose identifier (letters, digits and _ . : -, e.g. "credit_risk_statistics") that the '
                "datasets' [processing] purposes list",
            )
        return cls(
            name=name,
            purpose=purpose,
            description=_opt_text(t, "description"),
            contact=_opt_text(t, "contact"),
            operator=_opt_text(t, "operator"),
            recipients=_texts(t, "recipients", "categories of recipients"),
            result_retention=_opt_text(t, "result_retention"),
            log_retention=_opt_text(t, "log_retention"),
            transfers=_texts(t, "transfers", "transfers to third countries or international organisations"),
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "<collaboration>") -> Collaboration:
        return cls.from_table(Table(doc, source=source, prefix="collaboration."))


def collaboration_document(collaboration: Collaboration | None, *, analysts: Sequence[str] | None) -> dict[str, Any]:
    """What the coordinator publishes as ``collaboration.json``: the declaration (or null) and the
    names of the analysts it authenticates (null: analysts are not authenticated)."""
    return {
        "format": COLLABORATION_FORMAT,
        "version": COLLABORATION_VERSION,
        "collaboration": collaboration.to_dict() if collaboration is not None else None,
        "analysts": sorted(analysts) if analysts is not None else None,
    }


def declaration_sha256(document: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the published document's canonical JSON: what ``collaboration_declared`` logs."""
    return hashlib.sha256(canonical_json(dict(document))).hexdigest()


# --------------------------------------------------------------------------------------------------
# What the record is built from


@dataclass(frozen=True)
class CoordinatorState:
    """What :func:`build_ropa` reads about one coordinator: its state directory, the log's export
    (``sealroom.audit.log.export_store``), the log's verification status (``verified`` or the refusal),
    the published declaration (:func:`sealroom.audit.state.read_declaration`), the catalog
    (:func:`sealroom.audit.state.read_catalog`), and the verification status of each release's
    receipt (by the seq of its ``released`` entry)."""

    directory: str
    export: Mapping[str, Any]
    log_status: str = "verified"
    declaration: Mapping[str, Any] | None = None
    datasets: Sequence[Mapping[str, Any]] = ()
    parties: Mapping[str, str] = field(default_factory=dict)
    receipt_status: Mapping[int, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Building the record


def _iso_ms(ms: Any) -> str | None:
    if type(ms) is not int:
        return None
    return _iso(ms / 1000)


def _iso(ts: Any) -> str | None:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def _entries(export: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in listed(export.get("entries")) if isinstance(e, Mapping) and isinstance(e.get("event"), Mapping)]


def _gap(check: str, message: str, **where: Any) -> dict[str, Any]:
    return {"check": check, "message": message, **{k: v for k, v in where.items() if v is not None}}


def _safeguards(policy: DatasetPolicy) -> dict[str, Any]:
    roles: dict[str, int] = {}
    for rule in policy.columns.values():
        roles[rule.role] = roles.get(rule.role, 0) + 1
    bounded = sorted(
        name
        for name, rule in policy.columns.items()
        if rule.role == "measure" and (rule.min is not None or rule.max is not None)
    )
    trust = policy.trust
    return {
        "privacy_unit": policy.privacy_unit,
        "min_group_size": policy.min_group_size,
        "dominance": policy.dominance.to_dict() if policy.dominance else None,
        "approval": policy.approval,
        "analysts": list(policy.analysts),
        "column_roles": dict(sorted(roles.items())),
        "default_role": policy.default_role,
        "bounded_measures": bounded,
        "enclave": {
            "mpc_only": trust.mpc_only,
            "allow_simulated": trust.allow_simulated,
            "measurements": list(trust.measurements) if trust.measurements is not None else None,
        },
    }


def _activity(entry: Mapping[str, Any], receipt: Any, status: str, purpose: str | None) -> dict[str, Any]:
    """One release as a processing activity: who, what datasets, when, how many cells; no value."""
    receipt = receipt if isinstance(receipt, Mapping) else {}
    event = entry["event"]
    datasets = sorted(
        {
            f"{d.get('party')}.{d.get('dataset')}"
            for d in listed(receipt.get("datasets"))
            if isinstance(d, Mapping) and isinstance(d.get("party"), str) and isinstance(d.get("dataset"), str)
        }
    )
    execution = []
    for s in listed(receipt.get("stages")):
        if not isinstance(s, Mapping):
            continue
        if s.get("kind") == "tee":
            execution.append(
                {
                    "stage": s.get("id"),
                    "kind": "tee",
                    "platform": s.get("format"),
                    "measurement": s.get("measurement"),
                    "simulated": bool(s.get("simulated")),
                }
            )
        elif s.get("kind") == "mpc":
            execution.append(
                {
                    "stage": s.get("id"),
                    "kind": "mpc",
                    "players": len(listed(s.get("players"))),
                    "threshold": at_path(s, "result", "threshold"),
                    "trust_assumption": s.get("trust_assumption"),
                    "simulated": False,
                }
            )
    rows = at_path(receipt, "result", "rows")
    return {
        "query_id": event.get("query_id"),
        "analyst": at_path(receipt, "query", "analyst"),
        "purpose": purpose,
        "datasets": datasets,
        "parties": sorted({d.split(".", 1)[0] for d in datasets}),
        "approvals": len(listed(receipt.get("approvals"))),
        "submitted_at": _iso(at_path(receipt, "timestamps", "submitted_at")),
        "released_at": _iso(at_path(receipt, "timestamps", "released_at")) or _iso_ms(entry.get("time_ms")),
        "cells_released": rows if type(rows) is int else None,
        "cells_suppressed": event.get("suppressed_cells"),
        "execution": execution,
        "simulated": bool(event.get("simulated")),
        "status": status,
        "log_entry": entry.get("seq"),
    }


Gaps = list[dict[str, Any]]


def _record(state: CoordinatorState) -> dict[str, Any]:
    """One coordinator's record, section by section; its gaps in the order of the sections."""
    export = state.export
    entries = _entries(export)
    receipts: Mapping[str, Any] = export["receipts"] if isinstance(export.get("receipts"), Mapping) else {}
    doc = state.declaration
    collaboration = at_path(doc, "collaboration") if doc is not None else None
    analysts = at_path(doc, "analysts") if doc is not None else None
    purpose = collaboration.get("purpose") if isinstance(collaboration, Mapping) else None

    declaration, gaps = _declaration(doc, collaboration, entries)
    gaps += _collaboration_gaps(collaboration, analysts)
    counts = _counts(entries)
    activities = _activities(entries, receipts, state.receipt_status, purpose)
    datasets, dataset_gaps = _datasets(state.datasets, _registrations(entries), activities, purpose)
    controllers, controller_gaps = _controllers(datasets, state.parties)
    tee = [x for a in activities for x in a["execution"] if x["kind"] == "tee"]
    mpc = [x for a in activities for x in a["execution"] if x["kind"] == "mpc"]
    technical = _technical(datasets, tee, mpc, export, state.log_status, len(activities))
    organisational = _organisational(datasets, analysts, counts)
    return {
        "log": {
            "origin": export.get("origin"),
            "directory": state.directory,
            "entries": len(listed(export.get("entries"))),
            "status": state.log_status,
        },
        "as_of": _iso_ms(entries[-1].get("time_ms")) if entries else None,
        "collaboration": collaboration,
        "declaration": declaration,
        "controllers": controllers,
        "datasets": datasets,
        "recipients": _recipients(activities, collaboration, analysts),
        "activities": activities,
        "summary": _summary(activities, counts),
        "transfers": _transfers(collaboration, tee, mpc),
        "measures": {"technical": technical, "organisational": organisational},
        "gaps": gaps + dataset_gaps + controller_gaps + _release_gaps(activities, state.log_status),
    }


# -- the collaboration, as declared and as logged ------------------------------------------------


def _declaration(
    doc: Mapping[str, Any] | None, collaboration: Any, entries: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any] | None, Gaps]:
    """The published declaration's digest and whether the last ``collaboration_declared`` entry
    records it (``None`` when the coordinator published none)."""
    if doc is None:
        return None, []
    declared = [e for e in entries if e.get("type") == "collaboration_declared"]
    digest = declaration_sha256(doc)
    last = declared[-1] if declared else None
    declaration = {
        "sha256": digest,
        "logged_entry": last.get("seq") if last is not None else None,
        "logged_at": _iso_ms(last.get("time_ms")) if last is not None else None,
        "matches_log": last is not None and last["event"].get("declaration_sha256") == digest,
    }
    if collaboration is None or declaration["matches_log"]:
        return declaration, []
    return declaration, [
        _gap(
            "declaration_not_logged",
            "the published collaboration.json is not the declaration that the log records last; restart "
            "the coordinator to log it, or find out who changed the file",
        )
    ]


def _collaboration_gaps(collaboration: Any, analysts: Any) -> Gaps:
    """What the operator's declaration leaves out: the collaboration itself, its contact, retention
    and recipients, and the analysts' authentication."""
    gaps = []
    if collaboration is None:
        gaps.append(
            _gap(
                "no_collaboration",
                "the coordinator declares no [collaboration]: name, purpose, contact, recipients and retention "
                "are missing from the record",
            )
        )
    else:
        for key, what in (
            ("contact", "a contact point for data subjects (Article 26)"),
            ("result_retention", "the retention of released results"),
            ("log_retention", "the retention of the audit log"),
        ):
            if key not in collaboration:
                gaps.append(_gap(f"no_{key}", f"[collaboration] {key} is not declared: {what}"))
        if not collaboration.get("recipients"):
            gaps.append(
                _gap("no_recipients", "[collaboration] recipients is not declared: the categories of recipients")
            )
    if analysts is None:
        gaps.append(
            _gap(
                "analysts_not_authenticated",
                "the coordinator does not authenticate analysts ([analysts]): recipients are self-declared names",
            )
        )
    return gaps


# -- the log: registrations, releases and the events around them ----------------------------------


def _counts(entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many entries of each type the log holds."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[str(e.get("type"))] = counts.get(str(e.get("type")), 0) + 1
    return counts


def _registrations(entries: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    """The ``dataset_registered`` entries by (party, dataset, policy digest); the last one wins."""
    registered: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for e in entries:
        if e.get("type") == "dataset_registered":
            ev = e["event"]
            registered[(str(ev.get("party")), str(ev.get("dataset")), str(ev.get("policy_digest")))] = e
    return registered


def _activities(
    entries: Sequence[Mapping[str, Any]],
    receipts: Mapping[str, Any],
    receipt_status: Mapping[int, str],
    purpose: str | None,
) -> list[dict[str, Any]]:
    """Every release (``released`` entry) as a processing activity, in log order."""
    activities = []
    for e in entries:
        if e.get("type") != "released":
            continue
        seq = e.get("seq")
        receipt = receipts.get(str(seq))
        status = receipt_status.get(seq, "not verified") if type(seq) is int else "not verified"
        activities.append(_activity(e, receipt, status, purpose))
    return activities


# -- parties and their datasets -------------------------------------------------------------------


def _datasets(
    catalog: Sequence[Mapping[str, Any]],
    registered: Mapping[tuple[str, str, str], Mapping[str, Any]],
    activities: Sequence[Mapping[str, Any]],
    purpose: str | None,
) -> tuple[list[dict[str, Any]], Gaps]:
    """Every catalog dataset whose policy can be read, by party and name, with what its owner
    declares and the gaps in it."""
    releases_of: dict[str, int] = {}
    for a in activities:
        for d in a["datasets"]:
            releases_of[d] = releases_of.get(d, 0) + 1
    datasets, gaps = [], []
    for row in sorted(catalog, key=lambda r: (str(r.get("party")), str(r.get("name")))):
        party, name = str(row.get("party")), str(row.get("name"))
        try:
            policy = DatasetPolicy.from_json(bytes(row["policy_json"]))
        except Exception:  # noqa: BLE001 - a catalog row the record cannot read is a gap, not a crash
            gaps.append(_gap("policy_unreadable", f"the policy of {party}.{name} in the catalog cannot be read",
                             party=party, dataset=name))  # fmt: skip
            continue
        digest = policy.digest()
        logged = registered.get((party, name, digest))
        processing = policy.processing.to_dict() if policy.processing is not None else None
        dataset = {
            "party": party,
            "dataset": name,
            "description": row.get("description") or None,
            "policy_digest": digest,
            "registered_entry": logged.get("seq") if logged is not None else None,
            "registered_at": _iso_ms(logged.get("time_ms")) if logged is not None else None,
            "processing": processing,
            "safeguards": _safeguards(policy),
            "releases": releases_of.get(f"{party}.{name}", 0),
        }
        if digest != row.get("policy_digest") or logged is None:
            gaps.append(
                _gap(
                    "policy_not_logged",
                    f"the policy of {party}.{name} in the catalog is not one that a dataset_registered entry records",
                    party=party,
                    dataset=name,
                )
            )
        gaps += _processing_gaps(party, name, processing, purpose)
        datasets.append(dataset)
    return datasets, gaps


def _processing_gaps(party: str, name: str, processing: Mapping[str, Any] | None, purpose: str | None) -> Gaps:
    """What a dataset's ``[processing]`` leaves out, or its purposes do not cover."""
    qualified = f"{party}.{name}"
    if processing is None:
        return [
            _gap(
                "no_processing_record",
                f"{party} declares no [processing] for {qualified}: purposes, lawful basis and categories "
                "of data are missing",
                party=party,
                dataset=name,
            )
        ]
    gaps = []
    if purpose is not None and purpose not in processing["purposes"]:
        gaps.append(
            _gap(
                "purpose_not_declared",
                f"the collaboration's purpose {purpose} is not among the purposes {party} declares for "
                f"{qualified} ({', '.join(processing['purposes'])})",
                party=party,
                dataset=name,
            )
        )
    if "retention" not in processing:
        gaps.append(_gap("no_retention", f"{party} declares no retention for {qualified}", party=party, dataset=name))
    return gaps


def _controllers(
    datasets: Sequence[Mapping[str, Any]], parties: Mapping[str, str]
) -> tuple[list[dict[str, Any]], Gaps]:
    """Per party with a readable dataset: the controller and contact its datasets' ``[processing]``
    name first, and the SHA-256 of its owner key; by party."""
    controllers: dict[str, dict[str, Any]] = {}
    for d in datasets:
        ctl = controllers.setdefault(d["party"], {"party": d["party"], "controller": None, "contact": None})
        for key in ("controller", "contact"):
            if d["processing"] is not None and d["processing"].get(key) and ctl[key] is None:
                ctl[key] = d["processing"][key]
    gaps = []
    for party, ctl in controllers.items():
        owner_key = parties.get(party)
        ctl["owner_key_sha256"] = (
            hashlib.sha256(bytes.fromhex(owner_key)).hexdigest() if isinstance(owner_key, str) else None
        )
        if ctl["controller"] is None:
            gaps.append(_gap("no_controller", f"{party} names no controller in its datasets' [processing]",
                             party=party))  # fmt: skip
    return [controllers[p] for p in sorted(controllers)], gaps


# -- recipients, transfers, what needs attention, the summary -------------------------------------


def _recipients(activities: Sequence[Mapping[str, Any]], collaboration: Any, analysts: Any) -> dict[str, Any]:
    """The declared categories of recipients, the authorised analysts, and who received releases."""
    received: dict[str, dict[str, Any]] = {}
    for a in activities:
        who = a["analyst"] if isinstance(a["analyst"], str) else "?"
        r = received.setdefault(who, {"analyst": who, "releases": 0, "first": a["released_at"], "last": None})
        r["releases"] += 1
        r["last"] = a["released_at"]
    return {
        "declared": list(at_path(collaboration, "recipients") or []),
        "authorised_analysts": analysts,
        "received_releases": [received[k] for k in sorted(received)],
    }


def _transfers(
    collaboration: Any, tee: Sequence[Mapping[str, Any]], mpc: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The declared transfers to third countries, and where data flows (the same for every record)."""
    return {
        "third_countries": list(at_path(collaboration, "transfers") or []),
        "data_flows": [
            "No row leaves a data owner in the clear: rows are sealed (HPKE, AES-256-GCM) to an enclave whose "
            "attestation the owner verified itself, for a plan the owner signed; on MPC stages only secret "
            "shares of partial aggregates leave the owner.",
            "The coordinator and its operator see plans, approvals, ciphertexts and released aggregates, "
            "never rows or keys.",
            "Only aggregates that pass every involved owner's disclosure rules leave the enclave or the MPC, "
            "to the analyst who submitted the query.",
        ],
        "stages": {"tee": len(tee), "mpc": len(mpc)},
    }


def _release_gaps(activities: Sequence[Mapping[str, Any]], log_status: str) -> Gaps:
    """Releases under simulated attestation, a log that does not verify, receipts that do not."""
    gaps = []
    simulated = [a for a in activities if a["simulated"]]
    if simulated:
        gaps.append(
            _gap(
                "simulated_attestation",
                f"{len(simulated)} release(s) ran under SIMULATED attestation: no TEE protected them "
                "(development only)",
            )
        )
    if log_status != "verified":
        gaps.append(_gap("log_not_verified", f"the log does not verify: {log_status}"))
    unverified = [a["query_id"] for a in activities if a["status"] != "verified"]
    if unverified:
        gaps.append(
            _gap(
                "receipt_not_verified",
                f"{len(unverified)} release(s) whose receipt does not verify: {', '.join(map(str, unverified))}",
            )
        )
    return gaps


def _summary(activities: Sequence[Mapping[str, Any]], counts: Mapping[str, int]) -> dict[str, Any]:
    """Counts of releases, cells and log events, and the first and last release."""
    released_at = [a["released_at"] for a in activities if a["released_at"]]
    return {
        "releases": len(activities),
        "cells_released": sum(a["cells_released"] or 0 for a in activities),
        "cells_suppressed": sum(a["cells_suppressed"] or 0 for a in activities),
        "queries_submitted": counts.get("query_submitted", 0),
        "queries_refused": counts.get("query_refused", 0),
        "rejected_by_owners": counts.get("rejected", 0),
        "approvals": counts.get("approved", 0),
        "approvals_revoked": counts.get("approval_revoked", 0),
        "approvals_lapsed": counts.get("approval_lapsed", 0),
        "first_release": min(released_at) if released_at else None,
        "last_release": max(released_at) if released_at else None,
    }


def _m(mid: str, text: str) -> dict[str, str]:
    return {"id": mid, "text": text}


def _technical(
    datasets: list[dict[str, Any]],
    tee: list[dict[str, Any]],
    mpc: list[dict[str, Any]],
    export: Mapping[str, Any],
    log_status: str,
    releases: int,
) -> list[dict[str, str]]:
    out = [
        _m(
            "sealed_transport",
            "TLS between components, and end-to-end encryption of every party's rows to the enclave's job key "
            "(HPKE, RFC 9180; AES-256-GCM batches whose associated data binds job, party, dataset and sequence).",
        )
    ]
    if tee:
        platforms = sorted({"no TEE (simulated)" if x["simulated"] else str(x["platform"]) for x in tee})
        measurements = sorted({str(x["measurement"]) for x in tee})
        sim = sum(1 for x in tee if x["simulated"])
        out.append(
            _m(
                "attested_enclave",
                f"{len(tee)} enclave stage(s) on {', '.join(platforms)}, measurement(s) {', '.join(measurements)}; "
                "each owner verified the attestation evidence against its own trust policy before sealing its "
                "rows to the enclave" + (f"; {sim} stage(s) under SIMULATED attestation (no TEE)" if sim else "") + ".",
            )
        )
    if mpc:
        players = sorted({int(x["players"]) for x in mpc})
        out.append(
            _m(
                "mpc",
                f"{len(mpc)} MPC stage(s) with {', '.join(map(str, players))} players: Shamir secret sharing "
                "(MPyC), secure against a semi-honest minority (t < m/2); only cells that pass the minimum "
                "group size are opened.",
            )
        )
    for d in datasets:
        s = d["safeguards"]
        parts = [
            f"cells need at least {s['min_group_size']} distinct "
            + (f"{s['privacy_unit']} values" if s["privacy_unit"] else "rows (no privacy unit declared)")
        ]
        if s["dominance"]:
            parts.append(f"dominance rule (n = {s['dominance']['n']}, k = {s['dominance']['k']:g} %)")
        if s["bounded_measures"]:
            parts.append(f"measures clamped to declared bounds: {', '.join(s['bounded_measures'])}")
        roles = ", ".join(f"{n} {r}" for r, n in s["column_roles"].items())
        parts.append(f"column roles: {roles or 'none listed'} (other columns: {s['default_role']})")
        enclave = s["enclave"]
        if enclave["mpc_only"]:
            parts.append("never sent to an enclave (MPC only)")
        elif enclave["measurements"] is not None:
            parts.append(f"only to enclave measurement(s) {', '.join(enclave['measurements']) or '(none)'}")
        if enclave["allow_simulated"] is False:
            parts.append("simulated attestation refused")
        out.append(_m(f"disclosure:{d['party']}.{d['dataset']}", f"{d['party']}.{d['dataset']}: " + "; ".join(parts)))
    if datasets:
        strictest = max(d["safeguards"]["min_group_size"] for d in datasets)
        out.append(
            _m(
                "strictest_rule",
                f"When several owners are involved the strictest rule wins: minimum group size up to {strictest}; "
                "suppressed cells are released without their values.",
            )
        )
    out.append(
        _m(
            "transparency_log",
            f"Tamper-evident log {export.get('origin')} (RFC 6962 Merkle tree, signed checkpoints): "
            f"{len(listed(export.get('entries')))} entries, status {log_status}; {releases} release receipt(s) "
            "bind the plan, the owners' approvals, the attestation and the disclosure decisions.",
        )
    )
    return out


def _organisational(datasets: list[dict[str, Any]], analysts: Any, counts: Mapping[str, int]) -> list[dict[str, str]]:
    manual = [f"{d['party']}.{d['dataset']}" for d in datasets if d["safeguards"]["approval"] == "manual"]
    auto = [f"{d['party']}.{d['dataset']}" for d in datasets if d["safeguards"]["approval"] == "auto"]
    out = [
        _m(
            "owner_approval",
            "Every plan is signed (Ed25519) by each involved owner before any data moves"
            + (f"; a person approves each query for {', '.join(manual)}" if manual else "")
            + (f"; the owner's agent approves by policy for {', '.join(auto)}" if auto else "")
            + f". Logged: {counts.get('approved', 0)} approval(s), {counts.get('approval_revoked', 0)} revoked, "
            f"{counts.get('approval_lapsed', 0)} lapsed, {counts.get('rejected', 0)} rejection(s).",
        ),
        _m(
            "analyst_access",
            (
                f"Analysts authenticate with tokens; authorised: {', '.join(analysts) or 'none'}"
                if isinstance(analysts, list)
                else "Analysts are NOT authenticated (names are self-declared)"
            )
            + "; each dataset's policy lists the analysts it allows.",
        ),
        _m(
            "query_review",
            "The planner refuses a query that a policy does not allow before anything is sent "
            f"({counts.get('query_refused', 0)} refused and logged); the enclave re-checks every plan itself.",
        ),
    ]
    return out


def build_ropa(states: Sequence[CoordinatorState]) -> dict[str, Any]:
    """The record of processing of every coordinator (one collaboration each) in ``states``."""
    records = [_record(s) for s in states]
    times = [r["as_of"] for r in records if r["as_of"]]
    return {
        "format": ROPA_FORMAT,
        "version": ROPA_VERSION,
        "as_of": max(times) if times else None,
        "records": records,
    }


def ropa_json(doc: Mapping[str, Any]) -> str:
    """The canonical JSON text of the record (sorted keys, no insignificant whitespace), with a newline."""
    return canonical_json(dict(doc)).decode("utf-8") + "\n"
