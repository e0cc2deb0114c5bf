"""Attacks on the enclave worker through its real gRPC API, with real cryptography.

Every attack must end with (1) the right gRPC status and, for a sealed stream, the one uniform
integrity message with no payload value in it or in the worker's log; and (2) nothing released: no
Execute returns a result afterwards, and the job's data is dropped (``held_bytes`` back to 0).

Invariants under attack (docs: DESIGN.md "Threat model and the invariants"): 1 (rows only for an
attested job and an approved plan), 3 (every owner's approval, the enclave compiles the plan
itself), 4 (only aggregates passing the strictest rule; suppressed cells carry no value), 7 (no row
value in a log or an error), 8 (a failure ends the job with no partial release).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pyarrow as pa
import pytest

from coordinator.tee_stage import verify_result
from sealroom.canonical import canonical_json
from sealroom.errors import ApprovalError, IntegrityError, InvalidQueryError, JobFailedError
from sealroom.keys import generate_signing_key
from sealroom.planning.plan import Plan
from sealroom.policy import ColumnRule, DatasetPolicy
from sealroom.v1 import enclave_pb2
from tests.harness.enclave import (
    HEADER_METADATA_KEY,
    INTEGRITY_MESSAGE,
    SECRET,
    SECRET_NUMBER,
    SIGNATURE_METADATA_KEY,
    EnclaveHandle,
    JobHandle,
    PartyData,
    Rejection,
    SealedStream,
    approval,
    approvals,
    loans_table,
    make_party,
    make_plan,
    rejection,
    replace_context,
    secret_loans,
    wait_for,
)

JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)
SINGLE_SQL = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"
# The segments are a public domain, so suppressed cells are listed by key (otherwise only counted).
PUBLIC_SEGMENTS = {
    "segment": ColumnRule("open", values=("retail", "vip", "smb", "x", "big", "tiny", "big1", "big2", "small"))
}


def _leaks(text: str) -> bool:
    return SECRET in text or str(SECRET_NUMBER) in text or repr(SECRET_NUMBER) in text


def _assert_no_leak(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in texts:
        assert not _leaks(text), "a party's row value appears in an error message"
    assert not _leaks(caplog.text), "a party's row value appears in the enclave worker's log"


def _assert_uniform_integrity(rej: Rejection) -> None:
    assert rej.status == grpc.StatusCode.DATA_LOSS
    assert isinstance(rej.error, IntegrityError)
    assert rej.error.code == "integrity"
    assert rej.error.message == INTEGRITY_MESSAGE
    assert rej.details == INTEGRITY_MESSAGE
    assert rej.error.details == {}


def _assert_nothing_released(enclave: EnclaveHandle, job: JobHandle, plan: Plan, parties: list[PartyData]) -> None:
    """Execute with every valid approval must fail, and the job and its data must be gone."""
    rej = job.execute_rejected(approvals(plan, parties))
    assert rej.status != grpc.StatusCode.OK
    assert enclave.job(job.job_id) is None
    assert enclave.held_bytes == 0
    again = job.execute_rejected(approvals(plan, parties))
    assert again.status == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------------------------------
# sealed-stream attacks


@dataclass
class Scene:
    """Two parties, a job for their join, and bank_b's honest stream already loaded in the enclave."""

    enclave: EnclaveHandle
    plan: Plan
    job: JobHandle
    a: PartyData
    b: PartyData
    b_stream: SealedStream

    def other_job(self) -> JobHandle:
        return self.enclave.create_job(self.plan)


def _flip(frame: bytes, index: int) -> bytes:
    out = bytearray(frame)
    out[index] ^= 0x01
    return bytes(out)


def _with_flag(frame: bytes, flag: int) -> bytes:
    return bytes((flag,)) + frame[1:]


def _tamper(change: Callable[[list[bytes]], list[bytes]]) -> Callable[[Scene], Rejection]:
    def attack(s: Scene) -> Rejection:
        stream = s.job.seal(s.a)
        assert len(stream.frames) >= 4
        return s.enclave.upload_rejected(stream, frames=change(list(stream.frames)))

    return attack


def _swap(frames: list[bytes]) -> list[bytes]:
    frames[1], frames[2] = frames[2], frames[1]
    return frames


