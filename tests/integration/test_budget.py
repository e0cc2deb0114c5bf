"""The owners' privacy budgets against the running platform (real processes on 127.0.0.1): each
owner's agent keeps its own ledger (budget.jsonl), refuses a query over budget, charges a released
query exactly once (also across a crash of the agent between its approval and the release), and the
coordinator's log, ``sealroom budget`` and ``sealroom audit verify`` agree with it.

The queries run at the default epsilon (0.5, ``DEFAULT_QUERY_EPSILON``) against a budget of 2.0:
four queries fit. (The analyst's ``--epsilon`` is another part of issue 14; the ledger does not care
which epsilon a plan carries.) Before the enclave adds dp noise (another part of issue 14) the
released values are exact; nothing here reads them.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cli import main
from sealroom.audit.ledger import LEDGER_FILE, read_ledger
from sealroom.audit.receipts import verify_receipt
from sealroom.errors import AuditError
from sealroom.planning.privacy import DEFAULT_QUERY_EPSILON

pytestmark = pytest.mark.slow

BUDGET = 2.0
SQL_A = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
SQL_AB = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment"
)


def _policy(*, manual: bool = False) -> Any:
    from sealroom.policy import DatasetPolicy

    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            **({"approval": "manual"} if manual else {}),
            "columns": {"customer_id": "join_key", "segment": {"role": "dimension", "values": ["retail", "sme"]}},
            "privacy": {"mode": "dp", "epsilon_budget": BUDGET, "max_query_epsilon": 1.0},
        }
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec

    d = tmp_path_factory.mktemp("budget")
    table = pa.table({"customer_id": pa.array(range(40), pa.int64()), "segment": ["retail"] * 30 + ["sme"] * 10})
    specs = []
    for name, manual in (("bank_a", False), ("bank_b", True)):
        pq.write_table(table, d / f"{name}.parquet")
        specs.append(PartySpec(name, (DatasetSpec("loans", str(d / f"{name}.parquet"), _policy(manual=manual)),)))
    with Cluster(d / "state", specs, party_timeout_seconds=60, analysts=("analyst", "carol")) as running:
        yield running


def _ledger(cluster: Any, party: str = "bank_a") -> Path:
    return Path(cluster.party_state_dir(party)) / LEDGER_FILE


def _run(argv: list[str]) -> tuple[int, str]:
    """``sealroom ARGV`` in this process: its exit status and what it printed on stdout."""
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0), out.getvalue()


def _cli(cluster: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch, analyst: str = "analyst") -> tuple[int, str]:
    for k, v in cluster.analyst_env(analyst).items():
        monkeypatch.setenv(k, v)
    return _run(argv)


def test_concurrent_queries_cannot_overspend_and_a_refused_one_charges_nothing(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: list[Any] = []
    lock = threading.Lock()

    def one() -> None:
        with cluster.client() as client:
            r = client.run(SQL_A, timeout=120)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    released = [r for r in results if r.status == "released"]
    refused = [r for r in results if r.status != "released"]
    fits = int(BUDGET / DEFAULT_QUERY_EPSILON)
    assert len(results) == 6 and len(released) <= fits and len(refused) >= 6 - fits
    assert released  # the budget allows some
    for r in refused:
        d = r.error.details
        assert d["rule"] == "privacy_budget" and d["dataset"] == "bank_a.loans" and d["analyst"] == "analyst"
        assert d["epsilon"] == DEFAULT_QUERY_EPSILON and d["epsilon_left"] < DEFAULT_QUERY_EPSILON
        assert "bank_a.loans" in r.error.message and "analyst analyst" in r.error.message
        assert f"asks for {DEFAULT_QUERY_EPSILON:g}" in r.error.message and "epsilon_budget" in r.error.message
    # The owner's ledger: one reservation per released query, each committed; the refused charged nothing.
    state = read_ledger(_ledger(cluster))
    mine = [r for r in state.reservations.values() if r.scope == "analyst:analyst"]
    assert len(mine) == len(released) and all(r.state == "committed" for r in mine)
    assert {r.query_id for r in mine} == {r.query_id for r in released}
    # The coordinator's view, from its log's privacy_charge entries.
    code, out = _cli(cluster, ["budget", "--json"], monkeypatch)
    assert code == 0
    (line,) = [b for b in json.loads(out) if b["dataset"] == "bank_a.loans"]
    spent = DEFAULT_QUERY_EPSILON * len(released)
    assert line["scope"] == "analyst:analyst" and math.isclose(line["spent"], spent)
    assert math.isclose(line["left"], BUDGET - spent) and line["charges"] == len(released)
    # explain shows what is left before running.
    with cluster.client() as client:
        text = client.explain(SQL_A)
    assert f"epsilon {BUDGET - spent:g} of {BUDGET:g} left for analyst analyst" in text


def test_a_crash_between_approval_and_release_neither_loses_nor_double_charges(cluster: Any) -> None:
    """bank_a approves at once (its reservation is on disk), then crashes while the query waits for
    bank_b's owner; restarted, it reads its reservation back, and when the coordinator asks it again
    it approves without a second charge. The query releases, charged once to each dataset."""
    with cluster.client("carol") as client:
        handle = client.submit(SQL_AB)
        deadline = time.monotonic() + 60
        while handle.status()["status"] != "pending_approval" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.status()["approved_by"] == ["bank_a"]
        before = read_ledger(_ledger(cluster))
        (reserved,) = [r for r in before.reservations.values() if r.query_id == handle.query_id]
        assert reserved.state == "reserved"
        cluster.kill("party-bank_a")  # a crash: SIGKILL
        cluster.restart("party-bank_a")
        done = cluster.approve_as_owner(handle.query_id, "bank_b")
        assert done.returncode == 0, done.stderr
        result = handle.result(timeout=120, raise_on_error=False)
    assert result.status == "released", result.error
    for party in ("bank_a", "bank_b"):
        state = read_ledger(_ledger(cluster, party))
        mine = [r for r in state.reservations.values() if r.query_id == handle.query_id]
        assert [r.state for r in mine] == ["committed"]
        lines = [json.loads(x) for x in _ledger(cluster, party).read_bytes().splitlines()]
        assert sum(1 for x in lines if x["kind"] == "reserve" and x["query_id"] == handle.query_id) == 1
    with cluster.client("carol") as client:
        lines = {b["dataset"]: b for b in client.budget()}
    assert set(lines) == {"bank_a.loans", "bank_b.loans"}
    assert all(b["charges"] == 1 and math.isclose(b["spent"], DEFAULT_QUERY_EPSILON) for b in lines.values())


def _export(cluster: Any, path: Path) -> dict[str, Any]:
    state = str(cluster.state_dir / "coordinator")
    assert _run(["audit", "export", "--format", "json", "--state-dir", state, "-o", str(path)])[0] == 0
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_audit_verify_readds_the_charges_and_finds_a_tampered_charge(cluster: Any, tmp_path: Path) -> None:
    export = _export(cluster, tmp_path / "log.json")
    assert any(e["type"] == "privacy_charge" for e in export["entries"])
    verify = ["audit", "verify", "--log", str(tmp_path / "log.json"), "--party", "bank_a", "--ledger"]
    code, out = _run([*verify, str(_ledger(cluster))])
    assert code == 0, out
    assert "budget bank_a.loans (analyst:analyst)" in out and "chain intact" in out
    (tmp_path / "empty.jsonl").write_bytes(b"")  # a ledger that lost every line gives every budget back
    code, out = _run([*verify, str(tmp_path / "empty.jsonl"), "--json"])
    assert code == 1 and json.loads(out)["check"] == "ledger_charges"
    # Each dp release's receipt carries its plan's charges; a receipt whose charges were edited is refused.
    receipt = next(r for r in export["receipts"].values() if "privacy" in r)
    assert receipt["privacy"]["charges"][0]["epsilon"] == DEFAULT_QUERY_EPSILON
    for edit in ({"charges": [{**receipt["privacy"]["charges"][0], "epsilon": 0.01}]}, None):
        changed = {k: v for k, v in receipt.items() if k != "privacy"} | ({"privacy": edit} if edit else {})
        with pytest.raises(AuditError) as err:
            verify_receipt(changed, appraisal=None, coordinator_key=None)
        assert err.value.details["check"] == "privacy_charges"
    charge = next(e for e in export["entries"] if e["type"] == "privacy_charge")
    charge["event"]["epsilon"] = 0.01
    (tmp_path / "tampered.json").write_text(json.dumps(export))
    code, out = _run(["audit", "verify", "--log", str(tmp_path / "tampered.json"), "--json"])
    assert code == 1 and json.loads(out)["check"] == "checkpoint_root"


def test_a_tampered_ledger_stops_the_agent_and_fails_audit_verify(cluster: Any, tmp_path: Path) -> None:
    path = _ledger(cluster)
    original = path.read_bytes()
    lines = original.splitlines()
    lines[0] = lines[0].replace(b'"epsilon":0.5', b'"epsilon":0.1')  # an owner's budget given back
    tampered = b"".join(x + b"\n" for x in lines)
    (tmp_path / LEDGER_FILE).write_bytes(tampered)
    state = str(cluster.state_dir / "coordinator")
    code, out = _run(["audit", "verify", "--state-dir", state, "--ledger", str(tmp_path / LEDGER_FILE), "--json"])
    assert code == 1 and json.loads(out)["check"] == "ledger_chain"
    cluster.kill("party-bank_a")
    path.write_bytes(tampered)
    try:
        config = str(cluster.party_config_path("bank_a"))
        proc = subprocess.run(
            [sys.executable, "-m", "sealroom.cli", "party", "serve", "--config", config],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        assert proc.returncode != 0
        assert str(path) in proc.stderr and "line 2" in proc.stderr
    finally:
        path.write_bytes(original)
        cluster.restart("party-bank_a")


def test_sealroom_local_with_a_state_dir_spends_from_the_same_ledger(tmp_path: Path) -> None:
    """``sealroom local --state-dir DIR`` run again starts the same owner's agent on the same ledger:
    a budget of 1.0 allows two queries at 0.5, the third is refused."""
    pq.write_table(
        pa.table({"customer_id": pa.array(range(40), pa.int64()), "segment": ["retail"] * 30 + ["sme"] * 10}),
        tmp_path / "loans.parquet",
    )
    (tmp_path / "policy.toml").write_text(
        'privacy_unit = "customer_id"\n[columns]\ncustomer_id = "join_key"\n'
        'segment = { role = "dimension", values = ["retail", "sme"] }\n'
        '[privacy]\nmode = "dp"\nepsilon_budget = 1.0\n'
    )
    argv = [
        "local",
        "--state-dir",
        str(tmp_path / "state"),
        "--dataset",
        f"bank_a.loans={tmp_path / 'loans.parquet'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'policy.toml'}",
        "--json",
        SQL_A,
    ]
    runs = [_run(argv) for _ in range(3)]
    assert [code for code, _ in runs] == [0, 0, 1]
    refusal = json.loads(runs[2][1])["reason"]
    assert refusal["details"]["rule"] == "privacy_budget" and refusal["details"]["epsilon_left"] == 0.0
    (ledger,) = (tmp_path / "state").rglob(LEDGER_FILE)
    assert [r.state for r in read_ledger(ledger).reservations.values()] == ["committed", "committed"]
