"""One MPC player, as its own short-lived process: ``python -m mpc.player SPEC OUT``.

Run from the player's private directory, which holds ``.config/`` (its TLS key and certificate and
the session CA; see :mod:`mpc.tls`) and ``SPEC`` (the stage, its own index, the players'
addresses, its timeouts). Its own input, if any, comes on standard input (JSON; ``null`` for a
helper), so a player's partials are never written to a file. MPyC reads ``sys.argv`` when it is imported,
so this module sets ``sys.argv`` first and imports MPyC only then; nothing else in the platform
imports MPyC.

The process binds only to 127.0.0.1 (or the host its spec names), always uses mutual TLS
(``--ssl``), and bounds everything MPyC leaves unbounded: connecting (``start_timeout``), the whole
program (``run_timeout``), and a peer whose connection drops (it stops at once and names the peer).
It writes ``OUT`` (JSON) once, atomically: ``{"status": "ok", "result": ...}`` with only opened
values, or ``{"status": "error", "reason": ..., "peers": [...]}`` naming players, never a value.
While it runs it touches ``heartbeat`` in its directory every 0.2 s, so a runner can tell a stalled
player from one that waits for others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import json
import os
import pickle
import resource
import ssl
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

from mpc import program
from sealroom.planning.mpc_spec import StageSpec

EXIT_OK = 0
EXIT_ERROR = 3
HEARTBEAT = "heartbeat"
# After seeing a peer drop, a player keeps its own connections open this long before it exits, so
# the players still running see only the first peer drop and name it (not the players that noticed).
LINGER = 2.0


class _PlayerFailure(Exception):
    def __init__(self, reason: str, peers: list[int] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.peers = sorted(set(peers or []))


def _common_names(cert: dict[str, Any] | None) -> list[str]:
    return [v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"]


def _loopback_loop(
    bind_host: str, tls_refused: set[tuple[str, int]], addresses: list[tuple[str, int]]
) -> asyncio.AbstractEventLoop:
    """An event loop whose servers bind to ``bind_host`` unless told otherwise (MPyC listens on all
    interfaces), which checks where this player connects that the peer's certificate names exactly
    that peer (OpenSSL's hostname check accepts a subject with several common names, and a
    name-constrained CA may add names after its own), and which records the peers it refused."""

    class _Loop(asyncio.SelectorEventLoop):
        async def create_server(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
            if kw.get("host") is None and (len(args) < 2 or args[1] is None):
                kw["host"] = bind_host
            return await super().create_server(*args, **kw)

        async def create_connection(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
            address = (str(args[1]), int(args[2]))
            try:
                transport, protocol = await super().create_connection(*args, **kw)
            except ssl.SSLError:
                tls_refused.add(address)
                raise
            index = addresses.index(address) if address in addresses else -1
            if kw.get("ssl") is not None and _common_names(transport.get_extra_info("peercert")) != [
                f"MPyC party {index}"
            ]:
                tls_refused.add(address)
                transport.abort()
                raise ssl.SSLError("the peer's certificate does not name exactly the player at this address")
            return transport, protocol

    return _Loop()


def _refuse_pickled_code() -> None:
    """MPyC unpickles what peers send (start-up data; secure arrays unless ``--mix32-64bit``). A
    pickle can name any importable callable, so any peer could run code in this player: accept
    plain values only (numbers, strings, bytes, lists, tuples, dicts), never a global."""
    import mpyc.runtime  # only here, once sys.argv is set: importing it parses sys.argv

    class _PlainValues(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError("an MPC peer sent a pickled global: refused")

    def loads(data: bytes) -> Any:
        return _PlainValues(io.BytesIO(data)).load()

    mpyc.runtime.pickle = types.SimpleNamespace(dumps=pickle.dumps, loads=loads)  # type: ignore[attr-defined]


def _install_peer_name_check(refused: set[int]) -> None:
    """Make the listening side check a connecting peer's name, as the connecting side does.

    MPyC checks ``MPyC party <i>`` against the certificate only where it connects; where it listens
    it takes the index the peer announces (the first two bytes it sends). Without this check any
    player could connect under another player's index and receive the messages meant for it. A
    peer whose certificate names another index is disconnected before MPyC registers it, and
    recorded in ``refused`` (reported as ``tls_refused``).
    """
    # Only here: MPyC is loaded in a player process alone (the protocol class does not parse sys.argv).
    from mpyc import asyncoro

    data_received = asyncoro.MessageExchanger.data_received
    connection_lost = asyncoro.MessageExchanger.connection_lost
    refused_protocols: set[int] = set()

    def checked_data_received(self: Any, data: bytes) -> None:
        if self.peer_pid is None and self.transport is not None and len(self.bytes) + len(data) >= 2:
            claimed = int.from_bytes((bytes(self.bytes) + bytes(data))[:2], "little")
            cert = self.transport.get_extra_info("peercert") or {}
            if _common_names(cert) != [f"MPyC party {claimed}"]:
                refused.add(claimed)
                refused_protocols.add(id(self))
                self.transport.abort()
                return
        data_received(self, data)

    def checked_connection_lost(self: Any, exc: Exception | None) -> None:
        if id(self) in refused_protocols:  # never registered with the runtime: nothing to undo
            return
        connection_lost(self, exc)

    asyncoro.MessageExchanger.data_received = checked_data_received  # type: ignore[method-assign]
    asyncoro.MessageExchanger.connection_lost = checked_connection_lost  # type: ignore[method-assign]


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            path.write_bytes(b"")
        except OSError:
            return
        stop.wait(0.2)


def _write(out: Path, doc: dict[str, Any]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, out)


async def _session(
    mpc: Any, doc: dict[str, Any], peers: _PeerWatch, tls_refused: set[tuple[str, int]], name_refused: set[int]
) -> dict[str, Any]:
    spec = StageSpec.from_dict(doc["stage"])
    me = int(doc["index"])
    addresses = [(str(h), int(p)) for h, p in doc["addresses"]]
    try:
        await asyncio.wait_for(mpc.start(), timeout=float(doc["start_timeout"]))
    except TimeoutError:
        refused = [i for i, a in enumerate(addresses) if a in tls_refused] + sorted(name_refused)
        if refused:
            raise _PlayerFailure("tls_refused", refused) from None
        missing = [p.pid for p in mpc.parties if p.pid != me and p.protocol is None]
        raise _PlayerFailure("start_timeout", missing) from None
    except OSError as exc:
        raise _PlayerFailure("port_in_use" if exc.errno == errno.EADDRINUSE else "listen_failed", [me]) from None
    t0 = time.perf_counter()

    threading.Thread(target=peers.record, daemon=True).start()

    async def watch_peers() -> int:
        while True:
            gone = peers.gone()
            if gone:
                return gone[0]
            await asyncio.sleep(0.02)

    work = asyncio.ensure_future(program.run(mpc, spec, doc.get("input")))
    watch = asyncio.ensure_future(watch_peers())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        raise _PlayerFailure("peer_disconnected", [watch.result()])
    result = work.result()
    seconds = time.perf_counter() - t0
    sent = sum(p.protocol.nbytes_sent for p in mpc.parties if p.pid != me and p.protocol is not None)
    await mpc.shutdown()
    return {"result": result, "stats": {"seconds": seconds, "bytes_sent": sent}}


class _PeerWatch:
    """Which peers' connections to this player have dropped, in the order this player first saw
    them drop: :meth:`record` runs in a thread, so the order holds even when MPyC stops the event
    loop on a reset connection."""

    def __init__(self, mpc: Any, me: int):
        self._mpc = mpc
        self._me = me
        self._first_gone: list[int] = []

    def record(self) -> None:
        while True:
            for pid in self._dropped():
                if pid not in self._first_gone:
                    self._first_gone.append(pid)
            time.sleep(0.01)

    def gone(self) -> list[int]:
        """The dropped peers, the first seen first."""
        first, gone = self._first_gone, self._dropped()
        return [p for p in first if p in gone] + [p for p in gone if p not in first]

    def _dropped(self) -> list[int]:
        """Peers whose connection to this player has dropped (after start)."""
        gone = []
        for p in self._mpc.parties:
            if p.pid == self._me:
                continue
            proto = p.protocol
            transport = getattr(proto, "transport", None)
            if proto is None or transport is None or transport.is_closing():
                gone.append(int(p.pid))
        return gone


def _no_core_dumps() -> None:
    """No core file, and not dumpable (nor ptrace-attachable by other processes of the same user):
    the player's memory holds its partials and its TLS key."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4, to 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m mpc.player SPEC OUT", file=sys.stderr)
        return 2
    _no_core_dumps()  # before the input arrives: a crash must not write its memory to a disk
    spec_path, out = Path(args[0]), Path(args[1])
    doc = json.loads(spec_path.read_text())
    doc["input"] = json.loads(sys.stdin.buffer.read() or b"null")  # the partials come by pipe, never a file
    me = int(doc["index"])
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(Path(HEARTBEAT), stop), daemon=True).start()
    # --mix32-64bit: secure arrays travel as field bytes, not pickles (see _refuse_pickled_code).
    mpyc_argv = [sys.argv[0], "--ssl", "--no-log", "--mix32-64bit", "-I", str(me)]
    mpyc_argv += ["-T", str(int(doc["stage"]["threshold"]))]
    for host, port in doc["addresses"]:
        mpyc_argv += ["-P", f"{host}:{int(port)}"]
    sys.argv = mpyc_argv  # MPyC parses sys.argv when imported: set it first
    tls_refused: set[tuple[str, int]] = set()
    name_refused: set[int] = set()
    _install_peer_name_check(name_refused)
    addresses = [(str(h), int(p)) for h, p in doc["addresses"]]
    loop = _loopback_loop(str(doc.get("bind_host", "127.0.0.1")), tls_refused, addresses)
    asyncio.set_event_loop(loop)
    from mpyc.runtime import mpc  # noqa: E402 - deliberately after sys.argv and the event loop

    _refuse_pickled_code()

    peers = _PeerWatch(mpc, me)
    code = EXIT_OK
    try:
        done = mpc.run(
            asyncio.wait_for(_session(mpc, doc, peers, tls_refused, name_refused), timeout=float(doc["run_timeout"]))
        )
        _write(out, {"status": "ok", "index": me, **done})
    except _PlayerFailure as exc:
        _write(out, {"status": "error", "index": me, "reason": exc.reason, "peers": exc.peers})
        code = EXIT_ERROR
        if exc.reason == "peer_disconnected":
            time.sleep(LINGER)  # keep our connections up a moment, so other players blame the right peer
    except TimeoutError:
        _write(out, {"status": "error", "index": me, "reason": "timeout", "peers": []})
        code = EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - reported by kind only: a message could quote a value
        # MPyC stops the event loop when a protocol task fails, e.g. on a connection reset by a peer.
        gone = peers.gone() if getattr(mpc, "start_time", None) else []
        if gone:
            _write(out, {"status": "error", "index": me, "reason": "peer_disconnected", "peers": gone})
            stop.set()
            time.sleep(LINGER)
            os._exit(EXIT_ERROR)
        if os.environ.get("SEALROOM_MPC_DEBUG") == "1":  # developers only: a traceback may quote values
            traceback.print_exc()
        _write(out, {"status": "error", "index": me, "reason": "failed", "kind": type(exc).__name__, "peers": []})
        code = EXIT_ERROR
    stop.set()
    sys.stdout.flush()
    sys.stderr.flush()
    # MPyC may still hold pending futures or connections after a failure: leave at once.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
