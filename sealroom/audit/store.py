"""Where the transparency log keeps its entries, checkpoint notes and receipts.

:class:`LogStore` is append-only by contract (nothing here updates or deletes);
:class:`SQLiteLogStore` keeps three tables in a given SQLite connection or file. Edits made behind
the store's back (an edited, deleted, reordered or truncated entry, a swapped receipt, a forked
history) are detected and named by :func:`sealroom.audit.verify.verify_log`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sealroom.audit.notes import SignedCheckpoint

__all__ = ["LogStore", "SQLiteLogStore", "TABLES"]


class LogStore(Protocol):
    """Where a log keeps its entries, checkpoint notes and receipts. Append-only by contract: there
    is no method to change or remove anything (and :func:`sealroom.audit.verify.verify_log` detects it when someone does
    behind the store's back)."""

    def size(self) -> int: ...

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]: ...

    def checkpoints(self, size: int | None = None) -> list[str]:
        """Every stored checkpoint note in the order stored (only those of ``size`` when given)."""
        ...

    def receipts(self) -> dict[int, bytes]: ...

    def append(self, entry: bytes, *, checkpoint: str, receipt: bytes | None = None) -> None:
        """Append one entry (at index ``size()``), its new signed checkpoint and, for a release,
        its receipt: all or nothing."""
        ...

    def add_checkpoint(self, text: str) -> None: ...


TABLES = """
CREATE TABLE IF NOT EXISTS tlog_entries (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_checkpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL,
    note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_receipts (seq INTEGER PRIMARY KEY, receipt BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS tlog_checkpoints_size ON tlog_checkpoints(size);
"""


class SQLiteLogStore:
    """:class:`LogStore` in SQLite: tables ``tlog_entries``, ``tlog_checkpoints``, ``tlog_receipts``
    in the given connection (e.g. the coordinator's own database) or a file. Writes use a
    SAVEPOINT, so they nest inside a caller's transaction and are atomic on their own."""

    def __init__(self, db: sqlite3.Connection | Path | str) -> None:
        if isinstance(db, sqlite3.Connection):
            self._db = db
            self._owned = False
        else:
            self._db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._owned = True
        self._lock = threading.RLock()
        with self._lock:
            for statement in TABLES.strip().split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def close(self) -> None:
        if self._owned:
            self._db.close()

    def size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM tlog_entries").fetchone()[0])

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM tlog_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                (start, end if end is not None else 1 << 62),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def checkpoints(self, size: int | None = None) -> list[str]:
        query = "SELECT note FROM tlog_checkpoints" + (" WHERE size = ?" if size is not None else "") + " ORDER BY id"
        with self._lock:
            return [r[0] for r in self._db.execute(query, () if size is None else (size,)).fetchall()]

    def receipts(self) -> dict[int, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT seq, receipt FROM tlog_receipts ORDER BY seq").fetchall()
        return {int(r[0]): bytes(r[1]) for r in rows}

    def _write(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            self._db.execute("SAVEPOINT tlog_write")
            try:
                fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK TO tlog_write")
                self._db.execute("RELEASE tlog_write")
                raise
            self._db.execute("RELEASE tlog_write")

    def append(self, entry: bytes, *, checkpoint: str, receipt: bytes | None = None) -> None:
        size = SignedCheckpoint.from_text(checkpoint).checkpoint.size

        def write(db: sqlite3.Connection) -> None:
            seq = int(db.execute("SELECT COUNT(*) FROM tlog_entries").fetchone()[0])
            if size != seq + 1:
                raise ValueError("the checkpoint appended with an entry must cover it")
            db.execute("INSERT INTO tlog_entries(seq, entry) VALUES (?, ?)", (seq, entry))
            db.execute("INSERT INTO tlog_checkpoints(size, note) VALUES (?, ?)", (size, checkpoint))
            if receipt is not None:
                db.execute("INSERT INTO tlog_receipts(seq, receipt) VALUES (?, ?)", (seq, receipt))

        self._write(write)

    def add_checkpoint(self, text: str) -> None:
        size = SignedCheckpoint.from_text(text).checkpoint.size

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tlog_checkpoints(size, note) VALUES (?, ?)", (size, text))

        self._write(write)
