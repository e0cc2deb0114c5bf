"""SGX quote v3 verifier against a genuine quote (Phala dcap-qvl sample) and Intel's TEST-ROOT sample.

Provenance: tests/data/sgx/README.md.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealroom.attestation import dcap
from sealroom.attestation.platform import PlatformClaims
from sealroom.attestation.sgx import verify_sgx
from sealroom.errors import AttestationError
from tests.unit.attestation.test_tdx import forge_under_test_root

DATA = Path(__file__).resolve().parents[2] / "data" / "sgx"
NOW = datetime(2025, 1, 1, tzinfo=UTC)  # inside the PCK leaf's validity (2023-09-20 .. 2030-09-20)
REPORT = 48
SIG_START = 48 + 384 + 4
QE_REPORT = SIG_START + 128
AUTH = QE_REPORT + 384 + 64


@pytest.fixture(scope="module")
def quote() -> bytes:
    return (DATA / "dcapqvl-sgx-quote-v3.bin").read_bytes()


@pytest.fixture(scope="module")
def test_root_sample() -> bytes:
    return (DATA / "intel-qvl-sample-quote-TEST-ROOT.dat").read_bytes()


def _refused(quote: bytes, check: str | set[str], **kw: object) -> AttestationError:
    with pytest.raises(AttestationError) as ei:
        verify_sgx(quote, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    checks = {check} if isinstance(check, str) else check
    assert ei.value.details["check"] in checks, ei.value
    return ei.value


def test_genuine_quote_verifies(quote: bytes) -> None:
    claims = verify_sgx(quote, now=NOW)
    assert isinstance(claims, PlatformClaims)
    assert claims.platform == "sgx"
    assert claims.measurement == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert claims.measurements == {
        "mrenclave": claims.measurement,
        "mrsigner": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
    }
    assert claims.report_data == b"Hello, world!" + bytes(51)
    assert claims.debug is False
    assert claims.tcb == {"isv_svn": 0, "isv_prod_id": 0, "qe_svn": 10, "pce_svn": 15}
    assert claims.details["fmspc"] == "00a067110000"
    assert claims.details["version"] == 3 and claims.details["quote_size"] == len(quote) == 4600


def test_debug_enclave_verifies_with_debug_true(quote: bytes) -> None:
    assert quote[REPORT + 0x30] & 0x02 == 0
    body = bytearray(quote[REPORT : REPORT + 384])
    body[0x30] |= 0x02  # attributes bit 1 = DEBUG
    forged, test_root = forge_under_test_root(quote, body=bytes(body))
    _refused(forged, "root")
    claims = verify_sgx(forged, roots=[test_root], now=NOW)
    assert claims.debug is True and claims.report_data.startswith(b"Hello, world!")


def test_fmspc_unreadable_is_none() -> None:
    from cryptography import x509

    root = dcap.bundled_intel_root()  # no SGX extension
    assert dcap.pck_fmspc(root) is None
    assert isinstance(root, x509.Certificate)


def test_zero_padding_accepted_nonzero_refused(quote: bytes) -> None:
    assert verify_sgx(quote + bytes(64), now=NOW).measurement.startswith("33d8736d")
    _refused(quote + b"\x00\x07", "format")


def test_intel_test_root_sample_refused(test_root_sample: bytes) -> None:
    # Intel's QVL sample quote carries certification data type 1 (PPID, CPUSVN, PCESVN), not a PCK
    # chain, so it cannot chain to the pinned root at all: refused before any signature is trusted.
    err = _refused(test_root_sample, "format")
    assert err.details["cert_type"] == 1


def test_quote_under_test_root_refused_as_root(quote: bytes) -> None:
    forged, test_root = forge_under_test_root(quote)
    err = _refused(forged, "root")
    assert err.details["fingerprint"] == dcap.fingerprint(test_root)
    assert verify_sgx(forged, roots=[test_root], now=NOW).report_data.startswith(b"Hello, world!")


@pytest.mark.parametrize("offset", [0, 1, 2, 4, 8, 10, 12, 28, 47])
def test_header_byte_changes_refused(quote: bytes, offset: int) -> None:
    bad = bytearray(quote)
    bad[offset] ^= 0x01
    _refused(bytes(bad), {"format", "signature"})


@pytest.mark.parametrize("offset", [0, 0x30, 0x40, 0x80, 0x100, 0x102, 0x140, 383])
def test_report_byte_changes_refused(quote: bytes, offset: int) -> None:
    bad = bytearray(quote)
    bad[REPORT + offset] ^= 0x01
    _refused(bytes(bad), "signature")


@pytest.mark.parametrize(
    ("offset", "checks"),
    [
        (SIG_START, {"signature"}),
        (SIG_START + 40, {"signature"}),
        (SIG_START + 64, {"qe_binding", "signature"}),
        (QE_REPORT + 1, {"signature"}),
        (QE_REPORT + 384 + 10, {"signature"}),
        (AUTH + 2 + 5, {"qe_binding"}),
        (AUTH + 2 + 32 + 6 + 500, {"format", "chain"}),
    ],
)
def test_signature_data_byte_changes_refused(quote: bytes, offset: int, checks: set[str]) -> None:
    bad = bytearray(quote)
    bad[offset] ^= 0x01
    _refused(bytes(bad), checks)


@pytest.mark.parametrize("length", [0, 3, 47, 48, 431, SIG_START, QE_REPORT, AUTH + 1, 2000, 4599])
def test_truncated_refused(quote: bytes, length: int) -> None:
    _refused(quote[:length], "format")


@pytest.mark.parametrize("version", [0, 2, 4, 5])
def test_unknown_version_refused(quote: bytes, version: int) -> None:
    err = _refused(struct.pack("<H", version) + quote[2:], "format")
    assert err.details["version"] == version


def test_tdx_quote_refused() -> None:
    tdx = (Path(__file__).resolve().parents[2] / "data" / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()
    _refused(tdx[:4935], "format")


@pytest.mark.parametrize(
    "now",
    [
        datetime(2023, 9, 20, 21, 53, 42, tzinfo=UTC),
        datetime(2030, 9, 20, 21, 53, 44, tzinfo=UTC),
    ],
)
def test_now_outside_validity_refused(quote: bytes, now: datetime) -> None:
    _refused(quote, "chain", now=now)
