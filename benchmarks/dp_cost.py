"""What differential privacy costs: the dp engine in the enclave and dp in the MPC stage, each next to
the same query in threshold mode, measured in the same run, interleaved (the order alternates each
round; one warm-up round; medians).

- ``enclave``: ``SELECT segment, COUNT(*), SUM(amount), AVG(amount) ... GROUP BY segment`` over one
  seeded Arrow table of ``--rows`` rows (``customer_id int64, segment string, amount double``;
  about rows/5 privacy units, 20 segments declared as a public domain, ``amount`` a measure in
  [0, 5000]), in this process, on the same table:

  - ``threshold``: the threshold engine as the enclave runs it (``enclave_worker.engine.run_stage``
    over ``compile_for_job`` of the plan's residual SQL; minimum group size 5 counted in units,
    measures clamped, no dominance rule);
  - ``dp``: the dp engine (``enclave_worker.dp.run_dp_stage``) with the mechanism every checker
    derives from the plan (``check_plan`` -> ``sealroom.planning.privacy.dp_mechanism``; epsilon 1,
    contribution bounds 4 groups and 10 rows per unit, the policy's defaults): bounding, aggregation,
    OpenDP noise, post-processing;
  - ``plain``: the bare DuckDB ``GROUP BY`` on the same table (no rule at all), for scale.

  Two data shapes: ``within`` (every unit holds 5 rows, all in one segment: the bounds drop nothing,
  and no unit reaches the bounding's window functions) and ``exceeding`` (units drawn at random per
  row, segments at random per row, plus 10 % of the rows from heavy units of about 100 rows in one
  segment: many units are over a bound, and their rows go through the window sorts).
  ``--breakdown`` adds ``dp-cells``: the dp engine's bounded aggregates without noise
  (``enclave_worker.dp.bounded_cells``), to separate the SQL from OpenDP.

- ``mpc``: 3 input holders (every player holds input), ``--groups`` groups as a public domain,
  ``--mpc-rows`` rows per holder (units of 5 rows in one group: within the bounds), the stage the
  planner builds for ``COUNT(*), SUM(visits) ... GROUP BY region`` over the holders' ``UNION ALL``
  (``--mpc-avg``: ``AVG(visits)`` too, which threshold mode computes by a secure division per group
  and dp mode from the two opened noisy vectors), once with dp policies and once with threshold
  policies (minimum group size 5 in units):

  - ``partials``: every holder's ``mpc.partials.local_partials`` (DuckDB over its rows; in dp, the
    bounding per unit and the Pólya noise shares added to its vectors);
  - ``session`` (unless ``--no-session``): the whole MPyC stage as ``benchmarks/mpc.py`` runs it
    (``mpc.session.run_session``: one player process per party, mutual TLS on 127.0.0.1); in dp no
    comparison, every noised cell opened; in threshold the capped-count comparison per group.

Target (issue 14): dp / threshold under 1.3x on 10M rows and on 10,000 MPC groups.

    python benchmarks/dp_cost.py [--rows 10000000] [--groups 10000] [--mpc-rows 200000] [--repeat 3]
                                 [--cases within,exceeding] [--breakdown] [--no-session] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import common
from common import REPO, log, median

sys.path.insert(0, str(REPO))

SEED = 20261208
K = 5
SEGMENTS = [f"s{i:02d}" for i in range(20)]
LO, HI = 0.0, 5000.0
EPSILON = 1.0
TARGET = 1.3
CASES = ("within", "exceeding")
ENCLAVE_SQL = (
    "SELECT segment, COUNT(*) AS n, SUM(amount) AS total, AVG(amount) AS mean FROM bank.loans GROUP BY segment"
)
MPC_UNION = "(SELECT * FROM a.people UNION ALL SELECT * FROM b.people UNION ALL SELECT * FROM c.people) AS p"


def mpc_sql(avg: bool) -> str:
    mean = ", AVG(visits) AS mean" if avg else ""
    return f"SELECT region, COUNT(*) AS n, SUM(visits) AS total{mean} FROM {MPC_UNION} GROUP BY region"


# --------------------------------------------------------------------------------------------
# enclave


def enclave_table(rows: int, case: str, seed: int = SEED) -> Any:
    """The seeded table of one data shape (see the module docstring)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed + (case == "exceeding"))
    units = max(1, rows // 5)
    if case == "within":
        unit = np.arange(rows, dtype=np.int64) // 5
        segment = rng.integers(0, len(SEGMENTS), units, dtype=np.int32)[unit]
    else:
        unit = rng.integers(0, units, rows, dtype=np.int64)
        segment = rng.integers(0, len(SEGMENTS), rows, dtype=np.int32)
        heavy = rng.random(rows) < 0.1
        unit[heavy] = rng.integers(0, max(1, units // 200), int(heavy.sum()), dtype=np.int64)
        segment[heavy] = (unit[heavy] % len(SEGMENTS)).astype(np.int32)
    segments = pa.DictionaryArray.from_arrays(pa.array(segment), pa.array(SEGMENTS)).cast(pa.string())
    return pa.table({"customer_id": unit, "segment": segments, "amount": rng.uniform(LO, HI, rows).round(2)})


def _enclave_policy(dp: bool) -> Any:
    from sealroom.policy import DatasetPolicy

    doc: dict[str, Any] = {
        "privacy_unit": "customer_id",
        "min_group_size": K,
        "columns": {
            "customer_id": "join_key",
            "segment": {"role": "dimension", "values": SEGMENTS},
            "amount": {"role": "measure", "min": LO, "max": HI},
        },
    }
    if dp:
        doc["privacy"] = {"mode": "dp", "epsilon_budget": 4.0}  # contribution bounds: the defaults
    return DatasetPolicy.from_dict(doc, source="bench.toml")


@dataclasses.dataclass
class EnclaveStage:
    """One planned TEE stage as the enclave admits it: residual SQL, engine inputs, clamps, mechanism."""

    residual_sql: str
    specs: list[Any]
    table: str
    qualified: str
    policy: Any
    clamps: dict[str, Any]
    mechanism: Any  # DpMechanism, or None in threshold mode


def enclave_stage(schema: Any, dp: bool) -> EnclaveStage:
    from coordinator.planner import CatalogEntry, plan_query
    from sealroom.planning.checks import Checker, check_plan
    from sealroom.planning.sql import InputSpec

    catalog = {"bank.loans": CatalogEntry("bank", "loans", schema, _enclave_policy(dp))}
    plan, _ = plan_query(
        ENCLAVE_SQL,
        query_id="bench",
        analyst="alice",
        catalog=catalog,
        party_keys={"bank": "ab" * 32},
        epsilon=EPSILON if dp else None,
    )
    (tee,) = plan.tee_stages()
    checked = check_plan(plan, Checker(stage=tee.id))  # as the enclave admits it
    (inp,) = tee.inputs
    return EnclaveStage(
        residual_sql=checked.pushdowns[tee.id].residual_sql,
        specs=[InputSpec(inp.qualified, inp.table, inp.columns, inp.policy.privacy_unit)],
        table=inp.table,
        qualified=inp.qualified,
        policy=inp.policy,
        clamps={inp.table: {"amount": (LO, HI)}},
        mechanism=checked.mechanisms.get(tee.id),
    )


def enclave_paths(table: Any, breakdown: bool) -> dict[str, Callable[[], int]]:
    """Each path: a call that runs it once on ``table`` and returns the number of released groups."""
    import duckdb

    from enclave_worker.dp import bounded_cells, run_dp_stage
    from enclave_worker.engine import compile_for_job, public_group_keys, run_stage

    thr, dp = enclave_stage(table.schema, False), enclave_stage(table.schema, True)
    compiled = compile_for_job(thr.residual_sql, thr.specs)
    public = public_group_keys(compiled, {thr.qualified: thr.policy})

    def threshold() -> int:
        out = run_stage(
            compiled,
            {thr.table: table},
            min_group_size=K,
            rule_datasets=[thr.qualified],
            clamps=thr.clamps,
            public_keys=public,
            threads=2,
        )
        return int(out.released.num_rows)

    def noised() -> int:
        out = run_dp_stage(dp.residual_sql, dp.specs, {dp.table: table}, dp.mechanism, clamps=dp.clamps, threads=2)
        return int(out.released.num_rows)

    def cells() -> int:
        out = bounded_cells(dp.residual_sql, dp.specs, {dp.table: table}, dp.mechanism, clamps=dp.clamps, threads=2)
        return int(out.num_rows)

    def plain() -> int:
        con = duckdb.connect(config={"threads": 2})
        try:
            con.register("loans", table)
            sql = "SELECT segment, COUNT(*), SUM(amount), AVG(amount) FROM loans GROUP BY segment"
            return len(con.sql(sql).fetchall())
        finally:
            con.close()

    paths = {"plain": plain, "threshold": threshold, "dp": noised}
    if breakdown:
        paths["dp-cells"] = cells
    return paths


def bound_stats(table: Any, max_groups: int, max_rows: int) -> dict[str, float]:
    """How much of the data is over the contribution bounds (untimed): units over a bound, and their rows."""
    import duckdb

    con = duckdb.connect(config={"threads": 2})
    try:
        con.register("t", table)
        ((units, over, rows_over),) = con.sql(
            f"SELECT count(*), count(*) FILTER (over), COALESCE(sum(n) FILTER (over), 0) FROM ("
            f"SELECT customer_id, max(c) > {max_rows} OR count(*) > {max_groups} AS over, sum(c) AS n FROM ("
            "SELECT customer_id, segment, count(*) AS c FROM t GROUP BY customer_id, segment) GROUP BY customer_id)"
        ).fetchall()
    finally:
        con.close()
    return {
        "units": int(units),
        "units_over": int(over) / int(units),
        "rows_of_units_over": int(rows_over) / table.num_rows,
    }


def interleaved(paths: dict[str, Callable[[], Any]], repeat: int, label: str) -> dict[str, list[float]]:
    """One warm-up round, then ``repeat`` rounds; each round runs every path, the order reversed every
    other round. Returns each path's seconds per counted round."""
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat + 1):
        took = {}
        for name in names if r % 2 else list(reversed(names)):
            t0 = time.perf_counter()
            paths[name]()
            took[name] = time.perf_counter() - t0
        if r:
            for name in names:
                times[name].append(took[name])
        log(
            f"{label}, {'warm-up' if r == 0 else f'round {r}/{repeat}'}: "
            + ", ".join(f"{n} {took[n]:.2f} s" for n in names)
        )
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    return {
        "medians": median(times[num]) / median(times[den]),
        "within_rounds": median([a / b for a, b in zip(times[num], times[den], strict=True)]),
    }


def bench_enclave(rows: int, cases: list[str], repeat: int, breakdown: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "groups": len(SEGMENTS), "cases": {}}
    for case in cases:
        t0 = time.perf_counter()
        table = enclave_table(rows, case)
        paths = enclave_paths(table, breakdown)
        mech = enclave_stage(table.schema, True).mechanism
        (bound,) = [b for b in mech.to_dict()["contribution_bounds"]]
        stats = bound_stats(table, bound["max_groups"], bound["max_rows"])
        log(
            f"enclave {case}: {rows:,} rows, {stats['units']:,} units, {100 * stats['units_over']:.1f}% of units "
            f"over a bound ({time.perf_counter() - t0:.1f} s to build)"
        )
        released = {name: run() for name, run in paths.items()}  # also checks every path runs
        if any(n != len(SEGMENTS) for n in released.values()):
            raise RuntimeError(f"a path did not release the {len(SEGMENTS)} groups of the domain: {released}")
        times = interleaved(paths, repeat, f"enclave {case}")
        out["cases"][case] = {
            **stats,
            "arrow_bytes": table.nbytes,
            "paths": {n: {"seconds": s, "median_seconds": median(s)} for n, s in times.items()},
            "dp_vs_threshold": ratios(times, "dp", "threshold"),
            "threshold_vs_plain": ratios(times, "threshold", "plain"),
        }
        del table, paths
    out["mechanism"] = {k: v for k, v in mech.to_dict().items() if k in ("epsilon", "delta", "contribution_bounds")}
    return out


# --------------------------------------------------------------------------------------------
# MPC


def _mpc_policy(dp: bool, groups: list[str]) -> Any:
    from sealroom.policy import DatasetPolicy, DatasetTrust

    doc: dict[str, Any] = {
        "privacy_unit": "person_id",
        "min_group_size": K,
        "columns": {
            "person_id": "join_key",
            "region": {"role": "dimension", "values": groups},
            "visits": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 1000},
        },
    }
    if dp:
        doc["privacy"] = {"mode": "dp", "epsilon_budget": 4.0}
    return dataclasses.replace(DatasetPolicy.from_dict(doc, source="bench.toml"), trust=DatasetTrust(mpc_only=True))


def mpc_spec(groups: list[str], dp: bool, avg: bool) -> Any:
    """The MPC stage's spec the planner builds (every holder mpc_only)."""
    import pyarrow as pa

    from coordinator.planner import CatalogEntry, plan_query
    from sealroom.planning.plan import MpcStage

    schema = pa.schema([("person_id", pa.int64()), ("region", pa.string()), ("visits", pa.float64())])
    catalog = {f"{p}.people": CatalogEntry(p, "people", schema, _mpc_policy(dp, groups)) for p in "abc"}
    plan, _ = plan_query(
        mpc_sql(avg),
        query_id="bench",
        analyst="alice",
        catalog=catalog,
        party_keys={p: "ab" * 32 for p in "abc"},
        helper_key="cd" * 32,
        epsilon=EPSILON if dp else None,
    )
    (stage,) = plan.stages
    assert isinstance(stage, MpcStage)
    if (stage.spec.dp is not None) != dp:
        raise RuntimeError("the planner did not build the expected kind of MPC stage")
    return stage.spec


def mpc_tables(groups: list[str], rows: int, seed: int = SEED) -> list[Any]:
    """Each holder's rows: units of 5 rows, each unit in one group (within the bounds)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed + 7)
    out = []
    for i in range(3):
        unit = np.arange(rows, dtype=np.int64) // 5
        group = rng.integers(0, len(groups), max(1, rows // 5 + 1), dtype=np.int32)[unit]
        out.append(
            pa.table(
                {
                    "person_id": unit + i * 10**12,  # disjoint units per holder
                    "region": pa.DictionaryArray.from_arrays(pa.array(group), pa.array(groups)).cast(pa.string()),
                    "visits": rng.uniform(0, 1000, rows).round(1),
                }
            )
        )
    return out


def bench_mpc(n_groups: int, rows: int, repeat: int, session: bool, avg: bool) -> dict[str, Any]:
    from mpc.partials import local_partials
    from mpc.session import run_session

    groups = [f"g{i:05d}" for i in range(n_groups)]
    t0 = time.perf_counter()
    specs = {"threshold": mpc_spec(groups, False, avg), "dp": mpc_spec(groups, True, avg)}
    tables = mpc_tables(groups, rows)
    log(f"mpc: {n_groups:,} groups, 3 holders x {rows:,} rows ({time.perf_counter() - t0:.1f} s to plan and build)")

    def holder_rows(spec: Any, table: Any) -> Any:
        # As the party agent feeds its rows: the privacy unit also under the stage's unit column.
        return table.append_column(spec.unit_column, table["person_id"]) if spec.unit_column else table

    inputs = {k: [holder_rows(s, t) for t in tables] for k, s in specs.items()}
    made: dict[str, dict[int, Any]] = {}

    def partials(kind: str) -> Callable[[], Any]:
        def run() -> Any:
            spec = specs[kind]
            made[kind] = {
                p: local_partials(inputs[kind][j], spec, party="abc"[j]) for j, p in enumerate(spec.input_players)
            }
            return made[kind]

        return run

    times = interleaved({k: partials(k) for k in specs}, repeat, "mpc partials")
    out: dict[str, Any] = {
        "groups": n_groups,
        "holders": 3,
        "sql": mpc_sql(avg),
        "rows_per_holder": rows,
        "noise": specs["dp"].dp.to_dict()["scales"],
        "partials": {
            "paths": {n: {"seconds": s, "median_seconds": median(s)} for n, s in times.items()},
            "dp_vs_threshold": ratios(times, "dp", "threshold"),
        },
    }
    if session:
        stats: dict[str, list[float]] = {k: [] for k in specs}
        opened: dict[str, int] = {}

        def stage(kind: str) -> Callable[[], Any]:
            def run() -> Any:
                result = run_session(specs[kind], made[kind], timeout=900)
                stats[kind].append(float(result.stats["mpc_seconds"]))
                opened[kind] = len(result.cells)
                return result

            return run

        times = interleaved({k: stage(k) for k in specs}, repeat, "mpc session")
        if opened["dp"] != n_groups:
            raise RuntimeError("the dp MPC stage did not open every group of the domain")
        out["session"] = {
            "paths": {
                n: {
                    "seconds": s,
                    "median_seconds": median(s),
                    "median_mpc_seconds": median(stats[n][1:]),  # the warm-up's left out
                    "cells_opened": opened[n],
                }
                for n, s in times.items()
            },
            "dp_vs_threshold": ratios(times, "dp", "threshold"),
        }
    return out


# --------------------------------------------------------------------------------------------
# report


def verdict(ratio: float) -> str:
    return f"{ratio:.2f}x (target < {TARGET}x: {'met' if ratio < TARGET else 'NOT met'})"


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"dp vs threshold, medians of {doc['repeat']} interleaved round(s) after one warm-up; "
        f"{doc['machine']['cpus']} CPUs (load average {doc['load_average_at_start']:.1f} at start); epsilon {EPSILON}",
    ]
    e = doc.get("enclave")
    if e:
        lines += [
            "",
            f"enclave: {e['rows']:,} rows, {e['groups']} groups (public domain), COUNT/SUM/AVG, in process",
            f"{'case':<11}{'units':>11}{'over bound':>12}{'path':>11}{'median s':>10}{'min s':>8}{'max s':>8}",
        ]
        for case, c in e["cases"].items():
            first = True
            for name, p in c["paths"].items():
                head = f"{case:<11}{c['units']:>11,}{100 * c['units_over']:>11.1f}%" if first else " " * 34
                lines.append(
                    f"{head}{name:>11}{p['median_seconds']:>10.3f}{min(p['seconds']):>8.3f}{max(p['seconds']):>8.3f}"
                )
                first = False
        lines.append("")
        for case, c in e["cases"].items():
            r = c["dp_vs_threshold"]
            lines.append(
                f"enclave {case:<10} dp / threshold {verdict(r['medians'])}; within rounds {r['within_rounds']:.2f}x; "
                f"threshold / plain {c['threshold_vs_plain']['medians']:.2f}x"
            )
    m = doc.get("mpc")
    if m:
        lines += [
            "",
            f"MPC stage: {m['groups']:,} groups, {m['holders']} holders x {m['rows_per_holder']:,} rows",
            f"{'part':<10}{'path':>11}{'median s':>10}{'min s':>8}{'max s':>8}{'mpc s':>8}{'opened':>8}",
        ]
        for part in ("partials", "session"):
            if part not in m:
                continue
            for name, p in m[part]["paths"].items():
                extra = f"{p['median_mpc_seconds']:>8.2f}{p['cells_opened']:>8,}" if "median_mpc_seconds" in p else ""
                lines.append(
                    f"{part:<10}{name:>11}{p['median_seconds']:>10.3f}{min(p['seconds']):>8.3f}"
                    f"{max(p['seconds']):>8.3f}{extra}"
                )
        lines.append("")
        for part in ("partials", "session"):
            if part in m:
                r = m[part]["dp_vs_threshold"]
                lines.append(
                    f"MPC {part:<9}dp / threshold {verdict(r['medians'])}; within rounds {r['within_rounds']:.2f}x"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", type=int, default=10_000_000, help="enclave rows (default 10,000,000; 0: no enclave part)"
    )
    ap.add_argument("--cases", default=",".join(CASES), help="enclave data shapes (default within,exceeding)")
    ap.add_argument("--groups", type=int, default=10_000, help="MPC groups (default 10,000; 0: no MPC part)")
    ap.add_argument("--mpc-rows", type=int, default=200_000, help="rows per MPC holder (default 200,000)")
    ap.add_argument("--repeat", type=int, default=3, help="counted rounds (default 3; one warm-up more)")
    ap.add_argument("--breakdown", action="store_true", help="also time the dp engine's bounded cells without noise")
    ap.add_argument("--mpc-avg", action="store_true", help="MPC: AVG(visits) too (a secure division per group)")
    ap.add_argument("--no-session", action="store_true", help="MPC: the partials only, no MPyC stage")
    ap.add_argument("--quick", action="store_true", help="1M rows, 1,000 groups, 20,000 rows per holder, one round")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.groups, args.mpc_rows, args.repeat = (
            min(args.rows, 1_000_000),
            min(args.groups, 1000),
            20_000,
            1,
        )
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        ap.error(f"--cases takes a comma-separated subset of {','.join(CASES)}")
    if args.rows < 0 or args.groups < 0 or args.mpc_rows < 1 or args.repeat < 1:
        ap.error("--rows and --groups at least 0, --mpc-rows and --repeat at least 1")
    doc: dict[str, Any] = {
        "benchmark": "dp_cost",
        "repeat": args.repeat,
        "epsilon": EPSILON,
        "targets": {"dp_vs_threshold": TARGET},
        "machine": common.machine(),
        "load_average_at_start": os.getloadavg()[0],  # other tenants of the machine move every figure
    }
    if args.rows and cases:
        doc["enclave"] = bench_enclave(args.rows, cases, args.repeat, args.breakdown)
    if args.groups:
        doc["mpc"] = bench_mpc(args.groups, args.mpc_rows, args.repeat, not args.no_session, args.mpc_avg)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
