"""The transparency log's writer (the coordinator) and its export document.

:class:`TransparencyLog` appends events (:mod:`sealroom.audit.entries`) to a
:class:`~sealroom.audit.store.LogStore`, signs a checkpoint (:mod:`sealroom.audit.notes`) after
every append, serves Merkle proofs (:mod:`sealroom.audit.merkle`) and records witnesses'
co-signatures. The whole log exports to one JSON document (:func:`export_store`) that
:func:`sealroom.audit.verify.verify_log` checks with nothing else: every entry, every checkpoint,
every receipt's hash.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sealroom.audit.entries import LogEntry
from sealroom.audit.merkle import CompactTree, consistency_proof, inclusion_proof, leaf_hash, root_hash
from sealroom.audit.notes import Checkpoint, NoteSigner, NoteVerifier, SignedCheckpoint, b64
from sealroom.audit.receipts import receipt_sha256
from sealroom.audit.refusals import refuse
from sealroom.audit.store import LogStore
from sealroom.canonical import canonical_json
from sealroom.errors import AuditError

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "TransparencyLog", "export_store", "load_export"]

# The export document's format name and version: part of the JSON files reviewers keep, so they
# never change with the code's layout.
EXPORT_FORMAT = "sealroom.tlog-export"
EXPORT_VERSION = 1


class TransparencyLog:
    """The writer's side (the coordinator): appends events, signs a checkpoint after every append,
    serves proofs, records witnesses' co-signatures and exports the whole log.

    ``signer``'s name is the log's origin (e.g. ``"sealroom.example.org/log"``): a checkpoint's
    first line. The same Ed25519 key may countersign receipts (:mod:`sealroom.audit.receipts` signs a
    domain-separated digest, which no note text can equal)."""

    def __init__(self, store: LogStore, signer: NoteSigner, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self._lock = threading.RLock()
        self._tree = CompactTree(leaf_hash(e) for e in store.entries())

    @property
    def origin(self) -> str:
        return self.signer.name

    @property
    def size(self) -> int:
        return len(self._tree)

    def _sign(self, size: int, root: bytes) -> SignedCheckpoint:
        cp = Checkpoint(self.origin, size, root)
        return SignedCheckpoint(cp, (self.signer.sign(cp.body()),))

    def append(self, type: str, *, receipt: Mapping[str, Any] | None = None, **fields: Any) -> LogEntry:
        """Append one event (``ValueError`` for an unknown type or field) with the next sequence
        number and the current time, and sign the new checkpoint. A ``released`` event must come
        with its ``receipt`` (whose hash it records: pass ``receipt_sha256`` or let it be filled)."""
        if (type == "released") != (receipt is not None):
            raise ValueError("a released event, and only one, carries its receipt")
        receipt_bytes = None
        if receipt is not None:
            receipt_bytes = canonical_json(dict(receipt))
            digest = receipt_sha256(receipt)
            if fields.setdefault("receipt_sha256", digest) != digest:
                raise ValueError("receipt_sha256 is not the hash of the receipt given")
        with self._lock:
            entry = LogEntry(self.size, int(self.clock() * 1000), type, fields)
            data = entry.canonical()
            tree = self._tree.copy()
            tree.append(leaf_hash(data))
            signed = self._sign(len(tree), tree.root())
            self.store.append(data, checkpoint=signed.to_text(), receipt=receipt_bytes)
            self._tree = tree
        return entry

    def append_release(self, receipt: Mapping[str, Any]) -> LogEntry:
        """The ``released`` event of a receipt (see :mod:`sealroom.audit.receipts`), with the receipt,
        then one ``privacy_charge`` event per charge the receipt carries (a dp plan's), in the same
        transaction as the release when the caller holds one."""
        released = self.append(
            "released",
            receipt=receipt,
            query_id=receipt["query"]["id"],
            plan_hash=receipt["query"]["plan_hash"],
            result_sha256=receipt["result"]["sha256"],
            simulated=bool(receipt["simulated"]),
            suppressed_cells=len(receipt["disclosure"]["suppressed"]),
        )
        privacy = receipt.get("privacy")
        for charge in privacy.get("charges", []) if isinstance(privacy, Mapping) else []:
            self.append(
                "privacy_charge",
                query_id=receipt["query"]["id"],
                plan_hash=receipt["query"]["plan_hash"],
                dataset=charge["dataset"],
                scope=charge["scope"],
                epsilon=charge["epsilon"],
                delta=charge["delta"],
            )
        return released

    def checkpoint(self) -> SignedCheckpoint:
        """The latest checkpoint, with every co-signature recorded for it."""
        with self._lock:
            size, root = self.size, self._tree.root()
        signed = self._sign(size, root)
        for text in self.store.checkpoints(size):
            try:
                other = SignedCheckpoint.from_text(text)
            except AuditError:
                continue
            if other.checkpoint == signed.checkpoint:
                signed = signed.merged(other)
        return signed

    def root(self, size: int | None = None) -> bytes:
        leaves = self._tree.leaves
        n = len(leaves) if size is None else size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return root_hash(leaves[:n])

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        leaves = self._tree.leaves
        n = len(leaves) if size is None else size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return inclusion_proof(leaves[:n], index)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        leaves = self._tree.leaves
        n = len(leaves) if new_size is None else new_size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return consistency_proof(leaves[:n], old_size)

    def add_cosigned(self, cosigned: SignedCheckpoint) -> None:
        """Record a witness's co-signed copy of one of this log's checkpoints."""
        cp = cosigned.checkpoint
        cosigned.verify(self.signer.verifier)
        if cp.size > self.size or self.root(cp.size) != cp.root:
            raise refuse("fork", f"the co-signed checkpoint of size {cp.size} is not one of this log's")
        self.store.add_checkpoint(cosigned.to_text())

    def export(self) -> dict[str, Any]:
        """The whole log as one JSON-ready document (``verify_log`` reads it with nothing else)."""
        return export_store(self.store, origin=self.origin, log_key=self.signer.verifier)


def export_store(
    store: LogStore, *, origin: str, log_key: NoteVerifier, witnesses: Sequence[NoteVerifier] = ()
) -> dict[str, Any]:
    """The export document of a stored log, without its private key: what a reviewer builds from a
    copy of the coordinator's database and the log's published verifier key.

    ``witnesses``: the witnesses' verifier keys (the registered parties' owner keys, see
    :func:`~sealroom.audit.notes.witness_verifier`), exported as ``"witnesses"`` so that ``verify_log`` can check
    their co-signatures; it binds each to the owner key hash the log's own entries record."""
    entries = []
    for data in store.entries():
        try:
            entries.append(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entries.append({"unreadable": b64(data)})  # exported as it is; verification names it
    receipts: dict[str, Any] = {}
    for seq, data in store.receipts().items():
        try:
            receipts[str(seq)] = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            receipts[str(seq)] = {"unreadable": b64(data)}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "origin": origin,
        "log_key": log_key.vkey(),
        "entries": entries,
        "checkpoints": store.checkpoints(),
        "receipts": receipts,
    } | ({"witnesses": sorted(w.vkey() for w in witnesses)} if witnesses else {})


def load_export(data: bytes | str) -> dict[str, Any]:
    """Parse an export file; ``ValueError`` when it is not one (unusable input, not a refusal)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError("the log file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"the file is not a Sealroom log export (format {EXPORT_FORMAT})")
    if doc.get("version") != EXPORT_VERSION:
        raise ValueError(f"log export version {doc.get('version')!r} is not {EXPORT_VERSION}")
    for key, kind in (("origin", str), ("entries", list), ("checkpoints", list), ("receipts", dict)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"the log export's {key} is missing or malformed")
    return doc
