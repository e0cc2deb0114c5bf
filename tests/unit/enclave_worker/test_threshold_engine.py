"""Threshold mode, hardened, in the engine (issue 14): the single-query attacks of the issue's table
run through ``compile_for_job`` + ``run_stage`` on real DuckDB, on the issue's data shape: 60
customers, exactly one aged 37 (amount 4321.50), k = 5, dominance n = 1 / k = 80, amount clamped
to [0, 10000].

Each attack is suppressed (or gives no value of the aged-37 customer); legitimate queries release
what plain DuckDB computes.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from enclave_worker.engine import compile_for_job, public_group_keys, run_stage
from sealroom.errors import InvalidQueryError
from sealroom.planning.sql import InputSpec
from sealroom.policy import DatasetPolicy, Dominance
from sealroom.policy_roles import ColumnRule

SECRET = 4321.50
TARGET = 100011  # the one customer aged 37
COLUMNS = ("customer_id", "age", "segment", "amount", "secret_flag")
A = InputSpec("shop_a.customers", "t0", COLUMNS, "customer_id")
B = InputSpec("shop_b.customers", "t1", COLUMNS, "customer_id")
K = 5
DOMINANCE = Dominance(1, 80.0)
CLAMPS = {"t0": {"amount": (0.0, 10000.0)}, "t1": {"amount": (0.0, 10000.0)}}
SEGMENTS = ("north", "south", "east", "west")
# Ages other than 37: 30/40/50 are common; 61 and 62 are rare (2 customers each).
AGES = [30, 40, 50]


def customers() -> pa.Table:
    rows = []
    for i in range(60):
        cid = 100000 + i
        if cid == TARGET:
            age, amount = 37, SECRET
        elif i in (20, 21):
            age, amount = 61, 150.0 + i
        elif i in (22, 23):
            age, amount = 62, 170.0 + i
        else:
            age, amount = AGES[i % 3], 100.0 + i
        rows.append((cid, age, SEGMENTS[i % 4], amount, i % 2))
    return _table(rows)


def fakes() -> pa.Table:
    """Another party's 4 invented customers, all aged 37, with amounts it knows."""
    return _table([(900000 + i, 37, "north", 5000.0, 0) for i in range(4)])


def _table(rows) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.int64()),
            "age": pa.array([r[1] for r in rows], pa.int64()),
            "segment": pa.array([r[2] for r in rows], pa.string()),
            "amount": pa.array([r[3] for r in rows], pa.float64()),
            "secret_flag": pa.array([r[4] for r in rows], pa.int64()),
        }
    )


def run(sql, *, specs=(A,), tables=None, public_keys=None):
    tables = tables or {"t0": customers()}
    return run_stage(
        compile_for_job(sql, list(specs)),
        tables,
        min_group_size=K,
        rule_datasets=[s.qualified for s in specs],
        clamps=CLAMPS,
        dominance={s.qualified: DOMINANCE for s in specs},
        public_keys=public_keys,
    )


def released_values(outcome) -> list[float]:
    return [v for row in outcome.released.to_pylist() for v in row.values() if isinstance(v, int | float)]


def assert_no_secret(outcome) -> None:
    """No released number is, or differs from another released number of its row by, the secret."""
    assert SECRET not in released_values(outcome)
    for row in outcome.released.to_pylist():
        nums = [v for v in row.values() if isinstance(v, int | float) and v is not None]
        assert all(abs(abs(x - y) - SECRET) > 1e-6 for x in nums for y in nums), row
    text = str(outcome.suppressed)
    assert "4321" not in text and str(TARGET) not in text and "37" not in text


def plain(sql: str, tables: dict[str, pa.Table]) -> list[dict]:
    con = duckdb.connect()
    for name, t in tables.items():
        con.register(name, t)
    return con.sql(sql).to_arrow_table().to_pylist()


# --------------------------------------------------------------------------------------------------
# the attacks

