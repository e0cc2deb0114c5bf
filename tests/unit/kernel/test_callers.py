"""The table of who may call each RPC (sealroom.callers): complete, fail-closed, and what it decides."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom import callers, pki, signing
from sealroom.callers import RULES, Callers, admit, method_path, require_party_of, require_signed, signature_fields
from sealroom.errors import ApprovalError, AuthenticationError, CallerError
from sealroom.keys import public_key_hex
from sealroom.rpc import translate_errors
from sealroom.v1 import common_pb2, coordinator_pb2, enclave_pb2, party_pb2, party_pb2_grpc
from sealroom.wire import UPLOAD_PATH

# RegisterParty carries no signature until the registration work of issue 13 (i13-register) adds one;
# from then on it is checked like every signed method.
SIGNATURE_PENDING = (
    set()
    if signature_fields(coordinator_pb2.RegisterPartyRequest.DESCRIPTOR)
    else {"/sealroom.v1.Coordinator/RegisterParty"}
)


def generated_methods() -> dict[str, object]:
    """Every method of every service in the generated stubs, by its gRPC path."""
    out = {}
    for module in (common_pb2, coordinator_pb2, enclave_pb2, party_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out[method_path(service.full_name, method.name)] = method
    return out


def test_every_generated_method_has_a_rule_and_every_rule_a_method() -> None:
    found = generated_methods()
    assert sorted(set(found) - set(RULES)) == []
    assert set(RULES) - set(found) == {UPLOAD_PATH}  # the raw upload stream is not a proto service


def test_every_method_whose_callers_sign_has_a_signature_field() -> None:
    for path, method in generated_methods().items():
        if RULES[path] in callers.SIGNED and path not in SIGNATURE_PENDING:
            assert callers.signature_fields(method.input_type), path  # type: ignore[attr-defined]


def test_the_public_methods_are_the_public_facts_only() -> None:
    public = sorted(p for p, rule in RULES.items() if rule is Callers.ANYONE)
    assert public == [
        "/sealroom.v1.Coordinator/GetCheckpoint",
        "/sealroom.v1.Coordinator/GetConsistencyProof",
        "/sealroom.v1.Enclave/GetInfo",
        "/sealroom.v1.PartyAgent/GetInfo",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/sealroom.v1.PartyAgent/ReviewPlan",
        "/sealroom.v1.PartyAgent/Contribute",
        "/sealroom.v1.PartyAgent/GetProgress",
        "/sealroom.v1.PartyAgent/PrepareMpc",
        "/sealroom.v1.PartyAgent/RunMpc",
        "/sealroom.v1.Enclave/CreateJob",
        "/sealroom.v1.Enclave/Execute",
        "/sealroom.v1.Enclave/AbortJob",
        "/sealroom.v1.Enclave/PrepareMpc",
        "/sealroom.v1.Enclave/RunMpc",
    ],
)
def test_coordinator_methods_admit_the_coordinator_only(path: str) -> None:
    assert admit(path, pki.coordinator()) is Callers.COORDINATOR
    with pytest.raises(AuthenticationError):
        admit(path, None)
    with pytest.raises(CallerError) as info:
        admit(path, pki.party("bank_b"))
    assert path in info.value.message and "coordinator" in info.value.message


def test_a_method_without_a_rule_is_refused_to_everyone() -> None:
    for identity in (None, pki.coordinator(), pki.party("bank_a")):
        with pytest.raises(CallerError, match="no caller rule"):
            admit("/sealroom.v1.PartyAgent/Unknown", identity)


def test_attest_admits_the_coordinator_and_parties_only() -> None:
    path = "/sealroom.v1.Enclave/Attest"
    assert admit(path, pki.coordinator()) is Callers.JOB_MEMBER
    assert admit(path, pki.party("bank_a")) is Callers.JOB_MEMBER  # the handler then checks the job
    with pytest.raises(AuthenticationError):
        admit(path, None)


def test_a_party_of_the_job_is_one_the_job_names() -> None:
    assert require_party_of(UPLOAD_PATH, pki.party("bank_a"), {"bank_a", "bank_c"}) == "bank_a"
    with pytest.raises(CallerError):
        require_party_of(UPLOAD_PATH, pki.party("bank_b"), {"bank_a"})
    with pytest.raises(CallerError):
        require_party_of(UPLOAD_PATH, pki.coordinator(), {"bank_a"})
    with pytest.raises(AuthenticationError):
        require_party_of(UPLOAD_PATH, None, {"bank_a"})


def test_an_unsigned_request_is_refused_before_any_check_of_its_content() -> None:
    path = "/sealroom.v1.PartyAgent/ListPending"
    with pytest.raises(AuthenticationError):
        require_signed(path, party_pb2.ListPendingRequest(issued_at_ms=1))
    require_signed(path, party_pb2.ListPendingRequest(issued_at_ms=1, signature=b"s"))
    with pytest.raises(AuthenticationError):  # both the approval and the request's own signature
        require_signed("/sealroom.v1.Coordinator/SubmitApproval", coordinator_pb2.SubmitApprovalRequest(signature=b"s"))


def test_translate_errors_needs_a_generated_servicer() -> None:
    class NotAServicer:
        def GetInfo(self, request, context):  # noqa: N802
            return None

    with pytest.raises(TypeError):
        translate_errors(NotAServicer)

    class Partial(party_pb2_grpc.PartyAgentServicer):
        def GetInfo(self, request, context):  # noqa: N802
            return None

    wrapped = translate_errors(Partial)
    assert getattr(wrapped.GetInfo, "_sealroom_translated", False)
    assert wrapped.ReviewPlan is party_pb2_grpc.PartyAgentServicer.ReviewPlan  # left unimplemented


def test_an_owner_read_is_its_own_signed_document() -> None:
    key = Ed25519PrivateKey.generate()
    pk = public_key_hex(key)
    sig = signing.sign_owner_read(key, "pending", party="bank_a", issued_at_ms=1_000)
    signing.verify_owner_read(pk, sig, "pending", party="bank_a", issued_at_ms=1_000, now_ms=2_000)
    msg = signing.owner_read_message("pending", party="bank_a", issued_at_ms=1_000)
    assert msg.startswith(b"sealroom/v1/owner-read\x00")
    for other in (
        signing.owner_command_message("approve", party="bank_a", query_id="", issued_at_ms=1_000),
        signing.owner_action_message("approve", query_id="", party="bank_a", plan_hash="", issued_at_ms=1_000),
    ):
        assert other != msg
    with pytest.raises(ApprovalError) as info:  # another party's read
        signing.verify_owner_read(pk, sig, "pending", party="bank_b", issued_at_ms=1_000, now_ms=2_000)
    assert info.value.details["check"] == "owner_read_signature"
    with pytest.raises(ApprovalError) as info:  # stale
        signing.verify_owner_read(pk, sig, "pending", party="bank_a", issued_at_ms=1_000, now_ms=10_000_000)
    assert info.value.details["check"] == "issued_at"
    with pytest.raises(ValueError):
        signing.owner_read_message("secrets", party="bank_a", issued_at_ms=1)
