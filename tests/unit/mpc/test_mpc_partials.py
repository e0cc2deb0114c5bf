"""A party's local partials (DuckDB) against pandas on seeded data: aligned to the public domain,
zeros where the party holds nothing, clamped fixed point, and refusals that name no value."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mpc.partials import local_partials
from sealroom.errors import ResourceExhaustedError, SourceError
from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Measure, Player, StageSpec

PLAYERS = (Player("a"), Player("b"), Player("c"))
AGGS = (
    Aggregate("n", "count"),
    Aggregate("cnt_x", "count", "x"),
    Aggregate("sum_x", "sum", "x"),
    Aggregate("var_x", "var_samp", "x"),
    Aggregate("min_x", "min", "x"),
    Aggregate("max_x", "max", "x"),
)


def table(seed: int = 3, n: int = 400) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = np.round(rng.uniform(-10, 110, n), 2)  # some values outside the declared [5, 100]
    x[rng.random(n) < 0.1] = np.nan
    return pa.table(
        {
            "seg": pa.array([f"s{v}" for v in rng.integers(0, 5, n)]),
            "x": pa.array(x, from_pandas=True),
            "unit": pa.array(rng.integers(0, 40, n)),
        }
    )


def stage(**kw) -> StageSpec:
    base = dict(
        session_id="p",
        group_by=(GroupColumn("seg"),),
        domain=tuple((f"s{i}",) for i in range(7)),  # s5 and s6: groups nobody holds
        aggregates=AGGS,
        players=PLAYERS,
        measures=(Measure("x", 5, 100, 2, nullable=True),),  # NULLs must not become the bound 5
        min_group_size=30,
    )
    base.update(kw)
    return StageSpec(**base)


def test_partials_match_pandas_on_the_domain_with_zeros_for_absent_groups():
    t = table()
    s = stage()
    p = local_partials(t, s, party="a")
    df = t.to_pandas()
    df["xq"] = (df["x"].clip(5, 100) * 100).round()
    ref = df.groupby("seg").agg(
        rows=("seg", "size"), n=("x", "count"), s=("xq", "sum"), q=("xq", lambda v: (v**2).sum())
    )
    mins = df.groupby("seg")["xq"].min()
    maxs = df.groupby("seg")["xq"].max()
    for i, (key,) in enumerate(s.domain):
        if key in ref.index:
            r = ref.loc[key]
            assert p.values["rows"][i] == r["rows"]
            assert p.values["n:x"][i] == r["n"]
            assert p.values["s:x"][i] == int(r["s"])
            assert p.values["q:x"][i] == int(r["q"])
            assert p.extrema["min:x"][i] == int(mins[key]) and p.extrema["max:x"][i] == int(maxs[key])
            assert p.cap[i] == min(int(r["rows"]), 30)
        else:  # absent: zeros, and the neutral bounds for MIN/MAX
            assert [p.values[v][i] for v in p.values] == [0] * len(p.values)
            assert p.extrema["min:x"][i] == 10000 and p.extrema["max:x"][i] == 500
            assert p.cap[i] == 0
    assert all(len(v) == len(s.domain) for v in p.values.values())


def test_batches_readers_and_tables_give_the_same_partials():
    t = table()
    s = stage()
    want = local_partials(t, s, party="a")
    assert local_partials(iter(t.to_batches(max_chunksize=37)), s, party="a") == want
    assert local_partials(t.to_reader(max_chunksize=50), s, party="a") == want
    empty = local_partials(iter([]), s, party="a")
    assert empty.cap == [0] * 7 and empty.values["rows"] == [0] * 7


def test_bins_and_rows_outside_the_domain():
    t = pa.table({"age": [1, 17, 18, 64, 65, 200], "x": [1.0] * 6})
    s = stage(
        group_by=(GroupColumn("age", bins=(0, 18, 65)),),
        domain=(("[0, 18)",), ("[18, 65)",)),
        aggregates=(Aggregate("n", "count"),),
        measures=(),
        min_group_size=2,
    )
    p = local_partials(t, s, party="a")
    assert p.values["rows"] == [2, 2]  # 65 and 200 fall outside every bin: left out


def test_distinct_units_threshold_inputs():
    t = table()
    df = t.to_pandas()
    units = df.groupby("seg")["unit"].nunique()
    s = stage(threshold_on="units", unit_column="unit", min_group_size=28)
    p = local_partials(t, s, party="a")
    assert p.cap[:5] == [int(units[f"s{i}"] >= 28) for i in range(5)]  # "some player holds k units"
    s2 = stage(threshold_on="units", unit_column="unit", min_group_size=28, units_disjoint=True)
    p2 = local_partials(t, s2, party="a")
    assert p2.cap[:5] == [min(int(units[f"s{i}"]), 28) for i in range(5)]


def test_more_rows_than_declared_is_refused_without_values():
    s = stage(max_rows=10)
    with pytest.raises(ResourceExhaustedError, match="max_rows") as e:
        local_partials(table(), s, party="bank_a")
    assert e.value.details == {"party": "bank_a", "rule": "max_rows"}
    assert "s0" not in str(e.value)


def test_nulls_in_a_measure_declared_not_nullable_are_refused():
    s = stage(measures=(Measure("x", 0, 100, 2, nullable=False),))
    with pytest.raises(SourceError, match="declares it not nullable") as e:
        local_partials(table(), s, party="bank_a")
    assert e.value.details == {"party": "bank_a", "column": "x"}


def test_a_missing_column_is_named():
    with pytest.raises(SourceError, match="no column x"):
        local_partials(pa.table({"seg": ["s1"]}), stage(), party="bank_a")


def test_duckdb_failures_are_reported_by_kind_only():
    secret = "SECRET-7731"
    t = pa.table({"seg": ["s1"], "x": [secret]})  # not a number
    with pytest.raises(SourceError) as e:
        local_partials(t, stage(), party="bank_a")
    assert secret not in str(e.value) and secret not in repr(e.value.details)


def test_pandas_reference_for_sums_is_exact():
    # Integer measures at scale 1: sums are exact integers.
    rng = np.random.default_rng(11)
    df = pd.DataFrame({"seg": rng.choice(["s0", "s1"], 300), "x": rng.integers(0, 100, 300)})
    s = stage(aggregates=(Aggregate("t", "sum", "x"),), measures=(Measure("x", 0, 100, 0, nullable=False),))
    p = local_partials(pa.Table.from_pandas(df, preserve_index=False), s, party="a")
    ref = df.groupby("seg")["x"].sum()
    assert p.values["s:x"][:2] == [int(ref["s0"]), int(ref["s1"])]


# --------------------------------------------------------------------------------------------------
# Bounds mean the same on every path (issue 14): clamp to the declared bounds, never to bounds
# rounded outward to whole fixed-point units.


def _bounded(measure: Measure) -> StageSpec:
    return stage(aggregates=(Aggregate("sum_x", "sum", "x"), Aggregate("max_x", "max", "x")), measures=(measure,))


def test_an_integer_measure_with_a_fractional_bound_is_clamped_to_that_bound():
    t = pa.table({"seg": ["s0"] * 5, "x": pa.array([1, 2, 3, 4, 9], pa.int64())})
    # The enclave's SUM(LEAST(x, 2.5)) = 1 + 2 + 2.5 * 3 = 10.5; with one decimal the players compute it exactly.
    p = local_partials(t, _bounded(Measure("x", 0, 2.5, 1, nullable=False)), party="a")
    assert p.values["s:x"][0] == 105 and p.extrema["max:x"][0] == 25
    # With too few decimals to represent 2.5 the bound is rounded inward (2), never outward (3).
    coarse = Measure("x", 0.5, 2.5, 0, nullable=False)
    assert (coarse.lo, coarse.hi, coarse.exact) == (1, 2, False)
    p = local_partials(t, _bounded(coarse), party="a")
    assert p.values["s:x"][0] == 1 + 2 + 2 * 3 and p.extrema["max:x"][0] == 2


def test_values_are_clamped_before_they_are_rounded():
    # 2.54 clamped to 2.5 first: 25 units; rounding first would give 25 too, but 2.56 -> 26 -> 25 hides
    # the order. Lower bound 0.04 with one decimal rounds inward to 1 unit (0.1), and 0.04 itself is
    # clamped to 0.04 then rounded to 0 then clamped to 1: never below the bound.
    t = pa.table({"seg": ["s0"] * 3, "x": [2.56, 0.0, 1.04]})
    m = Measure("x", 0.04, 2.5, 1, nullable=False)
    assert (m.lo, m.hi) == (1, 25)
    p = local_partials(t, _bounded(m), party="a")
    assert p.values["s:x"][0] == 25 + 1 + 10


def test_bound_decimals_represent_what_the_owner_wrote():
    from sealroom.planning.mpc_spec import bound_decimals

    assert [bound_decimals(x) for x in (3, 2.5, 0.1, 1e6, 1e-7, -12.25, 1 / 3)] == [0, 1, 1, 0, 7, 2, 12]
    assert Measure("x", 0.1, 0.3, 1).exact and (Measure("x", 0.1, 0.3, 1).lo, Measure("x", 0.1, 0.3, 1).hi) == (1, 3)
    with pytest.raises(Exception, match="no value with 0 decimals"):
        _bounded(Measure("x", 0.25, 0.75, 0))
