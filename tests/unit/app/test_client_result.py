"""The client's Result on its own: the DataFrame views of released and suppressed cells, the
refusal it carries, and how it displays (tests against a running platform: tests/integration/test_client.py)."""

from __future__ import annotations

import datetime

import pandas as pd
import pyarrow as pa
import pytest

from sealroom.app.result import Result
from sealroom.errors import PolicyRefusalError

SUPPRESSED = [
    {"group": {"segment": "<b>rare</b>"}, "rule": "min_group_size", "reason": "fewer than 5 distinct customer_id"},
]


def released(table: pa.Table, suppressed=SUPPRESSED) -> Result:
    return Result("q_1", "released", table, suppressed=list(suppressed), simulated=True)


def test_to_pandas_is_the_released_cells_and_with_suppressed_adds_them_as_missing_values():
    table = pa.table({"segment": ["retail", "sme"], "n": pa.array([12, 8], pa.int64()), "avg": [1.5, 2.5]})
    result = released(table)
    assert result.to_pandas().values.tolist() == [["retail", 12, 1.5], ["sme", 8, 2.5]]
    df = result.to_pandas(with_suppressed=True)
    assert list(df.columns) == ["segment", "n", "avg", "suppressed"]
    assert df["segment"].tolist() == ["retail", "sme", "<b>rare</b>"]
    assert df["n"].dtype == pd.Int64Dtype() and df["n"].isna().tolist() == [False, False, True]
    assert pd.isna(df["avg"].iloc[2]) and df["suppressed"].isna().tolist() == [True, True, False]
    assert df["suppressed"].iloc[2] == "min_group_size"


def test_with_suppressed_when_nothing_was_released_or_suppressed():
    table = pa.table({"segment": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    only_suppressed = released(table).to_pandas(with_suppressed=True)
    assert only_suppressed["segment"].tolist() == ["<b>rare</b>"] and only_suppressed["n"].isna().all()
    nothing = released(table, suppressed=[]).to_pandas(with_suppressed=True)
    assert len(nothing) == 0 and list(nothing.columns) == ["segment", "n", "suppressed"]


def test_a_column_named_suppressed_is_kept_and_the_flag_renamed():
    table = pa.table({"segment": ["retail"], "suppressed": pa.array([3], pa.int64())})
    df = released(table).to_pandas(with_suppressed=True)
    assert list(df.columns) == ["segment", "suppressed", "_suppressed"]
    assert df["suppressed"].iloc[0] == 3 and df["_suppressed"].iloc[1] == "min_group_size"


def test_group_keys_travelling_as_text_come_back_typed():
    table = pa.table({"day": pa.array([datetime.date(2022, 1, 1)]), "n": pa.array([7], pa.int64())})
    result = released(table, suppressed=[{"group": {"day": "2022-01-02"}, "rule": "min_group_size", "reason": "-"}])
    df = result.to_pandas(with_suppressed=True)
    assert df["day"].tolist() == [datetime.date(2022, 1, 1), datetime.date(2022, 1, 2)]
    # A key that does not fit its column's type is shown as missing rather than failing.
    odd = released(table, suppressed=[{"group": {"day": "not a date"}, "rule": "dominance", "reason": "-"}])
    assert odd.to_pandas(with_suppressed=True)["day"].isna().tolist() == [False, True]


def test_suppressed_frame_orders_keys_as_the_result_and_has_no_values():
    table = pa.table({"segment": ["retail"], "rating": ["A"], "total": [10.0]})
    result = released(
        table,
        suppressed=[
            {"group": {"rating": "CCC", "segment": "corporate"}, "rule": "min_group_size", "reason": "few"},
            {"group": {"rating": "A", "segment": "private"}, "rule": "dominance", "reason": "one dominates"},
        ],
    )
    frame = result.suppressed_frame()
    assert list(frame.columns) == ["segment", "rating", "rule", "reason"]
    assert frame.values.tolist() == [
        ["corporate", "CCC", "min_group_size", "few"],
        ["private", "A", "dominance", "one dominates"],
    ]
    assert list(released(table, suppressed=[]).suppressed_frame().columns) == ["rule", "reason"]


def test_a_refused_result_raises_its_error_from_every_data_accessor():
    err = PolicyRefusalError("refused", details={"party": "bank_b", "column": "customer_id", "rule": "column_role"})
    result = Result("q_2", "refused", None, error=err)
    for accessor in (result.to_arrow, result.to_pandas, result.raise_for_status):
        with pytest.raises(PolicyRefusalError) as raised:
            accessor()
        assert raised.value is err
    assert result.rows() == [] and result.columns == [] and result.suppressed_frame().empty
    assert repr(result) == "<sealroom.Result query q_2 refused: refused>"
    html = result._repr_html_()
    assert "bank_b" in html and "column_role" in html


def test_html_escapes_and_truncates():
    table = pa.table({"segment": [f"<s{i}>" for i in range(60)], "n": pa.array(range(60), pa.int64())})
    html = released(table)._repr_html_()
    assert "<s0>" not in html and "&lt;s0&gt;" in html and "&lt;b&gt;rare&lt;/b&gt;" in html
    assert "&lt;s49&gt;" in html and "&lt;s50&gt;" not in html and "10 more cells" in html
    assert "SIMULATED" in html and "1 suppressed cells (no values released)" in html
