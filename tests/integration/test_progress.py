"""Progress while parties stream, end to end: the party agents count what they seal, the
coordinator publishes it per party in the query's status, and the CLI draws it as progress bars on
a terminal (and nothing in ``--json`` mode). Counts only: never a value, and rows only where the
owner shares its row count."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.policy import DatasetPolicy
from sealroom.v1 import party_pb2, party_pb2_grpc

pytestmark = pytest.mark.slow

ROWS = 400_000
SECRET = "SECRET-SEGMENT-7f3a1c"
SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.amount + b.amount) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    table = pa.table(
        {
            "customer_id": pa.array(range(ROWS), pa.int64()),
            "segment": pa.array(["retail", "sme", SECRET, "corporate"] * (ROWS // 4)),
            "amount": pa.array([1.5] * ROWS),
        }
    )
    pq.write_table(table, d / "a.parquet")
    pq.write_table(table, d / "b.parquet")
    # bank_a shares its row count (rounded) with analysts; bank_b does not.
    shares = DatasetPolicy(privacy_unit="customer_id", min_group_size=5, share_row_count=True)
    keeps = DatasetPolicy(privacy_unit="customer_id", min_group_size=5)
    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), shares),)),
        PartySpec("bank_b", (DatasetSpec("loans", str(d / "b.parquet"), keeps),)),
    ]
    with Cluster(d / "state", parties) as cluster:
        yield cluster


def test_status_carries_per_party_progress_while_streaming(platform):
    observed = []
    raw = []
    with platform.client() as client:
        handle = client.submit(SQL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = handle.status()
            raw.append(json.dumps(st))
            if st["parties"]:
                observed.append(st)
            if st["status"] in ("released", "refused", "failed"):
                break
            time.sleep(0.02)
        result = client.result(handle.query_id)
    assert result.status == "released", result.error
    assert observed, "no per-party progress was seen while the query ran"
    assert all(set(st["parties"]) == {"bank_a", "bank_b"} for st in observed)
    # While the enclave executes, and once released, the progress keeps every party's final counts.
    final = [st for st in observed if all(e["done"] for e in st["parties"].values())]
    assert final and final[-1]["progress"] in ("streaming 2/2 parties", "executing in the enclave", "released")
    # After the release the status still shows what each party sent (no window to catch).
    assert observed[-1]["status"] == "released" and all(e["done"] for e in observed[-1]["parties"].values())
    a, b = final[-1]["parties"]["bank_a"], final[-1]["parties"]["bank_b"]
    frames = {i["dataset"]: i["frames"] for i in result.inputs()}
    assert a["frames"] == frames["bank_a.loans"] and b["frames"] == frames["bank_b.loans"]
    assert a["bytes"] > 0 and b["bytes"] > 0
    # bank_a shares its row count: rows sent (two significant digits) against its registered count.
    assert a["rows"] == ROWS and a["rows_total"] == ROWS
    # bank_b does not: no rows at all, and no total to fill a bar against.
    assert b["rows"] is None and b["rows_total"] is None
    # Counts grow monotonically, and a status never carries a value from the data.
    sent = [st["parties"]["bank_a"]["bytes"] for st in observed]
    assert sent == sorted(sent)
    assert not any(SECRET in line for line in raw)
    assert any(r[0] == SECRET for r in result.rows())  # (it is in the data, and released as a group key)


def test_agent_reports_nothing_for_a_job_it_does_not_stream(platform):
    with platform.dial("party-bank_a") as ch:
        resp = party_pb2_grpc.PartyAgentStub(ch).GetProgress(party_pb2.ProgressRequest(job_id="j_unknown"), timeout=10)
    assert list(resp.streams) == []


def _cli_env(platform):
    return dict(
        os.environ,
        **platform.analyst_env(),
        PYTHONUNBUFFERED="1",
    )


def test_submit_draws_progress_bars_on_a_terminal(platform):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sealroom.cli", "submit", "--wait", SQL],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=_cli_env(platform),
    )
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, drawn.decode(errors="replace")[-2000:]
    text = drawn.decode()
    assert "\x1b[K" in text  # drawn in place
    assert "bank_a [" in text and "bank_b [" in text
    assert "400,000/400,000 rows" in text and "100%" in text and "sent" in text
    assert SECRET not in text
    # The result itself goes to stdout as an aligned table.
    out = stdout.decode()
    assert "segment" in out and "released 4 cells" in out


def test_submit_json_prints_no_progress(platform):
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "submit", "--wait", "--json", SQL],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(platform),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["status"] == "released"


def test_submit_off_a_terminal_prints_one_line_per_step(platform):
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "submit", "--wait", SQL],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(platform),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(": running " in line for line in lines) and lines[-1].endswith("released released")
    assert "\x1b" not in proc.stderr and SECRET not in proc.stderr
    assert len(lines) == len(set(lines))  # one line per step, not one per poll
