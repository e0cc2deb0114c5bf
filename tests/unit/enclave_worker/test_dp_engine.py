"""Differential privacy inside the enclave, on ``run_dp_stage`` directly: real DuckDB, real OpenDP.

The mechanisms come from real plans (the planner and ``check_plan``, as the enclave derives them);
the data are synthetic with fixed seeds. OpenDP's noise is not seeded (it draws from the operating
system), so every statistical assertion has a tolerance computed from its sample size such that a
correct mechanism fails it with probability below 1e-6 (each says how).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, plan_query
from enclave_worker.dp import bounded_cells, run_dp_stage
from sealroom.errors import DeadlineExceededError, JobFailedError
from sealroom.planning.checks import Checker, check_plan
from sealroom.planning.privacy import DpMechanism, laplace_ci95
from sealroom.planning.sql import InputSpec
from sealroom.policy import DatasetPolicy

SCHEMA = pa.schema(
    [("customer_id", pa.int64()), ("segment", pa.string()), ("age", pa.int64()), ("amount", pa.float64())]
)
LO, HI = 0.0, 5000.0
SEGMENTS = [f"g{i:03d}" for i in range(200)]
# z beyond which a standard normal lies with probability 4e-8 (two-sided): every tolerance below is
# Z standard errors, so a correct mechanism fails one with probability well under 1e-6.
Z = 5.5


def _policy(*, segments: list[str] | None = None, groups: int = 4, rows: int = 10) -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {
                "customer_id": "join_key",
                "segment": {"role": "dimension", **({"values": segments} if segments else {})},
                "age": "dimension",
                "amount": {"role": "measure", "min": LO, "max": HI},
            },
            "privacy": {
                "mode": "dp",
                "epsilon_budget": 100.0,
                "max_query_epsilon": 50.0,
                "max_groups_per_unit": groups,
                "max_rows_per_unit": rows,
            },
        },
        source="test.toml",
    )


def _table(rows: list[tuple[int, str, int, float]]) -> pa.Table:
    return pa.table({n: [r[i] for r in rows] for i, n in enumerate(SCHEMA.names)}, schema=SCHEMA)


@dataclasses.dataclass
class Stage:
    sql: str
    inputs: list[InputSpec]
    tables: dict[str, pa.Table]
    mechanism: DpMechanism
    clamps: dict[str, Any]

    def release(self, mechanism: DpMechanism | None = None):
        return run_dp_stage(
            self.sql, self.inputs, self.tables, mechanism or self.mechanism, clamps=self.clamps, threads=2
        )

    def cells(self) -> list[dict[str, Any]]:
        return bounded_cells(self.sql, self.inputs, self.tables, self.mechanism, clamps=self.clamps).to_pylist()


def _stage(sql: str, data: dict[str, tuple[pa.Table, DatasetPolicy]], epsilon: float) -> Stage:
    """The stage of the real plan for ``sql`` (run over whole tables: no filter is pushed here)."""
    catalog = {f"{p}.loans": CatalogEntry(p, "loans", SCHEMA, pol) for p, (_, pol) in data.items()}
    plan, _ = plan_query(
        sql,
        query_id="q",
        analyst="alice",
        catalog=catalog,
        party_keys={p: "ab" * 32 for p in data},
        epsilon=epsilon,
    )
    (tee,) = plan.tee_stages()
    mechanism = check_plan(plan, Checker(stage=tee.id)).mechanisms[tee.id]
    inputs = [InputSpec(i.qualified, i.table, tuple(SCHEMA.names), i.policy.privacy_unit) for i in tee.inputs]
    tables = {i.table: data[i.party][0] for i in tee.inputs}
    clamps = {i.table: {"amount": (LO, HI)} for i in tee.inputs}
    return Stage(tee.sql, inputs, tables, mechanism, clamps)


def _discrete_laplace_variance(b: float) -> float:
    q = math.exp(-1 / b)
    return 2 * q / (1 - q) ** 2


def _discrete_coverage(b: float, t: float) -> float:
    q = math.exp(-1 / b)
    return 1 - 2 * math.exp(-(t + 1) / b) / (1 + q)


# --------------------------------------------------------------------------------------------
# the noise against the mechanism, over many cells


def test_noise_matches_the_mechanism_over_many_cells() -> None:
    rng = random.Random(7)
    rows, unit = [], 0
    truth: dict[str, list[float]] = {s: [0, 0.0] for s in SEGMENTS}
    for s in SEGMENTS:  # every unit in one group, with at most 3 rows: the bounds drop nothing
        for _ in range(rng.randint(1, 12)):
            for _ in range(rng.randint(1, 3)):
                amount = round(rng.uniform(LO, HI), 2)
                rows.append((unit, s, 40, amount))
                truth[s][0] += 1
                truth[s][1] += amount
            unit += 1
    stage = _stage(
        "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM bank_a.loans GROUP BY segment",
        {"bank_a": (_table(rows), _policy(segments=SEGMENTS))},
        epsilon=1.0,
    )
    count, total = stage.mechanism.measurements
    assert stage.mechanism.domain is not None and len(stage.mechanism.domain) == 200
    # What the noise is added to is the truth (the bounds drop nothing here).
    cells = {c["__sr_g0"]: c for c in stage.cells()}
    assert all(cells[s]["__sr_m0"] == truth[s][0] and math.isclose(cells[s]["__sr_m1"], truth[s][1]) for s in SEGMENTS)
    errors: dict[str, list[float]] = defaultdict(list)
    covered: dict[str, int] = defaultdict(int)
    reps = 25
    for _ in range(reps):
        out = stage.release()
        got = out.released.to_pylist()
        assert [r["segment"] for r in got] == SEGMENTS  # every key of the public domain, in its order
        assert out.ci95["n"] == [count.ci95] * 200 and out.ci95["total"] == [total.ci95] * 200
        for r in got:
            for col, true in (("n", truth[r["segment"]][0]), ("total", truth[r["segment"]][1])):
                e = r[col] - true
                errors[col].append(e)
                covered[col] += abs(e) <= (count.ci95 if col == "n" else total.ci95)
    assert isinstance(got[0]["n"], int) and isinstance(got[0]["total"], float)
    n = 200 * reps
    for col, m, variance, p in (
        ("n", count, _discrete_laplace_variance(count.scale), _discrete_coverage(count.scale, count.ci95)),
        ("total", total, 2 * total.scale**2, 0.95),
    ):
        e = errors[col]
        mean = sum(e) / n
        var = sum((x - mean) ** 2 for x in e) / (n - 1)
        # Mean: the CLT, Z standard errors of the predicted variance.
        assert abs(mean) <= Z * math.sqrt(variance / n), (col, mean)
        # Variance: for Laplace noise the sample variance has relative standard error sqrt(5/n)
        # (kurtosis 6: (mu4 - sigma^4) / sigma^4 = 5); Z + 0.5 of them (its law is skewed).
        assert abs(var / variance - 1) <= (Z + 0.5) * math.sqrt(5 / n), (col, var, variance)
        # Coverage: binomial with the interval's exact coverage p (0.95, or a little more for the
        # discrete law, whose interval is a whole number); and within the 90-99 %.
        coverage = covered[col] / n
        assert 0.90 <= coverage <= 0.99, (col, coverage)
        assert abs(coverage - p) <= Z * math.sqrt(p * (1 - p) / n), (col, coverage, p)
    print(  # the measured statistics (pytest -s shows them)
        {c: (sum(errors[c]) / n, covered[c] / n) for c in errors}, count.scale, total.scale, flush=True
    )


def test_avg_is_clamped_and_its_interval_covers() -> None:
    rng = random.Random(11)
    rows, truth = [], {}
    segments = [f"s{i}" for i in range(20)]
    unit = 0
    for s in segments[:-1]:  # the last segment of the domain holds no row
        amounts = [rng.uniform(1000, 4000) for _ in range(800)]
        for a in amounts:
            rows.append((unit, s, 30, a))
            unit += 1
        truth[s] = sum(amounts) / len(amounts)
    stage = _stage(
        "SELECT segment, AVG(amount) AS mean FROM bank_a.loans GROUP BY segment",
        {"bank_a": (_table(rows), _policy(segments=segments, groups=1, rows=1))},
        epsilon=2.0,
    )
    s_m, c_m = stage.mechanism.measurements
    covered = cells = 0
    for _ in range(20):
        out = stage.release()
        for r, half in zip(out.released.to_pylist(), out.ci95["mean"], strict=True):
            assert LO <= r["mean"] <= HI
            if r["segment"] in truth:
                cells += 1
                covered += abs(r["mean"] - truth[r["segment"]]) <= half
                # the delta-method half-width, from the noisy average and its noisy count (below
                # 800 + 10 half-widths with probability 1 - 20^-10)
                assert half >= (s_m.ci95 + abs(r["mean"]) * c_m.ci95) / (800 + 10 * c_m.ci95)
    # The delta-method interval adds both half-widths (conservative): >= 90 % of 380 cells when
    # its true coverage is >= 95 % fails with probability < 1e-7 (binomial tail, 5.5 sd).
    assert covered / cells >= 0.90, covered / cells


# --------------------------------------------------------------------------------------------
# contribution bounding


def test_one_unit_with_many_rows_moves_a_count_by_at_most_its_bounds() -> None:
    base = [(u, f"g{u % 8:03d}", 30, 100.0) for u in range(400)]
    heavy = [(9999, f"g{i % 50:03d}", 30, 4000.0) for i in range(1000)]  # one unit, 1000 rows, 50 groups
    segments = SEGMENTS[:50]
    sql = "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM bank_a.loans GROUP BY segment"
    without = _stage(sql, {"bank_a": (_table(base), _policy(segments=segments))}, epsilon=1.0)
    with_heavy = _stage(sql, {"bank_a": (_table(base + heavy), _policy(segments=segments))}, epsilon=1.0)
    before = {c["__sr_g0"]: c for c in without.cells()}
    for _ in range(3):  # random choice of rows and groups: every draw within the bounds
        after = {c["__sr_g0"]: c for c in with_heavy.cells()}
        moved = {g: after[g]["__sr_m0"] - before[g]["__sr_m0"] for g in segments}
        assert all(0 <= d <= 10 for d in moved.values())  # <= max_rows per group
        assert sum(1 for d in moved.values() if d) <= 4  # <= max_groups
        assert sum(moved.values()) == 4 * 10  # it has enough rows to fill its bounds
        assert math.isclose(sum(after[g]["__sr_m1"] - before[g]["__sr_m1"] for g in segments), 40 * 4000.0)


def test_a_join_that_repeats_one_units_rows_cannot_multiply_its_weight() -> None:
    a = _table([(u, "g000", 30, 10.0) for u in range(50)])
    b = _table([(u, "g000", 30, 10.0) for u in range(50)] + [(7, "g000", 30, 5000.0)] * 1000)
    stage = _stage(
        "SELECT COUNT(*) AS n, SUM(b.amount) AS total FROM bank_a.loans a "
        "JOIN bank_b.loans b ON a.customer_id = b.customer_id",
        {"bank_a": (a, _policy()), "bank_b": (b, _policy())},
        epsilon=1.0,
    )
    (cell,) = stage.cells()
    # 49 units with one joined row each; unit 7 has 1001 joined rows, of which max_rows are kept.
    assert cell["__sr_m0"] == 49 + 10
    assert cell["__sr_m1"] <= 49 * 10.0 + 10 * 5000.0


def test_each_joined_input_is_bounded_by_its_own_owners_bounds_and_null_units_as_one() -> None:
    a = _table([(u, "g000", 30, 1.0) for u in range(20)] + [(5, "g000", 30, 1.0)] * 99)
    b = _table([(u, "g000", 30, 1.0) for u in range(20)])
    stage = _stage(
        "SELECT COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id",
        {"bank_a": (a, _policy(rows=5)), "bank_b": (b, _policy(rows=3))},
        epsilon=1.0,
    )
    (cell,) = stage.cells()
    assert cell["__sr_m0"] == 19 + 3  # unit 5's 100 joined rows: bank_a keeps 5, then bank_b keeps 3
    nulls = pa.table(
        {
            "customer_id": pa.array([None] * 50 + list(range(10)), pa.int64()),
            "segment": ["g000"] * 60,
            "age": [30] * 60,
            "amount": [1.0] * 60,
        },
        schema=SCHEMA,
    )
    alone = _stage("SELECT COUNT(*) AS n FROM bank_a.loans", {"bank_a": (nulls, _policy())}, epsilon=1.0)
    (cell,) = alone.cells()
    assert cell["__sr_m0"] == 10 + 10  # the rows without a unit are bounded as one unit


def test_a_union_bounds_each_branch_per_unit() -> None:
    a = _table([(1, "g000", 30, 1.0)] * 100)
    b = _table([(1, "g000", 30, 1.0)] * 100)  # the same unit id in another dataset: bounded apart
    stage = _stage(
        "SELECT u.segment, COUNT(*) AS n FROM (SELECT customer_id, segment FROM bank_a.loans "
        "UNION ALL SELECT customer_id, segment FROM bank_b.loans) u GROUP BY u.segment",
        {"bank_a": (a, _policy(segments=["g000"], rows=3)), "bank_b": (b, _policy(segments=["g000"], rows=5))},
        epsilon=1.0,
    )
    (cell,) = stage.cells()
    assert cell["__sr_m0"] == 3 + 5


# --------------------------------------------------------------------------------------------
# groups without a public domain


def test_partition_selection_drops_a_group_of_one_unit_and_never_lists_it() -> None:
    rows = [(u, "x", 30, 1.0) for u in range(4000)] + [(99999, "x", 77, 1.0)]
    stage = _stage(
        "SELECT age, COUNT(*) AS n FROM bank_a.loans GROUP BY age",
        {"bank_a": (_table(rows), _policy())},
        epsilon=1.0,
    )
    selection = stage.mechanism.selection
    assert selection is not None and stage.mechanism.domain is None
    # 4000 rows lie (4000 - threshold) / scale > 20 scales above the threshold: kept with probability
    # > 1 - 1e-8; one unit's row lies > 16 scales below it: dropped with probability > 1 - 1e-7.
    assert (4000 - selection.threshold) / selection.scale > 20 and selection.threshold / selection.scale > 16
    for _ in range(3):
        out = stage.release()
        assert out.released.column_names == ["age", "n"]
        assert out.released.column("age").to_pylist() == [30]
        assert len(out.ci95["n"]) == 1
        assert "77" not in repr(out.privacy)


# --------------------------------------------------------------------------------------------
# the release


def test_having_order_and_limit_apply_to_noisy_values_with_their_intervals() -> None:
    rows = [(u, SEGMENTS[u % 10], 30, float(u % 5000)) for u in range(3000)]
    stage = _stage(
        "SELECT segment, COUNT(*) AS n, AVG(amount) AS mean FROM bank_a.loans GROUP BY segment "
        "HAVING COUNT(*) > 100 ORDER BY n DESC, segment LIMIT 4",
        {"bank_a": (_table(rows), _policy(segments=SEGMENTS[:12]))},
        epsilon=30.0,
    )
    (c,) = [m for m in stage.mechanism.measurements if m.key == "count(*)"]
    # The two empty segments pass HAVING only with noise above 100 = 25 scales: probability < 1e-10.
    assert 100 / c.scale >= 25
    out = stage.release()
    got = out.released.to_pylist()
    assert out.released.column_names == ["segment", "n", "mean"] and len(got) == 4
    assert [r["n"] for r in got] == sorted((r["n"] for r in got), reverse=True)
    assert all(r["n"] > 100 for r in got)  # HAVING tests the noisy value it releases
    assert out.ci95["n"] == [c.ci95] * 4 and len(out.ci95["mean"]) == 4
    mean = stage.mechanism.output("mean")
    assert mean is not None
    s_m, c_m = (stage.mechanism.measurement(k) for k in mean.measurements)
    # The AVG half-width is computed from the row it sits on, so it stays aligned through ORDER BY
    # and LIMIT; the noisy count lies below 300 + 10 half-widths (probability 1 - 20^-10).
    for r, half in zip(got, out.ci95["mean"], strict=True):
        assert half >= (s_m.ci95 + abs(r["mean"]) * c_m.ci95) / (300 + 10 * c_m.ci95) - 1e-9


def test_noise_that_would_spend_more_than_the_mechanism_allows_fails_the_job() -> None:
    stage = _stage(
        "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment",
        {"bank_a": (_table([(1, "g000", 30, 1.0)]), _policy(segments=["g000"]))},
        epsilon=1.0,
    )
    (m,) = stage.mechanism.measurements
    weakened = dataclasses.replace(stage.mechanism, measurements=(dataclasses.replace(m, scale=m.scale / 2),))
    with pytest.raises(JobFailedError) as err:
        stage.release(weakened)
    assert err.value.details["rule"] == "privacy_mechanism"


def test_an_expression_that_raises_on_a_hidden_value_does_not_fail_the_stage() -> None:
    rows = [(u, "12" if u % 2 else "abc", 30, 1.0) for u in range(20)]
    data = {"bank_a": (_table(rows), _policy(segments=["g000"])), "bank_b": (_table(rows), _policy())}
    stage = _stage(
        "SELECT COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
        "WHERE CAST(a.segment AS INTEGER) + b.age > 0",
        data,
        epsilon=1.0,
    )
    (cell,) = stage.cells()
    assert cell["__sr_m0"] == 10  # the rows whose cast fails are filtered out, not an error
    assert stage.release().released.num_rows == 1


def test_a_caller_gone_before_the_stage_ran_computes_nothing() -> None:
    stage = _stage(
        "SELECT COUNT(*) AS n FROM bank_a.loans",
        {"bank_a": (_table([(1, "g000", 30, 1.0)]), _policy())},
        epsilon=1.0,
    )
    with pytest.raises(DeadlineExceededError):
        run_dp_stage(stage.sql, stage.inputs, stage.tables, stage.mechanism, on_cancel=lambda _callback: False)


def test_discrete_interval_is_the_exact_quantile() -> None:
    assert _discrete_coverage(80.0, laplace_ci95(80.0, discrete=True)) >= 0.95
