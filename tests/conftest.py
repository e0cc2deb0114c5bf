"""Fixtures shared by every test directory: the PostgreSQL server this machine runs.

``postgres`` (session) is the server at ``SEALROOM_TEST_POSTGRES_URI`` (default
``postgresql://root@127.0.0.1:5432/test``, trust authentication). Where it cannot be reached the
test is skipped, saying why -- except in CI (``CI`` set) or with ``SEALROOM_REQUIRE_POSTGRES=1``
(``.ci/run`` sets it), where the test fails instead: a CI run must not pass by skipping them.

``pg_schema`` (function) is a fresh, uniquely named schema in that database, dropped with all it
holds when the test ends; create the test's tables in it. Tests using either must be marked
``@pytest.mark.postgres``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest

from sealroom.pki import DevPKI
from tests.harness.pki import session_pki

DEFAULT_POSTGRES_URI = "postgresql://root@127.0.0.1:5432/test"


def _postgres_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("SEALROOM_REQUIRE_POSTGRES") == "1"


@dataclass(frozen=True)
class Postgres:
    """A reachable PostgreSQL database: ``uri`` (libpq form, no table)."""

    uri: str

    def connect(self) -> Any:
        import adbc_driver_postgresql.dbapi

        return adbc_driver_postgresql.dbapi.connect(self.uri, autocommit=True)

    def execute(self, *statements: str) -> None:
        with self.connect() as con, con.cursor() as cur:
            for sql in statements:
                cur.execute(sql)

    def query(self, sql: str) -> pa.Table:
        with self.connect() as con, con.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()


@dataclass(frozen=True)
class PgSchema:
    """A schema of its own for one test: ``name``, and ``source(table)`` the source URI of a table in it."""

    postgres: Postgres
    name: str

    def source(self, table: str) -> str:
        return f"{self.postgres.uri}?table={self.name}.{table}"

    def execute(self, *statements: str) -> None:
        self.postgres.execute(*statements)

    def ingest(self, table: str, data: pa.Table) -> None:
        """Create ``table`` in this schema holding ``data`` (ADBC bulk ingestion, COPY)."""
        with self.postgres.connect() as con, con.cursor() as cur:
            cur.adbc_ingest(table, data, mode="create", db_schema_name=self.name)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    uri = os.environ.get("SEALROOM_TEST_POSTGRES_URI", DEFAULT_POSTGRES_URI)
    server = Postgres(uri)
    try:
        server.query("SELECT 1")
    except Exception as exc:  # noqa: BLE001 -- any failure to reach it decides the same way
        why = f"PostgreSQL is not reachable at {uri} ({type(exc).__name__}); start it or set SEALROOM_TEST_POSTGRES_URI"
        if _postgres_required():
            pytest.fail(f"{why}; CI (CI or SEALROOM_REQUIRE_POSTGRES=1) requires it", pytrace=False)
        pytest.skip(why)
    return server


@pytest.fixture
def pg_schema(postgres: Postgres, request: pytest.FixtureRequest) -> Iterator[PgSchema]:
    if request.node.get_closest_marker("postgres") is None:
        pytest.fail("a test using PostgreSQL must be marked @pytest.mark.postgres", pytrace=False)
    name = f"sr_test_{uuid.uuid4().hex[:12]}"
    postgres.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield PgSchema(postgres, name)
    finally:
        postgres.execute(f'DROP SCHEMA "{name}" CASCADE')


# --- a real headless browser (Debian's chromium; `make test` installs it where it can) -----------


def _browser_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("SEALROOM_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable Chromium, or a skip saying why (a failure in CI)."""
    import shutil

    path = os.environ.get("SEALROOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        why = "no chromium on PATH (Debian: apt-get install chromium; `make test` installs it when run as root)"
        if _browser_required():
            pytest.fail(f"{why}; CI (CI or SEALROOM_REQUIRE_BROWSER=1) requires it", pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def dev_pki() -> DevPKI:
    """The session's development CA (tests/harness/pki.py): servers started in-process use it."""
    return session_pki()