UNION = (
    "SELECT u.age, SUM(u.amount) AS s, COUNT(*) AS n FROM (SELECT age, amount FROM shop_a.customers "
    "UNION ALL SELECT age, amount FROM shop_b.customers) u WHERE u.age = 37 GROUP BY u.age"
)
DIFFERENCING = (
    "SELECT segment, SUM(amount) AS s_all, SUM(CASE WHEN age <> 37 THEN amount END) AS s_rest "
    "FROM shop_a.customers GROUP BY segment"
)
DIFFERENCING_ELSE_0 = (
    "SELECT segment, SUM(amount) AS s_all, SUM(CASE WHEN age <> 37 THEN amount ELSE 0 END) AS s_rest "
    "FROM shop_a.customers GROUP BY segment"
)
NULLIF_KEY = (
    f"SELECT segment, COUNT(*) AS n, COUNT(NULLIF(customer_id, {TARGET})) AS n_rest FROM shop_a.customers "
    "GROUP BY segment"
)
OFFSET = "SELECT segment, SUM(CASE WHEN age = 37 THEN amount ELSE 1000 END) AS s FROM shop_a.customers GROUP BY segment"
FILTER_ONLY_READ = (
    "SELECT segment, COUNT(CASE WHEN age = 37 AND secret_flag = 1 THEN 1 END) AS c FROM shop_a.customers "
    "GROUP BY segment"
)
TARGET_SEGMENT = SEGMENTS[(TARGET - 100000) % 4]


def test_the_offset_past_dominance_is_refused_before_it_runs():
    """The planning rule (sealroom/planning/expressions.py) refuses the constant wherever the SQL is
    compiled, the enclave's own compilation included; the engine's dominance check, which weighs
    each unit without constants, stays behind it."""
    with pytest.raises(InvalidQueryError, match="constant 1000"):
        run(OFFSET, specs=(A,), tables={"t0": customers()})


@pytest.mark.parametrize(
    ("name", "sql", "rule"),
    [
        ("fake customers in a UNION ALL", UNION, "min_group_size"),
        ("in-query differencing", DIFFERENCING, "sub_cell"),
        ("in-query differencing, ELSE 0", DIFFERENCING_ELSE_0, "sub_cell"),
        ("join key as a filter (NULLIF)", NULLIF_KEY, "sub_cell"),
        ("filter-only column read out", FILTER_ONLY_READ, "sub_cell"),
    ],
)
def test_single_query_attacks_are_suppressed(name, sql, rule):
    tables = {"t0": customers(), "t1": fakes()}
    specs = (A, B) if "shop_b" in sql else (A,)
    out = run(sql, specs=specs, tables=tables)
    assert_no_secret(out)
    assert rule in {s["rule"] for s in out.suppressed}, (name, out.suppressed)
    # The aged-37 customer's cell is withheld; the other cells of a GROUP BY segment query are
    # released as plain DuckDB computes them (their sub-cells have no unit outside, or k and more).
    if "GROUP BY segment" in sql:
        assert TARGET_SEGMENT not in out.released["segment"].to_pylist()
        assert len(out.suppressed) == 1 and out.released.num_rows == 3


@pytest.mark.parametrize(
    "sql",
    [
        # Each sub-cell and its complement hold 5 units or more; their difference is the aged-37 unit.
        "SELECT segment, SUM(CASE WHEN age >= 37 THEN amount END) AS a, "
        "SUM(CASE WHEN age >= 38 THEN amount END) AS b FROM shop_a.customers GROUP BY segment",
        "SELECT segment, COUNT(CASE WHEN age IN (30, 37) THEN 1 END) AS a, "
        "COUNT(CASE WHEN age = 30 THEN 1 END) AS b FROM shop_a.customers GROUP BY segment",
    ],
)
def test_two_sub_cells_that_differ_by_one_unit_are_suppressed(sql):
    out = run(sql)
    assert TARGET_SEGMENT not in out.released["segment"].to_pylist()
    assert all(r["a"] == r["b"] for r in out.released.to_pylist())  # no released cell holds the unit
    assert_no_secret(out)
    assert {s["rule"] for s in out.suppressed} == {"sub_cell"}


