"""Claims that a real TEE platform's evidence carries, as its offline verifier returns them.

Each platform verifier (``snp``, ``tdx``, ``sgx``, ``nitro`` modules) parses raw evidence as the
platform publishes it, checks its certificate chain to pinned roots and its signatures at an
injectable time, and returns :class:`PlatformClaims`; it appraises nothing (debug, measurement
allowlists, TCB minimums and nonce binding are the relying party's policy). Every failure raises
:class:`~sealroom.errors.AttestationError` with ``details["check"]`` naming the failed check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509

HARDWARE_FORMATS = ("sev-snp", "tdx", "sgx", "nitro")
"""The evidence formats of real TEE platforms (each verified by its own module against pinned vendor roots)."""


@dataclass(frozen=True)
class PlatformClaims:
    platform: str  # "sev-snp" | "tdx" | "sgx" | "nitro"
    # The primary launch measurement, lowercase hex (SNP MEASUREMENT, TDX MRTD, SGX MRENCLAVE, Nitro PCR0).
    measurement: str
    measurements: Mapping[str, str] = field(default_factory=dict)  # every named one (RTMRs, MRSIGNER, PCRs...)
    debug: bool = False
    tcb: Mapping[str, int] = field(default_factory=dict)  # named security version numbers
    report_data: bytes = b""  # the bytes the guest bound into the evidence (SNP/TDX/SGX 64 bytes; Nitro user_data)
    nonce: bytes | None = None  # Nitro's nonce field; None for platforms without one
    issued_at: datetime | None = None  # Nitro's timestamp; None where the evidence carries no time
    details: Mapping[str, Any] = field(default_factory=dict)  # platform specifics for display (chip id, FMSPC...)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "measurement": self.measurement,
            "measurements": dict(self.measurements),
            "debug": self.debug,
            "tcb": dict(self.tcb),
            "report_data": self.report_data.hex(),
            "nonce": self.nonce.hex() if self.nonce is not None else None,
            "issued_at": self.issued_at.isoformat() if self.issued_at else None,
            "details": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.details.items()},
        }


def common_name(name: x509.Name) -> str:
    """The first common name of ``name`` (a certificate's subject or issuer), or ""."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
