"""Attack 2 of issue 13, registration by anyone, over real gRPC on 127.0.0.1: the coordinator's real
servicer, a real enclave worker and a real party agent in this process, the operator's and the
reviewer's real commands (``sealroom party enrol``, ``sealroom audit verify``).

The attacker knows bank_a's public key (the agent's unauthenticated ``GetInfo`` tells anyone) and
can reach the coordinator. It tries to move bank_a to its own relay (signed by another key, or not
signed), to empty bank_a's datasets, to take the name with its own key, to replay a registration it
saw, and to squat a name nobody registered yet. Each is refused and changes nothing; bank_a's own
move to a new address is accepted, logged, verified by ``audit verify``, and the next query reaches
it there. A party registered with no datasets leaves ``audit verify`` working.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from connectors.agent import PartyAgent, PartyConfig
from connectors.agent import build_server as build_agent_server
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.servicer import CoordinatorServicer
from sealroom import pki
from sealroom.app.cli import main
from sealroom.keys import generate_signing_key, public_key_hex
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.rpc import Server, create_server, dial
from sealroom.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, party_pb2_grpc
from tests.harness.enclave import EnclaveHandle
from tests.harness.pki import as_coordinator, tls_as
from tests.harness.registration import dataset_info, registration_request

POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment ORDER BY segment"
RELAY = "10.6.6.6:443"  # where the attacker would like the analysts' SQL for bank_a to go


@dataclass
class Platform:
    coordinator: Coordinator
    address: str
    tmp: Path
    capsys: pytest.CaptureFixture[str]
    stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.coordinator.config.state_dir

    def enrol(self, party: str) -> str:
        """The operator's `sealroom party enrol PARTY --state-dir DIR --json`: the token it prints."""
        with pytest.raises(SystemExit) as exit_info:
            main(["party", "enrol", party, "--state-dir", str(self.state_dir), "--json"])
        out, err = self.capsys.readouterr()
        assert exit_info.value.code == 0, err
        doc = json.loads(out)
        assert doc["party"] == party and doc["config_line"] == f'enrolment_token = "{doc["token"]}"'
        return str(doc["token"])

    def audit_verify(self) -> dict[str, Any]:
        """The reviewer's `sealroom audit verify --state-dir DIR --json`, which must accept the log."""
        with pytest.raises(SystemExit) as exit_info:
            main(["audit", "verify", "--state-dir", str(self.state_dir), "--json"])
        out, err = self.capsys.readouterr()
        assert exit_info.value.code == 0, err
        return dict(json.loads(out)["logs"][0])

    def register(self, request: coordinator_pb2.RegisterPartyRequest) -> grpc.StatusCode | None:
        """Send a registration as anyone can: the status code it was refused with (None: accepted)."""
        with dial(self.address, tls_as(), pki.coordinator()) as channel:
            try:
                coordinator_pb2_grpc.CoordinatorStub(channel).RegisterParty(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return None

    def catalog(self) -> tuple[dict[str, tuple[str, bytes]], list[str]]:
        """What analysts see: party -> (address, key), and the datasets."""
        with dial(self.address, tls_as(), pki.coordinator()) as channel:
            listed = coordinator_pb2_grpc.CoordinatorStub(channel).ListDatasets(common_pb2.Empty(), timeout=10)
        parties = {p.name: (p.address, bytes(p.signing_public_key)) for p in listed.parties}
        return parties, [f"{d.party}.{d.name}" for d in listed.datasets]

    def log_types(self) -> list[str]:
        return [json.loads(e)["type"] for e in self.coordinator.store.log.store.entries()]  # type: ignore[attr-defined]

    def start_agent(self, agent: PartyAgent) -> str:
        server: Server = build_agent_server(agent)
        server.start()
        self.stops.append(lambda: server.stop(grace=0.5))
        address = f"127.0.0.1:{server.port}"
        agent.register(address, timeout=10)
        return address

    def run(self, timeout: float = 30.0) -> Any:
        qid, status = self.coordinator.submit(SQL, "alice")
        assert status == "planning"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.coordinator.store.query(qid)
            if row.status in ("released", "refused", "failed"):
                return row
            time.sleep(0.02)
        raise AssertionError(f"query {qid} did not end within {timeout} s")


@pytest.fixture
def platform(
    tmp_path: Path, dev_dir: Path, enclave: EnclaveHandle, capsys: pytest.CaptureFixture[str]
) -> Iterator[Platform]:
    trust = TrustPolicy(
        measurements=enclave.appraisal.measurements, allow_simulated=True, dev_root=dev_dir / "dev-root.crt"
    )
    coordinator = Coordinator(
        CoordinatorConfig(
            state_dir=tmp_path / "coordinator", enclave=enclave.address, trust=trust, tls=as_coordinator()
        )
    )
    server: Server = create_server("127.0.0.1:0", tls=as_coordinator())
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator), server.grpc)
    server.start()
    p = Platform(coordinator, f"127.0.0.1:{server.port}", tmp_path, capsys)
    p.stops.append(lambda: (server.stop(grace=0.5), coordinator.shutdown()))
    yield p
    for stop in reversed(p.stops):
        stop()


