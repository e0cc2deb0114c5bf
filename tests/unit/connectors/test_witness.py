"""Party agents as witnesses of the coordinator's transparency log: the coordinator's checkpoint,
proof and co-signature handlers and their storage, the agent's witness (its checks, its state on
disk, trust on first use), the agent refusing to approve, its configuration, and what `verify_log`
reports and refuses about co-signatures."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from connectors.agent.review import Submitted
from connectors.clock import MillisecondIssuer
from connectors.witness import LOG_KEY_FILE, LogWitness, state_file
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.servicer import CoordinatorServicer
from coordinator.store import log_origin, registered_witnesses
from sealroom.audit.log import TransparencyLog, export_store
from sealroom.audit.notes import Checkpoint, NoteSigner, NoteVerifier, SignedCheckpoint, witness_verifier
from sealroom.audit.store import SQLiteLogStore
from sealroom.audit.verify import verify_log
from sealroom.config import file_table
from sealroom.errors import ApprovalError, AuditError, ConfigError, InvalidQueryError, NotFoundError, SealroomError
from sealroom.keys import generate_signing_key, load_signing_key, public_key_hex
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.signing import sign_owner_action
from sealroom.v1 import coordinator_pb2

DIGEST = "ab" * 32


def _dataset(name: str = "loans") -> dict[str, Any]:
    return {
        "name": name,
        "arrow_schema": b"schema",
        "policy_json": b"{}",
        "policy_digest": DIGEST,
        "description": "",
    }


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator(CoordinatorConfig(state_dir=tmp_path / "coordinator", enclave="127.0.0.1:9", trust=TrustPolicy()))
    yield c
    c.shutdown()


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {"bank_a": generate_signing_key(), "bank_b": generate_signing_key()}


@pytest.fixture
def registered(coordinator: Coordinator, keys: dict[str, Ed25519PrivateKey]) -> Coordinator:
    for name, key in keys.items():
        coordinator.store.register_party(name, "127.0.0.1:1", public_key_hex(key), [_dataset()])
    return coordinator


def handler(coordinator: Coordinator) -> Callable[[str, Any], Any]:
    """The coordinator's RPC handlers, called as a party agent's client calls them (errors raised
    as the SealroomError the client would rebuild)."""
    servicer = CoordinatorServicer(coordinator)

    def call(method: str, request: Any) -> Any:
        return getattr(CoordinatorServicer, method).__wrapped__(servicer, request, None)

    return call


def cosign_request(
    party: str, key: Ed25519PrivateKey, note: SignedCheckpoint, *, owner_key: Ed25519PrivateKey | None = None
) -> coordinator_pb2.SubmitCosignatureRequest:
    issued = int(time.time() * 1000)
    return coordinator_pb2.SubmitCosignatureRequest(
        party=party,
        checkpoint=note.to_text(),
        query_id="q_1",
        issued_at_ms=issued,
        owner_signature=sign_owner_action(
            owner_key or key,
            "cosign",
            query_id="q_1",
            party=party,
            plan_hash=hashlib.sha256(note.checkpoint.body().encode()).hexdigest(),
            issued_at_ms=issued,
        ),
    )


def witness_sign(note: SignedCheckpoint, party: str, key: Ed25519PrivateKey) -> SignedCheckpoint:
    return note.with_signature(NoteSigner(f"{party}.witness", key).sign(note.checkpoint.body()))


# --------------------------------------------------------------------------------------------------
# the coordinator: GetCheckpoint, GetConsistencyProof, SubmitCosignature and the store


def test_checkpoint_and_proof_handlers_serve_the_committed_log(registered: Coordinator) -> None:
    call = handler(registered)
    resp = call("GetCheckpoint", coordinator_pb2.GetCheckpointRequest(party="bank_a"))
    signed = SignedCheckpoint.from_text(resp.checkpoint)
    log_key = NoteVerifier.from_vkey(resp.log_key)
    assert log_key.name == registered.store.log.origin  # type: ignore[union-attr]
    assert signed.verify(log_key) == () and signed.checkpoint.size == 2
    assert (registered.config.state_dir / "log.vkey").read_text().strip() == resp.log_key
    proof = call("GetConsistencyProof", coordinator_pb2.ConsistencyProofRequest(old_size=1, new_size=2))
    assert [bytes(h) for h in proof.hashes] == registered.store.log.consistency_proof(1, 2)  # type: ignore[union-attr]
    for old, new in ((3, 3), (2, 1), (0, 3)):
        with pytest.raises(InvalidQueryError, match="consistency proof needs"):
            call("GetConsistencyProof", coordinator_pb2.ConsistencyProofRequest(old_size=old, new_size=new))


def test_a_cosignature_is_verified_stored_once_and_served(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey]
) -> None:
    call = handler(registered)
    store = registered.store
    latest = store.checkpoint()
    stray = NoteSigner("someone.else", generate_signing_key())
    note = witness_sign(latest, "bank_a", keys["bank_a"]).with_signature(stray.sign(latest.checkpoint.body()))
    resp = call("SubmitCosignature", cosign_request("bank_a", keys["bank_a"], note))
    assert resp.size == 2 and list(resp.witnesses) == ["bank_a.witness"]
    stored = store.log.store.checkpoints(2)  # type: ignore[union-attr]
    assert len(stored) == 2  # the log's own, and the co-signed copy: only the lines it verified
    assert {s.name for s in SignedCheckpoint.from_text(stored[1]).signatures} == {
        store.log.origin,  # type: ignore[union-attr]
        "bank_a.witness",
    }
    # Again (an agent that retries): nothing new is stored.
    call("SubmitCosignature", cosign_request("bank_a", keys["bank_a"], note))
    assert len(store.log.store.checkpoints(2)) == 2  # type: ignore[union-attr]
    resp = call(
        "SubmitCosignature", cosign_request("bank_b", keys["bank_b"], witness_sign(latest, "bank_b", keys["bank_b"]))
    )
    assert list(resp.witnesses) == ["bank_a.witness", "bank_b.witness"]
    # GetCheckpoint serves the latest checkpoint with both co-signatures.
    served = SignedCheckpoint.from_text(call("GetCheckpoint", coordinator_pb2.GetCheckpointRequest()).checkpoint)
    verifiers = [witness_verifier(p, public_key_hex(k)) for p, k in keys.items()]
    assert served.verify(store.log.signer.verifier, witnesses=verifiers) == ("bank_a.witness", "bank_b.witness")  # type: ignore[union-attr]
    # An older checkpoint the log signed may still be co-signed.
    old = SignedCheckpoint.from_text(store.log.store.checkpoints(1)[0])  # type: ignore[union-attr]
    assert (
        call(
            "SubmitCosignature", cosign_request("bank_b", keys["bank_b"], witness_sign(old, "bank_b", keys["bank_b"]))
        ).size
        == 1
    )
    # The reviewer's tool exports the registered owners' keys as the witnesses' keys.
    assert registered_witnesses(store._db) == sorted(verifiers, key=lambda v: v.name)


def _refused(call: Callable[[str, Any], Any], request: Any) -> SealroomError:
    with pytest.raises(SealroomError) as info:
        call("SubmitCosignature", request)
    return info.value


def test_forged_or_foreign_cosignatures_are_refused_and_nothing_is_stored(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    call = handler(registered)
    store = registered.store
    assert store.log is not None
    latest = store.checkpoint()
    before = store.log.store.checkpoints()
    impostor = generate_signing_key()

    # A witness line by another key under bank_a's witness name (the owner action itself is bank_a's).
    err = _refused(call, cosign_request("bank_a", keys["bank_a"], witness_sign(latest, "bank_a", impostor)))
    assert isinstance(err, AuditError) and err.details["check"] == "witness_signature"
    # No witness line at all.
    err = _refused(call, cosign_request("bank_a", keys["bank_a"], latest))
    assert err.details["check"] == "witness_signature"
    # Another party's valid witness line, submitted as bank_a's.
    err = _refused(call, cosign_request("bank_a", keys["bank_a"], witness_sign(latest, "bank_b", keys["bank_b"])))
    assert err.details["check"] == "witness_signature"
    # The request is not signed by the party: refused like any owner action.
    err = _refused(
        call,
        cosign_request("bank_a", keys["bank_a"], witness_sign(latest, "bank_a", keys["bank_a"]), owner_key=impostor),
    )
    assert isinstance(err, ApprovalError) and err.details["check"] == "owner_signature"
    # A stale request.
    stale = cosign_request("bank_a", keys["bank_a"], witness_sign(latest, "bank_a", keys["bank_a"]))
    stale.issued_at_ms -= 10 * 60 * 1000
    stale.owner_signature = sign_owner_action(
        keys["bank_a"], "cosign", query_id="q_1", party="bank_a",
        plan_hash=hashlib.sha256(latest.checkpoint.body().encode()).hexdigest(), issued_at_ms=stale.issued_at_ms,
    )  # fmt: skip
    assert _refused(call, stale).details["check"] == "issued_at"
    # An unregistered party.
    err = _refused(call, cosign_request("bank_x", impostor, witness_sign(latest, "bank_x", impostor)))
    assert isinstance(err, NotFoundError)
    # A checkpoint of another history, validly signed with the log's key: not one of this log's.
    key = load_signing_key(registered.config.state_dir / "log.key")
    fork = TransparencyLog(SQLiteLogStore(tmp_path / "fork.db"), NoteSigner(log_origin(key), key))
    for i in range(2):
        fork.append("dataset_registered", party=f"other_{i}", dataset="loans", policy_digest=DIGEST)
    err = _refused(
        call, cosign_request("bank_a", keys["bank_a"], witness_sign(fork.checkpoint(), "bank_a", keys["bank_a"]))
    )
    assert err.details["check"] == "fork"
    # A larger checkpoint than the log has.
    fork.append("dataset_registered", party="other_9", dataset="loans", policy_digest=DIGEST)
    assert (
        _refused(
            call, cosign_request("bank_a", keys["bank_a"], witness_sign(fork.checkpoint(), "bank_a", keys["bank_a"]))
        ).details["check"]
        == "fork"
    )
    # A checkpoint signed by another log key.
    other = NoteSigner(store.log.origin, generate_signing_key())
    foreign = SignedCheckpoint(latest.checkpoint, (other.sign(latest.checkpoint.body()),))
    err = _refused(call, cosign_request("bank_a", keys["bank_a"], witness_sign(foreign, "bank_a", keys["bank_a"])))
    assert err.details["check"] == "checkpoint_signature"
    # Not a checkpoint.
    bad = cosign_request("bank_a", keys["bank_a"], latest)
    bad.checkpoint = "not a note\n"
    assert _refused(call, bad).details["check"] == "checkpoint_format"
    assert store.log.store.checkpoints() == before


# --------------------------------------------------------------------------------------------------
# the agent's witness


class FakeCoordinator:
    """The handlers of a real Coordinator, and a switch to lie to the witness (another log's view)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.real = handler(coordinator)
        self.view: TransparencyLog | None = None  # a forked history to show instead, if set
        self.calls: list[str] = []

    def __call__(self, method: str, request: Any) -> Any:
        self.calls.append(method)
        if self.view is not None and method == "GetCheckpoint":
            resp = self.real(method, request)
            return coordinator_pb2.CheckpointResponse(checkpoint=self.view.checkpoint().to_text(), log_key=resp.log_key)
        if self.view is not None and method == "GetConsistencyProof":
            return coordinator_pb2.ConsistencyProofResponse(
                hashes=self.view.consistency_proof(request.old_size, request.new_size)
            )
        return self.real(method, request)

    def fork(self, tmp_path: Path, *, keep: int, size: int) -> TransparencyLog:
        """A history that shares the first ``keep`` entries and then differs, up to ``size`` entries."""
        key = load_signing_key(self.c.config.state_dir / "log.key")
        fork = TransparencyLog(SQLiteLogStore(tmp_path / f"fork-{keep}-{size}.db"), NoteSigner(log_origin(key), key))
        assert self.c.store.log is not None
        for data in self.c.store.log.store.entries()[:keep]:
            doc = json.loads(data)
            fork.append(doc["type"], **doc["event"])
        while fork.size < size:
            fork.append("dataset_registered", party=f"ghost_{fork.size}", dataset="loans", policy_digest=DIGEST)
        return fork


def _grow(c: Coordinator, n: int = 1) -> None:
    for _ in range(n):
        c.store.append_event("query_submitted", query_id="q_" + os.urandom(4).hex(), analyst="alice", sql_sha256=DIGEST)


def test_the_witness_trusts_on_first_use_keeps_its_state_and_catches_forks_and_rollbacks(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    fake = FakeCoordinator(registered)
    state = tmp_path / "bank_b-state"
    w = LogWitness(party="bank_b", key=keys["bank_b"], state_dir=state, log_key=None, call=fake)
    assert w.log_key is None and not (state / LOG_KEY_FILE).exists()
    w.trust_on_first_use()
    assert (state / LOG_KEY_FILE).read_text().strip() == (registered.config.state_dir / "log.vkey").read_text().strip()
    first = w.witness(query_id="q_1")
    assert first.checkpoint.size == 2 and fake.calls == ["GetCheckpoint", "GetCheckpoint", "SubmitCosignature"]
    _grow(registered, 3)
    fake.calls.clear()
    second = w.witness(query_id="q_2")
    assert second.checkpoint.size == 5
    assert fake.calls == ["GetCheckpoint", "GetConsistencyProof", "SubmitCosignature"]
    stored = registered.store.checkpoint()
    assert stored.verify(registered.store.log.signer.verifier, witnesses=[w.verifier]) == ("bank_b.witness",)  # type: ignore[union-attr]

    # A restart: the state on disk (one file, for this log key) is what it co-signed.
    again = LogWitness(party="bank_b", key=keys["bank_b"], state_dir=state, log_key=None, call=fake)
    assert again.log_key == w.log_key and again.latest == w.latest
    files = sorted(p.name for p in state.iterdir())
    assert files == [LOG_KEY_FILE, state_file(state, w.log_key).name]  # type: ignore[arg-type]  # no temporary file left

    def refused(witness: LogWitness) -> str:
        kept = witness.latest
        with pytest.raises(AuditError) as info:
            witness.witness(query_id="q_3")
        assert witness.latest == kept  # a refused checkpoint is never remembered
        return str(info.value.details["check"])

    # Another root for the size it co-signed.
    fake.view = fake.fork(tmp_path, keep=2, size=5)
    assert refused(again) == "fork"
    # A longer history that does not extend what it co-signed (the proof comes from that history).
    fake.view = fake.fork(tmp_path, keep=4, size=8)
    assert refused(again) == "consistency_proof"
    # A shorter one: rolled back.
    fake.view = fake.fork(tmp_path, keep=4, size=4)
    assert refused(again) == "rollback"
    # Nothing of the lies was stored at the coordinator or on disk; the honest log is still fine.
    fake.view = None
    _grow(registered)
    assert again.witness(query_id="q_4").checkpoint.size == 6
    reread = LogWitness(party="bank_b", key=keys["bank_b"], state_dir=state, log_key=None, call=fake)
    assert reread.latest is not None and reread.latest.checkpoint.size == 6


def test_a_pinned_key_a_bad_proof_a_refused_cosignature_and_unwritable_state(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeCoordinator(registered)
    vkey = NoteVerifier.from_vkey((registered.config.state_dir / "log.vkey").read_text())
    # Pinned to another key: the coordinator's checkpoints are refused.
    stranger = NoteVerifier.from_public_key(vkey.name, generate_signing_key().public_key())
    w = LogWitness(party="bank_a", key=keys["bank_a"], state_dir=tmp_path / "x", log_key=stranger, call=fake)
    with pytest.raises(AuditError) as info:
        w.witness()
    assert info.value.details["check"] == "checkpoint_signature"
    # Pinned to the right key: no log.vkey is kept (nothing is trusted on first use).
    state = tmp_path / "bank_a-state"
    w = LogWitness(party="bank_a", key=keys["bank_a"], state_dir=state, log_key=vkey, call=fake)
    w.witness()
    assert not (state / LOG_KEY_FILE).exists()
    _grow(registered, 2)

    def bad_proof(method: str, request: Any) -> Any:
        if method == "GetConsistencyProof":
            return coordinator_pb2.ConsistencyProofResponse(hashes=[b"\x00" * 31])
        return fake(method, request)

    w._call = bad_proof
    with pytest.raises(AuditError) as info:
        w.witness()
    assert info.value.details["check"] == "consistency_proof"

    def refusing(method: str, request: Any) -> Any:
        if method == "SubmitCosignature":
            raise AuditError("no", details={"check": "witness_signature"})
        return fake(method, request)

    w._call = refusing
    with pytest.raises(AuditError) as info:
        w.witness()
    assert info.value.details["check"] == "cosignature_refused"

    w._call = fake
    kept = w.latest

    def disk_full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("connectors.witness.write_atomically", disk_full)
    _grow(registered)
    before = registered.store.log.store.checkpoints()  # type: ignore[union-attr]
    with pytest.raises(AuditError) as info:
        w.witness()
    assert info.value.details["check"] == "witness_state" and w.latest == kept
    assert "No space left" in info.value.message
    assert registered.store.log.store.checkpoints() == before  # nothing promised: no co-signature sent  # type: ignore[union-attr]


def test_an_unreadable_witness_state_stops_the_agent_from_starting(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    fake = FakeCoordinator(registered)
    state = tmp_path / "s"
    w = LogWitness(party="bank_a", key=keys["bank_a"], state_dir=state, log_key=None, call=fake)
    w.witness()
    assert w.log_key is not None
    path = state_file(state, w.log_key)
    doc = json.loads(path.read_text())
    doc["checkpoint"] = doc["checkpoint"].replace("\n2\n", "\n3\n")  # no longer what the log signed
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="witness state"):
        LogWitness(party="bank_a", key=keys["bank_a"], state_dir=state, log_key=None, call=fake)
    (state / LOG_KEY_FILE).write_text("garbage\n")
    with pytest.raises(ConfigError, match="trusted on first use"):
        LogWitness(party="bank_a", key=keys["bank_a"], state_dir=state, log_key=None, call=fake)


def test_the_witness_stamps_its_cosignatures_from_the_issuer_it_is_given(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    fake = FakeCoordinator(registered)
    stamps: list[int] = []

    def recording(method: str, request: Any) -> Any:
        if method == "SubmitCosignature":
            stamps.append(request.issued_at_ms)
        return fake(method, request)

    now = time.time()
    issuer = MillisecondIssuer(lambda: now)  # a clock that stands still
    w = LogWitness(
        party="bank_a",
        key=keys["bank_a"],
        state_dir=tmp_path / "st",
        log_key=None,
        call=recording,
        issued_at=issuer.issue,
    )
    frozen = int(now * 1000)
    w.witness(query_id="q_1")
    w.witness(query_id="q_1")  # the same checkpoint, the same query, within the same (frozen) millisecond
    assert stamps == [frozen, frozen + 1]


# --------------------------------------------------------------------------------------------------
# the agent refuses to approve


def submitted(coordinator: Coordinator, plan: Plan) -> Submitted:
    """Log the plan's query_submitted entry as the coordinator does, with the proof that it is in the
    latest checkpoint."""
    entry = coordinator.store.append_event(
        "query_submitted", query_id=plan.query_id, analyst=plan.analyst, sql_sha256="0" * 64, plan_hash=plan.hash
    )
    assert entry is not None
    log = coordinator.store.log
    assert log is not None
    n = log.size
    cp = Checkpoint(log.origin, n, log.root(n))
    text = SignedCheckpoint(cp, (log.signer.sign(cp.body()),)).to_text()
    return Submitted(entry.canonical(), text, tuple(log.inclusion_proof(entry.seq, n)))


def _agent(
    tmp_path: Path, key: Ed25519PrivateKey, call: Callable[[str, Any], Any], *, approval: str = "auto"
) -> PartyAgent:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"customer_id": pa.array(range(8), pa.int64()), "segment": ["x", "y"] * 4}), path)
    config = PartyConfig(
        name="bank_a",
        coordinator="127.0.0.1:9",
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(
            DatasetConfig(
                "loans", str(path), DatasetPolicy(privacy_unit="customer_id", min_group_size=2, approval=approval)
            ),
        ),
    )
    agent = PartyAgent(config, signing_key=key)
    assert agent.witness is not None and agent.witness.state_dir == tmp_path / "bank_a-state"
    agent.witness._call = call
    return agent


def test_the_agent_approves_only_after_witnessing(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    from tests.harness.enclave import make_party, make_plan

    fake = FakeCoordinator(registered)
    agent = _agent(tmp_path, keys["bank_a"], fake)
    table = pq.read_table(tmp_path / "a.parquet")
    data = make_party("bank_a", table, policy=agent.policies["loans"], key=keys["bank_a"])
    plan = make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [data])
    plan_hash, signature, _ = agent.review(plan.to_json(), submitted(registered, plan))
    assert signature is not None and "SubmitCosignature" in fake.calls
    assert registered.store.checkpoint().verify(
        registered.store.log.signer.verifier,  # type: ignore[union-attr]
        witnesses=[witness_verifier("bank_a", keys["bank_a"].public_key())],
    ) == ("bank_a.witness",)
    witnessed = agent.witness.latest  # type: ignore[union-attr]
    assert witnessed is not None
    fake.view = fake.fork(tmp_path, keep=1, size=witnessed.checkpoint.size)  # another root for the same size
    other = make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [data])
    with pytest.raises(ApprovalError) as info:
        agent.review(other.to_json(), submitted(registered, other))
    assert info.value.details == {"party": "bank_a", "check": "fork", "rule": "log_witness"}
    assert "transparency log failed the witness check (fork)" in info.value.message
    assert agent.approvals.held(other.hash) is None  # nothing was signed


