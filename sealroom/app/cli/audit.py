"""``sealroom receipt verify`` and ``sealroom audit verify/list/show/export/ropa``: the compliance
reviewer's commands. Each parses its arguments, builds the typed options
(:class:`~sealroom.audit.review.VerifyOptions`), calls :mod:`sealroom.audit.review` and prints.

A run loads this module (and with it the audit room, imported at the top) only for a receipt or audit
command, or for a command word that is not one of ours: the others get their one line of help from
:data:`~sealroom.app.cli.common.COMMANDS` (see :mod:`sealroom.app.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealroom.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Subparsers,
    UsageError,
    add_command,
    emit,
    read_file,
    report_refusal,
    with_json,
)
from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.audit.budget import verify_ledger
from sealroom.audit.entries import LogEntry
from sealroom.audit.ledger import read_ledger
from sealroom.audit.log import load_export
from sealroom.audit.notes import NoteVerifier, SignedCheckpoint
from sealroom.audit.receipts import VerifiedReceipt, load_receipt, verify_receipt
from sealroom.audit.report import audit_html, ropa_html, ropa_markdown
from sealroom.audit.review import (
    EVENT_KEYS,
    RELEASE_KEYS,
    ReceiptAppraisal,
    ReleaseFilter,
    VerifyOptions,
    audit_events,
    audit_releases,
    log_status,
    query_histories,
    read_state_logs,
    ropa_states,
    verify_export,
)
from sealroom.audit.ropa import build_ropa, ropa_json
from sealroom.audit.state import load_state_log, state_dirs
from sealroom.audit.verify import LogReport
from sealroom.config import parse_toml
from sealroom.errors import AttestationError, AuditError, ConfigError
from sealroom.policy import TrustPolicy


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
    avf.add_argument(
        "--ledger",
        metavar="FILE",
        help="an owner agent's budget ledger (budget.jsonl): check its chain and its committed charges against the log",
    )
    avf.add_argument(
        "--party", metavar="NAME", help="the owner whose --ledger it is (then every charge the log records is checked)"
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


# --------------------------------------------------------------------------------------------------
# From the arguments to the typed options


@contextmanager
def _usage_errors() -> Iterator[None]:
    """Unusable input the audit room finds (a ConfigError: no coordinator state, an unreadable log
    or catalog) is a usage error here (exit 2), told in the same words."""
    try:
        yield
    except ConfigError as err:
        raise UsageError(err.message) from None


def _is_hex_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def ed25519_hex(value: str, flag: str) -> str:
    """An Ed25519 public key given as 64 hex characters, a signed-note verifier key (NAME+ID+KEY), a
    PEM public key, or a file holding one of these; returned as hex."""
    text = value.strip()
    if not _is_hex_key(text) and "+" not in text:
        text = read_file(value, f"{flag} key").decode("utf-8", "replace").strip()
    if _is_hex_key(text):
        return text.lower()
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            key = None
        if isinstance(key, Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    try:
        return NoteVerifier.from_vkey(text).public_key.hex()
    except ValueError:
        raise UsageError(
            f"{flag} must be an Ed25519 public key: 64 hex characters, a verifier key NAME+KEYID+KEY, "
            "a PEM public key, or a file holding one"
        ) from None


def _trust_policy(path: str) -> AppraisalPolicy:
    """The appraisal policy of the ``[trust]`` table in ``path`` (or of the whole file)."""
    try:
        doc = parse_toml(read_file(path, "trust file").decode("utf-8"), source=path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not TOML: {exc}") from None
    except ConfigError as err:
        raise UsageError(err.message) from None
    section = doc.get("trust", doc)
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [trust] must be a table")
    try:
        return TrustPolicy.from_dict(section, source=path, base=Path(path).resolve().parent).appraisal()
    except (ConfigError, AttestationError) as err:
        raise UsageError(err.message) from None


def _receipt_appraisal(args: argparse.Namespace) -> ReceiptAppraisal:
    """How receipts' evidence is appraised, from --trust, --allow-simulated and --dev-root."""
    trust = _trust_policy(args.trust) if args.trust else None
    if args.dev_root and not args.allow_simulated:
        raise UsageError("--dev-root goes with --allow-simulated")
    if not args.allow_simulated:
        return ReceiptAppraisal(trust=trust)
    if not args.dev_root:
        raise UsageError("--allow-simulated needs --dev-root CRT (the dev root the enclave's evidence chains to)")
    try:
        root = load_root_certificate(Path(args.dev_root))
    except (AttestationError, ConfigError, OSError, ValueError) as err:
        raise UsageError(f"unusable --dev-root {args.dev_root}: {err}") from None
    return ReceiptAppraisal(trust=trust, simulated_root=root)


