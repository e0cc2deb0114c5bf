"""Data sources: where a data owner's rows come from.

:func:`open_source` turns a spec (a file or directory path, a database URI -- see
:mod:`connectors.sources.databases` --, a pyarrow Table, a pandas DataFrame, or any object exporting
``__arrow_c_stream__``) into a :class:`~connectors.sources.base.Source`: a schema that can be read on
its own, and a stream of Arrow record batches projected to the columns a plan asks for, in the order
it asks for them, at most ``batch_rows`` rows each. Files and databases are streamed, so a job holds a
few batches in memory, never the whole table; a column that is not asked for is not decoded (for
CSV, not even converted). :func:`resolve_spec` makes a spec's relative paths absolute.

This module only decides which kind of source a spec is. The kinds live in ``base`` (the
:class:`~connectors.sources.base.Source` protocol, schema checks, filtering here, the shared
helpers), ``files`` (CSV/TSV, Parquet, Arrow IPC), ``memory`` (Arrow tables, DataFrames, Arrow
streams), ``databases`` (DuckDB, SQLite, PostgreSQL), with ``database_uris`` (their URIs) and
``pushdown`` (what part of a filter a database evaluates).

Filtering: a source that can filter in its own engine implements
:class:`~connectors.sources.base.FilterPushdown` (the SQL sources do: the database receives the
projection and the WHERE, its literals as parameters); for the others
:func:`~connectors.sources.base.filter_batches` applies the plan's filter here, with a locked-down
DuckDB, batch by batch. Either way the predicate has WHERE semantics (NULL drops the row).

Security model: this package runs on the data owner's machine and sees raw rows; it reveals none of
them. Its errors (:class:`~sealroom.errors.SourceError`) and log lines name the dataset, the file,
columns, types and row numbers only. pyarrow's own messages quote offending cells, so they are read
for structure (a row or column number) and never copied, logged or chained (``raise ... from None``);
the error keeps only the pyarrow exception's type name.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from connectors.sources.base import Source, not_found_error
from connectors.sources.database_uris import is_database_spec, resolve_database_spec
from connectors.sources.databases import open_database
from connectors.sources.files import ArrowIpcSource, CsvSource, ParquetSource
from connectors.sources.memory import PandasSource, StreamSource, TableSource
from sealroom.errors import SourceError

if TYPE_CHECKING:
    import pandas

__all__ = ["SUPPORTED_KINDS", "open_source", "resolve_spec"]

logger = logging.getLogger(__name__)

SUPPORTED_KINDS = (
    "CSV (.csv, .csv.gz), TSV (.tsv, .tsv.gz), Parquet (.parquet, .pq, or a directory of Parquet "
    "files, hive partitioning supported), Arrow IPC (.arrow, .feather, .ipc), a DuckDB or SQLite "
    "database file (PATH.duckdb?table=NAME, duckdb:///PATH?table=NAME or ?query=SELECT..., "
    "sqlite:///PATH?table=NAME), PostgreSQL (postgresql://USER@HOST:PORT/DB?table=NAME or "
    "?query=SELECT...), a pyarrow Table, a pandas DataFrame, or an object with __arrow_c_stream__"
)

_PathOpener = Callable[[Path, str], Source]

# File kinds by name suffix (case-insensitive); the first match wins.
_FILE_KINDS: tuple[tuple[str, _PathOpener], ...] = (
    (".csv", lambda path, dataset: CsvSource(path, dataset=dataset)),
    (".csv.gz", lambda path, dataset: CsvSource(path, dataset=dataset)),
    (".tsv", lambda path, dataset: CsvSource(path, dataset=dataset, delimiter="\t")),
    (".tsv.gz", lambda path, dataset: CsvSource(path, dataset=dataset, delimiter="\t")),
    (".parquet", lambda path, dataset: ParquetSource(path, dataset=dataset)),
    (".pq", lambda path, dataset: ParquetSource(path, dataset=dataset)),
    (".arrow", lambda path, dataset: ArrowIpcSource(path, dataset=dataset)),
    (".feather", lambda path, dataset: ArrowIpcSource(path, dataset=dataset)),
    (".ipc", lambda path, dataset: ArrowIpcSource(path, dataset=dataset)),
)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def open_source(spec: str | os.PathLike[str] | pa.Table | pandas.DataFrame | object, *, dataset: str) -> Source:
    """Open ``spec`` as the source of ``dataset`` ("party.name"); see :data:`SUPPORTED_KINDS`.

    Opening reads nothing but, for in-memory specs, the schema; a missing file, an unsupported kind or
    an unusable object raises :class:`SourceError`.
    """
    if not isinstance(dataset, str) or not dataset:
        raise SourceError("a source needs a dataset name such as 'party.name'", details={"dataset": ""})
    source = _opener_for(spec, dataset)()
    logger.debug("dataset %s: opened %s", dataset, source.description)
    return source


def _opener_for(spec: object, dataset: str) -> Callable[[], Source]:
    """The one place that decides what kind of source a spec is."""
    if isinstance(spec, pa.Table):
        return partial(TableSource, spec, dataset=dataset)
    if isinstance(spec, pa.RecordBatch):
        return partial(TableSource, pa.Table.from_batches([spec]), dataset=dataset)
    if _is_pandas_frame(spec):
        return partial(PandasSource, spec, dataset=dataset)
    if isinstance(spec, str | os.PathLike):
        text = os.fsdecode(spec)
        if is_database_spec(text):
            return partial(open_database, text, dataset=dataset)
        if _URI.match(text):
            raise _unsupported(dataset, f"a URI with scheme {text.split(':', 1)[0]!r}")
        path = Path(text)
        if not path.exists():
            raise not_found_error(dataset, path)
        if path.is_dir():
            return partial(ParquetSource, path, dataset=dataset)
        name = path.name.lower()
        for suffix, opener in _FILE_KINDS:
            if name.endswith(suffix):
                return partial(opener, path, dataset)
        raise _unsupported(dataset, f"file {path}", path=str(path))
    if hasattr(spec, "__arrow_c_stream__"):
        return partial(StreamSource, spec, dataset=dataset)
    kind = type(spec)
    raise _unsupported(dataset, f"an object of type {kind.__module__}.{kind.__qualname__}")


def resolve_spec(spec: str, base: Path) -> str:
    """A source spec as written in a config file or on the command line, with a relative file path
    (``data/a.csv``, ``x.duckdb?table=t``, ``sqlite:///b.db?table=t``) made absolute against
    ``base``; network URIs are returned unchanged."""
    if is_database_spec(spec):
        return resolve_database_spec(spec, base)
    if _URI.match(spec):
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _is_pandas_frame(spec: object) -> bool:
    # A DataFrame can only exist once pandas is imported; checking sys.modules keeps pandas unloaded
    # for every other spec.
    if "pandas" not in sys.modules:
        return False
    import pandas

    return isinstance(spec, pandas.DataFrame)


def _unsupported(dataset: str, what: str, **details: str) -> SourceError:
    return SourceError(
        f"dataset {dataset}: {what} is not a supported source; supported: {SUPPORTED_KINDS}",
        details={"dataset": dataset, **details},
    )
