"""TLS on every link, against real servers on 127.0.0.1 (docs/wire.md, "Transport security").

- a caller refuses a server whose certificate another CA issued, or that names another identity;
- the coordinator refuses an agent that presents another party's certificate;
- an agent refuses an enclave certificate that the enclave's evidence does not bind (a relay with its
  own key, or a certificate the operator's CA issued, in front of the real worker) and sends nothing;
- the legitimate path still works on each link (tests/integration/test_platform.py runs the whole
  platform over TLS; ``test_the_platform_runs_over_tls_only`` below checks no plaintext is served).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.tee_stage import TeeStageRunner
from sealroom import pki
from sealroom.app.client import Client
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.errors import AttestationError, ConfigError, UnavailableError
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.rpc import (
    TLSConfig,
    create_server,
    dial,
    fetch_server_certificate,
    raw_stream_handler,
    wait_healthy_channel,
)
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc
from sealroom.wire import DATA_SERVICE, UPLOAD_METHOD
from tests.harness.enclave import Agent, EnclaveHandle, make_plan, start_agent
from tests.harness.pki import as_coordinator, session_pki, tls_as

SQL = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=3, analysts=("alice",))


def _health_server(tls: TLSConfig, *, require_client_auth: bool = False):
    server = create_server("127.0.0.1:0", tls=tls, require_client_auth=require_client_auth)
    server.start()
    return server


def _reaches(address: str, tls: TLSConfig, peer: pki.Identity | bytes) -> bool:
    with dial(address, tls, peer) as channel:
        try:
            wait_healthy_channel(channel, address, timeout=3)
        except UnavailableError:
            return False
    return True


# -- caller side: the server must be the identity of the CA the caller meant ---------------------------


def test_a_server_with_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    other = pki.create_ca("a stranger's CA")
    cert, key = other.issue(pki.coordinator())  # the right name, the wrong issuer
    impostor = _health_server(TLSConfig().with_identity(cert, key))
    genuine = _health_server(as_coordinator())
    try:
        assert not _reaches(f"127.0.0.1:{impostor.port}", tls_as(), pki.coordinator())
        assert _reaches(f"127.0.0.1:{genuine.port}", tls_as(), pki.coordinator())
        # The analyst's client says what to check when the handshake fails.
        with Client(f"127.0.0.1:{impostor.port}", ca=session_pki().ca_cert, timeout=3) as client:
            with pytest.raises(UnavailableError, match="must be the CA that issued the coordinator's certificate"):
                client.datasets()
    finally:
        impostor.stop(0)
        genuine.stop(0)


def test_the_analyst_client_needs_the_ca_and_says_how_to_give_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEALROOM_CA", raising=False)
    with pytest.raises(ConfigError, match="--ca FILE, SEALROOM_CA=FILE or Client"):
        Client("127.0.0.1:7100")
    with pytest.raises(ConfigError, match="does not exist"):
        Client("127.0.0.1:7100", ca="/nonexistent/ca.crt")


def test_the_coordinator_refuses_an_agent_presenting_another_partys_certificate() -> None:
    # bank_b's certificate (genuine, from the collaboration CA) behind the address registered for bank_a.
    wrong = _health_server(tls_as(pki.party("bank_b")), require_client_auth=True)
    right = _health_server(tls_as(pki.party("bank_a")), require_client_auth=True)
    try:
        assert not _reaches(f"127.0.0.1:{wrong.port}", as_coordinator(), pki.party("bank_a"))
        assert _reaches(f"127.0.0.1:{right.port}", as_coordinator(), pki.party("bank_a"))
    finally:
        wrong.stop(0)
        right.stop(0)


def test_an_agent_refuses_callers_without_a_certificate_of_the_ca() -> None:
    agent = _health_server(tls_as(pki.party("bank_a")), require_client_auth=True)
    other = pki.create_ca("a stranger's CA")
    cert, key = other.issue(pki.coordinator())
    forged = TLSConfig(ca=session_pki().ca_cert).with_identity(cert, key)
    try:
        address = f"127.0.0.1:{agent.port}"
        assert not _reaches(address, tls_as(None), pki.party("bank_a"))  # no client certificate
        assert not _reaches(address, forged, pki.party("bank_a"))  # a certificate of another CA
        assert _reaches(address, as_coordinator(), pki.party("bank_a"))
    finally:
        agent.stop(0)


# -- agent -> enclave: only the certificate the attested worker made ----------------------------------


class _Front(enclave_pb2_grpc.EnclaveServicer):
    """A server in front of the real enclave worker, with a TLS key of its own: it forwards Attest
    unchanged (the genuine evidence of the real worker) and swallows uploads."""

    def __init__(self, real: EnclaveHandle):
        self.real = real
        self.uploads = 0

    def CreateJob(self, request, context):  # noqa: N802
        return self.real.stub.CreateJob(request, timeout=10)

    def Attest(self, request, context):  # noqa: N802
        return self.real.stub.Attest(request, timeout=10)

    def AbortJob(self, request, context):  # noqa: N802
        return self.real.stub.AbortJob(request, timeout=10)

    def upload(self, frames, context) -> bytes:
        self.uploads += 1
        for _ in frames:
            pass
        return enclave_pb2.UploadSummary().SerializeToString()


@pytest.fixture
def agent(tmp_path: Path, dev_dir: Path, enclave: EnclaveHandle) -> Iterator[Agent]:
    trust = TrustPolicy(
        measurements=enclave.appraisal.measurements, allow_simulated=True, dev_root=dev_dir / "dev-root.crt"
    )
    a, cleanup = start_agent(tmp_path / "agent", trust, POLICY)
    yield a
    cleanup()


def _operator_issued() -> tuple[bytes, bytes]:
    # A certificate of the collaboration CA itself (what the operator could issue for its host).
    return session_pki().ca().issue(pki.coordinator(), hosts=(pki.ENCLAVE_SERVER_NAME, "127.0.0.1"))


def _relay_self_signed() -> tuple[bytes, bytes]:
    return pki.self_signed("enclave", pki.ENCLAVE_SERVER_NAME)


@contextlib.contextmanager
def _serving(enclave: EnclaveHandle, cert: bytes, key: bytes) -> Iterator[tuple[_Front, str]]:
    """A front in front of the real worker, serving ``cert``: (the front, its address)."""
    front = _Front(enclave)
    server = create_server(
        "127.0.0.1:0",
        tls=TLSConfig().with_identity(cert, key),
        handlers=(raw_stream_handler(DATA_SERVICE, UPLOAD_METHOD, front.upload),),
    )
    enclave_pb2_grpc.add_EnclaveServicer_to_server(front, server.grpc)
    server.start()
    try:
        yield front, f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0.5)


@pytest.fixture
def front(enclave: EnclaveHandle) -> Iterator[tuple[_Front, str, bytes]]:
    """A relay with its own self-signed key in front of the real worker: (front, address, its cert)."""
    cert, key = _relay_self_signed()
    with _serving(enclave, cert, key) as (relay, address):
        yield relay, address, cert


def test_the_coordinator_refuses_an_enclave_certificate_the_evidence_does_not_bind(
    front: tuple[_Front, str, bytes], agent: Agent, enclave: EnclaveHandle
) -> None:
    def stage(address: str) -> TeeStageRunner:
        return TeeStageRunner(
            store=None,  # type: ignore[arg-type] - job() stores nothing
            enclave_address=address,
            appraisal=enclave.appraisal,
            party_timeout=10,
            channel=lambda where, peer: dial(where, as_coordinator(), peer),
            enclave_certificate=lambda: fetch_server_certificate(address, as_coordinator()),
        )

    plan = make_plan(SQL, [agent.data])
    with pytest.raises(AttestationError) as caught, stage(front[1]).job(plan):
        pytest.fail("the coordinator used an enclave link the evidence does not bind")
    assert caught.value.details["check"] == "tls_binding"
    with stage(enclave.address).job(plan) as job:  # the real worker: its own certificate, bound
        assert job.certificate == enclave.certificate


@pytest.mark.parametrize("front_cert", [_relay_self_signed, _operator_issued], ids=["relay", "operator_issued"])
def test_the_agent_refuses_an_enclave_certificate_the_evidence_does_not_bind(
    front_cert: Callable[[], tuple[bytes, bytes]], agent: Agent, enclave: EnclaveHandle
) -> None:
    cert, key = front_cert()
    with _serving(enclave, cert, key) as (front, address):
        plan = make_plan(SQL, [agent.data])
        assert agent.review(plan).approved
        job = enclave.create_job(plan)
        # What a coordinator (or whoever runs the host) hands the agent: the front's address and its
        # certificate. The handshake succeeds; the evidence binds the real worker's key, not this one.
        rej = agent.contribute_refused(plan.to_json(), job, address=address, certificate=cert)
        assert rej.status == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(rej.error, AttestationError) and rej.error.details["check"] == "tls_binding"
        assert front.uploads == 0, "the agent sent sealed data through a server the evidence does not bind"
        # The real worker's certificate at the front's address: the front cannot complete the handshake.
        rej = agent.contribute_refused(plan.to_json(), job, address=address)
        assert rej.error.code == "unavailable" and front.uploads == 0
        # The legitimate path still works: the real worker, its own certificate.
        out = agent.contribute(plan.to_json(), job)
        assert [u.dataset for u in out.uploads] == ["loans"]


def test_the_enclave_requires_a_client_certificate_of_the_ca(enclave: EnclaveHandle) -> None:
    other = pki.create_ca("a stranger's CA")
    cert, key = other.issue(pki.coordinator())
    for tls in (tls_as(None), TLSConfig(ca=session_pki().ca_cert).with_identity(cert, key)):
        assert not _reaches(enclave.address, tls, enclave.certificate)
    assert _reaches(enclave.address, tls_as(pki.party("bank_a")), enclave.certificate)


# -- the whole platform --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("tls")
    rows = 40
    table = pa.table(
        {
            "customer_id": pa.array(range(rows), pa.int64()),
            "segment": ["retail", "sme"] * (rows // 2),
            "exposure": pa.array([float(i) for i in range(rows)]),
        }
    )
    pq.write_table(table, d / "a.parquet")
    policy = dataclasses.replace(POLICY, analysts=("analyst",))
    with Cluster(d / "state", [PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), policy),))]) as c:
        yield c


def test_the_platform_runs_over_tls_only(platform: Cluster) -> None:
    for name in ("coordinator", "enclave", "party-bank_a"):
        config = platform.state_dir / "config" / f"{'party-bank_a' if name.startswith('party') else name}.toml"
        assert "[tls]" in config.read_text() and "plaintext" not in config.read_text()
        with grpc.insecure_channel(platform.addresses[name]) as plain:  # a plaintext caller gets nowhere
            with pytest.raises(UnavailableError):
                wait_healthy_channel(plain, name, timeout=2)
    with platform.client() as client:
        result = client.run(SQL, timeout=120)
    assert result.status == "released", result.error
    assert sorted(result.to_pandas()["segment"]) == ["retail", "sme"]
