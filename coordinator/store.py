"""The coordinator's durable state in SQLite: catalog, queries, approvals, releases, and the
transparency log (docs/audit.md).

Writes are single transactions; a query's state moves forward only. On start, queries that were in
flight when the process stopped are marked failed (their enclave jobs died with them), so nothing
is left half-done and nothing committed is lost.

The transparency log (:class:`sealroom.audit.log.TransparencyLog` over :class:`SQLiteLogStore`) lives in
the same database and is written under the same lock: a registration, an approval or a release and
its log entry commit together or not at all (the log's SAVEPOINT nests in the store's transaction).
The release's receipt is countersigned here, with the log's key.

The orchestrator and the service see the state through :class:`CoordinatorStore` (a small
interface with typed rows: :class:`PartyRecord`, :class:`DatasetRecord`, :class:`QueryRecord`,
:class:`Approval`, :class:`ReleaseRecord`); :class:`SQLiteStore` is its implementation. The
schema and the SQL are those of every earlier version, so existing state directories still open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.audit.entries import LogEntry
from sealroom.audit.log import TransparencyLog
from sealroom.audit.notes import NoteSigner, NoteVerifier, SignedCheckpoint, witness_verifier
from sealroom.audit.receipt_stages import MPC_RESULT_DOMAIN
from sealroom.audit.receipts import countersign
from sealroom.audit.store import SQLiteLogStore
from sealroom.auth import token_hash
from sealroom.canonical import canonical_json
from sealroom.errors import AlreadyExistsError, AuditError, CallerError, InvalidQueryError, NotFoundError
from sealroom.keys import public_key_hex
from sealroom.signing import Registration

SCHEMA = """
CREATE TABLE IF NOT EXISTS parties (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    signing_public_key TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    party TEXT NOT NULL,
    name TEXT NOT NULL,
    arrow_schema BLOB NOT NULL,
    policy_json BLOB NOT NULL,
    policy_digest TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    approximate_rows INTEGER NOT NULL DEFAULT 0,
    registered_at REAL NOT NULL,
    PRIMARY KEY (party, name)
);
-- The operator's one-time enrolment tokens (hashed), one outstanding per party name.
CREATE TABLE IF NOT EXISTS enrolments (
    party TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    expires_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS queries (
    id TEXT PRIMARY KEY,
    sql TEXT NOT NULL,
    analyst TEXT NOT NULL,
    status TEXT NOT NULL,
    plan_json BLOB,
    plan_hash TEXT,
    error_json TEXT,
    progress TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    query_id TEXT NOT NULL,
    party TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    signature BLOB NOT NULL,
    approved_at REAL NOT NULL,
    PRIMARY KEY (query_id, party)
);
CREATE TABLE IF NOT EXISTS releases (
    query_id TEXT PRIMARY KEY,
    arrow_table BLOB NOT NULL,
    suppressed_json TEXT NOT NULL,
    result_json BLOB NOT NULL,
    signature BLOB NOT NULL,
    evidence BLOB NOT NULL,
    simulated INTEGER NOT NULL,
    released_at REAL NOT NULL,
    receipt_json BLOB
);
"""


def log_origin(key: Ed25519PrivateKey) -> str:
    """The log's origin (a checkpoint's first line): stable for the coordinator's log key."""
    return "sealroom.coordinator/" + hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()[:16]


def registered_witnesses(db: sqlite3.Connection) -> list[NoteVerifier]:
    """The witness keys of the registered parties (``<party>.witness``, the owner's key), from a
    coordinator database (e.g. opened read-only by a reviewer's tool), sorted by name."""
    rows = db.execute("SELECT name, signing_public_key FROM parties ORDER BY name").fetchall()
    return [witness_verifier(r[0], r[1]) for r in rows]


TERMINAL = ("released", "refused", "failed")
IN_FLIGHT = ("planning", "awaiting_approval", "pending_approval", "running")


@dataclass(frozen=True)
class PartyRecord:
    """A registered party: where its agent listens and the Ed25519 key it registered (hex)."""

    name: str
    address: str
    signing_public_key: str


