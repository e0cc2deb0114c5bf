"""Intel DCAP ECDSA quotes (SGX quote v3, TDX quote v4 and v5): parsing and offline verification.

Shared by :mod:`sealroom.attestation.tdx` and :mod:`sealroom.attestation.sgx`. A quote is a 48-byte
header, a TEE-specific body (SGX: 384-byte enclave report; TDX: 584-byte TD report), a 4-byte
signature-data length and the ECDSA signature data: the quote signature (raw r||s, ECDSA
P-256/SHA-256 over header || body), the attestation public key (raw x||y), the Quoting Enclave's
report (384-byte SGX report body) and its signature by the PCK leaf, the QE authentication data, and
certification data of type 5 (PEM PCK chain, leaf -> intermediate -> root). In quote v4 the QE
report, its signature, the auth data and the inner certification data are wrapped in certification
data of type 6. Quote v5 puts a body descriptor between header and body: a u16 body type and a u32
body size (TDX: type 2 = TD 1.0 report, 584 bytes; type 3 = TD 1.5 report, 648 bytes); the quote
signature then covers header || body type || body size || body (the signed length dcap-qvl computes
for v5), and the signature data is laid out as in v4.

:func:`verify_quote` checks, in order: the chain's root is a pinned Intel SGX Root CA (SHA-256
fingerprint of the DER certificate; check ``"root"``), each link's ECDSA signature and each
certificate's validity at ``now`` (check ``"chain"``), the QE report signature by the PCK leaf
(``"signature"``), QE report_data[0:32] = SHA-256(attestation key || QE auth data) (``"qe_binding"``)
and the quote signature by the attestation key (``"signature"``). Malformed input is check
``"format"``. Collateral (TCB info, QE identity, CRLs) is evaluated apart, by
:mod:`sealroom.attestation.collateral`, from :func:`pck_extensions` and the parsed :class:`Quote`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
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
    "PckExtensions",
    "Quote",
    "bundled_intel_root",
    "check_chain",
    "fail",
    "fingerprint",
    "p256_key",
    "parse_and_verify",
    "pck_extensions",
    "pck_fmspc",
    "peek_version",
    "parse_quote",
    "verify_quote",
    "verify_raw",
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
    body_type: int | None = None  # quote v5's body type; None for v3 and v4
    body_descriptor: bytes = b""  # quote v5's body type (u16) and size (u32); empty for v3 and v4

    @property
    def signed_data(self) -> bytes:
        """The bytes the attestation key signs: header, v5 body descriptor, body."""
        return self.header + self.body_descriptor + self.body


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


def parse_quote(
    quote: bytes,
    *,
    label: str,
    version: int,
    tee_type: int,
    body_size: int | None = None,
    body_types: Mapping[int, int] | None = None,
) -> Quote:
    """Parse a DCAP ECDSA quote of the given ``version``/``tee_type``; structural errors are ``"format"``.

    Versions 3 and 4 take ``body_size``; version 5 takes ``body_types``, the body types accepted and
    the size each must declare.
    """
    if (version >= 5) != (body_types is not None) or (version < 5) != (body_size is not None):
        raise ValueError("quote v5 takes body_types; v3 and v4 take body_size")
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise fail(label, "format", "quote must be bytes")
    raw = bytes(quote)
    # 1. The header: this version, this TEE, an ECDSA P-256 attestation key.
    q_version, att_key_type, q_tee_type, qe_svn, pce_svn = _check_header(
        raw, label=label, version=version, tee_type=tee_type
    )
    r = _Reader(raw, 0, len(raw), label)
    header = r.take(HEADER_SIZE, "header")
    # 2. The report body (v5: after a descriptor naming its type and size).
    body_type: int | None = None
    descriptor = b""
    if body_types is not None:
        descriptor = r.take(6, "body descriptor")
        body_type, body_size = _body_type_and_size(descriptor, body_types, label=label)
    assert body_size is not None
    body = r.take(body_size, "report body")
    # 3. The signature data: signature, attestation key, QE report and the PCK chain.
    sig_len = r.u32("signature data length")
    sig_end = r.pos + sig_len
    if sig_end > len(raw):
        raise fail(label, "format", "signature data length exceeds the quote", length=sig_len)
    r.end = sig_end
    signature = r.take(64, "quote signature")
    attestation_key = r.take(64, "attestation key")
    if version >= 4:
        _check_qe_report_certification(r, sig_end, label=label)
    qe_report = r.take(SGX_REPORT_SIZE, "QE report")
    qe_report_signature = r.take(64, "QE report signature")
    qe_auth_data = r.take(r.u16("QE auth data length"), "QE auth data")
    cert_data = _pck_certification_data(r, label=label)
    # 4. The signature data ends where its length says, and only zero padding follows it.
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
        body_type=body_type,
        body_descriptor=descriptor,
    )


def _check_header(raw: bytes, *, label: str, version: int, tee_type: int) -> tuple[int, int, int, int, int]:
    """(version, attestation key type, TEE type, QE SVN, PCE SVN) of a header of the expected kind."""
    if len(raw) < HEADER_SIZE:
        raise fail(label, "format", f"quote is {len(raw)} bytes, shorter than its header", length=len(raw))
    q_version, att_key_type, q_tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", raw, 0)
    if q_version != version:
        raise fail(label, "format", f"unsupported quote version {q_version}", version=q_version)
    if q_tee_type != tee_type:
        raise fail(label, "format", f"unexpected TEE type {q_tee_type:#x}", tee_type=q_tee_type)
    if att_key_type != _ATT_KEY_ECDSA_P256:
        raise fail(label, "format", f"unsupported attestation key type {att_key_type}")
    return q_version, att_key_type, q_tee_type, qe_svn, pce_svn


def _body_type_and_size(descriptor: bytes, body_types: Mapping[int, int], *, label: str) -> tuple[int, int]:
    """A v5 body descriptor's type and size, both as ``body_types`` accepts them."""
    body_type, declared = struct.unpack("<HI", descriptor)
    if body_type not in body_types:
        raise fail(
            label,
            "format",
            f"unknown quote body type {body_type} (supported: {', '.join(map(str, sorted(body_types)))})",
            body_type=body_type,
        )
    if declared != body_types[body_type]:
        raise fail(
            label,
            "format",
            f"body type {body_type} declares {declared} bytes, expected {body_types[body_type]}",
            body_type=body_type,
            body_size=declared,
        )
    return body_type, declared


