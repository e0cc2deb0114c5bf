"""Party agents witness the coordinator's transparency log before they approve, over real gRPC.

One platform on 127.0.0.1 in this process: the enclave worker, the coordinator (its real servicer,
which a test can make lie to one owner), and two real party agents (bank_a pins the log key, bank_b
trusts it on first use). Normal approvals leave every owner's co-signature in the log; a coordinator
that shows bank_b a forked or rolled-back history gets no approval from it and releases nothing; a
forged co-signature is refused; a reviewer's `sealroom audit verify` reports who co-signed what.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from connectors.agent import build_server as build_agent_server
from connectors.witness import LOG_KEY_FILE
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, enrol_party
from coordinator.servicer import CoordinatorServicer
from coordinator.store import log_origin
from sealroom import pki
from sealroom.app.cli import main
from sealroom.audit.log import TransparencyLog
from sealroom.audit.notes import NoteSigner, NoteVerifier, SignedCheckpoint, witness_verifier
from sealroom.audit.store import SQLiteLogStore
from sealroom.keys import generate_signing_key, load_signing_key, public_key_hex
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.rpc import Server, create_server, dial, translate_errors, unwrap
from sealroom.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.harness.enclave import EnclaveHandle
from tests.harness.pki import as_coordinator, tls_as

SQL = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment ORDER BY a.segment"
)
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
DIGEST = "ab" * 32


@translate_errors
class LyingServicer(CoordinatorServicer):
    """The coordinator's own servicer, except that it can show one party another history."""

    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__(coordinator)
        self.views: dict[str, TransparencyLog] = {}  # party -> the history it is shown instead
        self.rollback: dict[str, str] = {}  # party -> an older checkpoint note it is shown instead

    def GetCheckpoint(self, request, context):  # noqa: N802
        resp = CoordinatorServicer.GetCheckpoint.__wrapped__(self, request, context)  # type: ignore[attr-defined]
        if request.party in self.views:
            return coordinator_pb2.CheckpointResponse(
                checkpoint=self.views[request.party].checkpoint().to_text(), log_key=resp.log_key
            )
        if request.party in self.rollback:
            return coordinator_pb2.CheckpointResponse(checkpoint=self.rollback[request.party], log_key=resp.log_key)
        return resp

    def GetConsistencyProof(self, request, context):  # noqa: N802
        view = self.views.get(request.party)
        if view is not None:  # proofs from the same false history, so they look consistent with it
            return coordinator_pb2.ConsistencyProofResponse(
                hashes=view.consistency_proof(request.old_size, request.new_size)
            )
        return CoordinatorServicer.GetConsistencyProof.__wrapped__(self, request, context)  # type: ignore[attr-defined]


@dataclass
class Platform:
    coordinator: Coordinator
    servicer: LyingServicer
    address: str
    agents: dict[str, PartyAgent]
    tmp: Path
    stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def store(self) -> Any:
        return self.coordinator.store

    def run(self, timeout: float = 30.0) -> Any:
        qid, status = self.coordinator.submit(SQL, "alice")
        assert status == "planning"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.store.query(qid)
            if row.status in ("released", "refused", "failed"):
                return row
            time.sleep(0.02)
        raise AssertionError(f"query {qid} did not end within {timeout} s")

    def fork(self, *, keep: int, size: int) -> TransparencyLog:
        """Another history signed with the log's own key: the first ``keep`` entries, then others."""
        key = load_signing_key(self.coordinator.config.state_dir / "log.key")
        view = TransparencyLog(SQLiteLogStore(self.tmp / f"fork-{keep}-{size}.db"), NoteSigner(log_origin(key), key))
        for data in self.store.log.store.entries()[:keep]:
            doc = json.loads(data)
            view.append(doc["type"], **doc["event"])
        while view.size < size:
            view.append("dataset_registered", party=f"ghost_{view.size}", dataset="loans", policy_digest=DIGEST)
        return view

    def cosigners(self) -> dict[int, set[str]]:
        """size -> the witnesses whose co-signatures the coordinator stored for it (each verified)."""
        log_key = self.store.log.signer.verifier
        keys = [witness_verifier(name, a.public_key_hex) for name, a in self.agents.items()]
        out: dict[int, set[str]] = {}
        for text in self.store.log.store.checkpoints():
            signed = SignedCheckpoint.from_text(text)
            names = signed.verify(log_key, witnesses=keys, quorum=0)
            out.setdefault(signed.checkpoint.size, set()).update(names)
        return out