def _spliced_from_other_party(s: Scene) -> Rejection:
    stream = s.job.seal(s.a)
    frames = list(stream.frames)
    frames[1] = s.b_stream.frames[1]  # bank_b's frame, sealed for this very job
    return s.enclave.upload_rejected(stream, frames=frames)


def _frames_from_another_job(s: Scene) -> Rejection:
    theirs = s.other_job().seal(s.a)  # bank_a's genuine stream for another job of the same plan
    ours = s.job.seal(s.a)
    return s.enclave.upload_rejected(ours, frames=theirs.frames)


def _sealed_to_another_job_key(s: Scene) -> Rejection:
    other = s.other_job()
    return s.enclave.upload_rejected(s.job.seal(s.a, hpke_public=other.hpke_public))


def _header_with_another_plan_hash(s: Scene) -> Rejection:
    other_plan = make_plan(JOIN_SQL, [s.a, s.b])  # same SQL, another query: another plan hash
    ctx = replace_context(plan_hash=bytes.fromhex(other_plan.hash))
    return s.enclave.upload_rejected(s.job.seal(s.a, context=ctx))


def _evidence_never_issued(s: Scene) -> Rejection:
    return s.enclave.upload_rejected(s.job.seal(s.a, context=replace_context(evidence_hash=os.urandom(32))))


def _evidence_of_another_job(s: Scene) -> Rejection:
    other = s.other_job()
    return s.enclave.upload_rejected(s.job.seal(s.a, context=replace_context(evidence_hash=other.evidence_hash)))


def _whole_stream_replayed(s: Scene) -> Rejection:
    stream = s.job.seal(s.a)
    s.enclave.upload(stream)
    return s.enclave.upload_rejected(stream)


def _second_fresh_stream(s: Scene) -> Rejection:
    s.enclave.upload(s.job.seal(s.a))
    return s.enclave.upload_rejected(s.job.seal(s.a))


def _no_owner_signature(s: Scene) -> Rejection:
    stream = s.job.seal(s.a)
    return s.enclave.upload_rejected(stream, metadata=[(HEADER_METADATA_KEY, stream.header)])


def _no_header(s: Scene) -> Rejection:
    stream = s.job.seal(s.a)
    return s.enclave.upload_rejected(stream, metadata=[(SIGNATURE_METADATA_KEY, stream.signature)])


def _forged_owner_signature(s: Scene) -> Rejection:
    return s.enclave.upload_rejected(s.job.seal(s.a, sign_with=generate_signing_key()))


def _signed_by_another_party_of_the_plan(s: Scene) -> Rejection:
    return s.enclave.upload_rejected(s.job.seal(s.a, sign_with=s.b.key))


def _dataset_not_in_plan(s: Scene) -> Rejection:
    return s.enclave.upload_rejected(s.job.seal(s.a, context=replace_context(dataset="cards")))


def _schema(columns: tuple[str, ...], *, extra: bool = False) -> Callable[[Scene], Rejection]:
    def attack(s: Scene) -> Rejection:
        table = secret_loans()
        if extra:
            table = table.append_column("note", pa.array([SECRET] * table.num_rows))
        return s.enclave.upload_rejected(s.job.seal(s.a, table=table, columns=columns))

    return attack


def _malformed_batch(s: Scene) -> Rejection:
    # Authenticates (bank_a sealed it) but is not a record batch of the header's schema.
    payload = (SECRET + str(SECRET_NUMBER)).encode() * 4
    return s.enclave.upload_rejected(s.job.seal(s.a, payloads=[payload, payload]))


