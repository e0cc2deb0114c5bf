"""Intel DCAP ECDSA quotes (SGX quote v3, TDX quote v4): parsing and offline verification.

Shared by :mod:`sealroom.attestation.tdx` and :mod:`sealroom.attestation.sgx`. A quote is a 48-byte
header, a TEE-specific body (SGX: 384-byte enclave report; TDX: 584-byte TD report), a 4-byte
signature-data length and the ECDSA signature data: the quote signature (raw r||s, ECDSA
P-256/SHA-256 over header || body), the attestation public key (raw x||y), the Quoting Enclave's
report (384-byte SGX report body) and its signature by the PCK leaf, the QE authentication data, and
certification data of type 5 (PEM PCK chain, leaf -> intermediate -> root). In quote v4 the QE
report, its signature, the auth data and the inner certification data are wrapped in certification
data of type 6.

:func:`verify_quote` checks, in order: the chain's root is a pinned Intel SGX Root CA (SHA-256
fingerprint of the DER certificate; check ``"root"``), each link's ECDSA signature and each
certificate's validity at ``now`` (check ``"chain"``), the QE report signature by the PCK leaf
(``"signature"``), QE report_data[0:32] = SHA-256(attestation key || QE auth data) (``"qe_binding"``)
and the quote signature by the attestation key (``"signature"``). Malformed input is check
``"format"``. Collateral (TCB info, QE identity, CRLs) is not evaluated: that is appraisal.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealroom.errors import AttestationError

__all__ = [
    "HEADER_SIZE",
    "SGX_REPORT_SIZE",
    "TDX_REPORT_SIZE",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "PINNED_INTEL_ROOT_SHA256",
    "Quote",
    "bundled_intel_root",
    "fail",
    "fingerprint",
    "pck_fmspc",
    "parse_quote",
    "verify_quote",
]

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TDX_REPORT_SIZE = 584
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
_ATT_KEY_ECDSA_P256 = 2
_CERT_PCK_CHAIN = 5
_CERT_QE_REPORT = 6
_QE_REPORT_DATA_OFFSET = 320

# SHA-256 fingerprint (DER) of the Intel SGX Root CA, bundled as roots/intel_sgx_root_ca.pem.
PINNED_INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

_ROOTS_DIR = Path(__file__).parent / "roots"


def fail(label: str, check: str, message: str, **extra: object) -> AttestationError:
    return AttestationError(f"{label}: {message}", details={"check": check, **extra})


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@cache
def bundled_intel_root() -> x509.Certificate:
    """The pinned Intel SGX Root CA bundled in ``roots/``, checked against its pin."""
    cert = x509.load_pem_x509_certificate((_ROOTS_DIR / "intel_sgx_root_ca.pem").read_bytes())
    if fingerprint(cert) != PINNED_INTEL_ROOT_SHA256:
        raise fail("DCAP", "root", "bundled Intel SGX Root CA does not match its pinned fingerprint")
    return cert


@dataclass(frozen=True)
class Quote:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    header: bytes
    body: bytes
    signature: bytes  # raw r||s
    attestation_key: bytes  # raw x||y
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: tuple[x509.Certificate, ...]  # leaf first
    size: int  # bytes the structure uses (anything after must be zero padding)


class _Reader:
    def __init__(self, raw: bytes, start: int, end: int, label: str) -> None:
        self.raw, self.pos, self.end, self.label = raw, start, end, label

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise fail(self.label, "format", f"quote truncated in {what}", offset=self.pos)
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def _parse_pck_chain(data: bytes, label: str) -> tuple[x509.Certificate, ...]:
    text = data.rstrip(b"\x00")
    try:
        certs = x509.load_pem_x509_certificates(text)
    except ValueError as exc:
        raise fail(label, "format", f"PCK certificate chain is not valid PEM: {exc}") from None
    if len(certs) != 3:
        raise fail(label, "format", f"PCK chain has {len(certs)} certificates, expected 3 (leaf, CA, root)")
    return tuple(certs)


def parse_quote(quote: bytes, *, label: str, version: int, tee_type: int, body_size: int) -> Quote:
    """Parse a DCAP ECDSA quote of the given ``version``/``tee_type``; structural errors are ``"format"``."""
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise fail(label, "format", "quote must be bytes")
    raw = bytes(quote)
    if len(raw) < HEADER_SIZE:
        raise fail(label, "format", f"quote is {len(raw)} bytes, shorter than its header", length=len(raw))
    q_version, att_key_type, q_tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", raw, 0)
    if q_version != version:
        raise fail(label, "format", f"unsupported quote version {q_version}", version=q_version)
    if q_tee_type != tee_type:
        raise fail(label, "format", f"unexpected TEE type {q_tee_type:#x}", tee_type=q_tee_type)
    if att_key_type != _ATT_KEY_ECDSA_P256:
        raise fail(label, "format", f"unsupported attestation key type {att_key_type}")
    r = _Reader(raw, 0, len(raw), label)
    header = r.take(HEADER_SIZE, "header")
    body = r.take(body_size, "report body")
    sig_len = r.u32("signature data length")
    sig_end = r.pos + sig_len
    if sig_end > len(raw):
        raise fail(label, "format", "signature data length exceeds the quote", length=sig_len)
    r.end = sig_end
    signature = r.take(64, "quote signature")
    attestation_key = r.take(64, "attestation key")
    if version >= 4:
        outer_type = r.u16("certification data type")
        outer_size = r.u32("certification data size")
        if outer_type != _CERT_QE_REPORT:
            raise fail(label, "format", f"unsupported certification data type {outer_type}", cert_type=outer_type)
        if r.pos + outer_size != sig_end:
            raise fail(label, "format", "certification data size does not match the signature data length")
    qe_report = r.take(SGX_REPORT_SIZE, "QE report")
    qe_report_signature = r.take(64, "QE report signature")
    qe_auth_data = r.take(r.u16("QE auth data length"), "QE auth data")
    cert_type = r.u16("certification data type")
    cert_size = r.u32("certification data size")
    if cert_type != _CERT_PCK_CHAIN:
        raise fail(
            label,
            "format",
            f"certification data type {cert_type} carries no PCK certificate chain (only type 5 is supported)",
            cert_type=cert_type,
        )
    cert_data = r.take(cert_size, "certification data")
    if r.pos != sig_end:
        raise fail(label, "format", "signature data has trailing bytes", offset=r.pos)
    if any(raw[sig_end:]):
        raise fail(label, "format", "non-zero bytes after the quote", offset=sig_end, length=len(raw) - sig_end)
    return Quote(
        version=q_version,
        att_key_type=att_key_type,
        tee_type=q_tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=header[12:28],
        user_data=header[28:48],
        header=header,
        body=body,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain=_parse_pck_chain(cert_data, label),
        size=sig_end,
    )


def _p256_key(key: object, label: str, check: str, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise fail(label, check, f"{what} is not an ECDSA P-256 key")
    return key


def _verify_raw(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if r == 0 or s == 0:
        return False
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


_OID_SGX_EXTENSIONS = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_OID_FMSPC_DER = bytes.fromhex("2a864886f84d010d0104")  # 1.2.840.113741.1.13.1.4


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) TLVs directly inside ``data`` (definite lengths only); ValueError if malformed."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise ValueError("truncated DER")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise ValueError("truncated DER")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def pck_fmspc(leaf: x509.Certificate) -> str | None:
    """The FMSPC (hex) in the PCK leaf's Intel SGX extension, or None if absent or unreadable (display only)."""
    try:
        ext = leaf.extensions.get_extension_for_oid(_OID_SGX_EXTENSIONS).value
        if not isinstance(ext, x509.UnrecognizedExtension):
            return None
        (outer,) = _der_items(ext.value)
        for tag, content in _der_items(outer[1]) if outer[0] == 0x30 else []:
            if tag != 0x30:
                continue
            items = _der_items(content)
            if len(items) == 2 and items[0] == (0x06, _OID_FMSPC_DER) and items[1][0] == 0x04:
                return items[1][1].hex()
    except (ValueError, x509.ExtensionNotFound):
        return None
    return None


