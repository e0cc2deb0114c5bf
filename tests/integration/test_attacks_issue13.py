"""An attacker's review of issue 13 once its parts were merged: the gaps found between the parts,
each as an attack that now fails while the legitimate path still works.

- A coordinator without ``[analysts]`` takes self-declared analyst names: on a non-loopback address
  anyone who reaches it could act as an analyst the owners allow (the allow-list of attack 1). It
  is refused there, as plaintext is (``coordinator.servicer.build_server``).
- Whoever runs the coordinator replays a released query: one ``query_submitted`` entry, owners'
  approvals that stay live for an hour, so it creates a second enclave job for the same plan, asks
  the agents to ``Contribute`` again (their data may have changed since: a difference of two
  releases) and calls ``Execute`` with the approvals and log position of the first release. An
  agent streams its data once per approved plan, and runs each MPC player of it once
  (``Approvals.claim``), so the log's one entry is one release.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator import servicer as coordinator_servicer
from coordinator.config import CoordinatorConfig
from sealroom import pki
from sealroom.auth import AnalystDirectory, generate_token, token_hash
from sealroom.errors import ConfigError
from sealroom.planning.plan import Plan
from sealroom.policy import TrustPolicy
from sealroom.rpc import fetch_server_certificate
from sealroom.signing import LogPosition
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc
from tests.harness.pki import tls_as


def _coordinator(tmp_path: Path, listen: str, analysts: AnalystDirectory | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        state_dir=tmp_path / "coordinator",
        enclave="127.0.0.1:9",
        trust=TrustPolicy(),
        listen=listen,
        analysts=analysts,
        tls=tls_as(pki.coordinator()),
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_unauthenticated_analysts_are_refused_outside_loopback(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        coordinator_servicer.build_server(_coordinator(tmp_path, listen, None))
    assert "[analysts]" in info.value.message and info.value.details == {"address": listen}


@pytest.mark.parametrize(
    ("listen", "analysts"),
    [("127.0.0.1:0", None), ("0.0.0.0:0", AnalystDirectory({"alice": token_hash(generate_token())}))],
)
def test_a_coordinator_with_analysts_or_on_loopback_still_serves(
    tmp_path: Path, listen: str, analysts: AnalystDirectory | None
) -> None:
    server, coordinator = coordinator_servicer.build_server(_coordinator(tmp_path, listen, analysts))
    server.start()
    try:
        assert server.port > 0
    finally:
        server.stop(0)
        coordinator.shutdown()


# -- one logged query, one release ------------------------------------------------------------------

SQL = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment"
)
PARTIES = ("bank_a", "bank_b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
    from sealroom.policy import DatasetPolicy

    d = tmp_path_factory.mktemp("replay")
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 3,
            "columns": {"customer_id": "join_key", "segment": "dimension"},
        }
    )
    specs = []
    for name in PARTIES:
        table = pa.table({"customer_id": pa.array(range(12), pa.int64()), "segment": ["retail"] * 8 + ["sme"] * 4})
        pq.write_table(table, d / f"{name}.parquet")
        specs.append(PartySpec(name, (DatasetSpec("loans", str(d / f"{name}.parquet"), policy),)))
    with Cluster(d / "state", specs, party_timeout_seconds=60) as running:
        yield running


@pytest.mark.slow
def test_the_coordinator_cannot_replay_a_released_query_for_a_second_release(cluster: Any) -> None:
    with cluster.client() as client:
        first = client.run(SQL, timeout=120)
    assert first.status == "released"
    receipt = first.receipt["countersigned"]
    plan_json = Plan.from_json(json.dumps(receipt["plan"]).encode()).to_json()
    approvals = [
        enclave_pb2.Approval(party=a["party"], plan_hash=a["plan_hash"], signature=bytes.fromhex(a["signature"]))
        for a in receipt["approvals"]
    ]
    certificate = fetch_server_certificate(cluster.enclave_address, cluster.tls_config(pki.coordinator()))
    with cluster.dial("enclave") as ch:
        enclave = enclave_pb2_grpc.EnclaveStub(ch)
        job = enclave.CreateJob(enclave_pb2.CreateJobRequest(plan_json=plan_json), timeout=30)
        for name in PARTIES:
            with cluster.dial(f"party-{name}") as pch, pytest.raises(grpc.RpcError) as info:
                party_pb2_grpc.PartyAgentStub(pch).Contribute(
                    party_pb2.ContributeRequest(
                        plan_json=plan_json,
                        job_id=job.job_id,
                        enclave_address=cluster.enclave_address,
                        enclave_tls_certificate=certificate,
                    ),
                    timeout=60,
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already sent its data" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            enclave.Execute(
                enclave_pb2.ExecuteRequest(
                    job_id=job.job_id,
                    approvals=approvals,
                    job_token=job.job_token,
                    log_position=LogPosition.from_dict(receipt["log"]).to_proto(),
                ),
                timeout=60,
            )
        assert "did not arrive" in (info.value.details() or "")
    # The legitimate path: the same SQL submitted again is a new logged query, and releases.
    with cluster.client() as client:
        second = client.run(SQL, timeout=120)
    assert second.status == "released" and second.query_id != first.query_id
