"""A data owner's agent decides for itself: real PartyAgent, real enclave worker, real gRPC.

Invariant 1: a party's rows leave it only sealed to an enclave key bound into evidence that *this
party* verified under *its own* trust policy, and only for a plan *it* approved. Each refusal below
must leave the enclave holding nothing from that party.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealroom import pki
from sealroom.attestation import dev_init
from sealroom.errors import ApprovalError, AttestationError, IntegrityError, PolicyRefusalError
from sealroom.keys import generate_signing_key, public_key_hex
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.rpc import TLSConfig, create_server, raw_stream_handler
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc
from tests.harness.enclave import (
    Agent,
    EnclaveHandle,
    JobHandle,
    approval,
    make_party,
    make_plan,
    start_agent,
)

SQL = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=3, analysts=("alice",))


def _trust(enclave: EnclaveHandle, dev_dir: Path, **changes: object) -> TrustPolicy:
    trust = TrustPolicy(
        measurements=enclave.appraisal.measurements, allow_simulated=True, dev_root=dev_dir / "dev-root.crt"
    )
    return dataclasses.replace(trust, **changes)


@pytest.fixture
def agent_factory(tmp_path: Path, dev_dir: Path, enclave: EnclaveHandle) -> Iterator[Callable[..., Agent]]:
    cleanups: list[Callable[[], None]] = []

    def factory(trust: TrustPolicy | None = None, policy: DatasetPolicy = POLICY) -> Agent:
        agent, cleanup = start_agent(tmp_path / f"agent{len(cleanups)}", trust or _trust(enclave, dev_dir), policy)
        cleanups.append(cleanup)
        return agent

    yield factory
    for cleanup in reversed(cleanups):
        cleanup()


def _holds_nothing_from_bank_a(enclave: EnclaveHandle, job: JobHandle) -> None:
    state = enclave.job(job.job_id)
    assert state is None or state.inputs[("bank_a", "loans")].table is None
    assert enclave.held_bytes == 0


def test_agent_contributes_to_an_attested_enclave_for_a_plan_it_approved(
    agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    """The control case: with everything right, the agent streams and the enclave releases."""
    party = agent_factory()
    plan = make_plan(SQL, [party.data])
    review = party.review(plan)
    assert review.approved and review.plan_hash == plan.hash
    job = enclave.create_job(plan)
    out = party.contribute(plan.to_json(), job)
    assert [u.dataset for u in out.uploads] == ["loans"] and out.uploads[0].frames >= 1
    assert json.loads(out.claims_json)["measurement"] in enclave.appraisal.measurements
    assert enclave.held_bytes > 0
    resp = job.execute([approval(plan, party.data)])
    assert json.loads(resp.result_json)["plan_hash"] == plan.hash


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"measurements": frozenset({"ab" * 48})}, "measurement"),
        ({"measurements": frozenset()}, "measurement"),
        ({"allow_simulated": False}, "simulated"),
        ("other_dev_root", "chain"),
    ],
    ids=["measurement_not_trusted", "no_measurement_trusted", "simulated_not_allowed", "other_dev_root_pinned"],
)
def test_agent_refuses_an_enclave_its_trust_policy_rejects(
    change: dict[str, object] | str,
    check: str,
    agent_factory: Callable[..., Agent],
    enclave: EnclaveHandle,
    dev_dir: Path,
    tmp_path: Path,
) -> None:
    if change == "other_dev_root":
        other = tmp_path / "other-dev"
        dev_init(other)
        trust = _trust(enclave, dev_dir, dev_root=other / "dev-root.crt")
    else:
        assert isinstance(change, dict)
        trust = _trust(enclave, dev_dir, **change)
    party = agent_factory(trust)
    plan = make_plan(SQL, [party.data])
    assert party.review(plan).approved
    job = enclave.create_job(plan)
    rej = party.contribute_refused(plan.to_json(), job)
    assert rej.status == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(rej.error, AttestationError)
    assert rej.error.details.get("check") == check
    _holds_nothing_from_bank_a(enclave, job)


@pytest.mark.parametrize(
    ("dataset_trust", "check"),
    [
        ({"allow_simulated": False}, "simulated"),
        ({"measurements": ["ab" * 48]}, "measurement"),
    ],
    ids=["dataset_refuses_simulated", "dataset_pins_another_measurement"],
)
def test_a_datasets_own_trust_section_narrows_the_agents(
    dataset_trust: dict[str, object], check: str, agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    """The agent trusts this simulated enclave, but the dataset's policy does not: nothing streams."""
    policy = DatasetPolicy.from_dict({**POLICY.to_dict(), "trust": dataset_trust})
    party = agent_factory(policy=policy)
    plan = make_plan(SQL, [party.data])
    assert party.review(plan).approved
    job = enclave.create_job(plan)
    rej = party.contribute_refused(plan.to_json(), job)
    assert rej.status == grpc.StatusCode.UNAUTHENTICATED
    assert rej.error.details.get("check") == check and "bank_a.loans" in rej.error.message
    _holds_nothing_from_bank_a(enclave, job)


