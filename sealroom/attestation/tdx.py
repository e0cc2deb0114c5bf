"""Intel TDX: offline verification of a DCAP ECDSA TD quote (version 4).

:func:`verify_tdx` parses a TDX quote v4 (TEE type 0x81, 584-byte TD report body) and verifies it with
:func:`sealroom.attestation.dcap.verify_quote`: the PCK chain embedded in the quote (certification
data type 5 inside type 6) ends at the pinned Intel SGX Root CA (``"root"``), each link and its
validity at ``now`` (``"chain"``), the QE report signature by the PCK leaf and the quote signature by
the attestation key (``"signature"``), and the QE report's binding of the attestation key
(``"qe_binding"``). Zero padding after the quote is accepted; any other trailing byte is
``"format"``. It returns :class:`~sealroom.attestation.platform.PlatformClaims` and appraises nothing
(debug TDs verify with ``debug=True``; TCB info, QE identity and CRLs are not evaluated).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from sealroom.attestation import dcap
from sealroom.attestation.platform import PlatformClaims

__all__ = ["TDX", "SUPPORTED_VERSIONS", "verify_tdx", "quote_measurement"]

TDX = "tdx"
SUPPORTED_VERSIONS = frozenset({4})
_LABEL = "TDX"
_TD_ATTR_DEBUG = 1 << 0

# TD report body (quote v4) field offsets and sizes.
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


def verify_tdx(quote: bytes, *, roots: Sequence[x509.Certificate] | None = None, now: datetime) -> PlatformClaims:
    """Verify a TDX DCAP quote v4 at ``now`` (timezone-aware); return its claims.

    ``roots`` replaces the trust anchors (default: the bundled, pinned Intel SGX Root CA).
    """
    q = dcap.parse_and_verify(
        quote,
        label=_LABEL,
        version=4,
        tee_type=dcap.TEE_TYPE_TDX,
        body_size=dcap.TDX_REPORT_SIZE,
        roots=roots,
        now=now,
    )

    f = {name: q.body[off : off + size] for name, (off, size) in _FIELDS.items()}
    td_attributes = int.from_bytes(f["td_attributes"], "little")
    tcb = {f"tee_tcb_svn_{i:02d}": b for i, b in enumerate(f["tee_tcb_svn"])}
    tcb.update({"qe_svn": q.qe_svn, "pce_svn": q.pce_svn})
    return PlatformClaims(
        platform=TDX,
        measurement=f["mrtd"].hex(),
        measurements={name: f[name].hex() for name in _MEASUREMENTS},
        debug=bool(td_attributes & _TD_ATTR_DEBUG),
        tcb=tcb,
        report_data=f["report_data"],
        details={
            "version": q.version,
            "tee_tcb_svn": f["tee_tcb_svn"].hex(),
            "td_attributes": f["td_attributes"].hex(),
            "seam_attributes": f["seam_attributes"].hex(),
            "xfam": f["xfam"].hex(),
            "qe_vendor_id": q.qe_vendor_id.hex(),
            "fmspc": dcap.pck_fmspc(q.pck_chain[0]),
            "quote_size": q.size,
        },
    )


def quote_measurement(quote: bytes) -> str:
    """The MRTD of a TDX quote, parsed but NOT verified: for an enclave naming its own measurement."""
    q = dcap.parse_quote(quote, label=_LABEL, version=4, tee_type=dcap.TEE_TYPE_TDX, body_size=dcap.TDX_REPORT_SIZE)
    off, size = _FIELDS["mrtd"]
    return q.body[off : off + size].hex()
