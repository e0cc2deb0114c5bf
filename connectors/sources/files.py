"""File sources: CSV/TSV (optionally gzip-compressed), Parquet (a file, or a directory with hive
partitioning) and Arrow IPC files or streams, each streamed batch by batch with only the requested
columns decoded (for CSV, not even converted).

CSV conventions: the first block of the file (``block_size`` bytes, 1 MiB by default) fixes each
column's type, and a later value that does not convert is an error naming its row, never a silent
null. pyarrow's null markers (empty, ``NA``, ``NULL``, ``NaN``...) apply to every unquoted field,
strings included; a quoted field is always a string, so ``""`` stays an empty string.

Security model: as :mod:`connectors.sources.base`. pyarrow's messages quote offending cells, so they
are read for structure (a row or column number) and never copied, logged or chained; an error keeps
only the pyarrow exception's type name.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.ipc as paipc

from connectors.sources.base import (
    ARROW_ERRORS,
    DEFAULT_BATCH_ROWS,
    Source,
    check_batch_rows,
    not_found_error,
    physical_columns,
    pull_batches,
    resolve_columns,
    select_columns,
    sliced,
)
from sealroom.errors import SourceError

DEFAULT_CSV_BLOCK_SIZE = 1 << 20

# Parquet scans read ahead this many batches and files: enough to overlap I/O and decoding, few
# enough that memory stays a small multiple of one row group of the requested columns.
_PARQUET_BATCH_READAHEAD = 2
_PARQUET_FRAGMENT_READAHEAD = 1


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
        check_batch_rows(self, batch_rows)
        schema = self.schema
        names = resolve_columns(self, schema, columns)
        return self._batches(schema, names, batch_rows)

    def _batches(self, schema: pa.Schema, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._reader(physical_columns(names, schema), schema) as reader:
            for batch in pull_batches(reader, partial(self._error, schema=schema)):
                yield from sliced(select_columns(batch, names), batch_rows)

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
        except ARROW_ERRORS as exc:
            raise self._error(exc, schema=schema) from None
        with stream:
            try:
                reader = pacsv.open_csv(
                    stream,
                    read_options=read_options,
                    parse_options=parse_options,
                    convert_options=convert_options,
                )
            except ARROW_ERRORS as exc:
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
        check_batch_rows(self, batch_rows)
        dataset = self._open()
        names = resolve_columns(self, dataset.schema, columns)
        return self._batches(dataset, names, batch_rows)

    def _batches(self, dataset: pads.Dataset, names: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
        try:
            scan = dataset.to_batches(
                columns=physical_columns(names, dataset.schema),
                batch_size=batch_rows,
                batch_readahead=_PARQUET_BATCH_READAHEAD,
                fragment_readahead=_PARQUET_FRAGMENT_READAHEAD,
            )
        except ARROW_ERRORS as exc:
            raise self._error(exc) from None
        for batch in pull_batches(scan, self._error):
            yield from sliced(select_columns(batch, names), batch_rows)

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
        except ARROW_ERRORS as exc:
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
        check_batch_rows(self, batch_rows)
        schema = self.schema
        names = resolve_columns(self, schema, columns)
        physical = physical_columns(names, schema)
        included = None if physical is None else sorted(schema.get_field_index(n) for n in physical)
        if included is not None and len(included) == len(schema):
            included = None  # every column: read batches in place from the memory map, no copy
        return self._batches(included, names, batch_rows)

    def _batches(
        self, included: list[int] | None, names: list[str] | None, batch_rows: int
    ) -> Iterator[pa.RecordBatch]:
        with self._reader(included) as (_, batches):
            for batch in pull_batches(batches, self._error):
                batch.validate()
                yield from sliced(select_columns(batch, names), batch_rows)

    @contextlib.contextmanager
    def _reader(self, included: list[int] | None) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
        _check_exists(self, self.path)
        options = paipc.IpcReadOptions(included_fields=included)
        try:
            mapped = pa.memory_map(str(self.path))
        except ARROW_ERRORS as exc:
            raise self._error(exc) from None
        with mapped:
            try:
                file_reader = paipc.open_file(mapped, options=options)
            except ARROW_ERRORS:
                file_reader = None
            if file_reader is not None:
                n = file_reader.num_record_batches
                yield file_reader.schema, map(file_reader.get_batch, range(n))
                return
            try:
                mapped.seek(0)
                stream_reader = paipc.open_stream(mapped, options=options)
            except ARROW_ERRORS as exc:
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


def _check_exists(source: Source, path: Path) -> None:
    if not path.exists():
        raise not_found_error(source.dataset, path)
