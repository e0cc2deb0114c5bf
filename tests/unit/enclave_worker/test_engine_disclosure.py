"""Disclosure rules of the in-enclave engine, on ``run_stage`` directly: clamping of measures to
declared bounds, the (n, k) dominance rule, and how they combine with the minimum group size.

Reference answers come from plain DuckDB (clamping) or from a naive Python computation (dominance).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_worker.engine import compile_for_job, run_stage, table_to_ipc
from sealroom.errors import InvalidQueryError, ResourceExhaustedError
from sealroom.planning.sql import InputSpec
from sealroom.policy import Dominance

A = InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")
B = InputSpec("bank_b.loans", "t1", ("customer_id", "segment", "exposure"), "customer_id")
ROWS_A = InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), None)
SINGLE = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"
JOIN = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total FROM bank_a.loans a "
    "JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)
ODD = 987654.125  # a distinctive value: it must never appear in a reason


def bank(rows, *, exposure_type=pa.float64()) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.int64()),
            "segment": pa.array([r[1] for r in rows], pa.string()),
            "exposure": pa.array([r[2] for r in rows], exposure_type),
        }
    )


def run(sql, tables, specs=(A,), *, k=1, dominance=None, clamps=None, row_id_tables=frozenset()):
    # The owners declare their dimensions' keys public (a domain), so suppressed cells are listed by key.
    public = {
        c: frozenset(v for t in tables.values() if c in t.column_names for v in t[c].to_pylist())
        for c in ("segment", "region")
    }
    return run_stage(
        compile_for_job(sql, list(specs)),
        tables,
        min_group_size=k,
        rule_datasets=[s.qualified for s in specs],
        row_id_tables=row_id_tables,
        clamps=clamps,
        dominance=dominance,
        public_keys={**public, "seg": public.get("segment", frozenset())},
    )


def by_segment(outcome) -> dict:
    return {r["segment"]: r for r in outcome.released.to_pylist()}


def suppressed(outcome) -> dict:
    return {json.dumps(s["group"], sort_keys=True): s for s in outcome.suppressed}


def seg(name) -> str:
    return json.dumps({"segment": name})


# --------------------------------------------------------------------------------------------------
# clamping


CLAMP_ROWS = [
    (1, "x", -50.0),
    (2, "x", 3.5),
    (3, "x", None),
    (4, "x", 250.0),
    (5, "y", 99.0),
    (6, "y", 1e9),
    (7, "y", None),
    (8, "z", None),
]


@pytest.mark.parametrize("bounds", [(0.0, 100.0), (0.0, None), (None, 100.0), (-10.0, -10.0), (None, None)])
def test_clamping_equals_least_greatest_in_plain_duckdb(bounds):
    lo, hi = bounds
    sql = (
        "SELECT segment, SUM(exposure) AS s, AVG(exposure) AS a, MAX(exposure) AS mx, MIN(exposure) AS mn, "
        "COUNT(exposure) AS c, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
    )
    table = bank(CLAMP_ROWS)
    out = run(sql, {"t0": table}, clamps={"t0": {"exposure": bounds}})
    con = duckdb.connect()
    con.register("t", table)
    clamped = "exposure"
    if lo is not None:
        clamped = f"GREATEST({clamped}, {lo})"
    if hi is not None:
        clamped = f"LEAST({clamped}, {hi})"
    expected = con.sql(
        f"SELECT segment, SUM(v) AS s, AVG(v) AS a, MAX(v) AS mx, MIN(v) AS mn, COUNT(v) AS c, COUNT(*) AS n "
        f"FROM (SELECT segment, CASE WHEN exposure IS NULL THEN NULL ELSE {clamped} END AS v FROM t) "
        "GROUP BY segment ORDER BY segment"
    ).to_arrow_table()
    got = out.released.sort_by("segment")
    assert got.to_pylist() == expected.to_pylist()
    assert got.schema.types == expected.schema.types
    # NULLs stay NULL: they are neither counted nor turned into a bound.
    assert by_segment(out)["z"] == {"segment": "z", "s": None, "a": None, "mx": None, "mn": None, "c": 0, "n": 1}


def test_clamping_happens_before_where_and_aggregation():
    table = bank([(1, "x", 5000.0), (2, "x", 10.0), (3, "x", 20.0)])
    sql = "SELECT segment, SUM(exposure) AS s FROM bank_a.loans WHERE exposure > 500 GROUP BY segment"
    assert run(sql, {"t0": table}).released.to_pylist() == [{"segment": "x", "s": 5000.0}]
    assert run(sql, {"t0": table}, clamps={"t0": {"exposure": (0.0, 100.0)}}).released.num_rows == 0


def test_clamping_keeps_integer_types_with_integral_bounds():
    table = bank([(1, "x", -5), (2, "x", 7), (3, "x", 500), (4, "x", None)], exposure_type=pa.int32())
    out = run("SELECT SUM(exposure) AS s, MAX(exposure) AS m FROM bank_a.loans", {"t0": table})
    clamped = run(
        "SELECT SUM(exposure) AS s, MAX(exposure) AS m FROM bank_a.loans",
        {"t0": table},
        clamps={"t0": {"exposure": (0.0, 100.0)}},
    )
    assert clamped.released.to_pylist() == [{"s": 107, "m": 100}]
    assert clamped.released.schema.types == out.released.schema.types


def test_fractional_bounds_on_an_integer_column_clamp_as_least_greatest_would():
    table = bank([(1, "x", 1), (2, "x", 7), (3, "x", 12)], exposure_type=pa.int64())
    out = run(
        "SELECT SUM(exposure) AS s, MIN(exposure) AS m FROM bank_a.loans",
        {"t0": table},
        clamps={"t0": {"exposure": (2.5, 10.25)}},
    )
    assert out.released.to_pylist() == [{"s": 2.5 + 7 + 10.25, "m": 2.5}]


def test_clamping_a_decimal_column():
    table = pa.table(
        {
            "customer_id": pa.array([1, 2, 3], pa.int64()),
            "segment": ["x", "x", "x"],
            "exposure": pa.array([1, 200, None], pa.decimal128(10, 2)),
        }
    )
    out = run("SELECT SUM(exposure) AS s FROM bank_a.loans", {"t0": table}, clamps={"t0": {"exposure": (5.5, 100.0)}})
    assert float(out.released.column("s")[0].as_py()) == 105.5
    assert pa.types.is_decimal(out.released.schema.field("s").type)


def test_clamping_keeps_column_order_and_the_row_id_of_inputs_without_a_unit():
    table = bank([(1, "x", 500.0), (1, "x", 500.0), (1, "x", 1.0)])
    sql = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS s FROM bank_a.loans GROUP BY segment"
    out = run(sql, {"t0": table}, [ROWS_A], k=3, clamps={"t0": {"exposure": (0.0, 10.0)}}, row_id_tables={"t0"})
    assert out.released.to_pylist() == [{"segment": "x", "n": 3, "s": 21.0}]  # 3 rows count as 3 units


def test_clamping_applies_to_each_union_branch_by_its_own_bounds():
    h1 = InputSpec("h1.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")
    h2 = InputSpec("h2.loans", "t1", ("customer_id", "segment", "exposure"), "customer_id")
    sql = (
        "SELECT u.segment, SUM(u.exposure) AS s FROM (SELECT * FROM h1.loans UNION ALL SELECT * FROM h2.loans) u "
        "GROUP BY u.segment"
    )
    tables = {"t0": bank([(1, "x", 500.0), (2, "x", 5.0)]), "t1": bank([(3, "x", 500.0), (4, "x", None)])}
    out = run(sql, tables, [h1, h2], clamps={"t0": {"exposure": (None, 100.0)}, "t1": {"exposure": (None, 200.0)}})
    assert out.released.to_pylist() == [{"segment": "x", "s": 100.0 + 5.0 + 200.0}]


def test_bounds_on_a_non_numeric_column_fail_without_quoting_values():
    table = bank([(1, "SECRET-SEGMENT", 1.0)])
    with pytest.raises(InvalidQueryError, match="not numeric") as info:
        run(SINGLE, {"t0": table}, clamps={"t0": {"segment": (0.0, 1.0)}})
    assert "SECRET" not in info.value.message


# --------------------------------------------------------------------------------------------------
# dominance


def _cell(segment, contributions):
    """Rows for one cell: customer i+1 contributes contributions[i] (in one row each)."""
    return [(100 * ord(segment[0]) + i, segment, float(v)) for i, v in enumerate(contributions)]


def test_one_unit_with_90_percent_is_suppressed_and_one_with_50_percent_released():
    rows = _cell("dominated", [90, 5, 5]) + _cell("spread", [50, 30, 20])
    out = run(SINGLE, {"t0": bank(rows)}, k=2, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert by_segment(out) == {"spread": {"segment": "spread", "n": 3, "total": 100.0}}
    (entry,) = out.suppressed
    assert entry == {
        "group": {"segment": "dominated"},
        "rule": "dominance",
        "reason": (
            "the largest customer_id of bank_a.loans contributes at least 80% of a SUM or AVG in this cell "
            "(dominance rule of bank_a.loans)"
        ),
    }


@pytest.mark.parametrize(("share", "dominated"), [(79.9, False), (80.0, True), (80.1, True)])
def test_threshold_is_at_least_k_percent(share, dominated):
    rows = _cell("c", [share, 100 - share - 10, 10])
    out = run(SINGLE, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert (out.released.num_rows == 0) is dominated


def test_n_two_adds_the_two_largest_units():
    rows = _cell("top2_85", [45, 40, 5, 5, 5]) + _cell("top2_70", [40, 30, 10, 10, 10])
    out = run(SINGLE, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(2, 80.0)})
    assert set(by_segment(out)) == {"top2_70"}
    (entry,) = out.suppressed
    assert entry["group"] == {"segment": "top2_85"}
    assert entry["reason"].startswith("the 2 largest customer_id of bank_a.loans contribute at least 80% ")


def test_the_rows_of_one_unit_add_up_before_ranking():
    # Customer 1 has 30 rows of 3.0 (90 in all); three others have 10/3 each: no single row dominates.
    rows = [(1, "x", 3.0)] * 30 + [(2, "x", 10 / 3), (3, "x", 10 / 3), (4, "x", 10 / 3)]
    rows += [(10 + i, "y", 3.0) for i in range(30)]  # the same rows spread over 30 customers
    out = run(SINGLE, {"t0": bank(rows)}, k=2, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert set(by_segment(out)) == {"y"}
    assert [(s["group"], s["rule"]) for s in out.suppressed] == [({"segment": "x"}, "dominance")]


def test_negative_contributions_count_by_their_absolute_value():
    # The sum is -80, the largest unit is -90: 90 of 100 in absolute terms.
    rows = _cell("neg", [-90, 5, 5]) + _cell("cancel", [60, -60, 50, 50, 50])  # 60 of 270: released
    out = run(SINGLE, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert set(by_segment(out)) == {"cancel"}
    assert [s["group"] for s in out.suppressed] == [{"segment": "neg"}]


def test_every_sum_argument_is_checked():
    sql = "SELECT segment, SUM(exposure) AS s, SUM(customer_id) AS ids FROM bank_a.loans GROUP BY segment"
    rows = [(1, "x", 10.0), (2, "x", 10.0), (1000, "x", 10.0)]  # exposure spread, customer ids not
    out = run(sql, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 90.0)})
    assert out.released.num_rows == 0 and out.suppressed[0]["rule"] == "dominance"


def test_a_cell_with_no_sum_or_avg_is_not_subject_to_dominance():
    rows = _cell("x", [1000, 1, 1])
    sql = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
    out = run(sql, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 50.0)})
    assert out.released.num_rows == 1 and out.suppressed == []


def test_avg_is_subject_to_dominance_because_avg_times_count_is_the_sum():
    rows = _cell("x", [1000, 1, 1])
    sql = "SELECT segment, COUNT(*) AS n, AVG(exposure) AS a FROM bank_a.loans GROUP BY segment"
    out = run(sql, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 50.0)})
    assert out.released.num_rows == 0 and [s["rule"] for s in out.suppressed] == ["dominance"]


def test_an_all_zero_or_all_null_sum_is_not_dominated():
    rows = [(1, "zero", 0.0), (2, "zero", 0.0), (3, "null", None), (4, "null", None)]
    out = run(SINGLE, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 50.0)})
    assert set(by_segment(out)) == {"zero", "null"}


def test_min_group_size_keeps_its_rule_when_the_cell_is_also_dominated():
    rows = _cell("small", [99, 1]) + _cell("dominated", [99, 1, 0, 0]) + _cell("fine", [1, 1, 1, 1])
    out = run(SINGLE, {"t0": bank(rows)}, k=3, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert set(by_segment(out)) == {"fine"}
    rules = {k: v["rule"] for k, v in suppressed(out).items()}
    assert rules == {seg("small"): "min_group_size", seg("dominated"): "dominance"}
    assert "fewer than 3 distinct customer_id" in suppressed(out)[seg("small")]["reason"]


def test_strictest_rule_wins_in_a_join_with_different_rules():
    # bank_a: (1, 90); bank_b: (2, 60). Customers 1..4 appear in both banks.
    a_rows = [(1, "p", 80.0), (2, "p", 10.0), (3, "p", 5.0), (4, "p", 5.0)]  # a's top1 = 80%
    a_rows += [(11, "q", 25.0), (12, "q", 25.0), (13, "q", 25.0), (14, "q", 25.0)]
    a_rows += [(21, "r", 95.0), (22, "r", 1.0), (23, "r", 1.0), (24, "r", 1.0)]  # a's top1 > 90%
    b_rows = [(1, "-", 0.0), (2, "-", 0.0), (3, "-", 0.0), (4, "-", 0.0)]
    b_rows += [(11, "-", 0.0), (12, "-", 0.0), (13, "-", 0.0), (14, "-", 0.0)]
    b_rows += [(21, "-", 0.0), (22, "-", 0.0), (23, "-", 0.0), (24, "-", 0.0)]
    dominance = {"bank_a.loans": Dominance(1, 90.0), "bank_b.loans": Dominance(2, 60.0)}
    # In "p" a's largest unit holds 80% (passes a's rule) but b's two largest hold 90% (fails b's).
    out = run(JOIN, {"t0": bank(a_rows), "t1": bank(b_rows)}, [A, B], k=2, dominance=dominance)
    assert set(by_segment(out)) == {"q"}
    reasons = {k: v["reason"] for k, v in suppressed(out).items()}
    assert reasons[seg("p")].endswith("(dominance rule of bank_b.loans)")
    assert "2 largest customer_id of bank_b.loans" in reasons[seg("p")]
    # "r" fails both rules; it is suppressed as dominated whichever rule is named.
    assert suppressed(out)[seg("r")]["rule"] == "dominance"
    # Without bank_b's rule, "p" passes bank_a's.
    only_a = run(
        JOIN, {"t0": bank(a_rows), "t1": bank(b_rows)}, [A, B], k=2, dominance={"bank_a.loans": Dominance(1, 90.0)}
    )
    assert set(by_segment(only_a)) == {"p", "q"}
    assert suppressed(only_a)[seg("r")]["reason"].endswith("(dominance rule of bank_a.loans)")


def test_join_contributions_are_attributed_to_each_inputs_own_units():
    # Five bank_a customers all match the one bank_b customer 7: by bank_a's units nobody dominates,
    # by bank_b's units customer 7 holds the whole sum.
    sql = (
        "SELECT a.segment, SUM(a.exposure) AS total FROM bank_a.loans a "
        "JOIN bank_b.loans b ON a.segment = b.segment GROUP BY a.segment"
    )
    tables = {"t0": bank([(i, "x", 10.0) for i in range(1, 6)]), "t1": bank([(7, "x", 0.0)])}
    by_a = run(sql, tables, [A, B], dominance={"bank_a.loans": Dominance(1, 50.0)})
    assert by_a.released.to_pylist() == [{"segment": "x", "total": 50.0}]
    by_b = run(sql, tables, [A, B], dominance={"bank_b.loans": Dominance(1, 99.0)})
    assert by_b.released.num_rows == 0
    assert by_b.suppressed[0]["reason"].startswith("the largest customer_id of bank_b.loans contributes")


def test_union_inputs_are_each_judged_on_their_own_units():
    h1 = InputSpec("h1.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")
    h2 = InputSpec("h2.loans", "t1", ("customer_id", "segment", "exposure"), None)
    sql = (
        "SELECT u.segment, SUM(u.exposure) AS s FROM (SELECT * FROM h1.loans UNION ALL SELECT * FROM h2.loans) u "
        "GROUP BY u.segment"
    )
    # Segment x: h2's single row of 900 dominates the cell, not h1's units (50 and 50); y is spread.
    tables = {
        "t0": bank([(1, "x", 50.0), (2, "x", 50.0), (3, "y", 10.0), (4, "y", 10.0)]),
        "t1": bank([(99, "x", 900.0), (99, "y", 10.0), (99, "y", 10.0)]),  # no unit: each row is one
    }
    # h1's rule reads h1's own units only: h2's rows neither trigger it nor dilute it.
    out = run(sql, tables, [h1, h2], dominance={"h1.loans": Dominance(1, 85.0)}, row_id_tables={"t1"})
    assert sorted(r["segment"] for r in out.released.to_pylist()) == ["x", "y"]
    out = run(sql, tables, [h1, h2], dominance={"h2.loans": Dominance(1, 85.0)}, row_id_tables={"t1"})
    assert out.released.to_pylist() == [{"segment": "y", "s": 40.0}]
    (entry,) = out.suppressed
    assert entry["group"] == {"segment": "x"} and entry["rule"] == "dominance"
    assert "rows of h2.loans" in entry["reason"]
    assert entry["reason"].endswith("(dominance rule of h2.loans)")


def test_inputs_without_a_unit_count_each_row_as_a_unit():
    rows = [(1, "x", 10.0)] * 10  # one customer, but no declared unit: ten units of 10%
    out = run(
        SINGLE, {"t0": bank(rows)}, [ROWS_A], dominance={"bank_a.loans": Dominance(2, 50.0)}, row_id_tables={"t0"}
    )
    assert out.released.num_rows == 1
    rows = [(1, "x", 10.0)] * 9 + [(1, "x", 500.0)]
    out = run(
        SINGLE, {"t0": bank(rows)}, [ROWS_A], dominance={"bank_a.loans": Dominance(2, 50.0)}, row_id_tables={"t0"}
    )
    assert out.released.num_rows == 0
    assert out.suppressed[0]["reason"].startswith("the 2 largest rows of bank_a.loans")


def test_global_aggregates():
    sql = "SELECT COUNT(*) AS n, SUM(exposure) AS s FROM bank_a.loans"
    dominated = run(sql, {"t0": bank(_cell("x", [95, 5]))}, dominance={"bank_a.loans": Dominance(1, 90.0)})
    assert dominated.released.num_rows == 0
    assert [(e["group"], e["rule"]) for e in dominated.suppressed] == [({}, "dominance")]
    spread = run(sql, {"t0": bank(_cell("x", [50, 50]))}, dominance={"bank_a.loans": Dominance(1, 90.0)})
    assert spread.released.to_pylist() == [{"n": 2, "s": 100.0}] and spread.suppressed == []
    empty = run(sql, {"t0": bank([])}, dominance={"bank_a.loans": Dominance(1, 90.0)})
    assert [(e["group"], e["rule"]) for e in empty.suppressed] == [({}, "min_group_size")]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT segment, SUM(exposure) AS s FROM bank_a.loans GROUP BY 1",
        "SELECT SUM(exposure) AS s, segment AS seg FROM bank_a.loans GROUP BY 2",
        "SELECT segment AS seg, SUM(exposure) AS s FROM bank_a.loans GROUP BY seg",
        "SELECT SUM(exposure) AS s FROM bank_a.loans GROUP BY segment",  # key not in the output
        "SELECT segment, region, SUM(exposure) AS s FROM bank_a.loans GROUP BY segment, region",
    ],
)
def test_group_by_positions_aliases_hidden_and_null_keys(sql):
    rows = _cell("a", [95, 5]) + _cell("b", [50, 50]) + [(7, None, 95.0), (8, None, 5.0)]
    rows += [(9, "c", 50.0), (10, "c", 50.0)]
    table = bank(rows).append_column("region", pa.array(["r1"] * len(rows)))
    spec = InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure", "region"), "customer_id")
    out = run(sql, {"t0": table}, [spec], dominance={"bank_a.loans": Dominance(1, 90.0)})
    assert out.released.num_rows == 2  # b and c; a and the NULL segment are dominated
    assert len(out.suppressed) == 2 and {e["rule"] for e in out.suppressed} == {"dominance"}
    if "segment" in out.released.column_names or "seg" in out.released.column_names:
        # A NULL key is no declared value: that cell is counted, not listed.
        keys = [None if e["group"] is None else next(iter(e["group"].values())) for e in out.suppressed]
        assert keys == ["a", None]


@pytest.mark.parametrize(
    ("tail", "released"),
    [
        ("", ["spread"]),
        ("HAVING SUM(exposure) > 150", []),  # the dominated cell would pass: it must not appear
        ("HAVING total > 150", []),
        ("ORDER BY total DESC LIMIT 1", ["spread"]),
        ("HAVING COUNT(*) >= 1 ORDER BY n ASC", ["spread"]),
    ],
)
def test_having_order_by_limit_apply_to_released_cells_only(tail, released):
    rows = _cell("dominated", [190, 5, 5]) + _cell("spread", [40, 30, 30])
    out = run(f"{SINGLE} {tail}", {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(1, 80.0)})
    assert out.released.column("segment").to_pylist() == released
    assert [(e["group"], e["rule"]) for e in out.suppressed] == [({"segment": "dominated"}, "dominance")]


def test_reasons_never_carry_a_value_or_a_share():
    rows = [(1, "x", ODD), (2, "x", 1.5), (3, "y", 1.0), (4, "y", 1.0)]
    out = run(SINGLE, {"t0": bank(rows)}, k=2, dominance={"bank_a.loans": Dominance(1, 75.0)})
    text = json.dumps(out.suppressed)
    assert "987654" not in text and "99.9" not in text and "1.5" not in text
    assert [set(e) for e in out.suppressed] == [{"group", "rule", "reason"}]
    assert "75%" in out.suppressed[0]["reason"]  # the rule's own k, not the cell's share


def test_a_dominance_rule_for_an_input_the_stage_does_not_read_is_refused():
    with pytest.raises(InvalidQueryError, match="does not read"):
        run(SINGLE, {"t0": bank(_cell("x", [1, 1]))}, dominance={"bank_z.other": Dominance(1, 50.0)})


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.sampled_from(["p", "q", "r"]), st.integers(-100, 100)), max_size=40),
    st.integers(1, 3),
    st.sampled_from([50.0, 66.5, 80.0, 100.0]),
    st.integers(1, 3),
)
def test_dominance_matches_a_naive_computation(rows, n, pct, k):
    table = bank([(c, s, float(v)) for c, s, v in rows])
    out = run(SINGLE, {"t0": table}, k=k, dominance={"bank_a.loans": Dominance(n, pct)})
    per_unit: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for c, s, v in rows:
        per_unit[s][c] += v
    expected_released, expected_rules = set(), {}
    for s, units in per_unit.items():
        contributions = sorted((abs(v) for v in units.values()), reverse=True)
        total = sum(contributions)
        if len(units) < k:
            expected_rules[s] = "min_group_size"
        elif total > 0 and sum(contributions[:n]) * 100 >= pct * total:
            expected_rules[s] = "dominance"
        else:
            expected_released.add(s)
    assert set(by_segment(out)) == expected_released
    assert {e["group"]["segment"]: e["rule"] for e in out.suppressed} == expected_rules


def test_the_engine_never_imports_pandas():
    """The enclave's inputs arrive as Arrow IPC; running the rules on them must not load pandas
    (building tables from Python lists would load it, so the child reads IPC bytes, as the worker)."""
    ipc = table_to_ipc(bank([(1, "x", 90.0), (2, "x", 1.0), (3, "y", 5.0), (4, "y", 5.0)]))
    code = f"""
