"""What every data source is and shares: the :class:`Source` protocol and the optional
:class:`FilterPushdown` capability, the check of a source against its registered schema
(:func:`check_schema`), filtering here with a locked-down DuckDB (:func:`filter_batches`), and the
helpers every source kind uses to check a request and cut its batches.

Security model: this module runs on the data owner's machine and sees raw rows; it reveals none of
them. Its errors (:class:`~sealroom.errors.SourceError`) name the dataset, columns and types only;
pyarrow's and DuckDB's own messages can quote values, so they are reported by their type name only
and never chained (``raise ... from None``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import duckdb
import pyarrow as pa

from sealroom.duck import locked_connection
from sealroom.errors import SourceError

DEFAULT_BATCH_ROWS = 131_072

# pyarrow's errors while reading (their text may quote data: read for structure, never copied).
ARROW_ERRORS = (pa.ArrowException, OSError)


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
    row), as in the enclave. The predicate is total, as every expression the enclave evaluates: a
    row on which it raises (a failed cast, a division by zero, an overflow) is dropped, so whether
    a query fails can never depend on a hidden value (an error oracle on a filter-only column). A
    DuckDB error that remains (a malformed predicate) is reported by its kind only: its message can
    quote values.
    """
    where = f"COALESCE(TRY({predicate}), FALSE)"
    query = f'SELECT "{_ROW_INDEX}" FROM "{_ROWS_VIEW}" WHERE {where} ORDER BY "{_ROW_INDEX}"'  # noqa: S608
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


# --- Shared by every source kind -------------------------------------------------------------


def not_found_error(dataset: str, path: Path) -> SourceError:
    return SourceError(f"dataset {dataset}: file not found: {path}", details={"dataset": dataset, "path": str(path)})


def check_batch_rows(source: Source, batch_rows: int) -> None:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise SourceError(
            f"dataset {source.dataset}: batch_rows must be a positive integer",
            details={"dataset": source.dataset},
        )


def resolve_columns(source: Source, schema: pa.Schema, columns: Sequence[str] | None) -> list[str] | None:
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


def physical_columns(names: list[str] | None, schema: pa.Schema) -> list[str] | None:
    """The columns to read for ``names``: with no column requested, the first one, so that batches
    still carry their row counts."""
    if names is None or names:
        return names
    return schema.names[:1]


def select_columns(batch: pa.RecordBatch, names: list[str] | None) -> pa.RecordBatch:
    return batch if names is None else batch.select(names)


def sliced(batch: pa.RecordBatch, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if batch.num_rows <= batch_rows:
        yield batch
        return
    for offset in range(0, batch.num_rows, batch_rows):
        yield batch.slice(offset, batch_rows)


def pull_batches(
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
        except ARROW_ERRORS as exc:
            raise wrap(exc) from None
        yield item
