"""The ingest benchmark's fixed inputs: the paths and their modifiers, the table (seeded), the Arrow
IPC file every sender reads, a throwaway TLS certificate, and the read-ahead helper of the
``+pipeline`` diagnostics. See ingest.py for the benchmark itself.

The worker processes import this module for its constants, and each worker is a measured process
that must load only what its role needs: so the data libraries are imported where they are used.
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Options:
    """One run's options (``python benchmarks/ingest.py --help``)."""

    rows: int
    repeat: int
    warmup: int
    as_json: bool
    paths: tuple[str, ...]
    frame_bytes: int  # 0: connectors.agent.TARGET_FRAME_BYTES
    profile: str | None
    keep: bool


def make_table(rows: int, seed: int = SEED) -> Any:
    """The benchmark table, the same for a given seed: 4 columns, about 33 bytes a row."""
    import numpy as np  # lazy: see the module docstring
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
    import pyarrow as pa  # lazy: see the module docstring
    import pyarrow.ipc as ipc

    per_row = max(1, table.nbytes // max(1, table.num_rows))
    batch_rows = max(1, frame_bytes // per_row)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return batch_rows


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost (PEM cert, PEM key)."""
    from cryptography import x509  # lazy: see the module docstring
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
