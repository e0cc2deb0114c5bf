"""The enclave as an MPC player (hybrid plans), at its gRPC edge and at an mpc_only owner's agent:
a feeding job releases nothing itself, prepares its player only with every approval and input,
takes nothing more once prepared, and an owner's player trusts the enclave's CA only with evidence
that binds the job's key to this plan and that the streaming owners' policies accept."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.tee_stage import verify_result
from mpc.tls import PlayerIdentity
from sealroom.planning.plan import EnclaveHolder, MpcStage, Plan
from sealroom.policy import DatasetPolicy, DatasetTrust, TrustPolicy
from sealroom.v1 import enclave_pb2, party_pb2
from tests.harness.enclave import (
    HARNESS_LOG,
    Agent,
    EnclaveHandle,
    JobHandle,
    PartyData,
    approvals,
    make_party,
    make_plan,
    rejection,
    secret_loans,
    start_agent,
)

SEGMENTS = ["seg-0", "seg-1", "seg-2", "seg-3"]
# The coordinator's identity as the helper player the plans name (its log key, in a deployment).
COORDINATOR = Ed25519PrivateKey.generate()
COORDINATOR_HEX = COORDINATOR.public_key().public_bytes_raw().hex()


def policy(trust: DatasetTrust | None = None) -> DatasetPolicy:
    doc = {
        "privacy_unit": "customer_id",
        "min_group_size": 2,
        "columns": {
            "customer_id": "join_key",
            "segment": {"role": "dimension", "values": SEGMENTS},
            "exposure": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 1000},
        },
    }
    p = DatasetPolicy.from_dict(doc)
    return dataclasses.replace(p, trust=trust) if trust is not None else p


SQL = (
    "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM (SELECT * FROM bank_a.loans UNION ALL "
    "SELECT * FROM bank_b.loans UNION ALL SELECT * FROM bank_c.loans) t GROUP BY segment"
)


@dataclass
class Hybrid:
    plan: Plan
    job: JobHandle
    streaming: list[PartyData]
    everyone: list[PartyData]

    @property
    def mpc(self) -> MpcStage:
        stage = self.plan.stages[1]
        assert isinstance(stage, MpcStage)
        return stage

    @property
    def index(self) -> int:
        return next(i for i, h in self.mpc.holders.items() if isinstance(h, EnclaveHolder))

    def prepare(
        self, enclave: EnclaveHandle, parties: list[PartyData] | None = None
    ) -> enclave_pb2.EnclavePrepareMpcResponse:
        request = enclave_pb2.EnclavePrepareMpcRequest(
            job_id=self.job.job_id,
            job_token=self.job.token,
            stage_id=self.mpc.id,
            index=self.index,
            approvals=approvals(self.plan, self.everyone if parties is None else parties),
            log_position=HARNESS_LOG.to_proto(),
        )
        return enclave.stub.PrepareMpc(request, timeout=30)


def hybrid(enclave: EnclaveHandle, *, a: PartyData | None = None, tee_trust: DatasetTrust | None = None) -> Hybrid:
    """bank_a accepts no enclave; bank_b and bank_c stream to ``enclave`` (their rows uploaded here)."""
    a = a or make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy(tee_trust))
    c = make_party("bank_c", secret_loans(50), policy=policy(tee_trust))
    plan = make_plan(SQL, [a, b, c], helper_key=COORDINATOR_HEX)
    assert [s.kind for s in plan.stages] == ["tee", "mpc"] and plan.stages[0].feeds == plan.stages[1].id
    job = enclave.create_job(plan)
    job.attest()
    for p in (b, c):
        enclave.upload(job.seal(p))
    return Hybrid(plan, job, [b, c], [a, b, c])


def test_a_feeding_job_releases_nothing_through_execute(enclave: EnclaveHandle) -> None:
    h = hybrid(enclave)
    refused = h.job.execute_rejected(approvals(h.plan, h.everyone))
    assert refused.error.code == "invalid_query" and "releases nothing" in refused.error.message
    assert enclave.registry.held_bytes == 0  # the job ended: its rows are gone


def test_prepare_needs_every_owners_approval_the_mpc_only_one_included(enclave: EnclaveHandle) -> None:
    h = hybrid(enclave)
    with pytest.raises(grpc.RpcError) as info:
        h.prepare(enclave, h.streaming)  # bank_a, whose rows never reach the enclave, did not approve
    refused = rejection(info.value)
    assert refused.error.code == "approval" and refused.error.details["party"] == "bank_a"
    assert enclave.job(h.job.job_id) is None and enclave.registry.held_bytes == 0


def test_prepare_needs_every_streamed_input(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy())
    c = make_party("bank_c", secret_loans(50), policy=policy())
    plan = make_plan(SQL, [a, b, c], helper_key=COORDINATOR_HEX)
    job = enclave.create_job(plan)
    job.attest()
    enclave.upload(job.seal(b))  # bank_c's input never arrives
    with pytest.raises(grpc.RpcError) as info:
        Hybrid(plan, job, [b, c], [a, b, c]).prepare(enclave)
    refused = rejection(info.value)
    assert refused.error.code == "job_failed" and "bank_c.loans" in refused.error.message


def test_prepared_player_offer_document_and_evidence(enclave: EnclaveHandle) -> None:
    h = hybrid(enclave)
    prepared = h.prepare(enclave)
    # The signed document and evidence verify as the coordinator checks them: this plan, this job's
    # keys, nothing released by the enclave itself.
    feed = verify_result(
        prepared,
        plan=h.plan,
        hpke_public=h.job.hpke_public,
        signing_public=h.job.signing_public,
        appraisal=enclave.appraisal,
    )
    assert feed.doc["feeds"] == h.mpc.id and feed.doc["player"] == h.index
    assert feed.doc["released_rows"] == 0 and feed.doc["result_sha256"] is None and feed.doc["suppressed"] == []
    assert sorted(i["party"] for i in feed.doc["inputs"]) == ["bank_b", "bank_c"]
    assert sorted(a["party"] for a in feed.doc["approvals"]) == ["bank_a", "bank_b", "bank_c"]
    # The offer: the enclave's CA for its own index, signed by the attested job key.
    offer = json.loads(prepared.offer.offer_json)
    assert prepared.offer.index == h.index and offer["index"] == h.index
    from mpc.tls import PlayerOffer, verify_offer

    verify_offer(
        PlayerOffer.from_dict(offer),
        session=f"{h.plan.hash}:{h.mpc.id}",
        identity=Ed25519PublicKey.from_public_bytes(h.job.signing_public),
    )
    # The rows are dropped once the partials are computed; no more input is accepted, no second player.
    assert enclave.registry.held_bytes == 0
    late = enclave.upload_rejected(h.job.seal(h.streaming[0]))
    assert late.error.code in ("job_failed", "integrity")
    with pytest.raises(grpc.RpcError) as info:
        h.prepare(enclave)
    assert rejection(info.value).error.code == "job_failed"


def test_run_refuses_offers_that_do_not_cover_the_players(enclave: EnclaveHandle) -> None:
    h = hybrid(enclave)
    prepared = h.prepare(enclave)
    with pytest.raises(grpc.RpcError) as info:
        enclave.stub.RunMpc(
            enclave_pb2.EnclaveRunMpcRequest(
                job_id=h.job.job_id, job_token=h.job.token, offers=[prepared.offer], timeout_seconds=5
            ),
            timeout=30,
        )
    refused = rejection(info.value)
    assert refused.error.code == "mpc" and refused.error.details["reason"] == "addresses"
    assert enclave.job(h.job.job_id) is None  # the job ended with it


@pytest.mark.parametrize("forged", ["owner", "helper"])
def test_run_verifies_every_offer_against_the_identities_the_plan_names(enclave: EnclaveHandle, forged: str) -> None:
    """``owner``: bank_b signs bank_a's player's offer. ``helper``: bank_a (say it also streamed a
    dataset, so it knows the job) brings its own player and a helper of its own, as two of three
    players would reconstruct the enclave's partials; the helper's identity is the coordinator's key
    the plan names, never one a caller brings, so the enclave refuses it."""
    h = hybrid(enclave)
    prepared = h.prepare(enclave)
    a = h.everyone[0]
    session = f"{h.plan.hash}:{h.mpc.id}"
    signer = {"owner": {0: h.streaming[0].key, 2: COORDINATOR}, "helper": {0: a.key, 2: a.key}}[forged]
    offers = [prepared.offer]
    for i, key in signer.items():
        offer = PlayerIdentity(session, i).offer(key.sign)
        offers.append(
            party_pb2.MpcOffer(index=i, offer_json=json.dumps(offer.to_dict()).encode(), host="127.0.0.1", port=9)
        )
    with pytest.raises(grpc.RpcError) as info:
        enclave.stub.RunMpc(
            enclave_pb2.EnclaveRunMpcRequest(
                job_id=h.job.job_id, job_token=h.job.token, offers=offers, timeout_seconds=5
            ),
            timeout=30,
        )
    refused = rejection(info.value)
    assert refused.error.code == "mpc" and refused.error.details["player"] == (0 if forged == "owner" else 2)
    assert enclave.job(h.job.job_id) is None  # the job ended: its partials are gone


def test_create_refuses_a_plan_that_does_not_name_the_enclave_player(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy())
    plan = make_plan(SQL.replace(" UNION ALL SELECT * FROM bank_c.loans", ""), [a, b], helper_key=COORDINATOR_HEX)
    doc = plan.to_dict()
    doc["stages"][1]["holders"] = {k: v for k, v in doc["stages"][1]["holders"].items() if "stage" not in v}
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(tampered)
    assert rejection(info.value).error.code == "invalid_query"


# -- the mpc_only owner's side --------------------------------------------------------------------


@pytest.fixture
def owner(tmp_path: Path, enclave: EnclaveHandle) -> Iterator[Agent]:
    """bank_a's real agent (mpc_only), trusting the test enclave's code under its own appraisal."""
    (measurement,) = enclave.appraisal.measurements
    trust = TrustPolicy(
        measurements=frozenset({measurement}), allow_simulated=True, dev_root=tmp_path / "dev" / "dev-root.crt"
    )
    agent, stop = start_agent(
        tmp_path / "agent", trust, policy(DatasetTrust(mpc_only=True)), sql_table=secret_loans(30)
    )
    yield agent
    stop()


def run_owner(
    owner: Agent,
    h: Hybrid,
    attested: party_pb2.EnclavePlayer,
    offer: party_pb2.MpcOffer,
    helper_signer: Ed25519PrivateKey = COORDINATOR,
) -> Callable[[], None]:
    review = owner.review(h.plan)
    assert review.approved, review
    own = owner.stub.PrepareMpc(
        party_pb2.PrepareMpcRequest(plan_json=h.plan.to_json(), stage_id=h.mpc.id, index=0), timeout=30
    )
    # The coordinator's helper player (the plan's third), under the key the plan names for it.
    helper = PlayerIdentity(f"{h.plan.hash}:{h.mpc.id}", 2).offer(helper_signer.sign)
    request = party_pb2.RunMpcRequest(
        plan_json=h.plan.to_json(),
        stage_id=h.mpc.id,
        index=0,
        offers=[
            own,
            offer,
            party_pb2.MpcOffer(index=2, offer_json=json.dumps(helper.to_dict()).encode(), host="127.0.0.1", port=9),
        ],
        timeout_seconds=5,
        enclave=attested,
    )
    return lambda: owner.stub.RunMpc(request, timeout=30)


@pytest.mark.parametrize(
    "change",
    ["measurement_not_accepted_by_streaming_owners", "another_signing_key", "evidence_for_another_plan"],
)
def test_an_owner_refuses_an_enclave_player_it_cannot_verify(enclave: EnclaveHandle, owner: Agent, change: str) -> None:
    tee_trust = DatasetTrust(measurements=frozenset({"ab" * 32})) if change.startswith("measurement") else None
    h = hybrid(enclave, a=owner.data, tee_trust=tee_trust)
    prepared = h.prepare(enclave)
    attested = party_pb2.EnclavePlayer(
        evidence=prepared.evidence, hpke_public_key=h.job.hpke_public, signing_public_key=h.job.signing_public
    )
    if change == "another_signing_key":
        attested.signing_public_key = h.streaming[0].key.public_key().public_bytes_raw()
    if change == "evidence_for_another_plan":
        other = hybrid(enclave, a=owner.data)
        attested.evidence = other.prepare(enclave).evidence
        attested.hpke_public_key = other.job.hpke_public
        attested.signing_public_key = other.job.signing_public
    with pytest.raises(grpc.RpcError) as info:
        run_owner(owner, h, attested, prepared.offer)()
    refused = rejection(info.value)
    assert refused.error.code == "attestation", refused.error
    expected = {
        "measurement_not_accepted_by_streaming_owners": "measurement",
        "another_signing_key": "report_data",
        "evidence_for_another_plan": "nonce",
    }[change]
    assert refused.error.details["check"] in (expected, "report_data"), refused.error


def test_an_owner_refuses_a_helper_the_plan_does_not_name(enclave: EnclaveHandle, owner: Agent) -> None:
    """Whoever calls an owner's RunMpc cannot bring a helper of its own (two players of three): the
    helper's offer must carry the key the plan names, the coordinator's."""
    h = hybrid(enclave, a=owner.data)
    prepared = h.prepare(enclave)
    attested = party_pb2.EnclavePlayer(
        evidence=prepared.evidence, hpke_public_key=h.job.hpke_public, signing_public_key=h.job.signing_public
    )
    with pytest.raises(grpc.RpcError) as info:
        run_owner(owner, h, attested, prepared.offer, helper_signer=h.streaming[0].key)()
    refused = rejection(info.value)
    assert refused.error.code == "mpc" and refused.error.details["player"] == 2, refused.error


def test_a_feeding_job_needs_a_memory_backed_scratch_directory(
    enclave_factory: Callable[..., EnclaveHandle], tmp_path: Path
) -> None:
    """The enclave's player keeps its TLS key in a file MPyC reads: that file must be in the TEE's
    memory, never on a disk the host reads. The job is refused at creation, before any data moves."""
    from enclave_worker.mpc_feed import MEMORY_FILESYSTEMS, filesystem_type

    candidates = [tmp_path, Path(__file__).resolve().parent]
    on_disk = next((d for d in candidates if filesystem_type(d) not in MEMORY_FILESYSTEMS), None)
    if on_disk is None:
        pytest.skip("no disk-backed directory here to refuse (the temp and source directories are in memory)")
    enclave = enclave_factory(mpc_scratch_dir=on_disk)
    a = make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy())
    c = make_party("bank_c", secret_loans(50), policy=policy())
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(make_plan(SQL, [a, b, c], helper_key=COORDINATOR_HEX))
    refused = rejection(info.value)
    assert refused.error.code == "invalid_query" and refused.error.details["check"] == "mpc_scratch_dir"


def test_abort_stops_the_running_enclave_player(enclave: EnclaveHandle) -> None:
    """The coordinator aborts the job while the enclave's player waits for its peers: the player
    process stops, RunMpc fails, and nothing is signed."""
    import threading
    import time

    import psutil

    h = hybrid(enclave)
    prepared = h.prepare(enclave)
    session = f"{h.plan.hash}:{h.mpc.id}"
    offers = [prepared.offer]
    for i, key in ((0, h.everyone[0].key), (2, COORDINATOR)):  # genuine offers; their players never start
        offer = PlayerIdentity(session, i).offer(key.sign)
        offers.append(
            party_pb2.MpcOffer(index=i, offer_json=json.dumps(offer.to_dict()).encode(), host="127.0.0.1", port=9)
        )
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(
                enclave.stub.RunMpc(
                    enclave_pb2.EnclaveRunMpcRequest(
                        job_id=h.job.job_id, job_token=h.job.token, offers=offers, timeout_seconds=60
                    ),
                    timeout=90,
                )
            )
        except grpc.RpcError as exc:
            outcome.append(rejection(exc))

    def players() -> list[psutil.Process]:
        return [c for c in psutil.Process().children(recursive=True) if "mpc.player" in " ".join(c.cmdline())]

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while not players() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert players(), "the enclave's player never started"
    started = time.monotonic()
    enclave.stub.AbortJob(enclave_pb2.JobRef(job_id=h.job.job_id, job_token=h.job.token), timeout=10)
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 10
    (refused,) = outcome
    assert not isinstance(refused, party_pb2.MpcOutcome), "an aborted job signed a result"
    deadline = time.monotonic() + 5
    while players() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert players() == []


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ("k_below_policy", "min_group_size"),
        ("rows_not_units", "privacy_unit"),
        ("two_helpers", "players"),
        ("aggregate_changed", "plan_consistency"),
        ("domain_extended", "domain"),
    ],
)
def test_the_enclave_rechecks_the_mpc_stage_against_the_streamed_policies(
    enclave: EnclaveHandle, change: str, rule: str
) -> None:
    """The enclave feeds only an MPC stage that applies the rules of every dataset streamed to it,
    whatever the owners signed (an owner's agent might be of an older release)."""
    a = make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy())
    c = make_party("bank_c", secret_loans(50), policy=policy())
    doc = make_plan(SQL, [a, b, c], helper_key=COORDINATOR_HEX).to_dict()
    mpc = doc["stages"][1]["mpc"]
    if change == "k_below_policy":
        mpc["min_group_size"] = 1
    elif change == "rows_not_units":
        mpc["threshold_on"], mpc["unit_column"] = "rows", None
    elif change == "aggregate_changed":
        # SUM(exposure) opened as MAX(exposure): not what the SQL (or the policy's aggregates) says.
        mpc["aggregates"] = [{**x, "func": "max"} if x["func"] == "sum" else x for x in mpc["aggregates"]]
    elif change == "domain_extended":
        mpc["domain"] = [*mpc["domain"], ["seg-SECRET"]]
    else:
        # A second coordinator helper: at t=1 the coordinator would hold two shares.
        mpc["players"].append({"name": "coordinator2", "holds_input": False})
        doc["stages"][1]["holders"]["3"] = {"helper": "coordinator2", "key": "cd" * 32}
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(tampered)
    refused = rejection(info.value)
    assert refused.error.code == "policy_refusal" and refused.error.details["rule"] == rule, refused.error


