"""AMD SEV-SNP: offline verification of a raw SNP attestation report signed by a VCEK.

:func:`verify_snp` parses the 1184-byte report the AMD secure processor returns (``SNP_REPORT``,
versions 2 to 5; Milan, Genoa, Turin), checks the certificate chain link by link -- ARK (self-signed,
pinned by SHA-256 fingerprint to one of the AMD roots bundled in ``roots/``) -> ASK -> VCEK, each an
RSA-PSS/SHA-384 signature and each valid at the injected ``now`` -- then the report's ECDSA
P-384/SHA-384 signature by the VCEK over bytes ``0x000-0x29F``, and that the report's REPORTED_TCB
and CHIP_ID match the VCEK's AMD extensions (OID arc ``1.3.6.1.4.1.3704.1``). It returns
:class:`~sealroom.attestation.platform.PlatformClaims` and appraises nothing: a debug guest (policy
bit 19) verifies, with ``debug=True``; refusing it is the relying party's policy.

The chain is checked directly rather than with a generic path builder because the VCEK has no
authority key identifier. A report signed by a VLEK (a key AMD issues to a cloud provider rather than
to one chip; AWS uses them) is verified the same way along ARK -> ASVK -> VLEK: the leaf's role must
match the report's SIGNING_KEY field, the TCB is bound to the VLEK's extensions, and there is no chip
id to bind (the VLEK's CSP_ID names the provider). AMD does not publish ASVKs beside the ARKs here,
so a VLEK must come with its ASVK.

Every refusal raises :class:`~sealroom.errors.AttestationError` with ``details["check"]`` one of
``"format"``, ``"root"``, ``"chain"``, ``"signature"``, ``"tcb_binding"``.
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
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from sealroom.attestation.platform import PlatformClaims, common_name
from sealroom.errors import AttestationError

__all__ = [
    "report_report_data",
    "SEV_SNP",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SUPPORTED_VERSIONS",
    "PINNED_ARK_SHA256",
    "verify_snp",
    "bundled_ark",
    "bundled_ask",
    "report_measurement",
]

SEV_SNP = "sev-snp"
REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0  # bytes 0x000-0x29F are signed
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
_SIG_ALGO_ECDSA_P384_SHA384 = 1

# SHA-256 fingerprints (DER) of AMD's product root keys, as bundled in roots/amd_ark_<product>.pem.
PINNED_ARK_SHA256: dict[str, str] = {
    "milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}

_ROOTS_DIR = Path(__file__).parent / "roots"

# VCEK extensions (AMD "Versioned Chip Endorsement Key" spec).
_AMD_ARC = "1.3.6.1.4.1.3704.1"
_OID_HWID = x509.ObjectIdentifier(_AMD_ARC + ".4")
_OID_TCB = {
    "bootloader": x509.ObjectIdentifier(_AMD_ARC + ".3.1"),
    "tee": x509.ObjectIdentifier(_AMD_ARC + ".3.2"),
    "snp": x509.ObjectIdentifier(_AMD_ARC + ".3.3"),
    "microcode": x509.ObjectIdentifier(_AMD_ARC + ".3.8"),
}
_OID_FMC_SPL = x509.ObjectIdentifier(_AMD_ARC + ".3.9")  # Turin only
_OID_CSP_ID = x509.ObjectIdentifier(_AMD_ARC + ".5")  # VLEK only: the cloud provider it was issued to

# REPORT.SIGNING_KEY -> the leaf certificate's common name.
SIGNING_KEYS = {0: "SEV-VCEK", 1: "SEV-VLEK"}

# Policy bits.
_POLICY_SMT = 1 << 16
_POLICY_MIGRATE_MA = 1 << 18
_POLICY_DEBUG = 1 << 19


def _fail(check: str, message: str, **extra: object) -> AttestationError:
    return AttestationError(f"SEV-SNP: {message}", details={"check": check, **extra})


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@cache
def bundled_ark(product: str) -> x509.Certificate:
    """The pinned ARK bundled for ``product`` ("milan", "genoa", "turin"), checked against its pin."""
    if product not in PINNED_ARK_SHA256:
        raise _fail("root", f"unknown product {product!r}")
    cert = x509.load_pem_x509_certificate((_ROOTS_DIR / f"amd_ark_{product}.pem").read_bytes())
    if _fingerprint(cert) != PINNED_ARK_SHA256[product]:
        raise _fail("root", f"bundled ARK for {product} does not match its pinned fingerprint")
    return cert


@cache
def bundled_ask(product: str) -> x509.Certificate:
    """The ASK bundled for ``product`` (it is still checked against the ARK on every verification)."""
    if product not in PINNED_ARK_SHA256:
        raise _fail("chain", f"unknown product {product!r}")
    return x509.load_pem_x509_certificate((_ROOTS_DIR / f"amd_ask_{product}.pem").read_bytes())


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class _Report:
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: int
    signing_key: int
    chip_id: bytes
    signed: bytes
    sig_r: bytes
    sig_s: bytes
    sig_reserved: bytes


def _parse(report: bytes) -> _Report:
    if not isinstance(report, bytes | bytearray | memoryview):
        raise _fail("format", "report must be bytes")
    raw = bytes(report)
    if len(raw) != REPORT_SIZE:
        raise _fail("format", f"report is {len(raw)} bytes, expected {REPORT_SIZE}", length=len(raw))
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise _fail("format", f"unsupported report version {version}", version=version)
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x30)
    if signature_algo != _SIG_ALGO_ECDSA_P384_SHA384:
        raise _fail("format", f"unsupported signature algorithm {signature_algo}")
    (platform_info,) = struct.unpack_from("<Q", raw, 0x40)
    (flags,) = struct.unpack_from("<I", raw, 0x48)
    signing_key = (flags >> 2) & 0b111
    if signing_key not in SIGNING_KEYS:
        raise _fail("format", f"report not signed by a VCEK or VLEK (SIGNING_KEY={signing_key})")
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    return _Report(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        platform_info=platform_info,
        flags=flags,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        reported_tcb=reported_tcb,
        signing_key=signing_key,
        chip_id=raw[0x1A0:0x1E0],
        signed=raw[:SIGNED_SIZE],
        sig_r=raw[0x2A0:0x2E8],
        sig_s=raw[0x2E8:0x330],
        sig_reserved=raw[0x330:REPORT_SIZE],
    )


def _tcb_fields(tcb: int, product: str) -> dict[str, int]:
    b = tcb.to_bytes(8, "little")
    if product == "turin":  # FMC, BOOTLOADER, TEE, SNP, reserved x3, MICROCODE
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    # Milan/Genoa: BOOTLOADER, TEE, reserved x4, SNP, MICROCODE
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


# ---------------------------------------------------------------------------------------------- chain


def _check_validity(cert: x509.Certificate, now: datetime, name: str) -> None:
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise _fail(
            "chain",
            f"{name} certificate not valid at {now.isoformat()}",
            certificate=name,
            not_before=cert.not_valid_before_utc.isoformat(),
            not_after=cert.not_valid_after_utc.isoformat(),
        )


def _check_link(child: x509.Certificate, issuer: x509.Certificate, child_name: str, issuer_name: str) -> None:
    """``child`` carries an RSA-PSS/SHA-384 (salt 48, MGF1-SHA-384) signature by ``issuer``."""
    if child.issuer != issuer.subject:
        raise _fail("chain", f"{child_name} issuer does not name the {issuer_name}", certificate=child_name)
    if child.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        child.signature_hash_algorithm, hashes.SHA384
    ):
        raise _fail("chain", f"{child_name} is not signed with RSA-PSS/SHA-384", certificate=child_name)
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _fail("chain", f"{issuer_name} key is not RSA", certificate=issuer_name)
    try:
        key.verify(
            child.signature,
            child.tbs_certificate_bytes,
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
            hashes.SHA384(),
        )
    except InvalidSignature:
        raise _fail(
            "chain", f"{child_name} signature by the {issuer_name} does not verify", certificate=child_name
        ) from None


_ROOT_PRODUCT_BY_CN = {"ARK-Milan": "milan", "ARK-Genoa": "genoa", "ARK-Turin": "turin"}


def _trusted_roots(roots: Sequence[x509.Certificate] | None) -> dict[str, x509.Certificate]:
    """Product -> the ARK trusted for it: the bundled, pinned AMD roots, or ``roots`` instead.

    A replacement root names its product the way AMD's do (CN ``ARK-Milan``, ``ARK-Genoa`` or
    ``ARK-Turin``): the product fixes the layout of the report's TCB fields.
    """
    if roots is None:
        return {product: bundled_ark(product) for product in PINNED_ARK_SHA256}
    trusted: dict[str, x509.Certificate] = {}
    for root in roots:
        product = _ROOT_PRODUCT_BY_CN.get(common_name(root.subject))
        if product is None:
            raise _fail(
                "root",
                "a replacement SEV-SNP root must be an AMD ARK (common name ARK-Milan, ARK-Genoa or ARK-Turin)",
                fingerprint=_fingerprint(root),
            )
        trusted[product] = root
    if not trusted:
        raise _fail("root", "no SEV-SNP root is trusted (the list of replacement roots is empty)")
    return trusted


def _product_for(
    ark: x509.Certificate | None,
    ask: x509.Certificate | None,
    vcek: x509.Certificate,
    trusted: dict[str, x509.Certificate],
) -> str:
    if ark is not None:
        fp = _fingerprint(ark)
        for product, root in trusted.items():
            if fp == _fingerprint(root):
                return product
        raise _fail("root", "ARK is not a trusted AMD root", fingerprint=fp)
    # No ARK given: the product whose trusted ARK issued the ASK (if given), else whose ASK issued the VCEK.
    for product, root in trusted.items():
        if ask is not None:
            if ask.issuer == root.subject:
                return product
        elif vcek.issuer == bundled_ask(product).subject:
            return product
    raise _fail("chain", "no trusted AMD product root issued this certificate chain")


# ------------------------------------------------------------------------------------------------ TCB


def _der_small_int(value: bytes, what: str) -> int:
    # A DER INTEGER (tag 0x02, short length) holding a non-negative SPL.
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 8:
        raise _fail("tcb_binding", f"VCEK extension {what} is not a small DER INTEGER")
    n = int.from_bytes(value[2:], "big", signed=True)
    if n < 0:
        raise _fail("tcb_binding", f"VCEK extension {what} is negative")
    return n


def _ext_bytes(vcek: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = vcek.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _fail("tcb_binding", f"VCEK extension {oid.dotted_string} has an unexpected type")
    return value.value


def _check_tcb_binding(rep: _Report, vcek: x509.Certificate, product: str, tcb: dict[str, int]) -> None:
    for name, oid in _OID_TCB.items():
        raw = _ext_bytes(vcek, oid)
        if raw is None:
            raise _fail("tcb_binding", f"VCEK lacks the {name} SPL extension", component=name)
        cert_spl = _der_small_int(raw, oid.dotted_string)
        if cert_spl != tcb[name]:
            raise _fail(
                "tcb_binding",
                f"reported {name} SPL {tcb[name]} differs from the VCEK's {cert_spl}",
                component=name,
                reported=tcb[name],
                vcek=cert_spl,
            )
    if "fmc" in tcb:
        raw = _ext_bytes(vcek, _OID_FMC_SPL)
        if raw is not None and _der_small_int(raw, _OID_FMC_SPL.dotted_string) != tcb["fmc"]:
            raise _fail("tcb_binding", "reported fmc SPL differs from the VCEK's", component="fmc")

    if rep.signing_key == 1:  # a VLEK is not chip-specific: there is no hwID to bind
        return
    hwid = _ext_bytes(vcek, _OID_HWID)
    if hwid is None:
        raise _fail("tcb_binding", "VCEK lacks the hwID extension")
    if len(hwid) >= 2 and hwid[0] == 0x04 and hwid[1] == len(hwid) - 2:  # DER OCTET STRING wrapping
        hwid = hwid[2:]
    if not any(rep.chip_id):
        raise _fail("tcb_binding", "report CHIP_ID is masked (all zero); it cannot be bound to the VCEK")
    # Milan/Genoa hwIDs are 64 bytes; Turin's are 8, with the rest of CHIP_ID zero.
    expected = hwid + bytes(len(rep.chip_id) - len(hwid)) if len(hwid) <= len(rep.chip_id) else None
    if expected is None or len(hwid) not in (8, 64) or expected != rep.chip_id:
        raise _fail("tcb_binding", "report CHIP_ID does not match the VCEK's hwID")


# ------------------------------------------------------------------------------------------------ API


def verify_snp(
    report: bytes,
    *,
    vcek: x509.Certificate,
    ask: x509.Certificate | None = None,
    ark: x509.Certificate | None = None,
    roots: Sequence[x509.Certificate] | None = None,
    now: datetime,
) -> PlatformClaims:
    """Verify a raw SEV-SNP attestation report and its VCEK chain at ``now``; return its claims.

    ``roots`` replaces the trusted ARKs (default: the AMD roots bundled in ``roots/`` and pinned by
    fingerprint); a replacement names its product by its common name, as AMD's do. ``ark``, when
    given, must be one of the trusted roots (else check ``"root"``); when omitted the trusted root of
    the product that issued the chain is used. ``ask`` defaults to the ASK bundled for that product.
    ``now`` must be timezone-aware.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    # 1. The report parses (size, version, reserved fields).
    rep = _parse(report)
    # 2-3. The signing key's chain: the right kind of leaf, up to a trusted AMD root, valid at now.
    product, end = _verify_chain(rep, vcek=vcek, ask=ask, ark=ark, roots=roots, now=now)
    # 4. The report's signature by that key.
    _verify_report_signature(rep, vcek, end)
    # 5. The TCB the report states is the one the VCEK was issued for (and the chip its hwID names).
    tcb = _tcb_fields(rep.reported_tcb, product)
    _check_tcb_binding(rep, vcek, product, tcb)
    return _claims(rep, vcek, product, end, tcb)


