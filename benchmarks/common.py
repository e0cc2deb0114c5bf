"""Helpers shared by the benchmarks: progress on stderr, child processes that are always cleaned up,
and memory figures read from /proc."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout carries only the results (or one JSON document)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class Processes:
    """Child processes started by one benchmark run; :meth:`stop` terminates, then kills, each one."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(
        self, name: str, argv: list[str], *, pipe: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with the repository as working directory; its output goes to ``<name>.log``
        (with ``pipe``, stdin and stdout are pipes for a line protocol and stderr goes to the log);
        ``env`` adds to this process's environment."""
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        logf = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else logf,
            stderr=logf if pipe else subprocess.STDOUT,
            cwd=REPO,
            env=full_env,
        )
        logf.close()
        self.procs[name] = proc
        return proc

    def wait_port(self, name: str, port_file: Path, timeout: float = 60.0) -> int:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while starting:\n{self.tail(name)}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text:
                return int(text)
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start within {timeout:.0f} s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.tail(name)}")

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                if proc.stdin is not None:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def proc_status_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a live process, in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_counters(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of a live process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine so far, all CPUs, excluding idle and iowait (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, object]:
    import grpc
    import pyarrow as pa
    from cryptography import __version__ as cryptography_version

    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "pyarrow": pa.__version__,
        "grpcio": grpc.__version__,
        "cryptography": cryptography_version,
    }
