"""Running MPC sessions: one player process (:class:`PlayerProcess`), or all of them on this host
(:func:`run_session`). This module does not import MPyC: only ``python -m mpc.player`` does, in the
player's own process, so long-running servers may import this adapter.

A party agent runs its own player with :class:`PlayerProcess` (its input never leaves its host
except as secret shares); a local run (``sealroom local``, the demo, tests, the benchmark) runs
every player with :func:`run_session`. Either way a failing player ends the session within the
configured timeouts, every player process is killed and reaped (nothing left behind, its ports
free), nothing is released, and an :class:`~sealroom.errors.MpcError` names the player (index and
party), never a value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpc.partials import Partials
from mpc.result import MpcResult
from mpc.tls import PlayerCredentials, SessionCA
from sealroom.errors import MpcError
from sealroom.planning.mpc_spec import StageSpec
from sealroom.spawn import python_command

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
# The longest an owner (or the enclave) lets its player run, whatever the coordinator asks.
MAX_RUN_SECONDS = 1800.0
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STALL_TIMEOUT = 15.0
# After a first player fails, how long the others get to write their own view before all are killed.
REPORT_GRACE = 2.0
# Each player's own deadline is a backstop for a runner that died: a little later than the runner's.
PLAYER_TIMEOUT_MARGIN = 5.0
# The folder that holds the mpc package: a player process imports mpc.player from there.
_REPO = Path(__file__).resolve().parents[1]
REASONS = {
    "crashed": "exited without a result",
    "stalled": "stopped responding",
    "peer_disconnected": "disconnected",
    "start_timeout": "did not connect in time",
    "tls_refused": "presented a TLS certificate its peers refused",
    "timeout": "did not finish in time",
    "port_in_use": "could not listen on its port",
    "listen_failed": "could not listen on its port",
    "failed": "failed",
    "inconsistent": "opened a result that differs from the other players'",
}


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):  # the player died or was killed: wait() says how
        pass


def bounded_timeout(requested: float) -> float:
    """The run time a player's owner grants: what the coordinator proposes, at most
    :data:`MAX_RUN_SECONDS` (:data:`DEFAULT_TIMEOUT` when it proposes nothing usable)."""
    return min(requested, MAX_RUN_SECONDS) if requested > 0 and requested == requested else DEFAULT_TIMEOUT


def player_addresses(
    spec: StageSpec, index: int, addresses: Mapping[int, tuple[str, int]], own: tuple[str, int]
) -> list[tuple[str, int]]:
    """Every player's address in index order, from the offers' ``addresses`` (index -> (host,
    port)); MpcError unless they cover exactly the stage's players and put player ``index`` where it
    listens (``own``)."""
    if set(addresses) != set(range(len(spec.players))) or addresses[index] != own:
        raise MpcError(
            "the players' addresses do not cover the stage's players (or misplace this one)",
            details={"reason": "addresses", "player": index},
        )
    return [addresses[i] for i in range(len(spec.players))]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (the OS picks them; a player that loses its
    port to a race reports ``port_in_use`` and :func:`run_session` retries with fresh ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _error(spec: StageSpec, index: int | None, reason: str, **details: Any) -> MpcError:
    text = REASONS.get(reason, reason)
    if index is None:
        msg = f"the MPC session {text}; it ended and nothing was released"
        return MpcError(msg, details={"reason": reason, "session": spec.session_id, **details})
    name = spec.players[index].name
    msg = f"MPC player {index} ({name}) {text}; the session ended and nothing was released"
    return MpcError(msg, details={"reason": reason, "player": index, "party": name, "session": spec.session_id})


_PLAYER_ENV = frozenset({"PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT", "VIRTUAL_ENV", "SEALROOM_MPC_DEBUG"})


class PlayerProcess:
    """One player of one session as a child process of the caller (e.g. a party agent).

    ``addresses`` are every player's ``(host, port)`` in index order (this player listens on its
    own); ``partials`` is this player's input (None for a helper). :meth:`start` writes the
    player's private directory (mode 0700, under ``scratch`` if given: TLS credentials and the
    public spec), starts ``python -m mpc.player`` and hands it its input by pipe (never a file);
    :meth:`wait` returns its opened result or raises
    :class:`MpcError`; :meth:`close` kills it if it still runs and removes the directory (unless
    ``keep`` is set). Use it as a context manager.
    """

    def __init__(
        self,
        spec: StageSpec,
        index: int,
        *,
        addresses: Sequence[tuple[str, int]],
        credentials: PlayerCredentials,
        partials: Partials | None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        run_timeout: float = DEFAULT_TIMEOUT,
        bind_host: str = "127.0.0.1",
        directory: Path | None = None,
        scratch: Path | None = None,
        keep: bool = False,
    ):
        if not 0 <= index < len(spec.players) or len(addresses) != len(spec.players):
            raise ValueError("index and addresses must match the stage's players")
        if credentials.index != index:
            raise ValueError("credentials were issued for another player index")
        holds = spec.players[index].holds_input
        if holds != (partials is not None):
            raise ValueError("a player holding input needs partials; a helper player takes none")
        self.spec = spec
        self.index = index
        self.addresses = [(str(h), int(p)) for h, p in addresses]
        self.credentials = credentials
        self.partials = partials
        self.start_timeout = start_timeout
        self.run_timeout = run_timeout
        self.bind_host = bind_host
        self.keep = keep
        self._own_dir = directory is None
        # Its own private directory (removed by close()) under ``scratch``, or the system's temp dir.
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"sealroom-mpc-{index}-", dir=scratch))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._lock = threading.Lock()
        self._killed = False  # kill() came first: start() never starts the process

    @property
    def name(self) -> str:
        return self.spec.players[self.index].name

    @property
    def out_path(self) -> Path:
        return self.directory / "out.json"

    @property
    def log_path(self) -> Path:
        return self.directory / "player.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.credentials.install(self.directory)
        doc = {
            "stage": self.spec.to_dict(),
            "index": self.index,
            "addresses": self.addresses,
            "bind_host": self.bind_host,
            "start_timeout": self.start_timeout,
            "run_timeout": self.run_timeout,
        }
        # The player's input (its partials) goes through a pipe, never a file: only the public spec
        # and the TLS credentials MPyC reads from files are in the directory.
        secret = json.dumps(self.partials.to_input(self.spec) if self.partials is not None else None).encode()
        spec_path = self.directory / "spec.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        # A player gets only what Python needs, never the caller's secrets (database passwords,
        # tokens) in its environment.
        env = {k: v for k, v in os.environ.items() if k in _PLAYER_ENV or k.startswith(("LC_", "MPYC_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
        with self._lock, open(self.log_path, "ab") as logf:
            if self._killed:
                raise MpcError(
                    f"MPC player {self.index} was stopped before it started; nothing was released",
                    details={"reason": "stopped", "player": self.index},
                )
            self.proc = subprocess.Popen(
                python_command("mpc.player", str(spec_path), str(self.out_path)),
                cwd=self.directory,
                stdin=subprocess.PIPE,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        # The input by pipe, from a thread: a player that never reads it cannot block the caller
        # (wait() and kill() still end it).
        threading.Thread(target=_feed, args=(self.proc, secret), name=f"mpc-input-{self.index}", daemon=True).start()
        self.started_at = time.monotonic()
        log.info("MPC player %d started (pid %d)", self.index, self.proc.pid)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def heartbeat_age(self) -> float:
        """Seconds since the player last showed it was alive (0 until its first heartbeat is due)."""
        try:
            age = time.time() - (self.directory / "heartbeat").stat().st_mtime
        except FileNotFoundError:
            age = time.monotonic() - self.started_at - 5.0  # allow 5 s for the interpreter to start
        return max(0.0, age)

    def report(self) -> dict[str, Any] | None:
        """The player's output document, once it has written one."""
        try:
            doc: dict[str, Any] = json.loads(self.out_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return doc

    def kill(self) -> None:
        """Kill the player (SIGKILL to its process group) and reap it; before start(), it never starts."""
        with self._lock:
            self._killed = True
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self._own_dir and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PlayerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float | None = None, *, stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> dict[str, Any]:
        """Wait for this player alone (a party agent's view): its opened result, or MpcError naming
        the player it blames (itself when it crashed or stalled)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.run_timeout + self.start_timeout + 10)
        while self.poll() is None:
            if self.heartbeat_age() > stall_timeout:
                self.kill()
                raise _error(self.spec, self.index, "stalled")
            if time.monotonic() > deadline:
                self.kill()
                raise _error(self.spec, self.index, "timeout")
            time.sleep(0.02)
        self.kill()
        doc = self.report()
        if doc is None:
            raise _error(self.spec, self.index, "crashed")
        if doc.get("status") != "ok":
            blamed = _blame([doc], self.index)
            raise _error(self.spec, blamed[0], blamed[1])
        return doc


def _blame(reports: list[dict[str, Any]], fallback: int) -> tuple[int | None, str]:
    """Which player to name from the players' own error reports."""
    by_reason: dict[str, Counter[int]] = {}
    for r in reports:
        if r.get("status") == "ok":
            continue
        reason = str(r.get("reason"))
        c = by_reason.setdefault(reason, Counter())
        if reason == "tls_refused":
            for peer in r.get("peers", []):  # a refused pair counts against both ends
                c[int(peer)] += 1
                c[int(r["index"])] += 1
        elif reason in ("peer_disconnected", "start_timeout"):
            for peer in r.get("peers", []):
                c[int(peer)] += 1
        else:
            c[int(r["index"])] += 1
    for reason in ("tls_refused", "peer_disconnected", "failed", "timeout", "listen_failed", "start_timeout"):
        votes = by_reason.get(reason)
        if votes:
            return votes.most_common(1)[0][0], reason
    return fallback, "failed"


def run_session(
    spec: StageSpec,
    partials: Mapping[int, Partials],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    start_timeout: float | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    bind_host: str = "127.0.0.1",
    workdir: Path | None = None,
    credentials: Mapping[int, PlayerCredentials] | None = None,
    port_retries: int = 2,
    ca: SessionCA | None = None,
) -> MpcResult:
    """Run every player of ``spec`` on this host and return the opened result.

    ``partials`` maps each input-holding player's index to its :class:`Partials` (helpers take
    none). ``timeout`` bounds the whole session (connecting included); a player that crashes,
    disconnects or shows no heartbeat for ``stall_timeout`` seconds ends it at once. Raises
    :class:`MpcError` naming the player; on any failure every player is killed and reaped and
    nothing is returned. ``workdir`` keeps the players' directories (logs, outputs) there for
    inspection; by default they are temporary and removed. ``credentials`` overrides the
    session CA's (tests use it to present a certificate from another CA); ``ca`` is the session CA
    (default: a fresh one; tests pass theirs to present its certificates under the wrong index).
    """
    if set(partials) != set(spec.input_players):
        raise ValueError("partials must be given for exactly the players that hold input")
    start_timeout = min(timeout, DEFAULT_START_TIMEOUT) if start_timeout is None else start_timeout
    for attempt in range(port_retries + 1):
        try:
            return _run_once(spec, partials, timeout, start_timeout, stall_timeout, bind_host, workdir, credentials, ca)
        except _PortRace:
            log.info("MPC session %s: a port was taken while starting; retrying (%d)", spec.session_id, attempt + 1)
    raise _error(spec, None, "listen_failed")


class _PortRace(Exception):
    pass


def _run_once(
    spec: StageSpec,
    partials: Mapping[int, Partials],
    timeout: float,
    start_timeout: float,
    stall_timeout: float,
    bind_host: str,
    workdir: Path | None,
    credentials: Mapping[int, PlayerCredentials] | None,
    ca: SessionCA | None = None,
) -> MpcResult:
    m = len(spec.players)
    ca = ca or SessionCA(spec.session_id)
    ports = free_ports(m, bind_host)
    addresses = [(bind_host, p) for p in ports]
    base = Path(tempfile.mkdtemp(prefix="sealroom-mpc-", dir=workdir))
    players = [
        PlayerProcess(
            spec,
            i,
            addresses=addresses,
            credentials=(credentials or {}).get(i) or ca.credentials(i),
            partials=partials.get(i),
            start_timeout=start_timeout,
            run_timeout=timeout + PLAYER_TIMEOUT_MARGIN,  # this runner's deadline comes first
            bind_host=bind_host,
            directory=base / f"player-{i}",
        )
        for i in range(m)
    ]
    t0 = time.perf_counter()
    try:
        for p in players:
            p.start()
        failure = _monitor(spec, players, time.monotonic() + timeout, stall_timeout)
        if failure is not None:
            raise failure
        reports = [p.report() for p in players]
        results = [r["result"] for r in reports if r is not None]
        if len(results) != m or any(r != results[0] for r in results[1:]):
            bad = next((i for i, r in enumerate(results) if r != results[0]), 0)
            raise _error(spec, bad, "inconsistent")
        stats = {
            "seconds": time.perf_counter() - t0,
            "mpc_seconds": max(float(r["stats"]["seconds"]) for r in reports if r is not None),
            "bytes_sent": [int(r["stats"]["bytes_sent"]) for r in reports if r is not None],
        }
        return MpcResult.from_opened(spec, results[0], stats=stats)
    finally:
        for p in players:
            p.kill()
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)


