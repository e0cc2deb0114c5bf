"""In-memory sources: a pyarrow Table or RecordBatch, a pandas DataFrame, or any object exporting an
Arrow C stream. Read without copies where Arrow allows; pandas is never imported here (a DataFrame
can only be passed once its caller has loaded pandas).

Security model: as :mod:`connectors.sources.base`; a conversion error keeps only its type name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from connectors.sources.base import (
    DEFAULT_BATCH_ROWS,
    check_batch_rows,
    physical_columns,
    pull_batches,
    resolve_columns,
    select_columns,
    sliced,
)
from sealroom.errors import SourceError

if TYPE_CHECKING:
    import pandas


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
        check_batch_rows(self, batch_rows)
        names = resolve_columns(self, self.table.schema, columns)
        physical = physical_columns(names, self.table.schema)
        table = self.table if physical is None else self.table.select(physical)
        return (select_columns(batch, names) for batch in table.to_batches(max_chunksize=batch_rows))


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
        check_batch_rows(self, batch_rows)
        names = resolve_columns(self, self._schema, columns)
        physical = physical_columns(names, self._schema) or self._schema.names
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
            yield select_columns(batch.replace_schema_metadata(None), names)

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
        check_batch_rows(self, batch_rows)
        names = resolve_columns(self, self._reader.schema, columns)
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
            for batch in pull_batches(self._reader, self._error):
                yield from sliced(select_columns(batch, names), batch_rows)
        finally:
            self._reader.close()

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(
            f"dataset {self.dataset}: reading {self.description} failed ({type(exc).__name__})",
            details={"dataset": self.dataset, "cause": type(exc).__name__},
        )
