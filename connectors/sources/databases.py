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
(:func:`connectors.sources.filter_batches`): the result has WHERE semantics either way.

Security model: this module runs on the data owner's machine. Its errors and log lines name the
dataset, the database (its URI without password), tables, columns, types and SQLSTATE codes only.
Driver messages can quote values, so they are read for structure and never copied, logged or
chained (``raise ... from None``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from sealroom.duck import locked_config
from sealroom.errors import SourceError

__all__ = [
    "DATABASE_FILE_SUFFIXES",
    "SqlFilter",
    "SqlSource",
    "DuckDbSource",
    "SqliteSource",
    "PostgresSource",
    "open_database",
    "is_database_spec",
    "redact_uri",
    "resolve_database_spec",
    "translate_filter",
    "validate_select",
]

logger = logging.getLogger(__name__)

DATABASE_FILE_SUFFIXES = (".duckdb", ".ddb", ".sqlite", ".sqlite3", ".db")
_SCHEMES = ("postgresql", "postgres", "sqlite", "duckdb")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_DUCKDB_MAGIC = b"DUCK"  # at offset 8
_CURSOR = "__sr_cursor"
DEFAULT_BATCH_ROWS = 131_072  # as connectors.sources.DEFAULT_BATCH_ROWS (which imports this module)
_SUBQUERY = "__sr_q"

# An observer of every statement a SQL source sends (SQL text with placeholders, parameters): a
# seam for tests and debugging. Parameters may hold a filter's literals: never log them.
StatementHook = Callable[[str, tuple[object, ...]], None]


# --- Specs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    kind: str  # "postgresql" | "sqlite" | "duckdb"
    target: str  # libpq URI without table/query (postgresql), or the file path
    table: str | None
    query: str | None


def is_database_spec(text: str) -> bool:
    """Whether ``text`` names a database source (a database URI, or a database file with ``?table=``
    or ``?query=``), rather than a file or directory of files."""
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in _SCHEMES:
        return True
    path, sep, params = text.partition("?")
    return bool(sep) and path.lower().endswith(DATABASE_FILE_SUFFIXES) and bool(_param_names(params))


def resolve_database_spec(text: str, base: Path) -> str:
    """``text`` with a relative file path (``sqlite:///b.db``, ``duckdb:///x.duckdb``, ``x.duckdb?...``)
    made absolute against ``base``; a PostgreSQL URI is returned unchanged."""
    for scheme in ("sqlite", "duckdb"):
        prefix = f"{scheme}:///"
        if text.lower().startswith(prefix):
            path, sep, params = text[len(prefix) :].partition("?")
            return f"{prefix}{_absolute(path, base)}{sep}{params}"
    if "://" in text:
        return text
    path, sep, params = text.partition("?")
    return f"{_absolute(path, base)}{sep}{params}"


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _param_names(params: str) -> list[str]:
    return [part.partition("=")[0] for part in params.split("&") if part] if params else []


def _split_params(dataset: str, params: str, *, shown: str) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """(table, query, other parameters) of a URI's query string. ``query=`` takes the rest verbatim."""
    table: str | None = None
    query: str | None = None
    rest: list[tuple[str, str]] = []
    while params:
        if params.startswith("query="):
            query = params[len("query=") :]
            break
        part, _, params = params.partition("&")
        if not part:
            continue
        key, _, value = part.partition("=")
        key = unquote(key)
        if key == "table":
            if table is not None:
                raise _spec_error(dataset, shown, "gives table= twice")
            table = unquote(value)
        else:
            rest.append((key, unquote(value)))
    if (table is None) == (query is None):
        raise _spec_error(
            dataset,
            shown,
            "needs exactly one of ?table=NAME or ?query=SELECT ... (query= last, taken verbatim)",
        )
    if table is not None and not table.strip():
        raise _spec_error(dataset, shown, "has an empty table= name")
    if query is not None and not query.strip():
        raise _spec_error(dataset, shown, "has an empty query=")
    return table, query, rest


def _spec_error(dataset: str, shown: str, what: str) -> SourceError:
    return SourceError(f"dataset {dataset}: the source {shown} {what}", details={"dataset": dataset, "source": shown})


def redact_uri(uri: str) -> str:
    """A PostgreSQL URI as shown in descriptions and errors: scheme, user, host, port and database;
    no password, no parameters."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://(unparsable URI)"
    user = f"{parts.username}@" if parts.username else ""
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def _parse(text: str, dataset: str) -> _Spec:
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        shown = redact_uri(text)
        base, _, params = text.partition("?")
        table, query, rest = _split_params(dataset, params, shown=shown)
        try:
            inline = urlsplit(base).password is not None
        except ValueError:
            inline = False
        if inline or any(key.lower() == "password" for key, _ in rest):
            logger.warning("dataset %s: the source URI carries a password; prefer PGPASSWORD or ~/.pgpass", dataset)
        libpq = base + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in rest) if rest else "")
        return _Spec("postgresql", libpq, table, query)
    if scheme in ("sqlite", "duckdb"):
        prefix = f"{scheme}:///"
        if not text.lower().startswith(prefix):
            raise _spec_error(
                dataset,
                text.partition("?")[0],
                f"is not of the form {scheme}:///PATH?table=NAME (three slashes, then a relative path, "
                f"or a fourth slash for an absolute one)",
            )
        path, _, params = text[len(prefix) :].partition("?")
        table, query, rest = _split_params(dataset, params, shown=f"{prefix}{path}")
        if rest:
            raise _spec_error(dataset, f"{prefix}{path}", f"has unknown parameters: {', '.join(k for k, _ in rest)}")
        if scheme == "sqlite" and query is not None:
            raise _spec_error(
                dataset, f"{prefix}{path}", "uses query=, which SQLite sources do not support; use table="
            )
        return _Spec(scheme, path, table, query)
    path, _, params = text.partition("?")
    table, query, rest = _split_params(dataset, params, shown=path)
    if rest:
        raise _spec_error(dataset, path, f"has unknown parameters: {', '.join(k for k, _ in rest)}")
    kind = _sniff(Path(path), dataset)
    if kind == "sqlite" and query is not None:
        raise _spec_error(dataset, path, "uses query=, which SQLite sources do not support; use table=")
    return _Spec(kind, path, table, query)


def _sniff(path: Path, dataset: str) -> str:
    """ "duckdb" or "sqlite", from the file's header."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise SourceError(
            f"dataset {dataset}: database file not found: {path}", details={"dataset": dataset, "path": str(path)}
        ) from None
    except OSError as exc:
        raise SourceError(
            f"dataset {dataset}: database file {path} cannot be read ({type(exc).__name__})",
            details={"dataset": dataset, "path": str(path)},
        ) from None
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite"
    if head[8:12] == _DUCKDB_MAGIC:
        return "duckdb"
    raise SourceError(
        f"dataset {dataset}: {path} is neither a DuckDB nor a SQLite database file",
        details={"dataset": dataset, "path": str(path)},
    )