def _verify_chain(
    rep: _Report,
    *,
    vcek: x509.Certificate,
    ask: x509.Certificate | None,
    ark: x509.Certificate | None,
    roots: Sequence[x509.Certificate] | None,
    now: datetime,
) -> tuple[str, str]:
    """The ARK -> ASK (ASVK) -> VCEK (VLEK) chain at ``now``: the product and the leaf's kind."""
    leaf = SIGNING_KEYS[rep.signing_key]
    if common_name(vcek.subject) != leaf:
        raise _fail(
            "chain", f"the report is signed by a {leaf[4:]}, but the certificate given is not one", certificate=leaf
        )
    if leaf == "SEV-VLEK" and ask is None:
        raise _fail("chain", "a VLEK-signed report needs its ASVK (AMD KDS serves it at /vlek/v1/<product>/cert_chain)")
    trusted = _trusted_roots(roots)
    product = _product_for(ark, ask, vcek, trusted)
    ark_cert = ark if ark is not None else trusted[product]
    ask_cert = ask if ask is not None else bundled_ask(product)
    if _fingerprint(ark_cert) != _fingerprint(trusted[product]):  # defence in depth
        raise _fail("root", "ARK is not a trusted AMD root")

    mid, end = ("ASK", "VCEK") if leaf == "SEV-VCEK" else ("ASVK", "VLEK")
    _check_link(ark_cert, ark_cert, "ARK", "ARK")
    _check_link(ask_cert, ark_cert, mid, "ARK")
    _check_link(vcek, ask_cert, end, mid)
    for cert, name in ((ark_cert, "ARK"), (ask_cert, mid), (vcek, end)):
        _check_validity(cert, now, name)
    return product, end


