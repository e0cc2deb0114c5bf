"""`sealroom attest verify`: genuine evidence verifies, debug and wrong measurements are refused (1),
unusable input is 2."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
SNP = DATA / "snp" / "gosevguest-attestation-milan-debug.bin"
VCEK = DATA / "snp" / "gosevguest-vcek-milan.der"
NITRO = DATA / "nitro" / "evervault-attestation-doc.cbor"
SNP_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
AT = "2024-01-01T00:00:00Z"


def attest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "sealroom.cli", "attest", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_genuine_snp_report_verifies_with_debug_allowed():
    proc = attest("--format", "snp", str(SNP), "--cert", str(VCEK), "--at", AT, "--allow-debug", "--json")
    assert proc.returncode == 0, proc.stderr
    claims = json.loads(proc.stdout)["claims"]
    assert claims["measurement"] == SNP_MEASUREMENT and claims["debug"] is True
    assert claims["report_data"].startswith("0102030405")


def test_debug_snp_report_is_refused_by_default():
    proc = attest("--format", "snp", str(SNP), "--cert", str(VCEK), "--at", AT)
    assert proc.returncode == 1 and "refused (debug)" in proc.stderr


def test_expected_measurement_is_checked(tmp_path):
    proc = attest(
        "--format", "snp", str(SNP), "--cert", str(VCEK), "--at", AT, "--allow-debug",
        "--expect-measurement", "00" * 48,
    )  # fmt: skip
    assert proc.returncode == 1 and "refused (measurement)" in proc.stderr
    hexed = tmp_path / "report.hex"
    hexed.write_text(SNP.read_bytes().hex())
    proc = attest(
        "--format", "snp", str(hexed), "--cert", str(VCEK), "--at", AT, "--allow-debug",
        "--expect-measurement", SNP_MEASUREMENT.upper(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_nitro_document_verifies_raw_and_base64(tmp_path):
    assert attest("--format", "nitro", str(NITRO)).returncode == 0
    b64 = tmp_path / "doc.b64"
    b64.write_text(base64.b64encode(NITRO.read_bytes()).decode())
    proc = attest("--format", "nitro", str(b64), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["claims"]["platform"] == "nitro"


@pytest.mark.parametrize("case", ["truncated", "missing_file", "no_vcek"])
def test_unusable_input_exits_2_or_names_what_is_missing(tmp_path, case):
    if case == "truncated":
        bad = tmp_path / "short.bin"
        bad.write_bytes(SNP.read_bytes()[:100])
        proc = attest("--format", "snp", str(bad), "--cert", str(VCEK))
        assert proc.returncode == 2 and "refused (format)" in proc.stderr
    elif case == "missing_file":
        proc = attest("--format", "snp", str(tmp_path / "nope.bin"))
        assert proc.returncode == 2 and "cannot read the evidence" in proc.stderr
    else:
        proc = attest("--format", "snp", str(SNP), "--at", AT)
        assert proc.returncode == 1 and "needs exactly one VCEK" in proc.stderr


def test_tdx_and_sgx_quotes_verify_from_the_command_line(tmp_path):
    tdx = tmp_path / "tdx.dat"
    tdx.write_bytes((DATA / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935])
    proc = attest("--format", "tdx", str(tdx), "--at", "2025-01-01T00:00:00Z", "--json")
    assert proc.returncode == 0, proc.stderr
    claims = json.loads(proc.stdout)["claims"]
    assert claims["platform"] == "tdx" and claims["measurement"].startswith("6363b8043668a3ad")
    sgx = DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin"
    proc = attest("--format", "sgx", str(sgx), "--at", "2025-01-01T00:00:00Z", "--json")
    assert proc.returncode == 0, proc.stderr
    assert bytes.fromhex(json.loads(proc.stdout)["claims"]["report_data"]).startswith(b"Hello, world!")
