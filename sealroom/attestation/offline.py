"""Offline verification of a platform's raw evidence, as ``sealroom attest verify`` runs it.

Reads evidence as the platforms publish it (raw binary, hex or base64), verifies it with the
format's verifier at a chosen time, then appraises the claims with the simple policy a relying
party states on the command line: debug refused unless allowed, an expected measurement, and, for
TDX and SGX quotes given Intel collateral (:mod:`sealroom.attestation.collateral`), the TCB status:
``Revoked`` is always refused (by the evaluation itself), ``OutOfDate`` and
``OutOfDateConfigurationNeeded`` unless out-of-date platforms are allowed; the other statuses
(``UpToDate``, ``SWHardeningNeeded``, ``ConfigurationNeeded``, ``ConfigurationAndSWHardeningNeeded``)
are accepted and reported with their advisories.
"""

from __future__ import annotations

import base64
import binascii
import string
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from sealroom.attestation.collateral import Collateral, check_tcb_status
from sealroom.attestation.nitro import verify_nitro
from sealroom.attestation.platform import PlatformClaims, common_name
from sealroom.attestation.sgx import verify_sgx
from sealroom.attestation.snp import SIGNING_KEYS, verify_snp
from sealroom.attestation.tdx import verify_tdx
from sealroom.errors import AttestationError

FORMATS = ("snp", "tdx", "sgx", "nitro")


def decode_evidence(data: bytes) -> bytes:
    """Raw bytes as given, or the bytes a hex or base64 text file holds."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return data
    compact = "".join(text.split())
    if not compact:
        return data
    if len(compact) % 2 == 0 and all(c in string.hexdigits for c in compact):
        return bytes.fromhex(compact)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return data


def load_certificate(data: bytes) -> x509.Certificate:
    """A PEM or DER certificate (ValueError if it is neither)."""
    with warnings.catch_warnings():
        # AMD's VCEKs carry serial number 0, which cryptography warns about; the chain is still
        # verified link by link against the pinned root.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)


def verify_platform_evidence(
    fmt: str,
    evidence: bytes,
    *,
    certificates: Sequence[x509.Certificate] = (),
    root: x509.Certificate | None = None,
    at: datetime | None = None,
    allow_debug: bool = False,
    expect_measurement: str | None = None,
    collateral: Collateral | None = None,
    allow_out_of_date: bool = False,
) -> PlatformClaims:
    """Verify and appraise; AttestationError (with ``details["check"]``) when refused.

    ``collateral`` (TDX and SGX only; ValueError for other formats) is evaluated with the quote and
    its TCB status appraised: out-of-date statuses are refused (check ``"tcb_status"``) unless
    ``allow_out_of_date``.
    """
    if collateral is not None and fmt not in ("tdx", "sgx"):
        raise ValueError(f"collateral applies to tdx and sgx evidence, not {fmt}")
    if fmt == "snp":
        claims = verify_snp_with(evidence, certificates, roots=[root] if root is not None else None, now=at or _now())
    elif fmt in ("tdx", "sgx"):
        verify = verify_tdx if fmt == "tdx" else verify_sgx
        claims = verify(evidence, roots=[root] if root is not None else None, now=at or _now(), collateral=collateral)
    elif fmt == "nitro":
        claims = verify_nitro(evidence, roots=[root] if root is not None else None, now=at or _now())
    else:
        raise AttestationError(
            f"format {fmt!r} cannot be verified by this version (supported: {', '.join(FORMATS)})",
            details={"check": "format"},
        )
    if claims.debug and not allow_debug:
        raise AttestationError(
            "the evidence comes from a debug enclave, whose memory the host can read; refused (pass "
            "--allow-debug only to inspect test evidence)",
            details={"check": "debug"},
        )
    if expect_measurement is not None and claims.measurement != expect_measurement.lower():
        raise AttestationError(
            f"measurement {claims.measurement} is not the expected {expect_measurement.lower()}",
            details={"check": "measurement"},
        )
    if collateral is not None:
        check_tcb_status(claims.details, allow_out_of_date=allow_out_of_date, how_to_allow="--allow-out-of-date")
    return claims


def verify_snp_with(
    report: bytes,
    certificates: Sequence[x509.Certificate],
    *,
    roots: Sequence[x509.Certificate] | None,
    now: datetime,
) -> PlatformClaims:
    """Verify an SNP report with the certificates that came with it: exactly one VCEK or VLEK (by its
    subject, CN=SEV-VCEK or SEV-VLEK) and optionally the ASK (for a VLEK, the ASVK). ``roots``
    replaces the pinned AMD roots."""
    leaves = [c for c in certificates if common_name(c.subject) in SIGNING_KEYS.values()]
    # The intermediate (ASK "SEV-<Product>" or ASVK "SEV-VLEK-<Product>"), whatever the order the
    # certificates came in; a self-signed certificate (an ARK sent along) is not one.
    others = [
        c
        for c in certificates
        if common_name(c.subject).startswith("SEV-") and c not in leaves and c.issuer != c.subject
    ]
    if len(leaves) != 1:
        raise AttestationError(
            "an SNP report needs exactly one VCEK (or, for a VLEK-signed report, one VLEK and its ASVK) with it "
            "(pass it with --cert; AMD's KDS serves the VCEK for the chip and TCB)",
            details={"check": "chain"},
        )
    return verify_snp(report, vcek=leaves[0], ask=others[0] if others else None, roots=roots, now=now)


def _now() -> datetime:
    return datetime.now(UTC)
