"""The enclave worker's hardware attesters, against fake kernel interfaces in temporary directories.

configfs-tsm (SEV-SNP, TDX) and Gramine's /dev/attestation are pseudo-files: the fakes in
tests/tee_fakes.py serve them from FIFOs the way the kernel does (a report is produced when outblob
is read after inblob was written). The SNP reports are real SNP reports signed by a test AMD-shaped
chain, so the evidence the attester produces goes through the real verifier and appraisal.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from enclave_worker.attester import (
    NSM_IOCTL_REQUEST,
    _Nitro,
    make_attester,
    nsm_attestation_document,
    nsm_attestation_request,
    snp_certificates_from_table,
)
from enclave_worker.config import EnclaveConfig
from sealroom.attestation import AppraisalPolicy, Evidence, cbor, report_data_for, verify_evidence
from sealroom.attestation.nitro import verify_nitro
from sealroom.errors import AttestationError, ConfigError
from tests.harness.tee_fakes import FakeAmdPki, FakeConfigfsTsm, FakeGramine

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="the fake kernel interfaces need FIFOs (POSIX)")

DATA = Path(__file__).parent.parent.parent / "data"
MEASUREMENT = hashlib.sha384(b"sealroom test image").digest()


@pytest.fixture(scope="module")
def pki() -> FakeAmdPki:
    return FakeAmdPki.create()


@pytest.fixture
def tsm(tmp_path: Path, pki: FakeAmdPki) -> Iterator[FakeConfigfsTsm]:
    fake = FakeConfigfsTsm(
        tmp_path / "tsm" / "report",
        make_report=lambda data: pki.report(data, measurement=MEASUREMENT),
        auxblob=pki.cert_table(),
    )
    yield fake
    fake.close()


TDX_QUOTE = (DATA / "tdx" / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935]
SGX_QUOTE = (DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin").read_bytes()
NITRO_DOC = (DATA / "nitro" / "evervault-attestation-doc.cbor").read_bytes()


def _with_report_data(fmt: str, raw: bytes, report_data: bytes) -> bytes:
    """A genuine quote or document with its report data replaced, as a platform answering this
    request would bind it (its signature no longer verifies: the attester parses, never verifies)."""
    if fmt == "tdx":
        off = 48 + 520
        return raw[:off] + report_data + raw[off + 64 :]
    if fmt == "sgx":
        off = 48 + 0x140
        return raw[:off] + report_data + raw[off + 64 :]
    outer = cbor.loads(raw)
    outer = outer.value if isinstance(outer, cbor.Tagged) else outer
    payload = cbor.loads(outer[2])
    payload["user_data"] = report_data
    return cbor.dumps([outer[0], outer[1], cbor.dumps(payload), outer[3]])


def _config(**kw: object) -> EnclaveConfig:
    return EnclaveConfig(listen="127.0.0.1:0", **kw)  # type: ignore[arg-type]


def _policy(pki: FakeAmdPki, **kw: object) -> AppraisalPolicy:
    return AppraisalPolicy(measurements=frozenset({MEASUREMENT.hex()}), platform_roots={"sev-snp": (pki.ark,)}, **kw)  # type: ignore[arg-type]


def _keys() -> tuple[bytes, bytes, bytes]:
    return os.urandom(32), os.urandom(32), os.urandom(32)


def test_snp_attester_binds_report_data_and_its_evidence_verifies(tsm: FakeConfigfsTsm, pki: FakeAmdPki) -> None:
    attester = make_attester(_config(attester="sev-snp", tsm_path=tsm.root))
    try:
        assert attester.format == "sev-snp" and attester.simulated is False
        assert attester.measurement == MEASUREMENT.hex()  # read from its own start-up report
        hpke, signing, nonce = _keys()
        report_data = report_data_for(hpke_public_key=hpke, signing_public_key=signing, nonce=nonce)
        evidence = attester.attest(report_data=report_data, nonce=nonce)
        assert tsm.requests[-1] == report_data  # exactly the 64 bytes went to inblob
        claims = verify_evidence(evidence, policy=_policy(pki), expected_report_data=report_data, expected_nonce=nonce)
        assert claims.platform == "sev-snp" and claims.measurement == MEASUREMENT.hex() and not claims.simulated
        # The same evidence under the built-in AMD roots: our test chain is not AMD's.
        with pytest.raises(AttestationError) as ei:
            verify_evidence(
                evidence,
                policy=AppraisalPolicy(measurements=frozenset({MEASUREMENT.hex()})),
                expected_report_data=report_data,
                expected_nonce=nonce,
            )
        assert ei.value.details["check"] in {"chain", "root"}
        # Another job's keys: the report data does not match.
        with pytest.raises(AttestationError) as ei:
            verify_evidence(
                evidence,
                policy=_policy(pki),
                expected_report_data=report_data_for(hpke_public_key=hpke, signing_public_key=hpke, nonce=nonce),
                expected_nonce=nonce,
            )
        assert ei.value.details["check"] == "report_data"
    finally:
        attester.close()
    assert tsm.entries() == [] or all(e.name.startswith("sealroom-") for e in tsm.entries())


def test_snp_attester_refuses_a_report_raced_by_another_writer(tmp_path: Path, pki: FakeAmdPki) -> None:
    fake = FakeConfigfsTsm(
        tmp_path / "report",
        make_report=lambda data: pki.report(data, measurement=MEASUREMENT),
        auxblob=pki.cert_table(),
        extra_writes=1,
    )
    try:
        with pytest.raises(AttestationError, match="written by another process"):
            make_attester(_config(attester="sev-snp", tsm_path=fake.root))
    finally:
        fake.close()


def test_snp_attester_without_a_vcek_refuses_to_start_unless_configured(tmp_path: Path, pki: FakeAmdPki) -> None:
    fake = FakeConfigfsTsm(
        tmp_path / "report", make_report=lambda data: pki.report(data, measurement=MEASUREMENT), auxblob=b""
    )
    try:
        with pytest.raises(ConfigError, match="VCEK") as ei:
            make_attester(_config(attester="sev-snp", tsm_path=fake.root))
        assert "snp_certificates" in str(ei.value)
        certs = tmp_path / "vcek.pem"
        certs.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki.vcek, pki.ask)))
        attester = make_attester(_config(attester="sev-snp", tsm_path=fake.root, snp_certificates=certs))
        try:
            nonce = os.urandom(16)
            rd = hashlib.sha512(nonce).digest()
            verify_evidence(
                attester.attest(report_data=rd, nonce=nonce),
                policy=_policy(pki),
                expected_report_data=rd,
                expected_nonce=nonce,
            )
        finally:
            attester.close()
    finally:
        fake.close()


def test_tdx_attester_reads_a_quote_and_names_its_mrtd(tmp_path: Path) -> None:
    fake = FakeConfigfsTsm(
        tmp_path / "report", provider="tdx_guest", make_report=lambda data: _with_report_data("tdx", TDX_QUOTE, data)
    )
    try:
        attester = make_attester(_config(attester="tdx", tsm_path=fake.root))
        try:
            assert attester.measurement.startswith("6363b8043668a3ad")
            evidence = attester.attest(report_data=bytes(range(64)), nonce=os.urandom(16))
            assert evidence.format == "tdx" and evidence.aux == b""
            assert evidence.evidence == _with_report_data("tdx", TDX_QUOTE, bytes(range(64)))
            assert fake.requests[-1] == bytes(range(64))
        finally:
            attester.close()
    finally:
        fake.close()


def test_a_report_that_does_not_bind_the_request_is_not_used(tmp_path: Path) -> None:
    """Another process using the interface at the same moment could hand this worker a report for
    someone else's report data: the attester checks what it got (here the platform answers every
    request with the same quote)."""
    fake = FakeConfigfsTsm(tmp_path / "report", provider="tdx_guest", make_report=lambda _data: TDX_QUOTE)
    try:
        with pytest.raises(AttestationError, match="does not bind the report data"):
            make_attester(_config(attester="tdx", tsm_path=fake.root))
    finally:
        fake.close()


def test_a_hardware_attester_it_cannot_reach_refuses_to_start(tmp_path: Path, pki: FakeAmdPki) -> None:
    with pytest.raises(ConfigError, match="configfs-tsm") as ei:
        make_attester(_config(attester="sev-snp", tsm_path=tmp_path / "no-such-dir"))
    assert "confidential VM" in str(ei.value)
    # A TDX VM's configfs-tsm, configured as SEV-SNP: the provider says which platform this is.
    fake = FakeConfigfsTsm(tmp_path / "report", provider="tdx_guest", make_report=lambda d: b"x")
    try:
        with pytest.raises(ConfigError, match="tdx_guest"):
            make_attester(_config(attester="sev-snp", tsm_path=fake.root))
    finally:
        fake.close()
    # A plain directory is not configfs: nothing populates the entry.
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not"):
        make_attester(_config(attester="tdx", tsm_path=plain))
    assert list(plain.iterdir()) == []  # the entry it created is removed again
    with pytest.raises(ConfigError, match="Gramine"):
        make_attester(_config(attester="sgx", gramine_path=tmp_path / "no-attestation"))
    with pytest.raises(ConfigError, match="Nitro Secure Module"):
        make_attester(_config(attester="nitro", nsm_device=tmp_path / "no-nsm"))


def test_gramine_attester_writes_user_report_data_and_reads_the_quote(tmp_path: Path) -> None:
    quote = SGX_QUOTE
    seen: list[bytes] = []
    fake = FakeGramine(
        tmp_path / "attestation", quote=lambda data: seen.append(data) or _with_report_data("sgx", quote, data)
    )
    try:
        attester = make_attester(_config(attester="sgx", gramine_path=tmp_path / "attestation"))
        evidence = attester.attest(report_data=b"\x07" * 64, nonce=os.urandom(16))
        assert evidence.format == "sgx" and evidence.evidence == _with_report_data("sgx", quote, b"\x07" * 64)
        assert seen[-1] == b"\x07" * 64
        assert len(attester.measurement) == 64
    finally:
        fake.close()
    epid = FakeGramine(tmp_path / "epid", quote=lambda data: quote, attestation_type="epid")
    try:
        with pytest.raises(ConfigError, match="DCAP"):
            make_attester(_config(attester="sgx", gramine_path=tmp_path / "epid"))
    finally:
        epid.close()


def test_nsm_request_and_response_framing(tmp_path: Path) -> None:
    """The NSM ioctl itself needs a Nitro Enclave; what crosses it is checked here: the CBOR request,
    and a response carrying a genuine attestation document, which then verifies."""
    document = (DATA / "nitro" / "evervault-attestation-doc.cbor").read_bytes()
    assert NSM_IOCTL_REQUEST == 0xC0200A00  # _IOWR(0x0A, 0, struct nsm_message { 2 x iovec })
    request = nsm_attestation_request(user_data=b"\x01" * 64, nonce=b"\x02" * 16)
    assert cbor.loads(request) == {
        "Attestation": {"user_data": b"\x01" * 64, "nonce": b"\x02" * 16, "public_key": None}
    }
    assert nsm_attestation_document(cbor.dumps({"Attestation": {"document": document}})) == document
    with pytest.raises(AttestationError, match="refused"):
        nsm_attestation_document(cbor.dumps({"Error": "InvalidArgument"}))
    with pytest.raises(AttestationError):
        nsm_attestation_document(b"\xff\x00")

    device = tmp_path / "nsm"
    device.write_bytes(b"")
    calls: list[bytes] = []

    def transport(fd: int, req: bytes) -> bytes:
        calls.append(req)
        user_data = cbor.loads(req)["Attestation"]["user_data"]  # the NSM binds what it is asked to
        return cbor.dumps({"Attestation": {"document": _with_report_data("nitro", document, user_data)}})

    attester = _Nitro(_config(attester="nitro", nsm_device=device), transport=transport)
    try:
        claims = verify_nitro(document)  # at the document's own time
        assert attester.measurement == claims.measurement
        evidence = attester.attest(report_data=b"\x03" * 64, nonce=b"\x04" * 16)
        assert evidence.format == "nitro" and evidence.evidence == _with_report_data("nitro", document, b"\x03" * 64)
        assert cbor.loads(calls[-1])["Attestation"]["user_data"] == b"\x03" * 64
    finally:
        attester.close()


def test_snp_certificate_table_parsing(pki: FakeAmdPki) -> None:
    certs = snp_certificates_from_table(pki.cert_table())
    assert certs["vcek"] == pki.der(pki.vcek) and certs["ask"] == pki.der(pki.ask)
    with pytest.raises(AttestationError, match="terminated"):
        snp_certificates_from_table(b"\x01" * 20)
    table = bytearray(pki.cert_table())
    table[16:20] = (10**6).to_bytes(4, "little")  # the VCEK entry points past the end
    with pytest.raises(AttestationError, match="outside"):
        snp_certificates_from_table(bytes(table))


def test_enclave_config_reads_the_attester_keys(tmp_path: Path) -> None:
    path = tmp_path / "enclave.toml"
    path.write_text(
        '[enclave]\nattester = "sev-snp"\ntsm_path = "tsm"\nsnp_certificates = "vcek.pem"\n[tls]\nplaintext = true\n'
    )
    cfg = EnclaveConfig.load(path)
    assert cfg.attester == "sev-snp" and cfg.tsm_path == tmp_path / "tsm"
    assert cfg.snp_certificates == tmp_path / "vcek.pem"
    path.write_text('[enclave]\nattester = "sev"\n[tls]\nplaintext = true\n')
    with pytest.raises(ConfigError, match="sev-snp, tdx, sgx, nitro"):
        EnclaveConfig.load(path)


def test_debug_snp_evidence_is_refused_by_default(tmp_path: Path, pki: FakeAmdPki) -> None:
    fake = FakeConfigfsTsm(
        tmp_path / "report",
        make_report=lambda data: pki.report(data, measurement=MEASUREMENT, debug=True),
        auxblob=pki.cert_table(),
    )
    try:
        attester = make_attester(_config(attester="sev-snp", tsm_path=fake.root))
        try:
            nonce = os.urandom(16)
            rd = hashlib.sha512(nonce).digest()
            evidence = attester.attest(report_data=rd, nonce=nonce)
            with pytest.raises(AttestationError) as ei:
                verify_evidence(evidence, policy=_policy(pki), expected_report_data=rd, expected_nonce=nonce)
            assert ei.value.details["check"] == "debug"
            assert verify_evidence(
                evidence, policy=_policy(pki, allow_debug=True), expected_report_data=rd, expected_nonce=nonce
            ).debug
            low = {"sev-snp.snp": pki.tcb["snp"] + 1}
            with pytest.raises(AttestationError) as ei:
                verify_evidence(
                    evidence,
                    policy=_policy(pki, allow_debug=True, min_tcb=low),
                    expected_report_data=rd,
                    expected_nonce=nonce,
                    now=datetime.now(UTC),
                )
            assert ei.value.details["check"] == "tcb"
            # A TDX-only minimum does not apply to SNP evidence.
            verify_evidence(
                evidence,
                policy=_policy(pki, allow_debug=True, min_tcb={"tdx.qe_svn": 99}),
                expected_report_data=rd,
                expected_nonce=nonce,
            )
        finally:
            attester.close()
    finally:
        fake.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "sealroom.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_enclave_serve_refuses_to_start_without_its_attester(tmp_path: Path) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(
        f'[enclave]\nlisten = "127.0.0.1:0"\nattester = "tdx"\ntsm_path = "{tmp_path / "none"}"\n'
        "[tls]\nplaintext = true\n"
    )
    port_file = tmp_path / "port"
    out = _cli("enclave", "serve", "--config", str(config), "--port-file", str(port_file))
    assert out.returncode == 2, out.stderr
    assert "configfs-tsm" in out.stderr and "confidential VM" in out.stderr
    assert not port_file.exists()  # it never listened


def test_enclave_measure_asks_the_platform(tmp_path: Path, pki: FakeAmdPki, tsm: FakeConfigfsTsm) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(f'[enclave]\nattester = "sev-snp"\ntsm_path = "{tsm.root}"\n[tls]\nplaintext = true\n')
    out = _cli("enclave", "measure", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"measurement": MEASUREMENT.hex()}


def test_a_vlek_signed_report_verifies_with_its_asvk(tmp_path: Path) -> None:
    """A cloud provider's host hands the guest a VLEK only; the ASVK comes from enclave.snp_certificates."""
    vlek = FakeAmdPki.create(vlek=True)
    fake = FakeConfigfsTsm(
        tmp_path / "report",
        make_report=lambda data: vlek.report(data, measurement=MEASUREMENT),
        auxblob=vlek.cert_table(),
    )
    asvk = tmp_path / "asvk.pem"
    asvk.write_bytes(vlek.ask.public_bytes(serialization.Encoding.PEM))
    nonce = os.urandom(16)
    rd = hashlib.sha512(nonce).digest()
    try:
        for extra, refused in ((None, True), (asvk, False)):
            attester = make_attester(_config(attester="sev-snp", tsm_path=fake.root, snp_certificates=extra))
            try:
                evidence = attester.attest(report_data=rd, nonce=nonce)
            finally:
                attester.close()
            if refused:  # the VLEK alone: no ASVK to chain it to the ARK
                with pytest.raises(AttestationError, match="ASVK") as ei:
                    verify_evidence(evidence, policy=_policy(vlek), expected_report_data=rd, expected_nonce=nonce)
                assert ei.value.details["check"] == "chain"
                continue
            claims = verify_evidence(evidence, policy=_policy(vlek), expected_report_data=rd, expected_nonce=nonce)
            assert claims.platform == "sev-snp" and claims.measurement == MEASUREMENT.hex()
    finally:
        fake.close()


