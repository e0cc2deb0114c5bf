"""MPC benchmark: the platform's MPC stage next to a bare MPyC script doing the same secure work.

For 3 and 5 players and 10, 100, 1,000 and 10,000 groups, each player holding seeded synthetic
partials of ``COUNT(*), SUM(x)`` (x in [0, 1000], minimum group size 5, about half the groups
passing):

- ``platform``: ``mpc.session.run_session`` -- per-session CA and certificates, one
  ``python -m mpc.player`` process per player over mutual TLS on 127.0.0.1, the capped-count
  comparison once per group, the pattern opened first, then only the passing cells; timed from the
  call until it returns the checked result (every player's output read and compared).
- ``bare``: ``benchmarks/mpc_bare.py``, a minimal MPyC script doing the same inputs, additions,
  comparison (same bit lengths) and openings, with the same TLS certificates; timed from starting
  its processes until all have exited.
- ``tee``: the same query over the same rows on the TEE path: one party agent per player (Parquet
  files), the coordinator and a (simulated) enclave worker running as processes, started once per
  case; timed from submitting ``SELECT g, COUNT(*), SUM(x) FROM (... UNION ALL ...) GROUP BY g``
  until the verified release (plan, approvals, attestation, sealed streams, DuckDB, disclosure
  rules, signed result). It must release exactly the cells the MPC stage opens.

Both wall times include starting the interpreters and MPyC and connecting (about 0.4 s a session);
``mpc s`` is the secure computation alone (at the slowest player). Runs alternate platform/bare.
Targets: 10,000 groups x 3 players within 10 s; platform / bare within 1.3x.

    python benchmarks/mpc.py [--players 3,5] [--groups 10,100,1000,10000] [--repeat 3] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import REPO, log, median

SEED = 20261127
K = 5
TARGETS = {"seconds_10000_groups_3_players": 10.0, "platform_vs_bare": 1.3}
BARE = Path(__file__).resolve().parent / "mpc_bare.py"


def make_case(players: int, groups: int, seed: int = SEED) -> tuple[Any, dict[int, Any], list[Any]]:
    """The stage, every player's partials and the rows they summarise (seeded; the partials are
    computed here with numpy, not DuckDB: the MPC stage alone is measured)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from mpc.partials import Partials
    from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Measure, Player, StageSpec

    spec = StageSpec(
        session_id=f"bench-{players}-{groups}",
        group_by=(GroupColumn("g"),),
        domain=tuple((i,) for i in range(groups)),
        aggregates=(Aggregate("n", "count"), Aggregate("total", "sum", "x")),
        players=tuple(Player(f"party{i}") for i in range(players)),
        measures=(Measure("x", 0, 1000, 0, nullable=False),),
        min_group_size=K,
        max_rows=2**20,
    )
    import pyarrow as pa

    rng = np.random.default_rng(seed + players * 100_003 + groups)
    partials = {}
    tables = []
    # Each player holds 0 or K rows of a group (so the TEE path, which counts each input on its own,
    # and the MPC stage pass the same groups); about half of the groups hold rows at all.
    holds = 1 - 0.5 ** (1 / players)
    for i in range(players):
        rows = K * rng.binomial(1, holds, groups)
        g = np.repeat(np.arange(groups, dtype=np.int64), rows)
        x = rng.integers(0, 1000, len(g), dtype=np.int64)
        sums = np.bincount(g, weights=x, minlength=groups).astype(np.int64)
        partials[i] = Partials(
            cap=[min(int(r), K) for r in rows], values={"rows": [int(r) for r in rows], "s:x": [int(v) for v in sums]}
        )
        tables.append(pa.table({"g": g, "x": x}))
    return spec, partials, tables


def tee_sql(players: int) -> str:
    union = " UNION ALL ".join(f"SELECT g, x FROM party{i}.t" for i in range(players))
    return f"SELECT g, COUNT(*) AS n, SUM(x) AS total FROM ({union}) AS u GROUP BY g"


