"""Every RPC knows its caller (issue 13, attacks 1 and 5): each method of each service, found by
reflection over the generated stubs, called by strangers against real servers on 127.0.0.1.

The coordinator, a party agent (bank_a) and an enclave worker run in this process with their real
servicers and backends (``build_server`` of each), listening with TLS credentials given here: the
agent and the enclave require a client certificate of the collaboration CA (mutual TLS), the
coordinator is server-only TLS (analysts bring tokens, parties sign their requests). The strangers:

- no client certificate, and a certificate of another CA with CN ``coordinator``: refused in the
  handshake by the agent and the enclave, public methods included;
- a valid collaboration certificate of the wrong identity (``party:bank_b``): refused by every
  method of bank_a's agent and of the enclave that is not for it (PERMISSION_DENIED), and by every
  owner method unless the request is signed by bank_a's own key;
- anyone at the coordinator without a token or an unsigned request: UNAUTHENTICATED.

The legitimate callers pass the same gates (the coordinator drives the agent and the enclave, the
party that a job names attests and streams, the owner lists its pending plans).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2_grpc

import connectors.agent.servicer as agent_servicer
import coordinator.servicer as coordinator_servicer
import enclave_worker.server as enclave_server
from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from coordinator.config import CoordinatorConfig
from enclave_worker.config import EnclaveConfig
from sealroom import pki, rpc
from sealroom.attestation import dev_init, enclave_measurement
from sealroom.auth import AnalystDirectory, bearer, generate_token, token_hash
from sealroom.callers import RULES, Callers, method_path, signature_fields
from sealroom.keys import generate_signing_key
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.signing import sign_owner_command, sign_owner_read
from sealroom.v1 import coordinator_pb2, enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc
from sealroom.wire import UPLOAD_PATH
from tests.harness.enclave import EnclaveHandle, JobHandle, make_party, make_plan, secret_loans, trusting

pytestmark = pytest.mark.slow

REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# The TLS handshake fails: gRPC reports the server as unreachable, no method ran.
HANDSHAKE_REFUSED = grpc.StatusCode.UNAVAILABLE
# RegisterParty carries no signature until the registration work of issue 13 (i13-register) adds one;
# from then on it is checked like every signed method.
SIGNATURE_PENDING = (
    set()
    if signature_fields(coordinator_pb2.RegisterPartyRequest.DESCRIPTOR)
    else {"/sealroom.v1.Coordinator/RegisterParty"}
)
ENCLAVE_ID = pki.party("enclave_worker")  # stands in for the enclave's own certificate (i13-tls)


def services() -> list[ServiceDescriptor]:
    return [s for m in (coordinator_pb2, party_pb2, enclave_pb2) for s in m.DESCRIPTOR.services_by_name.values()]


def methods(service: str) -> list[MethodDescriptor]:
    (svc,) = [s for s in services() if s.name == service]
    return list(svc.methods)


def invoke(channel: grpc.Channel, method: MethodDescriptor, request: Any = None, **kw: Any) -> Any:
    """Call ``method`` with ``request`` (default: its empty request message)."""
    assert not method.client_streaming and not method.server_streaming
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        method_path(method.containing_service.full_name, method.name),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    return call(request if request is not None else request_cls(), timeout=10, **kw)


def code_of(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- the collaboration's certificates --------------------------------------------------------------


@dataclass
class Certs:
    ca: pki.CA
    own: dict[str, tuple[bytes, bytes]]  # name -> (cert PEM, key PEM)

    def channel(self, address: str, holder: str | None, server: pki.Identity) -> grpc.Channel:
        """A TLS channel to ``server`` at ``address``, presenting ``holder``'s certificate (None: none)."""
        cert, key = self.own[holder] if holder else (None, None)
        creds = grpc.ssl_channel_credentials(self.ca.cert_pem, key, cert)
        options = [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", pki.server_name(server))]
        return grpc.secure_channel(address, creds, options=options)

    def server_factory(self, identity: pki.Identity, *, mutual: bool) -> Callable[..., rpc.Server]:
        """``rpc.create_server`` as each component calls it, listening with TLS as ``identity``."""
        cert, key = self.ca.issue(identity)
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=self.ca.cert_pem if mutual else None, require_client_auth=mutual
        )

        def create_server(address: str, *, handlers: tuple[grpc.GenericRpcHandler, ...] = (), **_: Any) -> rpc.Server:
            server = grpc.server(futures.ThreadPoolExecutor(8), options=rpc.CHANNEL_OPTIONS, handlers=handlers)
            port = server.add_secure_port(address, creds)
            checks = health.HealthServicer(experimental_non_blocking=True)
            health_pb2_grpc.add_HealthServicer_to_server(checks, server)
            return rpc.Server(server, port, checks)

        return create_server


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca = pki.create_ca()
    own = {
        "coordinator": ca.issue(pki.coordinator()),
        "bank_a": ca.issue(pki.party("bank_a")),
        "bank_b": ca.issue(pki.party("bank_b")),
        "forged": pki.create_ca("another CA").issue(pki.coordinator()),
    }
    return Certs(ca, own)


