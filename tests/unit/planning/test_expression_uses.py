"""What an aggregate may compute (sealroom.planning.expressions): the single-query attacks of issue 14
that are a planning matter are refused with the rule that names them, and legitimate queries still
plan. Each query goes through the planner's own path (analyze, then check_uses with the owners'
policies), the path the agents and the enclave share."""

from __future__ import annotations

import pytest

from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.disclosure import check_uses
from sealroom.planning.sql import InputSpec, analyze, compile_stage, pushdown
from sealroom.policy import ColumnRule, DatasetPolicy, Dominance

CUSTOMERS = DatasetPolicy(
    privacy_unit="customer_id",
    min_group_size=5,
    dominance=Dominance(1, 80.0),
    columns={
        "customer_id": ColumnRule("join_key"),
        "age": ColumnRule("dimension"),
        "segment": ColumnRule("dimension"),
        "amount": ColumnRule("measure", ("count", "sum", "avg", "min", "max"), 0.0, 10_000.0),
        "secret_flag": ColumnRule("filter_only"),
    },
    default_role="forbidden",
)
ORDERS = DatasetPolicy(
    privacy_unit="customer_id",
    min_group_size=5,
    columns={
        "customer_id": ColumnRule("join_key"),
        "spend": ColumnRule("measure", ("sum", "avg", "max"), 0.0, 1_000.0),
        "weight": ColumnRule("measure", ("sum",), 0.0, 1.0),
    },
    default_role="forbidden",
)
POLICIES = {"bank.customers": CUSTOMERS, "shop.orders": ORDERS}
SCHEMAS = {
    "bank.customers": ["customer_id", "age", "segment", "amount", "secret_flag"],
    "shop.orders": ["customer_id", "spend", "weight"],
}
JOIN = "FROM bank.customers a JOIN shop.orders b ON a.customer_id = b.customer_id"


def check(sql: str) -> dict[str, dict[str, frozenset[str]]]:
    """The planner's checks of ``sql``: its analysis, then every owner's column rules."""
    an = analyze(sql, SCHEMAS)
    check_uses(an.uses, POLICIES, SCHEMAS)
    return {q: dict(cols) for q, cols in an.uses.items()}


# The attack table of issue 14, rows that one query's planning must refuse, and their neighbours.
CONSTANTS = [
    # offset past dominance: each other customer adds 1000, so the one aged 37 is no longer dominant
    "SELECT segment, SUM(CASE WHEN age = 37 THEN amount ELSE 1000 END) AS s FROM bank.customers GROUP BY segment",
    "SELECT segment, SUM(amount + 1000) AS s FROM bank.customers GROUP BY segment",
    "SELECT segment, SUM(1) AS n FROM bank.customers GROUP BY segment",
    "SELECT segment, SUM(amount * 2) AS s FROM bank.customers GROUP BY segment",
    "SELECT segment, MAX(CASE WHEN age = 37 THEN amount ELSE 5000 END) AS m FROM bank.customers GROUP BY segment",
    "SELECT segment, AVG(COALESCE(amount, 1000)) AS m FROM bank.customers GROUP BY segment",
    "SELECT segment, SUM(CASE WHEN age = 37 THEN 1 ELSE 0 END) AS n FROM bank.customers GROUP BY segment",
    "SELECT segment, SUM(amount + length('offset')) AS s FROM bank.customers GROUP BY segment",
    "SELECT segment, COUNT(DISTINCT CASE WHEN age = 37 THEN 1 ELSE 2 END) AS n FROM bank.customers GROUP BY segment",
    # ...also through a UNION ALL branch's projection, which stands where its column is used
    "SELECT segment, SUM(v) AS s FROM (SELECT segment, amount + 1000 AS v FROM bank.customers "
    "UNION ALL SELECT 'x' AS segment, spend AS v FROM shop.orders) u GROUP BY segment",
]


