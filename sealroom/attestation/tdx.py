"""Intel TDX: offline verification of a DCAP ECDSA TD quote (versions 4 and 5).

:func:`verify_tdx` parses a TDX quote v4 (TEE type 0x81, 584-byte TD report body) or v5 (a body
descriptor, then a TD 1.0 report body, type 2, 584 bytes, or a TD 1.5 body, type 3, 648 bytes: the
1.0 body then TEE_TCB_SVN_2 and MRSERVICETD) and verifies it with
:func:`sealroom.attestation.dcap.verify_quote`: the PCK chain embedded in the quote (certification
data type 5 inside type 6) ends at the pinned Intel SGX Root CA (``"root"``), each link and its
validity at ``now`` (``"chain"``), the QE report signature by the PCK leaf and the quote signature by
the attestation key (``"signature"``), and the QE report's binding of the attestation key
(``"qe_binding"``). Zero padding after the quote is accepted; any other trailing byte is
``"format"``; an unknown v5 body type, or a size that does not match the type, is ``"format"``. It
returns :class:`~sealroom.attestation.platform.PlatformClaims` and appraises nothing (debug TDs
verify with ``debug=True``). Given ``collateral`` (TCB info, QE identity, CRLs), it also evaluates it
with :func:`sealroom.attestation.collateral.evaluate` and adds the TCB status and advisories to the
claims' details; without collateral, no TCB status, QE identity or revocation is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from sealroom.attestation import dcap
from sealroom.attestation.collateral import Collateral, evaluate
from sealroom.attestation.platform import PlatformClaims

__all__ = [
    "TDX",
    "SUPPORTED_VERSIONS",
    "BODY_TD10",
    "BODY_TD15",
    "parse_tdx_quote",
    "verify_tdx",
    "quote_measurement",
    "quote_report_data",
]

TDX = "tdx"
SUPPORTED_VERSIONS = frozenset({4, 5})
_LABEL = "TDX"
_TD_ATTR_DEBUG = 1 << 0

BODY_TD10 = 2  # quote v5 body type: TD 1.0 report body
BODY_TD15 = 3  # quote v5 body type: TD 1.5 report body
_V5_BODIES = {BODY_TD10: dcap.TDX_REPORT_SIZE, BODY_TD15: dcap.TDX_REPORT_SIZE + 16 + 48}

# TD report body field offsets and sizes (TD 1.0; TD 1.5 appends the last two).
_FIELDS: dict[str, tuple[int, int]] = {
    "tee_tcb_svn": (0, 16),
    "mrseam": (16, 48),
    "mrsignerseam": (64, 48),
    "seam_attributes": (112, 8),
    "td_attributes": (120, 8),
    "xfam": (128, 8),
    "mrtd": (136, 48),
    "mrconfigid": (184, 48),
    "mrowner": (232, 48),
    "mrownerconfig": (280, 48),
    "rtmr0": (328, 48),
    "rtmr1": (376, 48),
    "rtmr2": (424, 48),
    "rtmr3": (472, 48),
    "report_data": (520, 64),
}
_FIELDS_15: dict[str, tuple[int, int]] = {"tee_tcb_svn2": (584, 16), "mrservicetd": (600, 48)}
_MEASUREMENTS = (
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrseam",
    "mrsignerseam",
    "mrconfigid",
    "mrowner",
    "mrownerconfig",
)


def parse_tdx_quote(quote: bytes) -> dcap.Quote:
    """Parse (without verifying) a TDX quote v4 or v5; structural errors are ``"format"``."""
    raw, version = dcap.peek_version(quote, label=_LABEL)
    if version == 4:
        return dcap.parse_quote(
            raw, label=_LABEL, version=4, tee_type=dcap.TEE_TYPE_TDX, body_size=dcap.TDX_REPORT_SIZE
        )
    if version == 5:
        return dcap.parse_quote(raw, label=_LABEL, version=5, tee_type=dcap.TEE_TYPE_TDX, body_types=_V5_BODIES)
    if version is None:
        raise dcap.fail(_LABEL, "format", f"quote is {len(raw)} bytes, shorter than its header", length=len(raw))
    raise dcap.fail(_LABEL, "format", f"unsupported quote version {version}", version=version)


def verify_tdx(
    quote: bytes,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    now: datetime,
    collateral: Collateral | None = None,
) -> PlatformClaims:
    """Verify a TDX DCAP quote v4 or v5 at ``now`` (timezone-aware); return its claims.

    ``roots`` replaces the trust anchors (default: the bundled, pinned Intel SGX Root CA), for the
    quote's PCK chain and, when ``collateral`` is given, for the collateral's issuer chains and CRLs.
    """
    q = parse_tdx_quote(quote)
    dcap.verify_quote(q, roots=roots, now=now, label=_LABEL)

    fields = dict(_FIELDS) | (_FIELDS_15 if q.body_type == BODY_TD15 else {})
    f = {name: q.body[off : off + size] for name, (off, size) in fields.items()}
    td_attributes = int.from_bytes(f["td_attributes"], "little")
    tcb = {f"tee_tcb_svn_{i:02d}": b for i, b in enumerate(f["tee_tcb_svn"])}
    measurements = {name: f[name].hex() for name in _MEASUREMENTS}
    details: dict[str, object] = {
        "version": q.version,
        "tee_tcb_svn": f["tee_tcb_svn"].hex(),
        "td_attributes": f["td_attributes"].hex(),
        "seam_attributes": f["seam_attributes"].hex(),
        "xfam": f["xfam"].hex(),
        "qe_vendor_id": q.qe_vendor_id.hex(),
        "fmspc": dcap.pck_fmspc(q.pck_chain[0]),
        "quote_size": q.size,
    }
    if q.body_type is not None:
        details["body_type"] = q.body_type
    if q.body_type == BODY_TD15:
        tcb.update({f"tee_tcb_svn2_{i:02d}": b for i, b in enumerate(f["tee_tcb_svn2"])})
        measurements["mrservicetd"] = f["mrservicetd"].hex()
        details["tee_tcb_svn2"] = f["tee_tcb_svn2"].hex()
    tcb.update({"qe_svn": q.qe_svn, "pce_svn": q.pce_svn})
    if collateral is not None:
        details.update(evaluate(q, collateral, roots=roots, now=now).to_details())
    return PlatformClaims(
        platform=TDX,
        measurement=f["mrtd"].hex(),
        measurements=measurements,
        debug=bool(td_attributes & _TD_ATTR_DEBUG),
        tcb=tcb,
        report_data=f["report_data"],
        details=details,
    )


def quote_measurement(quote: bytes) -> str:
    """The MRTD of a TDX quote (v4 or v5), parsed but NOT verified: for an enclave naming its own measurement."""
    q = parse_tdx_quote(quote)
    off, size = _FIELDS["mrtd"]
    return q.body[off : off + size].hex()


def quote_report_data(quote: bytes) -> bytes:
    """The REPORTDATA of a TDX quote (v4 or v5), parsed but NOT verified: for an attester checking its request."""
    q = parse_tdx_quote(quote)
    off, size = _FIELDS["report_data"]
    return q.body[off : off + size]
