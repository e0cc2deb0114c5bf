"""What TLS costs the platform: the sealed data frames, the connections, and a TPC-H-style query.

A platform in plaintext cannot run a query (the agents and the enclave refuse coordinator-only and
party-only methods to a caller with no certificate), and no product switch turns those checks off.
So this measures the two things TLS adds, each TLS vs plaintext in the same run, interleaved:

- ``frames``: the sealed upload's shape (one client-streaming gRPC call of ~2 MiB opaque frames, as
  ``/sealroom.v1.EnclaveData/Upload`` carries; the bytes are random, as AES-GCM ciphertext is) from
  this process to a receiver process (``sealroom.rpc.create_server``), over a plaintext channel and
  over mutual TLS with the development CA's certificates (``sealroom.rpc.dial``). Also, in this
  process, AES-256-GCM sealing and opening of the same frames: the sealed stream's own encryption.
- ``connect``: a new channel, one small unary call, close (a TCP connection and, with TLS, a full
  mutual-TLS handshake), TLS vs plaintext.
- ``query``: a real platform (``Cluster``, TLS on every link) with three parties holding a
  TPC-H-style customer/orders/lineitem split (``--rows`` orders and line items), a join + group by
  timed end to end; then the same query once on a second platform with a recording relay on every
  link (tests/harness/relay.py), which counts the TLS connections and bytes one query makes. The TLS
  share of the query is estimated as connections x (TLS - plaintext connect) + bytes x (TLS -
  plaintext per byte), against the query's median time.

    python benchmarks/tls_cost.py [--mb 256] [--repeat 5] [--connects 40] [--rows 300000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import cpu_counters, machine  # noqa: E402

SERVICE, UPLOAD, PING = "bench.Raw", "Upload", "Ping"
FRAME = 2 * 1024 * 1024


def tls_configs(tls_dir: Path) -> tuple[Any, Any]:
    """(server, client) TLS of the development CA: the server as a party, the client as the coordinator."""
    from sealroom import pki
    from sealroom.rpc import TLSConfig

    dev = pki.DevPKI(tls_dir)
    server, client = pki.party("bench"), pki.coordinator()
    for identity in (server, client):
        dev.issue(identity)
    return (
        TLSConfig(ca=dev.ca_cert, cert=dev.cert(server), key=dev.key(server)),
        TLSConfig(ca=dev.ca_cert, cert=dev.cert(client), key=dev.key(client)),
    )


def serve(tls_dir: str, port_file: str) -> None:
    """The receiver process: counts the frames' bytes (as the enclave would take them off gRPC)."""
    import grpc

    from sealroom.rpc import create_server

    def upload(frames: Any, context: Any) -> bytes:
        return str(sum(len(f) for f in frames)).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            UPLOAD: grpc.stream_unary_rpc_method_handler(upload),
            PING: grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"ok"),
        },
    )
    tls = tls_configs(Path(tls_dir))[0] if tls_dir != "none" else None
    server = create_server("127.0.0.1:0", tls=tls, require_client_auth=tls is not None, handlers=(handler,))
    server.start()
    Path(port_file).write_text(str(server.port))
    server.serve_until_signalled()


