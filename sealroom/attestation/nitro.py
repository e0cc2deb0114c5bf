"""Offline verifier for AWS Nitro Enclaves attestation documents.

An attestation document is a COSE_Sign1 structure (RFC 9052), optionally under CBOR tag 18::

    [protected: bstr .cbor {1: -35}, unprotected: {}, payload: bstr .cbor AttestationDoc, signature: bstr]

The payload map carries ``module_id``, ``digest`` ("SHA384"), ``timestamp`` (ms since the epoch),
``pcrs`` ({index: digest}), ``certificate`` (the leaf, DER), ``cabundle`` (DER certificates, root
first) and optional ``public_key``, ``user_data`` and ``nonce``. :func:`verify_nitro` checks that
``cabundle[0]`` is a pinned root (by default the bundled AWS Nitro Enclaves Root G1, itself pinned by
its SHA-256 fingerprint), that every following certificate and the leaf are signed by the one before
and valid at ``now`` (default: the document's own timestamp), and that the ES384 signature (raw
``r || s``) over ``["Signature1", protected, b"", payload]`` verifies under the leaf's key. It
returns :class:`~sealroom.attestation.platform.PlatformClaims` and appraises nothing: debug mode,
PCR allowlists and nonce binding are the relying party's policy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealroom.attestation import cbor
from sealroom.attestation.platform import PlatformClaims
from sealroom.errors import AttestationError

__all__ = [
    "document_measurement",
    "document_user_data",
    "AWS_NITRO_ROOT_G1_FILE",
    "AWS_NITRO_ROOT_G1_SHA256",
    "MAX_DOCUMENT_BYTES",
    "aws_nitro_root_g1",
    "verify_nitro",
]

AWS_NITRO_ROOT_G1_FILE = Path(__file__).parent / "roots" / "aws_nitro_root_g1.pem"
# SHA-256 of the DER of AWS Nitro Enclaves Root G1 (CN=aws.nitro-enclaves), as AWS publishes it.
AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
MAX_DOCUMENT_BYTES = 64 * 1024
ES384 = -35
_MAX_CABUNDLE = 8
_P384_COORD = 48
_B64_RE = re.compile(rb"[A-Za-z0-9+/=\s]+")


def _fail(message: str, check: str) -> AttestationError:
    return AttestationError(message, details={"check": check})


@lru_cache(maxsize=1)
def aws_nitro_root_g1() -> x509.Certificate:
    """The bundled AWS Nitro Enclaves Root G1, refused unless its fingerprint matches the pin."""
    cert = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_G1_FILE.read_bytes())
    if cert.fingerprint(hashes.SHA256()).hex() != AWS_NITRO_ROOT_G1_SHA256:
        raise _fail("the bundled AWS Nitro root certificate does not match its pinned fingerprint", "root")
    return cert


def _raw_document(document: bytes) -> bytes:
    if not isinstance(document, (bytes, bytearray, memoryview)):
        raise _fail("a Nitro attestation document must be bytes", "format")
    raw = bytes(document)
    if len(raw) > MAX_DOCUMENT_BYTES * 2:
        raise _fail("the Nitro attestation document is too large", "format")
    # Raw COSE_Sign1 starts with 0x84 (array of 4) or 0xD2 (tag 18); base64 text never does.
    if raw[:1] not in (b"\x84", b"\xd2") and raw and _B64_RE.fullmatch(raw):
        try:
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _fail("the Nitro attestation document is neither CBOR nor valid base64", "format") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _fail("the Nitro attestation document is too large", "format")
    return raw


def _field(payload: dict[Any, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in payload or (optional and payload[name] is None):
        if optional:
            return None
        raise _fail(f"the Nitro attestation document has no {name!r} field", "format")
    value = payload[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(f"the Nitro attestation document's {name!r} field has the wrong type", "format")
    return value


def _load_cert(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise _fail(f"the Nitro attestation document's {what} is not a DER certificate", "format") from exc


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _fail(f"the Nitro {what} certificate is not valid at the verification time", "chain")


def _check_chain(
    leaf: x509.Certificate, bundle: list[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> None:
    pinned = {r.fingerprint(hashes.SHA256()) for r in roots}
    if bundle[0].fingerprint(hashes.SHA256()) not in pinned:
        raise _fail("the Nitro attestation document's CA bundle does not start at a pinned root", "root")
    _check_validity(bundle[0], now, "root")
    chain = [*bundle, leaf]
    for index in range(1, len(chain)):
        issuer, subject = chain[index - 1], chain[index]
        what = "leaf" if index == len(chain) - 1 else f"CA bundle entry {index}"
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound as exc:
            raise _fail(f"the issuer of the Nitro {what} certificate is not a CA", "chain") from exc
        if not constraints.ca:
            raise _fail(f"the issuer of the Nitro {what} certificate is not a CA", "chain")
        try:
            subject.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise _fail(f"the Nitro {what} certificate is not signed by the certificate before it", "chain") from exc
        _check_validity(subject, now, what)


def _check_signature(leaf: x509.Certificate, protected: bytes, payload: bytes, signature: bytes) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise _fail("the Nitro leaf certificate does not hold a P-384 key", "signature")
    if len(signature) != 2 * _P384_COORD:
        raise _fail("the Nitro attestation signature is not a 96-byte ES384 signature", "signature")
    r = int.from_bytes(signature[:_P384_COORD], "big")
    s = int.from_bytes(signature[_P384_COORD:], "big")
    to_be_signed = cbor.dumps(["Signature1", protected, b"", payload])
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise _fail("the Nitro attestation document's signature does not verify", "signature") from exc


def _decode(document: bytes) -> tuple[bytes, bytes, bytes, dict[Any, Any]]:
    """A COSE_Sign1 attestation document's (protected header, payload bytes, signature, payload map)."""
    raw = _raw_document(document)
    try:
        outer = cbor.loads(raw)
    except cbor.CBORError as exc:
        raise _fail(f"the Nitro attestation document is not well-formed CBOR: {exc}", "format") from exc
    if isinstance(outer, cbor.Tagged):
        outer = outer.value
    if not (isinstance(outer, list) and len(outer) == 4):
        raise _fail("the Nitro attestation document is not a COSE_Sign1 array of four items", "format")
    protected, unprotected, payload_bytes, signature = outer
    if not (
        isinstance(protected, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload_bytes, bytes)
        and isinstance(signature, bytes)
    ):
        raise _fail("the Nitro attestation document's COSE_Sign1 items have the wrong types", "format")
    try:
        header = cbor.loads(protected)
        payload = cbor.loads(payload_bytes)
    except cbor.CBORError as exc:
        raise _fail(f"the Nitro attestation document's header or payload is not CBOR: {exc}", "format") from exc
    if header != {1: ES384}:
        raise _fail("the Nitro attestation document's protected header is not exactly {alg: ES384}", "format")
    if not isinstance(payload, dict):
        raise _fail("the Nitro attestation document's payload is not a map", "format")
    return protected, payload_bytes, signature, payload