def test_the_owners_manual_approval_is_witnessed_first(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    from sealroom.signing import sign_owner_command
    from sealroom.v1 import party_pb2
    from tests.harness.enclave import make_party, make_plan

    fake = FakeCoordinator(registered)
    agent = _agent(tmp_path, keys["bank_a"], fake, approval="manual")
    sent: list[str] = []

    def coordinator_call(method: str, request: Any) -> Any:
        sent.append(method)
        return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status="pending_approval")

    agent._coordinator_call = coordinator_call  # type: ignore[method-assign]
    data = make_party(
        "bank_a", pq.read_table(tmp_path / "a.parquet"), policy=agent.policies["loans"], key=keys["bank_a"]
    )
    plan = make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [data])
    # Held for the owner, nothing signed yet; the log was witnessed (the query is in it).
    assert agent.review(plan.to_json(), submitted(registered, plan))[1] is None
    assert fake.calls == ["GetCheckpoint", "SubmitCosignature"]

    owner = MillisecondIssuer()  # the owner's client: each command it signs is new

    def command() -> party_pb2.OwnerCommand:
        issued = owner.issue()
        return party_pb2.OwnerCommand(
            query_id=plan.query_id,
            issued_at_ms=issued,
            signature=sign_owner_command(
                keys["bank_a"], "approve", party="bank_a", query_id=plan.query_id, issued_at_ms=issued
            ),
        )

    latest = agent.witness.witness()  # type: ignore[union-attr]  # what it has co-signed
    fake.view = fake.fork(tmp_path, keep=1, size=latest.checkpoint.size)
    with pytest.raises(ApprovalError) as info:
        agent.approve(command())
    assert info.value.details["check"] == "fork" and sent == []  # refused before anything was sent
    assert not agent.approvals.held(plan.hash).approved  # type: ignore[union-attr]
    fake.view = None
    fake.calls.clear()
    assert agent.approve(command()).state == "approved"
    assert fake.calls[-1] == "SubmitCosignature" and sent == ["SubmitApproval"]


