"""Data sources: where a data owner's rows come from.

:func:`open_source` turns a spec (a file or directory path, a database URI -- see
:mod:`connectors.sources.databases` --, a pyarrow Table, a pandas DataFrame, or any object exporting
``__arrow_c_stream__``) into a :class:`Source`: a schema that can be read on its own, and a stream of
Arrow record batches projected to the columns a plan asks for, in the order it asks for them, at most
``batch_rows`` rows each. Files and databases are streamed, so a job holds a few batches in memory,
never the whole table; a column that is not asked for is not decoded (for CSV, not even converted).

Filtering: a source that can filter in its own engine implements :class:`FilterPushdown` (the SQL
sources do: the database receives the projection and the WHERE, its literals as parameters); for the
others :func:`filter_batches` applies the plan's filter here, with a locked-down DuckDB, batch by
batch. Either way the predicate has WHERE semantics (NULL drops the row).

Security model: this module runs on the data owner's machine and sees raw rows; it reveals none of
them. Its errors (:class:`~sealroom.errors.SourceError`) and log lines name the dataset, the file,
columns, types and row numbers only. pyarrow's own messages quote offending cells, so they are read
for structure (a row or column number) and never copied, logged or chained (``raise ... from None``);
the error keeps only the pyarrow exception's type name.

CSV conventions: the first block of the file (``block_size`` bytes, 1 MiB by default) fixes each
column's type, and a later value that does not convert is an error naming its row, never a silent
null. pyarrow's null markers (empty, ``NA``, ``NULL``, ``NaN``...) apply to every unquoted field,
strings included; a quoted field is always a string, so ``""`` stays an empty string.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.ipc as paipc

from connectors.sources.databases import is_database_spec, open_database, resolve_database_spec
from sealroom.duck import locked_connection
from sealroom.errors import SourceError

if TYPE_CHECKING:
    import pandas

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_CSV_BLOCK_SIZE",
    "SUPPORTED_KINDS",
    "Source",
    "CsvSource",
    "ParquetSource",
    "ArrowIpcSource",
    "TableSource",
    "PandasSource",
    "StreamSource",
    "FilterPushdown",
    "open_source",
    "resolve_spec",
    "check_schema",
    "filter_batches",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 131_072
DEFAULT_CSV_BLOCK_SIZE = 1 << 20

# Parquet scans read ahead this many batches and files: enough to overlap I/O and decoding, few
# enough that memory stays a small multiple of one row group of the requested columns.
_PARQUET_BATCH_READAHEAD = 2
_PARQUET_FRAGMENT_READAHEAD = 1

_ARROW_ERRORS = (pa.ArrowException, OSError)


@runtime_checkable
class Source(Protocol):
    """One dataset as its owner holds it.

    ``dataset`` ("party.name") and ``description`` ("parquet file data/a.parquet") are public and
    carry no data.
    """

    dataset: str
    description: str

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema, read without reading the rows (CSV: inferred from the first block)."""
        ...

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows as batches of at most ``batch_rows`` rows, holding only the requested
        columns (all when ``None``) in the requested order. Column names are checked before the
        iterator is returned: one that does not exist raises :class:`SourceError`."""
        ...


@runtime_checkable
class FilterPushdown(Protocol):
    """A source that filters in its own engine (a database): the optional capability the party agent
    uses, when a source has it, instead of :func:`filter_batches`."""

    def filtered_batches(
        self,
        columns: Sequence[str],
        predicate: str,
        *,
        schema: pa.Schema | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """The rows that satisfy ``predicate`` (DuckDB SQL over the dataset's own column names, as
        :func:`sealroom.planning.sql.pushdown` renders it; WHERE semantics: NULL drops the row), projected
        to ``columns`` in that order. Literals reach the engine as bound parameters only."""
        ...


# --- Files ------------------------------------------------------------------------------------


class CsvSource:
    """A CSV or TSV file, optionally gzip-compressed (``.gz``), read block by block."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dataset: str,
        delimiter: str = ",",
        block_size: int = DEFAULT_CSV_BLOCK_SIZE,
    ) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.delimiter = delimiter
        self.block_size = block_size
        self.kind = "TSV" if delimiter == "\t" else "CSV"
        self.description = f"{self.kind} file {path}"

    @property
    def schema(self) -> pa.Schema:
        with self._reader(None, None) as reader:
            return reader.schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        schema = self.schema
        names = _resolve_columns(self, schema, columns)
        return self._batches(schema, names, batch_rows)

    def _batches(self, schema: pa.Schema, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._reader(_physical(names, schema), schema) as reader:
            for batch in _pull(reader, partial(self._error, schema=schema)):
                yield from _sliced(_select(batch, names), batch_rows)

    @contextlib.contextmanager
    def _reader(self, include: list[str] | None, schema: pa.Schema | None) -> Iterator[pa.RecordBatchReader]:
        _check_exists(self, self.path)
        read_options = pacsv.ReadOptions(
            block_size=self.block_size,
            # The serial reader is as fast for one stream and is the one that reports row numbers.
            use_threads=False,
        )
        parse_options = pacsv.ParseOptions(delimiter=self.delimiter)
        convert_options = pacsv.ConvertOptions(
            include_columns=include,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )
        try:
            stream = pa.input_stream(str(self.path))  # decompresses by extension (.gz)
        except _ARROW_ERRORS as exc:
            raise self._error(exc, schema=schema) from None
        with stream:
            try:
                reader = pacsv.open_csv(
                    stream,
                    read_options=read_options,
                    parse_options=parse_options,
                    convert_options=convert_options,
                )
            except _ARROW_ERRORS as exc:
                raise self._error(exc, schema=schema) from None
            try:
                yield reader
            finally:
                reader.close()

    def _error(self, exc: BaseException, *, schema: pa.Schema | None) -> SourceError:
        # pyarrow's text quotes the offending row or cell: only numbers are taken from it.
        text = str(exc)
        details: dict[str, Any] = {"dataset": self.dataset, "path": str(self.path)}
        where = f"dataset {self.dataset}: {self.description}"
        if row := _CSV_ROW.search(text):
            details["row"] = int(row[1])
            where += f", row {details['row']} (the header is row 1)"
        fields = _CSV_FIELD_COUNT.search(text)
        column = _CSV_COLUMN.search(text)
        if fields:
            details["expected_fields"], details["found_fields"] = int(fields[1]), int(fields[2])
            message = (
                f"{where}: expected {fields[1]} fields, found {fields[2]}; fix the row (a value that "
                f"contains the delimiter or a line break must be quoted)"
            )
        elif "conversion error" in text and column:
            index = int(column[1])
            if schema is not None and index < len(schema):
                field = schema.field(index)
                details["column"], details["type"] = field.name, str(field.type)
                what = f"column {field.name!r} has a value that does not convert to {field.type}"
            else:
                what = f"column number {index + 1} has a value that does not convert to its type"
            message = (
                f"{where}: {what}, the type inferred from the first {self.block_size} bytes of the "
                f"file; fix the value, or convert the file to Parquet with an explicit schema"
            )
        elif text.startswith("Empty CSV file"):
            message = f"{where}: the file is empty; a {self.kind} source needs at least a header row"
        else:
            details["cause"] = type(exc).__name__
            message = f"{where}: the file could not be read as {self.kind} ({type(exc).__name__})"
        return SourceError(message, details=details)


_CSV_ROW = re.compile(r"\bRow #(\d+)")
_CSV_COLUMN = re.compile(r"\bcolumn #(\d+)")
_CSV_FIELD_COUNT = re.compile(r"\bExpected (\d+) columns, got (\d+)")


class ParquetSource:
    """A Parquet file, or a directory of Parquet files with optional hive partitioning
    (``region=eu/part-0.parquet``: ``region`` becomes a column)."""

    def __init__(self, path: str | os.PathLike[str], *, dataset: str) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.is_directory = self.path.is_dir()
        self.description = f"parquet {'directory' if self.is_directory else 'file'} {path}"

    @property
    def schema(self) -> pa.Schema:
        return self._open().schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        dataset = self._open()
        names = _resolve_columns(self, dataset.schema, columns)
        return self._batches(dataset, names, batch_rows)

    def _batches(self, dataset: pads.Dataset, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        try:
            scan = dataset.to_batches(
                columns=_physical(names, dataset.schema),
                batch_size=batch_rows,
                batch_readahead=_PARQUET_BATCH_READAHEAD,
                fragment_readahead=_PARQUET_FRAGMENT_READAHEAD,
            )
        except _ARROW_ERRORS as exc:
            raise self._error(exc) from None
        for batch in _pull(scan, self._error):
            yield from _sliced(_select(batch, names), batch_rows)

    def _open(self) -> pads.Dataset:
        _check_exists(self, self.path)
        # Without pre-buffering a scan holds the row group it decodes, not every requested column
        # chunk of the file.
        file_format = pads.ParquetFileFormat(
            default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False)
        )
        try:
            dataset = pads.dataset(
                str(self.path), format=file_format, partitioning="hive" if self.is_directory else None
            )
        except _ARROW_ERRORS as exc:
            raise self._error(exc) from None
        if self.is_directory and not dataset.files:
            raise SourceError(
                f"dataset {self.dataset}: {self.description} contains no parquet files",
                details={"dataset": self.dataset, "path": str(self.path)},
            )
        return dataset

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: {self.description} could not be read as Parquet "
            f"({type(exc).__name__}); check that every file is a complete Parquet file with the same schema",
            details={"dataset": self.dataset, "path": str(self.path), "cause": type(exc).__name__},
        )


