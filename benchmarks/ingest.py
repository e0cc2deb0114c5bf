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
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import _common
from _common import Processes, busy_cpu_seconds, cpu_counters, log, median, proc_status_bytes

PATHS = ("sealed", "flight", "flight-tls")
# Diagnostic bases and the modifiers each takes (``--paths sealed+malloc+readfix,flight+malloc``).
SENDER_MODS = frozenset({"readfix", "pipeline"})
RECEIVER_MODS = frozenset({"novalidate", "pipeline"})
MODS = {
    "sealed": {"malloc"} | SENDER_MODS | RECEIVER_MODS,
    "sealed-flight": {"malloc", "readfix", "novalidate"},
    "grpc-raw": {"malloc", "readfix"},
    "flight": {"malloc"},
    "flight-tls": {"malloc"},
}
PARTY = "bench"
DATASET = "events"
SQL = f"SELECT category, label, COUNT(*) AS n, SUM(amount) AS total FROM {PARTY}.{DATASET} GROUP BY category, label"
SEED = 20260611
TARGETS = {"sealed_vs_flight": 1.2, "sealed_vs_flight_tls": 1.0}
# glibc: serve every allocation below 32 MiB from the heap (no mmap/munmap per 2 MiB frame buffer)
# and keep up to 256 MiB of freed heap, so frame buffers are reused instead of page-faulted anew.
# (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=..., or mallopt(),
# say the same.)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
RAW_SERVICE, RAW_UPLOAD, RAW_DROP = "bench.Raw", "Upload", "Drop"


# --- data -----------------------------------------------------------------------------------------


