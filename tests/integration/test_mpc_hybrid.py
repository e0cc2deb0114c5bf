"""Hybrid plans end to end: owners who accept the enclave stream sealed batches to it, the enclave
computes their partial aggregates and joins the MPC stage as one more player next to the
``mpc_only`` owners' players (real processes, real gRPC, real DuckDB, real MPyC over TLS)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.app.render import result_document
from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.audit.receipts import verify_receipt
from sealroom.policy import DatasetPolicy, DatasetTrust
from sealroom.v1 import common_pb2, enclave_pb2_grpc
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
            "age": {"role": "dimension", "bins": [0, 40, 65, 120]},
            "length_of_stay": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 365},
            "cost": {"role": "measure", "aggregates": ["sum", "avg", "stddev"], "min": 0, "max": 200000},
        },
    }
)
MPC_ONLY = dataclasses.replace(POLICY, trust=DatasetTrust(mpc_only=True))


def _stays(hospital: int, rng: np.random.Generator) -> pa.Table:
    rows = []
    for d, n in (("cardiology", 14), ("oncology", 10), ("orthopedics", 8), ("prion_disease", 1)):
        for j in range(n + int(rng.integers(0, 3))):
            rows.append(
                (
                    f"h{hospital}-{d}-{j}",
                    d,
                    int(rng.integers(18, 95)),
                    int(rng.integers(1, 30)),
                    int(rng.integers(500, 90000)),
                )
            )
    names = ["patient_id", "diagnosis", "age", "length_of_stay", "cost"]
    types = [pa.string(), pa.string(), pa.int32(), pa.int32(), pa.int64()]
    schema = pa.schema([pa.field(n, t, nullable=False) for n, t in zip(names, types, strict=True)])
    return pa.table([pa.array([r[i] for r in rows], t) for i, t in enumerate(types)], schema=schema)


def _platform(tmp_path: Path, hospitals: int, mpc_only: set[int]) -> tuple[list[PartySpec], list[pa.Table]]:
    rng = np.random.default_rng(23)
    parties, tables = [], []
    for h in range(hospitals):
        table = _stays(h, rng)
        path = tmp_path / f"h{h}.parquet"
        pq.write_table(table, path)
        policy = MPC_ONLY if h in mpc_only else POLICY
        parties.append(PartySpec(f"hospital_{h}", (DatasetSpec("stays", str(path), policy),)))
        tables.append(table)
    return parties, tables


def _sql(hospitals: int) -> str:
    union = " UNION ALL ".join(f"SELECT * FROM hospital_{h}.stays" for h in range(hospitals))
    return (
        "SELECT diagnosis, age, COUNT(*) AS patients, AVG(length_of_stay) AS mean_stay, "
        f"STDDEV_SAMP(cost) AS sd_cost FROM ({union}) s GROUP BY diagnosis, age ORDER BY diagnosis, age"
    )


def _expected(tables: list[pa.Table]) -> dict[tuple[str, str], tuple[int, float, float | None]]:
    con = duckdb.connect()
    con.register("stays", pa.concat_tables(tables))
    rows = con.sql(
        "SELECT diagnosis, CASE WHEN age < 40 THEN '[0, 40)' WHEN age < 65 THEN '[40, 65)' "
        "ELSE '[65, 120)' END AS band, COUNT(*), AVG(length_of_stay), STDDEV_SAMP(cost), COUNT(DISTINCT patient_id) "
        "FROM stays GROUP BY ALL"
    ).fetchall()
    return {(d, b): (n, m, sd) for d, b, n, m, sd, _units in rows}


@pytest.mark.parametrize(
    ("hospitals", "mpc_only", "helpers"),
    [(3, {2}, 1), (5, {2, 3, 4}, 0)],
    ids=["three_players_one_a_helper", "four_players_three_mpc_only_owners"],
)
def test_hybrid_plan_releases_what_pooled_duckdb_computes(
    tmp_path: Path, request: pytest.FixtureRequest, hospitals: int, mpc_only: set[int], helpers: int
) -> None:
    parties, tables = _platform(tmp_path, hospitals, mpc_only)
    sql = _sql(hospitals)
    # The enclave player's scratch: memory-backed, and this test's own (other processes on the machine
    # may use /dev/shm at the same time), so what is left in it afterwards is this test's doing.
    scratch = Path(tempfile.mkdtemp(prefix="sealroom-test-", dir="/dev/shm"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    with (
        Cluster(tmp_path / "state", parties, log=lambda _m: None, mpc_scratch_dir=scratch) as cluster,
        cluster.client() as client,
    ):
        explained = client.explain_plan(sql)
        plan = explained.get("plan", explained)
        tee, mpc = plan["stages"]
        assert tee["kind"] == "tee" and tee["feeds"] == mpc["id"] and mpc["kind"] == "mpc"
        assert sorted(i["party"] for i in tee["inputs"]) == [
            f"hospital_{h}" for h in range(hospitals) if h not in mpc_only
        ]
        assert sorted(i["party"] for i in mpc["inputs"]) == [f"hospital_{h}" for h in sorted(mpc_only)]
        names = [p["name"] for p in mpc["mpc"]["players"]]
        assert names == [*(f"hospital_{h}" for h in sorted(mpc_only)), "enclave", *(["coordinator"] * helpers)]

        result = client.run(sql)
        assert result.status == "released", result.error
        expected = _expected(tables)
        got = {(r[0], r[1]): r[2:] for r in result.rows()}
        # Units are not known to be disjoint across players: a cell passes when some single input
        # holder (the enclave with the streamed hospitals' rows, or an mpc_only hospital) holds k.
        holders = [[t for h, t in enumerate(tables) if h not in mpc_only], *([tables[h]] for h in sorted(mpc_only))]
        per_holder = [_expected(held) for held in holders]
        passing = {key for key in expected if max(e.get(key, (0,))[0] for e in per_holder) >= K}
        assert passing != {key for key, (n, *_rest) in expected.items() if n >= K}  # the data exercises the rule
        assert set(got) == passing and ("prion_disease", "[65, 120)") not in got
        for key, (n, mean, sd) in got.items():
            assert n == expected[key][0]  # counts exact
            assert mean == pytest.approx(expected[key][1], rel=1e-9)
            assert sd == pytest.approx(expected[key][2], rel=1e-6)
        suppressed = {(s["group"]["diagnosis"], s["group"]["age"]) for s in result.suppressed}
        assert suppressed and all(key not in got for key in suppressed)
        assert {("prion_disease", b) for b in ("[0, 40)", "[40, 65)", "[65, 120)")} <= suppressed

        # The record and receipt: both stages, the enclave's attestation, every player's signature.
        record = result.receipt["result"]
        assert record["kind"] == "sealroom.mpc_release"
        assert set(record["signatures"]) == {*(f"hospital_{h}" for h in mpc_only), "enclave"}
        assert record["feed"]["feeds"] == mpc["id"] and record["feed"]["released_rows"] == 0
        assert record["simulated"] is True  # the demo cluster's enclave attests in simulation
        assert {i["party"] for i in record["inputs"] if i["player"] == names.index("enclave")} == {
            f"hospital_{h}" for h in range(hospitals) if h not in mpc_only
        }
        doc = result_document(result)
        assert doc["attestation"]["simulated"] is True and "honest majority" in doc["mpc"]["trust_assumption"]
        assert "prion_disease" not in json.dumps(record["result"]["cells"])

        # The countersigned receipt verifies offline: the enclave's evidence and signed document for
        # stage s1, every player's signature over the opened result of stage s2.
        appraisal = AppraisalPolicy(
            measurements=frozenset({doc["attestation"]["measurement"]}),
            allow_simulated=True,
            simulated_roots=(load_root_certificate(tmp_path / "state" / "dev" / "dev-root.crt"),),
        )
        verified = verify_receipt(result.receipt["countersigned"], appraisal=appraisal, coordinator_key=None)
        assert verified.simulated and verified.evidence_appraised
        assert verified.parties == tuple(f"hospital_{h}" for h in range(hospitals))
        assert verified.suppressed_cells == len(result.suppressed)
        # Both stages bind the query's log position: the enclave's document and the players' result.
        receipt = result.receipt["countersigned"]
        assert verified.version == 2 and verified.log_position is not None
        assert [s["result"]["log"] for s in receipt["stages"]] == [receipt["log"]] * 2

        # The enclave worker itself never loaded MPyC (its player ran as its own process), and no
        # player process is left anywhere.
        with cluster.dial("enclave") as ch:
            loaded = set(enclave_pb2_grpc.EnclaveStub(ch).GetInfo(common_pb2.Empty(), timeout=10).loaded_packages)
        assert "mpyc" not in loaded and "coordinator" not in loaded and "connectors" not in loaded
        time.sleep(0.3)
        assert player_processes(cluster) == []
        # The enclave player's private directory (its TLS key, in memory) is gone with it.
        assert list(scratch.iterdir()) == []  # the enclave player's private directory is gone


def test_a_crashed_enclave_player_ends_the_stage_and_releases_nothing(tmp_path: Path) -> None:
    """The enclave's player process dies mid-stage: the query fails naming the enclave's player,
    nothing is released, and no player process is left anywhere."""
    parties, _ = _platform(tmp_path, 3, {2})
    with Cluster(tmp_path / "state", parties, log=lambda _m: None) as cluster, cluster.client() as client:
        handle = client.submit(_sql(3))
        assert kill_first_player(cluster.procs["enclave"].pid, timeout=60), "the enclave's player never started"
        result = handle.result(120, raise_on_error=False)
        assert result.status == "failed" and result.table is None
        assert result.error is not None and "enclave" in result.error.message, result.error
        time.sleep(0.5)
        assert player_processes(cluster) == []
