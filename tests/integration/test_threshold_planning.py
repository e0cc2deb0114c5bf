"""Issue 14, threshold mode hardened, the planning side, through real servers on 127.0.0.1: the
single-query attacks that one query's SQL carries (an offset past dominance, a join key used as a
filter through NULLIF, a filter-only column read out through a conditional aggregate, the error
oracle of ``//`` and ``floor``) are refused to the analyst by ``explain`` and ``submit``, with the
rule and the change to make and no value of the data; a legitimate query still runs. And an
enclave refuses a plan carrying such SQL even when the coordinator's planner is bypassed: it
re-derives the column uses from the plan's SQL with the same code (``enclave_worker.admission``).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError, PolicyRefusalError, SealroomError
from sealroom.planning.plan import Plan
from sealroom.policy import ColumnRule, DatasetPolicy, Dominance
from tests.harness.enclave import EnclaveHandle, loans_table, make_party, make_plan, rejection

pytestmark = pytest.mark.slow

SECRET_AMOUNT = 4321.5  # the one customer aged 37

POLICY = DatasetPolicy(
    privacy_unit="customer_id",
    min_group_size=5,
    dominance=Dominance(1, 80.0),
    columns={
        "customer_id": ColumnRule("join_key"),
        "age": ColumnRule("dimension"),
        "segment": ColumnRule("dimension"),
        "amount": ColumnRule("measure", ("count", "sum", "avg"), 0.0, 10_000.0),
        "secret_flag": ColumnRule("filter_only"),
    },
    default_role="forbidden",
)
SEGMENTS = ("retail", "sme", "corporate", "private")

# (attack, SQL, error type, rule, column, use)
ATTACKS = [
    ("offset past dominance",
     "SELECT segment, SUM(CASE WHEN age = 37 THEN amount ELSE 1000 END) AS s FROM bank_a.customers GROUP BY segment",
     InvalidQueryError, "aggregate_constant", "amount", None),
    ("join key as a filter",
     "SELECT segment, COUNT(*) AS n, COUNT(NULLIF(customer_id, 100011)) AS m FROM bank_a.customers GROUP BY segment",
     PolicyRefusalError, "column_role", "customer_id", "aggregate_filter"),
    ("filter-only column read out",
     "SELECT COUNT(CASE WHEN age = 37 AND secret_flag = 1 THEN 1 END) AS n FROM bank_a.customers",
     PolicyRefusalError, "column_role", "secret_flag", "aggregate_filter"),
    ("error oracle",
     "SELECT SUM(1 // CAST(floor(amount / 4000) AS BIGINT)) AS s FROM bank_a.customers WHERE age = 37",
     PolicyRefusalError, "column_role", "amount", "aggregate_filter"),
]  # fmt: skip


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("threshold_planning")
    ids = list(range(100_000, 100_060))
    ages = [25 + (i * 7) % 50 for i in range(60)]
    ages = [a if a != 37 else 38 for a in ages]
    ages[11] = 37
    amounts = [1000.0 + 10 * i for i in range(60)]
    amounts[11] = SECRET_AMOUNT
    table = pa.table(
        {
            "customer_id": pa.array(ids, pa.int64()),
            "age": pa.array(ages, pa.int64()),
            "segment": [SEGMENTS[i % 4] for i in range(60)],
            "amount": pa.array(amounts, pa.float64()),
            "secret_flag": pa.array([i % 2 for i in range(60)], pa.int64()),
        }
    )
    pq.write_table(table, d / "customers.parquet")
    state = d / "state"
    state.mkdir()
    parties = [PartySpec("bank_a", (DatasetSpec("customers", str(d / "customers.parquet"), POLICY),))]
    with Cluster(state, parties) as cluster:
        yield cluster


def _assert_refusal(err: SealroomError, kind: type, rule: str, column: str, use: str | None) -> None:
    assert isinstance(err, kind)
    d = err.details
    assert (d["party"], d["dataset"], d["column"], d["rule"]) == ("bank_a", "customers", column, rule)
    if use is not None:
        assert d["use"] == use
    assert d["suggestion"] and d["suggestion"] in err.message  # what to change, in the message
    for value in (str(SECRET_AMOUNT), "4321"):
        assert value not in err.message and value not in str(d)


@pytest.mark.parametrize(("attack", "sql", "kind", "rule", "column", "use"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_the_analyst_gets_the_refusal_from_explain_and_submit(
    platform: Cluster, attack: str, sql: str, kind: type, rule: str, column: str, use: str | None
) -> None:
    with platform.client() as client:
        with pytest.raises(SealroomError) as info:
            client.explain(sql)
        _assert_refusal(info.value, kind, rule, column, use)
        handle = client.submit(sql)
        with pytest.raises(SealroomError) as info:
            handle.result(60)
        _assert_refusal(info.value, kind, rule, column, use)
        assert [q["status"] for q in client.queries() if q["query_id"] == handle.query_id] == ["refused"]


def test_a_legitimate_query_with_a_filter_only_condition_in_where_still_runs(platform: Cluster) -> None:
    sql = (
        "SELECT segment, COUNT(*) AS n, SUM(amount) AS s, COUNT(CASE WHEN age > 50 THEN 1 END) AS older "
        "FROM bank_a.customers WHERE secret_flag = 1 GROUP BY segment ORDER BY segment"
    )
    with platform.client() as client:
        rows = client.run(sql, timeout=120).to_arrow().to_pylist()
    # The conditional count is a sub-cell: it and the rest of its cell both hold k customers or more
    # (age > 30 would leave fewer than 5 younger ones, and the cell would be suppressed).
    # odd customers only: segments sme and private, 15 customers each
    assert [(r["segment"], r["n"]) for r in rows] == [("private", 15), ("sme", 15)]


# --------------------------------------------------------------------------------------------------
# the enclave, when the planner is bypassed

ENCLAVE_POLICY = DatasetPolicy(
    privacy_unit="customer_id",
    min_group_size=2,
    columns={
        "customer_id": ColumnRule("join_key"),
        "segment": ColumnRule("dimension"),
        "exposure": ColumnRule("measure", ("count", "sum", "avg"), 0.0, 10_000.0),
    },
    default_role="forbidden",
)
LEGIT = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"


def _crafted(plan: Plan, sql: str) -> bytes:
    """``plan`` with ``sql`` in place of the SQL the planner checked (as a coordinator could send it)."""
    doc = plan.to_dict()
    doc["sql"] = sql
    doc["stages"][0]["sql"] = sql
    return canonical_json(doc)


@pytest.mark.parametrize(
    ("sql", "status", "rule", "column"),
    [
        ("SELECT segment, COUNT(*) AS n, SUM(CASE WHEN segment = 'a' THEN exposure ELSE 1000 END) AS total "
         "FROM bank_a.loans GROUP BY segment", grpc.StatusCode.INVALID_ARGUMENT, "aggregate_constant", "exposure"),
        ("SELECT segment, COUNT(*) AS n, COUNT(NULLIF(customer_id, 100011)) AS total FROM bank_a.loans "
         "GROUP BY segment", grpc.StatusCode.PERMISSION_DENIED, "column_role", "customer_id"),
        ("SELECT segment, COUNT(*) AS n, SUM(1 // CAST(floor(exposure / 4000) AS BIGINT)) AS total "
         "FROM bank_a.loans GROUP BY segment", grpc.StatusCode.PERMISSION_DENIED, "column_role", "exposure"),
    ],
)  # fmt: skip
def test_an_enclave_refuses_a_plan_carrying_such_sql_when_the_planner_is_bypassed(
    enclave: EnclaveHandle, sql: str, status: grpc.StatusCode, rule: str, column: str
) -> None:
    a = make_party(
        "bank_a", loans_table([(i, "a" if i % 2 else "b", 100.0 + i) for i in range(20)]), policy=ENCLAVE_POLICY
    )
    with pytest.raises((InvalidQueryError, PolicyRefusalError)):
        make_plan(sql, [a])  # the planner refuses...
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(_crafted(make_plan(LEGIT, [a]), sql))  # ...and so does the enclave, on its own
    rej = rejection(info.value)
    assert rej.status == status
    assert (rej.error.details["rule"], rej.error.details["column"]) == (rule, column)
    assert enclave.registry is not None and not enclave.registry._jobs
