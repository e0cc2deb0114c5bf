"""Bounds mean the same on every path (issue 14): the same query and policies give the same SUM
through the enclave (TEE plan) and through an MPC plan, on an integer measure whose owners allow at
most 2.5 per row. Before the fix the MPC path clamped to ceil(2.5) = 3 (real servers, real MPyC)."""

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
        "min_group_size": 3,
        "columns": {
            "person_id": "join_key",
            "region": {"role": "dimension", "values": REGIONS},
            "visits": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 2.5},
        },
    }
)
MPC_ONLY = dataclasses.replace(POLICY, trust=DatasetTrust(mpc_only=True))
SQL = (
    "SELECT region, SUM(visits) AS visits, AVG(visits) AS mean_visits, COUNT(*) AS people FROM "
    "(SELECT * FROM owner_0.people UNION ALL SELECT * FROM owner_1.people UNION ALL SELECT * FROM owner_2.people) p "
    "GROUP BY region ORDER BY region"
)


def _tables() -> list[pa.Table]:
    rng = np.random.default_rng(14)
    out = []
    for o in range(3):
        n = 40
        out.append(
            pa.table(
                {
                    "person_id": [f"o{o}-{i}" for i in range(n)],
                    "region": [REGIONS[int(r)] for r in rng.integers(0, 3, n)],
                    "visits": pa.array(rng.integers(0, 7, n), pa.int64()),  # many above 2.5
                }
            )
        )
    return out


def _run(tmp_path: Path, policy: DatasetPolicy, tables: list[pa.Table]) -> tuple[str, dict[str, tuple]]:
    tmp_path.mkdir(parents=True)
    parties = []
    for o, table in enumerate(tables):
        path = tmp_path / f"o{o}.parquet"
        pq.write_table(table, path)
        parties.append(PartySpec(f"owner_{o}", (DatasetSpec("people", str(path), policy),)))
    with Cluster(tmp_path / "state", parties, log=lambda _m: None) as cluster, cluster.client() as client:
        plan = client.explain_plan(SQL)
        stages = plan["plan"]["stages"] if "plan" in plan else plan["stages"]
        result = client.run(SQL)
        assert result.status == "released", result.error
        return stages[-1]["kind"], {r[0]: tuple(r[1:]) for r in result.rows()}


def test_the_same_sum_through_the_enclave_and_through_mpc(tmp_path: Path) -> None:
    tables = _tables()
    con = duckdb.connect()
    con.register("people", pa.concat_tables(tables))
    expected = {
        r: (s, a, n)
        for r, s, a, n in con.sql(
            "SELECT region, SUM(LEAST(visits, 2.5)), AVG(LEAST(visits, 2.5)), COUNT(*) FROM people GROUP BY region"
        ).fetchall()
    }
    assert any(float(s) != int(s) for s, _, _ in expected.values())  # the clamp at 2.5 shows in the sums
    kind, tee = _run(tmp_path / "tee", POLICY, tables)
    assert kind == "tee"
    kind, mpc = _run(tmp_path / "mpc", MPC_ONLY, tables)
    assert kind == "mpc"
    assert set(tee) == set(mpc) == set(expected)
    for region, (s, a, n) in expected.items():
        assert float(tee[region][0]) == pytest.approx(float(s), abs=1e-9)
        assert float(mpc[region][0]) == pytest.approx(float(s), abs=1e-9), region
        assert float(mpc[region][1]) == pytest.approx(float(a), rel=1e-9) and mpc[region][2] == tee[region][2] == n