def _one_byte_changed(plan_json: bytes) -> bytes:
    i = plan_json.index(b'"salt":"') + len(b'"salt":"')
    flipped = b"0" if plan_json[i : i + 1] != b"0" else b"1"
    return plan_json[:i] + flipped + plan_json[i + 1 :]


@pytest.mark.parametrize("variant", ["never_reviewed", "one_byte_changed", "trailing_byte"])
def test_agent_streams_only_for_a_plan_it_approved(
    variant: str, agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    party = agent_factory()
    plan = make_plan(SQL, [party.data])
    plan_json = plan.to_json()
    if variant != "never_reviewed":
        assert party.review(plan).approved
        plan_json = _one_byte_changed(plan_json) if variant == "one_byte_changed" else plan_json + b" "
        assert len(plan_json) - len(plan.to_json()) in (0, 1) and plan_json != plan.to_json()
    job = enclave.create_job(plan)
    rej = party.contribute_refused(plan_json, job)
    assert rej.status == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(rej.error, ApprovalError)
    assert rej.error.details.get("check") == "own_approval"
    _holds_nothing_from_bank_a(enclave, job)


def test_agent_stream_for_its_approved_plan_is_rejected_by_a_job_for_another_plan(
    agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    """A compromised coordinator creates the job for changed SQL but shows the agent the approved plan:
    the agent seals for the plan it approved, and the enclave refuses the stream."""
    party = agent_factory()
    approved = make_plan(SQL, [party.data])
    assert party.review(approved).approved
    changed = make_plan(SQL.replace("SUM(exposure)", "MAX(exposure)"), [party.data], query_id=approved.query_id)
    job = enclave.create_job(changed)
    rej = party.contribute_refused(approved.to_json(), job)
    assert rej.status == grpc.StatusCode.DATA_LOSS
    assert isinstance(rej.error, IntegrityError)
    _holds_nothing_from_bank_a(enclave, job)


def _weaker_stage(plan: Plan) -> Plan:
    return dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0], min_group_size=1),))


def _plan_variant(variant: str, party: Agent) -> Plan:
    if variant == "policy_digest_differs":
        weaker = dataclasses.replace(POLICY, min_group_size=1)
        return make_plan(SQL, [make_party("bank_a", party.data.tables["loans"], policy=weaker, key=party.data.key)])
    plan = make_plan(SQL, [party.data])
    if variant == "min_group_size_weaker":
        return _weaker_stage(plan)
    if variant == "another_signing_key":
        return make_plan(SQL, [party.data], party_keys={"bank_a": public_key_hex(generate_signing_key())})
    if variant == "analyst_not_allowed":
        return dataclasses.replace(plan, analyst="mallory")
    raise AssertionError(variant)