def make_table(rows: int, seed: int = SEED) -> Any:
    """The benchmark table, the same for a given seed: 4 columns, about 33 bytes a row."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    vocab = pa.array([f"{kind}-{n:0{width}d}" for n in range(64) for kind, width in (("seg", 2), ("region", 4))])
    return pa.table(
        {
            "id": pa.array(rng.permutation(rows).astype(np.int64)),
            "category": pa.array(rng.integers(0, 500, rows, dtype=np.int32)),
            "amount": pa.array(np.round(rng.gamma(2.0, 150.0, rows), 2)),
            "label": vocab.take(pa.array(rng.integers(0, len(vocab), rows))),
        }
    )


def write_ipc(table: Any, path: Path, frame_bytes: int) -> int:
    """Write ``table`` as an Arrow IPC file in batches that the party agent sends unchanged (the
    same rows per batch as ``connectors.agent.rebatch`` cuts); returns the rows per batch."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    per_row = max(1, table.nbytes // max(1, table.num_rows))
    batch_rows = max(1, frame_bytes // per_row)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return batch_rows


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost (PEM cert, PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "flight.crt", directory / "flight.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def split_path(name: str) -> tuple[str, set[str]]:
    base, *mods = name.split("+")
    return base, set(mods)


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``items`` in a helper thread, up to ``depth`` ahead (diagnostic ``+pipeline`` paths)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


# --- worker processes (hidden sub-commands) ----------------------------------------------------------


def _mods(args: argparse.Namespace) -> set[str]:
    return set(filter(None, (args.mods or "").split("+")))


def patch_sender(mods: set[str]) -> None:
    """Diagnostic changes to the sender side, applied in this worker process only."""
    from connectors import sources

    if "readfix" in mods:
        # ArrowIpcSource passes included_fields even when every field is wanted, and Arrow then
        # copies each batch out of the memory map; with None it reads the batch in place.
        batches = sources.ArrowIpcSource._batches

        def in_place(self: Any, included: list[int] | None, names: Any, batch_rows: int) -> Any:
            if included is not None and included == list(range(len(self.schema))):
                included = None
            return batches(self, included, names, batch_rows)

        sources.ArrowIpcSource._batches = in_place  # type: ignore[method-assign]
    if "pipeline" in mods:
        from sealroom import sealed

        frames = sealed.SealingStream.frames
        sealed.SealingStream.frames = lambda self, batches: prefetch(frames(self, batches))  # type: ignore[method-assign]


def patch_receiver(mods: set[str]) -> None:
    """Diagnostic changes to the enclave side, applied in this worker process only."""
    import pyarrow as pa

    from sealroom import sealed

    if "novalidate" in mods:

        def open_batch(self: sealed.OpeningStream, frame: Any) -> Any:
            buf = self.open(frame)
            if buf.size == 0 and self._finished:
                return None
            batch = pa.ipc.read_record_batch(buf, self.schema)
            batch.validate()
            return batch

        sealed.OpeningStream.open_batch = open_batch  # type: ignore[method-assign]
    if "pipeline" in mods:
        from enclave_worker import jobs

        upload = jobs.JobRegistry.upload

        def pipelined(self: Any, header: bytes, signature: Any, frames: Iterable[bytes], *a: Any, **kw: Any) -> Any:
            # A helper thread takes frames off gRPC while the handler thread opens the previous one.
            return upload(self, header, signature, prefetch(frames, depth=4), *a, **kw)

        jobs.JobRegistry.upload = pipelined  # type: ignore[method-assign]


def worker_party(args: argparse.Namespace) -> None:
    """A real party agent behind its real gRPC server (it does not register with a coordinator)."""
    import logging

    from connectors import agent as agent_mod
    from connectors.agent import party as party_mod

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.frame_bytes:
        party_mod.TARGET_FRAME_BYTES = args.frame_bytes  # what contribute() cuts the party's batches to
    patch_sender(_mods(args))
    agent = agent_mod.PartyAgent(agent_mod.PartyConfig.load(Path(args.config)))
    server = agent_mod.build_server(agent)
    server.start()
    Path(args.port_file).write_text(str(server.port))
    server.serve_until_signalled()


def worker_enclave(args: argparse.Namespace) -> None:
    """``sealroom enclave serve`` with diagnostic changes (the ``sealed`` path runs the real CLI)."""
    import logging

    from enclave_worker import server
    from enclave_worker.config import EnclaveConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    patch_receiver(_mods(args))
    server.serve(EnclaveConfig.load(Path(args.config)), port_file=args.port_file)


def worker_flight_server(args: argparse.Namespace) -> None:
    """A Flight server whose DoPut reads every batch into one Table and holds it."""
    import pyarrow.flight as flight

    class Receiver(flight.FlightServerBase):
        def __init__(self, location: str, **kw: Any):
            super().__init__(location, **kw)
            self.lock = threading.Lock()
            self.held: Any = None

        def do_put(self, context, descriptor, reader, writer):  # noqa: ANN001
            table = reader.read_all()
            with self.lock:
                self.held = table

        def do_action(self, context, action):  # noqa: ANN001
            with self.lock:
                table = self.held
                if action.type == "drop":
                    self.held = None
            doc = {"rows": 0, "bytes": 0} if table is None else {"rows": table.num_rows, "bytes": table.nbytes}
            yield flight.Result(json.dumps(doc).encode())

    kw: dict[str, Any] = {}
    scheme = "grpc"
    if args.tls_cert:
        kw["tls_certificates"] = [
            flight.CertKeyPair(cert=Path(args.tls_cert).read_bytes(), key=Path(args.tls_key).read_bytes())
        ]
        scheme = "grpc+tls"
    server = Receiver(f"{scheme}://127.0.0.1:0", **kw)
    Path(args.port_file).write_text(str(server.port))
    server.serve()


def worker_flight_client(args: argparse.Namespace) -> None:
    """For each ``put`` line on stdin: DoPut the IPC file, then reply with one JSON line."""
    import pyarrow as pa
    import pyarrow.flight as flight
    import pyarrow.ipc as ipc

    kw: dict[str, Any] = {}
    if args.tls_root:
        kw["tls_root_certs"] = Path(args.tls_root).read_bytes()
    for line in sys.stdin:
        if line.strip() != "put":
            continue
        t0 = time.perf_counter()
        client = flight.FlightClient(args.location, **kw)
        with pa.memory_map(args.ipc) as source:
            reader = ipc.open_file(source)
            writer, _ = client.do_put(flight.FlightDescriptor.for_path(DATASET), reader.schema)
            for i in range(reader.num_record_batches):
                writer.write_batch(reader.get_batch(i))
            writer.close()
        seconds = time.perf_counter() - t0
        held = json.loads(next(iter(client.do_action(flight.Action("drop", b"")))).body.to_pybytes())
        client.close()
        print(json.dumps({"seconds": seconds, **held}), flush=True)


def worker_raw_server(args: argparse.Namespace) -> None:
    """Diagnostic receiver: the enclave's raw-bytes gRPC shape, frames are plain IPC record batches
    (read zero-copy from the received bytes and fully validated, as the enclave does), no crypto."""
    import pyarrow as pa

    from sealroom.rpc import create_server

    held: dict[str, Any] = {}

    def upload(frames: Iterator[bytes], context: Any) -> bytes:
        schema = pa.ipc.read_schema(pa.py_buffer(dict(context.invocation_metadata())["schema-bin"]))
        batches = []
        for frame in frames:
            batch = pa.ipc.read_record_batch(pa.py_buffer(frame), schema)
            batch.validate(full=True)
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema)
        held["table"] = table
        return json.dumps({"rows": table.num_rows, "bytes": table.nbytes, "frames": len(batches)}).encode()

    def drop(frames: Iterator[bytes], context: Any) -> bytes:
        held.clear()
        return b"{}"

    import grpc

    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            RAW_UPLOAD: grpc.stream_unary_rpc_method_handler(upload),
            RAW_DROP: grpc.stream_unary_rpc_method_handler(drop),
        },
    )
    server = create_server("127.0.0.1:0", handlers=(handler,))
    server.start()
    Path(args.port_file).write_text(str(server.port))
    server.serve_until_signalled()


