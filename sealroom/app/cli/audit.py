from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sealroom.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Subparsers,
    UsageError,
    add_command,
    ed25519_hex,
    emit,
    iso_time,
    print_refusal,
    read_file,
    with_json,
)


def add_parsers(sub: Subparsers) -> None:
    rc = add_command(sub, "receipt").add_subparsers(dest="action", required=True)
    rv = with_json(rc.add_parser("verify", help="verify a release receipt offline"))
    rv.add_argument("file", help="the receipt (JSON)")
    rv.add_argument("--result", help="check that this result file (Arrow IPC stream) is the one released")
    rv.add_argument("--coordinator-key", metavar="HEX_OR_FILE", help="the coordinator's Ed25519 public key to pin")
    rv.add_argument("--trust", metavar="TOML", help="appraise the attestation evidence with this [trust] table")
    rv.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED evidence (no TEE)")
    rv.add_argument("--dev-root", metavar="CRT", help="the dev root certificate (with --allow-simulated)")
    rv.set_defaults(handler=cmd_receipt_verify)

    au = add_command(sub, "audit").add_subparsers(dest="action", required=True)
    avf = with_json(au.add_parser("verify", help="verify a transparency log: entries, checkpoints, receipts"))
    src = avf.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", help="an exported log (JSON)")
    src.add_argument("--state-dir", help="a coordinator's state directory (or one above it, e.g. a demo's)")
    avf.add_argument(
        "--witness-key", action="append", default=[], metavar="NAME=HEX", help="a witness whose co-signature counts"
    )
    avf.add_argument("--quorum", type=int, help="witness co-signatures required (default: every --witness-key)")
    avf.add_argument(
        "--checkpoint", action="append", default=[], metavar="FILE", help="a checkpoint seen elsewhere (e.g. a witness)"
    )
    avf.add_argument(
        "--coordinator-key", metavar="HEX_OR_FILE", help="receipts' countersigning key (default: the log key)"
    )

    def reviewer(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--log-key", metavar="HEX_OR_VKEY", help="the log's Ed25519 public key to pin")
        sp.add_argument(
            "--trust", metavar="TOML", help="appraise receipts' attestation evidence with this [trust] table"
        )
        sp.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED evidence (no TEE)")
        sp.add_argument("--dev-root", metavar="CRT", help="the dev root certificate (with --allow-simulated)")
        return sp

    reviewer(avf).set_defaults(handler=cmd_audit_verify)
    state_help = "a coordinator's state directory (or one above it, e.g. a demo's)"
    al = reviewer(with_json(au.add_parser("list", help="list releases with their verification status")))
    al.add_argument("--state-dir", required=True, help=state_help)
    al.add_argument("--since", metavar="ISO", help="only releases at or after this time (UTC unless it says)")
    al.add_argument("--dataset", metavar="PARTY.DATASET", help="only releases that read this dataset")
    al.add_argument("--analyst", metavar="NAME", help="only this analyst's releases")
    al.set_defaults(handler=cmd_audit_list)
    ash = reviewer(with_json(au.add_parser("show", help="one release in words")))
    ash.add_argument("release_id", help="the release's query id")
    ash.add_argument("--state-dir", required=True, help=state_help)
    ash.set_defaults(handler=cmd_audit_show)
    aex = reviewer(with_json(au.add_parser("export", help="export the log (json) or a self-contained report (html)")))
    aex.add_argument("--format", choices=["json", "html"], required=True)
    aex.add_argument("--state-dir", required=True, help=state_help)
    aex.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    aex.set_defaults(handler=cmd_audit_export)
    aro = reviewer(
        with_json(au.add_parser("ropa", help="the record of processing (GDPR Article 30) of each collaboration"))
    )
    aro.add_argument("--state-dir", required=True, help=state_help)
    aro.add_argument(
        "--format",
        choices=["md", "json", "html"],
        default="md",
        help="md (default), json (canonical, versioned: sealroom.ropa) or html (one self-contained page)",
    )
    aro.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    aro.set_defaults(handler=cmd_audit_ropa)


def _receipt_appraisal(args: argparse.Namespace) -> Any:
    """A function receipt -> AppraisalPolicy | None from --trust, --allow-simulated and --dev-root."""
    import dataclasses
    import tomllib

    from sealroom.attestation import AppraisalPolicy, load_root_certificate
    from sealroom.errors import AttestationError, ConfigError
    from sealroom.policy import TrustPolicy

    base = None
    if args.trust:
        try:
            doc = tomllib.loads(read_file(args.trust, "trust file").decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{args.trust} is not TOML: {exc}") from None
        section = doc.get("trust", doc)
        if not isinstance(section, dict):
            raise UsageError(f"{args.trust}: [trust] must be a table")
        try:
            base = TrustPolicy.from_dict(section, source=args.trust, base=Path(args.trust).resolve().parent).appraisal()
        except (ConfigError, AttestationError) as err:
            raise UsageError(err.message) from None
    if args.dev_root and not args.allow_simulated:
        raise UsageError("--dev-root goes with --allow-simulated")
    root = None
    if args.allow_simulated:
        if not args.dev_root:
            raise UsageError("--allow-simulated needs --dev-root CRT (the dev root the enclave's evidence chains to)")
        try:
            root = load_root_certificate(Path(args.dev_root))
        except (AttestationError, ConfigError, OSError, ValueError) as err:
            raise UsageError(f"unusable --dev-root {args.dev_root}: {err}") from None

    def appraisal(receipt: Any) -> Any:
        if root is None:
            return base
        if base is not None:
            return dataclasses.replace(base, allow_simulated=True, simulated_roots=(*base.simulated_roots, root))
        # No --trust: the chain to the dev root and the key binding are checked; the measurement is
        # the one the receipt states (not pinned).
        stages = receipt.get("stages") if isinstance(receipt, dict) else None
        measurements = {
            s["measurement"] for s in stages or [] if isinstance(s, dict) and isinstance(s.get("measurement"), str)
        }
        return AppraisalPolicy(measurements=frozenset(measurements), allow_simulated=True, simulated_roots=(root,))

    return appraisal


def cmd_receipt_verify(args: argparse.Namespace) -> int:
    from sealroom.audit.receipts import load_receipt, verify_receipt
    from sealroom.errors import AuditError

    try:
        receipt = load_receipt(read_file(args.file, "receipt"))
    except ValueError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    result = read_file(args.result, "result file") if args.result else None
    key = ed25519_hex(args.coordinator_key, "--coordinator-key") if args.coordinator_key else None
    appraisal = _receipt_appraisal(args)(receipt)
    try:
        out = verify_receipt(receipt, appraisal=appraisal, coordinator_key=key, result_bytes=result)
    except AuditError as err:
        return print_refusal(args, err)
    warnings = _receipt_warnings(out, args)
    if args.json:
        emit({**out.to_dict(), "warnings": warnings})
        return EXIT_OK
    print(f"verified the receipt of query {out.query_id} (plan {out.plan_hash[:16]}…), analyst {out.analyst}")
    print(f"  approved by {', '.join(out.parties)}; {out.suppressed_cells} cell(s) suppressed")
    print(f"  released result sha256 {out.result_sha256}" + (" (the file given matches)" if result else ""))
    for c in out.claims:
        print(f"  attested {c.platform} measurement {c.measurement}")
    for w in warnings:
        print(f"  note: {w}")
    return EXIT_OK


def _receipt_warnings(out: Any, args: argparse.Namespace) -> list[str]:
    warnings = []
    if out.simulated:
        warnings.append("SIMULATED attestation: no TEE protected this release")
    if not out.evidence_appraised:
        warnings.append("attestation evidence not appraised (give --trust, or --allow-simulated --dev-root)")
    elif args.allow_simulated and not args.trust:
        warnings.append("the enclave measurement was not pinned (give --trust with trust.measurements)")
    if not out.coordinator_key_pinned:
        warnings.append("coordinator key not pinned: the countersignature is only self-consistent")
    return warnings


def _verify_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `audit verify` (and list/show/export, for their status column) check a log with."""
    from sealroom.audit.notes import NoteVerifier, SignedCheckpoint
    from sealroom.errors import AuditError

    witnesses = []
    for value in getattr(args, "witness_key", []):
        name, sep, key = value.partition("=")
        if "+" in value and not sep:
            try:
                witnesses.append(NoteVerifier.from_vkey(value))
            except ValueError:
                raise UsageError(f"--witness-key {value!r} is not a verifier key") from None
            continue
        if not sep or not name:
            raise UsageError(f"--witness-key expects NAME=HEX or a verifier key NAME+KEYID+KEY (got {value!r})")
        try:
            witnesses.append(NoteVerifier(name, bytes.fromhex(ed25519_hex(key, "--witness-key"))))
        except ValueError as exc:
            raise UsageError(f"--witness-key {name}: {exc}") from None
    quorum = getattr(args, "quorum", None)
    if quorum is not None and not 0 <= quorum <= len(witnesses):
        raise UsageError(f"--quorum must be between 0 and the number of --witness-key ({len(witnesses)})")
    trusted = []
    for path in getattr(args, "checkpoint", []):
        try:
            trusted.append(SignedCheckpoint.from_text(read_file(path, "checkpoint")))
        except AuditError as err:
            raise UsageError(f"{path}: {err.message}") from None
    return {
        "log_key": ed25519_hex(args.log_key, "--log-key") if args.log_key else None,
        "coordinator_key": ed25519_hex(args.coordinator_key, "--coordinator-key")
        if getattr(args, "coordinator_key", None)
        else None,
        "witnesses": witnesses,
        "quorum": quorum,
        "trusted": trusted,
        "appraisal_for": _receipt_appraisal(args),
    }


def _verify_export(export: dict[str, Any], log_key_hex: str | None, opts: dict[str, Any]) -> Any:
    """verify_log over one export with the options; raises AuditError naming the first failure."""
    from sealroom.audit.notes import NoteVerifier
    from sealroom.audit.receipts import verify_receipt
    from sealroom.audit.verify import verify_log

    log_key = NoteVerifier(export["origin"], bytes.fromhex(log_key_hex)) if log_key_hex else None
    # The coordinator countersigns receipts with its log key.
    coordinator_key = opts["coordinator_key"] or log_key_hex
    appraisal_for = opts["appraisal_for"]

    def check_receipt(receipt: Any) -> None:
        verify_receipt(receipt, appraisal=appraisal_for(receipt), coordinator_key=coordinator_key)

    return verify_log(
        export,
        log_key=log_key,
        witnesses=opts["witnesses"],
        quorum=opts["quorum"],
        trusted=opts["trusted"],
        verify_receipt=check_receipt,
    )


def _state_logs(state_dir: str) -> list[Path]:
    """The coordinator state directories under ``state_dir`` (itself, or e.g. the demo's
    ``DIR/<scenario>/coordinator``): each holds ``coordinator.db`` and the published ``log.json``."""
    root = Path(state_dir)
    if not root.is_dir():
        raise UsageError(f"--state-dir {state_dir} is not a directory")
    if (root / "log.json").is_file() and (root / "coordinator.db").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("**/log.json") if (p.parent / "coordinator.db").is_file())
    if not found:
        raise UsageError(
            f"{state_dir} holds no coordinator state (coordinator.db with log.json); give the coordinator's "
            "state_dir, or a directory above it"
        )
    return found


def _load_state_log(directory: Path) -> tuple[dict[str, Any], str]:
    """The kernel's export of the log in ``directory``'s database (opened read-only), and the
    published log key (hex) from ``log.vkey``."""
    import sqlite3

    from coordinator.store import registered_witnesses
    from sealroom.audit.log import export_store
    from sealroom.audit.notes import NoteVerifier
    from sealroom.audit.store import SQLiteLogStore

    try:
        vkey = NoteVerifier.from_vkey(read_file(str(directory / "log.vkey"), "log key").decode("utf-8"))
        info = json.loads(read_file(str(directory / "log.json"), "log description"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{directory}: the published log key or log.json is malformed: {exc}") from None
    if not isinstance(info, dict) or info.get("origin") != vkey.name:
        raise UsageError(f"{directory}: log.json and log.vkey name different logs")
    try:
        db = sqlite3.connect(f"{(directory / 'coordinator.db').resolve().as_uri()}?mode=ro", uri=True)
        try:
            # The registered owners' keys go along as the witnesses' keys; verify_log binds each to
            # the owner key hash that the log's own dataset_registered entries record.
            witnesses = registered_witnesses(db)
            export = export_store(SQLiteLogStore(db), origin=vkey.name, log_key=vkey, witnesses=witnesses)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise UsageError(f"{directory / 'coordinator.db'}: cannot read the log: {exc}") from None
    return export, vkey.public_key.hex()


def _print_report(report: Any, witnesses: bool, prefix: str = "") -> None:
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(report.entries_by_type.items()))
    print(
        f"{prefix}verified log {report.origin}: {report.size} entries ({kinds or 'none'}), "
        f"{report.checkpoints} checkpoints"
    )
    print(f"  {report.receipts} release receipt(s) verified; root at size {report.size}: {report.root.hex()}")
    if witnesses:
        print(f"  co-signed by the witness quorum up to size {report.witnessed_size}")
    for w in report.witnesses:
        source = "pinned key" if w["pinned"] else "registered owner key"
        sizes = [str(c["size"]) for c in report.cosigned if w["name"] in c["witnesses"]]
        shown = ", ".join(sizes[-8:]) if len(sizes) <= 8 else "…, " + ", ".join(sizes[-8:])
        what = f"co-signed checkpoint sizes {shown}" if sizes else "no co-signature"
        print(f"  witness {w['name']} ({source}): {what}")
    if report.unverified_cosignatures:
        print(f"  note: {report.unverified_cosignatures} co-signature(s) by keys not known here were not checked")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sealroom.audit.log import load_export
    from sealroom.errors import AuditError

    if bool(args.log) == bool(args.state_dir):
        raise UsageError("give either --log FILE (an exported log) or --state-dir DIR (a coordinator's state)")
    opts = _verify_options(args)
    warnings = []
    if opts["appraisal_for"]({}) is None and not args.allow_simulated:
        warnings.append("receipts' attestation evidence not appraised (give --trust, or --allow-simulated --dev-root)")
    if args.log:
        try:
            export = load_export(read_file(args.log, "log"))
        except ValueError as exc:
            raise UsageError(f"{args.log}: {exc}") from None
        try:
            report = _verify_export(export, opts["log_key"], opts)
        except AuditError as err:
            return print_refusal(args, err)
        if not report.log_key_pinned:
            warnings.insert(0, "log key not pinned (--log-key): the log is only self-consistent")
        if args.json:
            emit({**report.to_dict(), "warnings": warnings})
            return EXIT_OK
        _print_report(report, bool(opts["witnesses"]))
        for w in warnings:
            print(f"  note: {w}")
        return EXIT_OK

    # --state-dir: every coordinator log found there, with the key each coordinator published.
    if not opts["log_key"]:
        warnings.insert(
            0, "log key read from the state directory (log.vkey); pin it with --log-key for an independent check"
        )
    reports = []
    for directory in _state_logs(args.state_dir):
        export, published = _load_state_log(directory)
        try:
            report = _verify_export(export, opts["log_key"] or published, opts)
        except AuditError as err:
            err.details.setdefault("log", str(directory))
            print(f"sealroom: refused ({err.details.get('check', '')}): {directory}: {err.message}", file=sys.stderr)
            if args.json:
                emit(
                    {
                        "verified": False,
                        "check": err.details.get("check", ""),
                        "log": str(directory),
                        "reason": err.to_dict(),
                    }
                )
            return EXIT_FAILED
        reports.append((directory, report))
    if args.json:
        emit(
            {
                "verified": True,
                "logs": [{"directory": str(d), **r.to_dict()} for d, r in reports],
                "warnings": warnings,
            }
        )
        return EXIT_OK
    for directory, report in reports:
        _print_report(report, bool(opts["witnesses"]), prefix=f"{directory}: ")
    for w in warnings:
        print(f"  note: {w}")
    return EXIT_OK


def _audit_releases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every release in the state dir's logs, described from its receipt, with its verification
    status: ``verified``, ``refused (CHECK)`` (its receipt), or ``log refused (CHECK)`` (the log)."""
    from sealroom.audit.events import query_history
    from sealroom.audit.receipts import receipt_sha256, verify_receipt
    from sealroom.errors import AuditError

    opts = _verify_options(args)
    appraisal_for = opts["appraisal_for"]
    out: list[dict[str, Any]] = []
    for directory in _state_logs(args.state_dir):
        export, published = _load_state_log(directory)
        key = opts["log_key"] or published
        try:
            _verify_export(export, key, opts)
            log_error = None
        except AuditError as err:
            log_error = err
        entries = [e for e in export["entries"] if isinstance(e, dict) and isinstance(e.get("event"), dict)]
        approved_at: dict[tuple[str, str], int] = {}
        for e in entries:
            if e.get("type") == "approved":
                approved_at[(str(e["event"].get("query_id")), str(e["event"].get("party")))] = e.get("time_ms", 0)
        for e in entries:
            if e.get("type") != "released":
                continue
            receipt = export["receipts"].get(str(e.get("seq")))
            status = "verified"
            if not isinstance(receipt, dict):
                status, receipt = "refused (receipt_missing)", {}
            elif receipt_sha256(receipt) != e["event"].get("receipt_sha256"):
                status = "refused (receipt_hash)"
            else:
                try:
                    verify_receipt(receipt, appraisal=appraisal_for(receipt), coordinator_key=key)
                except AuditError as err:
                    status = f"refused ({err.details.get('check')})"
            if status == "verified" and log_error is not None:
                status = f"log refused ({log_error.details.get('check')})"
            described = _describe(receipt, e, status, directory, export["origin"], approved_at)
            # Every entry about the query: submitted, approved, revoked or lapsed, executed, released.
            described["history"] = query_history(export, str(e["event"].get("query_id")))
            out.append(described)
    return out


def _audit_events(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The refused queries and withdrawn approvals (``query_refused``, ``rejected``,
    ``approval_revoked``, ``approval_lapsed``) in the state dir's logs, in log order per log."""
    from sealroom.audit.events import notable_events

    out: list[dict[str, Any]] = []
    for directory in _state_logs(args.state_dir):
        export, _ = _load_state_log(directory)
        out += [{**ev, "log": export["origin"], "directory": str(directory)} for ev in notable_events(export)]
    return out


EVENT_KEYS = ("entry", "time", "type", "query_id", "party", "dataset", "analyst", "rule", "text", "log")


def _describe(
    receipt: dict[str, Any],
    entry: dict[str, Any],
    status: str,
    directory: Path,
    origin: str,
    approved_at: dict[tuple[str, str], int],
) -> dict[str, Any]:
    """One release in words, from its receipt (defensively: a tampered receipt still gets a row)."""

    def get(doc: Any, *path: str) -> Any:
        for key in path:
            doc = doc.get(key) if isinstance(doc, dict) else None
        return doc

    def listed(doc: Any) -> list[Any]:
        return doc if isinstance(doc, list) else []

    qid = get(receipt, "query", "id") or get(entry, "event", "query_id")
    datasets = sorted(
        {f"{d.get('party')}.{d.get('dataset')}" for d in listed(receipt.get("datasets")) if isinstance(d, dict)}
    )
    stages = []
    for s in listed(receipt.get("stages")):
        if not isinstance(s, dict):
            continue
        if s.get("kind") == "tee":
            att = get(s, "result", "attestation") or {}
            stages.append(
                {
                    "id": s.get("id"),
                    "kind": "tee",
                    "platform": s.get("format"),
                    "measurement": s.get("measurement"),
                    "simulated": s.get("simulated"),
                    "evidence_sha256": att.get("evidence_sha256") if isinstance(att, dict) else None,
                    "executed_at": iso_time(get(s, "result", "executed_at")),
                }
            )
        else:
            stages.append(
                {
                    "id": s.get("id"),
                    "kind": "mpc",
                    "players": [p.get("name") for p in listed(s.get("players")) if isinstance(p, dict)],
                    "threshold": get(s, "result", "threshold"),
                    "trust_assumption": s.get("trust_assumption"),
                    "simulated": s.get("simulated"),
                }
            )
    approvals = [
        {
            "party": a.get("party"),
            "public_key": a.get("public_key"),
            "plan_hash": a.get("plan_hash"),
            "logged_at": iso_time(approved_at[(str(qid), str(a.get("party")))] / 1000)
            if (str(qid), str(a.get("party"))) in approved_at
            else None,
        }
        for a in listed(receipt.get("approvals"))
        if isinstance(a, dict)
    ]
    suppressed = [c for c in listed(get(receipt, "disclosure", "suppressed")) if isinstance(c, dict)]
    return {
        "query_id": qid,
        "released_at": iso_time(get(receipt, "timestamps", "released_at")),
        "released_ts": get(receipt, "timestamps", "released_at"),
        "submitted_at": iso_time(get(receipt, "timestamps", "submitted_at")),
        "analyst": get(receipt, "query", "analyst"),
        "sql": get(receipt, "query", "sql"),
        "plan_hash": get(receipt, "query", "plan_hash"),
        "datasets": datasets,
        "parties": sorted({d.split(".", 1)[0] for d in datasets}),
        "approvals": approvals,
        "stages": stages,
        "suppressed": suppressed,
        "rules": get(receipt, "disclosure", "rules"),
        "rows": get(receipt, "result", "rows"),
        "columns": get(receipt, "result", "columns"),
        "result_sha256": get(receipt, "result", "sha256"),
        "suppressed_cells": len(suppressed),
        "simulated": receipt.get("simulated") if receipt else get(entry, "event", "simulated"),
        "status": status,
        "entry": entry.get("seq"),
        "log": origin,
        "directory": str(directory),
    }


def cmd_audit_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise UsageError(f"--since must be an ISO-8601 date or time (got {args.since!r})") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
    if args.dataset and args.dataset.count(".") != 1:
        raise UsageError("--dataset is PARTY.DATASET")
    rows = []
    for r in _audit_releases(args):
        if since is not None and not (
            isinstance(r["released_ts"], int | float) and r["released_ts"] >= since.timestamp()
        ):
            continue
        if args.dataset and args.dataset not in r["datasets"]:
            continue
        if args.analyst and r["analyst"] != args.analyst:
            continue
        rows.append(r)
    events = []
    for ev in _audit_events(args):
        if since is not None and not (type(ev["time_ms"]) is int and ev["time_ms"] >= since.timestamp() * 1000):
            continue
        if args.analyst and ev["analyst"] != args.analyst:
            continue
        if args.dataset and not (
            (ev["party"], ev["dataset"]) == tuple(args.dataset.split("."))
            if ev["type"] == "query_refused"
            else ev["party"] == args.dataset.split(".")[0]
        ):
            continue
        events.append(ev)
    keys = ("query_id", "released_at", "analyst", "datasets", "rows", "suppressed_cells", "simulated", "status", "log")
    if args.json:
        emit(
            {
                "releases": [{k: r[k] for k in keys} for r in rows],
                "events": [{k: ev[k] for k in EVENT_KEYS} for ev in events],
            }
        )
        return EXIT_OK
    if not rows:
        print("no releases")
    else:
        print(f"{'QUERY':<20} {'RELEASED (UTC)':<21} {'ANALYST':<12} {'ROWS':>5} {'SUPPR':>5}  STATUS  DATASETS")
    for r in rows:
        status = r["status"] + (", SIMULATED" if r["simulated"] else "")
        print(
            f"{r['query_id']!s:<20} {r['released_at']:<21} {r['analyst']!s:<12} {r['rows']!s:>5} "
            f"{r['suppressed_cells']:>5}  {status}  {', '.join(r['datasets'])}"
        )
    if events:
        print(f"\nrefused queries and withdrawn approvals ({len(events)}):")
        print(f"{'QUERY':<20} {'LOGGED (UTC)':<21} {'EVENT':<17} WHAT")
        for ev in events:
            print(f"{ev['query_id']!s:<20} {ev['time']:<21} {ev['type']!s:<17} {ev['text']}")
    return EXIT_OK


def cmd_audit_show(args: argparse.Namespace) -> int:
    found = [r for r in _audit_releases(args) if r["query_id"] == args.release_id]
    if not found:
        # Not released: what the logs say about the query (refused, rejected, approvals withdrawn).
        from sealroom.audit.events import query_history

        history = []
        for directory in _state_logs(args.state_dir):
            export, _ = _load_state_log(directory)
            history += [{**h, "log": export["origin"]} for h in query_history(export, args.release_id)]
        print(f"sealroom: no release {args.release_id} in the logs under {args.state_dir}", file=sys.stderr)
        if args.json:
            emit({"found": False, "query_id": args.release_id, "history": history})
        elif history:
            print(f"query {args.release_id} was not released; the log records:")
            for h in history:
                print(f"  {h['time']}  entry {h['entry']}: {h['text']}")
        return EXIT_FAILED
    r = found[-1]
    r = {k: v for k, v in r.items() if k != "released_ts"}
    if args.json:
        emit(r)
        return EXIT_OK
    print(f"release {r['query_id']} (log {r['log']}, entry {r['entry']}): {r['status'].upper()}")
    print(f"  analyst {r['analyst']}; submitted {r['submitted_at']}, released {r['released_at']}")
    print(f"  plan hash {r['plan_hash']}")
    print("  SQL:")
    for line in str(r["sql"]).strip().splitlines():
        print(f"    {line}")
    print(f"  parties: {', '.join(r['parties'])}; datasets: {', '.join(r['datasets'])}")
    for a in r["approvals"]:
        print(f"  approved by {a['party']} (key {str(a['public_key'])[:16]}…, logged {a['logged_at'] or '?'})")
    for s in r["stages"]:
        if s["kind"] == "tee":
            sim = " (SIMULATED attestation: no TEE)" if s["simulated"] else ""
            print(f"  stage {s['id']}: enclave, {s['platform']} measurement {s['measurement']}{sim}")
            print(f"    evidence sha256 {s['evidence_sha256']}, executed {s['executed_at']}")
        else:
            print(f"  stage {s['id']}: MPC, players {', '.join(map(str, s['players']))}, threshold {s['threshold']}")
            print(f"    trust assumption: {s['trust_assumption']}")
    print(f"  released {r['rows']} row(s), columns {', '.join(map(str, r['columns'] or []))}")
    print(f"  result sha256 {r['result_sha256']}")
    if not r["suppressed"]:
        print("  no cell suppressed")
    for c in r["suppressed"]:
        group = ", ".join(f"{k}={v}" for k, v in (c.get("group") or {}).items())
        print(f"  suppressed cell {group or '(all)'}: {c.get('rule')}: {c.get('reason')}")
    print("  log history:")
    for h in r["history"]:
        print(f"    {h['time']}  entry {h['entry']}: {h['text']}")
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from sealroom.audit.report import audit_html
    from sealroom.errors import AuditError

    if args.json and not args.output:
        raise UsageError("--json prints a summary of the export; give -o FILE for the export itself")
    directories = _state_logs(args.state_dir)
    releases: list[dict[str, Any]] | None = None
    if args.format == "json":
        if len(directories) != 1:
            raise UsageError(
                f"{args.state_dir} holds {len(directories)} coordinator logs; export one at a time with the "
                f"--state-dir of one of: {', '.join(str(d) for d in directories)}"
            )
        export, _ = _load_state_log(directories[0])
        text = json.dumps(export, indent=1) + "\n"
    else:
        opts = _verify_options(args)
        logs = []
        for directory in directories:
            export, published = _load_state_log(directory)
            try:
                _verify_export(export, opts["log_key"] or published, opts)
                status = "verified"
            except AuditError as err:
                status = f"refused ({err.details.get('check')}): {err.message}"
            logs.append(
                {
                    "origin": export["origin"],
                    "directory": str(directory),
                    "entries": len(export["entries"]),
                    "status": status,
                }
            )
        releases = _audit_releases(args)
        text = audit_html(releases, logs, _audit_events(args))
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    else:
        sys.stdout.write(text)
    if args.json:
        summary: dict[str, Any] = {"format": args.format, "output": args.output, "logs": [str(d) for d in directories]}
        if releases is not None:
            summary["releases"] = [{"query_id": r["query_id"], "status": r["status"]} for r in releases]
        emit(summary)
    return EXIT_OK


def cmd_audit_ropa(args: argparse.Namespace) -> int:
    """The record of processing of every coordinator under --state-dir (sealroom.ropa)."""
    import sqlite3

    from sealroom.audit.report import ropa_html, ropa_markdown
    from sealroom.audit.ropa import CoordinatorState, build_ropa, read_catalog, read_declaration, ropa_json
    from sealroom.errors import AuditError, ConfigError

    if args.json and not args.output and args.format != "json":
        raise UsageError("--json prints a summary of the record; give -o FILE for the record itself (or --format json)")
    opts = _verify_options(args)
    receipts: dict[tuple[str, Any], str] = {(r["directory"], r["entry"]): r["status"] for r in _audit_releases(args)}
    states = []
    for directory in _state_logs(args.state_dir):
        export, published = _load_state_log(directory)
        try:
            _verify_export(export, opts["log_key"] or published, opts)
            status = "verified"
        except AuditError as err:
            status = f"refused ({err.details.get('check')}): {err.message}"
        try:
            declaration = read_declaration(directory)
            datasets, parties = read_catalog(directory)
        except ConfigError as err:
            raise UsageError(err.message) from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except sqlite3.Error as exc:
            raise UsageError(f"{directory / 'coordinator.db'}: cannot read the catalog: {exc}") from None
        states.append(
            CoordinatorState(
                directory=str(directory),
                export=export,
                log_status=status,
                declaration=declaration,
                datasets=datasets,
                parties=parties,
                receipt_status={seq: st for (d, seq), st in receipts.items() if d == str(directory)},
            )
        )
    doc = build_ropa(states)
    text = {"json": ropa_json, "md": ropa_markdown, "html": ropa_html}[args.format](doc)
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    gaps = sorted({g["check"] for rec in doc["records"] for g in rec["gaps"]})
    releases = sum(rec["summary"]["releases"] for rec in doc["records"])
    if args.json:
        emit(
            {
                "format": args.format,
                "output": args.output,
                "records": [
                    {
                        "directory": rec["log"]["directory"],
                        "collaboration": (rec["collaboration"] or {}).get("name"),
                        "log_status": rec["log"]["status"],
                        "releases": rec["summary"]["releases"],
                        "gaps": [g["check"] for g in rec["gaps"]],
                    }
                    for rec in doc["records"]
                ],
            }
        )
    else:
        print(
            f"wrote the record of processing of {len(doc['records'])} collaboration(s), {releases} release(s), to "
            f"{args.output}" + (f"; gaps: {', '.join(gaps)}" if gaps else ""),
            file=sys.stderr,
        )
    return EXIT_OK
