"""Intel SGX: offline verification of a DCAP ECDSA enclave quote (version 3).

:func:`verify_sgx` parses an SGX quote v3 (TEE type 0, 384-byte enclave report) and verifies it with
:func:`sealroom.attestation.dcap.verify_quote`: the PCK chain embedded in the quote (certification
data type 5) ends at the pinned Intel SGX Root CA (``"root"``), each link and its validity at
``now`` (``"chain"``), the QE report signature by the PCK leaf and the quote signature by the
attestation key (``"signature"``), and the QE report's binding of the attestation key
(``"qe_binding"``). Quotes whose certification data carries no PCK chain (types 1-4) are refused
(``"format"``). It returns :class:`~sealroom.attestation.platform.PlatformClaims` and appraises
nothing (debug enclaves verify with ``debug=True``). Given ``collateral`` (TCB info, QE identity,
CRLs), it also evaluates it with :func:`sealroom.attestation.collateral.evaluate` and adds the TCB
status and advisories to the claims' details; without collateral, no TCB status, QE identity or
revocation is checked.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from sealroom.attestation import dcap
from sealroom.attestation.collateral import Collateral, evaluate
from sealroom.attestation.platform import PlatformClaims

__all__ = ["SGX", "SUPPORTED_VERSIONS", "verify_sgx", "quote_measurement", "quote_report_data"]

SGX = "sgx"
SUPPORTED_VERSIONS = frozenset({3})
_LABEL = "SGX"
_ATTR_DEBUG = 1 << 1
_MRENCLAVE = slice(0x40, 0x60)
_REPORT_DATA = slice(0x140, 0x180)


def verify_sgx(
    quote: bytes,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    now: datetime,
    collateral: Collateral | None = None,
) -> PlatformClaims:
    """Verify an SGX DCAP quote v3 at ``now`` (timezone-aware); return its claims.

    ``roots`` replaces the trust anchors (default: the bundled, pinned Intel SGX Root CA), for the
    quote's PCK chain and, when ``collateral`` is given, for the collateral's issuer chains and CRLs.
    """
    q = dcap.parse_and_verify(
        quote,
        label=_LABEL,
        version=3,
        tee_type=dcap.TEE_TYPE_SGX,
        body_size=dcap.SGX_REPORT_SIZE,
        roots=roots,
        now=now,
    )

    b = q.body
    attributes = b[0x30:0x40]
    flags = int.from_bytes(attributes[:8], "little")
    isv_prod_id, isv_svn = struct.unpack_from("<HH", b, 0x100)
    mrenclave, mrsigner = b[_MRENCLAVE], b[0x80:0xA0]
    details: dict[str, object] = {
        "version": q.version,
        "cpu_svn": b[0:16].hex(),
        "misc_select": int.from_bytes(b[16:20], "little"),
        "attributes": attributes.hex(),
        "qe_vendor_id": q.qe_vendor_id.hex(),
        "fmspc": dcap.pck_fmspc(q.pck_chain[0]),
        "quote_size": q.size,
    }
    if collateral is not None:
        details.update(evaluate(q, collateral, roots=roots, now=now).to_details())
    return PlatformClaims(
        platform=SGX,
        measurement=mrenclave.hex(),
        measurements={"mrenclave": mrenclave.hex(), "mrsigner": mrsigner.hex()},
        debug=bool(flags & _ATTR_DEBUG),
        tcb={"isv_svn": isv_svn, "isv_prod_id": isv_prod_id, "qe_svn": q.qe_svn, "pce_svn": q.pce_svn},
        report_data=b[_REPORT_DATA],
        details=details,
    )


def quote_measurement(quote: bytes) -> str:
    """The MRENCLAVE of an SGX quote, parsed but NOT verified: for an enclave naming its own measurement."""
    return _parse(quote).body[_MRENCLAVE].hex()


def quote_report_data(quote: bytes) -> bytes:
    """The REPORTDATA of an SGX quote, parsed but NOT verified: for an attester checking its request."""
    return _parse(quote).body[_REPORT_DATA]


def _parse(quote: bytes) -> dcap.Quote:
    return dcap.parse_quote(quote, label=_LABEL, version=3, tee_type=dcap.TEE_TYPE_SGX, body_size=dcap.SGX_REPORT_SIZE)