def worker_raw_client(args: argparse.Namespace) -> None:
    """Diagnostic sender: reads the file as the party agent does and streams ``batch.serialize()``
    bytes (one copy, like the sealed frame) over the raw-bytes gRPC shape."""
    from connectors.agent import TARGET_FRAME_BYTES, rebatch
    from connectors.sources import open_source
    from sealroom.rpc import open_channel

    source = open_source(args.ipc, dataset=f"{PARTY}.{DATASET}")
    target = args.frame_bytes or TARGET_FRAME_BYTES
    for line in sys.stdin:
        if line.strip() != "put":
            continue
        t0 = time.perf_counter()
        with open_channel(args.location) as channel:
            upload = channel.stream_unary(f"/{RAW_SERVICE}/{RAW_UPLOAD}")
            frames = (b.serialize().to_pybytes() for b in rebatch(source.batches(), target))
            reply = json.loads(upload(frames, metadata=(("schema-bin", source.schema.serialize().to_pybytes()),)))
            seconds = time.perf_counter() - t0
            channel.stream_unary(f"/{RAW_SERVICE}/{RAW_DROP}")(iter(()))
        print(json.dumps({"seconds": seconds, **reply}), flush=True)


def worker_sflight_server(args: argparse.Namespace) -> None:
    """Prototype receiver: the same sealed frames carried as Arrow Flight ``DoPut`` app_metadata
    (so gRPC's C++ core hands each frame over as an Arrow buffer, with no Python bytes copies);
    each frame is opened with :class:`sealroom.sealed.OpeningStream` exactly as the enclave does.
    The stream header travels in the descriptor; this prototype does not check the owner's
    signature or the job context (the enclave does; neither depends on the transport)."""
    import pyarrow as pa
    import pyarrow.flight as flight
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from sealroom.sealed import OpeningStream, StreamHeader

    patch_receiver(_mods(args))

    class Receiver(flight.FlightServerBase):
        def __init__(self, location: str):
            super().__init__(location)
            self.lock = threading.Lock()
            self.held: Any = None
            self.key = X25519PrivateKey.generate()

        def do_put(self, context, descriptor, reader, writer):  # noqa: ANN001
            header = StreamHeader.from_bytes(descriptor.command)
            opener = OpeningStream(header, self.key)
            batches = []
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                batch = opener.open_batch(chunk.app_metadata)
                if batch is not None:
                    batches.append(batch)
            opener.close()
            table = pa.Table.from_batches(batches, schema=opener.schema)
            with self.lock:
                self.held = table

        def do_action(self, context, action):  # noqa: ANN001
            if action.type == "key":
                self.key = X25519PrivateKey.generate()
                raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                yield flight.Result(raw)
                return
            with self.lock:
                table, self.held = self.held, None
            doc = {"rows": 0, "bytes": 0} if table is None else {"rows": table.num_rows, "bytes": table.nbytes}
            yield flight.Result(json.dumps(doc).encode())

    server = Receiver("grpc://127.0.0.1:0")
    Path(args.port_file).write_text(str(server.port))
    server.serve()


def seal_into_buffer(sealer: Any, payload: Any, seq: int, final: bool) -> Any:
    """The frame ``SealingStream.seal`` makes (flag byte || AES-256-GCM ciphertext || tag), encrypted
    straight into one Arrow buffer: no zero-filled bytes object, no concatenation copy."""
    import pyarrow as pa

    from sealroom import sealed

    flag = sealed._FLAG_FINAL if final else 0
    view = memoryview(payload).cast("B")
    out = pa.allocate_buffer(1 + len(view) + 16)
    mv = memoryview(out).cast("B")
    mv[0] = flag
    aad = sealer._aad_prefix + seq.to_bytes(8, "big") + bytes((flag,))
    sealer._aead.encrypt_into(sealed._nonce(seq), view, aad, mv[1:])
    return out


