"""A dp release as the analyst holds it, from a hand-made signed result document: each noisy cell's
95 % interval in the DataFrame (``<column>_ci95``), in the ``--json`` document (``ci95``, ``privacy``)
and in the terminal table (``value ± half-width`` and the epsilon spent); a threshold release (no
``ci95``) reads exactly as before."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from sealroom.app.render import result_document
from sealroom.app.result import Result, ci95_column, noisy_cell, render_result

PRIVACY = {
    "mode": "dp",
    "epsilon": 0.5,
    "delta": 0.0,
    "contribution_bounds": [{"dataset": "bank_a.loans", "unit": "customer_id", "max_groups": 4, "max_rows": 10}],
    "outputs": [
        {"column": "n", "aggregate": "count", "measurements": ["count(*)"]},
        {"column": "total", "aggregate": "sum", "measurements": ["sum(loans.amount)"]},
    ],
    "mechanisms": [
        {"key": "count(*)", "aggregate": "count", "mechanism": "discrete_laplace", "sensitivity": 40.0,
         "epsilon": 0.25, "scale": 160.0, "ci95_half_width": 479.0},
        {"key": "sum(loans.amount)", "aggregate": "sum", "mechanism": "laplace", "sensitivity": 200000.0,
         "epsilon": 0.25, "scale": 800000.0, "ci95_half_width": 2396586.2},
    ],
    "groups": "public domain",
    "partition_selection": None,
    "charges": [{"dataset": "bank_a.loans", "scope": "analyst:alice", "epsilon": 0.5, "delta": 0.0}],
}  # fmt: skip
CI95 = {"n": [479.0, 479.0], "total": [2396586.2, 2396586.2]}


def _receipt(**extra) -> dict:
    doc = {
        "kind": "sealroom.result",
        "inputs": [{"party": "bank_a", "dataset": "loans", "columns": ["customer_id", "segment", "amount"],
                    "frames": 2, "bytes": 1234}],
        "attestation": {"format": "simulated", "measurement": "ab" * 32},
        "approvals": [{"party": "bank_a"}],
        "rules": {},
        "suppressed": [],
        **extra,
    }  # fmt: skip
    return {"result": doc}


TABLE = pa.table({"segment": ["retail", "sme"], "n": pa.array([-3, 1250], pa.int64()), "total": [15000.5, 4321.25]})


def dp_result() -> Result:
    return Result(
        "q_1", "released", TABLE, simulated=True, receipt=_receipt(min_group_size=5, ci95=CI95, privacy=PRIVACY)
    )


def threshold_result() -> Result:
    return Result("q_1", "released", TABLE, simulated=True, receipt=_receipt(min_group_size=5))


def test_the_dataframe_has_a_half_width_column_after_each_noisy_column():
    df = dp_result().to_pandas()
    assert list(df.columns) == ["segment", "n", "n_ci95", "total", "total_ci95"]
    assert df["n"].tolist() == [-3, 1250] and df["n_ci95"].tolist() == [479.0, 479.0]
    assert df["total_ci95"].tolist() == [2396586.2, 2396586.2]
    # With suppressed cells asked for (none in dp mode), the columns are the same plus the flag.
    assert list(dp_result().to_pandas(with_suppressed=True).columns) == [*df.columns, "suppressed"]


def test_the_json_document_carries_ci95_and_the_privacy_summary():
    doc = json.loads(json.dumps(result_document(dp_result())))
    assert doc["ci95"] == CI95
    assert doc["privacy"]["epsilon"] == 0.5 and doc["privacy"]["charges"][0]["dataset"] == "bank_a.loans"
    assert [m["mechanism"] for m in doc["privacy"]["mechanisms"]] == ["discrete_laplace", "laplace"]
    assert doc["rows"] == [["retail", -3, 15000.5], ["sme", 1250, 4321.25]]  # values stay values


def test_the_table_shows_value_plus_minus_half_width_and_the_epsilon_spent():
    text = render_result(dp_result())
    assert "-3 ± 479" in text and "1,250 ± 479" in text
    assert "15,000.50 ± 2,396,586" in text and "4,321.25 ± 2,396,586" in text
    assert "epsilon 0.5 and delta 0" in text and "95 % interval" in text
    assert "discrete Laplace, Laplace noise" in text
    assert "retail" in text  # group keys unchanged
    html = dp_result()._repr_html_()
    assert "-3 ± 479" in html and "epsilon 0.5" in html


def test_a_threshold_release_reads_as_before():
    r = threshold_result()
    assert r.ci95 == {} and r.privacy is None
    assert list(r.to_pandas().columns) == ["segment", "n", "total"]
    doc = result_document(r)
    assert "ci95" not in doc and "privacy" not in doc
    text = render_result(r)
    assert "±" not in text and "differential privacy" not in text
    assert text == render_result(Result("q_1", "released", TABLE, simulated=True, receipt=_receipt(min_group_size=5)))
    # And a result without any receipt (e.g. fetched early) has no intervals either.
    assert Result("q_1", "released", TABLE).ci95 == {}


def test_intervals_that_do_not_match_the_released_rows_are_ignored():
    bad = Result(
        "q_1", "released", TABLE, receipt=_receipt(ci95={"n": [1.0], "nope": [1.0, 2.0], "total": "x"}, privacy={})
    )
    assert bad.ci95 == {} and list(bad.to_pandas().columns) == ["segment", "n", "total"]


def test_a_taken_interval_column_name_is_not_overwritten():
    table = TABLE.append_column("n_ci95", pa.array([7, 8], pa.int64()))
    r = Result("q_1", "released", table, receipt=_receipt(ci95={"n": [1.0, 2.0]}, privacy=PRIVACY))
    df = r.to_pandas()
    assert list(df.columns) == ["segment", "n", "_n_ci95", "total", "n_ci95"]
    assert df["n_ci95"].tolist() == [7, 8] and df["_n_ci95"].tolist() == [1.0, 2.0]
    assert ci95_column("x", ["x"]) == "x_ci95"


@pytest.mark.parametrize(
    ("value", "width", "text"),
    [(12, 3.0, "12 ± 3"), (0.25, 0.01234, "0.2500 ± 0.0123"), (1e6, 2396586.2, "1,000,000.00 ± 2,396,586")],
)
def test_noisy_cells(value, width, text):
    assert noisy_cell(value, width) == text