def open_database(text: str, *, dataset: str) -> SqlSource:
    """The database source ``text`` names (see the module docstring). Connects to nothing yet."""
    spec = _parse(text, dataset)
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


# --- Filter translation -----------------------------------------------------------------------


@dataclass(frozen=True)
class SqlFilter:
    """A plan's filter split for one database: ``where`` (target dialect, literals replaced by
    placeholders) with its ``params`` in order, and the ``residual`` conditions the database cannot
    evaluate exactly as DuckDB does (DuckDB SQL, applied locally), with the columns they read."""

    where: str | None
    params: tuple[object, ...]
    residual: str | None
    residual_columns: tuple[str, ...]


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)
_ORDERING = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Between)
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INT64 = (-(2**63), 2**63 - 1)


def _category(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_float64(t):  # a FLOAT32 column against a literal compares differently
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_date32(t):
        return "date"
    return None


class _Translator:
    """Decides, per condition, whether a database evaluates it exactly as DuckDB would, and renders
    it with placeholders. ``dialect`` is sqlglot's: "postgres", "sqlite" or "duckdb"."""

    def __init__(self, schema: pa.Schema, dialect: str, pushable: frozenset[str] | None = None):
        self.dialect = dialect
        self.types: dict[str, str | None] = {}
        for field in schema:
            unique = len(schema.get_all_field_indices(field.name)) == 1
            allowed = pushable is None or field.name in pushable
            self.types[field.name] = _category(field.type) if unique and allowed else None

    # - which conditions

    def pushable(self, node: exp.Expr) -> bool:
        if isinstance(node, exp.Paren):
            return self.pushable(node.this)
        if isinstance(node, exp.And | exp.Or):
            return self.pushable(node.this) and self.pushable(node.expression)
        if isinstance(node, exp.Not):
            return self.pushable(node.this)
        if isinstance(node, exp.Column):  # a bare boolean column
            return self._column_type(node) == "bool"
        if isinstance(node, exp.Boolean):
            return True
        if isinstance(node, exp.Is):
            return self._column_type(node.this) is not None and isinstance(node.expression, exp.Null)
        if isinstance(node, _COMPARISONS):
            return self._compatible(node.this, node.expression, ordering=isinstance(node, _ORDERING))
        if isinstance(node, exp.Between):
            return self._compatible(node.this, node.args["low"], ordering=True) and self._compatible(
                node.this, node.args["high"], ordering=True
            )
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None or node.args.get("field"):
                return False
            items = node.expressions
            return bool(items) and all(self._compatible(node.this, item, ordering=False) for item in items)
        if isinstance(node, exp.Like):
            if node.args.get("escape") is not None or self.dialect == "sqlite":
                return False  # SQLite's LIKE ignores ASCII case
            pattern = node.expression
            if not (isinstance(pattern, exp.Literal) and pattern.is_string):
                return False
            if self.dialect == "postgres" and "\\" in pattern.this:
                return False  # PostgreSQL's LIKE escapes with a backslash by default, DuckDB's does not
            return self._column_type(node.this) == "string"
        return False

    def _column_type(self, node: exp.Expression) -> str | None:
        if not isinstance(node, exp.Column) or node.table:
            return None
        return self.types.get(node.name)

    def _literal_type(self, node: exp.Expression, column: str) -> str | None:
        value = _literal_value(node)
        if value is _NOT_LITERAL:
            return None
        if isinstance(value, bool):
            return "bool"
        if isinstance(value, int):
            return "int" if _INT64[0] <= value <= _INT64[1] else None
        if isinstance(value, float):
            return "float"
        if isinstance(value, datetime.date):
            return "date"
        if isinstance(value, str):
            # DuckDB casts a string literal to the type of the DATE column it is compared with.
            if column == "date" and _DATE_TEXT.match(value) and _iso_date(value) is not None:
                return "date"
            return "string"
        return None

    def _compatible(self, left: exp.Expression, right: exp.Expression, *, ordering: bool) -> bool:
        lt, rt = self._column_type(left), self._column_type(right)
        if lt is None and rt is None:
            return False
        if isinstance(left, exp.Null) or isinstance(right, exp.Null):
            return True  # NULL in a comparison: NULL everywhere
        column = lt if lt is not None else rt
        other = right if lt is not None else left
        assert column is not None
        if self._column_type(other) is not None:
            kind: str | None = self._column_type(other)
        else:
            kind = self._literal_type(other, column)
        if kind is None:
            return False
        if column == "date" and self.dialect == "sqlite":
            return False
        if column == kind:
            return True
        # A FLOAT column against an integer literal compares as DOUBLE in DuckDB as here; an INTEGER
        # column against a fractional literal compares as DECIMAL in DuckDB: not pushed.
        return column == "float" and kind == "int"

    # - rendering

    def render(self, node: exp.Expr) -> tuple[str, tuple[object, ...]]:
        tree = node.copy()
        params: list[object] = []
        self._collate(tree)
        tree = tree.transform(lambda n: self._bind(n, params), copy=False)
        return tree.sql(self.dialect), tuple(params)

    def _bind(self, node: exp.Expression, params: list[object]) -> exp.Expression:
        if isinstance(node, exp.Column):
            return exp.Column(this=exp.to_identifier(node.name, quoted=True))
        value = _literal_value(node)
        if value is _NOT_LITERAL:
            return node
        parent = node.parent
        column = None
        if parent is not None:
            for side in (parent.this, parent.args.get("expression")):
                if isinstance(side, exp.Column | exp.Collate):
                    column = self._column_type(side.this if isinstance(side, exp.Collate) else side)
        if isinstance(value, str) and column == "date":
            value = _iso_date(value)
        elif isinstance(value, int) and not isinstance(value, bool) and column == "float":
            value = float(value)
        params.append(value)
        if self.dialect == "postgres":
            return exp.Parameter(this=exp.Literal.number(len(params)))
        return exp.Placeholder()

    def _collate(self, tree: exp.Expr) -> None:
        """Compare strings byte-wise, as the local DuckDB filter does, whatever collation a column
        was declared with: ``COLLATE "C"`` for PostgreSQL (a nondeterministic ICU collation makes even
        ``=`` and ``IN`` case-insensitive), ``COLLATE C`` for DuckDB (a column may be ``NOCASE``),
        ``COLLATE BINARY`` for SQLite. Every string comparison, equality included: a row the plan's
        filter excludes must never leave the owner."""
        collation = {
            "postgres": lambda: exp.Identifier(this="C", quoted=True),
            "duckdb": lambda: exp.var("C"),
        }.get(self.dialect, lambda: exp.var("BINARY"))
        for node in list(tree.find_all(*_COMPARISONS, exp.Between, exp.In, exp.Like)):
            for key in ("this", "expression"):
                side = node.args.get(key)
                if isinstance(side, exp.Column) and self._column_type(side) == "string":
                    side.replace(exp.Collate(this=side.copy(), expression=collation()))


class _NotLiteral:
    pass


_NOT_LITERAL: Any = _NotLiteral()


def _literal_value(node: exp.Expression) -> object:
    """A Python value for a literal node (number, string, boolean, ``DATE 'x'``), else _NOT_LITERAL."""
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    negative = False
    if isinstance(node, exp.Neg):
        negative, node = True, node.this
        if not (isinstance(node, exp.Literal) and not node.is_string):
            return _NOT_LITERAL
    if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal) and node.this.is_string:
        if node.to.is_type(exp.DataType.Type.DATE) and _DATE_TEXT.match(node.this.this):
            date = _iso_date(node.this.this)
            return _NOT_LITERAL if date is None else date
        return _NOT_LITERAL
    if not isinstance(node, exp.Literal):
        return _NOT_LITERAL
    if node.is_string:
        return node.this
    text = node.this
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return _NOT_LITERAL
    return -number if negative else number