def test_witnessing_can_be_turned_off_only_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"customer_id": pa.array([1], pa.int64())}), path)
    config = PartyConfig(
        name="bank_a",
        coordinator="127.0.0.1:9",
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("loans", str(path), DatasetPolicy()),),
        unsafe_no_witness=True,
    )
    with caplog.at_level("WARNING", logger="connectors.agent"):
        agent = PartyAgent(config, signing_key=generate_signing_key())
    assert agent.witness is None and "witnessing is OFF" in caplog.text


# --------------------------------------------------------------------------------------------------
# configuration


def test_party_config_state_dir_and_log_key(tmp_path: Path, registered: Coordinator) -> None:
    vkey = (registered.config.state_dir / "log.vkey").read_text().strip()
    (tmp_path / "pinned.vkey").write_text(vkey + "\n")
    base = '[tls]\nplaintext = true\n[party]\nname = "bank_a"\ncoordinator = "127.0.0.1:1"\n'
    base += 'signing_key = "keys/a.key"\n'
    tail = '[[dataset]]\nname = "loans"\nsource = "a.csv"\n'

    def load(extra: str) -> PartyConfig:
        path = tmp_path / "party.toml"
        path.write_text(base + extra + tail)
        return PartyConfig.from_table(file_table(path))

    default = load("")
    assert default.log_key is None and default.state_dir is None and not default.unsafe_no_witness
    assert default.witness_state_dir == tmp_path / "keys" / "bank_a-state"
    pinned = load(f'state_dir = "st"\nlog_key = "{vkey}"\n')
    assert pinned.witness_state_dir == tmp_path / "st" and pinned.log_key == NoteVerifier.from_vkey(vkey)
    assert load('log_key = "pinned.vkey"\n').log_key == NoteVerifier.from_vkey(vkey)
    assert load("unsafe_no_witness = true\n").unsafe_no_witness
    for bad in ('log_key = "missing.vkey"\n', 'log_key = "a+b+c"\n'):
        with pytest.raises(ConfigError) as info:
            load(bad)
        assert info.value.details["key"] == "party.log_key"
    (tmp_path / "bad.vkey").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a verifier key"):
        load('log_key = "bad.vkey"\n')