@dataclass
class Platform:
    certs: Certs
    coordinator: str
    agent: str
    enclave: str
    agent_key: Any
    token: str
    enclave_handle: Callable[[str], EnclaveHandle]
    bank_a: Any  # the harness's PartyData for bank_a (its key signs its streams)
    agent_backend: PartyAgent


@pytest.fixture(scope="module")
def platform(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("callers")
    dev_init(tmp / "dev")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        mp.setattr(enclave_server, "create_server", certs.server_factory(ENCLAVE_ID, mutual=True))
        ecfg = EnclaveConfig(listen="127.0.0.1:0", attester="simulated", dev_root=tmp / "dev")
        eserver, registry = enclave_server.build_server(ecfg)
        eserver.start()
        stack.callback(eserver.stop, 0.5)
        enclave = f"127.0.0.1:{eserver.port}"
        appraisal = trusting(tmp / "dev", enclave_measurement(ecfg.measured()))
        trust = TrustPolicy(
            measurements=appraisal.measurements, allow_simulated=True, dev_root=tmp / "dev" / "dev-root.crt"
        )

        token = generate_token()
        mp.setattr(coordinator_servicer, "create_server", certs.server_factory(pki.coordinator(), mutual=False))
        cserver, coord = coordinator_servicer.build_server(
            CoordinatorConfig(
                state_dir=tmp / "coordinator",
                enclave=enclave,
                trust=trust,
                analysts=AnalystDirectory({"alice": token_hash(token)}),
            )
        )
        cserver.start()
        stack.callback(coord.shutdown)
        stack.callback(cserver.stop, 0.5)

        table = secret_loans(12)
        pq.write_table(table, tmp / "a.parquet")
        key = generate_signing_key()
        policy = DatasetPolicy(privacy_unit="customer_id", min_group_size=2, approval="manual")
        agent = PartyAgent(
            PartyConfig(
                name="bank_a",
                coordinator=f"127.0.0.1:{cserver.port}",
                signing_key=tmp / "unused.key",
                trust=trust,
                datasets=(DatasetConfig("loans", str(tmp / "a.parquet"), policy),),
                unsafe_no_witness=True,
            ),
            signing_key=key,
        )
        mp.setattr(agent_servicer, "create_server", certs.server_factory(pki.party("bank_a"), mutual=True))
        aserver = agent_servicer.build_server(agent)
        aserver.start()
        stack.callback(aserver.stop, 0.5)

        def handle(holder: str) -> EnclaveHandle:
            channel = stack.enter_context(certs.channel(enclave, holder, ENCLAVE_ID))
            return EnclaveHandle(enclave, channel, appraisal, registry, eserver)

        yield Platform(
            certs,
            f"127.0.0.1:{cserver.port}",
            f"127.0.0.1:{aserver.port}",
            enclave,
            key,
            token,
            handle,
            make_party("bank_a", table, policy=policy, key=key),
            agent,
        )


def target(platform: Platform, service: str) -> tuple[str, pki.Identity]:
    """The address of the server of ``service`` and the identity its certificate names."""
    if service == "PartyAgent":
        return platform.agent, pki.party("bank_a")
    return platform.enclave, ENCLAVE_ID


# -- the table covers every method -------------------------------------------------------------------


def test_every_method_of_every_service_has_a_rule() -> None:
    paths = {method_path(s.full_name, m.name) for s in services() for m in s.methods}
    assert paths - set(RULES) == set()
    assert set(RULES) - paths == {UPLOAD_PATH}


# -- strangers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holder", [None, "forged"])
@pytest.mark.parametrize("service", ["PartyAgent", "Enclave"])
def test_a_caller_without_a_certificate_of_the_ca_is_refused_in_the_handshake(platform, holder, service) -> None:
    address, server = (
        (platform.agent, pki.party("bank_a")) if service == "PartyAgent" else (platform.enclave, ENCLAVE_ID)
    )
    with platform.certs.channel(address, holder, server) as channel:
        for method in methods(service):
            assert code_of(lambda m=method: invoke(channel, m)) == HANDSHAKE_REFUSED, method.name
        upload = channel.stream_unary(UPLOAD_PATH, request_serializer=None, response_deserializer=None)
        if service == "Enclave":
            assert code_of(lambda: upload(iter([b"x"]), timeout=10)) == HANDSHAKE_REFUSED


@pytest.mark.parametrize("service", ["PartyAgent", "Enclave"])
def test_another_party_is_refused_every_method_not_for_it(platform, service) -> None:
    address, server = (
        (platform.agent, pki.party("bank_a")) if service == "PartyAgent" else (platform.enclave, ENCLAVE_ID)
    )
    with platform.certs.channel(address, "bank_b", server) as channel:
        for method in methods(service):
            path = method_path(method.containing_service.full_name, method.name)
            code = code_of(lambda m=method: invoke(channel, m))
            if RULES[path] is Callers.ANYONE:
                assert code == grpc.StatusCode.OK, path
            else:
                assert code in REFUSED, (path, code)
            if RULES[path] is Callers.COORDINATOR:
                assert code == grpc.StatusCode.PERMISSION_DENIED, path


def test_the_coordinator_refuses_callers_without_a_token_or_a_signature(platform) -> None:
    with platform.certs.channel(platform.coordinator, None, pki.coordinator()) as channel:
        for method in methods("Coordinator"):
            path = method_path(method.containing_service.full_name, method.name)
            code = code_of(lambda m=method: invoke(channel, m))
            if RULES[path] is Callers.ANYONE:
                assert code == grpc.StatusCode.OK, path
            elif path in SIGNATURE_PENDING:
                continue
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (path, code)


def test_an_analyst_token_opens_the_analyst_methods_only(platform) -> None:
    with platform.certs.channel(platform.coordinator, None, pki.coordinator()) as channel:
        auth = bearer(platform.token)
        assert code_of(lambda: invoke(channel, methods("Coordinator")[1], metadata=auth)) == grpc.StatusCode.OK
        wrong = bearer(generate_token())
        for method in methods("Coordinator"):
            path = method_path(method.containing_service.full_name, method.name)
            if RULES[path] is Callers.ANALYST:
                assert code_of(lambda m=method: invoke(channel, m, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED


# -- the owner's methods ---------------------------------------------------------------------------------


SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"


def _review_as(platform: Platform, holder: str, plan_json: bytes) -> party_pb2.ReviewPlanResponse:
    with platform.certs.channel(platform.agent, holder, pki.party("bank_a")) as channel:
        request = party_pb2.ReviewPlanRequest(plan_json=plan_json, query_id="q")
        return party_pb2_grpc.PartyAgentStub(channel).ReviewPlan(request, timeout=10)


def test_a_flood_of_forged_reviews_fills_no_owner_queue(platform) -> None:
    """Attack 5: forged ReviewPlan calls filled bank_c's manual-approval queue. Now only the
    coordinator may ask for a review; the owner's queue holds what the coordinator sent, no more."""
    for n in range(200):
        plan = make_plan(SQL, [platform.bank_a], query_id=f"q_flood{n}")
        with pytest.raises(grpc.RpcError) as caught:
            _review_as(platform, "bank_b", plan.to_json())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [p.query_id for p in platform.agent_backend.pending() if p.query_id.startswith("q_flood")] == []


def test_only_the_owner_lists_its_pending_plans(platform) -> None:
    (list_pending,) = [m for m in methods("PartyAgent") if m.name == "ListPending"]
    # The coordinator asks bank_a to review a plan its owner decides by hand: it waits for the owner.
    plan = make_plan(SQL, [platform.bank_a], analyst="alice", query_id="q_pending")
    assert _review_as(platform, "coordinator", plan.to_json()).pending
    issued = int(time.time() * 1000)
    for holder in ("coordinator", "bank_b"):
        with platform.certs.channel(platform.agent, holder, pki.party("bank_a")) as channel:
            # unsigned, signed by another key, signed for another party, stale: all refused
            intruder = generate_signing_key()
            stale = issued - 3_600_000
            for request in (
                party_pb2.ListPendingRequest(issued_at_ms=issued),
                party_pb2.ListPendingRequest(
                    issued_at_ms=issued,
                    signature=sign_owner_read(intruder, "pending", party="bank_a", issued_at_ms=issued),
                ),
                party_pb2.ListPendingRequest(
                    issued_at_ms=issued,
                    signature=sign_owner_read(platform.agent_key, "pending", party="bank_b", issued_at_ms=issued),
                ),
                party_pb2.ListPendingRequest(
                    issued_at_ms=stale,
                    signature=sign_owner_read(platform.agent_key, "pending", party="bank_a", issued_at_ms=stale),
                ),
            ):
                assert code_of(lambda r=request: invoke(channel, list_pending, r)) in REFUSED
            signed = party_pb2.ListPendingRequest(
                issued_at_ms=issued,
                signature=sign_owner_read(platform.agent_key, "pending", party="bank_a", issued_at_ms=issued),
            )
            (listed,) = [p for p in invoke(channel, list_pending, signed).plans if p.query_id == "q_pending"]
            assert "bank_a" in listed.sql and listed.analyst == "alice"  # the SQL and the analyst: the owner's only


def test_owner_commands_signed_by_another_key_are_refused_before_any_work(platform) -> None:
    intruder = generate_signing_key()
    issued = int(time.time() * 1000)
    command = party_pb2.OwnerCommand(
        query_id="q_none",
        issued_at_ms=issued,
        signature=sign_owner_command(intruder, "approve", party="bank_a", query_id="q_none", issued_at_ms=issued),
    )
    with platform.certs.channel(platform.agent, "coordinator", pki.party("bank_a")) as channel:
        stub = party_pb2_grpc.PartyAgentStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Approve(command, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rpc.unwrap(caught.value).details["check"] == "owner_command_signature"
        # The owner's own key gets past the gate (and finds no such plan).
        genuine = party_pb2.OwnerCommand(
            query_id="q_none",
            issued_at_ms=issued,
            signature=sign_owner_command(
                platform.agent_key, "approve", party="bank_a", query_id="q_none", issued_at_ms=issued
            ),
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Approve(genuine, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# -- the coordinator drives; the job's parties attest and stream ---------------------------------------


def test_the_coordinator_passes_the_gates_it_needs(platform) -> None:
    with platform.certs.channel(platform.agent, "coordinator", pki.party("bank_a")) as channel:
        stub = party_pb2_grpc.PartyAgentStub(channel)
        resp = stub.GetProgress(party_pb2.ProgressRequest(job_id="j_none"), timeout=10)
        assert list(resp.streams) == []
        review = stub.ReviewPlan(party_pb2.ReviewPlanRequest(plan_json=b"{}"), timeout=10)
        assert not review.approved and review.error_json  # reviewed (and refused on its merits)
    # ...and is refused what only a job's party may do: stream its input.
    coordinator = platform.enclave_handle("coordinator")
    assert coordinator.upload_rejected(header=b"h", frames=[b"f"]).status == grpc.StatusCode.PERMISSION_DENIED


def _job(platform: Platform) -> tuple[JobHandle, JobHandle]:
    """A job for bank_a, created by the coordinator; the job as bank_a (attested) and as bank_b sees it."""
    plan = make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [platform.bank_a])
    coordinator = platform.enclave_handle("coordinator")
    resp = coordinator.stub.CreateJob(enclave_pb2.CreateJobRequest(plan_json=plan.to_json()), timeout=10)
    fields = dict(
        plan_json=plan.to_json(),
        job_id=resp.job_id,
        hpke_public=bytes(resp.hpke_public_key),
        signing_public=bytes(resp.signing_public_key),
        token=bytes(resp.job_token),
    )
    as_a = JobHandle(enclave=platform.enclave_handle("bank_a"), **fields)
    as_b = JobHandle(enclave=platform.enclave_handle("bank_b"), **fields)
    return as_a, as_b


def test_only_a_party_the_job_names_attests_and_streams_its_own_input(platform) -> None:
    as_a, as_b = _job(platform)
    attest = enclave_pb2.AttestRequest(job_id=as_a.job_id, nonce=b"n" * 32)
    refused = code_of(lambda: as_b.enclave.stub.Attest(attest, timeout=10))
    assert refused == grpc.StatusCode.PERMISSION_DENIED
    # The coordinator checks the enclave's TLS binding with fresh evidence too.
    assert platform.enclave_handle("coordinator").stub.Attest(attest, timeout=10).evidence
    as_a.attest()  # bank_a, which the job names, gets the evidence
    stream = as_a.seal(platform.bank_a)
    # bank_b relays bank_a's genuine stream: refused before a frame is read, and the job lives on.
    rejection = as_b.enclave.upload_rejected(stream)
    assert rejection.status == grpc.StatusCode.PERMISSION_DENIED
    job = as_a.enclave.job(as_a.job_id)
    assert job is not None and job.failed is None
    summary = as_a.enclave.upload(stream)
    assert summary.party == "bank_a" and summary.rows == 12
    # The coordinator may not stream either.
    assert platform.enclave_handle("coordinator").upload_rejected(stream).status == grpc.StatusCode.PERMISSION_DENIED


def test_only_the_coordinator_runs_or_aborts_a_job(platform) -> None:
    as_a, _ = _job(platform)
    ref = enclave_pb2.JobRef(job_id=as_a.job_id, job_token=as_a.token)
    for holder in ("bank_a", "bank_b"):
        stub = platform.enclave_handle(holder).stub
        assert code_of(lambda s=stub: s.AbortJob(ref, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    assert as_a.enclave.job(as_a.job_id) is not None
    enclave_pb2_grpc.EnclaveStub(platform.enclave_handle("coordinator").channel).AbortJob(ref, timeout=10)
    assert as_a.enclave.job(as_a.job_id) is None


def test_a_method_without_a_rule_is_refused_to_everyone(platform, monkeypatch) -> None:
    path = "/sealroom.v1.PartyAgent/GetProgress"
    monkeypatch.delitem(RULES, path)  # type: ignore[attr-defined]
    with platform.certs.channel(platform.agent, "coordinator", pki.party("bank_a")) as channel:
        stub = party_pb2_grpc.PartyAgentStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetProgress(party_pb2.ProgressRequest(job_id="j"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no caller rule" in (caught.value.details() or "")
