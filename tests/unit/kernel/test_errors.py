"""One error catalog, one translator: each error reaches a gRPC client with its status, public
message and details; anything unexpected becomes a generic INTERNAL error whose text stays in the
server."""

from __future__ import annotations

import grpc
import pytest

from sealroom import errors, pki
from sealroom.rpc import call, create_server, dial, translate_errors
from sealroom.v1 import common_pb2, party_pb2, party_pb2_grpc
from tests.harness.pki import as_coordinator, tls_as

EXPECTED = {
    errors.InvalidQueryError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PolicyRefusalError: grpc.StatusCode.PERMISSION_DENIED,
    errors.ApprovalError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AttestationError: grpc.StatusCode.UNAUTHENTICATED,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def test_catalog_maps_each_error_to_one_status_and_unique_code():
    codes = [cls.code for cls in errors.CATALOG.values()]
    assert len(codes) == len(set(codes))
    for cls, status in EXPECTED.items():
        assert cls.grpc_status == status
        assert errors.CATALOG[cls.code] is cls
    assert issubclass(errors.InvalidQueryError, ValueError)
    assert issubclass(errors.PolicyRefusalError, PermissionError)


def test_from_code_round_trip_and_unknown_codes():
    e = errors.from_code("policy_refusal", "no", {"party": "bank_a"})
    assert isinstance(e, errors.PolicyRefusalError) and e.details == {"party": "bank_a"}
    assert isinstance(errors.from_code("nonsense", "x"), errors.InternalError)


SECRET = "row-value-4242"


class _Raising(party_pb2_grpc.PartyAgentServicer):
    exc: Exception

    def GetInfo(self, request, context):  # noqa: N802
        raise self.exc


@pytest.fixture()
def server():
    servicer = translate_errors(_Raising)()
    srv = create_server("127.0.0.1:0", tls=tls_as(pki.party("bank_a")), require_client_auth=True)
    party_pb2_grpc.add_PartyAgentServicer_to_server(servicer, srv.grpc)
    srv.start()
    channel = dial(f"127.0.0.1:{srv.port}", as_coordinator(), pki.party("bank_a"))
    yield servicer, party_pb2_grpc.PartyAgentStub(channel)
    channel.close()
    srv.stop(0)


@pytest.mark.parametrize("cls", [c for c in EXPECTED if c is not errors.InternalError])
def test_errors_cross_the_wire_with_status_message_and_details(server, cls):
    servicer, stub = server
    servicer.exc = cls("what was wrong and how to fix it", details={"party": "bank_b", "column": "x"})
    with pytest.raises(grpc.RpcError) as info:
        stub.GetInfo(common_pb2.Empty(), timeout=5)
    assert info.value.code() == EXPECTED[cls]
    assert info.value.details() == "what was wrong and how to fix it"
    with pytest.raises(cls) as again:
        call("party", stub.GetInfo, common_pb2.Empty(), timeout=5)
    assert again.value.details == {"party": "bank_b", "column": "x"}


def test_unexpected_errors_are_generic_and_never_leak(server, caplog):
    servicer, stub = server
    servicer.exc = ValueError(f"could not convert {SECRET} to DOUBLE")
    caplog.set_level("INFO")
    with pytest.raises(errors.InternalError) as info:
        call("party", stub.GetInfo, common_pb2.Empty(), timeout=5)
    assert SECRET not in str(info.value)
    assert info.value.message.startswith("internal error")
    assert SECRET not in caplog.text
    assert "ValueError" in caplog.text


def test_unreachable_peer_is_unavailable():
    channel = dial("127.0.0.1:1", as_coordinator(), pki.party("bank_a"))
    with pytest.raises(errors.UnavailableError, match="unreachable"):
        call("coordinator", party_pb2_grpc.PartyAgentStub(channel).GetInfo, common_pb2.Empty(), timeout=2)
    channel.close()
    assert party_pb2.ReviewPlanRequest  # the stubs import cleanly