# --------------------------------------------------------------------------------------------------
# what verify_log reports and refuses


def _cosigned_log(tmp_path: Path) -> tuple[TransparencyLog, dict[str, Ed25519PrivateKey]]:
    key = generate_signing_key()
    log = TransparencyLog(SQLiteLogStore(tmp_path / "log.db"), NoteSigner(log_origin(key), key))
    owners = {"bank_a": generate_signing_key(), "bank_b": generate_signing_key()}
    for name, k in owners.items():
        log.append(
            "dataset_registered",
            party=name,
            dataset="loans",
            policy_digest=DIGEST,
            owner_key_sha256=hashlib.sha256(bytes.fromhex(public_key_hex(k))).hexdigest(),
        )
    log.add_cosigned(witness_sign(log.checkpoint(), "bank_a", owners["bank_a"]))
    _ = log.append("query_submitted", query_id="q_1", analyst="alice", sql_sha256=DIGEST)
    latest = log.checkpoint()
    log.add_cosigned(witness_sign(latest, "bank_a", owners["bank_a"]))
    log.add_cosigned(witness_sign(latest, "bank_b", owners["bank_b"]))
    return log, owners


def _export(log: TransparencyLog, owners: dict[str, Ed25519PrivateKey]) -> dict[str, Any]:
    witnesses = [witness_verifier(p, k.public_key()) for p, k in owners.items()]
    return export_store(log.store, origin=log.origin, log_key=log.signer.verifier, witnesses=witnesses)