def run_tee(tables: list[Any], workdir: Path, repeat: int) -> list[dict[str, Any]]:
    """The same query on the TEE path, ``repeat`` times on one running platform."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
    from sealroom.policy import DatasetPolicy

    state = Path(tempfile.mkdtemp(prefix="tee-", dir=workdir))
    parties = []
    for i, table in enumerate(tables):
        path = state / f"party{i}.parquet"
        pq.write_table(table, path)
        parties.append(PartySpec(f"party{i}", (DatasetSpec("t", str(path), DatasetPolicy(min_group_size=K)),)))
    sql = tee_sql(len(tables))
    out = []
    with Cluster(state / "platform", parties, log=lambda _msg: None) as cluster, cluster.client() as client:
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = client.run(sql)
            seconds = time.perf_counter() - t0
            result.raise_for_status()
            rows = result.rows()
            out.append({"seconds": seconds, "passing": len(rows), "checksum": sum(int(n) + int(t) for _, n, t in rows)})
    return out


def run_platform(spec: Any, partials: dict[int, Any]) -> dict[str, Any]:
    from mpc.session import run_session

    t0 = time.perf_counter()
    result = run_session(spec, partials, timeout=600)
    seconds = time.perf_counter() - t0
    checksum = sum(v["n"] + v["total"] for _, v in result.cells)
    return {
        "seconds": seconds,
        "mpc_seconds": result.stats["mpc_seconds"],
        "passing": len(result.cells),
        "checksum": checksum,
        "bytes_sent_player0": result.stats["bytes_sent"][0],
    }


def run_bare(spec: Any, partials: dict[int, Any], workdir: Path) -> dict[str, Any]:
    from mpc.session import free_ports
    from mpc.tls import SessionCA

    lay = spec.layout
    m = len(spec.players)
    ca = SessionCA(spec.session_id)
    ports = free_ports(m)
    argv_tail = ["--ssl", "--no-log", "--mix32-64bit", "-T", str(spec.t)]  # as the platform's players
    for p in ports:
        argv_tail += ["-P", f"127.0.0.1:{p}"]
    dirs = []
    for i in range(m):
        d = Path(tempfile.mkdtemp(prefix=f"bare-{i}-", dir=workdir))
        ca.credentials(i).install(d)
        p = partials.get(i)
        doc = {
            "groups": len(spec.domain),
            "holders": len(spec.input_players),
            "cut": lay.cut,
            "cmp_bits": lay.cmp_bits,
            "int_bits": lay.int_bits,
            "cap": p.cap if p else None,
            "values": [p.values["rows"], p.values["s:x"]] if p else None,
        }
        (d / "in.json").write_text(json.dumps(doc))
        dirs.append(d)
    logs = [open(d / "log", "wb") for d in dirs]  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(BARE), "in.json", "out.json", "-I", str(i), *argv_tail],
            cwd=d,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=logf,
        )
        for i, (d, logf) in enumerate(zip(dirs, logs, strict=True))
    ]
    try:
        for proc in procs:
            proc.wait(600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for logf in logs:
            logf.close()
    seconds = time.perf_counter() - t0
    if any(proc.returncode for proc in procs):
        raise RuntimeError("a bare MPyC player failed:\n" + (dirs[0] / "log").read_text()[-2000:])
    outs = [json.loads((d / "out.json").read_text()) for d in dirs]
    return {
        "seconds": seconds,
        "mpc_seconds": max(o["seconds"] for o in outs),
        "passing": outs[0]["passing"],
        "checksum": outs[0]["checksum"],
    }


def bench(players: list[int], groups: list[int], repeat: int) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="sealroom-bench-mpc-") as tmp:
        for m in players:
            for g in groups:
                spec, partials, tables = make_case(m, g)
                plat: list[dict[str, Any]] = []
                bare: list[dict[str, Any]] = []
                for r in range(repeat):
                    order = ("platform", "bare") if r % 2 == 0 else ("bare", "platform")
                    for which in order:
                        if which == "platform":
                            plat.append(run_platform(spec, partials))
                        else:
                            bare.append(run_bare(spec, partials, Path(tmp)))
                    log(
                        f"{m} players, {g:,} groups, round {r + 1}/{repeat}: platform "
                        f"{plat[-1]['seconds']:.2f} s, bare {bare[-1]['seconds']:.2f} s"
                    )
                if plat[0]["passing"] != bare[0]["passing"] or plat[0]["checksum"] != bare[0]["checksum"]:
                    raise RuntimeError(f"platform and bare disagree for {m} players, {g} groups")
                tee = run_tee(tables, Path(tmp), repeat)
                log(f"{m} players, {g:,} groups: TEE path {median([x['seconds'] for x in tee]):.2f} s")
                if (tee[0]["passing"], tee[0]["checksum"]) != (plat[0]["passing"], plat[0]["checksum"]):
                    raise RuntimeError(f"the TEE path and the MPC stage disagree for {m} players, {g} groups")
                p_med = median([x["seconds"] for x in plat])
                b_med = median([x["seconds"] for x in bare])
                runs.append(
                    {
                        "players": m,
                        "groups": g,
                        "passing": plat[0]["passing"],
                        "platform": {
                            "seconds": [x["seconds"] for x in plat],
                            "median_seconds": p_med,
                            "median_mpc_seconds": median([x["mpc_seconds"] for x in plat]),
                            "bytes_sent_player0": plat[0]["bytes_sent_player0"],
                        },
                        "bare": {
                            "seconds": [x["seconds"] for x in bare],
                            "median_seconds": b_med,
                            "median_mpc_seconds": median([x["mpc_seconds"] for x in bare]),
                        },
                        "tee": {
                            "seconds": [x["seconds"] for x in tee],
                            "median_seconds": median([x["seconds"] for x in tee]),
                        },
                        "platform_vs_bare": p_med / b_med,
                        "mpc_vs_tee": p_med / median([x["seconds"] for x in tee]),
                        "platform_vs_bare_mpc": median([x["mpc_seconds"] for x in plat])
                        / median([x["mpc_seconds"] for x in bare]),
                    }
                )
    return {"runs": runs}


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"MPC stage (COUNT(*), SUM(x), minimum group size {doc['min_group_size']}): platform vs bare MPyC, "
        f"median of {doc['repeat']} alternating run(s); {doc['machine']['cpus']} CPUs shared by all players; "
        "TEE: the same query end to end on a running (simulated) TEE platform",
        "",
        f"{'players':>7}{'groups':>8}{'passing':>9}{'platform s':>12}{'bare s':>9}{'ratio':>8}"
        f"{'platform mpc s':>16}{'bare mpc s':>12}{'mpc ratio':>11}{'MB sent p0':>12}{'TEE s':>8}{'MPC/TEE':>9}",
    ]
    for r in doc["runs"]:
        p, b = r["platform"], r["bare"]
        lines.append(
            f"{r['players']:>7}{r['groups']:>8,}{r['passing']:>9,}{p['median_seconds']:>12.2f}{b['median_seconds']:>9.2f}"
            f"{r['platform_vs_bare']:>7.2f}x{p['median_mpc_seconds']:>16.2f}{b['median_mpc_seconds']:>12.2f}"
            f"{r['platform_vs_bare_mpc']:>10.2f}x{p['bytes_sent_player0'] / 1e6:>12.2f}"
            f"{r['tee']['median_seconds']:>8.2f}{r['mpc_vs_tee']:>8.2f}x"
        )
    lines.append("")
    for k, v in doc["verdicts"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def verdicts(doc: dict[str, Any]) -> dict[str, str]:
    out = {}
    headline = [r for r in doc["runs"] if r["players"] == 3 and r["groups"] == 10_000]
    if headline:
        s = headline[0]["platform"]["median_seconds"]
        target = TARGETS["seconds_10000_groups_3_players"]
        out["10,000 groups x 3 players"] = (
            f"{s:.2f} s (target <= {target:.0f} s: {'met' if s <= target else 'NOT met'})"
        )
    worst = max(doc["runs"], key=lambda r: r["platform_vs_bare"])
    target = TARGETS["platform_vs_bare"]
    out["platform / bare, worst case"] = (
        f"{worst['platform_vs_bare']:.2f}x at {worst['players']} players, {worst['groups']:,} groups "
        f"(target <= {target}x: {'met' if worst['platform_vs_bare'] <= target else 'NOT met'})"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--players", default="3,5", help="comma-separated player counts (default 3,5)")
    ap.add_argument("--groups", default="10,100,1000,10000", help="comma-separated group counts")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 players; 10 and 100 groups; one run")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = ap.parse_args(argv)
    try:
        players = [int(x) for x in args.players.split(",")]
        groups = [int(x) for x in args.groups.split(",")]
    except ValueError:
        ap.error("--players and --groups take comma-separated integers")
    if args.quick:
        players, groups, args.repeat = [3], [10, 100], 1
    if any(m < 3 for m in players) or any(g < 1 for g in groups) or args.repeat < 1:
        ap.error("at least 3 players, 1 group and 1 run")
    doc: dict[str, Any] = {
        "benchmark": "mpc",
        "min_group_size": K,
        "repeat": args.repeat,
        "targets": TARGETS,
        "machine": {**common.machine(), "mpyc": "0.11"},
    }
    doc.update(bench(players, groups, args.repeat))
    doc["verdicts"] = verdicts(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
