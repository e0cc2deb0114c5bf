"""Database source specs: which texts name a database (a URI, or a database file with ``?table=`` or
``?query=``), how a relative path in one is made absolute, how one is parsed, and how a PostgreSQL URI
is shown (:func:`redact_uri`: never its password). The forms are listed in
:mod:`connectors.sources.databases`. Nothing here connects to anything; a file's header is read
only to tell DuckDB from SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sealroom.errors import SourceError

DATABASE_FILE_SUFFIXES = (".duckdb", ".ddb", ".sqlite", ".sqlite3", ".db")
_SCHEMES = ("postgresql", "postgres", "sqlite", "duckdb")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_DUCKDB_MAGIC = b"DUCK"  # at offset 8


@dataclass(frozen=True)
class DatabaseSpec:
    """A parsed database source spec."""

    kind: str  # "postgresql" | "sqlite" | "duckdb"
    target: str  # libpq URI without table/query (postgresql), or the file path
    table: str | None
    query: str | None
    password_in_uri: bool = False  # a PostgreSQL URI that carries a password (the caller warns)


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


def parse_database_spec(text: str, dataset: str) -> DatabaseSpec:
    """The parts of a database source spec (see :mod:`connectors.sources.databases`); SourceError
    naming what is wrong with it."""
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres"):
        shown = redact_uri(text)
        base, _, params = text.partition("?")
        table, query, rest = _split_params(dataset, params, shown=shown)
        try:
            inline = urlsplit(base).password is not None
        except ValueError:
            inline = False
        password = inline or any(key.lower() == "password" for key, _ in rest)
        libpq = base + ("?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in rest) if rest else "")
        return DatabaseSpec("postgresql", libpq, table, query, password_in_uri=password)
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
        return DatabaseSpec(scheme, path, table, query)
    path, _, params = text.partition("?")
    table, query, rest = _split_params(dataset, params, shown=path)
    if rest:
        raise _spec_error(dataset, path, f"has unknown parameters: {', '.join(k for k, _ in rest)}")
    kind = _sniff(Path(path), dataset)
    if kind == "sqlite" and query is not None:
        raise _spec_error(dataset, path, "uses query=, which SQLite sources do not support; use table=")
    return DatabaseSpec(kind, path, table, query)


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