def _check_qe_report_certification(r: _Reader, sig_end: int, *, label: str) -> None:
    """v4 and later wrap the QE report in certification data of type 6 that fills the signature data."""
    outer_type = r.u16("certification data type")
    outer_size = r.u32("certification data size")
    if outer_type != _CERT_QE_REPORT:
        raise fail(label, "format", f"unsupported certification data type {outer_type}", cert_type=outer_type)
    if r.pos + outer_size != sig_end:
        raise fail(label, "format", "certification data size does not match the signature data length")


def _pck_certification_data(r: _Reader, *, label: str) -> bytes:
    """The certification data of type 5 (the PCK certificate chain)."""
    cert_type = r.u16("certification data type")
    cert_size = r.u32("certification data size")
    if cert_type != _CERT_PCK_CHAIN:
        raise fail(
            label,
            "format",
            f"certification data type {cert_type} carries no PCK certificate chain (only type 5 is supported)",
            cert_type=cert_type,
        )
    return r.take(cert_size, "certification data")


def p256_key(key: object, *, label: str, check: str, what: str) -> ec.EllipticCurvePublicKey:
    """``key`` as an ECDSA P-256 public key; AttestationError (``check``) if it is anything else."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise fail(label, check, f"{what} is not an ECDSA P-256 key")
    return key


def verify_raw(
    key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, *, label: str, check: str, what: str, **extra: object
) -> None:
    """Verify a raw r||s ECDSA P-256/SHA-256 signature (64 bytes); AttestationError (``check``) if it fails."""
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if len(sig) != 64 or r == 0 or s == 0:
        raise fail(label, check, f"{what} does not verify (malformed signature)", **extra)
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise fail(label, check, f"{what} does not verify", **extra) from None


_OID_SGX_EXTENSIONS = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_OID_SGX_PREFIX = bytes.fromhex("2a864886f84d010d01")  # 1.2.840.113741.1.13.1
_OID_FMSPC_DER = _OID_SGX_PREFIX + b"\x04"  # .4
_OID_TCB_DER = (
    _OID_SGX_PREFIX + b"\x02"
)  # .2 (sequence of .2.1 .. .2.16 CPU SVN components, .2.17 PCESVN, .2.18 CPUSVN)
_OID_PCEID_DER = _OID_SGX_PREFIX + b"\x03"  # .3


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


def _sgx_extension_items(leaf: x509.Certificate) -> dict[bytes, tuple[int, bytes]]:
    """OID (DER content) -> (tag, content) of each member of the PCK leaf's Intel SGX extension."""
    ext = leaf.extensions.get_extension_for_oid(_OID_SGX_EXTENSIONS).value
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise ValueError("SGX extension is not raw DER")
    (outer,) = _der_items(ext.value)
    if outer[0] != 0x30:
        raise ValueError("SGX extension is not a SEQUENCE")
    out: dict[bytes, tuple[int, bytes]] = {}
    for tag, content in _der_items(outer[1]):
        if tag != 0x30:
            raise ValueError("SGX extension member is not a SEQUENCE")
        items = _der_items(content)
        if len(items) != 2 or items[0][0] != 0x06:
            raise ValueError("SGX extension member is not (OID, value)")
        if items[0][1] in out:
            raise ValueError("SGX extension member repeated")
        out[items[0][1]] = items[1]
    return out


