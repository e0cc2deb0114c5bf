"""The ingest benchmark still runs end to end: a tiny table through every path, one JSON document."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "ingest.py"
PATHS = ("sealed", "flight", "flight-tls", "sealed+malloc+readfix+novalidate+pipeline", "sealed-flight", "grpc-raw")


@pytest.fixture(scope="module")
def doc() -> dict:
    # 20,000 rows in frames of 64 KiB: about ten sealed frames per stream, a few seconds in all.
    argv = [sys.executable, str(BENCH), "--rows", "20000", "--repeat", "1", "--warmup", "0"]
    argv += ["--frame-bytes", "65536", "--paths", ",".join(PATHS), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout is one JSON document, nothing else


def test_every_path_moved_the_whole_table(doc: dict) -> None:
    table = doc["table"]
    assert table["rows"] == 20000 and table["bytes"] > 0 and table["batches"] > 5
    assert list(doc["paths"]) == list(PATHS)
    for name, r in doc["paths"].items():
        assert r["held_bytes"] == table["bytes"], name
        assert len(r["seconds"]) == 1 and r["median_seconds"] > 0, name
        assert r["gb_per_s"] > 0 and r["vs_flight"] > 0, name
        assert r["receiver_peak_rss_bytes"] >= r["receiver_baseline_rss_bytes"] > 0, name
        assert r["sender_cpu_seconds"] >= 0 and r["receiver_cpu_seconds"] >= 0, name
    assert doc["paths"]["sealed"]["frames"] == table["batches"]


def test_ratios_and_targets(doc: dict) -> None:
    for kind in ("ratios", "median_ratios_within_rounds", "ratios_of_fastest_runs"):
        for key in ("sealed_vs_flight", "sealed_vs_flight_tls", "flight_tls_vs_flight"):
            assert doc[kind][key] > 0, (kind, key)
    sealed, flight = doc["paths"]["sealed"], doc["paths"]["flight"]
    assert doc["ratios"]["sealed_vs_flight"] == sealed["median_seconds"] / flight["median_seconds"]
    assert doc["targets"] == {"sealed_vs_flight": 1.2, "sealed_vs_flight_tls": 1.0}
    assert doc["machine"]["cpus"] >= 1


def test_text_report_renders(doc: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render(doc)
    assert "sealed / flight" in text and "sealed / flight-tls" in text
    for name in PATHS:
        assert name in text


def test_unknown_path_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--paths", "sealed+nonsense"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "not a path" in proc.stderr
