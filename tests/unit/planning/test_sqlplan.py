"""The SQL analysis shared by the planner and the enclave: what runs, what is refused, what is read."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_worker.engine import compile_for_job, run_stage
from sealroom.errors import InvalidQueryError
from sealroom.planning.sql import InputSpec, analyze, compile_stage

BANK_COLS = ["customer_id", "segment", "rating", "exposure", "defaulted"]
SCHEMAS = {f"bank_{x}.loans": BANK_COLS for x in "abc"}
HOSP = {f"h{i}.stays": ["patient_id", "diagnosis", "age", "cost"] for i in (1, 2, 3)}

JOIN = """SELECT a.segment, a.rating, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total
FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id
GROUP BY a.segment, a.rating ORDER BY total DESC LIMIT 3"""


def test_join_analysis_projects_only_needed_columns():
    an = analyze(JOIN, SCHEMAS)
    assert an.datasets == ("bank_a.loans", "bank_b.loans")
    assert an.needed_columns == {
        "bank_a.loans": ("customer_id", "segment", "rating", "exposure"),
        "bank_b.loans": ("customer_id", "exposure"),
    }
    assert an.output_columns == ("segment", "rating", "n", "total")
    assert an.group_columns == ("segment", "rating")
    assert an.aggregates == ("COUNT", "SUM")
    assert [(k.column, k.descending) for k in an.order_by] == [("total", True)]
    assert an.limit == 3


def test_union_analysis_expands_star_to_needed_columns_only():
    sql = (
        "SELECT diagnosis, COUNT(*), AVG(age) FROM (SELECT * FROM h1.stays UNION ALL SELECT * FROM h2.stays "
        "WHERE cost > 10) u GROUP BY diagnosis"
    )
    an = analyze(sql, HOSP)
    # cost is read only by h2's own WHERE, which h2 applies itself (filter pushdown): it is not sent.
    assert an.needed_columns == {"h1.stays": ("diagnosis", "age"), "h2.stays": ("diagnosis", "age")}
    assert an.filters == {"h1.stays": None, "h2.stays": '"cost" > 10'}
    assert an.output_columns == ("diagnosis", "count(*)", "avg(age)")


def test_group_by_output_alias_and_position():
    sql = (
        "SELECT CASE WHEN age < 40 THEN 'young' ELSE 'old' END AS band, COUNT(*) FROM h1.stays GROUP BY band ORDER BY 1"
    )
    an = analyze(sql, HOSP)
    assert an.group_columns == ("band",)
    an2 = analyze("SELECT diagnosis, COUNT(*) FROM h1.stays GROUP BY 1", HOSP)
    assert an2.group_columns == ("diagnosis",)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT * FROM bank_a.loans", "would output rows"),
        ("SELECT customer_id, exposure FROM bank_a.loans", "row-level values"),
        ("SELECT segment, exposure, COUNT(*) FROM bank_a.loans GROUP BY segment", "exposure.*neither aggregated"),
        ("SELECT DISTINCT segment FROM bank_a.loans", "DISTINCT"),
        ("SELECT MEDIAN(exposure) FROM bank_a.loans", "MEDIAN.*not supported"),
        ("SELECT SUM(MAX(exposure)) FROM bank_a.loans", "nested"),
        (
            "SELECT COUNT(*) FROM bank_a.loans a LEFT JOIN bank_b.loans b ON a.customer_id = b.customer_id",
            "only inner joins",
        ),
        ("SELECT COUNT(*) FROM bank_a.loans a CROSS JOIN bank_b.loans b", "only inner joins"),
        ("SELECT COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.exposure > b.exposure", "equalities"),
        ("SELECT COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b USING (customer_id)", "USING"),
        ("SELECT COUNT(*) FROM bank_x.loans", "unknown dataset bank_x.loans"),
        ("SELECT COUNT(*) FROM loans", "party.dataset"),
        ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "does not name a party dataset"),
        ("SELECT SUM(salary) FROM bank_a.loans", "no dataset in FROM has a column salary"),
        (
            "SELECT segment, COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
            "GROUP BY segment",
            "ambiguous",
        ),
        ("DELETE FROM bank_a.loans", "only SELECT"),
        ("SELECT COUNT(*) FROM bank_a.loans; SELECT 1", "exactly one"),
        ("SELEC COUNT(*) FROM bank_a.loans", "does not parse"),
        ("", "empty"),
        ("SELECT COUNT(*) FROM bank_a.loans UNION ALL SELECT COUNT(*) FROM bank_b.loans", "top level"),
        ("WITH x AS (SELECT * FROM bank_a.loans) SELECT COUNT(*) FROM x", "WITH"),
        ("SELECT segment, ROW_NUMBER() OVER () FROM bank_a.loans GROUP BY segment", "window"),
        ("SELECT segment, SUM(exposure) FROM bank_a.loans GROUP BY ROLLUP (segment)", "ROLLUP"),
        ("SELECT COUNT(*) FROM bank_a.loans WHERE exposure > (SELECT 1)", "subqueries"),
        ("SELECT COUNT(*) FROM bank_a.loans WHERE SUM(exposure) > 1", "HAVING"),
        (
            "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment ORDER BY exposure",
            "ORDER BY .*exposure must refer",
        ),
        ("SELECT COUNT(*) FROM bank_a.loans a JOIN bank_a.loans b ON a.customer_id = b.customer_id", "twice"),
        ("SELECT COUNT(*) FROM bank_a.loans LIMIT -1", "LIMIT"),
        ("SELECT COUNT(__sr_row) FROM bank_a.loans", "reserved"),
        (
            "SELECT COUNT(*) FROM (SELECT * FROM bank_a.loans UNION SELECT * FROM bank_b.loans) u",
            "UNION ALL, not UNION",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT segment FROM bank_a.loans UNION ALL SELECT rating FROM bank_b.loans) u",
            "same columns",
        ),
        ("SELECT COUNT(*) FROM (SELECT * FROM bank_a.loans) u", "UNION ALL of datasets"),
    ],
)
def test_refusals_say_what_to_change(sql, match):
    with pytest.raises(InvalidQueryError, match=match) as info:
        analyze(sql, SCHEMAS | HOSP)
    assert info.value.grpc_status.name == "INVALID_ARGUMENT"


def _inputs(an, units):
    return [
        InputSpec(
            d, f"t{i}", tuple(sorted(set(an.needed_columns[d]) | ({units[d]} if units.get(d) else set()))), units.get(d)
        )
        for i, d in enumerate(an.datasets)
    ]


def test_compile_adds_one_hidden_unit_count_per_from_item():
    an = analyze(JOIN, SCHEMAS)
    c = compile_stage(an.sql, _inputs(an, {"bank_a.loans": "customer_id", "bank_b.loans": None}))
    assert [u.unit for u in c.unit_checks] == ["customer_id", "rows"]
    assert 'COUNT(DISTINCT "a"."customer_id")' in c.aggregate_sql
    assert 'COUNT(DISTINCT "b"."__sr_row")' in c.aggregate_sql
    assert "ORDER BY" not in c.aggregate_sql and "LIMIT" not in c.aggregate_sql
    assert "bank_a" not in c.aggregate_sql  # engine tables only


def test_compile_refuses_what_the_analysis_refuses():
    """The enclave does not trust the planner: compiling a row-level query fails too."""
    spec = [InputSpec("bank_a.loans", "t0", ("customer_id", "exposure"), "customer_id")]
    with pytest.raises(InvalidQueryError, match="row-level"):
        compile_stage("SELECT customer_id, exposure FROM bank_a.loans", spec)


def _bank(rows):
    return pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.int64()),
            "segment": pa.array([r[1] for r in rows]),
            "exposure": pa.array([r[2] for r in rows], pa.float64()),
        }
    )


def test_engine_counts_units_not_rows_and_suppresses_without_values():
    # segment "x": one customer with 50 rows -> 1 unit; segment "y": 6 customers.
    rows = [(1, "x", 1000.0)] * 50 + [(10 + i, "y", 1.0) for i in range(6)]
    sql = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS s FROM bank_a.loans GROUP BY segment"
    spec = [InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")]
    compiled = compile_for_job(sql, spec)
    out = run_stage(
        compiled,
        {"t0": _bank(rows)},
        min_group_size=5,
        rule_datasets=["bank_a.loans"],
        public_keys={"segment": frozenset({"x", "y"})},
    )
    assert out.released.to_pylist() == [{"segment": "y", "n": 6, "s": 6.0}]
    assert [s["group"] for s in out.suppressed] == [{"segment": "x"}]
    assert "1000" not in str(out.suppressed) and "50" not in str(out.suppressed)


def test_having_and_limit_apply_to_released_cells_only():
    rows = [(i, "big", 1.0) for i in range(10)] + [(100, "tiny", 5_000.0)] + [(200 + i, "mid", 2.0) for i in range(7)]
    sql = (
        "SELECT segment, SUM(exposure) AS s FROM bank_a.loans GROUP BY segment HAVING SUM(exposure) > 12 "
        "ORDER BY s DESC LIMIT 5"
    )
    spec = [InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")]
    out = run_stage(
        compile_for_job(sql, spec),
        {"t0": _bank(rows)},
        min_group_size=5,
        rule_datasets=["x"],
        public_keys={"segment": frozenset({"big", "tiny", "mid"})},
    )
    # "tiny" passes HAVING on its true value but is suppressed; "big" (10) fails HAVING; "mid" (14) passes.
    assert out.released.to_pylist() == [{"segment": "mid", "s": 14.0}]
    assert [s["group"] for s in out.suppressed] == [{"segment": "tiny"}]


def test_engine_has_no_file_access():
    spec = [InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")]
    compiled = compile_for_job("SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment", spec)
    # Even SQL that slipped past the compiler could not read files: the engine locks that off.
    evil = compiled.__class__(
        aggregate_sql="SELECT * FROM read_text('/etc/hostname')",
        output_columns=("content",),
        group_columns=(),
        unit_checks=(),
        order_by=(),
        limit=None,
    )
    with pytest.raises(InvalidQueryError, match="failed in the engine"):
        run_stage(evil, {"t0": _bank([(1, "a", 1.0)])}, min_group_size=1, rule_datasets=["x"])


SEGMENTS = st.sampled_from(["retail", "sme", "corporate"])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), SEGMENTS, st.integers(-1000, 1000)), min_size=1, max_size=60),
    st.lists(st.tuples(st.integers(1, 30), st.integers(-1000, 1000)), min_size=1, max_size=60),
    st.integers(1, 4),
)
def test_released_cells_equal_plain_duckdb_and_respect_k(a_rows, b_rows, k):
    """Property: released cells are exactly DuckDB's answer for the groups with >= k units on each side."""
    a = pa.table(
        {
            "customer_id": pa.array([r[0] for r in a_rows], pa.int64()),
            "segment": [r[1] for r in a_rows],
            "exposure": pa.array([float(r[2]) for r in a_rows]),
        }
    )
    b = pa.table(
        {
            "customer_id": pa.array([r[0] for r in b_rows], pa.int64()),
            "exposure": pa.array([float(r[1]) for r in b_rows]),
        }
    )
    sql = (
        "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total FROM bank_a.loans a "
        "JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
    )
    specs = [
        InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id"),
        InputSpec("bank_b.loans", "t1", ("customer_id", "exposure"), "customer_id"),
    ]
    out = run_stage(
        compile_for_job(sql, specs),
        {"t0": a, "t1": b},
        min_group_size=k,
        rule_datasets=["x"],
        public_keys={"segment": frozenset(a["segment"].to_pylist())},
    )
    con = duckdb.connect()
    con.register("a", a)
    con.register("b", b)
    expected = con.sql(
        "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total, "
        "COUNT(DISTINCT a.customer_id) ua, COUNT(DISTINCT b.customer_id) ub "
        "FROM a JOIN b ON a.customer_id = b.customer_id GROUP BY a.segment"
    ).fetchall()
    released = {r["segment"]: (r["n"], r["total"]) for r in out.released.to_pylist()}
    suppressed = {s["group"]["segment"] for s in out.suppressed}
    for seg, n, total, ua, ub in expected:
        if ua >= k and ub >= k:
            assert released[seg] == (n, pytest.approx(total))
        else:
            assert seg in suppressed and seg not in released
    assert len(released) + len(suppressed) == len(expected)


@pytest.mark.parametrize("group", ["a.customer_id", "a.customer_id % 10", "1"])
def test_grouping_by_a_privacy_unit_is_refused(group):
    sql = f"SELECT a.customer_id, COUNT(*) FROM bank_a.loans a GROUP BY {group}"
    if group != "1" and group != "a.customer_id":
        sql = f"SELECT {group} AS bucket, COUNT(*) FROM bank_a.loans a GROUP BY {group}"
    an = analyze(sql, SCHEMAS)
    with pytest.raises(InvalidQueryError, match="privacy unit of bank_a.loans") as info:
        compile_stage(an.sql, _inputs(an, {"bank_a.loans": "customer_id"}))
    assert info.value.details["rule"] == "privacy_unit"


def test_grouping_by_a_union_privacy_unit_is_refused():
    sql = "SELECT patient_id, COUNT(*) FROM (SELECT * FROM h1.stays UNION ALL SELECT * FROM h2.stays) u GROUP BY 1"
    an = analyze(sql, HOSP)
    with pytest.raises(InvalidQueryError, match="privacy unit of h2.stays"):
        compile_stage(an.sql, _inputs(an, {"h1.stays": None, "h2.stays": "patient_id"}))