def test_more_conditions_than_checked_parts_are_refused():
    conditions = ", ".join(f"COUNT(CASE WHEN age > {30 + i} THEN 1 END) AS c{i}" for i in range(7))
    with pytest.raises(InvalidQueryError, match="conditional aggregates"):
        run(f"SELECT segment, {conditions} FROM shop_a.customers GROUP BY segment")


def test_the_union_reason_names_the_dataset_whose_units_fall_short():
    out = run(UNION, specs=(A, B), tables={"t0": customers(), "t1": fakes()})
    (entry,) = out.suppressed
    assert entry["rule"] == "min_group_size" and "customer_id of shop_a.customers in this cell" in entry["reason"]


def test_a_union_of_datasets_that_each_reach_k_is_released():
    # Each dataset contributes 5 distinct units aged 37 (its own): every count reaches k.
    a = _table([(i, 37, "x", 100.0 + i, 0) for i in range(5)])
    b = _table([(50 + i, 37, "x", 200.0 + i, 0) for i in range(5)])
    out = run(UNION, specs=(A, B), tables={"t0": a, "t1": b})
    assert out.suppressed == []
    assert out.released.to_pylist() == [{"age": 37, "s": sum(100.0 + i for i in range(5)) + 1010.0, "n": 10}]


def test_a_union_branch_that_does_not_contribute_to_a_cell_does_not_block_it():
    a = _table([(i, 30, "x", 10.0, 0) for i in range(6)])
    b = _table([(50 + i, 40, "x", 20.0, 0) for i in range(6)])
    sql = UNION.replace(" WHERE u.age = 37", "")
    out = run(sql, specs=(A, B), tables={"t0": a, "t1": b})
    assert sorted(out.released.to_pylist(), key=lambda r: r["age"]) == [
        {"age": 30, "s": 60.0, "n": 6},
        {"age": 40, "s": 120.0, "n": 6},
    ]


def test_dominance_is_judged_on_each_datasets_own_units_in_a_union():
    # Five real units in the cell, one of which holds ~96 % of shop_a's part; shop_b's many small
    # rows would dilute it below 80 % if dominance were computed over the union.
    a = _table([(1, 37, "x", 9000.0, 0)] + [(2 + i, 37, "x", 90.0, 0) for i in range(4)])
    b = _table([(50 + i, 37, "x", 500.0, 0) for i in range(10)])
    out = run(UNION, specs=(A, B), tables={"t0": a, "t1": b})
    assert out.released.num_rows == 0
    (entry,) = out.suppressed
    assert entry["rule"] == "dominance" and "of shop_a.customers" in entry["reason"]


@pytest.mark.parametrize("threshold", [1000.0, 4321.0, 4322.0, 9000.0])
def test_the_error_oracle_gives_the_same_outcome_whatever_the_amount(threshold):
    # amount >= T: floor(amount / T) >= 1 and 1 // it is fine; amount < T: 1 // 0 raised on main.
    for sql in (
        f"SELECT SUM(1 // CAST(floor(amount / {threshold}) AS BIGINT)) AS s FROM shop_a.customers WHERE age = 37",
        f"SELECT segment, SUM(1 // CAST(floor(amount / {threshold}) AS BIGINT)) AS s FROM shop_a.customers "
        "WHERE age = 37 GROUP BY segment",
        f"SELECT segment, COUNT(*) AS n FROM shop_a.customers WHERE 1 // CAST(floor(amount / {threshold}) AS BIGINT) "
        "= 1 OR age <> 37 GROUP BY segment",
    ):
        out = run(sql)
        if "WHERE age = 37" in sql:
            assert out.released.num_rows == 0
            assert [s["rule"] for s in out.suppressed] == ["min_group_size"]
        else:  # the errors are NULL rows: the 37 row is or is not counted, but no error either way
            assert out.released.num_rows + len(out.suppressed) == 4


