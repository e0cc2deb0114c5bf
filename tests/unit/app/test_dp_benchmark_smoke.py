"""The dp cost benchmark still runs end to end: tiny sizes, one JSON document, every path released
the whole public domain (the benchmark checks it), ratios computed from the runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "dp_cost.py"


@pytest.fixture(scope="module")
def doc() -> dict:
    argv = [sys.executable, str(BENCH), "--rows", "20000", "--groups", "20", "--mpc-rows", "2000"]
    argv += ["--repeat", "1", "--breakdown", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench]" in proc.stderr  # progress goes to stderr
    return json.loads(proc.stdout)  # stdout is one JSON document, nothing else


def test_enclave_cases_ran_every_path(doc: dict) -> None:
    e = doc["enclave"]
    assert e["rows"] == 20000 and list(e["cases"]) == ["within", "exceeding"]
    assert e["mechanism"]["contribution_bounds"][0]["max_groups"] == 4
    for case, c in e["cases"].items():
        assert list(c["paths"]) == ["plain", "threshold", "dp", "dp-cells"], case
        for p in c["paths"].values():
            assert len(p["seconds"]) == 1 and p["median_seconds"] > 0
        r = c["dp_vs_threshold"]["medians"]
        assert r == c["paths"]["dp"]["median_seconds"] / c["paths"]["threshold"]["median_seconds"]
    # the two data shapes are what they say: nothing over the bounds, then a good share over them
    assert e["cases"]["within"]["units_over"] == 0
    assert e["cases"]["exceeding"]["units_over"] > 0.1
    assert doc["targets"] == {"dp_vs_threshold": 1.3}


def test_mpc_partials_and_sessions(doc: dict) -> None:
    m = doc["mpc"]
    assert m["groups"] == 20 and m["holders"] == 3 and "AVG" not in m["sql"]
    assert {v for v, _ in m["noise"]} == {"rows", "s:visits"}
    for part in ("partials", "session"):
        assert list(m[part]["paths"]) == ["threshold", "dp"]
        assert m[part]["dp_vs_threshold"]["medians"] > 0
    assert m["session"]["paths"]["dp"]["cells_opened"] == 20  # dp opens every group of the domain


def test_text_report_renders(doc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_dp_cost", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_dp_cost", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    text = module.render(doc)
    assert "enclave within" in text and "enclave exceeding" in text and "MPC session" in text
    assert "dp / threshold" in text and "target < 1.3x" in text


def test_unknown_case_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--cases", "within,nonsense"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--cases" in proc.stderr