def bank_a(p: Platform, token_file: Path) -> PartyAgent:
    """bank_a's real agent, its enrolment token in a file (`[party] enrolment_token = PATH`)."""
    pq.write_table(
        pa.table({"customer_id": pa.array(range(12), pa.int64()), "segment": ["retail"] * 8 + ["sme"] * 4}),
        p.tmp / "a.parquet",
    )
    key_file = p.tmp / "bank_a.key"
    tls = tls_as(pki.party("bank_a"))
    config_file = p.tmp / "bank_a.toml"
    config_file.write_text(
        "[party]\n"
        'name = "bank_a"\n'
        f'coordinator = "{p.address}"\n'
        f'signing_key = "{key_file}"\n'
        f'enrolment_token = "{token_file}"\n'
        f'state_dir = "{p.tmp / "bank_a-state"}"\n'
        "[trust]\n"
        "allow_simulated = true\n"
        f'dev_root = "{p.tmp / "dev" / "dev-root.crt"}"\n'
        f"measurements = {json.dumps(list(p.coordinator.config.trust.measurements))}\n"
        "[[dataset]]\n"
        'name = "loans"\n'
        f'source = "{p.tmp / "a.parquet"}"\n'
        "[dataset.policy]\n"
        'privacy_unit = "customer_id"\n'
        "min_group_size = 2\n"
        f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["party", "init", "--key", str(key_file)])
    assert exit_info.value.code == 0
    p.capsys.readouterr()
    return PartyAgent(PartyConfig.load(config_file))