def test_streamed_inputs_of_different_types_and_units_combine(enclave: EnclaveHandle) -> None:
    """bank_c's exposure is float32 where bank_b's is float64, and bank_c declares no privacy unit
    (each of its rows counts as its own unit): the enclave's partials combine them."""
    import pyarrow as pa

    a = make_party("bank_a", secret_loans(30), policy=policy(DatasetTrust(mpc_only=True)))
    b = make_party("bank_b", secret_loans(40), policy=policy())
    c_table = secret_loans(50)
    c_table = c_table.set_column(2, "exposure", c_table.column("exposure").cast(pa.float32()))
    c = make_party("bank_c", c_table, policy=dataclasses.replace(policy(), privacy_unit=None))
    plan = make_plan(SQL, [a, b, c], helper_key=COORDINATOR_HEX)
    job = enclave.create_job(plan)
    job.attest()
    for p in (b, c):
        enclave.upload(job.seal(p))
    h = Hybrid(plan, job, [b, c], [a, b, c])
    assert h.prepare(enclave).offer.index == h.index


def test_only_the_jobs_creator_may_run_end_or_join_it(enclave: EnclaveHandle) -> None:
    """The parties learn the job id to stream to it; without the token CreateJob gave its creator
    they can neither prepare nor run its player, execute it, nor end it, and trying changes nothing."""
    h = hybrid(enclave)
    index, stage_id = h.index, h.mpc.id
    calls = {
        "prepare": lambda token: enclave.stub.PrepareMpc(
            enclave_pb2.EnclavePrepareMpcRequest(
                job_id=h.job.job_id,
                job_token=token,
                stage_id=stage_id,
                index=index,
                approvals=approvals(h.plan, h.everyone),
                log_position=HARNESS_LOG.to_proto(),
            ),
            timeout=30,
        ),
        "execute": lambda token: enclave.stub.Execute(
            enclave_pb2.ExecuteRequest(
                job_id=h.job.job_id,
                approvals=approvals(h.plan, h.everyone),
                job_token=token,
                log_position=HARNESS_LOG.to_proto(),
            ),
            timeout=30,
        ),
        "abort": lambda token: enclave.stub.AbortJob(
            enclave_pb2.JobRef(job_id=h.job.job_id, job_token=token), timeout=10
        ),
        "run": lambda token: enclave.stub.RunMpc(
            enclave_pb2.EnclaveRunMpcRequest(job_id=h.job.job_id, job_token=token, timeout_seconds=5), timeout=30
        ),
    }
    for name, rpc in calls.items():
        for token in (b"", bytes(32), h.job.token[:-1] + bytes([h.job.token[-1] ^ 1])):
            with pytest.raises(grpc.RpcError) as info:
                rpc(token)
            assert rejection(info.value).error.code == "unauthenticated", name
    assert enclave.job(h.job.job_id) is not None  # untouched: its creator can still prepare it
    assert h.prepare(enclave).offer.index == index


def test_an_owners_prepared_player_survives_calls_by_others(enclave: EnclaveHandle, owner: Agent) -> None:
    """Whoever knows the plan can call an owner's PrepareMpc and RunMpc: a second PrepareMpc returns
    the same player (it replaces nothing), and a RunMpc that does not check out uses nothing up."""
    h = hybrid(enclave, a=owner.data)
    assert owner.review(h.plan).approved
    prepare = party_pb2.PrepareMpcRequest(plan_json=h.plan.to_json(), stage_id=h.mpc.id, index=0)
    first = owner.stub.PrepareMpc(prepare, timeout=30)
    assert owner.stub.PrepareMpc(prepare, timeout=30) == first
    bad = party_pb2.RunMpcRequest(
        plan_json=h.plan.to_json(), stage_id=h.mpc.id, index=0, offers=[first], timeout_seconds=5
    )
    with pytest.raises(grpc.RpcError) as info:
        owner.stub.RunMpc(bad, timeout=30)
    assert rejection(info.value).error.details["reason"] == "addresses"
    assert owner.stub.PrepareMpc(prepare, timeout=30) == first  # still prepared, still the same player