def test_verify_log_reports_who_cosigned_what(tmp_path: Path) -> None:
    log, owners = _cosigned_log(tmp_path)
    export = _export(log, owners)
    assert len(export["witnesses"]) == 2
    report = verify_log(export, log_key=log.signer.verifier)
    assert [dict(c) for c in report.cosigned] == [
        {"size": 2, "witnesses": ["bank_a.witness"]},
        {"size": 3, "witnesses": ["bank_a.witness", "bank_b.witness"]},
    ]
    assert [dict(w) for w in report.witnesses] == [
        {"name": "bank_a.witness", "pinned": False, "checkpoints": 2, "latest_size": 3},
        {"name": "bank_b.witness", "pinned": False, "checkpoints": 1, "latest_size": 3},
    ]
    assert report.unverified_cosignatures == 0 and report.to_dict()["cosigned"][1]["size"] == 3
    # Without the witnesses' keys, their lines are counted, not checked.
    bare = verify_log(log.export(), log_key=log.signer.verifier)
    assert bare.witnesses == () and bare.cosigned == () and bare.unverified_cosignatures == 3
    # A pinned key replaces the exported one of the same name.
    pinned = verify_log(
        export, log_key=log.signer.verifier, witnesses=[witness_verifier("bank_b", owners["bank_b"].public_key())]
    )
    assert [(w["name"], w["pinned"]) for w in pinned.witnesses] == [("bank_a.witness", False), ("bank_b.witness", True)]
    assert pinned.witnessed_size == 3


