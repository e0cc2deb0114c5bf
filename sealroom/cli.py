"""The ``sealroom`` command line. Only :func:`main` exits the process.

Exit status: 0 success (released), 1 refused or failed, 2 unusable arguments. Every command that
prints results has ``--json``: one JSON document on stdout; progress and logs go to stderr.
Imports are lazy so that ``sealroom enclave serve`` loads only what the enclave worker needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_COORDINATOR = "127.0.0.1:7100"


class UsageError(Exception):
    """Unusable arguments (exit 2)."""


def _coordinator(args: argparse.Namespace) -> str:
    address = args.coordinator or os.environ.get("SEALROOM_COORDINATOR") or DEFAULT_COORDINATOR
    return _address(address, "coordinator")


def _address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"the {what} address must be HOST:PORT (got {value!r})")
    return value


def _emit(doc: Any) -> None:
    from sealroom.output import jsonable

    print(json.dumps(jsonable(doc), indent=2, sort_keys=False))


# -- serve --------------------------------------------------------------------------------------


def cmd_enclave_serve(args: argparse.Namespace) -> int:
    from enclave_worker.config import EnclaveConfig
    from enclave_worker.server import serve

    serve(EnclaveConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_enclave_measure(args: argparse.Namespace) -> int:
    from enclave_worker.config import EnclaveConfig
    from sealroom.attestation import enclave_measurement

    config = EnclaveConfig.load(Path(args.config))
    if config.attester == "simulated":
        m = enclave_measurement(config.measured())
    else:  # the platform measures the image: ask it, from inside the confidential VM or enclave
        from enclave_worker.attester import make_attester

        attester = make_attester(config)
        attester.close()
        m = attester.measurement
    if args.json:
        _emit({"measurement": m})
    else:
        print(m)
    return EXIT_OK


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.server import serve

    serve(CoordinatorConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_serve(args: argparse.Namespace) -> int:
    from connectors.agent import PartyConfig, serve

    serve(PartyConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_init(args: argparse.Namespace) -> int:
    from sealroom.keys import generate_signing_key, public_key_hex, save_signing_key

    key = generate_signing_key()
    save_signing_key(key, Path(args.key), overwrite=args.force)
    if args.json:
        _emit({"key": str(args.key), "public_key": public_key_hex(key)})
    else:
        print(f"wrote {args.key} (mode 0600); public key {public_key_hex(key)}")
    return EXIT_OK


def cmd_attest_verify(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from sealroom.attestation.offline import decode_evidence, load_certificate, verify_platform_evidence

    def cert(path: str, what: str) -> Any:
        try:
            return load_certificate(
                decode_evidence(_read_file(path, what)) if not path.endswith(".pem") else _read_file(path, what)
            )
        except ValueError:
            raise UsageError(f"{path} is not a PEM or DER certificate") from None

    evidence = decode_evidence(_read_file(args.evidence, "evidence"))
    certificates = [cert(c, "certificate") for c in args.cert]
    root = cert(args.root, "root certificate") if args.root else None
    collateral = None
    if args.collateral:
        if args.format not in ("tdx", "sgx"):
            raise UsageError(f"--collateral applies to --format tdx or sgx, not {args.format}")
        from sealroom.attestation.collateral import load_collateral
        from sealroom.errors import AttestationError

        try:
            collateral = load_collateral(args.collateral)
        except OSError as exc:
            raise UsageError(f"cannot read the collateral {args.collateral}: {exc.strerror}") from None
        except AttestationError as exc:
            raise UsageError(f"unusable collateral {args.collateral}: {exc.message}") from None
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"--at must be an ISO-8601 time such as 2023-09-18T12:00:00Z (got {args.at!r})") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    from sealroom.errors import AttestationError

    try:
        claims = verify_platform_evidence(
            args.format,
            evidence,
            certificates=certificates,
            root=root,
            at=at,
            allow_debug=args.allow_debug,
            expect_measurement=args.expect_measurement,
            collateral=collateral,
            allow_out_of_date=args.allow_out_of_date,
        )
    except AttestationError as err:
        check = err.details.get("check", "")
        print(f"sealroom: refused ({check}): {err.message}", file=sys.stderr)
        if args.json:
            _emit({"verified": False, "check": check, "reason": err.to_dict()})
        # Evidence that does not parse is unusable input (2); evidence that parses and fails a check
        # is refused (1).
        return EXIT_USAGE if check == "format" else EXIT_FAILED
    if args.json:
        _emit({"verified": True, "claims": claims.to_json_dict()})
    else:
        print(f"verified {claims.platform} evidence: measurement {claims.measurement}")
        print(f"  debug {claims.debug}; tcb {dict(claims.tcb)}; report data {claims.report_data.hex()[:32]}...")
        if "tcb_status" in claims.details:
            advisories = ", ".join(claims.details["advisory_ids"]) or "none"
            print(f"  TCB status {claims.details['tcb_status']} (advisories: {advisories})")
    return EXIT_OK


def cmd_dev_init(args: argparse.Namespace) -> int:
    from sealroom.attestation import dev_init

    root = dev_init(Path(args.dir), force=args.force)
    if args.json:
        _emit({"simulated": True, "dev_root": str(root.cert_path), "key": str(root.key_path)})
        return EXIT_OK
    print(f"wrote the SIMULATED dev attestation root: {root.cert_path} (and its key {root.key_path})")
    print("relying parties pin the .crt with trust.dev_root and trust.allow_simulated = true")
    return EXIT_OK


# -- analyst ------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from sealroom.client import Client

    token = args.token or os.environ.get("SEALROOM_TOKEN") or None
    return Client(_coordinator(args), analyst=args.analyst, token=token)


def cmd_analyst_token(args: argparse.Namespace) -> int:
    from sealroom.auth import generate_token, token_hash

    if not args.name.isidentifier():
        raise UsageError("analyst names must be identifiers (letters, digits, _)")
    token = generate_token()
    line = f'{args.name} = "{token_hash(token)}"'
    if args.json:
        _emit({"analyst": args.name, "token": token, "config_line": line})
    else:
        print(f"token for {args.name} (give it to the analyst; it is shown once):\n  {token}")
        print(f"add to the coordinator's configuration, under [analysts]:\n  {line}")
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ds = c.datasets()
    if args.json:
        _emit(ds)
    else:
        for d in ds:
            unit = d["policy"].get("privacy_unit") or "rows"
            print(f"{d['dataset']}: {', '.join(d['columns'])}  [unit {unit}, k={d['policy']['min_group_size']}]")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        doc = c.explain_plan(args.sql)
    if args.json:
        _emit(doc)
    else:
        print(doc["text"])
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from sealroom.output import render_result, result_document

    with _client(args) as c:
        handle = c.submit(args.sql)
        if not args.wait:
            st = handle.status()
            if args.json:
                _emit(st)
            else:
                print(f"{st['query_id']}: {st['status']}")
            return EXIT_OK if st["status"] != "refused" else EXIT_FAILED
        from sealroom.output import ProgressDisplay

        # A terminal gets per-party progress bars on stderr; --json gets nothing but the document.
        progress = None if args.json else ProgressDisplay()
        handle.wait(args.timeout, on_progress=progress)
        result = c.result(handle.query_id)
    if args.json:
        _emit(result_document(result, sql=args.sql))
    else:
        print(render_result(result))
    return EXIT_OK if result.status == "released" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = [c.status(args.query_id)] if args.query_id else c.queries()
    if args.json:
        _emit(rows if not args.query_id else rows[0])
        return EXIT_OK
    from sealroom.output import format_table

    print(
        format_table(
            ["query", "status", "progress", "approved by", "awaiting", "analyst"],
            [
                [
                    r["query_id"],
                    r["status"],
                    r["progress"],
                    ", ".join(r["approved_by"]),
                    ", ".join(r["awaiting"]),
                    r["analyst"],
                ]
                for r in rows
            ],
        )
    )
    for r in rows:
        if args.query_id and r["error"]:
            print(f"\n{r['status']}: {r['error']['message']}")
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    from sealroom.output import render_result, result_document

    with _client(args) as c:
        result = c.result(args.query_id)
    if args.json:
        _emit(result_document(result))
    else:
        print(render_result(result))
    return EXIT_OK if result.status == "released" else EXIT_FAILED


# -- owner: manual approvals --------------------------------------------------------------------


def _agent(args: argparse.Namespace) -> str:
    address = args.agent or os.environ.get("SEALROOM_PARTY_AGENT")
    if not address:
        raise UsageError("give the party agent's address with --agent HOST:PORT (or set SEALROOM_PARTY_AGENT)")
    return _address(address, "party agent")


def _when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def cmd_pending(args: argparse.Namespace) -> int:
    from sealroom.rpc import call, open_channel
    from sealroom.v1 import common_pb2, party_pb2_grpc

    with open_channel(_agent(args)) as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = call("party agent", stub.GetInfo, common_pb2.Empty(), timeout=30)
        resp = call("party agent", stub.ListPending, common_pb2.Empty(), timeout=30)
    plans = [
        {
            "query_id": p.query_id,
            "plan_hash": p.plan_hash,
            "state": p.state,
            "analyst": p.analyst,
            "sql": p.sql,
            "sends": {i.dataset: list(i.columns) for i in p.inputs},
            "parties": list(p.parties),
            "min_group_size": p.min_group_size,
            "received_at": p.received_at,
            "expires_at": p.expires_at,
        }
        for p in resp.plans
    ]
    if args.json:
        _emit({"party": info.name, "plans": plans})
        return EXIT_OK
    if not plans:
        print(f"no plan awaits the decision of {info.name}'s owner")
        return EXIT_OK
    for p in plans:
        until = "the approval lapses" if p["state"] == "approved" else "forgotten if undecided"
        print(f"{p['query_id']}  [{p['state']}]  analyst {p['analyst']}  plan {p['plan_hash'][:16]}…")
        print(f"  sql: {p['sql']}")
        for dataset, columns in p["sends"].items():
            print(f"  {info.name} would send {dataset}: {', '.join(columns)}")
        print(f"  parties: {', '.join(p['parties'])}; min group size {p['min_group_size']}")
        print(f"  received {_when(p['received_at'])}; {until} {_when(p['expires_at'])}")
    return EXIT_OK


def _owner_command(args: argparse.Namespace, action: str) -> int:
    import time

    from sealroom.errors import ApprovalError
    from sealroom.keys import load_signing_key, public_key_hex
    from sealroom.plan import sign_owner_command
    from sealroom.rpc import call, open_channel
    from sealroom.v1 import common_pb2, party_pb2, party_pb2_grpc

    address = _agent(args)
    key_path = args.key or os.environ.get("SEALROOM_PARTY_KEY")
    if not key_path:
        raise UsageError(
            "give the party's signing key with --key PATH (as `sealroom party init` wrote it), or set "
            "SEALROOM_PARTY_KEY: the agent obeys only commands signed with its own key"
        )
    key = load_signing_key(Path(key_path))
    reason = getattr(args, "reason", "") or ""
    if action == "reject" and not reason.strip():
        raise UsageError("reject needs --reason TEXT (the analyst sees it)")
    with open_channel(address) as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = call("party agent", stub.GetInfo, common_pb2.Empty(), timeout=30)
        if bytes(info.signing_public_key).hex() != public_key_hex(key):
            raise ApprovalError(
                f"{key_path} is not the signing key of party agent {info.name} at {address}",
                details={"party": info.name, "check": "owner_command_signature"},
            )
        issued = int(time.time() * 1000)
        plan_hash = (args.plan_hash or "").lower()
        signature = sign_owner_command(
            key,
            action,
            party=info.name,
            query_id=args.query_id,
            issued_at_ms=issued,
            reason=reason,
            plan_hash=plan_hash,
        )
        command = party_pb2.OwnerCommand(
            query_id=args.query_id, reason=reason, plan_hash=plan_hash, issued_at_ms=issued, signature=signature
        )
        method = {"approve": stub.Approve, "reject": stub.Reject, "revoke": stub.Revoke}[action]
        resp = call("party agent", method, command, timeout=90)
    doc = {
        "query_id": resp.query_id,
        "party": info.name,
        "action": action,
        "plan_hash": resp.plan_hash,
        "state": resp.state,
        "expires_at": resp.expires_at or None,
        "query_status": resp.query_status,
        "awaiting": list(resp.awaiting),
    }
    if args.json:
        _emit(doc)
        return EXIT_OK
    done = {"approve": "approved", "reject": "rejected", "revoke": "revoked its approval of"}[action]
    print(f"{info.name} {done} query {resp.query_id} (plan {resp.plan_hash[:16]}…)")
    if action == "approve":
        print(f"  the approval lapses at {_when(resp.expires_at)} unless the query runs before")
    awaiting = f"; awaiting {', '.join(resp.awaiting)}" if resp.awaiting else ""
    print(f"  query status: {resp.query_status}{awaiting}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _owner_command(args, "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    return _owner_command(args, "reject")


def cmd_revoke(args: argparse.Namespace) -> int:
    return _owner_command(args, "revoke")


# -- demo and local -----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from sealroom.demo import run_demo

    doc = run_demo(
        scenario=args.scenario, state_dir=Path(args.state_dir) if args.state_dir else None, as_json=args.json
    )
    if args.json:
        _emit(doc)
    else:
        n = {s: sum(1 for q in doc["queries"] if q["status"] == s) for s in ("released", "refused", "failed")}
        print(
            f"demo done: {n['released']} released, {n['refused']} refused, {n['failed']} failed (simulated attestation)"
        )
    return EXIT_OK if all(q["status"] in ("released", "refused") for q in doc["queries"]) else EXIT_FAILED


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        parts = key.split(".")
        if not sep or not val or len(parts) != 2 or not all(p.isidentifier() for p in parts):
            raise UsageError(f"{flag} expects PARTY.NAME=VALUE with identifier names (got {v!r})")
        if key in out:
            raise UsageError(f"{flag} given twice for {key}")
        out[key] = val
    return out


def cmd_local(args: argparse.Namespace) -> int:
    from connectors.sources import open_source, resolve_spec
    from sealroom.demo import run_local
    from sealroom.errors import SealroomError
    from sealroom.policy import DatasetPolicy, load_policy_file

    datasets = _pairs(args.dataset, "--dataset")
    if not datasets:
        raise UsageError("give at least one --dataset PARTY.NAME=SOURCE")
    units = _pairs(args.privacy_unit, "--privacy-unit")
    policy_files = _pairs(args.policy, "--policy")
    if args.min_group_size < 1:
        raise UsageError("--min-group-size must be at least 1")
    policies = {}
    for qualified, source in datasets.items():
        datasets[qualified] = resolve_spec(source, Path.cwd())  # relative paths (sqlite:///b.db too)
        try:
            schema = open_source(datasets[qualified], dataset=qualified).schema
        except SealroomError as err:
            raise UsageError(err.message) from None
        if qualified in policy_files:
            if qualified in units:
                raise UsageError(
                    f"{qualified} has a --policy file; declare its privacy unit there, not with --privacy-unit"
                )
            try:
                policy = load_policy_file(Path(policy_files[qualified]))
            except SealroomError as err:
                raise UsageError(err.message) from None
        else:
            policy = DatasetPolicy(privacy_unit=units.get(qualified), min_group_size=args.min_group_size)
        unit = policy.privacy_unit
        if unit is not None and unit not in schema.names:
            raise UsageError(
                f"the privacy unit of {qualified} ({unit}) is not a column (columns: {', '.join(schema.names)})"
            )
        policies[qualified] = policy
    for flag, given in (("--privacy-unit", units), ("--policy", policy_files)):
        for qualified in given:
            if qualified not in datasets:
                raise UsageError(f"{flag} names {qualified}, which no --dataset defines")
    doc = run_local(
        datasets=datasets,
        sql=args.sql,
        policies=policies,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        as_json=args.json,
    )
    if args.json:
        _emit(doc)
    if doc["status"] != "released":
        reason = doc.get("reason", {}).get("message", doc["status"])
        print(f"sealroom local: {doc['status']}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# -- compliance: receipts and the audit log -----------------------------------------------------


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _ed25519_hex(value: str, flag: str) -> str:
    """An Ed25519 public key given as 64 hex characters, a signed-note verifier key (NAME+ID+KEY), a
    PEM public key, or a file holding one of these; returned as hex."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sealroom.tlog import NoteVerifier

    text = value.strip()
    if not (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)) and "+" not in text:
        text = _read_file(value, f"{flag} key").decode("utf-8", "replace").strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
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
            doc = tomllib.loads(_read_file(args.trust, "trust file").decode("utf-8"))
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