import sys
import pyarrow as pa
from enclave_worker.engine import compile_for_job, run_stage, table_to_ipc
from sealroom.policy import Dominance
from sealroom.planning.sql import InputSpec
spec = [InputSpec("bank_a.loans", "t0", ("customer_id", "segment", "exposure"), "customer_id")]
t = pa.ipc.open_stream(bytes.fromhex("{ipc.hex()}")).read_all()
c = compile_for_job("SELECT segment, SUM(exposure) AS s FROM bank_a.loans GROUP BY segment", spec)
o = run_stage(c, {{"t0": t}}, min_group_size=1, rule_datasets=["bank_a.loans"],
              clamps={{"t0": {{"exposure": (0.0, 50.0)}}}}, dominance={{"bank_a.loans": Dominance(1, 80.0)}})
assert o.released.num_rows == 1 and len(o.suppressed) == 1, o
assert "pandas" not in sys.modules, "pandas was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_long_expression_runs_and_one_past_the_depth_limit_is_refused() -> None:
    """SUM(x + x + x ...): DuckDB's common-subexpression pass made it cubic in the depth (950 terms:
    14 s); the engine turns that pass off and the depth limit caps the rest. (Terms are columns: a
    constant in an aggregate is refused, sealroom.planning.expressions.)"""
    rows = [(1, "a", 1.0), (2, "a", 2.0), (3, "b", 3.0)]
    terms = 240
    sql = "SELECT segment, SUM(exposure" + " + exposure" * terms + ") AS total FROM bank_a.loans GROUP BY segment"
    out = run(sql, {"t0": bank(rows)}, dominance={"bank_a.loans": Dominance(n=1, k=99)})
    assert by_segment(out)["a"]["total"] == (1.0 + 2.0) * (terms + 1)
    assert [s["group"] for s in out.suppressed] == [{"segment": "b"}]  # one unit: dominated
    deeper = "SELECT segment, SUM(exposure" + " + exposure" * 950 + ") AS total FROM bank_a.loans GROUP BY segment"
    with pytest.raises(ResourceExhaustedError, match="max_nesting_depth"):
        compile_for_job(deeper, [A])