class ArrowIpcSource:
    """An Arrow IPC file (``.arrow``, Feather v2) or, failing that, an Arrow IPC stream, memory-mapped
    so that batches are read in place."""

    def __init__(self, path: str | os.PathLike[str], *, dataset: str) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self.description = f"Arrow IPC file {path}"

    @property
    def schema(self) -> pa.Schema:
        with self._reader(None) as (schema, _):
            return schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        schema = self.schema
        names = _resolve_columns(self, schema, columns)
        physical = _physical(names, schema)
        included = None if physical is None else sorted(schema.get_field_index(n) for n in physical)
        if included is not None and len(included) == len(schema):
            included = None  # every column: read batches in place from the memory map, no copy
        return self._batches(included, names, batch_rows)

    def _batches(
        self, included: list[int] | None, names: list[str] | None, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        with self._reader(included) as (_, batches):
            for batch in _pull(batches, self._error):
                batch.validate()
                yield from _sliced(_select(batch, names), batch_rows)

    @contextlib.contextmanager
    def _reader(self, included: list[int] | None) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
        _check_exists(self, self.path)
        options = paipc.IpcReadOptions(included_fields=included)
        try:
            mapped = pa.memory_map(str(self.path))
        except _ARROW_ERRORS as exc:
            raise self._error(exc) from None
        with mapped:
            try:
                file_reader = paipc.open_file(mapped, options=options)
            except _ARROW_ERRORS:
                file_reader = None
            if file_reader is not None:
                n = file_reader.num_record_batches
                yield file_reader.schema, map(file_reader.get_batch, range(n))
                return
            try:
                mapped.seek(0)
                stream_reader = paipc.open_stream(mapped, options=options)
            except _ARROW_ERRORS as exc:
                raise self._error(exc) from None
            try:
                yield stream_reader.schema, iter(stream_reader)
            finally:
                stream_reader.close()

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: {self.path} could not be read as an Arrow IPC file or stream "
            f"({type(exc).__name__}); Feather v1 files must be rewritten as Arrow IPC (Feather v2)",
            details={"dataset": self.dataset, "path": str(self.path), "cause": type(exc).__name__},
        )


