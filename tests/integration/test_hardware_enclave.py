"""A data owner's agent and an enclave worker attesting through configfs-tsm (issue 6's Done-when).

The enclave worker runs with ``attester = "sev-snp"`` against a fake configfs-tsm tree whose
reports are real SEV-SNP reports, signed by an AMD-shaped test chain (tests/tee_fakes.py). The party
agent's trust section pins that SNP measurement and, with ``[trust.roots]``, the test ARK in place of
AMD's: it accepts this enclave, streams, and the enclave releases; the same agent refuses a
simulated enclave, and refuses the SNP enclave when its measurement or TCB is not the pinned one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from enclave_worker.config import EnclaveConfig
from enclave_worker.server import build_server
from sealroom.attestation import AppraisalPolicy
from sealroom.errors import AttestationError
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.v1 import common_pb2
from tests.harness.enclave import Agent, EnclaveHandle, approval, connect_enclave, make_plan, start_agent
from tests.harness.pki import enclave_tls
from tests.harness.tee_fakes import FakeAmdPki, FakeConfigfsTsm

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="the fake configfs-tsm tree needs FIFOs (POSIX)")

SQL = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=3, analysts=("alice",))
MEASUREMENT = hashlib.sha384(b"sealroom enclave image 1.0").hexdigest()


@pytest.fixture(scope="module")
def pki() -> FakeAmdPki:
    return FakeAmdPki.create()


@pytest.fixture
def snp_enclave(tmp_path: Path, pki: FakeAmdPki) -> Iterator[EnclaveHandle]:
    tsm = FakeConfigfsTsm(
        tmp_path / "configfs" / "tsm" / "report",
        make_report=lambda data: pki.report(data, measurement=bytes.fromhex(MEASUREMENT)),
        auxblob=pki.cert_table(),
    )
    server, registry = build_server(
        EnclaveConfig(listen="127.0.0.1:0", attester="sev-snp", tsm_path=tsm.root, tls=enclave_tls())
    )
    server.start()
    address = f"127.0.0.1:{server.port}"
    handle = connect_enclave(
        address,
        AppraisalPolicy(measurements=frozenset({MEASUREMENT}), platform_roots={"sev-snp": (pki.ark,)}),
        registry,
        server,
    )
    yield handle
    handle.channel.close()
    server.stop(grace=0.5)
    registry.attester.close()
    tsm.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[TrustPolicy], Agent]]:
    cleanups: list[Callable[[], None]] = []

    def start(trust: TrustPolicy) -> Agent:
        agent, cleanup = start_agent(tmp_path / f"agent{len(cleanups)}", trust, POLICY)
        cleanups.append(cleanup)
        return agent

    yield start
    for cleanup in reversed(cleanups):
        cleanup()


def _snp_trust(tmp_path: Path, pki: FakeAmdPki, **extra: object) -> TrustPolicy:
    """A trust section as a data owner writes it in TOML: only this SNP measurement, the test root."""
    ark = tmp_path / "test-ark.pem"
    ark.write_bytes(pki.ark_pem())
    doc = {"measurements": [MEASUREMENT], "roots": {"sev-snp": [ark.name]}, **extra}
    return TrustPolicy.from_dict(doc, source="party.toml", base=tmp_path)


def test_an_agent_pinning_an_snp_measurement_streams_to_that_enclave(
    snp_enclave: EnclaveHandle, agents: Callable[[TrustPolicy], Agent], tmp_path: Path, pki: FakeAmdPki
) -> None:
    info = snp_enclave.stub.GetInfo(common_pb2.Empty(), timeout=5)
    assert info.attestation_format == "sev-snp" and not info.simulated and info.measurement == MEASUREMENT
    party = agents(_snp_trust(tmp_path, pki))
    plan = make_plan(SQL, [party.data])
    assert party.review(plan).approved
    job = snp_enclave.create_job(plan)
    out = party.contribute(plan.to_json(), job)
    claims = json.loads(out.claims_json)
    assert claims["platform"] == "sev-snp" and claims["measurement"] == MEASUREMENT and claims["simulated"] is False
    result = json.loads(job.execute([approval(plan, party.data)]).result_json)
    assert result["plan_hash"] == plan.hash and result["simulated"] is False
    assert result["attestation"]["format"] == "sev-snp" and result["attestation"]["measurement"] == MEASUREMENT


def test_the_same_agent_refuses_a_simulated_enclave(
    enclave: EnclaveHandle, agents: Callable[[TrustPolicy], Agent], tmp_path: Path, pki: FakeAmdPki
) -> None:
    party = agents(_snp_trust(tmp_path, pki))
    plan = make_plan(SQL, [party.data])
    assert party.review(plan).approved
    job = enclave.create_job(plan)  # the in-process simulated enclave of tests/integration/conftest.py
    rej = party.contribute_refused(plan.to_json(), job)
    assert rej.status == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(rej.error, AttestationError) and rej.error.details["check"] == "simulated"
    assert enclave.held_bytes == 0


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"measurements": ["ab" * 48]}, "measurement"),
        ({"min_tcb": {"sev-snp": {"snp": 21}}}, "tcb"),
        ({"roots": {}}, "chain"),  # AMD's built-in roots: the test chain is not AMD's
    ],
    ids=["other_measurement", "tcb_below_minimum", "builtin_amd_roots"],
)
def test_an_snp_enclave_outside_the_trust_section_is_refused(
    extra: dict[str, object],
    check: str,
    snp_enclave: EnclaveHandle,
    agents: Callable[[TrustPolicy], Agent],
    tmp_path: Path,
    pki: FakeAmdPki,
) -> None:
    party = agents(_snp_trust(tmp_path, pki, **extra))
    plan = make_plan(SQL, [party.data])
    assert party.review(plan).approved
    job = snp_enclave.create_job(plan)
    rej = party.contribute_refused(plan.to_json(), job)
    assert rej.status == grpc.StatusCode.UNAUTHENTICATED
    assert rej.error.details["check"] in ({check, "root"} if check == "chain" else {check})
    assert snp_enclave.held_bytes == 0