def pck_fmspc(leaf: x509.Certificate) -> str | None:
    """The FMSPC (hex) in the PCK leaf's Intel SGX extension, or None if absent or unreadable (display only)."""
    try:
        tag, value = _sgx_extension_items(leaf)[_OID_FMSPC_DER]
    except (ValueError, KeyError, x509.ExtensionNotFound):
        return None
    return value.hex() if tag == 0x04 else None


@dataclass(frozen=True)
class PckExtensions:
    """What the PCK leaf certifies about the platform (Intel SGX PCK Certificate and CRL Profile)."""

    fmspc: str  # hex, lowercase
    pce_id: str  # hex, lowercase
    cpu_svn_components: tuple[int, ...]  # 16 SGX TCB component SVNs
    pce_svn: int
    cpu_svn: bytes  # 16 bytes


def pck_extensions(leaf: x509.Certificate, *, label: str, check: str) -> PckExtensions:
    """The FMSPC, PCE ID and TCB (16 CPU SVN components and PCESVN) the PCK leaf certifies.

    AttestationError (``check``) when the extension is absent or malformed.
    """

    def integer(item: tuple[int, bytes]) -> int:
        tag, content = item
        if tag != 0x02 or not content:
            raise ValueError("SVN is not an INTEGER")
        value = int.from_bytes(content, "big", signed=True)
        if value < 0 or value > 0xFFFF:
            raise ValueError("SVN out of range")
        return value

    try:
        items = _sgx_extension_items(leaf)
        fmspc, pce_id, tcb = items[_OID_FMSPC_DER], items[_OID_PCEID_DER], items[_OID_TCB_DER]
        if fmspc[0] != 0x04 or len(fmspc[1]) != 6 or pce_id[0] != 0x04 or len(pce_id[1]) != 2 or tcb[0] != 0x30:
            raise ValueError("FMSPC, PCE-ID or TCB has the wrong type or size")
        svns: dict[int, tuple[int, bytes]] = {}
        for tag, content in _der_items(tcb[1]):
            member = _der_items(content) if tag == 0x30 else []
            if len(member) != 2 or member[0][0] != 0x06:
                raise ValueError("TCB member is not (OID, value)")
            oid = member[0][1]
            if len(oid) != len(_OID_TCB_DER) + 1 or not oid.startswith(_OID_TCB_DER):
                raise ValueError("TCB member has an unexpected OID")
            svns[oid[-1]] = member[1]  # 1.2.840.113741.1.13.1.2.<n>, n in 1..18
        components = tuple(integer(svns[i]) for i in range(1, 17))
        pce_svn = integer(svns[17])
        if svns[18][0] != 0x04 or len(svns[18][1]) != 16:
            raise ValueError("CPUSVN is not 16 bytes")
    except x509.ExtensionNotFound:
        raise fail(label, check, "PCK leaf carries no Intel SGX extension") from None
    except (ValueError, KeyError, IndexError) as exc:
        raise fail(label, check, f"PCK leaf's Intel SGX extension is malformed: {exc}") from None
    if any(c > 0xFF for c in components):
        raise fail(label, check, "PCK leaf's CPU SVN component out of range")
    return PckExtensions(
        fmspc=fmspc[1].hex(),
        pce_id=pce_id[1].hex(),
        cpu_svn_components=components,
        pce_svn=pce_svn,
        cpu_svn=svns[18][1],
    )


_PCK_NAMES = ("PCK leaf", "PCK CA", "root")