# name -> (attack, rejected before the stream is opened: the header/metadata check, not a frame)
ATTACKS: dict[str, tuple[Callable[[Scene], Rejection], bool]] = {
    "tampered_ciphertext_byte": (_tamper(lambda f: [f[0], _flip(f[1], 7), *f[2:]]), False),
    "tampered_tag": (_tamper(lambda f: [f[0], _flip(f[1], len(f[1]) - 1), *f[2:]]), False),
    "final_flag_set_on_a_middle_frame": (_tamper(lambda f: [f[0], _with_flag(f[1], 1), *f[2:]]), False),
    "final_flag_cleared_on_the_last_frame": (_tamper(lambda f: [*f[:-1], _with_flag(f[-1], 0)]), False),
    "reserved_flag_bit": (_tamper(lambda f: [f[0], _with_flag(f[1], 0x02), *f[2:]]), False),
    "replayed_frame": (_tamper(lambda f: [f[0], f[1], f[1], *f[2:]]), False),
    "reordered_frames": (_tamper(_swap), False),
    "dropped_frame": (_tamper(lambda f: [f[0], *f[2:]]), False),
    "truncated_no_final_frame": (_tamper(lambda f: f[:-1]), False),
    "frame_after_the_final_frame": (_tamper(lambda f: [*f, f[-1]]), False),
    "frames_spliced_from_another_party": (_spliced_from_other_party, False),
    "frames_from_another_job": (_frames_from_another_job, False),
    "sealed_to_another_jobs_key": (_sealed_to_another_job_key, False),
    "schema_extra_column": (_schema(("customer_id", "segment", "exposure", "note"), extra=True), False),
    "schema_missing_column": (_schema(("customer_id", "segment")), False),
    "schema_columns_reordered": (_schema(("segment", "customer_id", "exposure")), False),
    "authenticated_but_malformed_batch": (_malformed_batch, False),
    "header_with_another_plans_hash": (_header_with_another_plan_hash, True),
    "evidence_hash_never_issued": (_evidence_never_issued, True),
    "evidence_hash_of_another_job": (_evidence_of_another_job, True),
    "whole_stream_replayed": (_whole_stream_replayed, True),
    "second_fresh_stream_same_dataset": (_second_fresh_stream, True),
    "no_owner_signature": (_no_owner_signature, True),
    "no_stream_header": (_no_header, True),
    "forged_owner_signature": (_forged_owner_signature, True),
    "signed_by_another_party_of_the_plan": (_signed_by_another_party_of_the_plan, True),
    "dataset_not_in_plan": (_dataset_not_in_plan, True),
}
SECOND_STREAM = {"whole_stream_replayed", "second_fresh_stream_same_dataset"}


def _params() -> list[object]:
    return [pytest.param(name, id=name) for name in ATTACKS]


@pytest.fixture
def scene(enclave: EnclaveHandle) -> Scene:
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    b_stream = job.seal(b)
    enclave.upload(b_stream)
    assert enclave.held_bytes > 0
    return Scene(enclave, plan, job, a, b, b_stream)


