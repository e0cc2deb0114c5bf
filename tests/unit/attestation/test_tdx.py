"""TDX quote v4 verifier against a genuine Sapphire Rapids quote (go-tdx-guest; see tests/data/tdx/README.md),
and quote v5 (TD 1.0 and TD 1.5 bodies) built from it under a test root: no genuine v5 vector is published here."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealroom.attestation import dcap
from sealroom.attestation.platform import PlatformClaims
from sealroom.attestation.tdx import quote_measurement, verify_tdx
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[2] / "data" / "tdx"
ROOTS = Path(__file__).resolve().parents[3] / "sealroom" / "attestation" / "roots"
NOW = datetime(2025, 1, 1, tzinfo=UTC)  # inside the PCK leaf's validity (2022-09-20 .. 2029-09-20)
USED = 4935  # bytes the quote structure uses; the published file appends 39 bytes of test text
BODY_END = 48 + 584
SIG_START = BODY_END + 4


@pytest.fixture(scope="module")
def published() -> bytes:
    return (DATA / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()


@pytest.fixture(scope="module")
def quote(published: bytes) -> bytes:
    return published[:USED]


def _refused(quote: bytes, check: str | set[str], **kw: object) -> AttestationError:
    with pytest.raises(AttestationError) as ei:
        verify_tdx(quote, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    checks = {check} if isinstance(check, str) else check
    assert ei.value.details["check"] in checks, ei.value
    return ei.value


def test_genuine_quote_verifies(quote: bytes) -> None:
    claims = verify_tdx(quote, now=NOW)
    assert isinstance(claims, PlatformClaims)
    assert claims.platform == "tdx"
    assert claims.measurement.startswith("6363b8043668a3ad") and len(claims.measurement) == 96
    assert claims.measurements["mrtd"] == claims.measurement
    assert set(claims.measurements) >= {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrseam", "mrconfigid"}
    assert claims.report_data.hex().startswith("6c62dec1b8191749") and len(claims.report_data) == 64
    assert claims.debug is False
    assert claims.tcb["tee_tcb_svn_00"] == 3 and claims.tcb["tee_tcb_svn_02"] == 4
    assert claims.details["tee_tcb_svn"] == "03000400000000000000000000000000"
    assert claims.details["fmspc"] == "50806f000000"
    assert claims.details["version"] == 4 and claims.details["quote_size"] == USED
    assert claims.to_json_dict()["platform"] == "tdx"


def test_zero_padding_accepted(quote: bytes) -> None:
    padded = quote + bytes(39)
    assert verify_tdx(padded, now=NOW).measurement.startswith("6363b8043668a3ad")


def test_published_file_has_nonzero_trailer_and_is_refused(published: bytes) -> None:
    assert len(published) == 4974 and published[USED:] == b"\nextra bytes(only for testing purpose)\n"
    _refused(published, "format")
    _refused(published[:USED] + b"\x00\x01", "format")


@pytest.mark.parametrize("offset", [0, 1, 2, 4, 6, 8, 10, 12, 20, 30, 47])
def test_header_byte_changes_refused(quote: bytes, offset: int) -> None:
    bad = bytearray(quote)
    bad[offset] ^= 0x01
    _refused(bytes(bad), {"format", "signature"})


@pytest.mark.parametrize("offset", [48, 48 + 120, 48 + 136, 48 + 300, 48 + 330, 48 + 520, BODY_END - 1])
def test_body_byte_changes_refused(quote: bytes, offset: int) -> None:
    bad = bytearray(quote)
    bad[offset] ^= 0x80
    _refused(bytes(bad), "signature")


@pytest.mark.parametrize(
    ("offset", "checks"),
    [
        (SIG_START, {"signature"}),  # quote signature r
        (SIG_START + 63, {"signature"}),  # quote signature s
        (SIG_START + 64, {"qe_binding", "signature"}),  # attestation key
        (SIG_START + 128 + 6 + 10, {"signature"}),  # QE report
        (SIG_START + 128 + 6 + 384 + 5, {"signature"}),  # QE report signature
        (SIG_START + 128 + 6 + 448 + 2 + 3, {"qe_binding"}),  # QE auth data
        (SIG_START + 128 + 6 + 448 + 2 + 32 + 300, {"format", "chain"}),  # PCK leaf PEM
    ],
)
def test_signature_data_byte_changes_refused(quote: bytes, offset: int, checks: set[str]) -> None:
    bad = bytearray(quote)
    bad[offset] ^= 0x01
    _refused(bytes(bad), checks)


@pytest.mark.parametrize("length", [0, 1, 47, 48, 100, BODY_END, SIG_START, SIG_START + 200, 1500, USED - 1])
def test_truncated_refused(quote: bytes, length: int) -> None:
    _refused(quote[:length], "format")


@pytest.mark.parametrize("version", [0, 1, 3, 6, 0xFFFF])
def test_unknown_version_refused(quote: bytes, version: int) -> None:
    err = _refused(struct.pack("<H", version) + quote[2:], "format")
    assert err.details["version"] == version


def test_wrong_tee_type_refused(quote: bytes) -> None:
    _refused(quote[:4] + struct.pack("<I", 0) + quote[8:], "format")


def test_non_bytes_and_naive_now(quote: bytes) -> None:
    _refused("not bytes", "format")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        verify_tdx(quote, now=datetime(2025, 1, 1))


@pytest.mark.parametrize(
    "now",
    [
        datetime(2022, 9, 20, 13, 20, 30, tzinfo=UTC),  # a second before the PCK leaf
        datetime(2029, 9, 20, 13, 20, 32, tzinfo=UTC),  # a second after it
        datetime(2018, 1, 1, tzinfo=UTC),
        datetime(2050, 1, 1, tzinfo=UTC),
    ],
)
def test_now_outside_validity_refused(quote: bytes, now: datetime) -> None:
    _refused(quote, "chain", now=now)


def test_pinned_root_matches_bundle() -> None:
    root = x509.load_pem_x509_certificate((ROOTS / "intel_sgx_root_ca.pem").read_bytes())
    assert dcap.fingerprint(root) == dcap.PINNED_INTEL_ROOT_SHA256
    assert dcap.bundled_intel_root() == root


def test_empty_trust_anchors_refused(quote: bytes) -> None:
    _refused(quote, "root", roots=[])


# --------------------------------------------------------------------------- a quote under a test root


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    start = datetime(2018, 1, 1, tzinfo=UTC)
    builder = x509.CertificateBuilder()
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return (
        builder.subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365 * 30))
        .sign(signer, hashes.SHA256())
    )


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class Forged:
    """A quote rebuilt under a freshly made test root, and the keys that made it."""

    quote: bytes
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate


def forge(
    quote: bytes,
    *,
    qe_report: bytes | None = None,
    broken_link: bool = False,
    ca_is_ca: bool = True,
    body: bytes | None = None,
    header: bytes | None = None,
    descriptor: bytes = b"",
    ca_name: str = "Intel SGX PCK Platform CA",
) -> Forged:
    """Re-sign ``quote``'s (v3 or v4) QE report by a PCK chain under a freshly made *test* root with Intel's names.

    Everything else in the quote is kept, so the result passes every check but the root pin. The PCK
    leaf carries the genuine leaf's Intel SGX extension (FMSPC, PCE ID, TCB). ``qe_report`` replaces
    the QE report (still signed by the test PCK leaf); ``broken_link`` signs the PCK CA with a key
    other than the root's; ``ca_is_ca=False`` drops the PCK CA's CA basic constraint. ``body``,
    ``header`` or ``descriptor`` (quote v5's body type and size) replace those parts: a fresh
    attestation key then signs header || descriptor || body and the QE report is rebound to it.
    """
    version = struct.unpack_from("<H", quote, 0)[0]
    body_size = 584 if version == 4 else 384
    q = dcap.parse_quote(
        quote,
        label="test",
        version=version,
        tee_type=struct.unpack_from("<I", quote, 4)[0],
        body_size=body_size,
    )
    sgx_ext = q.pck_chain[0].extensions.get_extension_for_oid(x509.ObjectIdentifier("1.2.840.113741.1.13.1")).value
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = _cert("Intel SGX Root CA", keys[2], "Intel SGX Root CA", keys[2], ca=True)
    ca_signer = ec.generate_private_key(ec.SECP256R1()) if broken_link else keys[2]
    ca = _cert(ca_name, keys[1], "Intel SGX Root CA", ca_signer, ca=ca_is_ca)
    leaf = _cert("Intel SGX PCK Certificate", keys[0], ca_name, keys[1], ca=False, extensions=(sgx_ext,))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca, root))
    signature, att_key = q.signature, q.attestation_key
    report = q.qe_report if qe_report is None else qe_report
    if body is not None or header is not None or descriptor:
        header = q.header if header is None else header
        body = q.body if body is None else body
        ak = ec.generate_private_key(ec.SECP256R1())
        att_key = ak.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        report = report[:320] + hashlib.sha256(att_key + q.qe_auth_data).digest() + report[352:]
        signature = _raw_sig(ak, header + descriptor + body)
    else:
        header, body = q.header, q.body
    inner = (
        report
        + _raw_sig(keys[0], report)
        + struct.pack("<H", len(q.qe_auth_data))
        + q.qe_auth_data
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    if version == 4:
        inner = struct.pack("<HI", 6, len(inner)) + inner
    sig_data = signature + att_key + inner
    forged = header + descriptor + body + struct.pack("<I", len(sig_data)) + sig_data
    return Forged(forged, root, keys[2], ca, keys[1], leaf)


def forge_under_test_root(quote: bytes, **kw: Any) -> tuple[bytes, x509.Certificate]:
    """:func:`forge`, returning the quote and its test root."""
    f = forge(quote, **kw)
    return f.quote, f.root


def test_quote_under_test_root_refused_as_root(quote: bytes) -> None:
    forged, test_root = forge_under_test_root(quote)
    err = _refused(forged, "root")
    assert err.details["fingerprint"] == dcap.fingerprint(test_root)
    # Trusting the test root explicitly, the same quote verifies: only the root pin refused it.
    assert verify_tdx(forged, roots=[test_root], now=NOW).measurement.startswith("6363b8043668a3ad")


def test_qe_binding_refused_when_qe_report_is_validly_signed(quote: bytes) -> None:
    # A QE report signed by the (trusted test) PCK leaf but binding a different key: check "qe_binding".
    q = dcap.parse_quote(quote, label="t", version=4, tee_type=0x81, body_size=584)
    assert q.qe_report[320:352] == hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    other = q.qe_report[:320] + hashlib.sha256(b"another key").digest() + q.qe_report[352:]
    forged, test_root = forge_under_test_root(quote, qe_report=other)
    _refused(forged, "qe_binding", roots=[test_root])
    nonzero_tail = q.qe_report[:352] + b"\x01" + q.qe_report[353:]
    forged, test_root = forge_under_test_root(quote, qe_report=nonzero_tail)
    _refused(forged, "qe_binding", roots=[test_root])


def test_issuer_without_ca_constraint_refused(quote: bytes) -> None:
    forged, test_root = forge_under_test_root(quote, ca_is_ca=False)
    err = _refused(forged, "chain", roots=[test_root])
    assert err.details["certificate"] == "PCK CA"


def test_broken_chain_link_refused(quote: bytes) -> None:
    forged, test_root = forge_under_test_root(quote, broken_link=True)
    err = _refused(forged, "chain", roots=[test_root])
    assert err.details["certificate"] == "PCK CA"


def test_debug_td_verifies_with_debug_true(quote: bytes) -> None:
    body = bytearray(quote[48:BODY_END])
    body[120] |= 0x01  # td_attributes bit 0
    forged, test_root = forge_under_test_root(quote, body=bytes(body))
    _refused(forged, "root")
    claims = verify_tdx(forged, roots=[test_root], now=NOW)
    assert claims.debug is True and claims.measurement.startswith("6363b8043668a3ad")


# --------------------------------------------------------------------------- quote v5 under a test root

V5_SIG_START = 48 + 6 + 584 + 4  # type-2 body; a type-3 body adds 64


def _v5(quote: bytes, body_type: int, *, declared: int | None = None, body: bytes | None = None) -> Forged:
    """A TDX quote v5 made from the genuine v4 quote: header version 5, a body descriptor, the TD 1.0
    body (type 2) or the TD 1.5 body (type 3: TEE_TCB_SVN_2 and MRSERVICETD appended), re-signed."""
    if body is None:
        body = quote[48:BODY_END]
        if body_type == 3:
            body += bytes(range(1, 17)) + b"\xab" * 48
    descriptor = struct.pack("<HI", body_type, len(body) if declared is None else declared)
    return forge(quote, header=struct.pack("<H", 5) + quote[2:48], descriptor=descriptor, body=body)


@pytest.fixture(scope="module")
def v5_td10(quote: bytes) -> Forged:
    return _v5(quote, 2)


@pytest.fixture(scope="module")
def v5_td15(quote: bytes) -> Forged:
    return _v5(quote, 3)


def test_v5_td10_body_verifies_under_test_root(quote: bytes, v5_td10: Forged) -> None:
    v4 = verify_tdx(quote, now=NOW)
    claims = verify_tdx(v5_td10.quote, roots=[v5_td10.root], now=NOW)
    assert claims.details["version"] == 5 and claims.details["body_type"] == 2
    assert claims.measurement == v4.measurement and claims.measurements == v4.measurements
    assert claims.tcb == v4.tcb and claims.report_data == v4.report_data
    assert "mrservicetd" not in claims.measurements and "tee_tcb_svn2" not in claims.details
    _refused(v5_td10.quote, "root")  # only the root pin refuses it


def test_v5_td15_body_verifies_with_its_extra_fields(quote: bytes, v5_td15: Forged) -> None:
    claims = verify_tdx(v5_td15.quote, roots=[v5_td15.root], now=NOW)
    assert claims.details["version"] == 5 and claims.details["body_type"] == 3
    assert claims.measurement.startswith("6363b8043668a3ad")
    assert claims.measurements["mrservicetd"] == "ab" * 48
    assert claims.details["tee_tcb_svn2"] == bytes(range(1, 17)).hex()
    assert claims.tcb["tee_tcb_svn2_00"] == 1 and claims.tcb["tee_tcb_svn2_15"] == 16
    assert claims.tcb["tee_tcb_svn_00"] == 3 and claims.details["quote_size"] == len(v5_td15.quote)


def test_quote_measurement_parses_v4_and_v5(quote: bytes, v5_td10: Forged, v5_td15: Forged) -> None:
    mrtd = verify_tdx(quote, now=NOW).measurement
    assert quote_measurement(quote) == quote_measurement(v5_td10.quote) == quote_measurement(v5_td15.quote) == mrtd
    with pytest.raises(AttestationError) as ei:
        quote_measurement(struct.pack("<H", 6) + quote[2:])
    assert ei.value.details["check"] == "format"


@pytest.mark.parametrize("which", ["td10", "td15"])
def test_v5_every_signed_region_byte_is_covered(which: str, v5_td10: Forged, v5_td15: Forged) -> None:
    f = v5_td10 if which == "td10" else v5_td15
    body_end = 48 + 6 + (584 if which == "td10" else 648)
    # header, body type, body size, and body bytes, first and last of each: every change is refused.
    for offset in (2, 3, 12, 47, 48, 49, 50, 53, 54, 54 + 136, 54 + 583, body_end - 1):
        bad = bytearray(f.quote)
        bad[offset] ^= 0x01
        with pytest.raises(AttestationError) as ei:
            verify_tdx(bytes(bad), roots=[f.root], now=NOW)
        assert ei.value.details["check"] in {"format", "signature"}, (offset, ei.value)
    # The signature itself, and a body byte re-signed by another attestation key.
    bad = bytearray(f.quote)
    bad[body_end + 4] ^= 0x01
    with pytest.raises(AttestationError) as ei:
        verify_tdx(bytes(bad), roots=[f.root], now=NOW)
    assert ei.value.details["check"] == "signature"


def test_v5_signature_over_header_and_body_only_is_refused(quote: bytes) -> None:
    # The body descriptor is part of the signed region: a quote whose attestation key signed header ||
    # body (the v4 rule) with the descriptor spliced in afterwards does not verify.
    header5, body = struct.pack("<H", 5) + quote[2:48], quote[48:BODY_END]
    f = forge(quote, header=header5, body=body)  # signs header5 || body, no descriptor
    spliced = f.quote[:48] + struct.pack("<HI", 2, 584) + f.quote[48:]
    _refused(spliced, "signature", roots=[f.root])
    q = dcap.parse_quote(spliced, label="t", version=5, tee_type=0x81, body_types={2: 584})
    assert q.signed_data == header5 + struct.pack("<HI", 2, 584) + body


@pytest.mark.parametrize("body_type", [0, 1, 4, 0xFFFF])
def test_v5_unknown_body_type_refused(quote: bytes, body_type: int) -> None:
    f = _v5(quote, body_type, body=quote[48:BODY_END])
    err = _refused(f.quote, "format", roots=[f.root])
    assert err.details["body_type"] == body_type


@pytest.mark.parametrize(("body_type", "declared"), [(2, 648), (3, 584), (2, 583), (2, 0), (3, 0xFFFFFFFF)])
def test_v5_body_size_mismatch_refused(quote: bytes, body_type: int, declared: int) -> None:
    body = quote[48:BODY_END] + (bytes(64) if body_type == 3 else b"")
    f = _v5(quote, body_type, declared=declared, body=body)
    err = _refused(f.quote, "format", roots=[f.root])
    assert err.details["body_size"] == declared


def test_v5_td10_body_declared_as_td15_refused(quote: bytes) -> None:
    # A 584-byte body under type 3 (declaring 648): the parser reads 64 bytes of signature data as body.
    f = _v5(quote, 3, declared=648, body=quote[48:BODY_END])
    _refused(f.quote, {"format", "signature"}, roots=[f.root])


@pytest.mark.parametrize("which", ["td10", "td15"])
def test_v5_truncated_and_padded(which: str, v5_td10: Forged, v5_td15: Forged) -> None:
    f = v5_td10 if which == "td10" else v5_td15
    for length in (2, 48, 50, 53, 54, 54 + 100, len(f.quote) - 700, len(f.quote) - 1):
        _refused(f.quote[:length], "format", roots=[f.root])
    assert verify_tdx(f.quote + bytes(17), roots=[f.root], now=NOW).details["quote_size"] == len(f.quote)
    _refused(f.quote + b"\x00\x09", "format", roots=[f.root])


def test_v5_wrong_tee_type_refused(v5_td10: Forged) -> None:
    bad = v5_td10.quote[:4] + struct.pack("<I", 0) + v5_td10.quote[8:]
    _refused(bad, "format", roots=[v5_td10.root])


def test_v5_parse_quote_misuse_is_a_value_error(quote: bytes) -> None:
    with pytest.raises(ValueError):
        dcap.parse_quote(quote, label="t", version=5, tee_type=0x81, body_size=584)
    with pytest.raises(ValueError):
        dcap.parse_quote(quote, label="t", version=4, tee_type=0x81, body_types={2: 584})