@pytest.mark.parametrize(
    ("variant", "code", "key", "value"),
    [
        ("policy_digest_differs", "policy_refusal", "rule", "policy_digest"),
        ("min_group_size_weaker", "policy_refusal", "rule", "min_group_size"),
        ("another_signing_key", "approval", "check", "party_key"),
        ("analyst_not_allowed", "policy_refusal", "rule", "analysts"),
    ],
)
def test_agent_refuses_to_approve_a_plan_against_its_policy(
    variant: str, code: str, key: str, value: str, agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    party = agent_factory()
    plan = _plan_variant(variant, party)
    review = party.review(plan)
    assert not review.approved
    assert not review.signature and not review.plan_hash
    error = json.loads(review.error_json)
    assert error["code"] == code
    assert error["details"][key] == value
    assert error["details"]["party"] == "bank_a"
    # Having refused, it streams nothing for that plan. (The enclave refuses a plan for an analyst
    # the carried policy does not allow on its own, so that variant stops here.)
    if variant == "analyst_not_allowed":
        with pytest.raises(grpc.RpcError) as info:
            enclave.create_job(plan)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        return
    job = enclave.create_job(plan)
    rej = party.contribute_refused(plan.to_json(), job)
    assert rej.status == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(rej.error, ApprovalError)
    _holds_nothing_from_bank_a(enclave, job)


def test_agent_refusal_errors_are_catalogued(agent_factory: Callable[..., Agent]) -> None:
    """ReviewPlan's refusal document rebuilds into the catalogued error the coordinator relays."""
    from sealroom.errors import from_code

    party = agent_factory()
    doc = json.loads(party.review(_plan_variant("analyst_not_allowed", party)).error_json)
    err = from_code(doc["code"], doc["message"], doc.get("details"))
    assert isinstance(err, PolicyRefusalError)
    assert "mallory" in err.message and "bank_a" in err.message


class _MaliciousEnclaveFront(enclave_pb2_grpc.EnclaveServicer):
    """What a compromised operator host could put in front of the real enclave worker: it forwards
    Attest but swaps the job key for its own, or answers with evidence for an older nonce."""

    def __init__(self, real: EnclaveHandle, mode: str):
        self.real, self.mode = real, mode
        self.attacker_key = X25519PrivateKey.generate()
        self.uploads = 0

    def Attest(self, request, context):  # noqa: N802
        real = self.real.stub.Attest(request, timeout=10)
        if self.mode == "swapped_job_key":
            mine = self.attacker_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            return enclave_pb2.AttestResponse(
                evidence=real.evidence, hpke_public_key=mine, signing_public_key=real.signing_public_key
            )
        stale = self.real.stub.Attest(enclave_pb2.AttestRequest(job_id=request.job_id, nonce=os.urandom(32)))
        return enclave_pb2.AttestResponse(
            evidence=stale.evidence, hpke_public_key=real.hpke_public_key, signing_public_key=real.signing_public_key
        )

    def upload(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self.uploads += 1
        for _ in frames:
            pass
        return enclave_pb2.UploadSummary().SerializeToString()


@pytest.mark.parametrize(("mode", "check"), [("swapped_job_key", "report_data"), ("stale_evidence", "nonce")])
def test_agent_refuses_keys_or_evidence_not_bound_to_its_own_challenge(
    mode: str, check: str, agent_factory: Callable[..., Agent], enclave: EnclaveHandle
) -> None:
    front = _MaliciousEnclaveFront(enclave, mode)
    # The front's own TLS certificate (the enclave's key stays in the enclave), handed to the agent as
    # a compromised coordinator would: the report-data check below still holds the line.
    cert, key = pki.self_signed("front", pki.ENCLAVE_SERVER_NAME)
    server = create_server(
        "127.0.0.1:0",
        tls=TLSConfig().with_identity(cert, key),
        handlers=(raw_stream_handler("sealroom.v1.EnclaveData", "Upload", front.upload),),
    )
    enclave_pb2_grpc.add_EnclaveServicer_to_server(front, server.grpc)
    server.start()
    try:
        party = agent_factory()
        plan = make_plan(SQL, [party.data])
        assert party.review(plan).approved
        job = enclave.create_job(plan)
        rej = party.contribute_refused(plan.to_json(), job, address=f"127.0.0.1:{server.port}", certificate=cert)
    finally:
        server.stop(grace=0.5)
    assert rej.status == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(rej.error, AttestationError)
    assert rej.error.details.get("check") == check
    assert front.uploads == 0, "the agent sent sealed data to an enclave it could not verify"
    _holds_nothing_from_bank_a(enclave, job)