@pytest.mark.parametrize("attack", _params())
def test_stream_attack_is_rejected_with_the_uniform_integrity_error(
    attack: str, scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rej = ATTACKS[attack][0](scene)
    _assert_uniform_integrity(rej)
    _assert_no_leak(caplog, rej.details, rej.error.to_json())
    job = scene.enclave.job(scene.job.job_id)
    if attack not in SECOND_STREAM:
        # Nothing of bank_a's rejected stream was committed.
        assert job is None or job.inputs[("bank_a", "loans")].table is None


@pytest.mark.parametrize("attack", _params())
def test_stream_attack_leaves_nothing_released(attack: str, scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ATTACKS[attack][0](scene)
    _assert_nothing_released(scene.enclave, scene.job, scene.plan, [scene.a, scene.b])
    _assert_no_leak(caplog)


@pytest.mark.parametrize("attack", [a for a in _params() if a.values[0] != "no_stream_header"])
def test_stream_attack_fails_the_job_and_drops_its_data(attack: str, scene: Scene) -> None:
    ATTACKS[attack][0](scene)
    job = scene.enclave.job(scene.job.job_id)
    assert job is None or job.failed is not None, "the job survived a stream that failed authentication"
    assert scene.enclave.held_bytes == 0, "the enclave still holds the other party's rows"
    # The job accepts nothing more, not even bank_a's genuine stream.
    if job is not None:
        late = scene.enclave.upload_rejected(scene.job.seal(scene.a))
        assert late.status in (grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND)
        assert job.inputs[("bank_a", "loans")].table is None


def test_garbage_header_is_rejected_with_the_uniform_integrity_error(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stream = scene.job.seal(scene.a)
    garbage = SECRET.encode() + stream.header[len(SECRET) :]
    rej = scene.enclave.upload_rejected(stream, header=garbage)
    _assert_uniform_integrity(rej)
    _assert_no_leak(caplog, rej.details)


@pytest.mark.parametrize("claims", ["bank_c", "bank_a"])
def test_a_party_the_plan_does_not_name_is_refused_before_its_stream_is_read(scene: Scene, claims: str) -> None:
    """bank_c (a valid certificate of the collaboration) streams to a job of bank_a and bank_b, under
    its own name or bank_a's: refused for who it is (PERMISSION_DENIED), and the job lives on, so an
    outsider cannot fail other parties' jobs either."""
    c = make_party("bank_c", secret_loans())
    if claims == "bank_c":
        stream = scene.job.seal(c, plan=scene.plan, columns=("customer_id", "segment", "exposure"))
    else:
        stream = scene.job.seal(scene.a)
    rej = scene.enclave.upload_rejected(stream, sender="bank_c")
    assert rej.status == grpc.StatusCode.PERMISSION_DENIED
    job = scene.enclave.job(scene.job.job_id)
    assert job is not None and job.failed is None
    scene.enclave.upload(scene.job.seal(scene.a))  # bank_a's own stream still loads
    assert job.inputs[("bank_a", "loans")].table is not None


def test_a_party_the_plan_names_cannot_stream_another_partys_input(scene: Scene) -> None:
    """bank_b, named by the job, sends bank_a's sealed stream under its own certificate: the stream
    header's party must be the certificate's (the two are tied before a frame is read), so it is
    refused for who it is and bank_a's own stream still loads."""
    rej = scene.enclave.upload_rejected(scene.job.seal(scene.a), sender="bank_b")
    assert rej.status == grpc.StatusCode.PERMISSION_DENIED
    job = scene.enclave.job(scene.job.job_id)
    assert job is not None and job.failed is None and job.inputs[("bank_a", "loans")].table is None
    scene.enclave.upload(scene.job.seal(scene.a))
    assert job.inputs[("bank_a", "loans")].table is not None


# --------------------------------------------------------------------------------------------------
# resource limits and broken connections


def test_memory_limit_exceeded_fails_the_job(
    enclave_factory: Callable[..., EnclaveHandle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    enclave = enclave_factory(memory_limit_bytes=8 * 1024)
    a = make_party("bank_a", secret_loans(2000))
    b = make_party("bank_b", secret_loans(40))
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    enclave.upload(job.seal(b))
    assert 0 < enclave.held_bytes < 8 * 1024
    rej = enclave.upload_rejected(job.seal(a, rows_per_frame=100))
    assert rej.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rej.error.code == "resource_exhausted"
    _assert_no_leak(caplog, rej.details)
    state = enclave.job(job.job_id)
    assert state is not None and state.failed is not None
    assert enclave.held_bytes == 0
    _assert_nothing_released(enclave, job, plan, [a, b])


class _Gate:
    """A request iterator that yields some frames, then blocks or breaks, as a dying party would."""

    def __init__(self, frames: list[bytes], *, first: int, then: str):
        self.frames, self.first, self.then = frames, first, then
        self.release = threading.Event()
        self.sent = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield from self.frames[: self.first]
        self.sent.set()
        if self.then == "raise":
            raise ConnectionResetError("the party's process died")
        self.release.wait(10)
        yield from self.frames[self.first :]


@pytest.mark.parametrize("how", ["cancel", "raise"])
def test_party_disconnect_mid_stream_fails_the_job(
    how: str, enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    enclave.upload(job.seal(b))
    stream = job.seal(a)
    held_before = enclave.held_bytes
    gate = _Gate(stream.frames, first=2, then="block" if how == "cancel" else "raise")
    future = enclave.upload_as("bank_a").future(
        iter(gate),
        metadata=((HEADER_METADATA_KEY, stream.header), (SIGNATURE_METADATA_KEY, stream.signature)),
        timeout=30,
    )
    try:
        assert gate.sent.wait(10)
        if how == "cancel":
            # The enclave has opened bank_a's first frames before the party goes away.
            assert wait_for(lambda: enclave.held_bytes > held_before)
            future.cancel()
        with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
            future.result(timeout=10)
    finally:
        gate.release.set()
    assert wait_for(lambda: (j := enclave.job(job.job_id)) is not None and j.failed is not None)
    assert wait_for(lambda: enclave.held_bytes == 0)
    rej = job.execute_rejected(approvals(plan, [a, b]))
    assert rej.status == grpc.StatusCode.ABORTED
    assert isinstance(rej.error, JobFailedError)
    assert "bank_a" in rej.error.message and "stopped" in rej.error.message
    assert enclave.held_bytes == 0 and enclave.job(job.job_id) is None
    _assert_no_leak(caplog, rej.details)


@pytest.mark.parametrize("end", ["execute", "abort"])
def test_job_ended_while_a_stream_is_in_flight_releases_its_memory(end: str, enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    enclave.upload(job.seal(b))
    stream = job.seal(a)
    held_before = enclave.held_bytes
    gate = _Gate(stream.frames, first=2, then="block")
    future = enclave.upload_as("bank_a").future(
        iter(gate),
        metadata=((HEADER_METADATA_KEY, stream.header), (SIGNATURE_METADATA_KEY, stream.signature)),
        timeout=30,
    )
    try:
        assert wait_for(lambda: enclave.held_bytes > held_before)
        if end == "execute":
            rej = job.execute_rejected(approvals(plan, [a, b]))
            assert rej.status == grpc.StatusCode.ABORTED  # bank_a's input has not arrived
        else:
            enclave.stub.AbortJob(enclave_pb2.JobRef(job_id=job.job_id, job_token=job.token), timeout=10)
        assert enclave.job(job.job_id) is None
    finally:
        gate.release.set()
    with pytest.raises(grpc.RpcError):
        future.result(timeout=10)
    assert wait_for(lambda: enclave.held_bytes == 0, timeout=1), f"{enclave.held_bytes} bytes still counted"


# --------------------------------------------------------------------------------------------------
# approvals


@pytest.fixture
def loaded(enclave: EnclaveHandle) -> tuple[EnclaveHandle, Plan, JobHandle, PartyData, PartyData]:
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    enclave.upload(job.seal(a))
    enclave.upload(job.seal(b))
    return enclave, plan, job, a, b


def _assert_refused_approval(rej: Rejection, party: str, check: str, enclave: EnclaveHandle, job: JobHandle) -> None:
    assert rej.status == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(rej.error, ApprovalError)
    assert rej.error.details.get("party") == party
    assert rej.error.details.get("check") == check
    assert party in rej.error.message
    assert enclave.job(job.job_id) is None
    assert enclave.held_bytes == 0


def test_execute_without_one_partys_approval_is_refused(loaded, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    enclave, plan, job, a, b = loaded
    rej = job.execute_rejected([approval(plan, a)])
    _assert_refused_approval(rej, "bank_b", "approval_missing", enclave, job)
    _assert_no_leak(caplog, rej.details)
    assert job.execute_rejected(approvals(plan, [a, b])).status == grpc.StatusCode.NOT_FOUND


def test_execute_with_a_forged_approval_is_refused(loaded) -> None:
    enclave, plan, job, a, b = loaded
    rej = job.execute_rejected([approval(plan, a), approval(plan, b, key=generate_signing_key())])
    _assert_refused_approval(rej, "bank_b", "approval_signature", enclave, job)
    assert job.execute_rejected(approvals(plan, [a, b])).status == grpc.StatusCode.NOT_FOUND


def test_execute_with_an_approval_signed_by_another_party_is_refused(loaded) -> None:
    enclave, plan, job, a, b = loaded
    rej = job.execute_rejected([approval(plan, a), approval(plan, b, key=a.key)])
    _assert_refused_approval(rej, "bank_b", "approval_signature", enclave, job)


@pytest.mark.parametrize("relabel", [False, True], ids=["old_hash", "relabelled_to_new_hash"])
def test_replayed_approval_of_an_earlier_query_is_refused(relabel: bool, enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    first = make_plan(JOIN_SQL, [a, b])
    second = make_plan(JOIN_SQL, [a, b])  # the very same SQL, submitted again
    assert first.hash != second.hash
    job = enclave.create_job(second)
    enclave.upload(job.seal(a))
    enclave.upload(job.seal(b))
    old = approval(first, b)
    if relabel:
        old = enclave_pb2.Approval(party=old.party, plan_hash=second.hash, signature=old.signature)
    rej = job.execute_rejected([approval(second, a), old])
    _assert_refused_approval(rej, "bank_b", "approval_signature" if relabel else "approval_plan_hash", enclave, job)


# --------------------------------------------------------------------------------------------------
# release and disclosure


def _release(
    enclave: EnclaveHandle, plan: Plan, parties: list[PartyData]
) -> tuple[pa.Table, list[dict[str, object]], dict[str, object]]:
    job = enclave.create_job(plan)
    for p in parties:
        enclave.upload(job.seal(p))
    resp = job.execute(approvals(plan, parties))
    verified = verify_result(
        resp,
        plan=plan,
        hpke_public=job.hpke_public,
        signing_public=job.signing_public,
        appraisal=enclave.appraisal,
    )
    assert enclave.job(job.job_id) is None and enclave.held_bytes == 0
    table = pa.ipc.open_stream(verified.arrow_table).read_all()
    assert verified.doc["released_rows"] == table.num_rows
    return table, verified.doc["suppressed"], verified.doc


def _assert_suppressed_without_value(entry: dict[str, object], group: dict[str, object], k: int) -> None:
    assert set(entry) == {"group", "rule", "reason"}
    assert entry["group"] == group
    assert entry["rule"] == "min_group_size"
    assert f"fewer than {k} distinct customer_id" in str(entry["reason"])


def test_released_result_is_signed_and_applies_the_strictest_rule(enclave: EnclaveHandle) -> None:
    a_rows = [(i, "retail", 10.0 * i) for i in range(1, 7)]  # 6 customers
    a_rows += [(100, "vip", 1.0)] * 50  # one customer, 50 rows
    a_rows += [(200, "smb", 5.0), (201, "smb", 7.0)]  # 2 customers
    b_rows = [(c, "x", 1000.0) for c in (1, 2, 3, 4, 5, 6, 100, 200, 201)]
    a = make_party(
        "bank_a",
        loans_table(a_rows),
        policy=DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=2),
    )
    b = make_party(
        "bank_b",
        loans_table(b_rows),
        policy=DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=3),
    )
    plan = make_plan(JOIN_SQL, [a, b])
    table, suppressed, doc = _release(enclave, plan, [a, b])
    assert doc["min_group_size"] == 3
    assert doc["simulated"] is True and doc["attestation"]["simulated"] is True
    assert table.to_pylist() == [{"segment": "retail", "n": 6, "total": 210.0 + 6000.0}]
    by_group = {e["group"]["segment"]: e for e in suppressed}  # type: ignore[index]
    assert set(by_group) == {"vip", "smb"}
    _assert_suppressed_without_value(by_group["vip"], {"segment": "vip"}, 3)
    _assert_suppressed_without_value(by_group["smb"], {"segment": "smb"}, 3)
    assert "bank_b.loans" in str(by_group["smb"]["reason"])  # the strictest owner's rule


def test_a_unit_with_many_rows_counts_once(enclave: EnclaveHandle) -> None:
    rows = [(100, "vip", 1.0)] * 50 + [(200, "smb", 5.0), (201, "smb", 7.0)]
    a = make_party(
        "bank_a",
        loans_table(rows),
        policy=DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=2),
    )
    table, suppressed, _ = _release(enclave, make_plan(SINGLE_SQL, [a]), [a])
    assert table.to_pylist() == [{"segment": "smb", "n": 2, "total": 12.0}]
    assert len(suppressed) == 1
    _assert_suppressed_without_value(suppressed[0], {"segment": "vip"}, 2)
    assert "50" not in json.dumps(suppressed)


def test_enclave_enforces_the_owners_rule_not_the_plans_stage_minimum(enclave: EnclaveHandle) -> None:
    """A coordinator lowers the stage's min_group_size (owners even sign it): the enclave still uses
    the strictest minimum of the owners' policies carried in the plan."""
    rows = [(1, "big", 1.0), (2, "big", 1.0), (3, "big", 1.0), (4, "tiny", 99.0)]
    a = make_party(
        "bank_a",
        loans_table(rows),
        policy=DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=3),
    )
    plan = make_plan(SINGLE_SQL, [a])
    weakened = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0], min_group_size=1),))
    table, suppressed, doc = _release(enclave, weakened, [a])
    assert doc["min_group_size"] == 3
    assert table.column("segment").to_pylist() == ["big"]
    assert [e["group"] for e in suppressed] == [{"segment": "tiny"}]


def test_enclave_rechecks_the_analyst_against_the_owners_policy(enclave: EnclaveHandle) -> None:
    """Even signed, a plan for an analyst the owner's policy (carried in the plan) does not allow
    must not run: the enclave re-checks the policy itself."""
    policy = DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=2, analysts=("alice",))
    a = make_party("bank_a", secret_loans(), policy=policy)
    plan = dataclasses.replace(make_plan(SINGLE_SQL, [a], analyst="alice"), analyst="mallory")
    try:
        job = enclave.create_job(plan)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
        return
    enclave.upload(job.seal(a))
    rej = job.execute_rejected(approvals(plan, [a]))
    assert rej.status in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)
    assert enclave.held_bytes == 0