# --- In memory ------------------------------------------------------------------------------


class TableSource:
    """A pyarrow Table (or RecordBatch) already in memory; read as often as wanted, without copies."""

    def __init__(self, table: pa.Table, *, dataset: str, description: str = "in-memory Arrow table") -> None:
        self.table = table
        self.dataset = dataset
        self.description = description

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        names = _resolve_columns(self, self.table.schema, columns)
        physical = _physical(names, self.table.schema)
        table = self.table if physical is None else self.table.select(physical)
        return (_select(batch, names) for batch in table.to_batches(max_chunksize=batch_rows))


class PandasSource:
    """A pandas DataFrame (its index is not a column), converted to Arrow one batch at a time.

    The schema is taken when the source is opened; column labels become strings, as in
    ``pyarrow.Table.from_pandas``.
    """

    def __init__(self, frame: pandas.DataFrame, *, dataset: str) -> None:
        self.frame = frame
        self.dataset = dataset
        self.description = "in-memory pandas DataFrame"
        self._labels = {str(label): label for label in frame.columns}
        if len(self._labels) != len(frame.columns):
            raise SourceError(
                f"dataset {dataset}: the DataFrame has duplicate column names; rename them",
                details={"dataset": dataset},
            )
        try:
            self._schema = pa.Schema.from_pandas(frame, preserve_index=False).remove_metadata()
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise self._error(exc) from None

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        names = _resolve_columns(self, self._schema, columns)
        physical = _physical(names, self._schema) or self._schema.names
        schema = pa.schema([self._schema.field(name) for name in physical])
        return self._batches(schema, names, batch_rows)

    def _batches(self, schema: pa.Schema, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        frame = self.frame[[self._labels[name] for name in schema.names]].set_axis(schema.names, axis=1)
        for start in range(0, len(frame), batch_rows):
            chunk = frame.iloc[start : start + batch_rows]
            try:
                batch = pa.RecordBatch.from_pandas(chunk, schema=schema, preserve_index=False)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise self._error(exc) from None
            yield _select(batch.replace_schema_metadata(None), names)

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: the DataFrame could not be converted to Arrow ({type(exc).__name__}); "
            f"give each column one type (object columns mixing types cannot be converted)",
            details={"dataset": self.dataset, "cause": type(exc).__name__},
        )