def _refusal(args: argparse.Namespace, err: Any) -> int:
    check = err.details.get("check", "")
    print(f"sealroom: refused ({check}): {err.message}", file=sys.stderr)
    if args.json:
        _emit({"verified": False, "check": check, "reason": err.to_dict()})
    return EXIT_FAILED


def cmd_receipt_verify(args: argparse.Namespace) -> int:
    from sealroom.errors import AuditError
    from sealroom.receipts import load_receipt, verify_receipt

    try:
        receipt = load_receipt(_read_file(args.file, "receipt"))
    except ValueError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    result = _read_file(args.result, "result file") if args.result else None
    key = _ed25519_hex(args.coordinator_key, "--coordinator-key") if args.coordinator_key else None
    appraisal = _receipt_appraisal(args)(receipt)
    try:
        out = verify_receipt(receipt, appraisal=appraisal, coordinator_key=key, result_bytes=result)
    except AuditError as err:
        return _refusal(args, err)
    warnings = _receipt_warnings(out, args)
    if args.json:
        _emit({**out.to_dict(), "warnings": warnings})
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
    from sealroom.errors import AuditError
    from sealroom.tlog import NoteVerifier, SignedCheckpoint

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
            witnesses.append(NoteVerifier(name, bytes.fromhex(_ed25519_hex(key, "--witness-key"))))
        except ValueError as exc:
            raise UsageError(f"--witness-key {name}: {exc}") from None
    quorum = getattr(args, "quorum", None)
    if quorum is not None and not 0 <= quorum <= len(witnesses):
        raise UsageError(f"--quorum must be between 0 and the number of --witness-key ({len(witnesses)})")
    trusted = []
    for path in getattr(args, "checkpoint", []):
        try:
            trusted.append(SignedCheckpoint.from_text(_read_file(path, "checkpoint")))
        except AuditError as err:
            raise UsageError(f"{path}: {err.message}") from None
    return {
        "log_key": _ed25519_hex(args.log_key, "--log-key") if args.log_key else None,
        "coordinator_key": _ed25519_hex(args.coordinator_key, "--coordinator-key")
        if getattr(args, "coordinator_key", None)
        else None,
        "witnesses": witnesses,
        "quorum": quorum,
        "trusted": trusted,
        "appraisal_for": _receipt_appraisal(args),
    }


