"""Hybrid plans end to end: the hospital demo's cohort query, run as the hybrid plan (two hospitals
stream to the enclave, which joins hospital_east's player and the coordinator's helper in an MPC
stage) next to the same query on the TEE path (every hospital accepts the enclave), on the same
seeded data, on one running platform each, in the same run.

    python benchmarks/hybrid.py [--patients N] [--repeat R] [--json]

Prints a table (median seconds of ``client.run`` from submit to verified release, and the ratio
hybrid / TEE), or one JSON document with ``--json``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec  # noqa: E402
from sealroom.app.demo import HOSPITAL, HOSPITAL_POLICY, MPC_ONLY_HOSPITAL  # noqa: E402
from sealroom.app.demo_data import HOSPITALS, hospital_tables, write_parquet  # noqa: E402
from sealroom.policy import DatasetTrust  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parties(data_dir: Path, patients: int, *, hybrid: bool) -> list[PartySpec]:
    paths = write_parquet(hospital_tables(patients=patients), data_dir, "stays")
    mpc_only = dataclasses.replace(HOSPITAL_POLICY, trust=DatasetTrust(mpc_only=True))
    return [
        PartySpec(
            h,
            (DatasetSpec("stays", str(paths[h]), mpc_only if hybrid and h == MPC_ONLY_HOSPITAL else HOSPITAL_POLICY),),
        )
        for h in HOSPITALS
    ]


def run(kind: str, patients: int, repeat: int, workdir: Path) -> dict[str, Any]:
    sql = HOSPITAL.queries[0].sql
    state = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    with Cluster(state / "platform", parties(state / "data", patients, hybrid=kind == "hybrid")) as cluster:
        with cluster.client() as client:
            explained = client.explain_plan(sql)
            stages = [s["kind"] for s in explained.get("plan", explained)["stages"]]
            seconds, rows = [], None
            for n in range(repeat):
                start = time.perf_counter()
                result = client.run(sql, timeout=600)
                seconds.append(time.perf_counter() - start)
                if result.status != "released":
                    raise RuntimeError(f"{kind}: the query was not released ({result.error})")
                rows = result.rows()
                log(f"{kind} run {n + 1}/{repeat}: {seconds[-1]:.2f} s ({len(rows)} cells released)")
    return {"stages": stages, "seconds": seconds, "median_seconds": statistics.median(seconds), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2500, help="patients at the first hospital (the demo's 2,500)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per plan (median reported)")
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sealroom-bench-hybrid-") as tmp:
        tee = run("tee", args.patients, args.repeat, Path(tmp))
        hybrid = run("hybrid", args.patients, args.repeat, Path(tmp))
    # The same released cells either way (the TEE path counts distinct patients the same here: one
    # row per patient), up to the MPC's fixed point.
    if [r[:3] for r in tee["rows"]] != [r[:3] for r in hybrid["rows"]]:
        raise RuntimeError("the hybrid plan and the TEE path released different cells")
    doc = {
        "patients_per_hospital": [args.patients + 500 * h for h in range(len(HOSPITALS))],
        "repeat": args.repeat,
        "tee": {k: v for k, v in tee.items() if k != "rows"},
        "hybrid": {k: v for k, v in hybrid.items() if k != "rows"},
        "hybrid_vs_tee": hybrid["median_seconds"] / tee["median_seconds"],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{'plan':<8}{'stages':<12}{'median s':>10}")
        print(f"{'TEE':<8}{'+'.join(tee['stages']):<12}{tee['median_seconds']:>10.2f}")
        print(f"{'hybrid':<8}{'+'.join(hybrid['stages']):<12}{hybrid['median_seconds']:>10.2f}")
        print(f"hybrid / TEE: {doc['hybrid_vs_tee']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