def _witness_keys(values: Sequence[str]) -> tuple[NoteVerifier, ...]:
    """The --witness-key values: NAME=KEY (any form :func:`ed25519_hex` reads) or a verifier key."""
    witnesses = []
    for value in values:
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
    return tuple(witnesses)


def _checkpoints(paths: Sequence[str]) -> tuple[SignedCheckpoint, ...]:
    """The --checkpoint files: checkpoints seen elsewhere."""
    trusted = []
    for path in paths:
        try:
            trusted.append(SignedCheckpoint.from_text(read_file(path, "checkpoint")))
        except AuditError as err:
            raise UsageError(f"{path}: {err.message}") from None
    return tuple(trusted)


def _verify_options(args: argparse.Namespace) -> VerifyOptions:
    """What `audit verify` (and list/show/export/ropa, for their status column) check a log with;
    the subcommands without --witness-key, --quorum, --checkpoint or --coordinator-key go without."""
    witnesses = _witness_keys(getattr(args, "witness_key", []))
    quorum = getattr(args, "quorum", None)
    if quorum is not None and not 0 <= quorum <= len(witnesses):
        raise UsageError(f"--quorum must be between 0 and the number of --witness-key ({len(witnesses)})")
    trusted = _checkpoints(getattr(args, "checkpoint", []))
    coordinator_key = getattr(args, "coordinator_key", None)
    return VerifyOptions(
        log_key=ed25519_hex(args.log_key, "--log-key") if args.log_key else None,
        coordinator_key=ed25519_hex(coordinator_key, "--coordinator-key") if coordinator_key else None,
        witnesses=witnesses,
        quorum=quorum,
        trusted=trusted,
        appraisal=_receipt_appraisal(args),
    )


def _write(text: str, output: str | None) -> None:
    """``text`` to the file ``output``, or to stdout."""
    if not output:
        sys.stdout.write(text)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None


# --------------------------------------------------------------------------------------------------
# sealroom receipt verify


def cmd_receipt_verify(args: argparse.Namespace) -> int:
    try:
        receipt = load_receipt(read_file(args.file, "receipt"))
    except ValueError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    result = read_file(args.result, "result file") if args.result else None
    key = ed25519_hex(args.coordinator_key, "--coordinator-key") if args.coordinator_key else None
    appraisal = _receipt_appraisal(args).policy_for(receipt)
    try:
        out = verify_receipt(receipt, appraisal=appraisal, coordinator_key=key, result_bytes=result)
    except AuditError as err:
        report_refusal(err, as_json=args.json)
        return EXIT_FAILED
    warnings = _receipt_warnings(out, pinned_trust=bool(args.trust), allow_simulated=args.allow_simulated)
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


def _receipt_warnings(out: VerifiedReceipt, *, pinned_trust: bool, allow_simulated: bool) -> list[str]:
    warnings = []
    if out.simulated:
        warnings.append("SIMULATED attestation: no TEE protected this release")
    if not out.evidence_appraised:
        warnings.append("attestation evidence not appraised (give --trust, or --allow-simulated --dev-root)")
    elif allow_simulated and not pinned_trust:
        warnings.append("the enclave measurement was not pinned (give --trust with trust.measurements)")
    if not out.coordinator_key_pinned:
        warnings.append("coordinator key not pinned: the countersignature is only self-consistent")
    return warnings


# --------------------------------------------------------------------------------------------------
# sealroom audit verify


def _print_report(report: LogReport, witnesses: bool, prefix: str = "") -> None:
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
    _print_budgets(report)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if bool(args.log) == bool(args.state_dir):
        raise UsageError("give either --log FILE (an exported log) or --state-dir DIR (a coordinator's state)")
    options = _verify_options(args)
    warnings = []
    if not options.appraisal.appraises and not args.allow_simulated:
        warnings.append("receipts' attestation evidence not appraised (give --trust, or --allow-simulated --dev-root)")
    if args.log:
        return _verify_log_file(args.log, options, warnings, as_json=args.json, ledger=(args.ledger, args.party))
    return _verify_state_dir(args.state_dir, options, warnings, as_json=args.json, ledger=(args.ledger, args.party))