def document_measurement(document: bytes) -> str:
    """PCR0 of a Nitro attestation document, parsed but NOT verified: for an enclave naming its own."""
    _, _, _, payload = _decode(document)
    pcrs = _field(payload, "pcrs", dict)
    pcr0 = pcrs.get(0)
    if not isinstance(pcr0, bytes) or not pcr0:
        raise _fail("the Nitro attestation document has no PCR0", "format")
    return pcr0.hex()


def document_user_data(document: bytes) -> bytes:
    """The ``user_data`` of a Nitro attestation document (``b""`` when absent), parsed but NOT verified:
    for an attester checking that the platform answered its request."""
    _, _, _, payload = _decode(document)
    user_data = payload.get("user_data")
    return user_data if isinstance(user_data, bytes) else b""


def verify_nitro(
    document: bytes,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    now: datetime | None = None,
) -> PlatformClaims:
    """Verify a Nitro attestation document (raw CBOR or base64 of it) and return its claims.

    ``roots`` replaces the pinned AWS Nitro Root G1; ``now`` (timezone-aware) is when the chain must
    be valid, by default the document's own timestamp. Raises :class:`AttestationError` with
    ``details["check"]`` in ``format``, ``root``, ``chain`` or ``signature``.
    """
    protected, payload_bytes, signature, payload = _decode(document)

    module_id = _field(payload, "module_id", str)
    if not module_id:
        raise _fail("the Nitro attestation document's module_id is empty", "format")
    if _field(payload, "digest", str) != "SHA384":
        raise _fail("the Nitro attestation document's digest is not SHA384", "format")
    timestamp_ms = _field(payload, "timestamp", int)
    if not 0 < timestamp_ms < 2**53:
        raise _fail("the Nitro attestation document's timestamp is out of range", "format")
    pcrs = _field(payload, "pcrs", dict)
    if not pcrs or len(pcrs) > 32:
        raise _fail("the Nitro attestation document's PCR map is empty or too large", "format")
    for index, value in pcrs.items():
        if not (isinstance(index, int) and 0 <= index < 32 and isinstance(value, bytes) and len(value) in (32, 48, 64)):
            raise _fail("the Nitro attestation document's PCR map has a malformed entry", "format")
    for required in (0, 1, 2):
        if required not in pcrs:
            raise _fail(f"the Nitro attestation document has no PCR{required}", "format")
    leaf_der = _field(payload, "certificate", bytes)
    cabundle = _field(payload, "cabundle", list)
    if not cabundle or len(cabundle) > _MAX_CABUNDLE or not all(isinstance(c, bytes) for c in cabundle):
        raise _fail("the Nitro attestation document's cabundle is not a short list of certificates", "format")
    public_key = _field(payload, "public_key", bytes, optional=True)
    user_data = _field(payload, "user_data", bytes, optional=True)
    nonce = _field(payload, "nonce", bytes, optional=True)

    issued_at = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    if now is None:
        now = issued_at
    elif now.tzinfo is None:
        raise _fail("the verification time must be timezone-aware", "chain")

    leaf = _load_cert(leaf_der, "leaf certificate")
    bundle = [_load_cert(der, "CA bundle entry") for der in cabundle]
    _check_chain(leaf, bundle, list(roots) if roots is not None else [aws_nitro_root_g1()], now)
    _check_signature(leaf, protected, payload_bytes, signature)

    measurements = {f"pcr{i}": pcrs[i].hex() for i in sorted(pcrs)}
    debug = all(not any(pcrs[i]) for i in (0, 1, 2))
    return PlatformClaims(
        platform="nitro",
        measurement=pcrs[0].hex(),
        measurements=measurements,
        debug=debug,
        report_data=user_data or b"",
        nonce=nonce,
        issued_at=issued_at,
        details={
            "module_id": module_id,
            "public_key_present": public_key is not None,
            "leaf_sha256": hashlib.sha256(leaf_der).hexdigest(),
        },
    )
