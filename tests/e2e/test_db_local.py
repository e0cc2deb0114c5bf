"""`sealroom local` on databases: the same rows in PostgreSQL and SQLite (or a DuckDB file) release
exactly the cells that Parquet files of those rows release, filters pushed down included."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total, AVG(b.exposure) AS mean_b "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "WHERE a.rating IN ('A', 'B') AND b.exposure > 100 AND b.region <> 'north' "
    "GROUP BY a.segment ORDER BY a.segment"
)


def _tables() -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(7)
    n = 600
    segment = rng.choice(["retail", "sme", "corporate"], n).tolist()
    rating = rng.choice(["A", "B", "C", "none"], n).tolist()
    m = n // 2  # bank_b knows the even customer ids
    b_exposure = np.round(rng.uniform(0, 500, m), 2)
    region = rng.choice(["north", "south", "east"], m).tolist()
    for k in (0, 1):  # customers 0 and 2: the only 'private' ones, so their cell is suppressed
        segment[2 * k], rating[2 * k], b_exposure[k], region[k] = "private", "A", 200.0, "south"
    a = pa.table(
        {
            "customer_id": pa.array(np.arange(n), pa.int64()),
            "segment": pa.array(segment),
            "rating": pa.array([None if r == "none" else r for r in rating], pa.string()),
            "exposure": pa.array(np.round(rng.uniform(0, 1000, n), 2)),
        }
    )
    b = pa.table(
        {
            "customer_id": pa.array(np.arange(0, n, 2), pa.int64()),
            "exposure": pa.array(b_exposure),
            "region": pa.array(region),
        }
    )
    return a, b


def _local(*datasets: str) -> dict:
    args = [sys.executable, "-m", "sealroom.cli", "local", "--json"]
    for d in datasets:
        args += ["--dataset", d]
    args += ["--privacy-unit", "bank_a.loans=customer_id", "--min-group-size", "3", SQL]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["status"] == "released", doc
    return doc


def _cells(doc: dict) -> tuple[list, list]:
    rows = [[r[0], r[1], round(r[2], 6), round(r[3], 6)] for r in doc["rows"]]
    return rows, [s["group"] for s in doc["suppressed"]]


def test_databases_release_what_parquet_releases(pg_schema, tmp_path: Path, monkeypatch) -> None:
    a, b = _tables()
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(b, tmp_path / "b.parquet")
    parquet = _local(f"bank_a.loans={tmp_path / 'a.parquet'}", f"bank_b.loans={tmp_path / 'b.parquet'}")
    rows, suppressed = _cells(parquet)
    assert len(rows) == 3 and suppressed == [None]  # no public domain: counted, not keyed

    pg_schema.ingest("loans_a", a)
    con = sqlite3.connect(tmp_path / "b.db")
    con.execute("CREATE TABLE loans (customer_id INTEGER, exposure REAL, region TEXT)")
    con.executemany("INSERT INTO loans VALUES (?, ?, ?)", [tuple(r.values()) for r in b.to_pylist()])
    con.commit()
    con.close()
    monkeypatch.chdir(tmp_path)  # sqlite:///b.db is relative to the working directory
    databases = _local(
        f"bank_a.loans={pg_schema.source('loans_a')}",
        "bank_b.loans=sqlite:///b.db?table=loans",
    )
    assert _cells(databases) == (rows, suppressed)

    duck = duckdb.connect(str(tmp_path / "b.duckdb"))
    duck.register("b", b)
    duck.execute("CREATE TABLE loans AS SELECT * FROM b")
    duck.close()
    query = f"SELECT customer_id, segment, rating, exposure FROM {pg_schema.name}.loans_a"
    mixed = _local(
        f"bank_a.loans={pg_schema.postgres.uri}?query={query}", f"bank_b.loans={tmp_path / 'b.duckdb'}?table=loans"
    )
    assert _cells(mixed) == (rows, suppressed)