def _iso_date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        return None


def _conjuncts(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.Paren) and isinstance(node.this, exp.And):
        return _conjuncts(node.this)
    if isinstance(node, exp.And):
        return [*_conjuncts(node.this), *_conjuncts(node.expression)]
    return [node]


def translate_filter(
    predicate: str, schema: pa.Schema, *, dialect: str, pushable: frozenset[str] | None = None
) -> SqlFilter:
    """Split ``predicate`` (DuckDB SQL over ``schema``'s column names, as the planner pushes it) into
    what a ``dialect`` database evaluates exactly as DuckDB does (rendered with placeholders, every
    literal a parameter) and the residual (DuckDB SQL, applied by the caller). Only conditions on
    the ``pushable`` columns (all when None) can go to the database."""
    tree = sqlglot.parse_one(predicate, read="duckdb")
    for node in tree.walk():  # an analyst's SQL comments are free text: they do not reach the database
        node.comments = None
    translator = _Translator(schema, dialect, pushable)
    pushed: list[exp.Expr] = []
    kept: list[exp.Expr] = []
    for conjunct in _conjuncts(tree):
        (pushed if translator.pushable(conjunct) else kept).append(conjunct)
    where: str | None = None
    params: tuple[object, ...] = ()
    if pushed:
        where, params = translator.render(exp.and_(*(exp.paren(c, copy=True) for c in pushed)))
    residual: str | None = None
    columns: list[str] = []
    if kept:
        node = exp.and_(*(exp.paren(c, copy=True) for c in kept))
        for col in node.find_all(exp.Column):
            if col.name not in columns:
                columns.append(col.name)
        residual = node.sql("duckdb")
    return SqlFilter(where, params, residual, tuple(columns))


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
        from connectors.sources import _check_batch_rows, _physical, _resolve_columns

        _check_batch_rows(self, batch_rows)
        schema = self.schema
        names = _resolve_columns(self, schema, columns)
        read = _physical(names, schema) or schema.names
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
        from connectors.sources import _check_batch_rows, _resolve_columns, filter_batches

        _check_batch_rows(self, batch_rows)
        current = self.schema if schema is None or self._pushable is None else None
        schema = schema if schema is not None else current
        assert schema is not None
        names = _resolve_columns(self, schema, columns) or []
        sql_filter = translate_filter(predicate, schema, dialect=self.dialect, pushable=self._pushable)
        read = list(names)
        for column in sql_filter.residual_columns:
            if column not in read:
                read.append(column)
        if not read:
            read = schema.names[:1]
        _resolve_columns(self, schema, read)
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
        from connectors.sources import _select, _sliced

        target = pa.schema([schema.field(c) for c in read])
        sql = self.select_sql(read, where)
        with self._errors(read):
            for batch in self._stream(sql, params, batch_rows):
                yield from _sliced(_select(self._conform(batch, target), names), batch_rows)

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
        import adbc_driver_sqlite.dbapi

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
        import adbc_driver_sqlite

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
        import adbc_driver_manager

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
        import adbc_driver_postgresql.dbapi

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
        import adbc_driver_postgresql

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
        import adbc_driver_manager

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