def _verify_report_signature(rep: _Report, vcek: x509.Certificate, end: str) -> None:
    """ECDSA P-384/SHA-384 by the VCEK (VLEK), r and s little-endian in 72-byte fields."""
    vcek_key = vcek.public_key()
    if not isinstance(vcek_key, ec.EllipticCurvePublicKey) or not isinstance(vcek_key.curve, ec.SECP384R1):
        raise _fail("signature", f"{end} key is not ECDSA P-384")
    if any(rep.sig_reserved):
        raise _fail("signature", "reserved bytes after the signature are not zero")
    r = int.from_bytes(rep.sig_r, "little")
    s = int.from_bytes(rep.sig_s, "little")
    if r == 0 or s == 0:
        raise _fail("signature", "report signature is empty")
    try:
        vcek_key.verify(encode_dss_signature(r, s), rep.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise _fail("signature", f"report signature by the {end} does not verify") from None


def _claims(rep: _Report, vcek: x509.Certificate, product: str, end: str, tcb: dict[str, int]) -> PlatformClaims:
    return PlatformClaims(
        platform=SEV_SNP,
        measurement=rep.measurement.hex(),
        measurements={
            "measurement": rep.measurement.hex(),
            "host_data": rep.host_data.hex(),
            "id_key_digest": rep.id_key_digest.hex(),
            "author_key_digest": rep.author_key_digest.hex(),
            "family_id": rep.family_id.hex(),
            "image_id": rep.image_id.hex(),
        },
        debug=bool(rep.policy & _POLICY_DEBUG),
        tcb=tcb,
        report_data=rep.report_data,
        details={
            "product": product,
            "version": rep.version,
            "guest_svn": rep.guest_svn,
            "vmpl": rep.vmpl,
            "policy": rep.policy,
            "chip_id": rep.chip_id.hex(),
            "migration_agent": bool(rep.policy & _POLICY_MIGRATE_MA),
            "smt": bool(rep.policy & _POLICY_SMT),
            "platform_info": rep.platform_info,
            "reported_tcb": rep.reported_tcb,
            "report_id": rep.report_id.hex(),
            "signing_key": end.lower(),
            **({"csp_id": _csp_id(vcek)} if end == "VLEK" else {}),
        },
    )


def _csp_id(vlek: x509.Certificate) -> str:
    raw = _ext_bytes(vlek, _OID_CSP_ID)
    if raw is None:
        return ""
    # A DER UTF8String (tag 0x0C, short length): the cloud provider's name.
    if len(raw) >= 2 and raw[0] == 0x0C and raw[1] == len(raw) - 2:
        return raw[2:].decode("utf-8", "replace")[:64]
    return raw.hex()[:128]


def report_measurement(report: bytes) -> str:
    """The MEASUREMENT of an SNP report, parsed but NOT verified: for an enclave naming its own."""
    return _parse(report).measurement.hex()


def report_report_data(report: bytes) -> bytes:
    """The REPORT_DATA of an SNP report, parsed but NOT verified: for an attester checking its request."""
    return _parse(report).report_data