@dataclass(frozen=True)
class DatasetRecord:
    """A registered dataset: its Arrow schema and policy (as the owner published them), no rows.
    ``approximate_rows``: the (rounded) row count its owner shares, 0 when it shares none."""

    party: str
    name: str
    arrow_schema: bytes
    policy_json: bytes
    policy_digest: str
    description: str = ""
    approximate_rows: int = 0

    @property
    def qualified(self) -> str:
        return f"{self.party}.{self.name}"

    @classmethod
    def from_mapping(cls, party: str, doc: Mapping[str, Any]) -> DatasetRecord:
        """A dataset of ``party`` from a mapping with the registration's keys (``name``,
        ``arrow_schema``, ``policy_json``, ``policy_digest``, ``description`` and, optionally,
        ``approximate_rows``): the form tools and tests register datasets in."""
        return cls(
            party=party,
            name=doc["name"],
            arrow_schema=doc["arrow_schema"],
            policy_json=doc["policy_json"],
            policy_digest=doc["policy_digest"],
            description=doc["description"],
            approximate_rows=doc.get("approximate_rows", 0),
        )


@dataclass(frozen=True)
class SignedRegistration:
    """A party's registration as it reached the coordinator: the document it signed with the key it
    registers (its signature verified), and the operator's enrolment token it presented ("" for none)."""

    registration: Registration
    signature: bytes
    enrolment_token: str = ""


class Approval(NamedTuple):
    """A party's stored approval of a query: the plan hash it signed and its signature."""

    plan_hash: str
    signature: bytes


@dataclass(frozen=True)
class QueryRecord:
    """A query as the store holds it. ``error``: the error document of a refused or failed query."""

    id: str
    sql: str
    analyst: str
    status: str
    plan_json: bytes | None
    plan_hash: str | None
    error: dict[str, Any] | None
    progress: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ReleaseRecord:
    """A stored release. ``suppressed`` (the suppressed cells) and ``receipt`` (the countersigned
    release receipt; None for a release from before receipts) are the JSON documents the
    analyst's result carries."""

    arrow_table: bytes
    suppressed: list[dict[str, Any]]
    result_json: bytes
    signature: bytes
    evidence: bytes
    simulated: bool
    released_at: float
    receipt: dict[str, Any] | None


class CoordinatorStore(Protocol):
    """The coordinator's state as the orchestrator and the service use it (implemented by
    :class:`SQLiteStore`). Every change that the transparency log records is appended in the same
    transaction as the change itself."""

    # -- the transparency log and the coordinator's identity in it
    def log_verifier(self) -> NoteVerifier: ...
    def helper_identity(self) -> tuple[str, Callable[[bytes], bytes]] | None: ...
    def sign_mpc_result(self, result: Mapping[str, Any]) -> tuple[str, bytes] | None: ...
    def append_event(self, type: str, **fields: Any) -> LogEntry | None: ...
    def latest_event(self, type: str) -> LogEntry | None: ...
    def checkpoint(self) -> SignedCheckpoint: ...
    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]: ...
    def inclusion(self, index: int) -> tuple[SignedCheckpoint, list[bytes]]: ...
    def add_cosignature(self, party: str, cosigned: SignedCheckpoint) -> tuple[str, ...]: ...

    # -- catalog
    def register_party(
        self,
        name: str,
        address: str,
        key_hex: str,
        datasets: Sequence[DatasetRecord | Mapping[str, Any]],
        *,
        signed: SignedRegistration | None = None,
    ) -> None: ...
    def enrol(self, party: str, *, token: str, expires_at: float) -> None: ...
    def parties(self) -> dict[str, PartyRecord]: ...
    def datasets(self) -> list[DatasetRecord]: ...

    # -- queries
    def create_query(self, query_id: str, sql: str, analyst: str) -> None: ...
    def update_query(
        self,
        query_id: str,
        *,
        status: str | None = None,
        plan_json: bytes | None = None,
        plan_hash: str | None = None,
        error: dict[str, Any] | None = None,
        progress: str | None = None,
    ) -> None: ...
    def query(self, query_id: str) -> QueryRecord: ...
    def queries(self) -> list[QueryRecord]: ...
    def refuse_query(self, query_id: str, *, error: dict[str, Any], event: Mapping[str, Any]) -> None: ...
    def fail_in_flight(self, reason: str) -> int: ...

    # -- approvals and releases
    def add_approval(self, query_id: str, party: str, plan_hash: str, signature: bytes) -> None: ...
    def delete_approval(self, query_id: str, party: str, *, event: str | None = None, **fields: Any) -> bool: ...
    def approvals(self, query_id: str) -> dict[str, Approval]: ...
    def release(
        self,
        query_id: str,
        *,
        arrow_table: bytes,
        suppressed: list[dict[str, Any]],
        result_json: bytes,
        signature: bytes,
        evidence: bytes,
        simulated: bool,
        receipt: Mapping[str, Any] | None = None,
        released_at: float | None = None,
        progress: str = "released",
    ) -> dict[str, Any] | None: ...
    def get_release(self, query_id: str) -> ReleaseRecord | None: ...
    def close(self) -> None: ...