HAVING_ROWS = (
    [(i, "big1", 10.0) for i in range(1, 6)]  # 5 customers
    + [(i, "big2", 20.0) for i in range(6, 10)]  # 4 customers
    + [(50, "tiny", 1000.0)] * 10  # 1 customer, 10 rows, a large sum
    + [(60, "small", 3000.0), (61, "small", 3000.0)]  # 2 customers
)


@pytest.mark.parametrize(
    ("tail", "released"),
    [
        ("", ["big1", "big2"]),
        ("HAVING COUNT(*) < 100", ["big1", "big2"]),
        ("HAVING COUNT(*) >= 10", []),  # only tiny has 10 rows
        ("HAVING SUM(exposure) > 5000", []),  # only tiny and small
        ("HAVING COUNT(DISTINCT customer_id) < 3", []),
        ("HAVING segment = 'tiny'", []),
        ("ORDER BY n ASC LIMIT 1", ["big2"]),
        ("ORDER BY total DESC LIMIT 2", ["big2", "big1"]),
        ("HAVING COUNT(*) >= 1 ORDER BY n ASC LIMIT 10", ["big2", "big1"]),
    ],
)
def test_having_order_by_limit_never_reveal_suppressed_cells(
    tail: str, released: list[str], enclave: EnclaveHandle
) -> None:
    a = make_party(
        "bank_a",
        loans_table(HAVING_ROWS),
        policy=DatasetPolicy(privacy_unit="customer_id", columns=PUBLIC_SEGMENTS, min_group_size=3),
    )
    plan = make_plan(f"{SINGLE_SQL} {tail}", [a])
    table, suppressed, _ = _release(enclave, plan, [a])
    segments = table.column("segment").to_pylist()
    if "ORDER BY" in tail:
        assert segments == released
    else:
        assert sorted(segments) == sorted(released)
    assert "tiny" not in segments and "small" not in segments
    # The suppressed list is the same whatever the HAVING clause: it is no oracle on hidden values.
    assert [e["group"] for e in suppressed] == [{"segment": "small"}, {"segment": "tiny"}]
    for e in suppressed:
        assert set(e) == {"group", "rule", "reason"}


