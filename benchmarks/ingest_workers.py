"""The ingest benchmark's worker processes: ``python benchmarks/ingest_workers.py ROLE [options]``
runs one sender or receiver of one path (see ingest.py). Each role is a process of its own whose CPU
time and memory are measured, so each loads only what its role needs: the imports of a role are in
its function, not at the top of this module.

The diagnostic modifiers (``+readfix``, ``+novalidate``, ``+pipeline``) change code inside these
processes only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ingest_data import DATASET, PARTY, RAW_DROP, RAW_SERVICE, RAW_UPLOAD, prefetch


def mods_of(args: argparse.Namespace) -> set[str]:
    return set(filter(None, (args.mods or "").split("+")))


def patch_sender(mods: set[str]) -> None:
    """Diagnostic changes to the sender side, applied in this worker process only.

    ``+readfix`` needs no change any more: ``connectors.sources.ArrowIpcSource`` itself reads every
    batch in place when every field is wanted (the fix this modifier measured); the modifier is still
    accepted, so earlier command lines run unchanged.
    """
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
            if buf.size == 0 and self.finished:
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
    from connectors import agent as agent_mod
    from connectors.agent import party as party_mod

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.frame_bytes:
        party_mod.TARGET_FRAME_BYTES = args.frame_bytes  # what contribute() cuts the party's batches to
    patch_sender(mods_of(args))
    agent = agent_mod.PartyAgent(agent_mod.PartyConfig.load(Path(args.config)))
    server = agent_mod.build_server(agent)
    server.start()
    Path(args.port_file).write_text(str(server.port))
    server.serve_until_signalled()


def worker_enclave(args: argparse.Namespace) -> None:
    """``sealroom enclave serve`` with diagnostic changes (the ``sealed`` path runs the real CLI)."""
    from enclave_worker import server
    from enclave_worker.config import EnclaveConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    patch_receiver(mods_of(args))
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

    patch_receiver(mods_of(args))

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
    straight into one Arrow buffer: no zero-filled bytes object, no concatenation copy.

    This prototype reads the stream's key schedule from ``sealroom.sealed``'s internals: the kernel
    has no public "seal into this buffer" yet (``SealingStream.seal_into`` would be it)."""
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
    import pyarrow as pa
    import pyarrow.flight as flight
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from connectors.agent import TARGET_FRAME_BYTES, rebatch
    from connectors.sources import open_source
    from sealroom import sealed

    patch_sender(mods_of(args))
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


def main(argv: list[str]) -> None:
    role, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"ingest_workers.py {role}")
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


if __name__ == "__main__":
    main(sys.argv[1:])