def worker_sflight_client(args: argparse.Namespace) -> None:
    """Prototype sender: reads the file as the party agent does and seals the same frames (same
    key schedule, nonces and associated data as :class:`sealroom.sealed.SealingStream`), but
    encrypts each one straight into an Arrow buffer behind its flag byte (``encrypt_into``: no
    concatenation copy, no zero-filled bytes) and sends it as Flight ``DoPut`` app_metadata."""
    import hashlib
    import os

    import pyarrow as pa
    import pyarrow.flight as flight
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from connectors.agent import TARGET_FRAME_BYTES, rebatch
    from connectors.sources import open_source
    from sealroom import sealed

    patch_sender(_mods(args))
    source = open_source(args.ipc, dataset=f"{PARTY}.{DATASET}")
    target = args.frame_bytes or TARGET_FRAME_BYTES
    empty = pa.schema([])
    for line in sys.stdin:
        if line.strip() != "put":
            continue
        t0 = time.perf_counter()
        client = flight.FlightClient(args.location)
        key = X25519PublicKey.from_public_bytes(
            next(iter(client.do_action(flight.Action("key", b"")))).body.to_pybytes()
        )
        schema = source.schema
        ctx = sealed.StreamContext(
            job_id="bench-job",
            party=PARTY,
            dataset=DATASET,
            schema_hash=sealed.schema_hash(schema),
            plan_hash=hashlib.sha256(b"plan").digest(),
            evidence_hash=hashlib.sha256(os.urandom(16)).digest(),
        )
        sealer = sealed.SealingStream(ctx, schema, key)

        writer, _ = client.do_put(flight.FlightDescriptor.for_command(sealer.header.to_bytes()), empty)
        pending = None
        seq = 0
        for batch in rebatch(source.batches(), target):
            if pending is not None:
                writer.write_metadata(seal_into_buffer(sealer, pending.serialize(), seq, False))
                seq += 1
            pending = batch
        writer.write_metadata(seal_into_buffer(sealer, pending.serialize() if pending is not None else b"", seq, True))
        writer.close()
        seconds = time.perf_counter() - t0
        held = json.loads(next(iter(client.do_action(flight.Action("drop", b"")))).body.to_pybytes())
        client.close()
        print(json.dumps({"seconds": seconds, **held}), flush=True)


WORKERS = {
    "_party": worker_party,
    "_enclave": worker_enclave,
    "_flight-server": worker_flight_server,
    "_flight-client": worker_flight_client,
    "_raw-server": worker_raw_server,
    "_raw-client": worker_raw_client,
    "_sflight-server": worker_sflight_server,
    "_sflight-client": worker_sflight_client,
}


# --- paths ------------------------------------------------------------------------------------------


