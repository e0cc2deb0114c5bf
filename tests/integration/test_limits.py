"""Attack 6 of issue 13, unbounded work, against real servers on 127.0.0.1: oversized SQL is refused
before anyone parses it, planning stops when the analyst's call ends, the enclave interrupts DuckDB
when Execute's caller goes away, and a stray module in the platform's working directory is never
imported by its processes. Each time the legitimate path still works."""

from __future__ import annotations

import time

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.client import Client
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.errors import ResourceExhaustedError, UnavailableError
from sealroom.planning.limits import QueryLimits
from sealroom.policy import DatasetPolicy
from sealroom.v1 import enclave_pb2
from tests.harness.enclave import (
    HARNESS_LOG,
    EnclaveHandle,
    approvals,
    loans_table,
    make_party,
    make_plan,
    wait_for,
)

pytestmark = pytest.mark.slow

SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
# Roomier than the defaults so that a query can take seconds to plan (the cancellation test); 10 MB
# is still far above them.
LIMITS = QueryLimits(max_sql_bytes=2_000_000, max_expression_nodes=2_000_000, max_in_list=500_000)
STRAY_TYPING = "raise SystemExit('a stray typing.py from the working directory was imported')\n"


def in_list(n: int) -> str:
    items = ", ".join(str(10**6 + i) for i in range(n))
    return f"SELECT segment, COUNT(*) AS n FROM bank_a.loans WHERE customer_id IN ({items}) GROUP BY segment"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("limits")
    pq.write_table(
        pa.table({"customer_id": pa.array(range(20), pa.int64()), "segment": ["retail"] * 20}), d / "a.parquet"
    )
    state = d / "state"
    state.mkdir()
    # The processes' working directory holds a module that shadows the standard library's typing:
    # before `python -P`, every server imported it (and hung or, here, exited).
    (state / "typing.py").write_text(STRAY_TYPING)
    policy = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
    parties = [PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), policy),))]
    with Cluster(state, parties, limits=LIMITS) as cluster:
        yield cluster


def test_a_stray_module_in_the_working_directory_is_not_imported(platform: Cluster) -> None:
    assert (platform.state_dir / "typing.py").exists()
    with platform.client() as client:
        assert client.run(SQL, timeout=120).to_arrow().to_pylist() == [{"segment": "retail", "n": 20}]


def test_ten_megabytes_of_sql_are_refused_at_once_and_not_stored(platform: Cluster) -> None:
    huge = "SELECT COUNT(*) FROM bank_a.loans WHERE customer_id IN (" + ", ".join(["1"] * 5_000_000) + ")"
    with platform.client() as client:
        before = len(client.queries())
        for call in (client.explain, client.submit):
            started = time.monotonic()
            with pytest.raises(ResourceExhaustedError, match="max_sql_bytes") as info:
                call(huge)
            assert time.monotonic() - started < 5.0  # generous: the refusal precedes any parse
            assert info.value.details["limit"] == "max_sql_bytes"
            assert info.value.details["maximum"] == LIMITS.max_sql_bytes
        assert len(client.queries()) == before  # nothing stored
        assert "bank_a.loans" in client.explain(SQL)


def test_a_deep_expression_is_refused_with_the_limit_named(platform: Cluster) -> None:
    deep = "SELECT segment, SUM(customer_id" + " + 1" * 950 + ") AS s FROM bank_a.loans GROUP BY segment"
    with platform.client() as client:
        with pytest.raises(ResourceExhaustedError, match="max_nesting_depth = 256"):
            client.explain(deep)


def test_planning_stops_when_the_analysts_call_ends(platform: Cluster) -> None:
    slow = in_list(40_000)  # ~350 KB: seconds of parsing and resolution
    with Client(platform.coordinator_address, token=platform.token(), ca=platform.ca_path, timeout=0.3) as impatient:
        with pytest.raises(UnavailableError, match="deadline_exceeded"):  # as the client sees its deadline
            impatient.submit(slow)
    with platform.client() as client:

        def stopped() -> bool:
            mine = [q for q in client.queries() if q["sql"] == slow]
            return bool(mine) and mine[0]["status"] == "refused"

        assert wait_for(stopped, timeout=120)
        (query,) = [q for q in client.queries() if q["sql"] == slow]
        assert query["error"]["code"] == "deadline_exceeded"
        assert "stopped before" in query["error"]["message"]
        assert client.run(SQL, timeout=120).to_arrow().to_pylist() == [{"segment": "retail", "n": 20}]


JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)


def test_the_enclave_interrupts_a_stage_whose_caller_went_away(enclave: EnclaveHandle) -> None:
    # Two units with 60,000 rows each on both sides: a join of 7.2 billion rows, minutes of work.
    rows = [(i % 2, "retail", 1.0) for i in range(120_000)]
    a, b = make_party("bank_a", loans_table(rows)), make_party("bank_b", loans_table(rows))
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    for p in (a, b):
        enclave.upload(job.seal(p))
    request = enclave_pb2.ExecuteRequest(
        job_id=job.job_id,
        approvals=approvals(plan, [a, b]),
        job_token=job.token,
        log_position=HARNESS_LOG.to_proto(),
    )
    with pytest.raises(grpc.RpcError) as info:
        enclave.stub.Execute(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The stage is interrupted: the job ends and its rows are dropped within seconds, not minutes.
    assert wait_for(lambda: enclave.job(job.job_id) is None and enclave.held_bytes == 0, timeout=20)

    small = [(1, "retail", 1.0), (2, "retail", 2.0)]
    a, b = make_party("bank_a", loans_table(small)), make_party("bank_b", loans_table(small))
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    for p in (a, b):
        enclave.upload(job.seal(p))
    resp = job.execute(approvals(plan, [a, b]))
    table = pa.ipc.open_stream(resp.arrow_table).read_all()
    assert table.to_pylist() == [{"segment": "retail", "n": 2, "total": 6.0}]