def _monitor(spec: StageSpec, players: list[PlayerProcess], deadline: float, stall_timeout: float) -> MpcError | None:
    """Wait until every player exits 0 (None) or the first sign of failure (the error to raise;
    the caller kills the rest)."""
    while True:
        running = [p for p in players if p.poll() is None]
        failed = [p for p in players if p.poll() not in (None, 0)]
        if failed:
            # Give the others a moment to write their own view (who disconnected, whom TLS refused).
            grace = time.monotonic() + REPORT_GRACE
            while time.monotonic() < grace and any(p.poll() is None and p.report() is None for p in players):
                time.sleep(0.02)
            for p in players:
                p.kill()
            reports = [p.report() for p in players]
            crashed = [p.index for p, r in zip(players, reports, strict=True) if r is None and p in failed]
            if crashed:
                return _error(spec, crashed[0], "crashed")
            errors = [r for r in reports if r is not None and r.get("status") != "ok"]
            if any(r.get("reason") == "port_in_use" for r in errors):
                raise _PortRace
            index, reason = _blame(errors, failed[0].index)
            if reason == "timeout":  # a player's own deadline: name the one that stopped showing life
                index = max(players, key=lambda p: p.heartbeat_age()).index
            return _error(spec, index, reason)
        if not running:
            return None
        stale = [p for p in running if p.heartbeat_age() > stall_timeout]
        if stale:
            for p in players:
                p.kill()
            return _error(spec, stale[0].index, "stalled")
        if time.monotonic() > deadline:
            for p in players:
                p.kill()
            stalest = max(running, key=lambda p: p.heartbeat_age())
            return _error(spec, stalest.index, "timeout")
        time.sleep(0.02)
