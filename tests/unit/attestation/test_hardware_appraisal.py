"""Genuine hardware evidence through the relying party's appraisal (verify_evidence): a policy that
accepts only a given TDX or SNP measurement accepts that evidence and refuses a simulated one."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sealroom.attestation import (
    AppraisalPolicy,
    Evidence,
    SimulatedAttester,
    dev_init,
    report_data_for,
    verify_evidence,
)
from sealroom.attestation.nitro import verify_nitro
from sealroom.attestation.offline import load_certificate
from sealroom.attestation.snp import verify_snp
from sealroom.attestation.tdx import verify_tdx
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[2] / "data"
TDX = (DATA / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935]
SNP = (DATA / "snp" / "gosevguest-attestation-milan-debug.bin").read_bytes()
VCEK = (DATA / "snp" / "gosevguest-vcek-milan.der").read_bytes()
NITRO = (DATA / "nitro" / "evervault-attestation-doc.cbor").read_bytes()
AT = datetime(2025, 1, 1, tzinfo=UTC)
NONCE = b"n" * 32


def _tdx_claims():
    return verify_tdx(TDX, now=AT)


def test_a_pinned_tdx_measurement_is_accepted_and_a_simulated_enclave_refused(tmp_path):
    pc = _tdx_claims()
    policy = AppraisalPolicy(measurements=frozenset({pc.measurement}))
    claims = verify_evidence(
        Evidence("tdx", TDX, b"", NONCE),
        policy=policy,
        expected_report_data=pc.report_data,
        expected_nonce=NONCE,
        now=AT,
    )
    assert claims.platform == "tdx" and claims.simulated is False and claims.measurement == pc.measurement
    # The same relying party refuses simulated evidence, whatever its measurement says.
    root = dev_init(tmp_path / "dev")
    simulated = SimulatedAttester(root, measurement=pc.measurement).attest(
        report_data=report_data_for(hpke_public_key=b"h" * 32, signing_public_key=b"s" * 32, nonce=NONCE),
        nonce=NONCE,
    )
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            simulated,
            policy=policy,
            expected_report_data=report_data_for(hpke_public_key=b"h" * 32, signing_public_key=b"s" * 32, nonce=NONCE),
            expected_nonce=NONCE,
        )
    assert info.value.details["check"] == "simulated"


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"measurements": frozenset({"00" * 48})}, "measurement"),
        ({"report_data": os.urandom(64)}, "report_data"),
        ({"nonce": b"m" * 32}, "nonce"),
        ({"min_tcb": {"qe_svn": 10_000}}, "tcb"),
    ],
)
def test_tdx_evidence_is_refused_when_a_policy_check_fails(change, check):
    pc = _tdx_claims()
    policy = AppraisalPolicy(
        measurements=change.get("measurements", frozenset({pc.measurement})), min_tcb=change.get("min_tcb", {})
    )
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            Evidence("tdx", TDX, b"", change.get("nonce", NONCE)),
            policy=policy,
            expected_report_data=change.get("report_data", pc.report_data),
            expected_nonce=NONCE,
            now=AT,
        )
    assert info.value.details["check"] == check


def test_snp_evidence_with_its_vcek_in_aux_and_debug_refused_by_default():
    vcek = load_certificate(VCEK)
    pc = verify_snp(SNP, vcek=vcek, now=AT)
    evidence = Evidence("sev-snp", SNP, VCEK, NONCE)
    kwargs = {"expected_report_data": pc.report_data, "expected_nonce": NONCE, "now": AT}
    with pytest.raises(AttestationError) as info:
        verify_evidence(evidence, policy=AppraisalPolicy(measurements=frozenset({pc.measurement})), **kwargs)
    assert info.value.details["check"] == "debug"
    claims = verify_evidence(
        evidence, policy=AppraisalPolicy(measurements=frozenset({pc.measurement}), allow_debug=True), **kwargs
    )
    assert claims.platform == "sev-snp" and claims.debug is True
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            Evidence("sev-snp", SNP, b"", NONCE), policy=AppraisalPolicy(measurements=frozenset()), **kwargs
        )
    assert info.value.details["check"] == "envelope"


def test_nitro_evidence_must_bind_64_bytes_of_report_data():
    pc = verify_nitro(NITRO)
    assert pc.issued_at is not None
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            Evidence("nitro", NITRO, b"", NONCE),
            policy=AppraisalPolicy(measurements=frozenset({pc.measurement})),
            expected_report_data=b"\0" * 64,
            expected_nonce=NONCE,
            now=pc.issued_at + timedelta(seconds=1),
        )
    assert info.value.details["check"] == "report_data"


def _trust(doc: dict, tmp_path: Path) -> AppraisalPolicy:
    from sealroom.policy import TrustPolicy

    return TrustPolicy.from_dict(doc, source="party.toml", base=tmp_path).appraisal()


def test_a_trust_section_pins_tdx_rtmrs_and_platform_tcb_minimums(tmp_path):
    """MRTD measures the TD's firmware only; the kernel, initrd and command line are in RTMR1/2."""
    pc = _tdx_claims()
    ms = pc.measurements
    kwargs = {"expected_report_data": pc.report_data, "expected_nonce": NONCE, "now": AT}
    evidence = Evidence("tdx", TDX, b"", NONCE)
    pinned = {"measurements": [pc.measurement], "expect": {"tdx": {"rtmr1": [ms["rtmr1"]], "rtmr2": [ms["rtmr2"]]}}}
    claims = verify_evidence(evidence, policy=_trust(pinned, tmp_path), **kwargs)
    assert (
        claims.measurements["rtmr1"] == ms["rtmr1"] and claims.to_json_dict()["measurements"]["mrtd"] == pc.measurement
    )
    other = {**pinned, "expect": {"tdx": {"rtmr1": [ms["rtmr1"]], "rtmr2": ["00" * 48]}}}
    with pytest.raises(AttestationError, match="rtmr2") as info:
        verify_evidence(evidence, policy=_trust(other, tmp_path), **kwargs)
    assert info.value.details["check"] == "measurement"
    # An SNP pin does not apply to TDX evidence; a TDX minimum does.
    snp_only = {**pinned, "expect": {"sev-snp": {"host_data": ["00" * 32]}}, "min_tcb": {"sev-snp": {"snp": 99}}}
    verify_evidence(evidence, policy=_trust(snp_only, tmp_path), **kwargs)
    with pytest.raises(AttestationError) as info:
        verify_evidence(evidence, policy=_trust({**pinned, "min_tcb": {"tdx": {"qe_svn": 10_000}}}, tmp_path), **kwargs)
    assert info.value.details["check"] == "tcb"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"allow_debug": "yes"}, "trust.allow_debug"),
        ({"min_tcb": {"sev": {"snp": 1}}}, "trust.min_tcb.sev"),
        ({"min_tcb": {"tdx": {"qe_svn": -1}}}, "trust.min_tcb.tdx.qe_svn"),
        ({"roots": {"sev-snp": "ark.pem"}}, "trust.roots.sev-snp"),
        ({"expect": {"tdx": {"rtmr1": ["xyz"]}}}, "trust.expect.tdx.rtmr1"),
        ({"expect": {"tpm": {"pcr7": ["00"]}}}, "trust.expect.tpm"),
    ],
)
def test_trust_section_mistakes_name_the_key(doc, key, tmp_path):
    from sealroom.errors import ConfigError
    from sealroom.policy import TrustPolicy

    with pytest.raises(ConfigError) as info:
        TrustPolicy.from_dict(doc, source="party.toml", base=tmp_path)
    assert info.value.details["key"] == key and key in str(info.value)


