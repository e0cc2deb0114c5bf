"""Differential privacy on MPC stages end to end (issue 14): owners in dp mode who accept no enclave
run their own players; each adds its Pólya noise share to its bounded partials, and every cell of
the public domain is released with noise and its 95 % interval (real servers, real MPyC)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.policy import DatasetPolicy, DatasetTrust

pytestmark = pytest.mark.slow

REGIONS = ["north", "south", "west"]
POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "person_id",
        "min_group_size": 5,
        "columns": {
            "person_id": "join_key",
            "region": {"role": "dimension", "values": REGIONS},
            "visits": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 2.5},
        },
        "privacy": {"mode": "dp", "epsilon_budget": 4.0, "max_groups_per_unit": 1, "max_rows_per_unit": 1},
    }
)
MPC_ONLY = dataclasses.replace(POLICY, trust=DatasetTrust(mpc_only=True))


def _sql(owners: int) -> str:
    union = " UNION ALL ".join(f"SELECT * FROM owner_{o}.people" for o in range(owners))
    return (
        "SELECT region, COUNT(*) AS people, SUM(visits) AS visits, AVG(visits) AS mean_visits "
        f"FROM ({union}) p GROUP BY region ORDER BY region"
    )


def _tables(owners: int) -> list[pa.Table]:
    rng = np.random.default_rng(140)
    out = []
    for o in range(owners):
        n = 300
        regions = [REGIONS[int(r)] for r in rng.integers(0, 2, n)]  # nobody in west: released with noise anyway
        out.append(
            pa.table(
                {
                    "person_id": [f"o{o}-{i}" for i in range(n)],
                    "region": regions,
                    "visits": pa.array(rng.integers(0, 4, n), pa.int64()),
                }
            )
        )
    return out


@pytest.mark.parametrize(
    ("owners", "enclave"),
    [(3, 0), (2, 0), (3, 2)],
    ids=["three_owners", "two_owners_and_a_helper", "hybrid_two_to_the_enclave"],
)
def test_dp_owners_get_noisy_cells_with_intervals_from_an_mpc_stage(tmp_path: Path, owners: int, enclave: int) -> None:
    """``enclave``: how many owners (the first) accept the enclave, which then plays their holder
    (bounding and noising their rows as the owners' players do)."""
    tables = _tables(owners)
    parties = []
    for o, table in enumerate(tables):
        path = tmp_path / f"o{o}.parquet"
        pq.write_table(table, path)
        policy = POLICY if o < enclave else MPC_ONLY
        parties.append(PartySpec(f"owner_{o}", (DatasetSpec("people", str(path), policy),)))
    con = duckdb.connect()
    con.register("people", pa.concat_tables(tables))
    exact = {
        r: (n, s)
        for r, n, s in con.sql(
            "SELECT region, COUNT(*), SUM(LEAST(visits, 2.5)) FROM people GROUP BY region"
        ).fetchall()
    }
    with Cluster(tmp_path / "state", parties, log=lambda _m: None) as cluster, cluster.client() as client:
        plan = client.explain_plan(_sql(owners))
        stages = plan["plan"]["stages"] if "plan" in plan else plan["stages"]
        stage = stages[-1]
        assert [s["kind"] for s in stages] == (["tee", "mpc"] if enclave else ["mpc"])
        holders = owners - enclave + (1 if enclave else 0)
        assert stage["kind"] == "mpc" and stage["mpc"]["dp"]["honest"] == max(holders - 1, 1)
        runs = []
        for _ in range(2):
            result = client.run(_sql(owners))
            assert result.status == "released", result.error
            runs.append(result)
    first, second = runs
    rows = [list(r) for r in first.rows()]
    # Every cell of the public domain, west included (nobody there), none suppressed.
    assert [r[0] for r in rows] == REGIONS and first.suppressed == []
    record = first.receipt["result"]
    assert record["result"]["rule"]["name"] == "dp"
    privacy = record["privacy"]
    assert {m["mechanism"] for m in privacy["mechanisms"]} == {"distributed_discrete_laplace"}
    assert [c["epsilon"] for c in privacy["charges"]] == [
        plan["plan"]["privacy"]["epsilon"] if "plan" in plan else plan["privacy"]["epsilon"]
    ] * owners
    ci = record["ci95"]
    assert set(ci) == {"people", "visits", "mean_visits"} and all(len(v) == 3 for v in ci.values())
    assert all(w > 0 for v in ci.values() for w in v)
    # Fresh noise: the two runs differ; each stays near the exact value (far inside 20 half-widths).
    assert [list(r) for r in second.rows()] != rows
    for region, n, total, _ in rows:
        true_n, true_s = exact.get(region, (0, 0.0))
        i = REGIONS.index(region)
        assert abs(n - true_n) <= 20 * ci["people"][i] and abs(total - float(true_s)) <= 20 * ci["visits"][i]