def test_verify_log_refuses_a_forged_cosignature_and_an_unbound_witness_key(tmp_path: Path) -> None:
    log, owners = _cosigned_log(tmp_path)
    export = _export(log, owners)
    # A co-signature under bank_b's witness name and key id whose signature is not bank_b's.
    notes = export["checkpoints"]
    k = next(i for i, t in enumerate(notes) if "bank_b.witness" in t)
    signed = SignedCheckpoint.from_text(notes[k])
    forged = [s if s.name != "bank_b.witness" else type(s)(s.name, s.key_id, bytes(64)) for s in signed.signatures]
    export["checkpoints"] = [*notes[:k], SignedCheckpoint(signed.checkpoint, tuple(forged)).to_text(), *notes[k + 1 :]]
    with pytest.raises(AuditError) as info:
        verify_log(export, log_key=log.signer.verifier)
    assert info.value.details == {"check": "witness_signature", "checkpoint": k, "witness": "bank_b.witness"}
    assert f"checkpoint {k} (size 3)" in info.value.message
    # An exported witness key that the log's registrations do not record for that party.
    export = _export(log, {"bank_a": owners["bank_a"], "bank_b": generate_signing_key()})
    with pytest.raises(AuditError) as info:
        verify_log(export, log_key=log.signer.verifier)
    assert info.value.details["check"] == "witness_key" and info.value.details["witness"] == "bank_b.witness"
    export["witnesses"] = ["nope"]
    with pytest.raises(AuditError, match="not a verifier key"):
        verify_log(export, log_key=log.signer.verifier)