class StreamSource:
    """Any object exporting an Arrow C stream (``__arrow_c_stream__``: a RecordBatchReader, a polars
    or DuckDB result...). Such a stream is one-shot: :meth:`batches` can be called once."""

    def __init__(self, stream: object, *, dataset: str) -> None:
        self.dataset = dataset
        kind = type(stream)
        self.description = f"Arrow stream from {kind.__module__}.{kind.__qualname__}"
        try:
            self._reader = pa.RecordBatchReader.from_stream(stream)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise SourceError(
                f"dataset {dataset}: {self.description} could not be opened ({type(exc).__name__})",
                details={"dataset": dataset, "cause": type(exc).__name__},
            ) from None
        self._consumed = False

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    def batches(
        self, columns: Sequence[str] | None = None, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        _check_batch_rows(self, batch_rows)
        names = _resolve_columns(self, self._reader.schema, columns)
        if self._consumed:
            raise SourceError(
                f"dataset {self.dataset}: {self.description} is a one-shot stream and was already "
                f"read; open the source again from a fresh stream, or pass a pyarrow Table",
                details={"dataset": self.dataset},
            )
        self._consumed = True
        return self._batches(names, batch_rows)

    def _batches(self, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        try:
            for batch in _pull(self._reader, self._error):
                yield from _sliced(_select(batch, names), batch_rows)
        finally:
            self._reader.close()

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: reading {self.description} failed ({type(exc).__name__})",
            details={"dataset": self.dataset, "cause": type(exc).__name__},
        )


# --- Opening and checking ---------------------------------------------------------------------

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
            raise _not_found(dataset, path)
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


def check_schema(source: Source, expected: pa.Schema) -> None:
    """Raise :class:`SourceError` unless every column of ``expected`` (the registered schema) is in
    the source, once, with the same type.

    Extra source columns, column order, nullability and metadata are not compared; types are
    compared exactly (``string`` and ``large_string`` differ).
    """
    actual = source.schema
    problems: list[str] = []
    columns: list[str] = []
    for field in expected:
        matches = actual.get_all_field_indices(field.name)
        if len(matches) == 1 and actual.field(matches[0]).type.equals(field.type):
            continue
        columns.append(field.name)
        if not matches:
            problems.append(f"column {field.name}: registered as {field.type}, missing from the source")
        elif len(matches) > 1:
            problems.append(f"column {field.name}: appears {len(matches)} times in the source")
        else:
            found = actual.field(matches[0]).type
            problems.append(f"column {field.name}: registered as {field.type}, source now has {found}")
    if problems:
        raise SourceError(
            f"dataset {source.dataset}: {source.description} does not match its registered schema: "
            + "; ".join(problems)
            + "; restore the source or register the dataset again",
            details={"dataset": source.dataset, "columns": columns, "problems": problems},
        )


# --- Filtering here ---------------------------------------------------------------------------

_ROWS_VIEW = "__sr_rows"
_ROW_INDEX = "__sr_i"


def _filter_connection() -> duckdb.DuckDBPyConnection:
    """DuckDB as the enclave runs it: no file or network access, no extensions, locked settings."""
    return locked_connection()


def filter_batches(
    batches: Iterator[pa.RecordBatch],
    predicate: str,
    predicate_columns: Sequence[str],
    columns: Sequence[str],
    *,
    dataset: str,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``batches`` that satisfy ``predicate`` (DuckDB SQL over ``predicate_columns``),
    projected to ``columns``, batch by batch.

    DuckDB sees only the predicate's columns of one batch at a time (plus a row index) and returns
    the indices of the matching rows, so the rows kept keep their exact types (DuckDB does not
    round-trip every Arrow type) and memory stays a few batches. WHERE semantics (NULL drops the
    row), as in the enclave. A DuckDB error is reported by its kind only: its message can quote
    values.
    """
    query = f'SELECT "{_ROW_INDEX}" FROM "{_ROWS_VIEW}" WHERE {predicate} ORDER BY "{_ROW_INDEX}"'  # noqa: S608
    index = pa.array([], pa.int64())
    con = _filter_connection()
    try:
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            if len(index) < n:
                index = pa.array(range(max(n, 2 * len(index))), pa.int64())
            view = pa.RecordBatch.from_arrays(
                [*(batch.column(c) for c in predicate_columns), index.slice(0, n)],
                names=[*predicate_columns, _ROW_INDEX],
            )
            con.register(_ROWS_VIEW, view)
            try:
                matches = con.sql(query).to_arrow_table().column(0).combine_chunks()
            except duckdb.Error as exc:
                raise SourceError(
                    f"the filter of {dataset} failed in DuckDB ({type(exc).__name__}); check the query's "
                    "conditions on this dataset's columns and types",
                    details={"dataset": dataset, "error": type(exc).__name__},
                ) from None
            finally:
                con.unregister(_ROWS_VIEW)
            if len(matches):
                yield batch.select(list(columns)).take(matches)
    finally:
        con.close()


# --- Helpers ----------------------------------------------------------------------------------


def _is_pandas_frame(spec: object) -> bool:
    # A DataFrame can only exist once pandas is imported; checking sys.modules keeps pandas unloaded
    # for every other spec.
    if "pandas" not in sys.modules:
        return False
    import pandas

    return isinstance(spec, pandas.DataFrame)


def _not_found(dataset: str, path: Path) -> SourceError:
    return SourceError(f"dataset {dataset}: file not found: {path}", details={"dataset": dataset, "path": str(path)})


def _unsupported(dataset: str, what: str, **details: str) -> SourceError:
    return SourceError(
        f"dataset {dataset}: {what} is not a supported source; supported: {SUPPORTED_KINDS}",
        details={"dataset": dataset, **details},
    )


def _check_exists(source: Source, path: Path) -> None:
    if not path.exists():
        raise _not_found(source.dataset, path)


def _check_batch_rows(source: Source, batch_rows: int) -> None:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise SourceError(
            f"dataset {source.dataset}: batch_rows must be a positive integer",
            details={"dataset": source.dataset},
        )


def _resolve_columns(source: Source, schema: pa.Schema, columns: Sequence[str] | None) -> list[str] | None:
    """The requested column names, checked against ``schema``; ``None`` means every column."""
    if columns is None:
        return None
    details: dict[str, Any] = {"dataset": source.dataset}
    if isinstance(columns, str | bytes):
        raise SourceError(
            f"dataset {source.dataset}: columns must be a sequence of column names, not one string",
            details=details,
        )
    names = list(columns)
    available = schema.names
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise SourceError(
                f"dataset {source.dataset}: column names must be strings, got {type(name).__name__}",
                details=details,
            )
        details["column"] = name
        if name in names[:position]:
            raise SourceError(f"dataset {source.dataset}: column {name!r} is requested twice", details=details)
        count = available.count(name)
        if count == 0:
            close = difflib.get_close_matches(name, available, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SourceError(
                f"dataset {source.dataset}: column {name!r} does not exist in {source.description}{hint}; "
                f"available columns: {_listing(available)}",
                details={**details, "available": available},
            )
        if count > 1:
            raise SourceError(
                f"dataset {source.dataset}: column {name!r} appears {count} times in "
                f"{source.description}; rename the duplicates",
                details=details,
            )
    return names


def _listing(names: list[str], limit: int = 50) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _physical(names: list[str] | None, schema: pa.Schema) -> list[str] | None:
    """The columns to read for ``names``: with no column requested, the first one, so that batches
    still carry their row counts."""
    if names is None or names:
        return names
    return schema.names[:1]


def _select(batch: pa.RecordBatch, names: list[str] | None) -> pa.RecordBatch:
    return batch if names is None else batch.select(names)


def _sliced(batch: pa.RecordBatch, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if batch.num_rows <= batch_rows:
        yield batch
        return
    for offset in range(0, batch.num_rows, batch_rows):
        yield batch.slice(offset, batch_rows)


def _pull(
    items: Iterator[pa.RecordBatch] | pa.RecordBatchReader, wrap: Callable[[BaseException], SourceError]
) -> Iterator[pa.RecordBatch]:
    """Iterate ``items``, turning pyarrow's errors (whose text may quote data) into ``wrap(exc)``
    without chaining them."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except _ARROW_ERRORS as exc:
            raise wrap(exc) from None
        yield item