def _loans(path: Path) -> str:
    pq.write_table(
        pa.table({"customer_id": pa.array(range(12), pa.int64()), "segment": ["retail"] * 8 + ["sme"] * 4}), path
    )
    return str(path)


@pytest.fixture
def platform(tmp_path: Path, dev_dir: Path, enclave: EnclaveHandle) -> Iterator[Platform]:
    trust = TrustPolicy(
        measurements=enclave.appraisal.measurements, allow_simulated=True, dev_root=dev_dir / "dev-root.crt"
    )
    coordinator = Coordinator(
        CoordinatorConfig(
            state_dir=tmp_path / "coordinator",
            enclave=enclave.address,
            trust=trust,
            party_timeout_seconds=30,
            approval_timeout_seconds=30,
            tls=as_coordinator(),
        )
    )
    servicer = LyingServicer(coordinator)
    server: Server = create_server("127.0.0.1:0", tls=as_coordinator())
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server.grpc)
    server.start()
    address = f"127.0.0.1:{server.port}"
    p = Platform(coordinator, servicer, address, {}, tmp_path)
    p.stops.append(lambda: (server.stop(grace=0.5), coordinator.shutdown()))
    pinned = NoteVerifier.from_vkey((coordinator.config.state_dir / "log.vkey").read_text())
    for name in ("bank_a", "bank_b"):
        config = PartyConfig(
            name=name,
            coordinator=address,
            signing_key=tmp_path / f"{name}.key",  # unused: the test passes the key
            trust=trust,
            datasets=(DatasetConfig("loans", _loans(tmp_path / f"{name}.parquet"), POLICY),),
            state_dir=tmp_path / f"{name}-state",
            # bank_a pins the log key it got from the operator; bank_b trusts it on first use.
            log_key=pinned if name == "bank_a" else None,
            enrolment_token=enrol_party(coordinator.config.state_dir, name).token,
            tls=tls_as(pki.party(name)),
        )
        agent = PartyAgent(config, signing_key=generate_signing_key())
        agent_server = build_agent_server(agent)
        agent_server.start()
        agent.register(f"127.0.0.1:{agent_server.port}", timeout=10)
        p.agents[name] = agent
        p.stops.append(lambda s=agent_server: s.stop(grace=0.5))
    yield p
    for stop in reversed(p.stops):
        stop()