def test_a_hijack_without_the_key_is_refused_and_the_owners_own_move_is_logged(platform: Platform) -> None:
    p = platform
    token_file = p.tmp / "bank_a.enrolment"
    token_file.write_text(p.enrol("bank_a") + "\n")
    agent = bank_a(p, token_file)
    home = p.start_agent(agent)
    assert p.run().status == "released"
    # What anyone learns: bank_a's public key, from its agent.
    with dial(home, as_coordinator(), pki.party("bank_a")) as channel:
        victim = bytes(
            party_pb2_grpc.PartyAgentStub(channel).GetInfo(common_pb2.Empty(), timeout=10).signing_public_key
        )
    assert victim.hex() == agent.public_key_hex
    # A registration of bank_a's own that the attacker saw on its way (the attacker replays it below).
    seen = agent.registration(home, agent.dataset_infos())
    assert p.register(seen) is None
    before, log_before = p.catalog(), p.log_types()

    thief, victim_key = generate_signing_key(), Ed25519PublicKey.from_public_bytes(victim)  # from GetInfo
    attempts = {
        "moved, signed by another key": registration_request(thief, "bank_a", RELAY, registered_key=victim_key),
        "moved, unsigned": registration_request(thief, "bank_a", RELAY, registered_key=victim_key, signed=False),
        "emptied, signed by another key": registration_request(thief, "bank_a", home, [], registered_key=victim_key),
        "taken with the thief's own key": registration_request(thief, "bank_a", RELAY),
        "taken with a used enrolment token": registration_request(
            thief, "bank_a", RELAY, enrolment_token=token_file.read_text().strip()
        ),
    }
    refused = {what: p.register(request) for what, request in attempts.items()}
    assert refused == {
        "moved, signed by another key": grpc.StatusCode.UNAUTHENTICATED,
        "moved, unsigned": grpc.StatusCode.UNAUTHENTICATED,
        "emptied, signed by another key": grpc.StatusCode.UNAUTHENTICATED,
        "taken with the thief's own key": grpc.StatusCode.PERMISSION_DENIED,
        "taken with a used enrolment token": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert p.catalog() == before and p.log_types() == log_before  # nothing changed, nothing logged
    assert before[0]["bank_a"] == (home, victim) and before[1] == ["bank_a.loans"]

    # bank_a's own move: its agent restarts on another port and registers there, signed.
    moved = p.start_agent(agent)
    parties, _ = p.catalog()
    assert moved != home and parties["bank_a"] == (moved, victim)
    entries = [json.loads(e) for e in p.coordinator.store.log.store.entries()]  # type: ignore[attr-defined]
    last = entries[-1]
    assert last["type"] == "party_registered" and last["event"]["change"] == "updated"
    assert last["event"]["owner_key"] == victim.hex() and moved not in json.dumps(entries)
    # The registration the attacker saw cannot move bank_a back.
    assert p.register(seen) == grpc.StatusCode.UNAUTHENTICATED
    assert p.catalog()[0]["bank_a"] == (moved, victim)

    report = p.audit_verify()
    assert report["entries_by_type"]["party_registered"] == 2  # the enrolment and the move
    assert "bank_a.witness" in {w["name"] for w in report["witnesses"]}
    assert p.run().status == "released"  # the coordinator reaches bank_a where it moved


def test_a_new_name_cannot_be_squatted_and_a_party_without_datasets_keeps_audit_verify_working(
    platform: Platform,
) -> None:
    p = platform
    squatter, owner = generate_signing_key(), generate_signing_key()
    other_token = p.enrol("bank_b")
    assert p.register(registration_request(squatter, "bank_new", RELAY)) == grpc.StatusCode.PERMISSION_DENIED
    forged = registration_request(squatter, "bank_new", RELAY, enrolment_token=other_token)  # bank_b's token
    assert p.register(forged) == grpc.StatusCode.PERMISSION_DENIED
    assert "bank_new" not in p.catalog()[0] and p.log_types() == []

    # The operator enrols bank_new for its owner, who registers it with no datasets yet.
    token = p.enrol("bank_new")
    assert p.register(registration_request(owner, "bank_new", "127.0.0.1:7", [], enrolment_token=token)) is None
    assert p.register(registration_request(squatter, "bank_new", RELAY, enrolment_token=token)) == (
        grpc.StatusCode.PERMISSION_DENIED  # the token was used up by the owner's key
    )
    parties, datasets = p.catalog()
    assert parties["bank_new"] == ("127.0.0.1:7", bytes.fromhex(public_key_hex(owner))) and datasets == []
    report = p.audit_verify()  # failed with "witness_key" before a registration logged the party's key
    assert report["entries_by_type"] == {"party_registered": 1}
    assert [w["name"] for w in report["witnesses"]] == ["bank_new.witness"]
    # Its datasets, later, by the owner: logged, and the log still verifies.
    later = registration_request(owner, "bank_new", "127.0.0.1:7", [dataset_info("bank_new")])
    assert p.register(later) is None
    assert p.audit_verify()["entries_by_type"] == {"party_registered": 2, "dataset_registered": 1}
