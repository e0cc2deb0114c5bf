"""The attestation evidence envelope, normalised claims, and the report-data binding.

Evidence of every format travels in one envelope, :class:`Evidence` ``{format, evidence, aux,
nonce}``; a per-format verifier (see :mod:`sealroom.attestation.policy`) turns it into
:class:`Claims`, the platform-independent view that one appraisal checks against a relying party's
policy.

Everything here is public: evidence, claims, measurements and report data contain no secret and
may be logged or shown in error messages. A key is bound into evidence only through
:func:`report_data_for`, which hashes *public* keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sealroom.attestation.encoding import as_bytes, b64, b64decode_field, is_lower_hex, iso_utc, strict_json_object
from sealroom.canonical import canonical_json
from sealroom.errors import AttestationError

__all__ = [
    "SIMULATED",
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_BYTES",
    "MIN_NONCE_BYTES",
    "REPORT_DATA_BYTES",
    "Evidence",
    "Claims",
    "report_data_for",
]

SIMULATED = "simulated"
"""Format (and platform) name of software attestation signed by a dev root: no TEE at all."""

ENVELOPE_VERSION = 1
"""Version of the canonical envelope encoding produced by :meth:`Evidence.to_bytes`."""

MAX_ENVELOPE_BYTES = 1 << 20
"""Upper bound on an encoded envelope (real quotes with their certificate chains are ~10 KiB)."""

MIN_NONCE_BYTES = 16
"""A relying party's nonce must carry at least 128 bits, or freshness means little."""

REPORT_DATA_BYTES = 64
"""Report data is 64 bytes on every platform we target (SNP, TDX, SGX); simulated follows suit."""

_REPORT_DATA_TAG = b"sealroom/v1/report-data"
_ENVELOPE_KEYS = frozenset({"v", "format", "evidence", "aux", "nonce"})


