"""The analyst's commands against a running platform: datasets, explain, submit, status, result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.policy import DatasetPolicy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pq.write_table(
        pa.table({"customer_id": pa.array(range(20), pa.int64()), "segment": ["retail"] * 12 + ["sme"] * 8}),
        d / "a.parquet",
    )
    policy = DatasetPolicy("customer_id", 5, share_row_count=True)
    parties = [PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), policy),))]
    with Cluster(d / "state", parties) as cluster:
        yield cluster


def cli(platform, *args):
    env = dict(os.environ, **platform.analyst_env())
    return subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment ORDER BY segment"


def test_datasets_and_explain(platform):
    ds = json.loads(cli(platform, "datasets", "--json").stdout)
    assert ds == [
        {
            "dataset": "bank_a.loans",
            "columns": ["customer_id", "segment"],
            "policy": DatasetPolicy("customer_id", 5, share_row_count=True).to_dict(),
            "description": "",
            "approximate_rows": 20,
        }
    ]
    proc = cli(platform, "explain", SQL)
    assert proc.returncode == 0
    assert "bank_a.loans: customer_id, segment" in proc.stdout and "Approvals needed from: bank_a" in proc.stdout
    assert "about 20 rows in the dataset (shared by its owner)" in proc.stdout
    plan = json.loads(cli(platform, "explain", "--json", SQL).stdout)["plan"]
    assert plan["stages"][0]["inputs"][0]["columns"] == ["customer_id", "segment"]


def test_explain_refusal_exits_1_with_reason(platform):
    proc = cli(platform, "explain", "--json", "SELECT customer_id FROM bank_a.loans")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["status"] == "refused" and doc["reason"]["code"] == "invalid_query"
    assert "row-level" in proc.stderr


def test_submit_status_result(platform):
    proc = cli(platform, "submit", "--wait", "--json", SQL)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "released" and doc["rows"] == [["retail", 12], ["sme", 8]]
    st = json.loads(cli(platform, "status", "--json", doc["query_id"]).stdout)
    assert st["status"] == "released" and st["approved_by"] == ["bank_a"]
    again = cli(platform, "result", doc["query_id"])
    assert again.returncode == 0 and "retail" in again.stdout and "SIMULATED" in again.stdout
    missing = cli(platform, "result", "q_nonexistent")
    assert missing.returncode == 1 and "no query q_nonexistent" in missing.stderr


def test_unusable_coordinator_address_exits_2(platform):
    proc = cli(platform, "status", "--coordinator", "not-an-address")
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr
