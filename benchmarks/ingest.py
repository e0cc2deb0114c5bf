"""Ingest benchmark: one Arrow table from one process to another, sealed vs Arrow Flight.

Three paths move the same table (int64 id, int32 category, float64 amount, short string label;
``--rows``, 10 million by default, seeded) from a sender process to a receiver process that ends up
holding it in memory as a pyarrow Table:

- ``sealed``: the real data path. A party agent process (``connectors.agent.PartyAgent`` behind its
  own gRPC server) is asked to ``Contribute`` to a job of a real enclave worker process
  (``sealroom enclave serve``, simulated attestation): it attests the job, verifies the evidence,
  reads the Arrow IPC file, seals ~2 MiB frames (AES-256-GCM, HPKE-wrapped data key), signs the
  stream header and streams the frames over the raw-bytes ``/sealroom.v1.EnclaveData/Upload``
  method; the enclave opens every frame and holds the table. Timed: the ``Contribute`` call, which
  returns once the enclave holds the whole table.
- ``flight``: a ``pyarrow.flight`` client process ``DoPut``s the same file's batches to a Flight
  server process whose ``do_put`` reads them all into a Table and holds it. Timed: the client
  connecting, reading and sending the file, until ``DoPut`` completes (the server holds the table).
- ``flight-tls``: the same over TLS (a throwaway self-signed certificate for 127.0.0.1).

Every sender reads the table from one Arrow IPC file, written once and memory-mapped, in batches of
about ``connectors.agent.TARGET_FRAME_BYTES`` so that every path sends the same messages.
Repetitions are interleaved (sealed, flight, flight-tls, sealed, ...) after one untimed warm-up
round. Reported: per path the median seconds and GB/s (bytes = ``table.nbytes``, GB = 10^9 bytes),
the ratios sealed/flight and sealed/flight-tls, the CPU seconds and page faults of sender and
receiver, and each receiver's peak RSS (VmHWM) against the bytes it holds.

Diagnostic paths (``--paths``, not run by default) take the sealed path apart. A path is a base
with optional ``+modifier``s, e.g. ``--paths sealed,flight,sealed+malloc+readfix,flight+malloc``:

- bases ``grpc-raw`` (the enclave's raw-bytes client-streaming gRPC shape carrying plain Arrow IPC
  frames, fully validated on receipt, no encryption) and ``sealed-flight`` (the same sealed frames,
  encrypted straight into Arrow buffers, carried as Flight ``DoPut`` app_metadata and opened with
  ``OpeningStream``: a prototype of Flight as the transport);
- ``+malloc``: the sender and receiver run with glibc malloc tuned (:data:`MALLOC_ENV`);
- ``+readfix``: the sender reads the IPC file in place (``ArrowIpcSource`` asks for all fields by
  index, which makes Arrow copy every batch out of the memory map; the patch passes ``None``);
- ``+novalidate``: the receiver checks batches with ``validate()``, not ``validate(full=True)``
  (to measure what full validation costs, not a proposal to drop it);
- ``+pipeline``: a helper thread seals one frame ahead on the sender and takes frames off gRPC one
  frame ahead on the receiver.

Modifiers other than ``+malloc`` patch code inside this benchmark's own worker processes (the
``sealed`` path itself runs the unmodified ``sealroom enclave serve``). ``--profile PATH`` records
that path's sender and receiver with Linux ``perf`` and breaks their CPU time down by cause.

    python benchmarks/ingest.py [--rows 10000000] [--repeat 3] [--json] [--paths sealed,flight,...]

The pieces live beside this script: ingest_data (paths, table, file), ingest_workers (the sender and
receiver processes), ingest_routes (one route per path), ingest_profile (``--profile``) and
ingest_report (the JSON document and its text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
from common import Processes, busy_cpu_seconds, cpu_counters, log, proc_status_bytes
from ingest_data import DATASET, MODS, PATHS, SEED, Options, make_table, self_signed_cert, split_path, write_ipc
from ingest_profile import Profiler
from ingest_report import render, report
from ingest_routes import Route, Setup, make_route

from connectors.agent import TARGET_FRAME_BYTES
from sealroom.attestation import dev_init

__all__ = ["main", "render"]


class Bench:
    """One run: write the data file, start every path's processes, run the interleaved rounds."""

    def __init__(self, options: Options, tmp: Path, procs: Processes):
        self.options = options
        self.tmp = tmp
        self.procs = procs
        self.routes: list[Route] = []

    def prepare_data(self) -> tuple[Setup, dict[str, Any]]:
        t0 = time.perf_counter()
        table = make_table(self.options.rows)
        ipc_path = self.tmp / f"{DATASET}.arrow"
        batch_rows = write_ipc(table, ipc_path, self.options.frame_bytes or TARGET_FRAME_BYTES)
        del table
        # What every receiver ends up holding: the table as the file holds it (read in place).
        with pa.memory_map(str(ipc_path)) as source:
            table = ipc.open_file(source).read_all()
        info = {
            "rows": table.num_rows,
            "bytes": table.nbytes,
            "schema": [f"{f.name} {f.type}" for f in table.schema],
            "batch_rows": batch_rows,
            "batches": -(-table.num_rows // batch_rows),
            "file_bytes": ipc_path.stat().st_size,
            "seed": SEED,
        }
        log(
            f"table: {info['rows']:,} rows, {info['bytes'] / 1e6:.1f} MB in {info['batches']} batches of "
            f"{batch_rows:,} rows, written in {time.perf_counter() - t0:.1f} s"
        )
        setup = Setup(self.tmp, self.procs, ipc_path, table.schema, table.nbytes, self.options.frame_bytes)
        return setup, info

    def run_once(self, route: Route) -> dict[str, Any]:
        pids = (route.sender_pid, route.receiver_pid)
        busy = busy_cpu_seconds()
        before = [cpu_counters(pid) for pid in pids]
        r = route.run()
        after = [cpu_counters(pid) for pid in pids]
        busy = busy_cpu_seconds() - busy
        for role, b, a in zip(("sender", "receiver"), before, after, strict=True):
            r[f"{role}_cpu_seconds"] = a[0] - b[0]
            r[f"{role}_page_faults"] = a[1] - b[1]
        # CPU time the rest of the machine took meanwhile: other tenants make the wall time noisy.
        r["other_cpu_seconds"] = max(0.0, busy - r["sender_cpu_seconds"] - r["receiver_cpu_seconds"])
        return r

    def check_and_log(self, label: str, route: Route, r: dict[str, Any], data: dict[str, Any]) -> None:
        if r["bytes"] != data["bytes"] or r.get("rows", data["rows"]) != data["rows"]:
            raise RuntimeError(
                f"{route.name}: the receiver holds {r['bytes']} bytes ({r.get('rows', '?')} rows), "
                f"not {data['bytes']} bytes ({data['rows']} rows)"
            )
        log(
            f"{label:<11} {route.name:<20} {r['seconds']:6.3f} s {data['bytes'] / r['seconds'] / 1e9:5.2f} "
            f"GB/s | cpu s sender {r['sender_cpu_seconds']:.2f} receiver {r['receiver_cpu_seconds']:.2f}"
            f" | page faults sender {r['sender_page_faults']} receiver {r['receiver_page_faults']}"
            f" | other processes {r['other_cpu_seconds']:.2f} cpu s"
        )

    def main(self) -> dict[str, Any]:
        options = self.options
        setup, data = self.prepare_data()
        if "flight-tls" in options.paths:
            setup = dataclasses.replace(setup, tls=self_signed_cert(self.tmp))
        if any(p.startswith("sealed") for p in options.paths):
            dev_init(self.tmp / "dev")
            setup = dataclasses.replace(setup, dev_root=self.tmp / "dev")
        try:
            for name in options.paths:
                self.routes.append(make_route(setup, name))
            baseline = {r.name: proc_status_bytes(r.receiver_pid)["VmRSS"] for r in self.routes}
            runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in self.routes}
            profiler: Profiler | None = None
            for rnd in range(options.warmup + options.repeat):
                timed = rnd >= options.warmup
                label = f"round {rnd - options.warmup + 1}/{options.repeat}" if timed else "warm-up"
                if rnd == options.warmup and options.profile:
                    route = next(r for r in self.routes if r.name == options.profile)
                    profiler = Profiler(self.procs, self.tmp, route)
                for route in self.routes:
                    r = self.run_once(route)
                    self.check_and_log(label, route, r, data)
                    if timed:
                        runs[route.name].append(r)
            peaks = {r.name: proc_status_bytes(r.receiver_pid)["VmHWM"] for r in self.routes}
            profile = profiler.finish(runs[options.profile]) if profiler is not None and options.profile else None
        finally:
            for route in self.routes:
                route.close()
        doc = report(self.routes, options, data, runs, baseline, peaks)
        if profile is not None:
            doc["profile"] = profile
        return doc


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        description="Ingest benchmark: the sealed path vs Arrow Flight (plaintext and TLS).",
        epilog="diagnostic paths: "
        + "; ".join(f"{base}[{''.join('+' + m for m in sorted(mods))}]" for base, mods in MODS.items())
        + " (see the module docstring)",
    )
    p.add_argument("--rows", type=int, default=10_000_000, help="rows in the table (default 10,000,000)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path, interleaved (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated paths (default {','.join(PATHS)})")
    p.add_argument(
        "--frame-bytes",
        type=int,
        default=0,
        help="override connectors.agent.TARGET_FRAME_BYTES in the senders (and the file's batch size)",
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="record that path's sender and receiver with Linux perf and break their CPU time down",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data) and say where")
    args = p.parse_args(argv)
    paths = tuple(dict.fromkeys(x for x in args.paths.split(",") if x))
    for name in paths:
        base, mods = split_path(name)
        if base not in MODS or not mods <= MODS[base]:
            p.error(f"--paths: {name!r} is not a path; see --help")
    if not paths:
        p.error("--paths: name at least one path")
    if args.profile and args.profile not in paths:
        p.error("--profile takes one of the paths being run")
    if args.rows < 1 or args.repeat < 1 or args.warmup < 0 or args.frame_bytes < 0:
        p.error("--rows and --repeat must be >= 1, --warmup and --frame-bytes >= 0")
    return Options(
        rows=args.rows,
        repeat=args.repeat,
        warmup=args.warmup,
        as_json=args.json,
        paths=paths,
        frame_bytes=args.frame_bytes,
        profile=args.profile,
        keep=args.keep,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sealroom-bench-"))
    procs = Processes(tmp)
    try:
        doc = Bench(options, tmp, procs).main()
    except BaseException:
        for name in procs.procs:
            tail = procs.tail(name, 15)
            if tail:
                log(f"--- {name} log (last lines) ---\n{tail}")
        raise
    finally:
        procs.stop()
        if options.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["wall_seconds"] = time.perf_counter() - t0
    log(f"done in {doc['wall_seconds']:.0f} s")
    print(json.dumps(doc, indent=2) if options.as_json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