@pytest.mark.parametrize("sql", CONSTANTS)
def test_constants_smuggled_into_an_aggregate_are_refused(sql: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        check(sql)
    d = info.value.details
    assert d["rule"] == "aggregate_constant"
    assert d["suggestion"] in info.value.message and "COUNT(" in d["suggestion"]
    if "amount" in sql.split("FROM")[0] or "age" in sql.split("FROM")[0]:
        assert (d["party"], d["dataset"]) == ("bank", "customers") and d["column"] in ("amount", "age")


# (sql, column, use): the refusal names the column and the use its role does not allow
USES = [
    # join key as a filter: COUNT(*) next to COUNT(NULLIF(customer_id, x)) places one customer
    ("SELECT segment, COUNT(*) AS n, COUNT(NULLIF(customer_id, 100011)) AS m FROM bank.customers GROUP BY segment",
     "customer_id", "aggregate_filter"),
    ("SELECT segment, COUNT(CASE WHEN customer_id = 100011 THEN 1 END) AS m FROM bank.customers GROUP BY segment",
     "customer_id", "aggregate_filter"),
    ("SELECT segment, COUNT(DISTINCT customer_id % 2) AS m FROM bank.customers GROUP BY segment",
     "customer_id", "aggregate_filter"),
    # a filter-only column read out through a conditional aggregate
    ("SELECT COUNT(CASE WHEN age = 37 AND secret_flag = 1 THEN 1 END) AS n FROM bank.customers",
     "secret_flag", "aggregate_filter"),
    ("SELECT segment, SUM(CASE WHEN secret_flag = 1 THEN amount END) AS s FROM bank.customers GROUP BY segment",
     "secret_flag", "aggregate_filter"),
    ("SELECT segment, COUNT(NULLIF(secret_flag, 0)) AS n FROM bank.customers GROUP BY segment",
     "secret_flag", "aggregate:count"),  # and aggregate_filter: the first refused is named
    ("SELECT segment, SUM(v) AS s FROM (SELECT segment, CASE WHEN secret_flag = 1 THEN amount END AS v "
     "FROM bank.customers UNION ALL SELECT 'x' AS segment, spend AS v FROM shop.orders) u GROUP BY segment",
     "secret_flag", "aggregate_filter"),
    # error oracle: 1 // floor(amount / T) fails iff amount < T; any comparison on a measure is a filter
    ("SELECT SUM(1 // CAST(floor(amount / 4000) AS BIGINT)) AS s FROM bank.customers WHERE age = 37",
     "amount", "aggregate_filter"),
    ("SELECT segment, SUM(amount % 2) AS s FROM bank.customers GROUP BY segment", "amount", "aggregate_filter"),
    ("SELECT segment, SUM(round(amount, -3)) AS s FROM bank.customers GROUP BY segment", "amount",
     "aggregate_filter"),
    ("SELECT segment, SUM(CAST(amount AS DECIMAL(4, 0))) AS s FROM bank.customers GROUP BY segment", "amount",
     "aggregate_filter"),
    ("SELECT segment, SUM(LEAST(amount, 4000)) AS s FROM bank.customers GROUP BY segment", "amount",
     "aggregate_filter"),
    ("SELECT segment, COUNT(CASE WHEN amount > 4000 THEN 1 END) AS n FROM bank.customers GROUP BY segment",
     "amount", "aggregate_filter"),
    # a function of a dimension still reaches the aggregate's value: a dimension is not summed
    ("SELECT segment, SUM(CASE WHEN age = 37 THEN amount ELSE GREATEST(age, 1000) END) AS s "
     "FROM bank.customers GROUP BY segment", "age", "aggregate:sum"),
    # another party's column weighting, or offsetting, single rows
    (f"SELECT a.segment, SUM(a.amount * b.weight) AS s {JOIN} GROUP BY a.segment", "amount", "aggregate_combined"),
    (f"SELECT a.segment, MAX(a.amount + b.spend) AS s {JOIN} GROUP BY a.segment", "amount", "aggregate_combined"),
    (f"SELECT a.segment, AVG(GREATEST(a.amount, b.spend)) AS s {JOIN} GROUP BY a.segment", "amount",
     "aggregate_filter"),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "column", "use"), USES)
def test_value_revealing_uses_are_checked_as_what_they_are(sql: str, column: str, use: str) -> None:
    with pytest.raises(PolicyRefusalError) as info:
        check(sql)
    d = info.value.details
    named = (d["party"], d["dataset"], d["column"], d["rule"], d["use"])
    assert named == ("bank", "customers", column, "column_role", use)
    assert d["suggestion"] and d["suggestion"] in info.value.message
    assert "100011" not in d["suggestion"]