def _verify_export(export: dict[str, Any], log_key_hex: str | None, opts: dict[str, Any]) -> Any:
    """verify_log over one export with the options; raises AuditError naming the first failure."""
    from sealroom.receipts import verify_receipt
    from sealroom.tlog import NoteVerifier, verify_log

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
    from sealroom.tlog import NoteVerifier, SQLiteLogStore, export_store

    try:
        vkey = NoteVerifier.from_vkey(_read_file(str(directory / "log.vkey"), "log key").decode("utf-8"))
        info = json.loads(_read_file(str(directory / "log.json"), "log description"))
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
    from sealroom.errors import AuditError
    from sealroom.tlog import load_export

    if bool(args.log) == bool(args.state_dir):
        raise UsageError("give either --log FILE (an exported log) or --state-dir DIR (a coordinator's state)")
    opts = _verify_options(args)
    warnings = []
    if opts["appraisal_for"]({}) is None and not args.allow_simulated:
        warnings.append("receipts' attestation evidence not appraised (give --trust, or --allow-simulated --dev-root)")
    if args.log:
        try:
            export = load_export(_read_file(args.log, "log"))
        except ValueError as exc:
            raise UsageError(f"{args.log}: {exc}") from None
        try:
            report = _verify_export(export, opts["log_key"], opts)
        except AuditError as err:
            return _refusal(args, err)
        if not report.log_key_pinned:
            warnings.insert(0, "log key not pinned (--log-key): the log is only self-consistent")
        if args.json:
            _emit({**report.to_dict(), "warnings": warnings})
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
                _emit(
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
        _emit(
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


def _iso(ts: Any) -> str:
    from datetime import UTC, datetime

    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _audit_releases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every release in the state dir's logs, described from its receipt, with its verification
    status: ``verified``, ``refused (CHECK)`` (its receipt), or ``log refused (CHECK)`` (the log)."""
    from sealroom.audit_events import query_history
    from sealroom.errors import AuditError
    from sealroom.receipts import verify_receipt
    from sealroom.tlog import receipt_sha256

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
    from sealroom.audit_events import notable_events

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
                    "executed_at": _iso(get(s, "result", "executed_at")),
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
            "logged_at": _iso(approved_at[(str(qid), str(a.get("party")))] / 1000)
            if (str(qid), str(a.get("party"))) in approved_at
            else None,
        }
        for a in listed(receipt.get("approvals"))
        if isinstance(a, dict)
    ]
    suppressed = [c for c in listed(get(receipt, "disclosure", "suppressed")) if isinstance(c, dict)]
    return {
        "query_id": qid,
        "released_at": _iso(get(receipt, "timestamps", "released_at")),
        "released_ts": get(receipt, "timestamps", "released_at"),
        "submitted_at": _iso(get(receipt, "timestamps", "submitted_at")),
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
        _emit(
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
        from sealroom.audit_events import query_history

        history = []
        for directory in _state_logs(args.state_dir):
            export, _ = _load_state_log(directory)
            history += [{**h, "log": export["origin"]} for h in query_history(export, args.release_id)]
        print(f"sealroom: no release {args.release_id} in the logs under {args.state_dir}", file=sys.stderr)
        if args.json:
            _emit({"found": False, "query_id": args.release_id, "history": history})
        elif history:
            print(f"query {args.release_id} was not released; the log records:")
            for h in history:
                print(f"  {h['time']}  entry {h['entry']}: {h['text']}")
        return EXIT_FAILED
    r = found[-1]
    r = {k: v for k, v in r.items() if k != "released_ts"}
    if args.json:
        _emit(r)
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


HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.25em .5em;"
    "text-align:left;vertical-align:top}pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}"
    ".ok{color:#065f46;font-weight:bold}.bad{color:#b91c1c;font-weight:bold}.sim{color:#92400e}"
    "section{border-top:2px solid #ddd;margin-top:1.5em}"
)


def audit_html(
    releases: list[dict[str, Any]], logs: list[dict[str, Any]], events: list[dict[str, Any]] | None = None
) -> str:
    """One self-contained HTML page (no script, no external resource); every value is escaped.
    ``events``: the refused queries and withdrawn approvals (``_audit_events``)."""
    from html import escape

    def e(v: Any) -> str:
        return escape("" if v is None else str(v), quote=True)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Sealroom audit report</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>Sealroom audit report</h1>",
        "<h2>Logs</h2><table><tr><th>log</th><th>directory</th><th>entries</th><th>status</th></tr>",
    ]
    for lg in logs:
        cls = "ok" if lg["status"] == "verified" else "bad"
        parts.append(
            f"<tr><td>{e(lg['origin'])}</td><td>{e(lg['directory'])}</td><td>{e(lg['entries'])}</td>"
            f'<td class="{cls}">{e(lg["status"])}</td></tr>'
        )
    parts.append("</table>")
    parts.append(f"<h2>Releases ({len(releases)})</h2>")
    for r in releases:
        cls = "ok" if r["status"] == "verified" else "bad"
        parts.append(f'<section id="{e(r["query_id"])}"><h3>Release {e(r["query_id"])}</h3>')
        parts.append(f'<p>Verification: <span class="{cls}">{e(r["status"])}</span>')
        if r["simulated"]:
            parts.append(' &mdash; <span class="sim">SIMULATED attestation: no TEE protected this release</span>')
        parts.append("</p><table>")
        for label, value in (
            ("analyst", r["analyst"]),
            ("submitted", r["submitted_at"]),
            ("released", r["released_at"]),
            ("parties", ", ".join(r["parties"])),
            ("datasets", ", ".join(r["datasets"])),
            ("plan hash", r["plan_hash"]),
            ("released rows", r["rows"]),
            ("columns", ", ".join(map(str, r["columns"] or []))),
            ("result sha256", r["result_sha256"]),
            ("log entry", f"{r['log']} #{r['entry']}"),
        ):
            parts.append(f"<tr><th>{e(label)}</th><td>{e(value)}</td></tr>")
        parts.append(f"</table><h4>Query</h4><pre>{e(str(r['sql']).strip())}</pre>")
        parts.append("<h4>Approvals</h4><table><tr><th>party</th><th>public key</th><th>logged</th></tr>")
        for a in r["approvals"]:
            parts.append(f"<tr><td>{e(a['party'])}</td><td>{e(a['public_key'])}</td><td>{e(a['logged_at'])}</td></tr>")
        parts.append("</table><h4>Execution</h4><table>")
        for s in r["stages"]:
            if s["kind"] == "tee":
                sim = " (SIMULATED)" if s["simulated"] else ""
                parts.append(
                    f"<tr><th>stage {e(s['id'])}: enclave</th><td>platform {e(s['platform'])}{e(sim)}<br>"
                    f"measurement {e(s['measurement'])}<br>evidence sha256 {e(s['evidence_sha256'])}<br>"
                    f"executed {e(s['executed_at'])}</td></tr>"
                )
            else:
                parts.append(
                    f"<tr><th>stage {e(s['id'])}: MPC</th><td>players {e(', '.join(map(str, s['players'])))}<br>"
                    f"threshold {e(s['threshold'])}<br>trust assumption: {e(s['trust_assumption'])}</td></tr>"
                )
        parts.append("</table><h4>Suppressed cells</h4>")
        if not r["suppressed"]:
            parts.append("<p>none</p>")
        else:
            parts.append("<table><tr><th>stage</th><th>cell</th><th>rule</th><th>reason</th></tr>")
            for c in r["suppressed"]:
                group = ", ".join(f"{k}={v}" for k, v in (c.get("group") or {}).items())
                parts.append(
                    f"<tr><td>{e(c.get('stage'))}</td><td>{e(group)}</td><td>{e(c.get('rule'))}</td>"
                    f"<td>{e(c.get('reason'))}</td></tr>"
                )
            parts.append("</table>")
        parts.append("<h4>Log history</h4><table><tr><th>entry</th><th>logged (UTC)</th><th>event</th></tr>")
        for h in r.get("history", []):
            parts.append(f"<tr><td>{e(h['entry'])}</td><td>{e(h['time'])}</td><td>{e(h['text'])}</td></tr>")
        parts.append("</table>")
        parts.append("</section>")
    if events is not None:
        parts.append(f'<section id="withdrawals"><h2>Refused queries and withdrawn approvals ({len(events)})</h2>')
        if not events:
            parts.append("<p>none</p>")
        else:
            parts.append(
                "<table><tr><th>query</th><th>logged (UTC)</th><th>event</th><th>party</th><th>analyst</th>"
                "<th>rule</th><th>what</th><th>log entry</th></tr>"
            )
            for ev in events:
                parts.append(
                    f"<tr><td>{e(ev['query_id'])}</td><td>{e(ev['time'])}</td><td>{e(ev['type'])}</td>"
                    f"<td>{e(ev['party'])}</td><td>{e(ev['analyst'])}</td><td>{e(ev['rule'])}</td>"
                    f"<td>{e(ev['text'])}</td><td>{e(ev['log'])} #{e(ev['entry'])}</td></tr>"
                )
            parts.append("</table>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def cmd_audit_export(args: argparse.Namespace) -> int:
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
        _emit(summary)
    return EXIT_OK


def cmd_audit_ropa(args: argparse.Namespace) -> int:
    """The record of processing of every coordinator under --state-dir (sealroom.ropa)."""
    import sqlite3

    from sealroom.errors import AuditError, ConfigError
    from sealroom.ropa import (
        CoordinatorState,
        build_ropa,
        read_catalog,
        read_declaration,
        ropa_html,
        ropa_json,
        ropa_markdown,
    )

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
        _emit(
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


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealroom", description="Privacy-preserving joint analytics.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_json(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return sp

    def analyst(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--coordinator", help=f"coordinator address (env SEALROOM_COORDINATOR, default {DEFAULT_COORDINATOR})"
        )
        sp.add_argument(
            "--analyst",
            default=os.environ.get("SEALROOM_ANALYST", ""),
            help="your analyst name (checked against your token where the coordinator authenticates analysts)",
        )
        sp.add_argument("--token", help="your analyst token (env SEALROOM_TOKEN)")
        return with_json(sp)

    d = with_json(sub.add_parser("demo", help="run the whole platform on synthetic data"))
    d.add_argument("--scenario", choices=["bank", "hospital", "all"], default="all")
    d.add_argument("--state-dir", help="keep state, keys, configs and logs here (default: a temporary directory)")
    d.set_defaults(fn=cmd_demo)

    lo = with_json(sub.add_parser("local", help="run one query over your own files"))
    lo.add_argument("--dataset", action="append", default=[], metavar="PARTY.NAME=SOURCE")
    lo.add_argument("--privacy-unit", action="append", default=[], metavar="PARTY.NAME=COLUMN")
    lo.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="PARTY.NAME=FILE",
        help="the owner's TOML policy for a dataset (default: permissive apart from --min-group-size)",
    )
    lo.add_argument("--min-group-size", type=int, default=5)
    lo.add_argument("--state-dir")
    lo.add_argument("sql")
    lo.set_defaults(fn=cmd_local)

    for name, fn, helptext in (
        ("coordinator", cmd_coordinator_serve, "run the coordinator"),
        ("enclave", cmd_enclave_serve, "run an enclave worker"),
        ("party", cmd_party_serve, "run a data owner's party agent"),
    ):
        grp = sub.add_parser(name, help=helptext).add_subparsers(dest="action", required=True, metavar="ACTION")
        s = grp.add_parser("serve", help=helptext)
        s.add_argument("--config", required=True)
        s.add_argument("--port-file", help="write the bound port here once serving")
        s.set_defaults(fn=fn)
        if name == "enclave":
            m = with_json(grp.add_parser("measure", help="print the measurement a data owner pins"))
            m.add_argument("--config", required=True)
            m.set_defaults(fn=cmd_enclave_measure)
        if name == "party":
            i = with_json(grp.add_parser("init", help="create the owner's Ed25519 signing key"))
            i.add_argument("--key", required=True)
            i.add_argument("--force", action="store_true")
            i.set_defaults(fn=cmd_party_init)

    an = sub.add_parser("analyst", help="analyst credentials").add_subparsers(dest="action", required=True)
    at = with_json(an.add_parser("token", help="make an analyst token and the coordinator config line"))
    at.add_argument("name")
    at.set_defaults(fn=cmd_analyst_token)

    att = sub.add_parser("attest", help="attestation evidence").add_subparsers(dest="action", required=True)
    av = with_json(att.add_parser("verify", help="verify a platform's raw attestation evidence offline"))
    av.add_argument("--format", required=True, choices=["snp", "tdx", "sgx", "nitro"])
    av.add_argument("evidence", help="raw binary, hex or base64 file, as the platform publishes it")
    av.add_argument(
        "--cert", action="append", default=[], help="a certificate the evidence does not carry (SNP: VCEK, ASK)"
    )
    av.add_argument("--root", help="replace the built-in pinned root")
    av.add_argument("--at", help="verify as of this ISO-8601 time (test evidence has expired certificates)")
    av.add_argument("--allow-debug", action="store_true", help="accept evidence from a debug enclave")
    av.add_argument("--expect-measurement", metavar="HEX")
    av.add_argument(
        "--collateral",
        metavar="FILE_OR_DIR",
        help="Intel collateral for a tdx/sgx quote: a QuoteCollateralV3 JSON file, or a directory of PCS files "
        "(TCB info, QE identity, their issuer chain, PCK and root CA CRLs); its TCB status is then appraised",
    )
    av.add_argument(
        "--allow-out-of-date",
        action="store_true",
        help="with --collateral, accept a platform whose TCB status is OutOfDate (Revoked is always refused)",
    )
    av.set_defaults(fn=cmd_attest_verify)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="action", required=True)
    di = with_json(dev.add_parser("init", help="create the SIMULATED attestation dev root"))
    di.add_argument("--dir", default=str(Path.home() / ".sealroom" / "dev"))
    di.add_argument("--force", action="store_true")
    di.set_defaults(fn=cmd_dev_init)

    rc = sub.add_parser("receipt", help="release receipts").add_subparsers(dest="action", required=True)
    rv = with_json(rc.add_parser("verify", help="verify a release receipt offline"))
    rv.add_argument("file", help="the receipt (JSON)")
    rv.add_argument("--result", help="check that this result file (Arrow IPC stream) is the one released")
    rv.add_argument("--coordinator-key", metavar="HEX_OR_FILE", help="the coordinator's Ed25519 public key to pin")
    rv.add_argument("--trust", metavar="TOML", help="appraise the attestation evidence with this [trust] table")
    rv.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED evidence (no TEE)")
    rv.add_argument("--dev-root", metavar="CRT", help="the dev root certificate (with --allow-simulated)")
    rv.set_defaults(fn=cmd_receipt_verify)

    au = sub.add_parser("audit", help="the compliance reviewer's tools").add_subparsers(dest="action", required=True)
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

    reviewer(avf).set_defaults(fn=cmd_audit_verify)
    state_help = "a coordinator's state directory (or one above it, e.g. a demo's)"
    al = reviewer(with_json(au.add_parser("list", help="list releases with their verification status")))
    al.add_argument("--state-dir", required=True, help=state_help)
    al.add_argument("--since", metavar="ISO", help="only releases at or after this time (UTC unless it says)")
    al.add_argument("--dataset", metavar="PARTY.DATASET", help="only releases that read this dataset")
    al.add_argument("--analyst", metavar="NAME", help="only this analyst's releases")
    al.set_defaults(fn=cmd_audit_list)
    ash = reviewer(with_json(au.add_parser("show", help="one release in words")))
    ash.add_argument("release_id", help="the release's query id")
    ash.add_argument("--state-dir", required=True, help=state_help)
    ash.set_defaults(fn=cmd_audit_show)
    aex = reviewer(with_json(au.add_parser("export", help="export the log (json) or a self-contained report (html)")))
    aex.add_argument("--format", choices=["json", "html"], required=True)
    aex.add_argument("--state-dir", required=True, help=state_help)
    aex.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    aex.set_defaults(fn=cmd_audit_export)
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
    aro.set_defaults(fn=cmd_audit_ropa)

    analyst(sub.add_parser("datasets", help="list registered datasets")).set_defaults(fn=cmd_datasets)
    e = analyst(sub.add_parser("explain", help="show the plan for a query without running it"))
    e.add_argument("sql")
    e.set_defaults(fn=cmd_explain)
    s = analyst(sub.add_parser("submit", help="submit a query"))
    s.add_argument("sql")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--timeout", type=float, default=600.0)
    s.set_defaults(fn=cmd_submit)
    st = analyst(sub.add_parser("status", help="show a query's state (or all queries)"))
    st.add_argument("query_id", nargs="?")
    st.set_defaults(fn=cmd_status)
    r = analyst(sub.add_parser("result", help="print a query's released result"))
    r.add_argument("query_id")
    r.set_defaults(fn=cmd_result)

    def owner(sp: argparse.ArgumentParser, *, signed: bool = True) -> argparse.ArgumentParser:
        sp.add_argument("--agent", help="the party agent's address HOST:PORT (env SEALROOM_PARTY_AGENT)")
        if signed:
            sp.add_argument(
                "--key", help="the party's signing key, as `sealroom party init` wrote it (env SEALROOM_PARTY_KEY)"
            )
            sp.add_argument("query_id")
            sp.add_argument("--plan-hash", help="refuse unless the query's plan has this hash (or a 12+ hex prefix)")
        return with_json(sp)

    owner(sub.add_parser("pending", help="owner: list plans awaiting your decision"), signed=False).set_defaults(
        fn=cmd_pending
    )
    owner(sub.add_parser("approve", help="owner: approve a pending query")).set_defaults(fn=cmd_approve)
    rj = owner(sub.add_parser("reject", help="owner: reject a pending query"))
    rj.add_argument("--reason", required=True, help="why (the analyst sees it)")
    rj.set_defaults(fn=cmd_reject)
    owner(sub.add_parser("revoke", help="owner: revoke your approval before the query runs")).set_defaults(
        fn=cmd_revoke
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from sealroom.errors import SealroomError

    try:
        code = args.fn(args)
    except UsageError as err:
        print(f"sealroom: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except SealroomError as err:
        print(f"sealroom: {err.code}: {err.message}", file=sys.stderr)
        if getattr(args, "json", False):
            _emit(
                {
                    "status": "refused" if err.code in ("policy_refusal", "invalid_query") else "failed",
                    "reason": err.to_dict(),
                }
            )
        code = EXIT_USAGE if err.code == "config" else EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