@pytest.mark.parametrize(
    ("report_kw", "check", "allowed"),
    [
        ({"migration_agent": True}, "migration_agent", {"snp_allow_migration_agent": True}),
        ({"vmpl": 2}, "vmpl", {"snp_max_vmpl": 2}),
    ],
)
def test_snp_guest_policy_bits_and_vmpl_are_appraised(
    report_kw: dict[str, object], check: str, allowed: dict[str, object], pki: FakeAmdPki
) -> None:
    nonce = os.urandom(16)
    rd = hashlib.sha512(nonce).digest()
    report = pki.report(rd, measurement=MEASUREMENT, **report_kw)  # type: ignore[arg-type]
    evidence = Evidence("sev-snp", report, pki.der(pki.vcek) + pki.der(pki.ask), nonce)
    with pytest.raises(AttestationError) as ei:
        verify_evidence(evidence, policy=_policy(pki), expected_report_data=rd, expected_nonce=nonce)
    assert ei.value.details["check"] == check
    assert verify_evidence(evidence, policy=_policy(pki, **allowed), expected_report_data=rd, expected_nonce=nonce)


def test_certificates_in_any_order_with_an_ark_among_them(pki: FakeAmdPki) -> None:
    """Evidence carrying ARK, VCEK and ASK in any order verifies: the intermediate is found by its
    role, and an ARK sent along is not mistaken for it."""
    nonce = os.urandom(16)
    rd = hashlib.sha512(nonce).digest()
    report = pki.report(rd, measurement=MEASUREMENT)
    for order in ((pki.ark, pki.vcek, pki.ask), (pki.ask, pki.ark, pki.vcek)):
        evidence = Evidence("sev-snp", report, b"".join(pki.der(c) for c in order), nonce)
        assert verify_evidence(evidence, policy=_policy(pki), expected_report_data=rd, expected_nonce=nonce)
