"""The entry points as a newcomer runs them: `sealroom demo --json` and `sealroom local`, each
starting the whole platform (separate processes, real gRPC on 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sealroom.app.demo_data import bank_tables, hospital_tables

pytestmark = pytest.mark.slow


def sealroom(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo")
    proc = sealroom("demo", "--json", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_demo_json_is_one_document_with_the_contract_shape(demo):
    doc, stderr = demo
    assert doc["simulated"] is True
    statuses = [(q["scenario"], q["status"]) for q in doc["queries"]]
    assert statuses == [
        ("bank", "released"),
        ("bank", "released"),
        ("bank", "refused"),
        ("bank", "refused"),
        ("hospital", "released"),
        ("registry", "released"),
        ("registry", "released"),
        ("registry", "refused"),
    ]
    for q in doc["queries"]:
        assert set(q) >= {"query_id", "status", "columns", "rows", "suppressed", "stages", "simulated"}
        if q["status"] == "released":
            assert q["simulated"] is True
            # The hospital cohort is hybrid: hospital_east accepts no enclave (trust.mpc_only).
            kinds = ["tee", "mpc"] if q["scenario"] == "hospital" else ["tee"]
            assert [s["kind"] for s in q["stages"]] == kinds
            assert all(len(r) == len(q["columns"]) for r in q["rows"])
    assert "[sealroom]" in stderr  # progress goes to stderr
    # bank_c's owner approves by hand: the released bank queries waited for its `sealroom approve`.
    assert [q["manual_approvals"] for q in doc["queries"]] == [["bank_c"], ["bank_c"], [], [], [], [], [], []]
    assert "bank_c's data officer reviews the plan and runs: sealroom approve" in stderr


def test_demo_registry_spends_its_budget_with_intervals_and_is_refused_at_exhaustion(demo):
    doc, _ = demo
    first, second, refused = [q for q in doc["queries"] if q["scenario"] == "registry"]
    # explain stated the cost and the error before the first query ran.
    assert "expected error" in first["explain"] and "epsilon 1" in first["explain"]
    for q in (first, second):
        assert q["privacy"]["epsilon"] == 1.0 and q["suppressed"] == []
        noisy = [c for c in q["columns"] if c in q["ci95"]]
        assert noisy and all(len(q["ci95"][c]) == len(q["rows"]) for c in noisy)
    # Every diagnosis of the public domain is released, the rare one too (with noise).
    assert {r[0] for r in first["rows"]} >= {"prion_disease", "cardiology"}
    assert [b["left"] for b in first["budget"]] == [1.0, 1.0] and [b["left"] for b in second["budget"]] == [0.0, 0.0]
    assert refused["reason"]["details"]["rule"] == "privacy_budget"
    assert refused["reason"]["details"]["epsilon_left"] == 0.0


def test_demo_suppresses_small_cells_without_values(demo):
    doc, _ = demo
    join, union, _, _, cohort = doc["queries"][:5]
    # segment and rating declare no public domain: the cells are counted and explained, not keyed.
    assert [(s["group"], s["rule"]) for s in join["suppressed"]] == [(None, "dominance"), (None, "min_group_size")]
    assert not any((r[0], r[1]) in (("corporate", "CCC"), ("private", "A")) for r in join["rows"])
    assert [(s["group"], s["rule"]) for s in union["suppressed"]] == [(None, "dominance")]
    # The rare diagnosis, in every age band of the public domain: compared inside the MPC, never opened.
    assert [(s["group"]["diagnosis"], s["group"]["age_band"]) for s in cohort["suppressed"]] == [
        ("prion_disease", band) for band in ("0-39", "40-64", "65+")
    ]
    assert all("never opened" in s["reason"] for s in cohort["suppressed"])


def test_demo_hospital_cohort_is_a_hybrid_plan(demo):
    """hospital_north and hospital_south stream sealed rows to the enclave; hospital_east's rows never
    leave it: its own MPC player, the enclave's player and the coordinator's helper compute the cells."""
    doc, _ = demo
    cohort = doc["queries"][4]
    tee, mpc = cohort["stages"]
    assert tee["feeds"] == mpc["id"] and tee["inputs"] == ["hospital_north.stays", "hospital_south.stays"]
    assert mpc["inputs"] == ["hospital_east.stays"]
    assert [(p["name"], p["holds_input"]) for p in mpc["players"]] == [
        ("hospital_east", True),
        ("enclave", True),
        ("coordinator", False),
    ]
    assert "honest majority" in cohort["mpc"]["trust_assumption"] and "coordinator" in cohort["mpc"]["trust_assumption"]
    assert cohort["attestation"]["simulated"] is True
    assert sorted((i["party"], i["player"]) for i in cohort["inputs"]) == [
        ("hospital_east", 0),
        ("hospital_north", 1),
        ("hospital_south", 1),
    ]


def test_demo_refusals_explain_themselves(demo):
    doc, _ = demo
    by_policy, rows = doc["queries"][2], doc["queries"][3]
    assert by_policy["rows"] == [] and by_policy["columns"] == []
    assert by_policy["reason"]["code"] == "policy_refusal"
    d = by_policy["reason"]["details"]
    assert (d["party"], d["dataset"], d["column"], d["rule"]) == ("bank_b", "exposures", "customer_id", "column_role")
    assert d["suggestion"] == (
        "group by a dimension such as segment: customer_id is the privacy unit of bank_b.exposures, which is never "
        "grouped by"
    )
    assert rows["reason"]["code"] == "invalid_query" and "row-level" in rows["reason"]["message"]


def test_demo_released_cells_equal_plain_duckdb(demo):
    """Correctness: the released cells are what DuckDB computes on the pooled data directly."""
    doc, _ = demo
    join, union, _, _, cohort = doc["queries"][:5]
    con = duckdb.connect()
    for bank, table in bank_tables().items():
        con.register(bank, table)
    expected = con.sql(
        "SELECT a.segment, a.rating, COUNT(*), SUM(a.exposure + b.exposure + c.exposure), "
        "AVG(b.defaulted) FROM bank_a a "
        "JOIN bank_b b ON a.customer_id = b.customer_id JOIN bank_c c ON a.customer_id = c.customer_id "
        "WHERE a.segment <> 'private' GROUP BY ALL HAVING COUNT(DISTINCT a.customer_id) >= 5 ORDER BY 1, 2"
    ).fetchall()
    assert len(join["rows"]) == len(expected)
    for got, want in zip(join["rows"], expected, strict=True):
        assert got[:3] == list(want[:3])
        assert got[3] == pytest.approx(want[3]) and got[4] == pytest.approx(want[4])
    totals = dict(
        con.sql(
            "SELECT segment, SUM(exposure) FROM (SELECT * FROM bank_a UNION ALL SELECT * FROM bank_b "
            "UNION ALL SELECT * FROM bank_c) WHERE segment <> 'private' GROUP BY segment"
        ).fetchall()
    )
    assert {r[0]: r[2] for r in union["rows"]} == pytest.approx(totals)
    assert [r[2] for r in union["rows"]] == sorted((r[2] for r in union["rows"]), reverse=True)
    for name, table in hospital_tables().items():
        con.register(name, table)
    n_patients = con.sql(
        "SELECT COUNT(*) FROM (SELECT * FROM hospital_north UNION ALL SELECT * FROM hospital_south "
        "UNION ALL SELECT * FROM hospital_east) WHERE diagnosis <> 'prion_disease'"
    ).fetchall()[0][0]
    assert sum(r[2] for r in cohort["rows"]) == n_patients
    # Every released cell of the hybrid plan is what DuckDB computes on the pooled rows: counts
    # exact, means and deviations within the fixed-point tolerance.
    pooled = con.sql(
        "SELECT diagnosis, age_band, COUNT(*), AVG(age), AVG(length_of_stay), STDDEV_SAMP(cost) FROM "
        "(SELECT * FROM hospital_north UNION ALL SELECT * FROM hospital_south UNION ALL SELECT * FROM hospital_east) "
        "WHERE diagnosis <> 'prion_disease' GROUP BY ALL ORDER BY 1, 2"
    ).fetchall()
    assert [tuple(r[:3]) for r in cohort["rows"]] == [tuple(r[:3]) for r in pooled]
    for got, want in zip(cohort["rows"], pooled, strict=True):
        assert got[3:5] == pytest.approx(list(want[3:5]), rel=1e-9)
        assert got[5] == pytest.approx(want[5], rel=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    a = pa.table(
        {
            "customer_id": pa.array(list(range(40)), pa.int64()),
            "segment": ["retail"] * 30 + ["sme"] * 8 + ["corporate"] * 2,
            "amount": pa.array([float(i) for i in range(40)]),
        }
    )
    b = pa.table({"customer_id": pa.array(list(range(0, 40, 2)), pa.int64()), "amount": [1.0] * 20})
    pq.write_table(a, d / "a.parquet")
    pacsv.write_csv(b, d / "b.csv")
    return d, a, b


LOCAL_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.amount + b.amount) AS total FROM bank_a.loans a "
    "JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment ORDER BY a.segment"
)


def test_local_releases_and_suppresses(files):
    d, _, _ = files
    proc = sealroom(
        "local",
        "--json",
        "--dataset",
        f"bank_a.loans={d / 'a.parquet'}",
        "--dataset",
        f"bank_b.loans={d / 'b.csv'}",
        "--privacy-unit",
        "bank_a.loans=customer_id",
        "--min-group-size",
        "3",
        LOCAL_SQL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["status"] == "released"
    # retail: customers 0..29 even -> 15; sme: 30..37 even -> 4; corporate: 38 -> 1 (suppressed at k=3)
    assert doc["rows"] == [["retail", 15, pytest.approx(sum(range(0, 30, 2)) + 15.0)], ["sme", 4, 136.0]]
    assert [s["group"] for s in doc["suppressed"]] == [None]  # no public domain: counted, not keyed
    by_party = {i["party"]: i["columns"] for i in doc["inputs"]}
    assert by_party == {"bank_a": ["customer_id", "segment", "amount"], "bank_b": ["customer_id", "amount"]}


def test_local_refusal_exits_1_with_reason_on_stderr(files):
    d, _, _ = files
    proc = sealroom("local", "--dataset", f"bank_a.loans={d / 'a.parquet'}", "SELECT customer_id FROM bank_a.loans")
    assert proc.returncode == 1
    assert "refused" in proc.stderr and "GROUP BY" in proc.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--dataset", "bank_a.loans=/nonexistent/a.parquet"], "file not found"),
        (["--dataset", "not-a-name=/x.parquet"], "PARTY.NAME=VALUE"),
        (["--dataset", "{a}", "--privacy-unit", "bank_a.loans=nope"], "is not a column"),
        (["--dataset", "{a}", "--privacy-unit", "bank_z.loans=customer_id"], "no --dataset defines"),
        (["--dataset", "{a}", "--min-group-size", "0"], "at least 1"),
        ([], "at least one --dataset"),
    ],
)
def test_local_unusable_arguments_exit_2(files, args, match):
    d, _, _ = files
    args = [a.replace("{a}", f"bank_a.loans={d / 'a.parquet'}") for a in args]
    proc = sealroom("local", *args, "SELECT COUNT(*) FROM bank_a.loans", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr


POLICY_A = """
privacy_unit = "customer_id"
min_group_size = 3
[columns]
customer_id = "join_key"
segment = "dimension"
amount = { role = "measure", aggregates = ["sum", "avg"] }
"""


def test_local_policy_refusal_carries_party_dataset_column_rule_and_suggestion(files, tmp_path):
    d, _, _ = files
    (tmp_path / "a.toml").write_text(POLICY_A)
    proc = sealroom(
        "local",
        "--json",
        "--dataset",
        f"bank_a.loans={d / 'a.parquet'}",
        "--dataset",
        f"bank_b.loans={d / 'b.csv'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'a.toml'}",
        "SELECT a.customer_id, COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
        "GROUP BY a.customer_id",
    )
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["status"] == "refused"
    d = doc["reason"]["details"]
    assert (d["party"], d["dataset"], d["column"], d["rule"]) == ("bank_a", "loans", "customer_id", "column_role")
    assert "group by a dimension such as segment" in d["suggestion"]
    assert "join key" in proc.stderr


def test_local_policy_allows_what_it_lists(files, tmp_path):
    d, _, _ = files
    (tmp_path / "a.toml").write_text(POLICY_A)
    proc = sealroom(
        "local",
        "--json",
        "--dataset",
        f"bank_a.loans={d / 'a.parquet'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'a.toml'}",
        "SELECT segment, SUM(amount) AS total FROM bank_a.loans GROUP BY segment ORDER BY segment",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["rows"] == [["retail", 435.0], ["sme", 268.0]]  # corporate: 2 customers < 3
    assert [x["group"] for x in doc["suppressed"]] == [None]  # no public domain: counted, not keyed
    bad = tmp_path / "bad.toml"
    bad.write_text("min_group_size = 0")
    proc = sealroom(
        "local", "--dataset", f"bank_a.loans={d / 'a.parquet'}", "--policy", f"bank_a.loans={bad}", "SELECT 1"
    )
    assert proc.returncode == 2 and "min_group_size must be an integer >= 1" in proc.stderr


POLICY_MPC_ONLY = """
privacy_unit = "customer_id"
min_group_size = 3
trust = { mpc_only = true }
[columns]
customer_id = "join_key"
segment = { role = "dimension", values = ["retail", "sme", "corporate"] }
amount = { role = "measure", aggregates = ["sum", "avg"], min = 0, max = 1000 }
"""


def test_local_mpc_only_shows_the_mpc_stage_and_its_players(files, tmp_path):
    """Policies that say mpc_only get an MPC plan, and it runs: ``--json`` shows the stage with kind
    mpc and its players (the owners' own, then the coordinator's helper that makes three), and only
    the cells that pass the minimum group size inside the MPC are released."""
    d, _, _ = files
    (tmp_path / "a.toml").write_text(POLICY_MPC_ONLY)
    proc = sealroom(
        "local",
        "--json",
        "--dataset",
        f"bank_a.loans={d / 'a.parquet'}",
        "--dataset",
        f"bank_c.loans={d / 'a.parquet'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'a.toml'}",
        "--policy",
        f"bank_c.loans={tmp_path / 'a.toml'}",
        "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM "
        "(SELECT * FROM bank_a.loans UNION ALL SELECT * FROM bank_c.loans) u GROUP BY segment ORDER BY segment",
    )
    doc = json.loads(proc.stdout)
    (stage,) = doc["stages"]
    assert stage["kind"] == "mpc" and sorted(stage["inputs"]) == ["bank_a.loans", "bank_c.loans"]
    assert [(p["name"], p["holds_input"]) for p in stage["players"]] == [
        ("bank_a", True),
        ("bank_c", True),
        ("coordinator", False),
    ]
    assert doc["status"] == "released", doc.get("reason")
    # corporate: 2 customers at each bank, below k = 3 at every player: never opened.
    assert doc["rows"] == [["retail", 60, 870.0], ["sme", 16, 536.0]]
    assert [s["group"] for s in doc["suppressed"]] == [{"segment": "corporate"}]
    assert "honest majority" in doc["mpc"]["trust_assumption"]


def test_local_hybrid_runs_the_enclave_as_a_player(files, tmp_path):
    """One owner says mpc_only, the other accepts the enclave: the plan is hybrid and runs, the text
    output says what went where (the streamed dataset to the enclave, the other kept by its owner)."""
    d, _, _ = files
    (tmp_path / "a.toml").write_text(POLICY_MPC_ONLY)
    (tmp_path / "b.toml").write_text(POLICY_MPC_ONLY.replace("trust = { mpc_only = true }\n", ""))
    args = [
        "local",
        "--dataset",
        f"bank_a.loans={d / 'a.parquet'}",
        "--dataset",
        f"bank_b.loans={d / 'a.parquet'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'a.toml'}",
        "--policy",
        f"bank_b.loans={tmp_path / 'b.toml'}",
        "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM "
        "(SELECT * FROM bank_a.loans UNION ALL SELECT * FROM bank_b.loans) u GROUP BY segment ORDER BY segment",
    ]
    proc = sealroom(*args[:1], "--json", *args[1:])
    doc = json.loads(proc.stdout)
    assert doc["status"] == "released", doc.get("reason")
    tee, mpc = doc["stages"]
    assert (tee["kind"], tee["inputs"], tee["feeds"]) == ("tee", ["bank_b.loans"], mpc["id"])
    assert [(p["name"], p["holds_input"]) for p in mpc["players"]] == [
        ("bank_a", True),
        ("enclave", True),
        ("coordinator", False),
    ]
    assert doc["rows"] == [["retail", 60, 870.0], ["sme", 16, 536.0]]
    assert [s["group"] for s in doc["suppressed"]] == [{"segment": "corporate"}]
    proc = sealroom(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bank_a.loans: stayed with its owner" in proc.stdout
    assert "bank_b.loans -> enclave" in proc.stdout and "MPC player 1 (enclave)" in proc.stdout
