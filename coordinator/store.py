"""The coordinator's durable state in SQLite: catalog, queries, approvals, releases.

Writes are single transactions; a query's state moves forward only. On start, queries that were in
flight when the process stopped are marked failed (their enclave jobs died with them), so nothing
is left half-done and nothing committed is lost.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealroom.errors import AlreadyExistsError, NotFoundError

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
    released_at REAL NOT NULL
);
"""

TERMINAL = ("released", "refused", "failed")
IN_FLIGHT = ("planning", "awaiting_approval", "pending_approval", "running")


@dataclass(frozen=True)
class QueryRow:
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


class Store:
    def __init__(self, path: Path):
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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- catalog -----------------------------------------------------------------------------

    def register_party(self, name: str, address: str, key_hex: str, datasets: list[dict[str, Any]]) -> None:
        """Register (or re-register) a party. Its signing key is fixed at first registration: a
        later registration under the same name with another key is refused, so nobody can take
        over a party's name in the catalog by re-registering it."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT signing_public_key FROM parties WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != key_hex:
                raise AlreadyExistsError(
                    f"party {name} is registered with another signing key; an operator must remove the old "
                    "registration before the party can register a new key",
                    details={"party": name},
                )
            db.execute(
                "INSERT INTO parties(name, address, signing_public_key, registered_at) VALUES (?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET address=excluded.address, "
                "signing_public_key=excluded.signing_public_key, registered_at=excluded.registered_at",
                (name, address, key_hex, now),
            )
            db.execute("DELETE FROM datasets WHERE party = ?", (name,))
            for d in datasets:
                db.execute(
                    "INSERT INTO datasets(party, name, arrow_schema, policy_json, policy_digest, description, "
                    "approximate_rows, registered_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        name,
                        d["name"],
                        d["arrow_schema"],
                        d["policy_json"],
                        d["policy_digest"],
                        d["description"],
                        d.get("approximate_rows", 0),
                        now,
                    ),
                )

    def parties(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT name, address, signing_public_key FROM parties").fetchall()
        return {r[0]: {"address": r[1], "signing_public_key": r[2]} for r in rows}

    def datasets(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT party, name, arrow_schema, policy_json, policy_digest, description, approximate_rows "
                "FROM datasets "
                "ORDER BY party, name"
            ).fetchall()
        return [
            {
                "party": r[0],
                "name": r[1],
                "arrow_schema": r[2],
                "policy_json": r[3],
                "policy_digest": r[4],
                "description": r[5],
                "approximate_rows": r[6],
            }
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

    def query(self, query_id: str) -> QueryRow:
        with self._lock:
            r = self._db.execute(
                "SELECT id, sql, analyst, status, plan_json, plan_hash, error_json, progress, created_at, "
                "updated_at FROM queries WHERE id = ?",
                (query_id,),
            ).fetchone()
        if r is None:
            raise NotFoundError(f"no query {query_id}; `sealroom status` lists known queries")
        return QueryRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, r[7], r[8], r[9])

    def queries(self) -> list[QueryRow]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM queries ORDER BY created_at").fetchall()]
        return [self.query(i) for i in ids]

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
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO approvals(query_id, party, plan_hash, signature, approved_at) "
                "VALUES (?,?,?,?,?)",
                (query_id, party, plan_hash, signature, time.time()),
            )

    def delete_approval(self, query_id: str, party: str) -> bool:
        """Remove a party's approval of a query (revoked or lapsed); True when there was one."""
        with self.tx() as db:
            cur = db.execute("DELETE FROM approvals WHERE query_id = ? AND party = ?", (query_id, party))
            return cur.rowcount > 0

    def approvals(self, query_id: str) -> dict[str, tuple[str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT party, plan_hash, signature FROM approvals WHERE query_id = ?", (query_id,)
            ).fetchall()
        return {r[0]: (r[1], bytes(r[2])) for r in rows}

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
    ) -> None:
        """Store the release and mark the query released, in one transaction."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO releases(query_id, arrow_table, suppressed_json, result_json, signature, evidence, "
                "simulated, released_at) VALUES (?,?,?,?,?,?,?,?)",
                (query_id, arrow_table, json.dumps(suppressed), result_json, signature, evidence, int(simulated), now),
            )
            db.execute(
                "UPDATE queries SET status = 'released', progress = 'released', updated_at = ? WHERE id = ?",
                (now, query_id),
            )

    def get_release(self, query_id: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute(
                "SELECT arrow_table, suppressed_json, result_json, signature, evidence, simulated, released_at "
                "FROM releases WHERE query_id = ?",
                (query_id,),
            ).fetchone()
        if r is None:
            return None
        return {
            "arrow_table": bytes(r[0]),
            "suppressed": json.loads(r[1]),
            "result_json": bytes(r[2]),
            "signature": bytes(r[3]),
            "evidence": bytes(r[4]),
            "simulated": bool(r[5]),
            "released_at": r[6],
        }