class Route:
    """One way to move the table: a sender process, a receiver process, and one timed run."""

    name: str
    receiver: str
    sender_pid: int
    receiver_pid: int

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Close client-side resources (the processes are stopped by :class:`Processes`)."""


class SealedRoute(Route):
    receiver = "enclave worker"

    def __init__(self, bench: Bench, name: str):
        import grpc

        from sealroom.keys import generate_signing_key, public_key_hex, save_signing_key
        from sealroom.rpc import call, open_channel, wait_healthy
        from sealroom.v1 import common_pb2, enclave_pb2_grpc, party_pb2_grpc

        self.name = name
        self.bench = bench
        base, mods = split_path(name)
        env = MALLOC_ENV if "malloc" in mods else None
        patched = "+".join(sorted(mods - {"malloc"}))
        tmp, procs, tag = bench.tmp, bench.procs, name.replace("+", "-")
        cfg = tmp / f"{tag}-enclave.toml"
        cfg.write_text(
            f'[enclave]\nlisten = "127.0.0.1:0"\nattester = "simulated"\ndev_root = "{bench.dev_root}"\n'
            f"memory_limit_mb = {max(2048, 3 * bench.table_bytes // 2**20)}\n"
        )
        port_file = tmp / f"{tag}-enclave.port"
        if mods & RECEIVER_MODS:
            argv = [sys.executable, bench.script, "_enclave", "--mods", patched]
            log(f"{name}: starting an enclave worker patched for the diagnostic ({patched})")
        else:
            argv = [sys.executable, "-m", "sealroom.cli", "--log-level", "warning", "enclave", "serve"]
            log(f"{name}: starting the enclave worker (sealroom enclave serve, simulated attestation)")
        proc = procs.spawn(f"{tag}-enclave", [*argv, "--config", str(cfg), "--port-file", str(port_file)], env=env)
        self.receiver_pid = proc.pid
        self.enclave_address = f"127.0.0.1:{procs.wait_port(f'{tag}-enclave', port_file)}"
        wait_healthy(self.enclave_address)
        self.channels: list[grpc.Channel] = [open_channel(self.enclave_address)]
        self.enclave = enclave_pb2_grpc.EnclaveStub(self.channels[0])
        # The party pins the measurement this worker reports (what `sealroom enclave measure` prints
        # for the code on disk when it started); it still verifies the evidence against it.
        measurement = call("enclave", self.enclave.GetInfo, common_pb2.Empty()).measurement

        key = generate_signing_key()
        save_signing_key(key, tmp / f"{tag}-party.key")
        self.party_key_hex = public_key_hex(key)
        party_cfg = tmp / f"{tag}-party.toml"
        party_cfg.write_text(
            f'[party]\nname = "{PARTY}"\ncoordinator = "127.0.0.1:1"\nsigning_key = "{tmp / f"{tag}-party.key"}"\n'
            "unsafe_no_witness = true\n"  # no coordinator here, so no transparency log to witness
            f'[trust]\nallow_simulated = true\ndev_root = "{bench.dev_root / "dev-root.crt"}"\n'
            f'measurements = ["{measurement}"]\n'
            f'[[dataset]]\nname = "{DATASET}"\nsource = "{bench.ipc_path}"\n'
            f'[dataset.policy]\nprivacy_unit = "id"\nmin_group_size = 5\n'
        )
        port_file = tmp / f"{tag}-party.port"
        log(f"{name}: starting the party agent (connectors.agent.PartyAgent behind its gRPC server)")
        argv = [sys.executable, bench.script, "_party", "--config", str(party_cfg), "--port-file", str(port_file)]
        if bench.args.frame_bytes:
            argv += ["--frame-bytes", str(bench.args.frame_bytes)]
        if mods & SENDER_MODS:
            argv += ["--mods", patched]
        proc = procs.spawn(f"{tag}-party", argv, env=env)
        self.sender_pid = proc.pid
        party_address = f"127.0.0.1:{procs.wait_port(f'{tag}-party', port_file)}"
        wait_healthy(party_address)
        self.channels.append(open_channel(party_address))
        self.party = party_pb2_grpc.PartyAgentStub(self.channels[1])
        self.queries = 0

    def run(self) -> dict[str, Any]:
        from coordinator.planner import CatalogEntry, plan_query
        from sealroom.policy import DatasetPolicy
        from sealroom.rpc import call
        from sealroom.v1 import enclave_pb2, party_pb2

        self.queries += 1
        entry = CatalogEntry(PARTY, DATASET, self.bench.schema, DatasetPolicy(privacy_unit="id"))
        plan, _ = plan_query(
            SQL,
            query_id=f"bench-{self.queries}",
            analyst="bench",
            catalog={entry.qualified: entry},
            party_keys={PARTY: self.party_key_hex},
        )
        plan_json = plan.to_json()
        job = call("enclave", self.enclave.CreateJob, enclave_pb2.CreateJobRequest(plan_json=plan_json))
        try:
            review = call("party", self.party.ReviewPlan, party_pb2.ReviewPlanRequest(plan_json=plan_json))
            if not review.approved:
                raise RuntimeError(f"the party agent refused the plan: {review.error_json.decode()}")
            request = party_pb2.ContributeRequest(
                plan_json=plan_json, job_id=job.job_id, enclave_address=self.enclave_address
            )
            t0 = time.perf_counter()
            out = call("party", self.party.Contribute, request, timeout=3600)
            seconds = time.perf_counter() - t0
        finally:
            call("enclave", self.enclave.AbortJob, enclave_pb2.JobRef(job_id=job.job_id, job_token=job.job_token))
        (upload,) = out.uploads
        # The party agent reports bytes and frames the enclave holds (row counts stay with the owner).
        return {"seconds": seconds, "bytes": upload.bytes, "frames": upload.frames}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class LineRoute(Route):
    """A server process and a client process that runs one transfer per ``put`` line on its stdin."""

    def __init__(
        self,
        bench: Bench,
        name: str,
        server: list[str],
        client: list[str],
        scheme: str,
        receiver: str,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.receiver = receiver
        procs = bench.procs
        tag = name.replace("+", "-")
        port_file = bench.tmp / f"{tag}.port"
        log(f"{name}: starting the server and the client")
        self.receiver_pid = procs.spawn(f"{tag}-server", [*server, "--port-file", str(port_file)], env=env).pid
        port = procs.wait_port(f"{tag}-server", port_file)
        location = f"{scheme}127.0.0.1:{port}"
        self.client = procs.spawn(f"{tag}-client", [*client, "--location", location], pipe=True, env=env)
        self.tag = tag
        self.sender_pid = self.client.pid
        self.procs = procs

    def run(self) -> dict[str, Any]:
        proc = self.client
        assert proc.stdin is not None and proc.stdout is not None
        t0 = time.perf_counter()
        proc.stdin.write(b"put\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        seconds = time.perf_counter() - t0
        if not line:
            raise RuntimeError(f"{self.name} client stopped:\n{self.procs.tail(self.tag + '-client')}")
        reply = json.loads(line)
        return {"seconds": seconds, "rows": reply["rows"], "bytes": reply["bytes"], "sender_seconds": reply["seconds"]}


def make_route(bench: Bench, name: str) -> Route:
    py, script, ipc_file = sys.executable, bench.script, str(bench.ipc_path)
    base, mods = split_path(name)
    if base == "sealed":
        return SealedRoute(bench, name)
    env = MALLOC_ENV if "malloc" in mods else None
    extra = ["--mods", "+".join(sorted(mods - {"malloc"}))] if mods - {"malloc"} else []
    if bench.args.frame_bytes:
        extra += ["--frame-bytes", str(bench.args.frame_bytes)]
    if base == "grpc-raw":
        server, client = [py, script, "_raw-server"], [py, script, "_raw-client", "--ipc", ipc_file, *extra]
        return LineRoute(bench, name, server, client, "", "raw gRPC server", env)
    if base == "sealed-flight":
        server = [py, script, "_sflight-server", *extra]
        client = [py, script, "_sflight-client", "--ipc", ipc_file, *extra]
        return LineRoute(bench, name, server, client, "grpc://", "flight server (sealed frames)", env)
    server = [py, script, "_flight-server"]
    client = [py, script, "_flight-client", "--ipc", ipc_file]
    scheme = "grpc://"
    if base == "flight-tls":
        cert, key = bench.tls
        server += ["--tls-cert", str(cert), "--tls-key", str(key)]
        client += ["--tls-root", str(cert)]
        scheme = "grpc+tls://"
    return LineRoute(bench, name, server, client, scheme, "flight server", env)


# --- profile (--profile PATH: where the CPU time of one path's sender and receiver goes) --------------


def _copy(leaf: str) -> bool:
    return "memcpy" in leaf or "memmove" in leaf


# (category, test on the sampled stack, leaf first); the first match wins.
PROFILE_CATEGORIES: list[tuple[str, Any]] = [
    ("AES-256-GCM (cryptography)", lambda leaf, st: "aesni" in leaf or "ghash" in leaf or "gcm_" in leaf),
    ("page faults: the kernel zeroing fresh memory", lambda leaf, st: "clear_page" in leaf or "page_fault" in st),
    ("mmap/munmap/madvise", lambda leaf, st: "sys_munmap" in st or "sys_mmap" in st or "madvise" in st),
    ("Arrow validate(full=True)", lambda leaf, st: "Validate" in st or "UTF8" in st),
    ("copy: IPC batch read out of the memory map", lambda leaf, st: _copy(leaf) and "MemoryMappedFile" in st),
    ("copy: RecordBatch.serialize", lambda leaf, st: _copy(leaf) and "RecordBatch_" in st and "serialize" in st),
    ("copy: flag byte + ciphertext (bytes concat)", lambda leaf, st: _copy(leaf) and "bytes_concat" in st),
    ("copy: gRPC message <-> Python bytes", lambda leaf, st: _copy(leaf) and "cygrpc" in st),
    ("copy: other", lambda leaf, st: _copy(leaf)),
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
        import subprocess

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
    def classify(script: str) -> Any:
        import collections

        counts: collections.Counter[str] = collections.Counter()
        for sample in script.split("\n\n"):
            frames = [line.strip() for line in sample.splitlines() if line.startswith("\t")]
            if not frames:
                continue
            leaf, stack = frames[0], " | ".join(frames)
            counts[next(name for name, test in PROFILE_CATEGORIES if test(leaf, stack))] += 1
        return counts


# --- the benchmark ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes):
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.script = str(Path(__file__).resolve())
        self.routes: list[Route] = []

    def prepare_data(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        from connectors.agent import TARGET_FRAME_BYTES

        t0 = time.perf_counter()
        table = make_table(self.args.rows)
        self.ipc_path = self.tmp / f"{DATASET}.arrow"
        batch_rows = write_ipc(table, self.ipc_path, self.args.frame_bytes or TARGET_FRAME_BYTES)
        del table
        # What every receiver ends up holding: the table as the file holds it (read in place).
        with pa.memory_map(str(self.ipc_path)) as source:
            table = ipc.open_file(source).read_all()
            self.schema = table.schema
            self.table_bytes = table.nbytes
        info = {
            "rows": table.num_rows,
            "bytes": self.table_bytes,
            "schema": [f"{f.name} {f.type}" for f in table.schema],
            "batch_rows": batch_rows,
            "batches": -(-table.num_rows // batch_rows),
            "file_bytes": self.ipc_path.stat().st_size,
            "seed": SEED,
        }
        log(
            f"table: {info['rows']:,} rows, {info['bytes'] / 1e6:.1f} MB in {info['batches']} batches of "
            f"{batch_rows:,} rows, written in {time.perf_counter() - t0:.1f} s"
        )
        return info

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

    def main(self) -> dict[str, Any]:
        args = self.args
        data = self.prepare_data()
        if "flight-tls" in args.paths:
            self.tls = self_signed_cert(self.tmp)
        if any(p.startswith("sealed") for p in args.paths):
            from sealroom.attestation import dev_init

            self.dev_root = self.tmp / "dev"
            dev_init(self.dev_root)
        try:
            for name in args.paths:
                self.routes.append(make_route(self, name))
            baseline = {r.name: proc_status_bytes(r.receiver_pid)["VmRSS"] for r in self.routes}
            runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in self.routes}
            profiler: Profiler | None = None
            for rnd in range(args.warmup + args.repeat):
                timed = rnd >= args.warmup
                label = f"round {rnd - args.warmup + 1}/{args.repeat}" if timed else "warm-up"
                if rnd == args.warmup and args.profile:
                    route = next(r for r in self.routes if r.name == args.profile)
                    profiler = Profiler(self.procs, self.tmp, route)
                for route in self.routes:
                    r = self.run_once(route)
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
                    if timed:
                        runs[route.name].append(r)
            peaks = {r.name: proc_status_bytes(r.receiver_pid)["VmHWM"] for r in self.routes}
            profile = profiler.finish(runs[args.profile]) if profiler is not None else None
        finally:
            for route in self.routes:
                route.close()
        doc = self.report(data, runs, baseline, peaks)
        if profile is not None:
            doc["profile"] = profile
        return doc

    def report(
        self,
        data: dict[str, Any],
        runs: dict[str, list[dict[str, Any]]],
        baseline: dict[str, int],
        peaks: dict[str, int],
    ) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for route in self.routes:
            rs = runs[route.name]
            med = median([r["seconds"] for r in rs])
            held = rs[-1]["bytes"]
            results[route.name] = {
                "seconds": [r["seconds"] for r in rs],
                "median_seconds": med,
                "gb_per_s": data["bytes"] / med / 1e9,
                "sender_cpu_seconds": median([r["sender_cpu_seconds"] for r in rs]),
                "receiver_cpu_seconds": median([r["receiver_cpu_seconds"] for r in rs]),
                "sender_page_faults": round(median([r["sender_page_faults"] for r in rs])),
                "receiver_page_faults": round(median([r["receiver_page_faults"] for r in rs])),
                "other_cpu_seconds": median([r["other_cpu_seconds"] for r in rs]),
                "receiver": route.receiver,
                "held_bytes": held,
                "receiver_peak_rss_bytes": peaks[route.name],
                "receiver_baseline_rss_bytes": baseline[route.name],
                "peak_rss_over_held": peaks[route.name] / held,
                "peak_growth_over_held": (peaks[route.name] - baseline[route.name]) / held,
            }
            if "frames" in rs[-1]:
                results[route.name]["frames"] = rs[-1]["frames"]
        ratios: dict[str, float] = {}
        paired: dict[str, float] = {}
        best: dict[str, float] = {}
        for a, b in (("sealed", "flight"), ("sealed", "flight-tls"), ("flight-tls", "flight")):
            if a in results and b in results:
                key = f"{a}_vs_{b}".replace("-", "_")
                ratios[key] = results[a]["median_seconds"] / results[b]["median_seconds"]
                # Runs of one round are seconds apart: their ratio shrugs off slow phases of the machine.
                paired[key] = median([x / y for x, y in zip(results[a]["seconds"], results[b]["seconds"], strict=True)])
                best[key] = min(results[a]["seconds"]) / min(results[b]["seconds"])
        if "flight" in results:
            for r in results.values():
                r["vs_flight"] = r["median_seconds"] / results["flight"]["median_seconds"]
        return {
            "benchmark": "ingest",
            "table": data,
            "repeat": self.args.repeat,
            "warmup": self.args.warmup,
            "frame_bytes": self.args.frame_bytes or None,
            "paths": results,
            "ratios": ratios,
            "median_ratios_within_rounds": paired,
            "ratios_of_fastest_runs": best,
            "targets": TARGETS,
            "machine": _common.machine(),
        }


def render(doc: dict[str, Any]) -> str:
    t = doc["table"]
    w = max(12, *(len(p) + 2 for p in doc["paths"]))
    lines = [
        f"ingest: {t['rows']:,} rows ({', '.join(t['schema'])}) = {t['bytes'] / 1e6:.1f} MB of Arrow, "
        f"{t['batches']} batches of {t['batch_rows']:,} rows",
        f"median of {doc['repeat']} interleaved runs after {doc['warmup']} warm-up round(s); "
        f"{doc['machine']['cpus']} CPUs; sender and receiver are separate processes",
        "",
        f"{'path':<{w}}{'median s':>9}{'GB/s':>7}{'min s':>8}{'max s':>8}{'cpu s send':>11}{'cpu s recv':>11}"
        f"{'others cpu s':>13}{'recv peak RSS':>15}{'holds':>10}{'peak/held':>10}{'vs flight':>10}",
    ]
    for p, r in doc["paths"].items():
        lines.append(
            f"{p:<{w}}{r['median_seconds']:>9.3f}{r['gb_per_s']:>7.2f}{min(r['seconds']):>8.3f}{max(r['seconds']):>8.3f}"
            f"{r['sender_cpu_seconds']:>11.2f}{r['receiver_cpu_seconds']:>11.2f}{r['other_cpu_seconds']:>13.2f}"
            f"{r['receiver_peak_rss_bytes'] / 2**20:>11.0f} MiB{r['held_bytes'] / 2**20:>6.0f} MiB"
            f"{r['peak_rss_over_held']:>9.2f}x" + (f"{r['vs_flight']:>9.2f}x" if "vs_flight" in r else "")
        )
    lines.append("")
    for k, v in doc["ratios"].items():
        target = doc["targets"].get(k)
        verdict = ""
        if target is not None:
            ok = v <= target if k == "sealed_vs_flight" else v < target
            verdict = f"target {'<=' if k == 'sealed_vs_flight' else '<'} {target:.2f}x: {'met' if ok else 'NOT met'}"
        label = k.replace("_vs_", " / ").replace("_", "-")
        fastest, paired = doc["ratios_of_fastest_runs"][k], doc["median_ratios_within_rounds"][k]
        lines.append(
            f"{label:<{max(22, w + 2)}}{v:>5.2f}x medians {paired:>5.2f}x within rounds "
            f"{fastest:>5.2f}x fastest   {verdict}"
        )
    lines.append("")
    for p, r in doc["paths"].items():
        lines.append(
            f"{p} receiver ({r['receiver']}): peak RSS {r['receiver_peak_rss_bytes'] / 2**20:.0f} MiB = "
            f"{r['receiver_baseline_rss_bytes'] / 2**20:.0f} MiB before any data + "
            f"{r['peak_growth_over_held']:.2f} x the {r['held_bytes'] / 2**20:.0f} MiB it holds"
        )
    prof = doc.get("profile")
    if prof:
        lines.append("")
        lines.append(f"where the CPU time of {prof['path']} goes (perf, CPU seconds per run, share):")
        for role in ("sender", "receiver"):
            r = prof[role]
            lines.append(f"  {role}: {r['cpu_seconds_per_run']:.2f} cpu s per run ({r['samples']} samples)")
            for name, c in r["categories"].items():
                lines.append(f"    {c['cpu_seconds_per_run']:6.3f} s {c['share'] * 100:5.1f}%  {name}")
    lines.append("")
    lines.append(
        "others cpu s: CPU time the rest of the machine used during a run (noise; should be near 0). "
        "GB = 10^9 bytes of Arrow data (table.nbytes)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    args.paths = list(dict.fromkeys(x for x in args.paths.split(",") if x))
    for name in args.paths:
        base, mods = split_path(name)
        if base not in MODS or not mods <= MODS[base]:
            p.error(f"--paths: {name!r} is not a path; see --help")
    if not args.paths:
        p.error("--paths: name at least one path")
    if args.profile and args.profile not in args.paths:
        p.error("--profile takes one of the paths being run")
    if args.rows < 1 or args.repeat < 1 or args.warmup < 0 or args.frame_bytes < 0:
        p.error("--rows and --repeat must be >= 1, --warmup and --frame-bytes >= 0")
    return args


def worker_main(role: str, argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=f"ingest.py {role}")
    for flag in (
        "--port-file",
        "--config",
        "--tls-cert",
        "--tls-key",
        "--tls-root",
        "--location",
        "--ipc",
        "--mods",
    ):
        p.add_argument(flag)
    p.add_argument("--frame-bytes", type=int, default=0)
    WORKERS[role](p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        worker_main(argv[0], argv[1:])
        return 0
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sealroom-bench-"))
    procs = Processes(tmp)
    try:
        doc = Bench(args, tmp, procs).main()
    except BaseException:
        for name in procs.procs:
            tail = procs.tail(name, 15)
            if tail:
                log(f"--- {name} log (last lines) ---\n{tail}")
        raise
    finally:
        procs.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["wall_seconds"] = time.perf_counter() - t0
    log(f"done in {doc['wall_seconds']:.0f} s")
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
