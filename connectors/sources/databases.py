"""Database sources: a DuckDB file, a SQLite file or a PostgreSQL table or query, named by URI.

Forms (see docs/configuration.md):

- ``postgresql://USER@HOST:PORT/DB?table=[SCHEMA.]TABLE`` or ``...?query=SELECT ...`` (``postgres://``
  too); other URI parameters (``sslmode=``, ``connect_timeout=``...) go to libpq, and so do libpq's
  environment (``PGPASSWORD``, ``PGSSLMODE``...) and password file (``~/.pgpass``).
- ``sqlite:///PATH?table=TABLE``: three slashes then the path, relative (``sqlite:///b.db``) or
  absolute (``sqlite:////srv/b.db``), as in SQLAlchemy. Opened read-only.
- ``duckdb:///PATH?table=TABLE`` or ``?query=SELECT ...``, same path rule; or a plain path to a
  ``.duckdb``/``.ddb``/``.sqlite``/``.sqlite3``/``.db`` file followed by ``?table=`` or ``?query=``
  (the file's header says whether it is DuckDB or SQLite). Opened read-only.

``table=`` is percent-decoded; ``query=`` must come last and is taken verbatim (a ``%`` in it is a
``%``). A query must be one read-only SELECT (checked with sqlglot, then run in a READ ONLY
transaction on PostgreSQL, a read-only connection otherwise).

Reading: the schema comes from the database's own description of the relation (no row is read).
Rows come as Arrow record batches from the ADBC drivers (PostgreSQL, SQLite) and DuckDB's Python
API: never converted row by row. PostgreSQL rows are read through a server-side cursor,
``batch_rows`` rows per FETCH, so memory stays a few batches however large the table.

Pushdown (:meth:`SqlSource.filtered_batches`): the database receives ``SELECT`` of only the needed
columns ``FROM`` the relation ``WHERE`` the part of the plan's filter that it evaluates exactly as
DuckDB does (comparisons, IN, BETWEEN, IS NULL, LIKE, AND/OR/NOT over columns whose types agree
with the literals, strings compared byte-wise); every literal is bound as a parameter, never pasted
into the SQL text. Whatever it cannot take exactly is applied here, by DuckDB, on the rows it sends
(:func:`connectors.sources.base.filter_batches`): the result has WHERE semantics either way. The
specs are parsed in :mod:`connectors.sources.database_uris`, the filter split in
:mod:`connectors.sources.pushdown`.

Security model: this module runs on the data owner's machine. Its errors and log lines name the
dataset, the database (its URI without password), tables, columns, types and SQLSTATE codes only.
Driver messages can quote values, so they are read for structure and never copied, logged or
chained (``raise ... from None``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from connectors.sources.base import (
    DEFAULT_BATCH_ROWS,
    check_batch_rows,
    filter_batches,
    physical_columns,
    resolve_columns,
    select_columns,
    sliced,
)
from connectors.sources.database_uris import parse_database_spec, redact_uri
from connectors.sources.pushdown import translate_filter
from sealroom.duck import locked_config
from sealroom.errors import SourceError

__all__ = [
    "SqlSource",
    "DuckDbSource",
    "SqliteSource",
    "PostgresSource",
    "open_database",
    "validate_select",
]

logger = logging.getLogger(__name__)

_CURSOR = "__sr_cursor"
_SUBQUERY = "__sr_q"

# An observer of every statement a SQL source sends (SQL text with placeholders, parameters): a
# seam for tests and debugging. Parameters may hold a filter's literals: never log them.
StatementHook = Callable[[str, tuple[object, ...]], None]


def open_database(text: str, *, dataset: str) -> SqlSource:
    """The database source ``text`` names (see the module docstring). Connects to nothing yet."""
    spec = parse_database_spec(text, dataset)
    if spec.password_in_uri:
        logger.warning("dataset %s: the source URI carries a password; prefer PGPASSWORD or ~/.pgpass", dataset)
    if spec.kind == "postgresql":
        return PostgresSource(spec.target, dataset=dataset, table=spec.table, query=spec.query)
    if spec.kind == "sqlite":
        assert spec.table is not None
        return SqliteSource(spec.target, dataset=dataset, table=spec.table)
    return DuckDbSource(spec.target, dataset=dataset, table=spec.table, query=spec.query)


# --- Read-only queries ------------------------------------------------------------------------

_WRITES = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Command,
    exp.Into,
    exp.Lock,
    exp.Placeholder,
    exp.Parameter,
)


def validate_select(query: str, *, dialect: str, dataset: str) -> exp.Query:
    """``query`` parsed, if it is one SELECT (or a set operation of SELECTs) that writes nothing,
    locks nothing and has no parameters; else :class:`SourceError` (the query is not quoted: it is
    the owner's own text, but may hold literals)."""

    def refuse(why: str) -> SourceError:
        return SourceError(
            f"dataset {dataset}: query= {why}; give a single read-only SELECT", details={"dataset": dataset}
        )

    try:
        statements = [s for s in sqlglot.parse(query, read=dialect) if s is not None]
    except SqlglotError as exc:
        raise refuse(f"could not be parsed as {dialect} SQL ({type(exc).__name__})") from None
    if len(statements) != 1:
        raise refuse(f"holds {len(statements)} statements")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        raise refuse(f"is a {tree.key.upper()} statement, not a SELECT")
    for node in tree.walk():
        if isinstance(node, _WRITES):
            raise refuse(f"contains {node.key.upper()}")
    return tree


def _relation(table: str | None, query: str | None, *, dialect: str, dataset: str) -> tuple[exp.Expression, str]:
    """(the FROM item, its public name) for a ``table=`` or a ``query=``."""
    if query is not None:
        tree = validate_select(query, dialect=dialect, dataset=dataset)
        return exp.Subquery(this=tree, alias=exp.TableAlias(this=exp.to_identifier(_SUBQUERY, quoted=True))), "query"
    assert table is not None
    parts = _table_parts(table, dataset)
    return exp.Table(
        this=exp.to_identifier(parts[-1], quoted=True),
        db=exp.to_identifier(parts[-2], quoted=True) if len(parts) > 1 else None,
        catalog=exp.to_identifier(parts[-3], quoted=True) if len(parts) > 2 else None,
    ), f"table {table}"


def _table_parts(table: str, dataset: str) -> list[str]:
    """``table=`` split on dots into [catalog.][schema.]name; a part may be double-quoted to hold a dot."""
    parts: list[str] = []
    for m in re.finditer(r'"((?:[^"]|"")+)"|([^".]+)', table):
        parts.append(m[1].replace('""', '"') if m[1] is not None else m[2])
    rebuilt = ".".join(f'"{p}"' if "." in p or '"' in p else p for p in parts)
    if not parts or len(parts) > 3 or rebuilt.replace('"', "") != table.replace('"', ""):
        raise SourceError(
            f"dataset {dataset}: table={table!r} is not a table name; give NAME, SCHEMA.NAME or CATALOG.SCHEMA.NAME",
            details={"dataset": dataset},
        )
    return parts


# --- Sources ----------------------------------------------------------------------------------


class SqlSource:
    """A table or read-only query in a database. Subclasses connect and stream; this class builds
    the SQL, checks columns and types, and applies what the database cannot filter exactly."""

    dialect = "duckdb"
    engine = "database"
    # Whether values of another type are converted to the registered one when they convert exactly
    # (SQLite, whose types are per value); otherwise a column of another type is an error.
    converts_values = False

    def __init__(self, *, dataset: str, table: str | None, query: str | None, where: str) -> None:
        self.dataset = dataset
        self.table = table
        self.query = query
        self._relation, name = _relation(table, query, dialect=self.dialect, dataset=dataset)
        self.description = f"{self.engine} {name} {where}"
        self.on_execute: StatementHook | None = None
        self._pushable: frozenset[str] | None = None  # see _comparable, known once the schema is read

    # - Source protocol

    @property
    def schema(self) -> pa.Schema:
        """Read from the database's description of the relation each time (no row is read)."""
        with self._errors(None):
            schema = self._read_schema()
        self._pushable = frozenset(f.name for f in schema if self._comparable(f))
        return pa.schema([pa.field(f.name, self._plain_type(f), f.nullable) for f in schema])

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        check_batch_rows(self, batch_rows)
        schema = self.schema
        names = resolve_columns(self, schema, columns)
        read = physical_columns(names, schema) or schema.names
        return self._select(read, names, None, (), schema, batch_rows)

    def filtered_batches(
        self,
        columns: Sequence[str],
        predicate: str,
        *,
        schema: pa.Schema | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """The rows satisfying ``predicate`` (DuckDB SQL over the dataset's column names; WHERE
        semantics, NULL drops the row), projected to ``columns`` in that order. The database gets
        what it evaluates exactly (:func:`translate_filter`), with every literal a parameter; the
        rest is applied here by DuckDB. ``schema`` (the registered one) saves reading it again."""
        check_batch_rows(self, batch_rows)
        current = self.schema if schema is None or self._pushable is None else None
        schema = schema if schema is not None else current
        assert schema is not None
        names = resolve_columns(self, schema, columns) or []
        sql_filter = translate_filter(predicate, schema, dialect=self.dialect, pushable=self._pushable)
        read = list(names)
        for column in sql_filter.residual_columns:
            if column not in read:
                read.append(column)
        if not read:
            read = schema.names[:1]
        resolve_columns(self, schema, read)
        batches = self._select(read, read, sql_filter.where, sql_filter.params, schema, batch_rows)
        if sql_filter.residual is None:
            return (b.select(names) for b in batches) if read != names else batches
        return filter_batches(batches, sql_filter.residual, sql_filter.residual_columns, names, dataset=self.dataset)

    # - SQL

    def select_sql(self, columns: Sequence[str] | None, where: str | None) -> str:
        """``SELECT columns FROM relation [WHERE where]`` in this database's dialect (every column
        when ``columns`` is None)."""
        items = [exp.Star()] if columns is None else [exp.column(c, quoted=True) for c in columns]
        text = exp.select(*items).from_(self._relation.copy()).sql(self.dialect)
        return f"{text} WHERE {where}" if where else text

    def _select(
        self,
        read: list[str],
        names: list[str] | None,
        where: str | None,
        params: tuple[object, ...],
        schema: pa.Schema,
        batch_rows: int,
    ) -> Iterator[pa.RecordBatch]:
        target = pa.schema([schema.field(c) for c in read])
        sql = self.select_sql(read, where)
        with self._errors(read):
            for batch in self._stream(sql, params, batch_rows):
                yield from sliced(select_columns(self._conform(batch, target), names), batch_rows)

    def _conform(self, batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
        """``batch`` with the registered types; a value of another type is an error naming its column."""
        if batch.schema.names != target.names:
            raise SourceError(
                f"dataset {self.dataset}: {self.description} returned columns {batch.schema.names}, "
                f"expected {target.names}",
                details={"dataset": self.dataset},
            )
        if all(a.type.equals(b.type) for a, b in zip(batch.schema, target, strict=True)):
            return batch
        arrays = []
        for column, field in zip(batch.columns, target, strict=True):
            array = column.storage if isinstance(column.type, pa.BaseExtensionType) else column  # see _plain_type
            if array.type.equals(field.type):
                arrays.append(array)
                continue
            try:
                if not (self.converts_values or pa.types.is_null(array.type) or column is not array):
                    raise TypeError("the database returned another type")
                arrays.append(array.cast(field.type, safe=True))
            except (pa.ArrowException, TypeError, ValueError):
                raise SourceError(
                    f"dataset {self.dataset}: column {field.name!r} of {self.description} holds {array.type} "
                    f"values, but it is registered as {field.type}; fix the values or the column's type, "
                    f"or register the dataset again",
                    details={
                        "dataset": self.dataset,
                        "column": field.name,
                        "type": str(field.type),
                        "found": str(array.type),
                    },
                ) from None
        return pa.RecordBatch.from_arrays(arrays, schema=target)

    def _trace(self, sql: str, params: tuple[object, ...]) -> None:
        logger.debug("dataset %s: %s query with %d bound parameters", self.dataset, self.engine, len(params))
        if self.on_execute is not None:
            self.on_execute(sql, params)

    # - for subclasses

    def _comparable(self, field: pa.Field) -> bool:
        """Whether the database compares this column's values as DuckDB compares their Arrow form
        (conditions on the others are applied here)."""
        return not isinstance(field.type, pa.BaseExtensionType)

    def _plain_type(self, field: pa.Field) -> pa.DataType:
        """The Arrow type a column is registered and sent with: an extension type (a driver's
        "opaque", JSON or UUID column) as its storage type."""
        t = field.type
        return t.storage_type if isinstance(t, pa.BaseExtensionType) else t

    def _read_schema(self) -> pa.Schema:
        raise NotImplementedError

    def _stream(self, sql: str, params: tuple[object, ...], batch_rows: int) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def _classify(self, exc: BaseException, columns: list[str] | None) -> SourceError | None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _errors(self, columns: list[str] | None) -> Iterator[None]:
        try:
            yield
        except SourceError:
            raise
        except Exception as exc:  # driver errors: read for structure, never copied
            err = self._classify(exc, columns)
            if err is None and isinstance(exc, pa.ArrowException | OSError):
                # A driver's Arrow stream reports through pyarrow: its text may quote values too.
                err = self._error("reading failed", "check the source", cause=type(exc).__name__)
            if err is None:
                raise
            raise err from None

    def _error(self, what: str, fix: str, **details: object) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: {self.description}: {what}; {fix}",
            details={"dataset": self.dataset, "source": self.description, **details},
        )

    def _missing(self, columns: list[str] | None) -> SourceError:
        """A relation or column the database says does not exist: find which, from the schema."""
        if columns:
            try:
                available = self.schema.names
            except SourceError as err:
                return err
            gone = [c for c in columns if c not in available]
            if gone:
                return self._error(
                    f"column {gone[0]!r} does not exist",
                    "restore the column or register the dataset again",
                    column=gone[0],
                )
        what = "the table does not exist" if self.table else "the query refers to a table or column that does not exist"
        return self._error(what, "check the table= or query= of the source (and the database and schema names)")


class DuckDbSource(SqlSource):
    """A table or SELECT in a DuckDB database file, opened read-only with external access off."""

    dialect = "duckdb"
    engine = "DuckDB"

    def __init__(self, path: str | Path, *, dataset: str, table: str | None = None, query: str | None = None):
        self.path = Path(path)
        super().__init__(dataset=dataset, table=table, query=query, where=f"in {self.path}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.path.is_file():
            raise SourceError(
                f"dataset {self.dataset}: database file not found: {self.path}",
                details={"dataset": self.dataset, "path": str(self.path)},
            )
        con = duckdb.connect(str(self.path), read_only=True, config=locked_config())
        try:
            yield con
        finally:
            con.close()

    def _read_schema(self) -> pa.Schema:
        sql = self.select_sql(None, None) + " LIMIT 0"
        with self._connect() as con:
            return con.sql(sql).to_arrow_table().schema

    def _stream(self, sql: str, params: tuple[object, ...], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._connect() as con:
            self._trace(sql, params)
            reader = con.sql(sql, params=list(params)).to_arrow_reader(batch_rows)
            try:
                yield from reader
            finally:
                reader.close()

    def _classify(self, exc: BaseException, columns: list[str] | None) -> SourceError | None:
        if not isinstance(exc, duckdb.Error):
            return None
        if isinstance(exc, duckdb.CatalogException | duckdb.BinderException):
            return self._missing(columns)
        if isinstance(exc, duckdb.IOException):
            return self._error(
                "the database file cannot be opened read-only",
                "check that it is a DuckDB file of a compatible version and that no process holds it for writing",
                cause=type(exc).__name__,
            )
        if isinstance(exc, duckdb.ConversionException | duckdb.OutOfRangeException | duckdb.InvalidInputException):
            return self._error(
                "a value could not be converted while reading", "check the column types", cause=type(exc).__name__
            )
        return self._error("reading failed", "check the source", cause=type(exc).__name__)


class SqliteSource(SqlSource):
    """A table in a SQLite database file, opened read-only through ADBC. SQLite types are per value:
    the schema comes from the declared column types, and values are converted to it as read."""

    dialect = "sqlite"
    engine = "SQLite"
    converts_values = True

    def __init__(self, path: str | Path, *, dataset: str, table: str):
        self.path = Path(path)
        super().__init__(dataset=dataset, table=table, query=None, where=f"in {self.path}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        import adbc_driver_sqlite.dbapi  # lazy: ADBC (native, ~1 s to import) only when used

        if not self.path.is_file():
            raise SourceError(
                f"dataset {self.dataset}: database file not found: {self.path}",
                details={"dataset": self.dataset, "path": str(self.path)},
            )
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        con = adbc_driver_sqlite.dbapi.connect(uri, autocommit=True)
        try:
            yield con
        finally:
            con.close()

    def _read_schema(self) -> pa.Schema:
        assert self.table is not None
        parts = _table_parts(self.table, self.dataset)
        with self._connect() as con:
            if len(parts) > 1:
                return con.adbc_get_table_schema(parts[-1], db_schema_name=parts[-2])
            return con.adbc_get_table_schema(parts[-1])

    def _stream(self, sql: str, params: tuple[object, ...], batch_rows: int) -> Iterator[pa.RecordBatch]:
        import adbc_driver_sqlite  # lazy: ADBC (native, ~1 s to import) only when used

        with self._connect() as con:
            cursor = con.cursor()
            try:
                cursor.adbc_statement.set_options(
                    **{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: str(batch_rows)}
                )
                self._trace(sql, params)
                cursor.execute(sql, parameters=params or None)
                reader = cursor.fetch_record_batch()
                try:
                    yield from reader
                finally:
                    reader.close()
            finally:
                cursor.close()

    def _classify(self, exc: BaseException, columns: list[str] | None) -> SourceError | None:
        import adbc_driver_manager  # lazy: ADBC (native, ~1 s to import) only when used

        text = str(exc)
        mismatch = re.search(r"Type mismatch in column (\d+)", text)
        if isinstance(exc, pa.ArrowException | OSError | adbc_driver_manager.Error) and mismatch and columns:
            index = int(mismatch[1])
            column = columns[index] if index < len(columns) else f"number {index + 1}"
            return self._error(
                f"column {column!r} holds values of more than one type",
                "SQLite stores any value in any column: fix the values that do not have the column's declared type",
                column=column,
                cause=type(exc).__name__,
            )
        if not isinstance(exc, adbc_driver_manager.Error):
            return None
        if (
            "no such table" in text
            or "no such column" in text
            or exc.status_code == adbc_driver_manager.AdbcStatusCode.NOT_FOUND
        ):
            return self._missing(columns)
        if "unable to open" in text or "not a database" in text or "file is" in text:
            return self._error(
                "the file cannot be opened as a SQLite database", "check the path", cause=type(exc).__name__
            )
        if "type" in text.lower():
            return self._error(
                "a value does not have the type of its column",
                "SQLite stores any value in any column: fix the values, or declare the column's type",
                cause=type(exc).__name__,
            )
        return self._error("reading failed", "check the source", cause=type(exc).__name__)


# PostgreSQL SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html)
_PG_MISSING = {"42P01", "3F000", "42703", "3D000"}
# PostgreSQL types whose comparisons with a bound parameter agree with DuckDB's on their Arrow form.
_PG_COMPARABLE = {b"int2", b"int4", b"int8", b"float8", b"text", b"varchar", b"bool", b"date"}


class PostgresSource(SqlSource):
    """A table or read-only SELECT in PostgreSQL, read through ADBC (libpq): a server-side cursor in
    a READ ONLY transaction, fetched ``batch_rows`` rows at a time."""

    dialect = "postgres"
    engine = "PostgreSQL"

    def __init__(self, uri: str, *, dataset: str, table: str | None = None, query: str | None = None):
        self.uri = uri
        self.shown = redact_uri(uri)
        super().__init__(dataset=dataset, table=table, query=query, where=f"at {self.shown}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        import adbc_driver_postgresql.dbapi  # lazy: ADBC (native, ~1 s to import) only when used

        con = adbc_driver_postgresql.dbapi.connect(self.uri, autocommit=True)
        try:
            yield con
        finally:
            con.close()

    def _comparable(self, field: pa.Field) -> bool:
        # Not char(n) (compared without its padding), citext (ignores case), numeric (its Arrow form
        # may be float64)... text equality is byte-wise under any deterministic collation; orderings
        # and LIKE get COLLATE "C" (see _Translator).
        return (field.metadata or {}).get(b"POSTGRESQL:type") in _PG_COMPARABLE

    def _plain_type(self, field: pa.Field) -> pa.DataType:
        """``numeric(p, s)`` is read as ``decimal128(p, s)`` (``decimal256`` above 38 digits); a
        ``numeric`` without precision, as ``float64`` (cast it in ``query=`` for exact decimals)."""
        meta = field.metadata or {}
        if meta.get(b"POSTGRESQL:type") == b"numeric":
            try:
                typmod = int(meta.get(b"POSTGRESQL:typmod", b"-1"))
            except ValueError:
                typmod = -1
            if typmod >= 4:
                precision, scale = (typmod - 4) >> 16, (typmod - 4) & 0xFFFF
                if 1 <= precision <= 38 and scale <= precision:
                    return pa.decimal128(precision, scale)
                if precision <= 76 and scale <= precision:
                    return pa.decimal256(precision, scale)
            return pa.float64()
        return super()._plain_type(field)

    def _read_schema(self) -> pa.Schema:
        sql = self.select_sql(None, None)
        with self._connect() as con:
            cursor = con.cursor()
            try:
                return cursor.adbc_execute_schema(sql)
            finally:
                cursor.close()

    def _stream(self, sql: str, params: tuple[object, ...], batch_rows: int) -> Iterator[pa.RecordBatch]:
        import adbc_driver_postgresql  # lazy: ADBC (native, ~1 s to import) only when used

        with self._connect() as con:
            cursor = con.cursor()
            try:
                # COPY would stream too, but not with bound parameters: a cursor's FETCH does.
                cursor.adbc_statement.set_options(**{adbc_driver_postgresql.StatementOptions.USE_COPY.value: "false"})
                cursor.execute("BEGIN TRANSACTION READ ONLY")
                declare = f'DECLARE "{_CURSOR}" NO SCROLL CURSOR FOR {sql}'
                self._trace(declare, params)
                cursor.execute(declare, parameters=params or None)
                fetch = f'FETCH FORWARD {int(batch_rows)} FROM "{_CURSOR}"'
                while True:
                    cursor.execute(fetch)
                    table = cursor.fetch_arrow_table()
                    if table.num_rows == 0:
                        break
                    yield from table.to_batches()
                    del table
                cursor.execute("ROLLBACK")
            finally:
                cursor.close()

    def _classify(self, exc: BaseException, columns: list[str] | None) -> SourceError | None:
        import adbc_driver_manager  # lazy: ADBC (native, ~1 s to import) only when used

        if not isinstance(exc, adbc_driver_manager.Error):
            return None
        state = exc.sqlstate or ""
        text = str(exc)
        details: dict[str, object] = {"sqlstate": state} if state else {}
        if not state and "Failed to connect" in text:
            if "password authentication failed" in text or "no password supplied" in text:
                what = "authentication failed"
                fix = "give the password through PGPASSWORD or ~/.pgpass (or check the user name)"
            elif re.search(r'role "[^"]*" does not exist', text):
                what, fix = "the user does not exist", "check the user name in the URI (or PGUSER)"
            elif re.search(r'database "[^"]*" does not exist', text):
                what, fix = "the database does not exist", "check the database name in the URI"
            elif "could not translate host name" in text:
                what, fix = "the host name does not resolve", "check the host in the URI"
            else:
                what = "cannot connect to the database server"
                fix = "check that PostgreSQL runs and accepts connections at that host and port"
            return self._error(what, fix, cause="connect")
        if state in _PG_MISSING:
            return self._missing(columns)
        if state == "42501":
            return self._error(
                "permission denied", "grant the user SELECT on the table (or the columns the query reads)", **details
            )
        if state == "25006":
            return self._error("the query tried to write", "give a read-only SELECT", **details)
        if state.startswith("42"):
            return self._error("the query is not valid", "check the query= of the source", **details)
        if state.startswith("22"):
            return self._error("a value could not be read or converted", "check the column types", **details)
        if state.startswith("08") or state.startswith("57"):
            return self._error("the connection was lost or the query cancelled", "try again", **details)
        return self._error(
            "reading failed", "check the source and the server's log", cause=type(exc).__name__, **details
        )
