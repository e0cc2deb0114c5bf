"""Strict encodings that the attestation formats share: JSON objects, base64, hex, times and DER.

Every decoder here trusts nothing it reads: a JSON object may not repeat a key (two parsers could
otherwise read two different documents from the same bytes), base64 is decoded strictly, and
concatenated DER certificates are split without trusting any length beyond the bytes at hand.
Nothing here verifies a signature or appraises a claim; the format modules do that.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sealroom.errors import AttestationError

__all__ = [
    "MAX_DER_CERTIFICATES",
    "as_bytes",
    "b64",
    "b64decode_field",
    "is_lower_hex",
    "iso_utc",
    "reject_duplicate_keys",
    "split_der_certificates",
    "strict_json_object",
]

MAX_DER_CERTIFICATES = 4
"""The most certificates an evidence envelope's ``aux`` may carry (a chain without its root)."""


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: ValueError on a repeated key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_json_object(data: bytes, *, what: str, check: str) -> dict[str, Any]:
    """Parse ``data`` as one UTF-8 JSON object without duplicate keys, or raise AttestationError."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AttestationError(
            f"{what} is not valid JSON ({exc}); it must be produced by the attester unchanged",
            details={"check": check},
        ) from None
    if not isinstance(obj, dict):
        raise AttestationError(f"{what} must be a JSON object", details={"check": check})
    return obj


def b64decode_field(obj: Mapping[str, Any], key: str, *, what: str, check: str) -> bytes:
    """The strictly base64-decoded string ``obj[key]``, or AttestationError."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise AttestationError(f"{what}: field {key!r} must be a base64 string", details={"check": check})
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise AttestationError(f"{what}: field {key!r} is not valid base64", details={"check": check}) from None


def b64(data: bytes) -> str:
    """Standard base64 of ``data``, as ASCII text."""
    return base64.b64encode(data).decode("ascii")


def as_bytes(name: str, value: object) -> bytes:
    """``value`` as bytes (bytes, bytearray or memoryview), or TypeError naming the argument."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def is_lower_hex(value: str) -> bool:
    """A non-empty, even-length string of lowercase hex digits."""
    return bool(value) and len(value) % 2 == 0 and all(c in "0123456789abcdef" for c in value)


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a ``Z``: ``2026-01-02T03:04:05.000006Z``."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def split_der_certificates(data: bytes) -> list[bytes]:
    """Split concatenated DER certificates (each an ASN.1 SEQUENCE) without trusting any length.

    ValueError when ``data`` is empty, is not a sequence of complete DER SEQUENCEs, or holds more
    than :data:`MAX_DER_CERTIFICATES`.
    """
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(out) == MAX_DER_CERTIFICATES:
            raise ValueError(f"more than {MAX_DER_CERTIFICATES} certificates")
        if pos + 2 > len(data) or data[pos] != 0x30:
            raise ValueError("not a DER SEQUENCE")
        first = data[pos + 1]
        header = 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + 2 + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
            header += n
        end = pos + header + length
        if end > len(data):
            raise ValueError("truncated DER")
        out.append(data[pos:end])
        pos = end
    if not out:
        raise ValueError("no certificate")
    return out
