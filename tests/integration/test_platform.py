"""The platform as processes: state survives a coordinator restart, and failures end queries
cleanly with a reason that names the component."""

from __future__ import annotations

import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.service import enrol_party
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.keys import generate_signing_key
from sealroom.policy import DatasetPolicy
from sealroom.rpc import call
from sealroom.v1 import coordinator_pb2_grpc
from tests.harness.registration import dataset_info, registration_request

pytestmark = pytest.mark.slow

SQL = "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM bank_a.loans GROUP BY segment ORDER BY segment"


@pytest.fixture()
def cluster(tmp_path):
    table = pa.table(
        {
            "customer_id": pa.array(range(30), pa.int64()),
            "segment": ["retail"] * 20 + ["sme"] * 10,
            "amount": pa.array([1.5] * 30),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    policy = DatasetPolicy(privacy_unit="customer_id", min_group_size=5)
    parties = [PartySpec("bank_a", (DatasetSpec("loans", str(tmp_path / "a.parquet"), policy),))]
    with Cluster(tmp_path / "state", parties, party_timeout_seconds=30) as c:
        yield c


def test_results_and_catalog_survive_a_coordinator_restart(cluster):
    with cluster.client() as client:
        first = client.run(SQL, timeout=60)
    assert first.status == "released"
    cluster.restart("coordinator")
    with cluster.client() as client:
        again = client.result(first.query_id)
        assert again.status == "released"
        assert again.table.equals(first.table)
        assert [d["dataset"] for d in client.datasets()] == ["bank_a.loans"]
        # The parties registered before the restart are still reachable through the stored catalog.
        assert client.run(SQL, timeout=60).status == "released"


def test_in_flight_query_is_marked_failed_after_a_restart(cluster):
    # A "party" that accepts connections and never answers keeps the query waiting for approval.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.settimeout(0.2)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def hold_connections() -> None:
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    holder = threading.Thread(target=hold_connections, daemon=True)
    holder.start()
    try:
        with cluster.client() as client:
            stub = coordinator_pb2_grpc.CoordinatorStub(client._channel)
            # The operator enrols bank_z (its state directory, while the coordinator runs).
            token = enrol_party(cluster.state_dir / "coordinator", "bank_z").token
            address = f"127.0.0.1:{silent.getsockname()[1]}"
            request = registration_request(
                generate_signing_key(), "bank_z", address, [dataset_info("bank_z")], enrolment_token=token
            )
            call("coordinator", stub.RegisterParty, request)
            handle = client.submit("SELECT segment, COUNT(*) FROM bank_z.loans GROUP BY segment")
            deadline = time.monotonic() + 20
            while handle.status()["status"] != "awaiting_approval" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert handle.status()["status"] == "awaiting_approval", handle.status()["error"]
            assert handle.status()["awaiting"] == ["bank_z"]
        cluster.kill("coordinator")  # a crash: nothing gets to record the query's end
        cluster.restart("coordinator")
        with cluster.client() as client:
            st = client.status(handle.query_id)
            assert st["status"] == "failed"
            assert "restarted while this query was in flight" in st["error"]["message"]
            # A graceful stop ends in-flight queries itself, with the same advice.
            handle = client.submit("SELECT segment, COUNT(*) FROM bank_z.loans GROUP BY segment")
            deadline = time.monotonic() + 20
            while handle.status()["status"] != "awaiting_approval" and time.monotonic() < deadline:
                time.sleep(0.05)
        cluster.restart("coordinator")
        with cluster.client() as client:
            st = client.status(handle.query_id)
            assert st["status"] == "failed"
            assert "stopped while this query was in flight" in st["error"]["message"]
    finally:
        stop.set()
        holder.join(5)
        for conn in accepted:
            conn.close()
        silent.close()


def test_a_dead_party_fails_the_query_naming_it(cluster):
    cluster.kill("party-bank_a")
    with cluster.client() as client:
        result = client.run(SQL, timeout=60)
    assert result.status == "failed"
    assert result.error.code == "unavailable"
    assert "bank_a" in result.error.message


def test_a_dead_enclave_fails_the_query_and_releases_nothing(cluster):
    cluster.kill("enclave")
    with cluster.client() as client:
        result = client.run(SQL, timeout=60)
        assert result.status == "failed"
        assert "enclave" in result.error.message
        assert result.table is None
        assert client.status(result.query_id)["approved_by"] == ["bank_a"]
