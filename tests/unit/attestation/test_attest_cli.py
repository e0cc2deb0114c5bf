"""`sealroom attest verify`: genuine evidence verifies, debug and wrong measurements are refused (1),
unusable input is 2."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

DATA = Path(__file__).resolve().parents[2] / "data"
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


NITRO_AT = "2022-10-13T09:00:00Z"  # two minutes after the document was made; its chain expired since


def test_nitro_document_verifies_raw_and_base64(tmp_path):
    assert attest("--format", "nitro", str(NITRO), "--at", NITRO_AT).returncode == 0
    b64 = tmp_path / "doc.b64"
    b64.write_text(base64.b64encode(NITRO.read_bytes()).decode())
    proc = attest("--format", "nitro", str(b64), "--at", NITRO_AT, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["claims"]["platform"] == "nitro"


def test_without_at_evidence_is_verified_as_of_now():
    """A Nitro document whose certificate chain expired long ago is refused today, not verified as of
    the document's own timestamp."""
    proc = attest("--format", "nitro", str(NITRO), "--json")
    assert proc.returncode == 1, proc.stdout
    doc = json.loads(proc.stdout)
    assert doc["verified"] is False and doc["check"] == "chain"
    assert "not valid at the verification time" in doc["reason"]["message"]


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


def test_intel_collateral_from_the_command_line(tmp_path):
    sgx = DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin"
    collateral = DATA / "sgx" / "dcapqvl-sgx-quote-v3-collateral.json"
    proc = attest(
        "--format", "sgx", str(sgx), "--collateral", str(collateral), "--at", "2025-07-01T00:00:00Z", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    details = json.loads(proc.stdout)["claims"]["details"]
    assert details["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert details["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    proc = attest("--format", "sgx", str(sgx), "--collateral", str(collateral), "--at", "2025-07-01T00:00:00Z")
    assert proc.returncode == 0 and "TCB status ConfigurationAndSWHardeningNeeded" in proc.stdout
    # Stale collateral (after its nextUpdate) is refused (1).
    proc = attest("--format", "sgx", str(sgx), "--collateral", str(collateral), "--at", "2025-08-01T00:00:00Z")
    assert proc.returncode == 1 and "refused (collateral)" in proc.stderr and "stale" in proc.stderr
    # The genuine TDX collateral (a directory of PCS files) lists no TCB level for this platform: refused (1).
    tdx = tmp_path / "tdx.dat"
    tdx.write_bytes((DATA / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935])
    proc = attest("--format", "tdx", str(tdx), "--collateral", str(DATA / "tdx"), "--at", "2023-07-01T00:00:00Z")
    assert proc.returncode == 1 and "refused (tcb_status)" in proc.stderr


def test_out_of_date_tcb_refused_unless_allowed(tmp_path):
    from tests.unit.attestation.test_collateral import PCK, TEE, _level, _tdx_lab

    lab = _tdx_lab([_level(PCK, 11, TEE, "OutOfDate", "INTEL-SA-00001")])
    quote, root, coll = tmp_path / "quote.dat", tmp_path / "root.pem", tmp_path / "collateral"
    quote.write_bytes(lab.forged.quote)
    root.write_bytes(lab.forged.root.public_bytes(serialization.Encoding.PEM))
    coll.mkdir()
    files = lab.files()
    for name in ("tcb_info", "qe_identity", "pck_crl", "root_crl"):
        (coll / name).write_bytes(files[name])
    (coll / "chain.pem").write_bytes(files["tcb_info_issuer_chain"])
    args = ("--format", "tdx", str(quote), "--root", str(root), "--collateral", str(coll), "--at", "2023-07-01T00:00Z")
    proc = attest(*args)
    assert proc.returncode == 1 and "refused (tcb_status)" in proc.stderr and "INTEL-SA-00001" in proc.stderr
    proc = attest(*args, "--allow-out-of-date", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["claims"]["details"]["tcb_status"] == "OutOfDate"


@pytest.mark.parametrize("case", ["not_intel", "malformed", "missing"])
def test_unusable_collateral_exits_2(tmp_path, case):
    sgx = str(DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin")
    if case == "not_intel":
        proc = attest("--format", "snp", str(SNP), "--cert", str(VCEK), "--collateral", str(DATA / "tdx"))
        assert proc.returncode == 2 and "--collateral applies to" in proc.stderr
    elif case == "malformed":
        bad = tmp_path / "c.json"
        bad.write_text('{"tcb_info": 1}')
        proc = attest("--format", "sgx", sgx, "--collateral", str(bad))
        assert proc.returncode == 2 and "unusable collateral" in proc.stderr
    else:
        proc = attest("--format", "sgx", sgx, "--collateral", str(tmp_path / "nope"))
        assert proc.returncode == 2 and "collateral" in proc.stderr
