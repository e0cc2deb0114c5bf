"""The analyst's side of differential privacy through real servers (coordinator, enclave worker and
party agents on 127.0.0.1 over TLS): ``explain`` with an epsilon shows what the query costs and the
expected error of each output column before anything runs; an epsilon above an owner's cap, or one
for a query over threshold datasets only, is refused with its rule; a released dp query carries
each cell's 95 % interval to the DataFrame, the ``--json`` document and the terminal table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.privacy import laplace_ci95
from sealroom.policy import DatasetPolicy

pytestmark = pytest.mark.slow

CAP = 0.8
DP = {"mode": "dp", "epsilon_budget": 4.0, "max_query_epsilon": CAP, "max_groups_per_unit": 1, "max_rows_per_unit": 2}
DP_SQL = "SELECT segment, COUNT(*) AS n, SUM(amount) AS total FROM bank_a.loans GROUP BY segment"
THRESHOLD_SQL = "SELECT segment, COUNT(*) AS n FROM bank_b.loans GROUP BY segment"


def _policy(dp: dict | None) -> DatasetPolicy:
    doc: dict = {
        "privacy_unit": "customer_id",
        "columns": {
            "customer_id": "join_key",
            "segment": {"role": "dimension", "values": ["retail", "sme"]},
            "amount": {"role": "measure", "min": 0, "max": 100},
        },
    }
    if dp is not None:
        doc["privacy"] = dp
    return DatasetPolicy.from_dict(doc, source="test.toml")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_analyst")
    table = pa.table(
        {
            "customer_id": pa.array(range(60), pa.int64()),
            "segment": ["retail"] * 40 + ["sme"] * 20,
            "amount": pa.array([float(i % 50) for i in range(60)]),
        }
    )
    pq.write_table(table, d / "a.parquet")
    pq.write_table(table, d / "b.parquet")
    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), _policy(DP)),)),
        PartySpec("bank_b", (DatasetSpec("loans", str(d / "b.parquet"), _policy(None)),)),
    ]
    with Cluster(d / "state", parties) as cluster:
        yield cluster


def test_explain_with_an_epsilon_shows_the_cost_and_the_expected_error(platform):
    with platform.client() as client:
        doc = client.explain_plan(DP_SQL, epsilon=0.4)
        assert doc["plan"]["privacy"] == {"mode": "dp", "epsilon": 0.4, "delta": 0.0}
        text = doc["text"]
        # Two measurements share 0.4: COUNT(*) (sensitivity G*R = 2) and SUM(amount) (2 * 100).
        n_error = laplace_ci95(2 / 0.2, discrete=True)
        total_error = laplace_ci95(200 / 0.2)
        assert (
            f"COUNT(*) with discrete Laplace noise, epsilon 0.2, sensitivity 2, scale 10; expected error ±{n_error:.4g}"
            in text
        )
        assert (
            f"with Laplace noise, epsilon 0.2, sensitivity 200, scale 1000; expected error ±{total_error:.4g}" in text
        )
        assert "bank_a.loans: at most 1 groups and 2 rows per group for each customer_id" in text
        assert "this query spends epsilon 0.4 and delta 0 of each dp dataset's budget" in text
        assert "bank_a.loans: epsilon 0.4, delta 0 from the budget of analyst analyst" in text
    # A client-wide default applies to every call that names none; left out entirely: 0.5.
    with platform.client(epsilon=0.3) as client:
        assert client.explain_plan(DP_SQL)["plan"]["privacy"]["epsilon"] == 0.3
        assert client.explain_plan(DP_SQL, epsilon=0.7)["plan"]["privacy"]["epsilon"] == 0.7
    with platform.client() as client:
        assert client.explain_plan(DP_SQL)["plan"]["privacy"]["epsilon"] == 0.5


def test_an_epsilon_above_the_owner_s_cap_is_refused_at_explain_and_at_submit(platform):
    with platform.client() as client:
        with pytest.raises(PolicyRefusalError) as err:
            client.explain(DP_SQL, epsilon=CAP * 2)
        d = err.value.details
        assert (d["rule"], d["dataset"], d["max_query_epsilon"]) == ("max_query_epsilon", "bank_a.loans", CAP)
        refused = client.run(DP_SQL, timeout=60, epsilon=CAP * 2)
        assert refused.status == "refused" and refused.error is not None
        assert (
            refused.error.details["rule"] == "max_query_epsilon" and refused.error.details["dataset"] == "bank_a.loans"
        )


def test_an_epsilon_for_threshold_datasets_only_is_refused_and_their_limit_is_said(platform):
    with platform.client() as client:
        with pytest.raises(InvalidQueryError, match="no dataset of this query is in dp mode") as err:
            client.explain(THRESHOLD_SQL, epsilon=0.5)
        assert err.value.details["rule"] == "epsilon"
        text = client.explain(THRESHOLD_SQL)
        assert sum("does not stop differencing across queries" in line for line in text.splitlines()) == 1


def _cli(platform, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **platform.analyst_env())
    return subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_the_cli_passes_its_epsilon_and_refuses_unusable_ones(platform):
    proc = _cli(platform, "explain", "--json", "--epsilon", "0.25", DP_SQL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plan"]["privacy"]["epsilon"] == 0.25
    bad = _cli(platform, "submit", "--epsilon", "-1", DP_SQL)
    assert bad.returncode == 2 and "greater than 0" in bad.stderr
    over = _cli(platform, "explain", "--epsilon", str(CAP * 2), DP_SQL)
    assert over.returncode == 1 and "max_query_epsilon" in over.stderr


def test_a_released_dp_query_carries_its_intervals_to_the_analyst(platform):
    with platform.client() as client:
        result = client.submit(DP_SQL, epsilon=CAP).result(60)
    assert result.privacy is not None and result.privacy["epsilon"] == CAP
    assert set(result.ci95) == {"n", "total"} and all(len(v) == 2 for v in result.ci95.values())
    df = result.to_pandas()
    assert list(df.columns) == ["segment", "n", "n_ci95", "total", "total_ci95"]
    assert "±" in str(result) and f"epsilon {CAP:g}" in str(result)


def test_local_spends_its_epsilon_on_dp_datasets(tmp_path):
    pq.write_table(
        pa.table({"customer_id": pa.array(range(30), pa.int64()), "segment": ["retail", "sme"] * 15,
                  "amount": pa.array([1.0] * 30)}),
        tmp_path / "a.parquet",
    )  # fmt: skip
    (tmp_path / "dp.toml").write_text(_policy(DP).to_toml())
    base = [
        "local",
        "--dataset",
        f"bank_a.loans={tmp_path / 'a.parquet'}",
        "--policy",
        f"bank_a.loans={tmp_path / 'dp.toml'}",
    ]
    over = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *base, "--epsilon", str(CAP * 2), "--json", DP_SQL],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert over.returncode == 1, over.stderr
    doc = json.loads(over.stdout)
    assert doc["status"] == "refused" and doc["reason"]["details"]["rule"] == "max_query_epsilon"
    assert doc["reason"]["details"]["dataset"] == "bank_a.loans"