def test_a_filter_only_column_is_told_to_move_to_where_which_stays_allowed() -> None:
    with pytest.raises(PolicyRefusalError) as info:
        check("SELECT COUNT(CASE WHEN age = 37 AND secret_flag = 1 THEN 1 END) AS n FROM bank.customers")
    assert "into WHERE" in info.value.details["suggestion"]
    uses = check("SELECT COUNT(CASE WHEN age = 37 THEN 1 END) AS n FROM bank.customers WHERE secret_flag = 1")
    assert uses["bank.customers"] == {"age": {"aggregate_filter"}, "secret_flag": {"filter"}}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT segment, SUM(amount) AS s FROM bank.customers GROUP BY segment",
         {"segment": {"group"}, "amount": {"aggregate:sum"}}),
        ("SELECT segment, SUM(CASE WHEN age > 30 THEN amount END) AS s FROM bank.customers GROUP BY segment",
         {"segment": {"group"}, "age": {"aggregate_filter"}, "amount": {"aggregate:sum"}}),
        ("SELECT age, COUNT(CASE WHEN segment = 'x' THEN 1 END) AS n FROM bank.customers GROUP BY age",
         {"age": {"group"}, "segment": {"aggregate_filter"}}),
        ("SELECT segment, SUM(CASE WHEN age > 30 THEN amount ELSE 0 END) AS s, SUM(COALESCE(amount, 0)) AS t, "
         "AVG(CAST(amount AS DOUBLE)) AS m, SUM(-amount) AS neg, SUM(NULL) AS z FROM bank.customers GROUP BY segment",
         {"segment": {"group"}, "age": {"aggregate_filter"}, "amount": {"aggregate:sum", "aggregate:avg"}}),
        ("SELECT segment, COUNT(*) AS n, COUNT(1) AS m, COUNT(DISTINCT customer_id) AS c, COUNT(amount) AS k "
         "FROM bank.customers GROUP BY segment",
         {"segment": {"group"}, "customer_id": {"aggregate:count_distinct"}, "amount": {"aggregate:count"}}),
        (f"SELECT a.segment, AVG(a.amount) AS m, SUM(a.amount + b.spend) AS t, MAX(b.spend) AS top {JOIN} "
         "GROUP BY a.segment",
         {"segment": {"group"}, "customer_id": {"join"}, "amount": {"aggregate:avg", "aggregate:sum"}}),
        # arithmetic on the released aggregates, outside them, does not reach any row
        ("SELECT segment, 2 * SUM(amount) + 1000 AS s FROM bank.customers GROUP BY segment",
         {"segment": {"group"}, "amount": {"aggregate:sum"}}),
    ],
)  # fmt: skip
def test_legitimate_queries_still_plan(sql: str, expected: dict[str, set[str]]) -> None:
    assert check(sql)["bank.customers"] == expected


def test_the_enclaves_compilation_and_the_parties_pushdown_derive_the_same_uses() -> None:
    """The enclave (compile_stage, over what it receives) and each party (pushdown, over the plan's
    declared columns) resolve the SQL with the same code, so the refusals are the same."""
    spec = InputSpec("bank.customers", "t0", ("customer_id", "age", "segment", "amount"), "customer_id")
    offset = CONSTANTS[0]
    with pytest.raises(InvalidQueryError, match="constant 1000"):
        compile_stage(offset, [spec])
    with pytest.raises(InvalidQueryError, match="constant 1000"):
        pushdown(offset, {"bank.customers": (spec.columns, ())})
    nullif = USES[0][0]
    assert compile_stage(nullif, [spec]).uses["bank.customers"]["customer_id"] == {
        "aggregate:count",
        "aggregate_filter",
    }


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT segment, MAX(amount, 3) AS top FROM bank.customers GROUP BY segment",  # DuckDB: the top 3 rows
        "SELECT segment, SUM(amount) FILTER (WHERE age = 37) AS s FROM bank.customers GROUP BY segment",
    ],
)
def test_aggregate_forms_that_are_not_supported_say_what_to_write(sql: str) -> None:
    with pytest.raises(InvalidQueryError, match=r"write (MAX\(x\)|the condition in a CASE)"):
        check(sql)
