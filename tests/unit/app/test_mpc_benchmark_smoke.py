"""The MPC benchmark still runs end to end: tiny sizes, one JSON document, platform and bare agree."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "mpc.py"

pytestmark = pytest.mark.slow  # starts MPC players and a whole TEE platform


@pytest.fixture(scope="module")
def doc() -> dict:
    argv = [sys.executable, str(BENCH), "--players", "3", "--groups", "4,20", "--repeat", "1", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench]" in proc.stderr  # progress goes to stderr
    return json.loads(proc.stdout)  # stdout is one JSON document, nothing else


def test_every_case_ran_on_both_sides(doc: dict) -> None:
    assert [(r["players"], r["groups"]) for r in doc["runs"]] == [(3, 4), (3, 20)]
    for r in doc["runs"]:
        assert 0 <= r["passing"] <= r["groups"]
        for side in ("platform", "bare"):
            assert len(r[side]["seconds"]) == 1 and r[side]["median_seconds"] > r[side]["median_mpc_seconds"] > 0
        assert r["platform_vs_bare"] == r["platform"]["median_seconds"] / r["bare"]["median_seconds"]
        # the TEE path ran the same query and released the same cells (the benchmark checks it)
        assert len(r["tee"]["seconds"]) == 1 and r["mpc_vs_tee"] > 0
    assert doc["targets"] == {"seconds_10000_groups_3_players": 10.0, "platform_vs_bare": 1.3}
    assert "platform / bare, worst case" in doc["verdicts"]


def test_text_report_renders(doc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_mpc", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render(doc)
    assert "platform s" in text and "bare s" in text and "worst case" in text and "TEE s" in text


def test_fewer_than_three_players_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--players", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "at least 3 players" in proc.stderr
