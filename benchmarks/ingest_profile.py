"""``--profile PATH``: where the CPU time of one path's sender and receiver goes (Linux ``perf``)."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from common import Processes, log, median
from ingest_routes import Route


def is_copy(leaf: str) -> bool:
    return "memcpy" in leaf or "memmove" in leaf


# (category, test on the sampled stack, leaf first); the first match wins.
PROFILE_CATEGORIES: list[tuple[str, Any]] = [
    ("AES-256-GCM (cryptography)", lambda leaf, st: "aesni" in leaf or "ghash" in leaf or "gcm_" in leaf),
    ("page faults: the kernel zeroing fresh memory", lambda leaf, st: "clear_page" in leaf or "page_fault" in st),
    ("mmap/munmap/madvise", lambda leaf, st: "sys_munmap" in st or "sys_mmap" in st or "madvise" in st),
    ("Arrow validate(full=True)", lambda leaf, st: "Validate" in st or "UTF8" in st),
    ("copy: IPC batch read out of the memory map", lambda leaf, st: is_copy(leaf) and "MemoryMappedFile" in st),
    ("copy: RecordBatch.serialize", lambda leaf, st: is_copy(leaf) and "RecordBatch_" in st and "serialize" in st),
    ("copy: flag byte + ciphertext (bytes concat)", lambda leaf, st: is_copy(leaf) and "bytes_concat" in st),
    ("copy: gRPC message <-> Python bytes", lambda leaf, st: is_copy(leaf) and "cygrpc" in st),
    ("copy: other", lambda leaf, st: is_copy(leaf)),
    ("memset: zero-filled output bytes", lambda leaf, st: "memset" in leaf),
    ("kernel: socket copy", lambda leaf, st: "_copy_from_iter" in leaf or "_copy_to_iter" in leaf),
    (
        "threads: wake-ups, locks, GIL, scheduling",
        lambda leaf, st: any(k in st for k in ("futex", "schedule", "take_gil", "epoll")),
    ),
    ("kernel: TCP, syscalls, other", lambda leaf, st: "[kernel" in leaf),
    ("Python interpreter", lambda leaf, st: "libpython" in leaf),
    ("gRPC core and its Cython layer", lambda leaf, st: "cygrpc" in leaf),
    ("Arrow, other", lambda leaf, st: "arrow" in leaf),
    ("other", lambda leaf, st: True),
]


class Profiler:
    """``perf record`` (cpu-clock, DWARF call graphs) on one path's sender and receiver for the timed
    rounds, then each sample put in a :data:`PROFILE_CATEGORIES` bucket. perf itself takes CPU, so
    timings measured with ``--profile`` are a little worse than without."""

    def __init__(self, procs: Processes, tmp: Path, route: Route):
        if shutil.which("perf") is None:
            raise RuntimeError("--profile needs Linux perf (apt-get install linux-perf)")
        self.route = route
        self.files = {role: tmp / f"perf-{role}.data" for role in ("sender", "receiver")}
        self.procs = [
            procs.spawn(
                f"perf-{role}",
                ["perf", "record", "-e", "cpu-clock", "-F", "299", "--call-graph", "dwarf,16384"]
                + ["-p", str(pid), "-o", str(self.files[role])],
            )
            for role, pid in (("sender", route.sender_pid), ("receiver", route.receiver_pid))
        ]
        time.sleep(1.0)  # perf attaches
        log(f"profiling {route.name} (perf record on pids {route.sender_pid} and {route.receiver_pid})")

    def finish(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            proc.wait(60)
        out: dict[str, Any] = {"path": self.route.name}
        for role, path in self.files.items():
            counts = self.classify(
                subprocess.run(
                    ["perf", "script", "-i", str(path), "-F", "ip,sym,dso"], capture_output=True, text=True, check=True
                ).stdout
            )
            total = sum(counts.values()) or 1
            cpu = median([r[f"{role}_cpu_seconds"] for r in runs])
            out[role] = {
                "samples": total,
                "cpu_seconds_per_run": cpu,
                "categories": {
                    k: {"share": v / total, "cpu_seconds_per_run": cpu * v / total} for k, v in counts.most_common()
                },
            }
        return out

    @staticmethod
    def classify(script: str) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for sample in script.split("\n\n"):
            frames = [line.strip() for line in sample.splitlines() if line.startswith("\t")]
            if not frames:
                continue
            leaf, stack = frames[0], " | ".join(frames)
            counts[next(name for name, test in PROFILE_CATEGORIES if test(leaf, stack))] += 1
        return counts
