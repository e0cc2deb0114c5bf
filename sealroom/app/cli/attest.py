from __future__ import annotations

import argparse
import sys
from typing import Any

from sealroom.app.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, emit, read_file


def cmd_attest_verify(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from sealroom.attestation.offline import decode_evidence, load_certificate, verify_platform_evidence

    def cert(path: str, what: str) -> Any:
        try:
            return load_certificate(
                decode_evidence(read_file(path, what)) if not path.endswith(".pem") else read_file(path, what)
            )
        except ValueError:
            raise UsageError(f"{path} is not a PEM or DER certificate") from None

    evidence = decode_evidence(read_file(args.evidence, "evidence"))
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
            emit({"verified": False, "check": check, "reason": err.to_dict()})
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
