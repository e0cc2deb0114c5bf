"""Attestation on the command line: verify a platform's raw evidence offline (SEV-SNP, TDX, SGX,
Nitro), and create the SIMULATED dev root that development platforms attest with.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from sealroom import pki
from sealroom.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    UsageError,
    add_command,
    emit,
    read_file,
    report_refusal,
    with_json,
)
from sealroom.attestation import dev_init
from sealroom.attestation.collateral import Collateral, load_collateral
from sealroom.attestation.offline import decode_evidence, load_certificate, verify_platform_evidence
from sealroom.errors import AlreadyExistsError, AttestationError

DEV_DIR = Path.home() / ".sealroom" / "dev"


def add_parsers(sub: Subparsers) -> None:
    att = add_command(sub, "attest").add_subparsers(dest="action", required=True)
    av = with_json(att.add_parser("verify", help="verify a platform's raw attestation evidence offline"))
    av.add_argument("--format", required=True, choices=["snp", "tdx", "sgx", "nitro"])
    av.add_argument("evidence", help="raw binary, hex or base64 file, as the platform publishes it")
    av.add_argument(
        "--cert", action="append", default=[], help="a certificate the evidence does not carry (SNP: VCEK, ASK)"
    )
    av.add_argument("--root", help="replace the built-in pinned root")
    av.add_argument(
        "--at",
        help="verify as of this ISO-8601 time (default: now; recorded test evidence needs the time it was made)",
    )
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
    av.set_defaults(handler=cmd_attest_verify)

    dev = add_command(sub, "dev").add_subparsers(dest="action", required=True)
    di = with_json(dev.add_parser("init", help="create the SIMULATED attestation dev root and a development TLS CA"))
    di.add_argument("--dir", default=str(DEV_DIR))
    di.add_argument(
        "--party", action="append", default=[], metavar="NAME", help="also issue party NAME's TLS certificate"
    )
    di.add_argument("--force", action="store_true", help="replace what exists (every relying party must re-pin)")
    di.set_defaults(handler=cmd_dev_init)
    dc = with_json(dev.add_parser("cert", help="issue a TLS certificate from the development CA"))
    dc.add_argument("role", choices=("coordinator", "party"))
    dc.add_argument("name", nargs="?", help="the party's name (role party)")
    dc.add_argument("--dir", default=str(DEV_DIR))
    dc.add_argument("--force", action="store_true", help="replace an existing certificate")
    dc.set_defaults(handler=cmd_dev_cert)


def certificate(path: str, what: str) -> x509.Certificate:
    """A certificate file, PEM (``.pem``) or DER in raw, hex or base64 form."""
    raw = read_file(path, what)
    try:
        return load_certificate(raw if path.endswith(".pem") else decode_evidence(raw))
    except ValueError:
        raise UsageError(f"{path} is not a PEM or DER certificate") from None


def collateral_for(platform: str, path: str) -> Collateral:
    """Intel collateral for a ``tdx`` or ``sgx`` quote, from a file or a directory of PCS files."""
    if platform not in ("tdx", "sgx"):
        raise UsageError(f"--collateral applies to --format tdx or sgx, not {platform}")
    try:
        return load_collateral(path)
    except OSError as exc:
        raise UsageError(f"cannot read the collateral {path}: {exc.strerror}") from None
    except AttestationError as exc:
        raise UsageError(f"unusable collateral {path}: {exc.message}") from None


def verification_time(value: str) -> datetime:
    """``--at``: an ISO-8601 time, UTC unless it says otherwise."""
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at must be an ISO-8601 time such as 2023-09-18T12:00:00Z (got {value!r})") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def cmd_attest_verify(args: argparse.Namespace) -> int:
    evidence = decode_evidence(read_file(args.evidence, "evidence"))
    certificates = [certificate(c, "certificate") for c in args.cert]
    root = certificate(args.root, "root certificate") if args.root else None
    collateral = collateral_for(args.format, args.collateral) if args.collateral else None
    at = verification_time(args.at) if args.at else None
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
        check = report_refusal(err, as_json=args.json)
        # Evidence that does not parse is unusable input (2); evidence that parses and fails a check
        # is refused (1).
        return EXIT_USAGE if check == "format" else EXIT_FAILED
    if args.json:
        emit({"verified": True, "claims": claims.to_json_dict()})
    else:
        print(f"verified {claims.platform} evidence: measurement {claims.measurement}")
        print(f"  debug {claims.debug}; tcb {dict(claims.tcb)}; report data {claims.report_data.hex()[:32]}...")
        if "tcb_status" in claims.details:
            advisories = ", ".join(claims.details["advisory_ids"]) or "none"
            print(f"  TCB status {claims.details['tcb_status']} (advisories: {advisories})")
    return EXIT_OK


def cmd_dev_init(args: argparse.Namespace) -> int:
    identities = [pki.coordinator(), *(_party(name) for name in args.party)]
    root = dev_init(Path(args.dir), force=args.force)
    tls = pki.DevPKI(Path(args.dir) / "tls")
    tls.ca(force=args.force)
    certs = {str(i): _issue(tls, i, force=args.force) for i in identities}
    if args.json:
        emit(
            {
                "simulated": True,
                "dev_root": str(root.cert_path),
                "key": str(root.key_path),
                "tls": {"ca": str(tls.ca_cert), "certificates": certs},
            }
        )
        return EXIT_OK
    print(f"wrote the SIMULATED dev attestation root: {root.cert_path} (and its key {root.key_path})")
    print("relying parties pin the .crt with trust.dev_root and trust.allow_simulated = true")
    print(f"wrote a development TLS CA: {tls.ca_cert}; every component's [tls] ca, and analysts' --ca")
    for name, cert in certs.items():
        print(f"  {name}: [tls] cert = {cert['cert']}, key = {cert['key']}")
    return EXIT_OK


def cmd_dev_cert(args: argparse.Namespace) -> int:
    if args.role == "party" and not args.name:
        raise UsageError("dev cert party needs the party's NAME")
    identity = pki.coordinator() if args.role == "coordinator" else _party(args.name)
    tls = pki.DevPKI(Path(args.dir) / "tls")
    cert = _issue(tls, identity, force=args.force)
    if args.json:
        emit({"identity": str(identity), "ca": str(tls.ca_cert), **cert})
        return EXIT_OK
    print(f"issued {identity}'s TLS certificate from {tls.ca_cert}: cert = {cert['cert']}, key = {cert['key']}")
    return EXIT_OK


def _party(name: str) -> pki.Identity:
    if not name.isidentifier():
        raise UsageError(f"a party name is an identifier (letters, digits, _), e.g. bank_a (got {name!r})")
    return pki.party(name)


def _issue(tls: pki.DevPKI, identity: pki.Identity, *, force: bool) -> dict[str, str]:
    """Issue ``identity``'s certificate; an existing one is kept unless ``force`` (AlreadyExistsError)."""
    try:
        tls.issue(identity, force=force, exist_ok=False)
    except FileExistsError:
        raise AlreadyExistsError(
            f"{tls.cert(identity)} already exists: keep it, or pass --force to replace it",
            details={"file": str(tls.cert(identity))},
        ) from None
    return {"cert": str(tls.cert(identity)), "key": str(tls.key(identity))}