@dataclass(frozen=True)
class Evidence:
    """Attestation evidence of one format, with what a verifier needs beside it.

    ``evidence`` is the format's signed object (simulated: signed report; SNP: the report; TDX: the
    quote; Nitro: the COSE_Sign1 document); ``aux`` carries what the format needs to verify it and
    does not embed (certificate chain, collateral); ``nonce`` is the relying party's challenge,
    repeated here for routing only: verifiers check the nonce that the evidence itself signs.
    """

    format: str
    evidence: bytes
    aux: bytes
    nonce: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.format, str):
            raise TypeError(f"format must be str, not {type(self.format).__name__}")
        if not self.format:
            raise ValueError("format must not be empty")
        for name in ("evidence", "aux", "nonce"):
            object.__setattr__(self, name, as_bytes(name, getattr(self, name)))

    def to_bytes(self) -> bytes:
        """Canonical encoding: sorted-key JSON ``{"aux","evidence","format","nonce","v"}``, base64 bytes."""
        return canonical_json(
            {
                "v": ENVELOPE_VERSION,
                "format": self.format,
                "evidence": b64(self.evidence),
                "aux": b64(self.aux),
                "nonce": b64(self.nonce),
            },
            allow_nan=False,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Evidence:
        """Parse an envelope; raises ``AttestationError(check="envelope")`` if it is malformed.

        Strict: exactly the five known keys, version 1, no duplicate keys, strict base64.
        """
        data = as_bytes("data", data)
        what = "attestation evidence envelope"
        if len(data) > MAX_ENVELOPE_BYTES:
            raise AttestationError(
                f"{what} is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit",
                details={"check": "envelope"},
            )
        obj = strict_json_object(data, what=what, check="envelope")
        keys = set(obj)
        if keys != _ENVELOPE_KEYS:
            missing = sorted(_ENVELOPE_KEYS - keys)
            unknown = sorted(keys - _ENVELOPE_KEYS)
            raise AttestationError(
                f"{what} must have exactly the keys {sorted(_ENVELOPE_KEYS)} (missing: {missing}, unknown: {unknown})",
                details={"check": "envelope"},
            )
        version = obj["v"]
        if type(version) is not int or version != ENVELOPE_VERSION:
            raise AttestationError(
                f"{what} has version {version!r}; this verifier reads version {ENVELOPE_VERSION} only",
                details={"check": "envelope"},
            )
        fmt = obj["format"]
        if not isinstance(fmt, str) or not fmt:
            raise AttestationError(f"{what}: 'format' must be a non-empty string", details={"check": "envelope"})
        return cls(
            format=fmt,
            evidence=b64decode_field(obj, "evidence", what=what, check="envelope"),
            aux=b64decode_field(obj, "aux", what=what, check="envelope"),
            nonce=b64decode_field(obj, "nonce", what=what, check="envelope"),
        )

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes` (32 bytes); the evidence hash bound into sealed streams."""
        return hashlib.sha256(self.to_bytes()).digest()


def freeze_tcb(tcb: Mapping[str, int], *, name: str = "tcb") -> Mapping[str, int]:
    """A read-only, key-sorted copy of a TCB mapping (component name -> non-negative security version)."""
    if not isinstance(tcb, Mapping):
        raise TypeError(f"{name} must be a mapping of str to int, not {type(tcb).__name__}")
    out: dict[str, int] = {}
    for key, value in tcb.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty str, got {key!r}")
        if type(value) is not int:
            raise TypeError(f"{name}[{key!r}] must be int, not {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}[{key!r}] must be >= 0, got {value}")
        out[key] = value
    return MappingProxyType(dict(sorted(out.items())))


@dataclass(frozen=True)
class Claims:
    """What verified evidence says, normalised across platforms. Returned only by a full verify."""

    platform: str
    measurement: str
    debug: bool
    tcb: Mapping[str, int]
    report_data: bytes
    nonce: bytes
    issued_at: datetime
    simulated: bool
    # Every named measurement the platform reports (TDX RTMRs, SNP HOST_DATA, Nitro PCRs...), hex.
    measurements: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.platform, str) or not self.platform:
            raise ValueError("platform must be a non-empty str")
        if not isinstance(self.measurement, str) or not is_lower_hex(self.measurement):
            raise ValueError("measurement must be a non-empty, even-length lowercase hex string")
        if type(self.debug) is not bool or type(self.simulated) is not bool:
            raise TypeError("debug and simulated must be bool")
        object.__setattr__(self, "tcb", freeze_tcb(self.tcb))
        report_data = as_bytes("report_data", self.report_data)
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")
        object.__setattr__(self, "report_data", report_data)
        object.__setattr__(self, "nonce", as_bytes("nonce", self.nonce))
        if not isinstance(self.issued_at, datetime) or self.issued_at.utcoffset() is None:
            raise ValueError("issued_at must be a timezone-aware datetime")
        object.__setattr__(self, "issued_at", self.issued_at.astimezone(UTC))
        if not isinstance(self.measurements, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.measurements.items()
        ):
            raise TypeError("measurements must map names to hex strings")
        object.__setattr__(self, "measurements", MappingProxyType(dict(sorted(self.measurements.items()))))

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as lowercase hex, time as ISO 8601 UTC with ``Z``)."""
        return {
            "platform": self.platform,
            "measurement": self.measurement,
            "debug": self.debug,
            "tcb": dict(self.tcb),
            "report_data": self.report_data.hex(),
            "nonce": self.nonce.hex(),
            "issued_at": iso_utc(self.issued_at),
            "simulated": self.simulated,
            **({"measurements": dict(self.measurements)} if self.measurements else {}),
        }


def _len_prefixed(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def report_data_for(
    *, hpke_public_key: bytes, signing_public_key: bytes, nonce: bytes, tls_key_sha256: bytes | None = None
) -> bytes:
    """The 64 bytes an enclave puts in its evidence to bind its job keys to a relying party's nonce.

    ``SHA-512(b"sealroom/v1/report-data" || u32be(len(hpke)) || hpke || u32be(len(sig)) || sig ||
    u32be(len(nonce)) || nonce [|| u32be(32) || tls_key_sha256])``, with the keys in their raw public
    encodings. ``tls_key_sha256`` (the SHA-256 of the enclave's TLS certificate's SubjectPublicKeyInfo)
    is an optional fourth part: without it the value is what it always was (stored receipts verify).
    """
    parts = {
        "hpke_public_key": as_bytes("hpke_public_key", hpke_public_key),
        "signing_public_key": as_bytes("signing_public_key", signing_public_key),
        "nonce": as_bytes("nonce", nonce),
    }
    if tls_key_sha256 is not None:
        parts["tls_key_sha256"] = as_bytes("tls_key_sha256", tls_key_sha256)
        if len(parts["tls_key_sha256"]) != 32:
            raise ValueError("tls_key_sha256 must be a SHA-256 digest (32 bytes)")
    for name, value in parts.items():
        if not value:
            raise ValueError(f"{name} must not be empty")
    h = hashlib.sha512(_REPORT_DATA_TAG)
    for value in parts.values():
        h.update(_len_prefixed(value))
    return h.digest()
