"""A TCP relay that records every byte it forwards: the attacker on a link.

``Relay(target)`` listens on 127.0.0.1 (a free port) and forwards each connection to ``target``,
keeping a copy of what went each way. Point a component at ``relay.address`` instead of its peer,
run the legitimate path, then look for secrets in ``relay.seen()``: over TLS it holds only TLS
records, so no token, SQL, plan or value appears in it.
"""

from __future__ import annotations

import socket
import threading


class Relay:
    def __init__(self, target: str, listen: str = "127.0.0.1:0"):
        """Forward to ``target``; listen on ``listen`` (another loopback address with the target's
        port stands in for a host a component advertises, e.g. ``127.0.0.2:<port>``)."""
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        lhost, lport = listen.rsplit(":", 1)
        self._listener = socket.create_server((lhost, int(lport)))
        self.address = f"{lhost}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._streams: list[bytearray] = []  # one per connection and direction, in order
        # Per connection, the first bytes the dialling side sent (a TLS ClientHello starts 0x16 0x03).
        self.openings: list[bytes] = []
        self.connections = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for src, dst, first in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, first), name="relay-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, opening: bool) -> None:
        stream = bytearray()
        with self._lock:
            self._streams.append(stream)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if opening:
                        self.openings.append(data[:16])
                        opening = False
                    stream += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def bytes_seen(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._streams)

    def seen(self) -> bytes:
        """Everything forwarded so far: each connection's byte stream each way, whole (a secret split
        across TCP segments is still found), the streams separated by a zero byte."""
        with self._lock:
            return b"\0".join(bytes(s) for s in self._streams)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