class Receiver:
    def __init__(self, tmp: Path, tls: bool):
        from sealroom import pki

        self.tls = tls
        port_file = tmp / f"port-{tls}"
        argv = [sys.executable, __file__, "_serve", str(tmp / "tls") if tls else "none", str(port_file)]
        self.proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text()}"
        self.client_tls = tls_configs(tmp / "tls")[1] if tls else None
        self.peer = pki.party("bench")

    def channel(self) -> Any:
        from sealroom.rpc import dial

        return dial(self.address, self.client_tls, self.peer)

    def upload(self, frames: list[bytes]) -> dict[str, float]:
        with self.channel() as ch:
            ch.unary_unary(f"/{SERVICE}/{PING}")(b"")  # connected: time the frames, not the handshake
            cpu0, rcpu0, t0 = time.process_time(), cpu_counters(self.proc.pid)[0], time.perf_counter()
            got = int(ch.stream_unary(f"/{SERVICE}/{UPLOAD}")(iter(frames)))
            wall = time.perf_counter() - t0
        assert got == sum(len(f) for f in frames)
        return {"s": wall, "send_cpu": time.process_time() - cpu0, "recv_cpu": cpu_counters(self.proc.pid)[0] - rcpu0}

    def connect(self, n: int) -> float:
        """Median seconds of: new channel, one unary call, close."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            with self.channel() as ch:
                ch.unary_unary(f"/{SERVICE}/{PING}")(b"")
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def seal_cost(frames: list[bytes]) -> dict[str, float]:
    """AES-256-GCM seal and open of every frame (the sealed stream's own encryption), seconds."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    seal = open_ = 0.0
    for f in frames:  # one frame at a time, as the stream does (no table of sealed frames kept)
        t0 = time.perf_counter()
        sealed = aead.encrypt(nonce, f, b"aad")
        t1 = time.perf_counter()
        aead.decrypt(nonce, sealed, b"aad")
        seal, open_ = seal + t1 - t0, open_ + time.perf_counter() - t1
    return {"seal": seal, "open": open_}


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def transport(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    frames = [os.urandom(FRAME) for _ in range(max(1, args.mb // 2))]
    size = len(frames) * FRAME
    plain, tls = Receiver(tmp, False), Receiver(tmp, True)
    try:
        runs: dict[str, list[dict[str, float]]] = {"plaintext": [], "tls": [], "aes-gcm": []}
        for i in range(args.repeat + 1):  # round 0: warm-up, not counted
            if i % 2:  # alternate the order, so a drift of the machine does not favour one
                p, t = plain.upload(frames), tls.upload(frames)
            else:
                t, p = tls.upload(frames), plain.upload(frames)
            s = seal_cost(frames)
            if i:
                runs["plaintext"].append(p)
                runs["tls"].append(t)
                runs["aes-gcm"].append(s)
        conn = {"plaintext": [], "tls": []}
        for _ in range(args.repeat):
            conn["plaintext"].append(plain.connect(args.connects))
            conn["tls"].append(tls.connect(args.connects))
    finally:
        plain.close()
        tls.close()
    out: dict[str, Any] = {"bytes": size, "runs": runs, "connect_runs": conn}
    for k in ("plaintext", "tls"):
        out[k] = {key: med(runs[k], key) for key in ("s", "send_cpu", "recv_cpu")}
        out[k]["connect_s"] = statistics.median(conn[k])
    out["aes-gcm"] = {key: med(runs["aes-gcm"], key) for key in ("seal", "open")}
    out["tls_extra_s_per_gb"] = (out["tls"]["s"] - out["plaintext"]["s"]) / size * 1e9
    out["tls_extra_cpu_s_per_gb"] = (
        (out["tls"]["send_cpu"] + out["tls"]["recv_cpu"] - out["plaintext"]["send_cpu"] - out["plaintext"]["recv_cpu"])
        / size
        * 1e9
    )
    out["seal_open_cpu_s_per_gb"] = (out["aes-gcm"]["seal"] + out["aes-gcm"]["open"]) / size * 1e9
    pairs = list(zip(runs["tls"], runs["plaintext"], strict=True))
    out["ratio_tls_plain"] = statistics.median(t["s"] / p["s"] for t, p in pairs)
    out["cpu_ratio_tls_plain"] = statistics.median(
        (t["send_cpu"] + t["recv_cpu"]) / (p["send_cpu"] + p["recv_cpu"]) for t, p in pairs
    )
    out["connect_extra_s"] = out["tls"]["connect_s"] - out["plaintext"]["connect_s"]
    return out


QUERY = (
    "SELECT c.c_mktsegment, COUNT(*) AS n, SUM(l.l_extendedprice) AS revenue "
    "FROM acme.customer c JOIN bolt.orders o ON c.c_custkey = o.o_custkey "
    "JOIN crux.lineitem l ON o.o_orderkey = l.l_orderkey GROUP BY c.c_mktsegment ORDER BY c.c_mktsegment"
)


def tpch_parties(data: Path, rows: int) -> list[Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sealroom.app.cluster import DatasetSpec, PartySpec
    from sealroom.policy import DatasetPolicy

    rng = np.random.default_rng(7)
    customers = max(1000, rows // 10)
    tables = {
        ("acme", "customer", "c_custkey"): {
            "c_custkey": np.arange(customers, dtype=np.int64),
            "c_mktsegment": rng.choice(["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"], customers),
        },
        ("bolt", "orders", "o_custkey"): {
            "o_orderkey": np.arange(rows, dtype=np.int64),
            "o_custkey": rng.integers(0, customers, rows, dtype=np.int64),
        },
        ("crux", "lineitem", "l_custkey"): {
            "l_orderkey": rng.integers(0, rows, rows, dtype=np.int64),
            "l_custkey": rng.integers(0, customers, rows, dtype=np.int64),
            "l_extendedprice": rng.uniform(900, 100_000, rows).round(2),
        },
    }
    specs = []
    for (party, name, unit), cols in tables.items():
        path = data / f"{party}.{name}.parquet"
        pq.write_table(pa.table(cols), path)
        policy = DatasetPolicy(privacy_unit=unit, min_group_size=5)
        specs.append(PartySpec(party, (DatasetSpec(name, str(path), policy),)))
    return specs


def query(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from sealroom.app.cluster import Cluster
    from tests.harness.relay import Relay

    parties = tpch_parties(tmp, args.rows)
    times = []
    with Cluster(tmp / "direct", parties) as cluster, cluster.client() as client:
        for i in range(args.repeat + 1):
            t0 = time.perf_counter()
            result = client.run(QUERY)
            if result.status != "released":
                raise RuntimeError(f"the query was not released: {result.error}")
            if i:
                times.append(time.perf_counter() - t0)
    relays: dict[str, Relay] = {}

    def route(link: str, address: str) -> str:
        listen = f"127.0.0.2:{address.rsplit(':', 1)[1]}" if link.startswith("coordinator->party-") else "127.0.0.1:0"
        relays[link] = Relay(address, listen=listen)
        return relays[link].address

    with Cluster(tmp / "relayed", parties, route=route) as cluster:
        relays["analyst->coordinator"] = Relay(cluster.coordinator_address)
        from sealroom.app.client import Client

        with Client(relays["analyst->coordinator"].address, token=cluster.token(), ca=cluster.ca_path) as client:
            client.run(QUERY)  # warm: registration, first channels
            before = {k: (r.connections, r.bytes_seen) for k, r in relays.items()}
            client.run(QUERY)
            links = {
                k: {"connections": r.connections - before[k][0], "bytes": r.bytes_seen - before[k][1]}
                for k, r in relays.items()
            }
    for r in relays.values():
        r.close()
    return {"rows": args.rows, "median_s": statistics.median(times), "runs": times, "links": links}


def render(doc: dict[str, Any]) -> str:
    t = doc["transport"]
    gb = t["bytes"] / 1e9
    lines = [
        f"frames: {t['bytes'] / 2**20:.0f} MiB in 2 MiB frames, one client-streaming call, "
        f"medians of {len(t['runs']['tls'])}",
        f"{'path':<22}{'wall s':>8}{'GB/s':>7}{'send cpu':>10}{'recv cpu':>10}{'connect ms':>12}",
    ]
    for k in ("plaintext", "tls"):
        r = t[k]
        lines.append(
            f"{'gRPC ' + k:<22}{r['s']:>8.3f}{gb / r['s']:>7.2f}{r['send_cpu']:>10.3f}{r['recv_cpu']:>10.3f}"
            f"{r['connect_s'] * 1e3:>12.2f}"
        )
    a = t["aes-gcm"]
    lines += [
        f"{'AES-256-GCM seal+open':<22}{a['seal'] + a['open']:>8.3f}{gb / (a['seal'] + a['open']):>7.2f}"
        f"{a['seal']:>10.3f}{a['open']:>10.3f}",
        "",
        f"tls / plaintext (frames): {t['ratio_tls_plain']:.2f}x wall, {t['cpu_ratio_tls_plain']:.2f}x CPU "
        "(medians of per-round ratios); "
        f"TLS adds {t['tls_extra_s_per_gb']:.2f} s/GB wall, {t['tls_extra_cpu_s_per_gb']:.2f} CPU s/GB "
        f"(the sealed stream's own AES-GCM: {t['seal_open_cpu_s_per_gb']:.2f} CPU s/GB)",
        f"a connection: {t['tls']['connect_s'] * 1e3:.2f} ms with mutual TLS, "
        f"{t['plaintext']['connect_s'] * 1e3:.2f} ms plaintext (+{t['connect_extra_s'] * 1e3:.2f} ms)",
    ]
    q = doc.get("query")
    if q:
        conns = sum(v["connections"] for v in q["links"].values())
        nbytes = sum(v["bytes"] for v in q["links"].values())
        # Serial and per byte at the larger of the wall and CPU figures: an upper bound (the parties'
        # connections and uploads run in parallel).
        per_gb = max(0.0, t["tls_extra_s_per_gb"], t["tls_extra_cpu_s_per_gb"])
        est = conns * t["connect_extra_s"] + nbytes * per_gb / 1e9
        lines += [
            "",
            f"query (3 parties, {q['rows']:,} orders and line items, join + group by, TLS on every link): "
            f"median {q['median_s']:.2f} s of {len(q['runs'])}",
            f"  one query: {conns} new connections, {nbytes / 2**20:.1f} MiB over the links "
            + ", ".join(f"{k} {v['connections']}c/{v['bytes'] / 2**20:.1f}MiB" for k, v in q["links"].items()),
            f"  TLS share, estimated (upper bound): {est * 1e3:.1f} ms = {100 * est / q['median_s']:.1f}% of the query",
        ]
        doc["query"]["tls_estimate_s"] = est
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_serve":
        serve(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="MiB of frames per upload (default 256)")
    p.add_argument("--repeat", type=int, default=5, help="counted rounds (default 5; one warm-up more)")
    p.add_argument("--connects", type=int, default=40, help="connections per connect measurement")
    p.add_argument("--rows", type=int, default=300_000, help="orders and line items (0: no query part)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as d:
        tmp = Path(d)
        doc: dict[str, Any] = {"machine": machine(), "transport": transport(args, tmp)}
        if args.rows:
            doc["query"] = query(args, tmp)
    text = render(doc)
    print(json.dumps(doc, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
