"""MPC plans end to end: owners who accept no enclave run their own MPyC players through their
agents, the coordinator adds a helper player when fewer than three owners take part, and only the
cells that pass the minimum group size are released (real processes, real gRPC, real MPyC)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.app.render import result_document
from sealroom.policy import DatasetPolicy, DatasetTrust
from tests.harness.enclave import kill_first_player, player_processes

pytestmark = pytest.mark.slow

K = 5
DIAGNOSES = ["cardiology", "oncology", "orthopedics", "prion_disease"]
POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "patient_id",
        "min_group_size": K,
        "columns": {
            "patient_id": "join_key",
            "diagnosis": {"role": "dimension", "values": DIAGNOSES},
            "length_of_stay": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 365},
        },
    }
)
MPC_ONLY = dataclasses.replace(POLICY, trust=DatasetTrust(mpc_only=True))


def _stays(hospital: int, rng: np.random.Generator) -> pa.Table:
    rows = []
    for d, n in (("cardiology", 12), ("oncology", 9), ("orthopedics", 7), ("prion_disease", 1)):
        for j in range(n + int(rng.integers(0, 3))):
            rows.append((f"h{hospital}-{d}-{j}", d, int(rng.integers(1, 30))))
    return pa.table(
        {
            "patient_id": [r[0] for r in rows],
            "diagnosis": [r[1] for r in rows],
            "length_of_stay": pa.array([r[2] for r in rows], pa.int32()),
        }
    )


def _platform(tmp_path: Path, hospitals: int) -> tuple[list[PartySpec], list[pa.Table]]:
    rng = np.random.default_rng(11)
    parties, tables = [], []
    for h in range(hospitals):
        table = _stays(h, rng)
        path = tmp_path / f"h{h}.parquet"
        pq.write_table(table, path)
        parties.append(PartySpec(f"hospital_{h}", (DatasetSpec("stays", str(path), MPC_ONLY),)))
        tables.append(table)
    return parties, tables


def _sql(hospitals: int) -> str:
    union = " UNION ALL ".join(f"SELECT * FROM hospital_{h}.stays" for h in range(hospitals))
    return (
        "SELECT diagnosis, COUNT(*) AS stays, AVG(length_of_stay) AS mean_stay "
        f"FROM ({union}) s GROUP BY diagnosis ORDER BY diagnosis"
    )


def _expected(tables: list[pa.Table]) -> dict[str, tuple[int, float]]:
    con = duckdb.connect()
    con.register("stays", pa.concat_tables(tables))
    rows = con.sql("SELECT diagnosis, COUNT(*), AVG(length_of_stay) FROM stays GROUP BY diagnosis").fetchall()
    return {d: (n, m) for d, n, m in rows}


@pytest.mark.parametrize("hospitals", [3, 2], ids=["three_owners", "two_owners_and_a_helper"])
def test_mpc_only_owners_release_only_passing_cells(tmp_path: Path, hospitals: int) -> None:
    parties, tables = _platform(tmp_path, hospitals)
    with Cluster(tmp_path / "state", parties, log=lambda _m: None) as cluster, cluster.client() as client:
        plan = client.explain_plan(_sql(hospitals))
        (stage,) = plan["plan"]["stages"] if "plan" in plan else plan["stages"]
        assert stage["kind"] == "mpc"
        players = stage["mpc"]["players"]
        assert len(players) == 3 and sum(not p["holds_input"] for p in players) == 3 - hospitals
        result = client.run(_sql(hospitals))
        assert result.status == "released", result.error
        got = {r[0]: (r[1], r[2]) for r in result.rows()}
        expected = _expected(tables)
        # prion_disease: one patient per hospital, below k everywhere: suppressed, never opened.
        assert set(got) == {"cardiology", "oncology", "orthopedics"}
        for d, (n, mean) in got.items():
            assert n == expected[d][0] and mean == pytest.approx(expected[d][1], rel=1e-9)
        assert [s["group"] for s in result.suppressed] == [{"diagnosis": "prion_disease"}]
        assert result.suppressed[0]["rule"] == "min_group_size" and "never opened" in result.suppressed[0]["reason"]
        assert result.columns == ["diagnosis", "stays", "mean_stay"] and [r[0] for r in result.rows()] == sorted(got)
        assert result.simulated is False
        record = result.receipt["result"]
        assert record["kind"] == "sealroom.mpc_release" and "honest majority" in record["trust_assumption"]
        assert set(record["signatures"]) == {f"hospital_{h}" for h in range(hospitals)}
        # Every player signed the query's log position (from its owner's approval), as the receipt binds it.
        assert record["result"]["log"] == result.receipt["countersigned"]["log"]
        doc = result_document(result)
        assert doc["mpc"]["trust_assumption"] == record["trust_assumption"] and "attestation" not in doc
        assert sorted(i["mpc_player"] for i in result.inputs()) == list(range(hospitals))
        # Nothing of the suppressed cell anywhere in what the coordinator stored or returned.
        assert all(c["key"] != ["prion_disease"] for c in record["result"]["cells"])
        assert "prion_disease" not in json.dumps(record["result"]["cells"])


def test_a_crashed_player_ends_the_stage_naming_its_owner(tmp_path: Path) -> None:
    """hospital_1's player process dies mid-stage: the query fails naming hospital_1, nothing is
    released, and no player process is left anywhere."""
    parties, _ = _platform(tmp_path, 3)
    with Cluster(tmp_path / "state", parties, log=lambda _m: None) as cluster, cluster.client() as client:
        handle = client.submit(_sql(3))
        assert kill_first_player(cluster.procs["party-hospital_1"].pid, timeout=30), "hospital_1's player never started"
        result = handle.result(120, raise_on_error=False)
        assert result.status == "failed" and result.table is None
        assert result.error is not None and "hospital_1" in result.error.message, result.error
        time.sleep(0.5)
        assert player_processes(cluster) == []