def test_grouping_by_the_privacy_unit_is_refused(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    sql = "SELECT customer_id, COUNT(*) AS n FROM bank_a.loans GROUP BY customer_id"
    with pytest.raises(InvalidQueryError):
        make_plan(sql, [a])  # the planner refuses...
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(_crafted(make_plan(SINGLE_SQL, [a]), sql=sql))  # ...and so does the enclave
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_engine_errors_quote_no_value(enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture) -> None:
    """bank_a sends a string column where the query adds numbers: DuckDB's conversion error would quote
    the value; the enclave must report the kind of failure only, and release nothing."""
    caplog.set_level(logging.DEBUG)
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    typed = secret_loans()
    confused = typed.set_column(2, "exposure", pa.array([SECRET] * typed.num_rows))
    enclave.upload(job.seal(a, table=confused))
    enclave.upload(job.seal(b))
    rej = job.execute_rejected(approvals(plan, [a, b]))
    assert rej.status == grpc.StatusCode.INVALID_ARGUMENT
    _assert_no_leak(caplog, rej.details, rej.error.to_json())
    assert enclave.job(job.job_id) is None and enclave.held_bytes == 0


# --------------------------------------------------------------------------------------------------
# a compromised coordinator


def test_coordinator_changing_the_sql_after_approval_is_caught(
    enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans())
    approved = make_plan(JOIN_SQL, [a, b])
    signed = approvals(approved, [a, b])
    # Same query id, keys and policies; only the SQL changed (bank_b's exposures instead of bank_a's).
    changed_sql = (
        "SELECT a.segment, SUM(b.exposure) AS e FROM bank_a.loans a "
        "JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
    )
    swapped = make_plan(changed_sql, [a, b], query_id=approved.query_id)
    swapped = dataclasses.replace(swapped, salt=approved.salt, created_at=approved.created_at)
    assert swapped.hash != approved.hash
    job = enclave.create_job(swapped)
    # The parties seal for the plan they approved: its hash is in their stream headers. The first
    # such stream fails authentication and ends the job; the next finds the job failed.
    rej = enclave.upload_rejected(job.seal(a, plan=approved, columns=("customer_id", "segment", "exposure")))
    _assert_uniform_integrity(rej)
    rej = enclave.upload_rejected(job.seal(b, plan=approved, columns=("customer_id", "exposure")))
    assert rej.status == grpc.StatusCode.ABORTED and rej.error.code == "job_failed"
    assert enclave.held_bytes == 0
    # And their approvals do not verify for the changed plan, whichever hash the coordinator claims.
    job = enclave.create_job(swapped)
    rej = job.execute_rejected(signed)
    _assert_refused_approval(rej, "bank_a", "approval_plan_hash", enclave, job)
    relabelled = [enclave_pb2.Approval(party=x.party, plan_hash=swapped.hash, signature=x.signature) for x in signed]
    job2 = enclave.create_job(swapped)
    rej = job2.execute_rejected(relabelled)
    _assert_refused_approval(rej, "bank_a", "approval_signature", enclave, job2)
    _assert_no_leak(caplog)


def test_approvals_do_not_verify_for_a_changed_plan(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    approved = make_plan(SINGLE_SQL, [a])
    swapped = make_plan(SINGLE_SQL.replace("SUM(exposure)", "MAX(exposure)"), [a], query_id=approved.query_id)
    swapped = dataclasses.replace(swapped, salt=approved.salt, created_at=approved.created_at)
    job = enclave.create_job(swapped)
    enclave.upload(job.seal(a))  # even with a stream sealed for the changed plan...
    sig = approval(approved, a).signature
    forged = enclave_pb2.Approval(party="bank_a", plan_hash=swapped.hash, signature=sig)
    rej = job.execute_rejected([forged])  # ...the approval of the original plan does not verify
    _assert_refused_approval(rej, "bank_a", "approval_signature", enclave, job)


def _crafted(plan: Plan, *, sql: str | None = None, columns: tuple[str, ...] | None = None) -> bytes:
    doc = plan.to_dict()
    if sql is not None:
        doc["sql"] = sql
        doc["stages"][0]["sql"] = sql
    if columns is not None:
        doc["stages"][0]["inputs"][0]["columns"] = list(columns)
    return canonical_json(doc)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT customer_id, segment, exposure FROM bank_a.loans",
        "SELECT * FROM bank_a.loans",
        "SELECT segment, exposure, COUNT(*) FROM bank_a.loans GROUP BY segment",
        "SELECT customer_id FROM bank_a.loans UNION ALL SELECT customer_id FROM bank_a.loans",
        "DELETE FROM bank_a.loans",
    ],
)
def test_hand_crafted_plan_that_outputs_rows_is_refused(sql: str, enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    plan_json = _crafted(make_plan(SINGLE_SQL, [a]), sql=sql)
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(plan_json)
    rej = rejection(info.value)
    assert rej.status == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(rej.error, InvalidQueryError)
    assert enclave.registry is not None and not enclave.registry._jobs


def test_hand_crafted_plan_without_the_privacy_unit_is_refused(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans())
    plan_json = _crafted(make_plan(SINGLE_SQL, [a]), columns=("segment", "exposure"))
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(plan_json)
    rej = rejection(info.value)
    assert rej.status == grpc.StatusCode.INVALID_ARGUMENT
    assert rej.error.details.get("column") == "customer_id"
