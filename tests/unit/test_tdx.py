"""TDX quote v4 verifier against a genuine Sapphire Rapids quote (go-tdx-guest; see tests/data/tdx/README.md)."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealroom.attestation import dcap
from sealroom.attestation.platform import PlatformClaims
from sealroom.attestation.tdx import verify_tdx
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[1] / "data" / "tdx"
ROOTS = Path(__file__).resolve().parents[2] / "sealroom" / "attestation" / "roots"
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


@pytest.mark.parametrize("version", [0, 1, 3, 5, 0xFFFF])
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
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    start = datetime(2018, 1, 1, tzinfo=UTC)
    builder = x509.CertificateBuilder()
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return (
        builder.subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365 * 30))
        .sign(signer, hashes.SHA256())
    )


def forge_under_test_root(
    quote: bytes,
    *,
    qe_report: bytes | None = None,
    broken_link: bool = False,
    ca_is_ca: bool = True,
    body: bytes | None = None,
) -> tuple[bytes, x509.Certificate]:
    """Re-sign ``quote``'s QE report by a PCK chain under a freshly made *test* root with Intel's names.

    Everything else in the quote is kept, so the result passes every check but the root pin.
    ``qe_report`` replaces the QE report (still signed by the test PCK leaf); ``broken_link`` signs the
    PCK CA with a key other than the root's; ``ca_is_ca=False`` drops the PCK CA's CA basic constraint.
    ``body`` replaces the report body: a fresh attestation key signs the quote and the QE report is
    rebound to it.
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
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = _cert("Intel SGX Root CA", keys[2], "Intel SGX Root CA", keys[2], ca=True)
    ca_signer = ec.generate_private_key(ec.SECP256R1()) if broken_link else keys[2]
    ca = _cert("Intel SGX PCK Platform CA", keys[1], "Intel SGX Root CA", ca_signer, ca=ca_is_ca)
    leaf = _cert("Intel SGX PCK Certificate", keys[0], "Intel SGX PCK Platform CA", keys[1], ca=False)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca, root))
    header, signature, att_key = q.header, q.signature, q.attestation_key
    report = q.qe_report if qe_report is None else qe_report
    if body is not None:
        ak = ec.generate_private_key(ec.SECP256R1())
        att_key = ak.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        report = report[:320] + hashlib.sha256(att_key + q.qe_auth_data).digest() + report[352:]
        ar, as_ = decode_dss_signature(ak.sign(header + body, ec.ECDSA(hashes.SHA256())))
        signature = ar.to_bytes(32, "big") + as_.to_bytes(32, "big")
    else:
        body = q.body
    r, s = decode_dss_signature(keys[0].sign(report, ec.ECDSA(hashes.SHA256())))
    qe_sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    inner = (
        report
        + qe_sig
        + struct.pack("<H", len(q.qe_auth_data))
        + q.qe_auth_data
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    if version == 4:
        inner = struct.pack("<HI", 6, len(inner)) + inner
    sig_data = signature + att_key + inner
    return header + body + struct.pack("<I", len(sig_data)) + sig_data, root


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
