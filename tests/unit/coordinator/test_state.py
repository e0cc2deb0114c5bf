"""The coordinator's state behind its interface: typed rows out of the SQLite store, and the
service's handlers over it (what the gRPC servicer delegates to), without a gRPC server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import service
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, catalog_of
from coordinator.store import Approval, CoordinatorStore, DatasetRecord, PartyRecord, ReleaseRecord, SQLiteStore
from sealroom.auth import AnalystDirectory
from sealroom.errors import AuthenticationError, InvalidQueryError, NotFoundError
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.v1 import common_pb2, coordinator_pb2
from tests.harness.registration import registration_request

POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string())])


def record(party: str = "bank_a", name: str = "loans", rows: int = 1200) -> DatasetRecord:
    return DatasetRecord(
        party=party,
        name=name,
        arrow_schema=SCHEMA.serialize().to_pybytes(),
        policy_json=POLICY.canonical(),
        policy_digest=POLICY.digest(),
        description="loans per customer",
        approximate_rows=rows,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "coordinator.db", log_key=Ed25519PrivateKey.generate())
    yield s
    s.close()


def test_the_sqlite_store_is_a_coordinator_store(store: SQLiteStore) -> None:
    typed: CoordinatorStore = store  # mypy checks the interface; this checks the methods exist at run time
    missing = [name for name in dir(CoordinatorStore) if not name.startswith("_") and not hasattr(typed, name)]
    assert missing == []


def test_rows_come_back_typed(store: SQLiteStore) -> None:
    key = "11" * 32
    store.register_party("bank_a", "127.0.0.1:1", key, [record(), record(name="cards", rows=0)])
    assert store.parties() == {"bank_a": PartyRecord("bank_a", "127.0.0.1:1", key)}
    assert store.datasets() == [record(name="cards", rows=0), record()]  # ordered by party, name
    assert [d.qualified for d in store.datasets()] == ["bank_a.cards", "bank_a.loans"]

    store.create_query("q_1", "SELECT 1", "alice")
    store.add_approval("q_1", "bank_a", "ab" * 32, b"\x01" * 64)
    (approval,) = store.approvals("q_1").values()
    assert approval == Approval("ab" * 32, b"\x01" * 64) and approval.plan_hash == "ab" * 32

    store.update_query("q_1", error={"code": "job_failed", "message": "x"}, progress="failed")
    row = store.query("q_1")
    assert (row.id, row.analyst, row.status, row.error, row.progress) == (
        "q_1",
        "alice",
        "planning",
        {"code": "job_failed", "message": "x"},
        "failed",
    )


def test_a_release_comes_back_as_a_record(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "unlogged.db")  # no log key: no receipt to countersign
    try:
        store.create_query("q_1", "SELECT 1", "alice")
        signed = store.release(
            "q_1",
            arrow_table=b"table",
            suppressed=[{"segment": "sme"}],
            result_json=b'{"a": 1}',
            signature=b"\x02" * 64,
            evidence=b"{}",
            simulated=True,
            released_at=12.5,
        )
        assert signed is None and store.query("q_1").status == "released"
        assert store.get_release("q_1") == ReleaseRecord(
            arrow_table=b"table",
            suppressed=[{"segment": "sme"}],
            result_json=b'{"a": 1}',
            signature=b"\x02" * 64,
            evidence=b"{}",
            simulated=True,
            released_at=12.5,
            receipt=None,
        )
        assert store.get_release("q_2") is None
    finally:
        store.close()


def test_a_dataset_of_another_party_is_refused(store: SQLiteStore) -> None:
    with pytest.raises(InvalidQueryError, match="must belong to the registering party"):
        store.register_party("bank_a", "127.0.0.1:1", "11" * 32, [record(party="bank_b")])
    assert store.parties() == {} and store.datasets() == []


def test_the_catalog_is_built_from_the_records() -> None:
    catalog = catalog_of([record(), record(party="bank_b", rows=0)])
    assert sorted(catalog) == ["bank_a.loans", "bank_b.loans"]
    entry = catalog["bank_a.loans"]
    assert entry.schema == SCHEMA and entry.policy.digest() == POLICY.digest()
    assert catalog["bank_b.loans"].qualified == "bank_b.loans"


# -- the service's handlers ------------------------------------------------------------------------


def config(state_dir: Path, analysts: AnalystDirectory | None = None) -> CoordinatorConfig:
    return CoordinatorConfig(state_dir=state_dir, enclave="127.0.0.1:9", trust=TrustPolicy(), analysts=analysts)


def registration(
    party: str = "bank_a", dataset_party: str | None = None, token: str = ""
) -> coordinator_pb2.RegisterPartyRequest:
    d = record(dataset_party or party)
    info = common_pb2.DatasetInfo(
        party=d.party,
        name=d.name,
        arrow_schema=d.arrow_schema,
        policy_json=d.policy_json,
        policy_digest=d.policy_digest,
        description=d.description,
        approximate_rows=d.approximate_rows,
    )
    return registration_request(Ed25519PrivateKey.generate(), party, "127.0.0.1:1", [info], enrolment_token=token)


def test_a_registration_is_listed_for_analysts(tmp_path: Path) -> None:
    c = Coordinator(config(tmp_path / "state"))
    try:
        token = service.enrol_party(c.config.state_dir, "bank_a").token
        assert service.register_party(registration(token=token), c).datasets == ["bank_a.loans"]
        listed = service.list_datasets(c, metadata=())
        (d,) = listed.datasets
        assert (d.party, d.name, d.approximate_rows, d.policy_digest) == ("bank_a", "loans", 1200, POLICY.digest())
        assert [p.name for p in listed.parties] == ["bank_a"] and len(listed.parties[0].signing_public_key) == 32
        with pytest.raises(InvalidQueryError, match="belong to the registering party"):
            service.register_party(registration("bank_b", dataset_party="bank_a"), c)
        with pytest.raises(InvalidQueryError, match="reserved"):
            service.register_party(registration("enclave"), c)
    finally:
        c.shutdown()


def test_an_analyst_sees_only_their_own_queries(tmp_path: Path) -> None:
    tokens = {"alice": "token-of-alice", "bob": "token-of-bob"}
    directory = AnalystDirectory({n: "sha256:" + hashlib.sha256(t.encode()).hexdigest() for n, t in tokens.items()})
    c = Coordinator(config(tmp_path / "state", analysts=directory))
    alice = (("authorization", f"Bearer {tokens['alice']}"),)
    bob = (("authorization", f"Bearer {tokens['bob']}"),)
    try:
        sql = "SELECT COUNT(*) FROM nobody.nothing"  # refused at planning: no thread, no enclave
        submitted = service.submit(coordinator_pb2.QueryRequest(sql=sql), c, alice)
        assert submitted.status == "refused"
        status = service.get_status(coordinator_pb2.QueryRef(query_id=submitted.query_id), c, alice)
        assert status.analyst == "alice" and status.status == "refused" and json.loads(status.error_json)["code"]
        with pytest.raises(NotFoundError, match="no query"):
            service.get_result(coordinator_pb2.QueryRef(query_id=submitted.query_id), c, bob)
        assert [q.query_id for q in service.list_queries(c, alice).queries] == [submitted.query_id]
        assert list(service.list_queries(c, bob).queries) == []
        with pytest.raises(AuthenticationError, match="cannot act as"):
            service.submit(coordinator_pb2.QueryRequest(sql=sql, analyst="alice"), c, bob)
        with pytest.raises(AuthenticationError, match="requires an analyst token"):
            service.list_datasets(c, metadata=())
    finally:
        c.shutdown()
