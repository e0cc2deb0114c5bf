"""What an enclave reads from its own hardware evidence without verifying it (its measurement, and
the report data it asked the platform to bind): the same fields the full verifiers return, for every
hardware format, and a refusal for a format that is not hardware."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealroom.attestation import Evidence
from sealroom.attestation.hardware import evidence_measurement, evidence_report_data
from sealroom.attestation.nitro import verify_nitro
from sealroom.attestation.offline import load_certificate
from sealroom.attestation.platform import HARDWARE_FORMATS, PlatformClaims
from sealroom.attestation.sgx import verify_sgx
from sealroom.attestation.snp import verify_snp
from sealroom.attestation.tdx import verify_tdx
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[2] / "data"
AT = datetime(2025, 1, 1, tzinfo=UTC)
TDX = (DATA / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935]
SGX = (DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin").read_bytes()
SNP = (DATA / "snp" / "gosevguest-attestation-milan-debug.bin").read_bytes()
VCEK = (DATA / "snp" / "gosevguest-vcek-milan.der").read_bytes()
NITRO = (DATA / "nitro" / "evervault-attestation-doc.cbor").read_bytes()


def _verified(fmt: str) -> tuple[bytes, PlatformClaims]:
    if fmt == "tdx":
        return TDX, verify_tdx(TDX, now=AT)
    if fmt == "sgx":
        return SGX, verify_sgx(SGX, now=AT)
    if fmt == "sev-snp":
        return SNP, verify_snp(SNP, vcek=load_certificate(VCEK), now=AT)
    return NITRO, verify_nitro(NITRO)


@pytest.mark.parametrize("fmt", HARDWARE_FORMATS)
def test_unverified_fields_are_the_ones_the_verifier_returns(fmt: str) -> None:
    raw, claims = _verified(fmt)
    evidence = Evidence(fmt, raw, b"", b"n" * 32)
    assert evidence_measurement(evidence) == claims.measurement
    assert evidence_report_data(evidence) == claims.report_data
    assert len(claims.report_data) == 64 or fmt == "nitro"


@pytest.mark.parametrize("reader", [evidence_measurement, evidence_report_data])
def test_a_format_that_is_not_hardware_is_refused(reader) -> None:
    with pytest.raises(AttestationError, match="'simulated' is not a hardware format") as info:
        reader(Evidence("simulated", b"{}", b"", b"n" * 32))
    assert info.value.details["check"] == "format"


@pytest.mark.parametrize("fmt", ["tdx", "sgx", "sev-snp"])
def test_truncated_evidence_is_refused(fmt: str) -> None:
    raw, _ = _verified(fmt)
    with pytest.raises(AttestationError):
        evidence_report_data(Evidence(fmt, raw[:100], b"", b"n" * 32))
