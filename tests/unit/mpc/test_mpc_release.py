"""How the coordinator turns an MPC stage's opened cells into the released table: output names are
the analyst's aliases, so nothing in them may become SQL (review finding)."""

from __future__ import annotations

from coordinator.mpc_stage import apply_release
from sealroom.planning.plan import Release

EVIL = "diagnosis\"; SELECT 'prion_disease' AS diagnosis, 999999 AS x --"
AGG = 'n"; DROP TABLE released; --'
DOC = {
    "group_by": ["diagnosis"],
    "aggregates": [AGG],
    "cells": [
        {"key": ["a"], "values": {AGG: 7}},
        {"key": ["b"], "values": {AGG: 9}},
        {"key": ["c"], "values": {AGG: 3}},
    ],
    "suppressed": [["prion_disease"]],
    "rule": {"min_group_size": 3, "on": "rows"},
}


def test_output_names_never_become_sql() -> None:
    release = {
        "outputs": [[EVIL, "group", "diagnosis"], [AGG, "aggregate", AGG]],
        "having": None,
        "order_by": [[EVIL, True, False]],
        "limit": 2,
    }
    table, suppressed = apply_release(DOC, Release.from_dict(release))
    assert table.column_names == [EVIL, AGG]
    assert table.to_pylist() == [{EVIL: "c", AGG: 3}, {EVIL: "b", AGG: 9}]  # ORDER BY ... DESC LIMIT 2
    assert [s["group"] for s in suppressed] == [{EVIL: "prion_disease"}]  # no invented value, no row


def test_having_order_and_limit_apply_to_released_cells() -> None:
    release = {
        "outputs": [["diagnosis", "group", "diagnosis"], ["n", "aggregate", AGG]],
        "having": '"n" > 5',
        "order_by": [["n", False, False]],
        "limit": None,
    }
    table, _ = apply_release(DOC, Release.from_dict(release))
    assert table.to_pylist() == [{"diagnosis": "a", "n": 7}, {"diagnosis": "b", "n": 9}]
