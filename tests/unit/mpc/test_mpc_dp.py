"""Differential privacy on MPC stages (issue 14): Pólya noise shares, bounded partials, the dp
stage a planner builds and every checker recomputes, and the intervals it releases."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, plan_query
from mpc.partials import local_partials, noise_share
from mpc.program import dp_columns
from mpc.result import MpcResult
from sealroom.errors import PolicyRefusalError
from sealroom.planning.checks import Checker, check_plan
from sealroom.planning.mpc_privacy import distributed_ci95
from sealroom.planning.mpc_spec import StageSpec
from sealroom.planning.plan import MpcStage, Plan
from sealroom.planning.privacy import laplace_ci95
from sealroom.policy import DatasetPolicy, DatasetTrust

N = 200_000


def _nb_diff_variance(shape: float, scale: float) -> float:
    """Var(NB(n, p) - NB(n, p)) = 2 n (1 - p) / p^2 with p = 1 - e^{-1/b}, i.e. 2 n q / (1 - q)^2."""
    q = math.exp(-1 / scale)
    return 2 * shape * q / (1 - q) ** 2


@pytest.mark.parametrize(("holders", "t", "scale"), [(3, 1, 4.0), (2, 1, 25.0), (5, 2, 10.0)])
def test_shares_sum_to_the_predicted_noise_and_survive_t_dropped_shares(holders: int, t: int, scale: float) -> None:
    rng = np.random.default_rng(7)
    r = 1 / (holders - t)
    shares = [noise_share(scale, r, N, rng) for _ in range(holders)]
    total = np.sum(shares, axis=0)
    var = _nb_diff_variance(holders * r, scale)
    # mean 0 within 5 standard errors; variance within 5 standard errors of the sample variance
    # (its standard error from the fourth moment, estimated).
    assert abs(total.mean()) < 5 * math.sqrt(var / N)
    m4 = float(np.mean((total - total.mean()) ** 4))
    assert abs(total.var() - var) < 5 * math.sqrt((m4 - var**2) / N)
    # Drop t shares (colluders): the honest rest is exactly one discrete Laplace(scale).
    honest = np.sum(shares[t:], axis=0)
    lap = _nb_diff_variance(1.0, scale)
    m4h = float(np.mean((honest - honest.mean()) ** 4))
    assert abs(honest.var() - lap) < 5 * math.sqrt((m4h - lap**2) / N)
    # ... and its law is the discrete Laplace: P(0) = (1 - q) / (1 + q).
    q = math.exp(-1 / scale)
    p0 = (1 - q) / (1 + q)
    assert abs(np.mean(honest == 0) - p0) < 5 * math.sqrt(p0 * (1 - p0) / N)
    # The released interval covers about 95 % of the total noise.
    ci = distributed_ci95(scale, holders * r)
    cover = float(np.mean(np.abs(total) <= ci))
    assert 0.95 <= cover < 0.95 + 5 * math.sqrt(0.05 * 0.95 / N) + 0.02


def test_interval_of_one_full_laplace_is_the_closed_form_and_grows_with_more_shares() -> None:
    for b in (0.5, 3.0, 100.0, 5000.0):
        assert distributed_ci95(b, 1.0) == laplace_ci95(b, discrete=True)
        assert distributed_ci95(b, 1.5) >= laplace_ci95(b, discrete=True)
    # Above the exact range the quantile is scaled: within 0.5 % of a Monte Carlo estimate.
    rng = np.random.default_rng(3)
    b = 20_000.0
    x = noise_share(b, 1.5, N, rng)
    assert distributed_ci95(b, 1.5) == pytest.approx(float(np.quantile(np.abs(x), 0.95)), rel=0.01)


# --------------------------------------------------------------------------------------------------
# plans

REGIONS = ["north", "south"]
SCHEMA = pa.schema([("person_id", pa.string()), ("region", pa.string()), ("visits", pa.int64())])


def _policy(mpc_only: bool = True, **dp: object) -> DatasetPolicy:
    p = DatasetPolicy.from_dict(
        {
            "privacy_unit": "person_id",
            "min_group_size": 5,
            "columns": {
                "person_id": "join_key",
                "region": {"role": "dimension", "values": REGIONS},
                "visits": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 2.5},
            },
            "privacy": {"mode": "dp", "epsilon_budget": 4.0, "max_groups_per_unit": 1, "max_rows_per_unit": 2, **dp},
        }
    )
    return dataclasses.replace(p, trust=DatasetTrust(mpc_only=True)) if mpc_only else p


SQL = (
    "SELECT region, COUNT(*) AS n, SUM(visits) AS total, AVG(visits) AS mean FROM "
    "(SELECT * FROM a.people UNION ALL SELECT * FROM b.people UNION ALL SELECT * FROM c.people) p GROUP BY region"
)


def _plan(policies: dict[str, DatasetPolicy], epsilon: float = 0.6) -> Plan:
    catalog = {f"{k}.people": CatalogEntry(k, "people", SCHEMA, p) for k, p in policies.items()}
    plan, _ = plan_query(
        SQL,
        query_id="q1",
        analyst="alice",
        catalog=catalog,
        party_keys={k: "ab" * 32 for k in policies},
        helper_key="cd" * 32,
        epsilon=epsilon,
    )
    return plan


def test_a_dp_mpc_stage_carries_the_enclaves_mechanism_and_every_checker_recomputes_it() -> None:
    plan = _plan({k: _policy() for k in "abc"})
    (stage,) = plan.stages
    assert isinstance(stage, MpcStage) and plan.privacy is not None and plan.privacy.delta == 0
    dp = stage.spec.dp
    assert dp is not None and dp.honest == 2 and (dp.max_groups, dp.max_rows) == (1, 2)
    # COUNT(*), SUM(visits), COUNT(visits) (AVG reuses the SUM): 0.2 each; a COUNT's sensitivity is
    # G*R = 2, the SUM's 2 * 2.5, in tenths (the fixed point of a measure bounded by 2.5).
    assert dict(dp.scales) == {
        "rows": pytest.approx(2 / 0.2),
        "n:visits": pytest.approx(2 / 0.2),
        "s:visits": pytest.approx(2 * 25 / 0.2),
    }
    assert dp.privacy["charges"] == [
        {"dataset": f"{k}.people", "scope": "analyst:alice", "epsilon": 0.6, "delta": 0.0} for k in "abc"
    ]
    got = check_plan(Plan.from_json(plan.to_json()), Checker(party="a"))
    assert set(got.mpc_mechanisms) == {stage.id} and not got.mechanisms
    # A plan whose noise is smaller than the plan implies is refused by every checker.
    bad = dataclasses.replace(dp, scales=(("rows", 1.0), ("s:visits", 1.0)))
    tampered = dataclasses.replace(
        plan, stages=(dataclasses.replace(stage, spec=dataclasses.replace(stage.spec, dp=bad)),)
    )
    with pytest.raises(PolicyRefusalError) as err:
        check_plan(tampered, Checker(party="b"))
    assert err.value.details["rule"] == "privacy_mode"


def test_bounded_noisy_partials_and_the_released_columns() -> None:
    plan = _plan({k: _policy() for k in "abc"})
    spec = plan.stages[0].spec  # type: ignore[attr-defined]
    assert isinstance(spec, StageSpec) and spec.dp is not None
    # One person with 50 rows in north and 10 in south: at most 1 group and 2 rows of it count.
    rows = pa.table(
        {
            "__sr_unit": ["p1"] * 60 + ["p2"],
            "region": ["north"] * 50 + ["south"] * 10 + ["south"],
            "visits": pa.array([9] * 61, pa.int64()),
        }
    )
    exact = dataclasses.replace(
        spec, dp=dataclasses.replace(spec.dp, scales=tuple((v, 1e-9) for v, _ in spec.dp.scales))
    )
    p = local_partials(rows, exact, party="a")
    # p1 keeps 2 rows of one region; p2 its one row in south: 3 rows, each clamped to 2.5 (25 tenths).
    assert sum(p.values["rows"]) == 3 and sum(p.values["s:visits"]) == 75
    noisy = [local_partials(rows, spec, party="a").values["rows"] for _ in range(3)]
    assert len({tuple(v) for v in noisy}) > 1  # fresh noise every time
    cols = dp_columns(spec, {"rows": [10, -2], "n:visits": [10, -2], "s:visits": [120, 30]})
    assert cols == {"n": [10, -2], "total": [12.0, 3.0], "mean": [1.2, 2.5]}
    result = MpcResult.from_opened(
        spec, {"pattern": [1, 1], "columns": cols, "noisy_counts": {"rows": [10, -2], "n:visits": [10, -2]}}
    ).to_dict()
    assert result["rule"]["name"] == "dp" and result["suppressed"] == [] and len(result["cells"]) == 2
    ci = result["ci95"]
    assert ci["n"] == [distributed_ci95(dict(spec.dp.scales)["rows"], 1.5)] * 2
    assert ci["total"][0] == pytest.approx(distributed_ci95(dict(spec.dp.scales)["s:visits"], 1.5) / 10)
    assert ci["mean"][1] == 2.5  # at most the measure's range
    assert result["privacy"]["mechanisms"][0]["mechanism"] == "distributed_discrete_laplace"


def test_over_many_cells_the_summed_partials_match_the_mechanism() -> None:
    """Three holders' noisy partials over a 2,000-cell domain, added as the MPC adds them: mean
    error near zero, the variance the scales predict, and about 95 % of cells inside their ci95."""
    cells = [f"c{i}" for i in range(2000)]
    spec = _plan({k: _policy() for k in "abc"}).stages[0].spec  # type: ignore[attr-defined]
    spec = dataclasses.replace(spec, domain=tuple((c,) for c in cells))
    rng = np.random.default_rng(5)
    exact = np.zeros(len(cells), dtype=np.int64)
    total = np.zeros(len(cells), dtype=np.int64)
    for party in "abc":
        region = [cells[i] for i in rng.integers(0, len(cells), 3000)]
        rows = pa.table({"__sr_unit": [f"{party}{i}" for i in range(3000)], "region": region, "visits": [1] * 3000})
        counts = pa.table({"region": region}).group_by("region").aggregate([("region", "count")]).to_pydict()
        for key, n in zip(counts["region"], counts["region_count"], strict=True):
            exact[cells.index(key)] += n
        total += np.array(local_partials(rows, spec, party=party).values["rows"])
    err = (total - exact).astype(float)
    b = dict(spec.dp.scales)["rows"]
    var = _nb_diff_variance(3 / 2, b)
    assert abs(err.mean()) < 5 * math.sqrt(var / len(cells))
    assert err.var() == pytest.approx(var, rel=0.2)
    cover = float(np.mean(np.abs(err) <= distributed_ci95(b, 1.5)))
    assert 0.90 <= cover <= 0.99