def test_post_aggregate_division_by_zero_is_null_not_an_error():
    sql = (
        "SELECT segment, SUM(amount) // (COUNT(*) - COUNT(*)) AS q, COUNT(*) % 0 AS r FROM shop_a.customers "
        "GROUP BY segment"
    )
    out = run(sql)
    assert out.released.num_rows == 4
    assert {(r["q"], r["r"]) for r in out.released.to_pylist()} == {(None, None)}


@pytest.mark.parametrize("threshold", [4000, 4400])
def test_an_overflow_over_aggregates_is_null_not_an_error(threshold):
    # COUNT(*) * big overflows iff the count is above a threshold: on main an error oracle on a
    # suppressed cell's count (or a SUM's value); here the output is NULL and the cell suppressed.
    big = 2**63 // 2
    for sql in (
        f"SELECT segment, COUNT(*) * {big} AS c, CAST(SUM(amount) AS TINYINT) AS s FROM shop_a.customers "
        "WHERE age = 37 GROUP BY segment",
        f"SELECT segment, CAST(SUM(amount) - {threshold} AS UTINYINT) AS s FROM shop_a.customers WHERE age = 37 "
        "GROUP BY segment",
    ):
        out = run(sql)
        assert out.released.num_rows == 0 and [s["rule"] for s in out.suppressed] == ["min_group_size"]
    out = run(f"SELECT segment, COUNT(*) * {big} AS c, COUNT(*) * 2 AS c2 FROM shop_a.customers GROUP BY segment")
    assert {(r["c"], r["c2"]) for r in out.released.to_pylist()} <= {(None, 30), (None, 28)}


def test_expressions_over_aggregates_keep_their_values_and_group_positions():
    sql = (
        "SELECT SUM(amount) / COUNT(*) AS mean, segment, CAST(COUNT(*) AS VARCHAR) || '!' AS label "
        "FROM shop_a.customers WHERE age <> 37 GROUP BY 2 HAVING SUM(amount) // COUNT(*) > 0"
    )
    out = run(sql)
    expected = plain(sql.replace("shop_a.customers", "t0"), {"t0": customers()})
    assert sorted(out.released.to_pylist(), key=lambda r: r["segment"]) == sorted(expected, key=lambda r: r["segment"])
    assert out.released.column_names == ["mean", "segment", "label"]


def test_an_implicit_cast_that_fails_on_some_rows_is_null_for_those_rows():
    # segment = 5 casts segment to a number: it fails on every row on main, here it matches none.
    out = run("SELECT COUNT(*) AS n FROM shop_a.customers WHERE segment = 5")
    assert out.released.num_rows == 0 and [s["rule"] for s in out.suppressed] == ["min_group_size"]


GROUP_BY_AGE = "SELECT age, COUNT(*) AS n FROM shop_a.customers GROUP BY age"


def test_suppressed_cells_without_a_public_domain_are_counted_not_listed():
    out = run(GROUP_BY_AGE)
    assert sorted(r["age"] for r in out.released.to_pylist()) == [30, 40, 50]
    assert out.suppressed == [{"group": None, "rule": "min_group_size", "reason": out.suppressed[0]["reason"]}] * 3


@pytest.mark.parametrize(
    "rule",
    [ColumnRule("dimension", values=(30, 37, 40, 50, 61, 62)), ColumnRule("dimension", bins=(30, 37, 40, 50, 61, 62))],
)
def test_suppressed_cells_with_a_public_domain_are_listed_by_key(rule):
    policy = DatasetPolicy(privacy_unit="customer_id", columns={"age": rule})
    compiled = compile_for_job(GROUP_BY_AGE, [A])
    keys = public_group_keys(compiled, {A.qualified: policy})
    assert keys == {"age": frozenset({30, 37, 40, 50, 61, 62})}
    out = run(GROUP_BY_AGE, public_keys=keys)
    assert [s["group"] for s in out.suppressed] == [{"age": 37}, {"age": 61}, {"age": 62}]
    # A key outside the declared domain is not listed.
    narrow = {"age": frozenset({30, 40, 50, 61, 62})}
    assert [s["group"] for s in run(GROUP_BY_AGE, public_keys=narrow).suppressed] == [{"age": 61}, {"age": 62}, None]


