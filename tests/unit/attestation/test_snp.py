"""SEV-SNP verifier against a genuine Milan report (go-sev-guest test data, see tests/data/snp/README.md)."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from sealroom.attestation import snp
from sealroom.attestation.platform import PlatformClaims
from sealroom.attestation.snp import (
    PINNED_ARK_SHA256,
    REPORT_SIZE,
    SIGNED_SIZE,
    bundled_ark,
    bundled_ask,
    verify_snp,
)
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[2] / "data" / "snp"
ROOTS = Path(__file__).resolve().parents[3] / "sealroom" / "attestation" / "roots"
NOW = datetime(2024, 1, 1, tzinfo=UTC)  # inside VCEK validity (2022-09-24 .. 2029-09-24)
MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"


@pytest.fixture(scope="module")
def report() -> bytes:
    return (DATA / "gosevguest-attestation-milan-debug.bin").read_bytes()


@pytest.fixture(scope="module")
def vcek() -> x509.Certificate:
    with warnings.catch_warnings():  # serial number 0: cryptography warns (RFC 5280 wants positive)
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate((DATA / "gosevguest-vcek-milan.der").read_bytes())


def _refused(report: bytes, vcek: x509.Certificate, check: str, **kw: object) -> AttestationError:
    with pytest.raises(AttestationError) as ei:
        verify_snp(report, vcek=vcek, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    assert ei.value.details["check"] == check, ei.value
    return ei.value


def test_genuine_milan_report_verifies(report: bytes, vcek: x509.Certificate) -> None:
    claims = verify_snp(report, vcek=vcek, now=NOW)
    assert isinstance(claims, PlatformClaims)
    assert claims.platform == "sev-snp"
    assert claims.measurement == MEASUREMENT
    assert claims.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert claims.debug is True
    assert dict(claims.tcb) == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    d = claims.details
    assert d["version"] == 2 and d["vmpl"] == 0 and d["policy"] == 0xB0000 and d["product"] == "milan"
    assert d["smt"] is True and d["migration_agent"] is False
    assert d["chip_id"].startswith("3ac3fe21e13fb099")
    claims.to_json_dict()


def test_explicit_bundled_ark_and_ask_verify(report: bytes, vcek: x509.Certificate) -> None:
    claims = verify_snp(report, vcek=vcek, ask=bundled_ask("milan"), ark=bundled_ark("milan"), now=NOW)
    assert claims.measurement == MEASUREMENT


def test_bundled_roots_match_pins() -> None:
    for product in PINNED_ARK_SHA256:
        assert f"CN=ARK-{product.capitalize()}" in bundled_ark(product).subject.rfc4514_string()
        assert f"CN=SEV-{product.capitalize()}" in bundled_ask(product).subject.rfc4514_string()
        assert (ROOTS / f"amd_ark_{product}.pem").is_file()


def test_tcb_and_chip_id_must_match_vcek(report: bytes, vcek: x509.Certificate) -> None:
    # A changed REPORTED_TCB or CHIP_ID breaks the signature first, so exercise the binding check directly.
    for offset in (0x180, 0x181, 0x186, 0x187, 0x1A0, 0x1DF):
        mutated = bytearray(report)
        mutated[offset] ^= 0x01
        rep = snp._parse(bytes(mutated))
        with pytest.raises(AttestationError) as ei:
            snp._check_tcb_binding(rep, vcek, "milan", snp._tcb_fields(rep.reported_tcb, "milan"))
        assert ei.value.details["check"] == "tcb_binding"
    rep = snp._parse(report)
    snp._check_tcb_binding(rep, vcek, "milan", snp._tcb_fields(rep.reported_tcb, "milan"))


_OFFSETS = sorted({(i * SIGNED_SIZE) // 64 for i in range(64)} | {SIGNED_SIZE - 1})
_SIG_OFFSETS = [0x2A0, 0x2A0 + 20, 0x2A0 + 47, 0x2E8, 0x2E8 + 30, 0x2E8 + 47, 0x2E8 + 60, 0x400]


@pytest.mark.parametrize("offset", _OFFSETS + _SIG_OFFSETS)
def test_single_byte_change_is_refused(report: bytes, vcek: x509.Certificate, offset: int) -> None:
    mutated = bytearray(report)
    mutated[offset] ^= 0x01
    with pytest.raises(AttestationError) as ei:
        verify_snp(bytes(mutated), vcek=vcek, now=NOW)
    assert ei.value.details["check"] in {"format", "signature"}


def test_wrong_ark_is_refused(report: bytes, vcek: x509.Certificate) -> None:
    # Genoa's ARK is pinned, but it did not issue Milan's ASK.
    _refused(report, vcek, "chain", ark=bundled_ark("genoa"))
    _refused(report, vcek, "chain", ark=bundled_ark("genoa"), ask=bundled_ask("genoa"))


def test_unpinned_ark_is_refused(report: bytes, vcek: x509.Certificate) -> None:
    ask = bundled_ask("milan")  # an RSA cert that is not a pinned root
    _refused(report, vcek, "root", ark=ask)


def test_truncated_and_padded_reports_are_refused(report: bytes, vcek: x509.Certificate) -> None:
    assert len(report) == REPORT_SIZE
    _refused(report[:-1], vcek, "format")
    _refused(report[:SIGNED_SIZE], vcek, "format")
    _refused(report + b"\x00", vcek, "format")
    _refused(b"", vcek, "format")


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_version_is_refused(report: bytes, vcek: x509.Certificate, version: int) -> None:
    mutated = version.to_bytes(4, "little") + report[4:]
    err = _refused(mutated, vcek, "format")
    assert err.details["version"] == version


def test_now_outside_validity_is_refused(report: bytes, vcek: x509.Certificate) -> None:
    _refused(report, vcek, "chain", now=datetime(2022, 9, 23, tzinfo=UTC))
    _refused(report, vcek, "chain", now=datetime(2029, 9, 25, tzinfo=UTC))


def test_naive_now_is_rejected(report: bytes, vcek: x509.Certificate) -> None:
    with pytest.raises(ValueError):
        verify_snp(report, vcek=vcek, now=datetime(2024, 1, 1))


def test_vcek_from_another_chain_is_refused(report: bytes) -> None:
    # The Milan ASK as "VCEK": RSA, issued by the ARK, not the ASK -> chain refuses it.
    with pytest.raises(AttestationError) as ei:
        verify_snp(report, vcek=bundled_ask("milan"), now=NOW)
    assert ei.value.details["check"] == "chain"


def test_vlek_signed_reports_chain_through_the_asvk() -> None:
    """AMD issues VLEKs to cloud providers (ARK -> ASVK -> VLEK); the leaf's role must match the report."""
    from tests.harness.tee_fakes import FakeAmdPki

    now = datetime.now(UTC)
    vlek = FakeAmdPki.create(vlek=True)
    report = vlek.report(bytes(64), measurement=bytes(range(48)))
    claims = verify_snp(report, vcek=vlek.vcek, ask=vlek.ask, roots=[vlek.ark], now=now)
    assert claims.details["signing_key"] == "vlek" and claims.details["csp_id"] == "sealroom-test-cloud"
    assert claims.measurement == bytes(range(48)).hex()
    with pytest.raises(AttestationError, match="ASVK") as ei:
        verify_snp(report, vcek=vlek.vcek, roots=[vlek.ark], now=now)
    assert ei.value.details["check"] == "chain"
    # The same report with a VCEK of another chain, and a VCEK-signed report with a VLEK: the roles differ.
    vcek = FakeAmdPki.create()
    with pytest.raises(AttestationError) as ei:
        verify_snp(report, vcek=vcek.vcek, ask=vcek.ask, roots=[vcek.ark], now=now)
    assert ei.value.details["check"] == "chain"
    with pytest.raises(AttestationError) as ei:
        verify_snp(
            vcek.report(bytes(64), measurement=bytes(48)), vcek=vlek.vcek, ask=vlek.ask, roots=[vlek.ark], now=now
        )
    assert ei.value.details["check"] == "chain"
    # A test root is trusted only where a policy names it: not by default.
    with pytest.raises(AttestationError) as ei:
        verify_snp(report, vcek=vlek.vcek, ask=vlek.ask, now=now)
    assert ei.value.details["check"] in {"chain", "root"}
    # Signing key 2 (none of VCEK, VLEK) is refused as a format error.
    bad = bytearray(report)
    bad[0x48] = 2 << 2
    with pytest.raises(AttestationError) as ei:
        verify_snp(bytes(bad), vcek=vlek.vcek, ask=vlek.ask, roots=[vlek.ark], now=now)
    assert ei.value.details["check"] == "format"