def test_a_missing_root_file_is_a_clear_error(tmp_path):
    from sealroom.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        _trust({"roots": {"sev-snp": ["nowhere.pem"]}}, tmp_path)


def test_intel_collateral_in_the_trust_section(tmp_path):
    """With collateral configured, the agents' appraisal consults Intel's view of the platform: the
    genuine SGX quote's status (ConfigurationAndSWHardeningNeeded) passes; the genuine TDX quote's
    platform has no TCB level in its collateral and is refused; stale collateral is refused."""
    from sealroom.attestation.sgx import verify_sgx

    sgx = (DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin").read_bytes()
    sgx_at = datetime(2025, 7, 1, tzinfo=UTC)
    pc = verify_sgx(sgx, now=sgx_at)
    doc = {
        "measurements": [pc.measurement],
        "intel_collateral": {"sgx": str(DATA / "sgx" / "dcapqvl-sgx-quote-v3-collateral.json")},
    }
    kwargs = {"expected_report_data": pc.report_data, "expected_nonce": NONCE}
    evidence = Evidence("sgx", sgx, b"", NONCE)
    verify_evidence(evidence, policy=_trust(doc, tmp_path), now=sgx_at, **kwargs)
    with pytest.raises(AttestationError) as info:
        verify_evidence(evidence, policy=_trust(doc, tmp_path), now=datetime(2025, 8, 1, tzinfo=UTC), **kwargs)
    assert info.value.details["check"] == "collateral"

    tdx_dir = tmp_path / "tdx-collateral"
    tdx_dir.mkdir()
    for name in (
        "gotdxguest-pckcrl.der",
        "gotdxguest-qeidentity-response.json",
        "gotdxguest-rootcrl.der",
        "gotdxguest-tcbinfo-response.json",
        "qeidentity_issuer_chain.pem",
        "tcbinfo_issuer_chain.pem",
    ):
        (tdx_dir / name).write_bytes((DATA / "tdx" / name).read_bytes())
    tdx_at = datetime(2023, 7, 1, tzinfo=UTC)
    pt = verify_tdx(TDX, now=tdx_at)
    tdx_doc = {"measurements": [pt.measurement], "intel_collateral": {"tdx": str(tdx_dir)}}
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            Evidence("tdx", TDX, b"", NONCE),
            policy=_trust(tdx_doc, tmp_path),
            expected_report_data=pt.report_data,
            expected_nonce=NONCE,
            now=tdx_at,
        )
    assert info.value.details["check"] == "tcb_status"
    # Without collateral the same quote passes: the check really comes from the collateral.
    verify_evidence(
        Evidence("tdx", TDX, b"", NONCE),
        policy=_trust({"measurements": [pt.measurement]}, tmp_path),
        expected_report_data=pt.report_data,
        expected_nonce=NONCE,
        now=tdx_at,
    )
    from sealroom.errors import ConfigError

    with pytest.raises(ConfigError, match="intel_collateral"):
        _trust({"intel_collateral": {"snp": "x"}}, tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        _trust({"intel_collateral": {"tdx": "missing-dir"}}, tmp_path)