def test_a_computed_group_key_has_no_public_domain():
    compiled = compile_for_job("SELECT age + 0 AS a, COUNT(*) FROM shop_a.customers GROUP BY age + 0", [A])
    policy = DatasetPolicy(privacy_unit="customer_id", columns={"age": ColumnRule("dimension", values=(37,))})
    assert public_group_keys(compiled, {A.qualified: policy}) == {}


# --------------------------------------------------------------------------------------------------
# legitimate queries release what plain DuckDB computes


def test_a_conditional_aggregate_whose_complement_is_small_is_suppressed():
    # Segment south: 4 customers younger than 40, west: 4 aged 50 and more (sub-cell or complement).
    sql = (
        "SELECT segment, SUM(CASE WHEN age >= 40 THEN amount END) AS s_old FROM shop_a.customers "
        "WHERE age <> 37 GROUP BY segment"
    )
    out = run(sql)
    assert sorted(out.released["segment"].to_pylist()) == ["east", "north", "west"]
    assert [s["rule"] for s in out.suppressed] == ["sub_cell"]


@pytest.mark.parametrize(
    ("sql", "reference"),
    [
        (
            "SELECT segment, COUNT(*) AS n, SUM(amount) AS s, AVG(amount) AS a FROM shop_a.customers "
            "WHERE age <> 37 GROUP BY segment",
            "SELECT segment, COUNT(*) AS n, SUM(amount) AS s, AVG(amount) AS a FROM t0 WHERE age <> 37 "
            "GROUP BY segment",
        ),
        (
            # Sub-cells of 9 to 11 customers, complements of 4 to 6: segments north and east pass.
            "SELECT segment, SUM(CASE WHEN age >= 40 THEN amount END) AS s_old, "
            "COUNT(CASE WHEN age < 40 THEN 1 END) AS n_young FROM shop_a.customers WHERE age <> 37 "
            "AND segment IN ('north', 'east') GROUP BY segment",
            "SELECT segment, SUM(CASE WHEN age >= 40 THEN amount END) AS s_old, "
            "COUNT(CASE WHEN age < 40 THEN 1 END) AS n_young FROM t0 WHERE age <> 37 "
            "AND segment IN ('north', 'east') GROUP BY segment",
        ),
        (
            "SELECT age, COUNT(*) AS n, SUM(amount) AS s FROM shop_a.customers WHERE age IN (30, 40, 50) GROUP BY age",
            "SELECT age, COUNT(*) AS n, SUM(amount) AS s FROM t0 WHERE age IN (30, 40, 50) GROUP BY age",
        ),
    ],
)
def test_legitimate_queries_release_the_same_values(sql, reference):
    out = run(sql)
    key = next(iter(out.released.column_names))
    assert out.suppressed == []
    expected = sorted(plain(reference, {"t0": customers()}), key=lambda r: r[key])
    got = sorted(out.released.to_pylist(), key=lambda r: r[key])
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for c in g:
            assert g[c] == pytest.approx(e[c]), (c, g, e)


def test_a_join_of_keys_of_different_types_never_fails_on_a_value():
    # shop_b's keys are text, one of them not a number: comparing it with a BIGINT key raised a
    # conversion error on main, whichever customer it belongs to; here it matches nothing.
    text_keys = InputSpec("shop_b.customers", "t1", ("customer_id", "segment"), "customer_id")
    keys = [str(100000 + i) for i in range(59)] + ["not-a-number"]
    b = pa.table({"customer_id": keys, "segment": ["x"] * 60})
    sql = (
        "SELECT a.segment, COUNT(*) AS n FROM shop_a.customers a JOIN shop_b.customers b "
        "ON a.customer_id = b.customer_id GROUP BY a.segment"
    )
    out = run(sql, specs=(A, text_keys), tables={"t0": customers(), "t1": b})
    assert sorted((r["segment"], r["n"]) for r in out.released.to_pylist()) == [
        ("east", 15),
        ("north", 15),
        ("south", 15),
        ("west", 14),
    ]