_NAMES = ("PCK leaf", "PCK CA", "root")


def _check_chain(
    chain: tuple[x509.Certificate, ...], roots: Sequence[x509.Certificate] | None, now: datetime, label: str
) -> None:
    root = chain[-1]
    anchors = [bundled_intel_root()] if roots is None else list(roots)
    fp = fingerprint(root)
    if fp not in {fingerprint(a) for a in anchors}:
        raise fail(label, "root", "PCK chain does not end at a pinned Intel SGX Root CA", fingerprint=fp)
    for i, cert in enumerate(chain):
        issuer = chain[min(i + 1, len(chain) - 1)]
        name, issuer_name = _NAMES[i], _NAMES[min(i + 1, len(chain) - 1)]
        if cert.issuer != issuer.subject:
            raise fail(label, "chain", f"{name} issuer does not name the {issuer_name}", certificate=name)
        hash_alg = cert.signature_hash_algorithm
        if not isinstance(hash_alg, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            raise fail(label, "chain", f"{name} has an unsupported signature algorithm", certificate=name)
        try:
            is_ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise fail(label, "chain", f"{issuer_name} is not a CA certificate", certificate=issuer_name)
        key = issuer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise fail(label, "chain", f"{issuer_name} key is not ECDSA", certificate=issuer_name)
        try:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        except InvalidSignature:
            raise fail(
                label, "chain", f"{name} signature by the {issuer_name} does not verify", certificate=name
            ) from None
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            raise fail(
                label,
                "chain",
                f"{name} certificate not valid at {now.isoformat()}",
                certificate=name,
                not_before=cert.not_valid_before_utc.isoformat(),
                not_after=cert.not_valid_after_utc.isoformat(),
            )


def verify_quote(q: Quote, *, roots: Sequence[x509.Certificate] | None, now: datetime, label: str) -> None:
    """Check ``q``'s PCK chain, QE report signature, QE binding and quote signature at ``now``.

    ``roots`` replaces the trust anchors (default: the bundled, pinned Intel SGX Root CA); the chain's
    root must equal one of them (SHA-256 fingerprint of the DER certificate).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    _check_chain(q.pck_chain, roots, now, label)

    pck_key = _p256_key(q.pck_chain[0].public_key(), label, "signature", "PCK leaf key")
    if not _verify_raw(pck_key, q.qe_report_signature, q.qe_report):
        raise fail(label, "signature", "QE report signature by the PCK leaf does not verify")

    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    bound = q.qe_report[_QE_REPORT_DATA_OFFSET : _QE_REPORT_DATA_OFFSET + 32]
    if bound != expected or any(q.qe_report[_QE_REPORT_DATA_OFFSET + 32 : _QE_REPORT_DATA_OFFSET + 64]):
        raise fail(label, "qe_binding", "QE report does not bind the attestation key and QE auth data")

    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
    except ValueError:
        raise fail(label, "signature", "attestation key is not a valid P-256 point") from None
    if not _verify_raw(att_key, q.signature, q.header + q.body):
        raise fail(label, "signature", "quote signature by the attestation key does not verify")


def parse_and_verify(
    quote: bytes,
    *,
    label: str,
    version: int,
    tee_type: int,
    body_size: int,
    roots: Sequence[x509.Certificate] | None,
    now: datetime,
) -> Quote:
    """Type and version checks, parsing and the full DCAP verification: what TDX and SGX share."""
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise fail(label, "format", "quote must be bytes")
    raw = bytes(quote)
    if len(raw) >= 2:
        (found,) = struct.unpack_from("<H", raw, 0)
        if found != version:
            raise fail(label, "format", f"unsupported quote version {found}", version=found)
    q = parse_quote(raw, label=label, version=version, tee_type=tee_type, body_size=body_size)
    verify_quote(q, roots=roots, now=now, label=label)
    return q
