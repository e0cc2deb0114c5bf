"""The ingest benchmark's results: the JSON document (medians, ratios, CPU, memory per path) and its
text rendering."""

from __future__ import annotations

from typing import Any

import common
from common import median
from ingest_data import TARGETS, Options
from ingest_routes import Route


def report(
    routes: list[Route],
    options: Options,
    data: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    baseline: dict[str, int],
    peaks: dict[str, int],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for route in routes:
        rs = runs[route.name]
        med = median([r["seconds"] for r in rs])
        held = rs[-1]["bytes"]
        results[route.name] = {
            "seconds": [r["seconds"] for r in rs],
            "median_seconds": med,
            "gb_per_s": data["bytes"] / med / 1e9,
            "sender_cpu_seconds": median([r["sender_cpu_seconds"] for r in rs]),
            "receiver_cpu_seconds": median([r["receiver_cpu_seconds"] for r in rs]),
            "sender_page_faults": round(median([r["sender_page_faults"] for r in rs])),
            "receiver_page_faults": round(median([r["receiver_page_faults"] for r in rs])),
            "other_cpu_seconds": median([r["other_cpu_seconds"] for r in rs]),
            "receiver": route.receiver,
            "held_bytes": held,
            "receiver_peak_rss_bytes": peaks[route.name],
            "receiver_baseline_rss_bytes": baseline[route.name],
            "peak_rss_over_held": peaks[route.name] / held,
            "peak_growth_over_held": (peaks[route.name] - baseline[route.name]) / held,
        }
        if "frames" in rs[-1]:
            results[route.name]["frames"] = rs[-1]["frames"]
    ratios: dict[str, float] = {}
    paired: dict[str, float] = {}
    best: dict[str, float] = {}
    for a, b in (("sealed", "flight"), ("sealed", "flight-tls"), ("flight-tls", "flight")):
        if a in results and b in results:
            key = f"{a}_vs_{b}".replace("-", "_")
            ratios[key] = results[a]["median_seconds"] / results[b]["median_seconds"]
            # Runs of one round are seconds apart: their ratio shrugs off slow phases of the machine.
            paired[key] = median([x / y for x, y in zip(results[a]["seconds"], results[b]["seconds"], strict=True)])
            best[key] = min(results[a]["seconds"]) / min(results[b]["seconds"])
    if "flight" in results:
        for r in results.values():
            r["vs_flight"] = r["median_seconds"] / results["flight"]["median_seconds"]
    return {
        "benchmark": "ingest",
        "table": data,
        "repeat": options.repeat,
        "warmup": options.warmup,
        "frame_bytes": options.frame_bytes or None,
        "paths": results,
        "ratios": ratios,
        "median_ratios_within_rounds": paired,
        "ratios_of_fastest_runs": best,
        "targets": TARGETS,
        "machine": common.machine(),
    }


def render(doc: dict[str, Any]) -> str:
    t = doc["table"]
    w = max(12, *(len(p) + 2 for p in doc["paths"]))
    lines = [
        f"ingest: {t['rows']:,} rows ({', '.join(t['schema'])}) = {t['bytes'] / 1e6:.1f} MB of Arrow, "
        f"{t['batches']} batches of {t['batch_rows']:,} rows",
        f"median of {doc['repeat']} interleaved runs after {doc['warmup']} warm-up round(s); "
        f"{doc['machine']['cpus']} CPUs; sender and receiver are separate processes",
        "",
        f"{'path':<{w}}{'median s':>9}{'GB/s':>7}{'min s':>8}{'max s':>8}{'cpu s send':>11}{'cpu s recv':>11}"
        f"{'others cpu s':>13}{'recv peak RSS':>15}{'holds':>10}{'peak/held':>10}{'vs flight':>10}",
    ]
    for p, r in doc["paths"].items():
        lines.append(
            f"{p:<{w}}{r['median_seconds']:>9.3f}{r['gb_per_s']:>7.2f}{min(r['seconds']):>8.3f}{max(r['seconds']):>8.3f}"
            f"{r['sender_cpu_seconds']:>11.2f}{r['receiver_cpu_seconds']:>11.2f}{r['other_cpu_seconds']:>13.2f}"
            f"{r['receiver_peak_rss_bytes'] / 2**20:>11.0f} MiB{r['held_bytes'] / 2**20:>6.0f} MiB"
            f"{r['peak_rss_over_held']:>9.2f}x" + (f"{r['vs_flight']:>9.2f}x" if "vs_flight" in r else "")
        )
    lines.append("")
    for k, v in doc["ratios"].items():
        target = doc["targets"].get(k)
        verdict = ""
        if target is not None:
            ok = v <= target if k == "sealed_vs_flight" else v < target
            verdict = f"target {'<=' if k == 'sealed_vs_flight' else '<'} {target:.2f}x: {'met' if ok else 'NOT met'}"
        label = k.replace("_vs_", " / ").replace("_", "-")
        fastest, paired = doc["ratios_of_fastest_runs"][k], doc["median_ratios_within_rounds"][k]
        lines.append(
            f"{label:<{max(22, w + 2)}}{v:>5.2f}x medians {paired:>5.2f}x within rounds "
            f"{fastest:>5.2f}x fastest   {verdict}"
        )
    lines.append("")
    for p, r in doc["paths"].items():
        lines.append(
            f"{p} receiver ({r['receiver']}): peak RSS {r['receiver_peak_rss_bytes'] / 2**20:.0f} MiB = "
            f"{r['receiver_baseline_rss_bytes'] / 2**20:.0f} MiB before any data + "
            f"{r['peak_growth_over_held']:.2f} x the {r['held_bytes'] / 2**20:.0f} MiB it holds"
        )
    prof = doc.get("profile")
    if prof:
        lines.append("")
        lines.append(f"where the CPU time of {prof['path']} goes (perf, CPU seconds per run, share):")
        for role in ("sender", "receiver"):
            r = prof[role]
            lines.append(f"  {role}: {r['cpu_seconds_per_run']:.2f} cpu s per run ({r['samples']} samples)")
            for name, c in r["categories"].items():
                lines.append(f"    {c['cpu_seconds_per_run']:6.3f} s {c['share'] * 100:5.1f}%  {name}")
    lines.append("")
    lines.append(
        "others cpu s: CPU time the rest of the machine used during a run (noise; should be near 0). "
        "GB = 10^9 bytes of Arrow data (table.nbytes)."
    )
    return "\n".join(lines)