# --------------------------------------------------------------------------------------------------
# no approval outside the log


def test_the_agent_approves_only_a_query_its_witnessed_log_shows(
    registered: Coordinator, keys: dict[str, Ed25519PrivateKey], tmp_path: Path
) -> None:
    from sealroom.audit.merkle import inclusion_proof, leaf_hash
    from sealroom.signing import LogPosition, verify_approval
    from tests.harness.enclave import make_party, make_plan

    fake = FakeCoordinator(registered)
    agent = _agent(tmp_path, keys["bank_a"], fake)
    data = make_party(
        "bank_a", pq.read_table(tmp_path / "a.parquet"), policy=agent.policies["loans"], key=keys["bank_a"]
    )

    def plan() -> Plan:
        return make_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [data])

    def refused(p: Plan, sub: Submitted | None) -> dict[str, Any]:
        with pytest.raises(ApprovalError) as info:
            agent.review(p.to_json(), sub)
        assert agent.approvals.held(p.hash) is None  # nothing held, nothing signed
        return dict(info.value.details)

    # No entry at all (the bypass script's ReviewPlan).
    p = plan()
    assert refused(p, None) == {"party": "bank_a", "check": "log_entry_missing", "rule": "not_in_log"}
    # The entry of another query, or one naming another analyst.
    other = plan()
    assert refused(p, submitted(registered, other))["check"] == "log_entry"
    registered.store.append_event(
        "query_submitted", query_id=p.query_id, analyst="mallory", sql_sha256="0" * 64, plan_hash=p.hash
    )
    # A log of its own: the right entry in a tree the coordinator's key never signed.
    entry = registered.store.append_event(
        "query_submitted", query_id=p.query_id, analyst=p.analyst, sql_sha256="0" * 64, plan_hash=p.hash
    )
    assert entry is not None
    forged = NoteSigner(registered.store.log.origin, generate_signing_key())  # type: ignore[union-attr]
    leaves = [leaf_hash(b"x")] * entry.seq + [entry.leaf_hash()]
    from sealroom.audit.merkle import root_hash

    cp = Checkpoint(forged.name, len(leaves), root_hash(leaves))
    fabricated = Submitted(
        entry.canonical(),
        SignedCheckpoint(cp, (forged.sign(cp.body()),)).to_text(),
        tuple(inclusion_proof(leaves, entry.seq)),
    )
    assert refused(p, fabricated)["check"] == "inclusion_checkpoint"
    # The real checkpoint, with a proof that does not hold.
    real = submitted(registered, plan())
    wrong = Submitted(entry.canonical(), real.checkpoint, real.proof)
    assert refused(p, wrong)["check"] == "inclusion_proof"
    # The real entry, proven in an older checkpoint than the one the agent witnesses: approved, and
    # the approval signs the position (not the plan hash alone).
    good = submitted(registered, p)
    registered.store.append_event("collaboration_declared", declaration_sha256="1" * 64)  # the log grows on
    plan_hash, signature, _ = agent.review(p.to_json(), good)
    assert signature is not None
    assert agent.witness is not None and agent.witness.latest is not None
    n = SignedCheckpoint.from_text(good.checkpoint).checkpoint
    assert agent.witness.latest.checkpoint.size > n.size
    position = LogPosition(p_seq := json.loads(good.entry)["seq"], n.size, n.root)
    assert p_seq == registered.store.log.size - 2  # type: ignore[union-attr]
    verify_approval(data.public_key_hex, plan_hash, signature, party="bank_a", log=position)
    with pytest.raises(ApprovalError):
        verify_approval(data.public_key_hex, plan_hash, signature, party="bank_a")
