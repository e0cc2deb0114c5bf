"""Every method of every service, called as a stranger against the real platform (issue 13): the
coordinator, the enclave worker and two party agents as processes (``Cluster``), over the TLS the
platform runs with by default. The methods come from reflection over the generated stubs, so a new
method cannot be forgotten; only the public-facts methods (``Callers.ANYONE``) answer strangers.

The legitimate path still works: the same platform releases a query first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from sealroom import pki, rpc
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.callers import RULES, Callers, method_path, signature_fields
from sealroom.policy import DatasetPolicy
from sealroom.sealed import SealingStream, StreamContext, schema_hash
from sealroom.v1 import coordinator_pb2, enclave_pb2, party_pb2
from sealroom.wire import HEADER_METADATA_KEY, UPLOAD_PATH

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(Cluster, "dial"), reason="needs TLS on every link (the i13-tls work)"),
]

REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
HANDSHAKE_REFUSED = grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed: no method ran
# RegisterParty carries no signature until the registration work of issue 13 (i13-register) adds one;
# from then on it is checked like every signed method.
SIGNATURE_PENDING = (
    set()
    if signature_fields(coordinator_pb2.RegisterPartyRequest.DESCRIPTOR)
    else {"/sealroom.v1.Coordinator/RegisterParty"}
)
SQL = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment ORDER BY a.segment"
)
SERVICES = {
    "coordinator": coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    "party-bank_a": party_pb2.DESCRIPTOR.services_by_name["PartyAgent"],
    "enclave": enclave_pb2.DESCRIPTOR.services_by_name["Enclave"],
}


def _loans(path: Path) -> str:
    ids = pa.array(range(20), pa.int64())
    pq.write_table(pa.table({"customer_id": ids, "segment": ["retail"] * 12 + ["sme"] * 8}), path)
    return str(path)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("callers-platform")
    policy = DatasetPolicy(privacy_unit="customer_id", min_group_size=3)
    parties = [
        PartySpec(name, (DatasetSpec("loans", _loans(d / f"{name}.parquet"), policy),)) for name in ("bank_a", "bank_b")
    ]
    with Cluster(d / "state", parties, party_timeout_seconds=30, analysts=("alice",)) as cluster:
        yield cluster


def invoke(channel: grpc.Channel, method: MethodDescriptor) -> grpc.StatusCode:
    """Call ``method`` with its empty request; the status it ends with."""
    call = channel.unary_unary(
        method_path(method.containing_service.full_name, method.name),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    try:
        call(message_factory.GetMessageClass(method.input_type)(), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def header() -> bytes:
    """A well-formed stream header of bank_a's, for a job the enclave does not hold."""
    schema = pa.schema([("customer_id", pa.int64())])
    ctx = StreamContext(
        job_id="j_" + os.urandom(8).hex(),
        party="bank_a",
        dataset="loans",
        schema_hash=schema_hash(schema),
        plan_hash=os.urandom(32),
        evidence_hash=os.urandom(32),
    )
    return SealingStream(ctx, schema, X25519PrivateKey.generate().public_key()).header.to_bytes()


def upload(channel: grpc.Channel) -> grpc.StatusCode:
    call = channel.stream_unary(UPLOAD_PATH, request_serializer=None, response_deserializer=None)
    try:
        call(iter([b"frame"]), metadata=((HEADER_METADATA_KEY, header()),), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def stranger_tls(platform: Cluster, who: str, tmp: Path) -> Any:
    """TLS as a stranger: ``none`` (no client certificate), ``forged`` (CN coordinator from another
    CA), or ``bank_b`` (a valid certificate of the collaboration, of the wrong identity)."""
    if who == "none":
        return platform.tls_config(None)
    if who == "bank_b":
        return platform.tls_config(pki.party("bank_b"))
    cert, key = pki.create_ca("another CA").issue(pki.coordinator())
    (tmp / "forged.crt").write_bytes(cert)
    (tmp / "forged.key").write_bytes(key)
    return rpc.TLSConfig(ca=platform.ca_path, cert=tmp / "forged.crt", key=tmp / "forged.key")


def channel_to(platform: Cluster, name: str, tls: Any) -> grpc.Channel:
    address = platform.addresses[name]
    if name == "enclave":  # the enclave's own certificate, as the coordinator fetched it
        peer: Any = rpc.fetch_server_certificate(address, platform.tls_config(pki.coordinator()))
    elif name == "coordinator":
        peer = pki.coordinator()
    else:
        peer = pki.party(name.removeprefix("party-"))
    return rpc.dial(address, tls, peer)


def test_the_legitimate_path_releases(platform: Cluster) -> None:
    with platform.client("alice") as client:
        result = client.run(SQL, timeout=120)
    assert result.status == "released"


@pytest.mark.parametrize("who", ["none", "forged", "bank_b"])
@pytest.mark.parametrize("name", ["party-bank_a", "enclave"])
def test_every_method_of_the_agent_and_the_enclave_refuses_strangers(platform, name, who, tmp_path) -> None:
    with channel_to(platform, name, stranger_tls(platform, who, tmp_path)) as channel:
        for method in SERVICES[name].methods:
            path = method_path(SERVICES[name].full_name, method.name)
            code = invoke(channel, method)
            if who != "bank_b":
                assert code == HANDSHAKE_REFUSED, (path, code)
            elif RULES[path] is Callers.ANYONE:
                assert code == grpc.StatusCode.OK, path
            else:
                assert code in REFUSED, (path, code)
        if name == "enclave":
            assert upload(channel) in ((HANDSHAKE_REFUSED,) if who != "bank_b" else REFUSED)


@pytest.mark.parametrize("who", ["none", "forged", "bank_b"])
def test_every_method_of_the_coordinator_refuses_callers_without_token_or_signature(platform, who, tmp_path) -> None:
    service = SERVICES["coordinator"]
    with channel_to(platform, "coordinator", stranger_tls(platform, who, tmp_path)) as channel:
        for method in service.methods:
            path = method_path(service.full_name, method.name)
            code = invoke(channel, method)
            if RULES[path] is Callers.ANYONE:
                assert code == grpc.StatusCode.OK, path
            elif path not in SIGNATURE_PENDING:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (path, code)


def test_the_coordinator_identity_is_refused_what_only_a_job_party_or_the_owner_may_do(platform) -> None:
    with channel_to(platform, "enclave", platform.tls_config(pki.coordinator())) as channel:
        assert upload(channel) == grpc.StatusCode.PERMISSION_DENIED
    with channel_to(platform, "party-bank_a", platform.tls_config(pki.coordinator())) as channel:
        for method in SERVICES["party-bank_a"].methods:
            path = method_path(SERVICES["party-bank_a"].full_name, method.name)
            if RULES[path] is Callers.OWNER:
                assert invoke(channel, method) == grpc.StatusCode.UNAUTHENTICATED, path  # unsigned