def test_witnessing_over_grpc_forks_rollbacks_and_forged_cosignatures(
    platform: Platform, capsys: pytest.CaptureFixture[str]
) -> None:
    p = platform
    a, b = p.agents["bank_a"], p.agents["bank_b"]
    assert a.witness is not None and b.witness is not None
    # bank_b trusted the log key on first use, at registration; bank_a pinned it (nothing kept).
    published = (p.coordinator.config.state_dir / "log.vkey").read_text().strip()
    assert (p.tmp / "bank_b-state" / LOG_KEY_FILE).read_text().strip() == published
    assert not (p.tmp / "bank_a-state" / LOG_KEY_FILE).exists()

    # (a) A normal query: both owners co-sign before they approve, and it is released.
    row = p.run()
    assert row.status == "released", row.error
    cosigned = p.cosigners()
    size_a = a.witness.latest.checkpoint.size  # type: ignore[union-attr]
    size_b = b.witness.latest.checkpoint.size  # type: ignore[union-attr]
    assert "bank_a.witness" in cosigned[size_a] and "bank_b.witness" in cosigned[size_b]
    # Two registrations (party_registered and dataset_registered each) and the query, before any
    # approval is logged.
    assert size_a == size_b == 5

    # (b) The coordinator shows bank_b another history of the size it co-signed: a fork.
    p.servicer.views["bank_b"] = p.fork(keep=2, size=size_b)
    refused = p.run()
    assert refused.status == "refused" and refused.error["code"] == "approval"
    assert refused.error["details"]["party"] == "bank_b" and refused.error["details"]["check"] == "fork"
    assert "witness check (fork)" in refused.error["message"]
    assert p.store.get_release(refused.id) is None and p.store.approvals(refused.id) == {}
    # ... and a longer one that does not extend it, with proofs from that same false history.
    p.servicer.views["bank_b"] = p.fork(keep=2, size=p.store.log.size + 3)
    refused = p.run()
    assert refused.status == "refused" and refused.error["details"]["check"] == "consistency_proof"
    assert p.store.get_release(refused.id) is None
    del p.servicer.views["bank_b"]

    # (c) An older checkpoint of the real log: rolled back.
    p.servicer.rollback["bank_b"] = p.store.log.store.checkpoints(1)[0]
    refused = p.run()
    assert refused.status == "refused" and refused.error["details"]["check"] == "rollback"
    assert p.store.get_release(refused.id) is None
    assert b.witness.latest.checkpoint.size == size_b  # type: ignore[union-attr]  # none of it was remembered
    del p.servicer.rollback["bank_b"]
    # The refusals are in the log, by the party and the rule.
    rejected = [json.loads(e) for e in p.store.log.store.entries()]
    rules = [(e["event"]["party"], e["event"].get("rule")) for e in rejected if e["type"] == "rejected"]
    assert rules == [("bank_b", "log_witness")] * 3

    # The honest log still extends what both co-signed: the next query is released.
    row = p.run()
    assert row.status == "released", row.error
    assert b.witness.latest.checkpoint.size > size_b  # type: ignore[union-attr]
    cosigned = p.cosigners()
    assert {"bank_a.witness", "bank_b.witness"} <= set().union(*cosigned.values())

    # (d) A forged co-signature is refused by SubmitCosignature, over the wire.
    latest = SignedCheckpoint.from_text(p.coordinator.checkpoint()[0])
    impostor = generate_signing_key()
    forged = latest.with_signature(NoteSigner("bank_a.witness", impostor).sign(latest.checkpoint.body()))
    from tests.unit.connectors.test_witness import cosign_request

    before = p.store.log.store.checkpoints()
    with dial(p.address, tls_as(), pki.coordinator()) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitCosignature(cosign_request("bank_a", a.key, forged), timeout=10)
        err = unwrap(info.value)
        assert err.code == "audit" and err.details["check"] == "witness_signature"
        with pytest.raises(grpc.RpcError) as info:  # signed by someone else altogether
            stub.SubmitCosignature(cosign_request("bank_a", impostor, forged), timeout=10)
        assert unwrap(info.value).details["check"] == "owner_signature"
        assert p.store.log.store.checkpoints() == before  # nothing of either was stored
        genuine = latest.with_signature(NoteSigner("bank_a.witness", a.key).sign(latest.checkpoint.body()))
        assert (
            stub.SubmitCosignature(cosign_request("bank_a", a.key, genuine), timeout=10).size == latest.checkpoint.size
        )
    assert len(p.store.log.store.checkpoints()) == len(before) + 1

    # The reviewer's report names who co-signed what, from the state directory alone.
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify", "--state-dir", str(p.coordinator.config.state_dir), "--json"])
    out, err_text = capsys.readouterr()
    assert exit_info.value.code == 0, err_text
    report = json.loads(out)["logs"][0]
    names = {w["name"]: w for w in report["witnesses"]}
    assert set(names) == {"bank_a.witness", "bank_b.witness"} and all(not w["pinned"] for w in names.values())
    assert all(w["checkpoints"] >= 2 for w in names.values()) and report["unverified_cosignatures"] == 0
    assert {"size": size_a, "witnesses": ["bank_a.witness", "bank_b.witness"]} in report["cosigned"]
    # Pinned: by default the latest checkpoint needs the pinned witness, and the entries logged after
    # the last approval (the stage, the release) are co-signed only at the next approval.
    pin = ["--witness-key", f"bank_b.witness={public_key_hex(b.key)}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify", "--state-dir", str(p.coordinator.config.state_dir), *pin])
    assert exit_info.value.code == 1 and "refused (witness_quorum)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify", "--state-dir", str(p.coordinator.config.state_dir), *pin, "--quorum", "0"])
    out, err_text = capsys.readouterr()
    assert exit_info.value.code == 0, err_text
    assert "witness bank_b.witness (pinned key): co-signed checkpoint sizes" in out
    assert "witness bank_a.witness (registered owner key): co-signed checkpoint sizes" in out