def check_chain(
    chain: Sequence[x509.Certificate],
    *,
    roots: Sequence[x509.Certificate] | None,
    now: datetime,
    label: str,
    names: Sequence[str] = _PCK_NAMES,
    root_check: str = "root",
    chain_check: str = "chain",
    **extra: object,
) -> None:
    """Check a chain (leaf first, root last, named by ``names``) to a pinned root at ``now``.

    The last certificate must equal a trust anchor (SHA-256 of its DER; default: the bundled Intel SGX
    Root CA), else ``root_check``; each link's issuer name, CA constraint and ECDSA signature and
    each certificate's validity, else ``chain_check``. ``extra`` goes into the error's details.
    """
    if not chain or len(names) != len(chain):
        raise fail(label, chain_check, f"certificate chain has {len(chain)} certificates, expected {len(names)}")
    root = chain[-1]
    anchors = [bundled_intel_root()] if roots is None else list(roots)
    fp = fingerprint(root)
    if fp not in {fingerprint(a) for a in anchors}:
        raise fail(
            label, root_check, f"{names[0]} chain does not end at a pinned Intel SGX Root CA", fingerprint=fp, **extra
        )
    for i, cert in enumerate(chain):
        j = min(i + 1, len(chain) - 1)
        issuer, name, issuer_name = chain[j], names[i], names[j]
        if cert.issuer != issuer.subject:
            raise fail(label, chain_check, f"{name} issuer does not name the {issuer_name}", certificate=name, **extra)
        hash_alg = cert.signature_hash_algorithm
        if not isinstance(hash_alg, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            raise fail(label, chain_check, f"{name} has an unsupported signature algorithm", certificate=name, **extra)
        try:
            is_ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise fail(label, chain_check, f"{issuer_name} is not a CA certificate", certificate=issuer_name, **extra)
        key = issuer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise fail(label, chain_check, f"{issuer_name} key is not ECDSA", certificate=issuer_name, **extra)
        try:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        except InvalidSignature:
            raise fail(
                label,
                chain_check,
                f"{name} signature by the {issuer_name} does not verify",
                certificate=name,
                **extra,
            ) from None
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            raise fail(
                label,
                chain_check,
                f"{name} certificate not valid at {now.isoformat()}",
                certificate=name,
                not_before=cert.not_valid_before_utc.isoformat(),
                not_after=cert.not_valid_after_utc.isoformat(),
                **extra,
            )


def verify_quote(q: Quote, *, roots: Sequence[x509.Certificate] | None, now: datetime, label: str) -> None:
    """Check ``q``'s PCK chain, QE report signature, QE binding and quote signature at ``now``.

    ``roots`` replaces the trust anchors (default: the bundled, pinned Intel SGX Root CA); the chain's
    root must equal one of them (SHA-256 fingerprint of the DER certificate).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    check_chain(q.pck_chain, roots=roots, now=now, label=label)

    pck_key = p256_key(q.pck_chain[0].public_key(), label=label, check="signature", what="PCK leaf key")
    verify_raw(
        pck_key,
        q.qe_report_signature,
        q.qe_report,
        label=label,
        check="signature",
        what="QE report signature by the PCK leaf",
    )

    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    bound = q.qe_report[_QE_REPORT_DATA_OFFSET : _QE_REPORT_DATA_OFFSET + 32]
    if bound != expected or any(q.qe_report[_QE_REPORT_DATA_OFFSET + 32 : _QE_REPORT_DATA_OFFSET + 64]):
        raise fail(label, "qe_binding", "QE report does not bind the attestation key and QE auth data")

    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
    except ValueError:
        raise fail(label, "signature", "attestation key is not a valid P-256 point") from None
    verify_raw(
        att_key,
        q.signature,
        q.signed_data,
        label=label,
        check="signature",
        what="quote signature by the attestation key",
    )


def peek_version(quote: object, *, label: str) -> tuple[bytes, int | None]:
    """``quote`` as bytes and its version field (None if too short to hold one); ``"format"`` if not bytes."""
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise fail(label, "format", "quote must be bytes")
    raw = bytes(quote)
    return raw, (int(struct.unpack_from("<H", raw, 0)[0]) if len(raw) >= 2 else None)


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
    raw, found = peek_version(quote, label=label)
    if found is not None and found != version:
        raise fail(label, "format", f"unsupported quote version {found}", version=found)
    q = parse_quote(raw, label=label, version=version, tee_type=tee_type, body_size=body_size)
    verify_quote(q, roots=roots, now=now, label=label)
    return q