def _check_ledger(path: str | None, party: str | None, *, export: Mapping[str, Any]) -> dict[str, Any] | None:
    """``--ledger FILE``: the ledger's chain holds and its committed charges are the log's (AuditError)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such ledger file")
    entries = [LogEntry.from_dict(e) for e in export["entries"]]  # verified already
    return {"ledger": path, **verify_ledger(read_ledger(Path(path)), entries, party=party)}


def _print_ledger(summary: dict[str, Any] | None) -> None:
    if summary is not None:
        print(
            f"  ledger {summary['ledger']}: chain intact ({summary['ledger_lines']} lines); its "
            f"{summary['committed']} committed charge(s) agree with the log "
            f"({summary['committed_not_released']} of them for queries the log shows no release of)"
        )


def _print_budgets(report: LogReport) -> None:
    for b in report.budgets:
        left = max(0.0, b["epsilon_budget"] - b["spent"])
        print(
            f"  budget {b['dataset']} ({b['scope']}): spent {b['spent']:g} of {b['epsilon_budget']:g} "
            f"in {b['charges']} charge(s), {left:g} left"
        )


def _verify_log_file(
    path: str,
    options: VerifyOptions,
    warnings: list[str],
    *,
    as_json: bool,
    ledger: tuple[str | None, str | None] = (None, None),
) -> int:
    """``audit verify --log FILE``: an exported log."""
    try:
        export = load_export(read_file(path, "log"))
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    try:
        report = verify_export(export, options.log_key, options)
        checked = _check_ledger(*ledger, export=export)
    except AuditError as err:
        report_refusal(err, as_json=as_json)
        return EXIT_FAILED
    if not report.log_key_pinned:
        warnings.insert(0, "log key not pinned (--log-key): the log is only self-consistent")
    if as_json:
        emit({**report.to_dict(), "ledger": checked, "warnings": warnings})
        return EXIT_OK
    _print_report(report, bool(options.witnesses))
    _print_ledger(checked)
    for w in warnings:
        print(f"  note: {w}")
    return EXIT_OK


def _verify_state_dir(
    state_dir: str,
    options: VerifyOptions,
    warnings: list[str],
    *,
    as_json: bool,
    ledger: tuple[str | None, str | None] = (None, None),
) -> int:
    """``audit verify --state-dir DIR``: every coordinator log found there, with the key each
    coordinator published."""
    if not options.log_key:
        warnings.insert(
            0, "log key read from the state directory (log.vkey); pin it with --log-key for an independent check"
        )
    reports = []
    ledgers: list[dict[str, Any] | None] = []
    with _usage_errors():
        directories = state_dirs(state_dir)
    for directory in directories:
        with _usage_errors():
            log = load_state_log(directory)
        try:
            report = verify_export(log.export, options.key_for(log), options)
            ledgers.append(_check_ledger(*ledger, export=log.export))
        except AuditError as err:
            err.details.setdefault("log", str(directory))
            print(f"sealroom: refused ({err.details.get('check', '')}): {directory}: {err.message}", file=sys.stderr)
            if as_json:
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
    if as_json:
        logs = [{"directory": str(d), **r.to_dict(), "ledger": x} for (d, r), x in zip(reports, ledgers, strict=True)]
        emit({"verified": True, "logs": logs, "warnings": warnings})
        return EXIT_OK
    for (directory, report), checked in zip(reports, ledgers, strict=True):
        _print_report(report, bool(options.witnesses), prefix=f"{directory}: ")
        _print_ledger(checked)
    for w in warnings:
        print(f"  note: {w}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# sealroom audit list / show


def _release_filter(args: argparse.Namespace) -> ReleaseFilter:
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
    return ReleaseFilter(since=since, dataset=args.dataset, analyst=args.analyst)


def cmd_audit_list(args: argparse.Namespace) -> int:
    selected = _release_filter(args)
    options = _verify_options(args)
    with _usage_errors():
        logs = read_state_logs(args.state_dir)
    rows = [r for r in audit_releases(logs, options) if selected.keeps_release(r)]
    events = [ev for ev in audit_events(logs) if selected.keeps_event(ev)]
    if args.json:
        emit(
            {
                "releases": [{k: r[k] for k in RELEASE_KEYS} for r in rows],
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
    options = _verify_options(args)
    with _usage_errors():
        logs = read_state_logs(args.state_dir)
    found = [r for r in audit_releases(logs, options) if r["query_id"] == args.release_id]
    if not found:
        # Not released: what the logs say about the query (refused, rejected, approvals withdrawn).
        history = query_histories(logs, args.release_id)
        print(f"sealroom: no release {args.release_id} in the logs under {args.state_dir}", file=sys.stderr)
        if args.json:
            emit({"found": False, "query_id": args.release_id, "history": history})
        elif history:
            print(f"query {args.release_id} was not released; the log records:")
            for h in history:
                print(f"  {h['time']}  entry {h['entry']}: {h['text']}")
        return EXIT_FAILED
    release = {k: v for k, v in found[-1].items() if k != "released_ts"}
    if args.json:
        emit(release)
    else:
        _print_release(release)
    return EXIT_OK


def _print_release(r: Mapping[str, Any]) -> None:
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
        shown = group or ("(key not shown)" if "group" in c and c["group"] is None else "(all)")
        print(f"  suppressed cell {shown}: {c.get('rule')}: {c.get('reason')}")
    print("  log history:")
    for h in r["history"]:
        print(f"    {h['time']}  entry {h['entry']}: {h['text']}")


# --------------------------------------------------------------------------------------------------
# sealroom audit export / ropa


def cmd_audit_export(args: argparse.Namespace) -> int:
    if args.json and not args.output:
        raise UsageError("--json prints a summary of the export; give -o FILE for the export itself")
    with _usage_errors():
        directories = state_dirs(args.state_dir)
    releases: list[dict[str, Any]] | None = None
    if args.format == "json":
        if len(directories) != 1:
            raise UsageError(
                f"{args.state_dir} holds {len(directories)} coordinator logs; export one at a time with the "
                f"--state-dir of one of: {', '.join(str(d) for d in directories)}"
            )
        with _usage_errors():
            text = json.dumps(load_state_log(directories[0]).export, indent=1) + "\n"
    else:
        options = _verify_options(args)
        with _usage_errors():
            logs = [load_state_log(directory) for directory in directories]
        summaries = [
            {
                "origin": log.origin,
                "directory": str(log.directory),
                "entries": len(log.export["entries"]),
                "status": log_status(log, options),
            }
            for log in logs
        ]
        releases = audit_releases(logs, options)
        text = audit_html(releases, summaries, audit_events(logs))
    _write(text, args.output)
    if args.json:
        summary: dict[str, Any] = {"format": args.format, "output": args.output, "logs": [str(d) for d in directories]}
        if releases is not None:
            summary["releases"] = [{"query_id": r["query_id"], "status": r["status"]} for r in releases]
        emit(summary)
    return EXIT_OK


def cmd_audit_ropa(args: argparse.Namespace) -> int:
    """The record of processing of every coordinator under --state-dir (sealroom.ropa)."""
    if args.json and not args.output and args.format != "json":
        raise UsageError("--json prints a summary of the record; give -o FILE for the record itself (or --format json)")
    options = _verify_options(args)
    with _usage_errors():
        logs = read_state_logs(args.state_dir)
        states = ropa_states(logs, options, audit_releases(logs, options))
    doc = build_ropa(states)
    text = {"json": ropa_json, "md": ropa_markdown, "html": ropa_html}[args.format](doc)
    _write(text, args.output)
    if not args.output:
        return EXIT_OK
    if args.json:
        emit(
            {"format": args.format, "output": args.output, "records": [_record_summary(rec) for rec in doc["records"]]}
        )
    else:
        gaps = sorted({g["check"] for rec in doc["records"] for g in rec["gaps"]})
        releases = sum(rec["summary"]["releases"] for rec in doc["records"])
        print(
            f"wrote the record of processing of {len(doc['records'])} collaboration(s), {releases} release(s), to "
            f"{args.output}" + (f"; gaps: {', '.join(gaps)}" if gaps else ""),
            file=sys.stderr,
        )
    return EXIT_OK


def _record_summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One collaboration's line in ``audit ropa --json -o FILE``'s summary."""
    return {
        "directory": rec["log"]["directory"],
        "collaboration": (rec["collaboration"] or {}).get("name"),
        "log_status": rec["log"]["status"],
        "releases": rec["summary"]["releases"],
        "gaps": [g["check"] for g in rec["gaps"]],
    }
