"""DuckDB as Sealroom runs it everywhere it touches rows: the enclave's engine, a party's local
filter and partial aggregates, a DuckDB database source.

No file or network access from SQL (``enable_external_access``), no extension installed or loaded
behind the caller's back, a bounded number of threads, and, once the caller has registered what the
connection needs, a locked configuration (``SET lock_configuration``) that no later statement can
loosen.
"""

from __future__ import annotations

from typing import Any

import duckdb

__all__ = ["locked_config", "locked_connection"]


def locked_config(threads: int = 1) -> dict[str, Any]:
    return {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "threads": threads,
    }


def locked_connection(
    database: str = ":memory:", *, threads: int = 1, read_only: bool = False, lock: bool = True
) -> duckdb.DuckDBPyConnection:
    """A connection with :func:`locked_config`; ``lock=False`` leaves locking to the caller (after it
    has registered its inputs: ``con.execute("SET lock_configuration = true")``)."""
    con = duckdb.connect(database, read_only=read_only, config=locked_config(threads))
    if lock:
        con.execute("SET lock_configuration = true")
    return con