class SQLiteStore:
    """The coordinator's state in one SQLite database (:class:`CoordinatorStore`).

    ``log_key``: the coordinator's Ed25519 log key; with it every catalog change, approval and
    release is also appended to the transparency log (``self.log``), and releases get a
    countersigned receipt. Without it (tools, old tests) nothing is logged."""

    def __init__(self, path: Path, *, log_key: Ed25519PrivateKey | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(datasets)").fetchall()}
        if "approximate_rows" not in columns:  # a state directory from before this column
            self._db.execute("ALTER TABLE datasets ADD COLUMN approximate_rows INTEGER NOT NULL DEFAULT 0")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(releases)").fetchall()}
        if "receipt_json" not in columns:  # a state directory from before receipts
            self._db.execute("ALTER TABLE releases ADD COLUMN receipt_json BLOB")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(parties)").fetchall()}
        if "issued_at_ms" not in columns:  # a state directory from before signed registrations
            self._db.execute("ALTER TABLE parties ADD COLUMN issued_at_ms INTEGER NOT NULL DEFAULT 0")
            self._db.execute("ALTER TABLE parties ADD COLUMN datasets_sha256 TEXT NOT NULL DEFAULT ''")
        self._log_key = log_key
        self.log: TransparencyLog | None = None
        if log_key is not None:
            self.log = TransparencyLog(SQLiteLogStore(self._db), NoteSigner(log_origin(log_key), log_key))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full, I/O error) leaves it open too
                    self._db.execute("ROLLBACK")
                self._resync_log()
                raise

    def _resync_log(self) -> None:
        """After a rollback: the log's in-memory tree follows the entries that were committed."""
        if self.log is not None and self.log.size != self.log.store.size():
            self.log = TransparencyLog(self.log.store, self.log.signer, clock=self.log.clock)

    def _append(self, type: str, **fields: Any) -> LogEntry | None:
        """Append one event; the caller holds ``self._lock`` (inside :meth:`tx` it commits with the
        transaction). An event the log cannot record (a name that is no identifier) is refused."""
        if self.log is None:
            return None
        try:
            return self.log.append(type, **fields)
        except ValueError as exc:
            raise InvalidQueryError(f"the audit log cannot record this {type} event: {exc}") from None

    def log_verifier(self) -> NoteVerifier:
        """The verifier key of the log's checkpoints (its name is the log's origin)."""
        return self._witness_log().signer.verifier

    def helper_identity(self) -> tuple[str, Callable[[bytes], bytes]] | None:
        """The identity of the coordinator's MPC helper players: the log key (public key hex, and its
        ``sign``), which the plans name; None without a log key."""
        if self._log_key is None:
            return None
        return public_key_hex(self._log_key), self._log_key.sign

    def sign_mpc_result(self, result: Mapping[str, Any]) -> tuple[str, bytes] | None:
        """(public key hex, signature) of the coordinator's helper players over an opened MPC result,
        with the log key (the players' domain, ``MPC_RESULT_DOMAIN``); None without a log key."""
        if self._log_key is None:
            return None
        message = MPC_RESULT_DOMAIN + hashlib.sha256(canonical_json(dict(result))).digest()
        return public_key_hex(self._log_key), self._log_key.sign(message)

    def append_event(self, type: str, **fields: Any) -> LogEntry | None:
        """Append one event to the transparency log on its own (see ``EVENT_TYPES`` in sealroom.audit.entries)."""
        with self._lock:
            try:
                return self._append(type, **fields)
            except BaseException:
                self._resync_log()
                raise

    # -- the transparency log's witnesses (the party agents) ----------------------------------

    def _witness_log(self) -> TransparencyLog:
        if self.log is None:
            raise NotFoundError("this coordinator keeps no transparency log")
        return self.log

    def checkpoint(self) -> SignedCheckpoint:
        """The log's latest checkpoint with every co-signature stored for it. Read under the store's
        lock, so it is always a committed size: never one that a failing transaction is about to
        roll back (a witness that co-signed it would then see the next entry as a fork)."""
        with self._lock:
            return self._witness_log().checkpoint()

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 ``PROOF(old_size, D[new_size])`` over the committed log."""
        with self._lock:
            log = self._witness_log()
            if not 0 <= old_size <= new_size <= log.size:
                raise InvalidQueryError(
                    f"a consistency proof needs 0 <= old_size <= new_size <= {log.size} (the log's size); "
                    f"got {old_size} and {new_size}"
                )
            return log.consistency_proof(old_size, new_size)

    def inclusion(self, index: int) -> tuple[SignedCheckpoint, list[bytes]]:
        """The log's latest checkpoint and the proof that entry ``index`` is included in it, read
        together under the store's lock (a committed size)."""
        with self._lock:
            log = self._witness_log()
            signed = log.checkpoint()
            return signed, log.inclusion_proof(index, signed.checkpoint.size)

    def add_cosignature(self, party: str, cosigned: SignedCheckpoint) -> tuple[str, ...]:
        """Store ``party``'s witness co-signature of one of the log's checkpoints, once; return the
        witnesses whose co-signatures are stored for that checkpoint. ``AuditError`` when the
        checkpoint is not one the log signed (``checkpoint_origin``, ``checkpoint_signature``,
        ``fork``) or when the party's witness signature is missing or does not verify with the key
        it registered (``witness_signature``). Only the log's and this witness's lines are stored."""
        with self.tx() as db:
            log = self._witness_log()
            row = db.execute("SELECT signing_public_key FROM parties WHERE name = ?", (party,)).fetchone()
            if row is None:
                raise NotFoundError(f"party {party} is not registered", details={"party": party})
            witness = witness_verifier(party, row[0])
            cp = cosigned.checkpoint
            cosigned.verify(log.signer.verifier)
            if cp.size > log.size or log.root(cp.size) != cp.root:
                raise AuditError(
                    f"the checkpoint of size {cp.size} that {party} co-signed is not one of this log's",
                    details={"check": "fork", "party": party},
                )
            try:
                cosigned.verify(log.signer.verifier, witnesses=[witness])
            except AuditError:
                raise AuditError(
                    f"the checkpoint carries no valid co-signature of {witness.name} by the key {party} registered",
                    details={"check": "witness_signature", "party": party},
                ) from None
            keep = {(log.signer.verifier.name, log.signer.verifier.key_id), (witness.name, witness.key_id)}
            note = SignedCheckpoint(cp, tuple(s for s in cosigned.signatures if (s.name, s.key_id) in keep))
            mine = next(s for s in note.signatures if s.name == witness.name)
            stored = note
            held = False
            for text in log.store.checkpoints(cp.size):
                try:
                    other = SignedCheckpoint.from_text(text)
                except AuditError:
                    continue
                if other.checkpoint == cp:
                    held = held or mine in other.signatures
                    stored = stored.merged(other)
            if not held:
                log.add_cosigned(note)
        names = {s.name for s in stored.signatures} - {log.signer.verifier.name}
        return tuple(sorted(names))

    # -- catalog -----------------------------------------------------------------------------

    def register_party(
        self,
        name: str,
        address: str,
        key_hex: str,
        datasets: Sequence[DatasetRecord | Mapping[str, Any]],
        *,
        signed: SignedRegistration | None = None,
    ) -> None:
        """Register (or re-register) a party. Each dataset is a :class:`DatasetRecord` of this party,
        or a mapping (see :meth:`DatasetRecord.from_mapping`).

        ``signed``: the party's own signed registration (``RegisterParty``; its signature already
        verified), checked here in the transaction that records it: fresh and newer than the party's
        last accepted one (no replay); a new name, or a new key for a known name, only with the
        operator's unexpired enrolment token for that name (used up here); then logged as
        ``party_registered`` (``enrolled``, ``key_changed``, or ``updated`` when the address or the
        datasets changed). Without it (in-process tools and tests) the key is fixed at first
        registration and only the datasets are logged."""
        now = time.time()
        records = [d if isinstance(d, DatasetRecord) else DatasetRecord.from_mapping(name, d) for d in datasets]
        if any(d.party != name for d in records):
            raise InvalidQueryError("each dataset must belong to the registering party", details={"party": name})
        reg = signed.registration if signed is not None else None
        if reg is not None and (reg.party, reg.owner_key, reg.datasets) != (name, key_hex, len(records)):
            raise ValueError("a signed registration is recorded for the party, key and datasets it signs")
        with self.tx() as db:
            row = db.execute(
                "SELECT signing_public_key, address, issued_at_ms, datasets_sha256 FROM parties WHERE name = ?", (name,)
            ).fetchone()
            if signed is not None:
                self._check_registration(db, signed, row, address=address, now=now)
            elif row is not None and row[0] != key_hex:
                raise AlreadyExistsError(
                    f"party {name} is registered with another signing key; an operator must remove the old "
                    "registration before the party can register a new key",
                    details={"party": name},
                )
            db.execute(
                "INSERT INTO parties(name, address, signing_public_key, registered_at, issued_at_ms, datasets_sha256) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET address=excluded.address, "
                "signing_public_key=excluded.signing_public_key, registered_at=excluded.registered_at, "
                "issued_at_ms=excluded.issued_at_ms, datasets_sha256=excluded.datasets_sha256",
                (name, address, key_hex, now, reg.issued_at_ms if reg else 0, reg.datasets_sha256 if reg else ""),
            )
            self._replace_datasets(db, name, key_hex, records, same_key=row is not None and row[0] == key_hex, now=now)

    def _check_registration(
        self, db: sqlite3.Connection, signed: SignedRegistration, row: Any, *, address: str, now: float
    ) -> None:
        """The checks of a signed registration against the party's stored one (``row``: key, address,
        last issued_at_ms, datasets digest; None for a new name), then its ``party_registered`` entry."""
        reg = signed.registration
        reg.check_fresh(int(now * 1000), last_ms=row[2] if row is not None else 0)
        if row is None or row[0] != reg.owner_key:
            self._use_enrolment(db, reg.party, signed.enrolment_token, new_key=row is not None, now=now)
            change = "enrolled" if row is None else "key_changed"
        elif row[1] != address or row[3] != reg.datasets_sha256:
            change = "updated"
        else:
            return  # an agent's restart at the same address with the same datasets: nothing new to log
        self._append("party_registered", **asdict(reg), signature=signed.signature.hex(), change=change)

    def _use_enrolment(self, db: sqlite3.Connection, party: str, token: str, *, new_key: bool, now: float) -> None:
        """Use up the operator's enrolment token for ``party`` (CallerError when there is none valid)."""
        row = db.execute("SELECT token_hash, expires_at FROM enrolments WHERE party = ?", (party,)).fetchone()
        if token and row is not None and hmac.compare_digest(token_hash(token), row[0]) and row[1] > now:
            db.execute("DELETE FROM enrolments WHERE party = ?", (party,))
            return
        what = f"party {party} is registered with another signing key" if new_key else f"party {party} is not enrolled"
        raise CallerError(
            f"{what}: a {'key change' if new_key else 'new party'} needs the coordinator operator's enrolment "
            f"(`sealroom party enrol {party}`), whose one-time token the agent presents ([party] enrolment_token); "
            "the token given is missing, wrong, used or expired",
            details={"party": party, "check": "enrolment"},
        )

    def enrol(self, party: str, *, token: str, expires_at: float) -> None:
        """Record the operator's enrolment of ``party`` (its token hashed), replacing an unused one."""
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO enrolments(party, token_hash, expires_at, created_at) VALUES (?,?,?,?)",
                (party, token_hash(token), expires_at, time.time()),
            )

    def _replace_datasets(
        self,
        db: sqlite3.Connection,
        name: str,
        key_hex: str,
        records: Sequence[DatasetRecord],
        *,
        same_key: bool,
        now: float,
    ) -> None:
        """Store the party's datasets in place of its old ones; log each one that is new or changed
        (policy, schema or owner key), not at every agent restart."""
        before = {
            r[0]: (r[1], bytes(r[2]))
            for r in db.execute(
                "SELECT name, policy_digest, arrow_schema FROM datasets WHERE party = ?", (name,)
            ).fetchall()
        }
        db.execute("DELETE FROM datasets WHERE party = ?", (name,))
        for d in records:
            if not same_key or before.get(d.name) != (d.policy_digest, bytes(d.arrow_schema)):
                self._append(
                    "dataset_registered",
                    party=name,
                    dataset=d.name,
                    policy_digest=d.policy_digest,
                    schema_sha256=hashlib.sha256(bytes(d.arrow_schema)).hexdigest(),
                    owner_key_sha256=hashlib.sha256(bytes.fromhex(key_hex)).hexdigest(),
                )
            db.execute(
                "INSERT INTO datasets(party, name, arrow_schema, policy_json, policy_digest, description, "
                "approximate_rows, registered_at) VALUES (?,?,?,?,?,?,?,?)",
                (name, d.name, d.arrow_schema, d.policy_json, d.policy_digest, d.description, d.approximate_rows, now),
            )

    def parties(self) -> dict[str, PartyRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, address, signing_public_key FROM parties").fetchall()
        return {r[0]: PartyRecord(name=r[0], address=r[1], signing_public_key=r[2]) for r in rows}

    def datasets(self) -> list[DatasetRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT party, name, arrow_schema, policy_json, policy_digest, description, approximate_rows "
                "FROM datasets "
                "ORDER BY party, name"
            ).fetchall()
        return [
            DatasetRecord(
                party=r[0],
                name=r[1],
                arrow_schema=r[2],
                policy_json=r[3],
                policy_digest=r[4],
                description=r[5],
                approximate_rows=r[6],
            )
            for r in rows
        ]

    # -- queries -----------------------------------------------------------------------------

    def create_query(self, query_id: str, sql: str, analyst: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO queries(id, sql, analyst, status, created_at, updated_at) VALUES (?,?,?,?,?,?)",
                (query_id, sql, analyst, "planning", now, now),
            )

    def update_query(
        self,
        query_id: str,
        *,
        status: str | None = None,
        plan_json: bytes | None = None,
        plan_hash: str | None = None,
        error: dict[str, Any] | None = None,
        progress: str | None = None,
    ) -> None:
        sets: list[str] = ["updated_at = ?"]
        args: list[object] = [time.time()]
        for col, value in (
            ("status", status),
            ("plan_json", plan_json),
            ("plan_hash", plan_hash),
            ("error_json", json.dumps(error) if error is not None else None),
            ("progress", progress),
        ):
            if value is not None:
                sets.append(f"{col} = ?")
                args.append(value)
        with self.tx() as db:
            cur = db.execute(f"UPDATE queries SET {', '.join(sets)} WHERE id = ?", (*args, query_id))
            if cur.rowcount != 1:
                raise NotFoundError(f"no query {query_id}")

    def query(self, query_id: str) -> QueryRecord:
        with self._lock:
            r = self._db.execute(
                "SELECT id, sql, analyst, status, plan_json, plan_hash, error_json, progress, created_at, "
                "updated_at FROM queries WHERE id = ?",
                (query_id,),
            ).fetchone()
        if r is None:
            raise NotFoundError(f"no query {query_id}; `sealroom status` lists known queries")
        return QueryRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, r[7], r[8], r[9])

    def queries(self) -> list[QueryRecord]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM queries ORDER BY created_at").fetchall()]
        return [self.query(i) for i in ids]

    def refuse_query(self, query_id: str, *, error: dict[str, Any], event: Mapping[str, Any]) -> None:
        """Mark a query refused before it was planned and log ``query_refused`` (``event``: its fields)
        in the same transaction."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE queries SET status = 'refused', progress = 'refused', error_json = ?, updated_at = ? "
                "WHERE id = ?",
                (json.dumps(error), time.time(), query_id),
            )
            if cur.rowcount != 1:
                raise NotFoundError(f"no query {query_id}")
            self._append("query_refused", query_id=query_id, **event)

    def latest_event(self, type: str) -> LogEntry | None:
        """The log's last entry of this type (None without a log or without such an entry)."""
        if self.log is None:
            return None
        needle = f'%"type":{json.dumps(type)}%'  # entries are canonical JSON, holding no free text
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM tlog_entries WHERE CAST(entry AS TEXT) LIKE ? ORDER BY seq DESC", (needle,)
            ).fetchall()
        for (data,) in rows:
            entry = LogEntry.from_bytes(bytes(data))
            if entry.type == type:
                return entry
        return None

    def fail_in_flight(self, reason: str) -> int:
        err = json.dumps({"code": "job_failed", "message": reason})
        with self.tx() as db:
            cur = db.execute(
                f"UPDATE queries SET status = 'failed', progress = 'failed', error_json = ?, updated_at = ? "
                f"WHERE status IN ({','.join('?' * len(IN_FLIGHT))})",
                (err, time.time(), *IN_FLIGHT),
            )
            return cur.rowcount

    # -- approvals and releases --------------------------------------------------------------

    def add_approval(self, query_id: str, party: str, plan_hash: str, signature: bytes) -> None:
        """Store a party's approval; log ``approved`` when it is new (or another signature)."""
        with self.tx() as db:
            old = db.execute(
                "SELECT plan_hash, signature FROM approvals WHERE query_id = ? AND party = ?", (query_id, party)
            ).fetchone()
            if old is None or (old[0], bytes(old[1])) != (plan_hash, bytes(signature)):
                self._append(
                    "approved", query_id=query_id, party=party, plan_hash=plan_hash, signature=bytes(signature).hex()
                )
            db.execute(
                "INSERT OR REPLACE INTO approvals(query_id, party, plan_hash, signature, approved_at) "
                "VALUES (?,?,?,?,?)",
                (query_id, party, plan_hash, signature, time.time()),
            )

    def delete_approval(self, query_id: str, party: str, *, event: str | None = None, **fields: Any) -> bool:
        """Remove a party's approval of a query (revoked or lapsed); True when there was one. With
        ``event`` (``approval_revoked`` or ``approval_lapsed``), a removed approval is logged in the
        same transaction, with the stored plan hash unless ``fields`` give the one the owner signed."""
        with self.tx() as db:
            row = db.execute(
                "SELECT plan_hash FROM approvals WHERE query_id = ? AND party = ?", (query_id, party)
            ).fetchone()
            cur = db.execute("DELETE FROM approvals WHERE query_id = ? AND party = ?", (query_id, party))
            if row is not None and event is not None:
                self._append(event, query_id=query_id, party=party, **{"plan_hash": row[0], **fields})
            return cur.rowcount > 0

    def approvals(self, query_id: str) -> dict[str, Approval]:
        with self._lock:
            rows = self._db.execute(
                "SELECT party, plan_hash, signature FROM approvals WHERE query_id = ?", (query_id,)
            ).fetchall()
        return {r[0]: Approval(r[1], bytes(r[2])) for r in rows}

    def release(
        self,
        query_id: str,
        *,
        arrow_table: bytes,
        suppressed: list[dict[str, Any]],
        result_json: bytes,
        signature: bytes,
        evidence: bytes,
        simulated: bool,
        receipt: Mapping[str, Any] | None = None,
        released_at: float | None = None,
        progress: str = "released",
    ) -> dict[str, Any] | None:
        """Store the release and mark the query released, in one transaction; with the log, also
        countersign ``receipt`` (built with ``released_at``) and append its ``released`` entry in
        that same transaction. ``progress`` is what the query's status keeps showing (the streams'
        final counts, for a TEE release). Returns the countersigned receipt (None without a log)."""
        now = time.time() if released_at is None else released_at
        signed = None
        if self.log is not None:
            if receipt is None:
                raise ValueError("a release recorded in the transparency log needs its receipt")
            assert self._log_key is not None
            signed = countersign(receipt, self._log_key)
        with self.tx() as db:
            db.execute(
                "INSERT INTO releases(query_id, arrow_table, suppressed_json, result_json, signature, evidence, "
                "simulated, released_at, receipt_json) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    query_id,
                    arrow_table,
                    json.dumps(suppressed),
                    result_json,
                    signature,
                    evidence,
                    int(simulated),
                    now,
                    canonical_json(signed) if signed is not None else None,
                ),
            )
            db.execute(
                "UPDATE queries SET status = 'released', progress = ?, updated_at = ? WHERE id = ?",
                (progress, now, query_id),
            )
            if self.log is not None and signed is not None:
                self.log.append_release(signed)
        return signed

    def get_release(self, query_id: str) -> ReleaseRecord | None:
        with self._lock:
            r = self._db.execute(
                "SELECT arrow_table, suppressed_json, result_json, signature, evidence, simulated, released_at, "
                "receipt_json FROM releases WHERE query_id = ?",
                (query_id,),
            ).fetchone()
        if r is None:
            return None
        return ReleaseRecord(
            arrow_table=bytes(r[0]),
            suppressed=json.loads(r[1]),
            result_json=bytes(r[2]),
            signature=bytes(r[3]),
            evidence=bytes(r[4]),
            simulated=bool(r[5]),
            released_at=r[6],
            receipt=json.loads(r[7]) if r[7] is not None else None,
        )
