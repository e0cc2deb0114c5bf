"""What a party agent streams: its rows filtered by the plan's pushed filter, projected, padded so
the stream's size does not tell how many rows matched, and cut into frames; and the per-stream
counters behind ``GetProgress``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from connectors.sources.base import FilterPushdown, Source, filter_batches
from sealroom.errors import (
    SealroomError,
)
from sealroom.planning.plan import PlanInput
from sealroom.planning.sql import PAD_COLUMN
from sealroom.v1 import (
    party_pb2,
)

TARGET_FRAME_BYTES = 2 * 1024 * 1024


class StreamCounter:
    """How far one dataset's sealed stream has got, for progress displays (``GetProgress``).

    Counts sealed bytes and frames (what the network sees anyway) and the rows sealed, padding rows
    included; rows are reported only when the owner shares the dataset's row count, and then
    rounded to two significant digits, as at registration. Never a value.
    """

    def __init__(self, dataset: str, *, rows_shared: bool, padded: bool = False):
        self.dataset = dataset
        self.rows_shared = rows_shared
        # A filtered stream is padded so that its size does not tell how many rows passed the filter;
        # counts taken while it streams would show real frames from padding ones by their rate and
        # size, so it reports nothing until it has ended.
        self.padded = padded
        self.rows = self.bytes = self.frames = 0
        self.done = False

    def count_rows(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.rows += batch.num_rows
            yield batch

    def count_frames(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            self.bytes += len(frame)
            self.frames += 1
            yield frame

    def reported_rows(self) -> int:
        return int(float(f"{self.rows:.2g}")) if self.rows_shared and self.rows else 0

    def to_proto(self) -> party_pb2.StreamProgress:
        hidden = self.padded and not self.done
        return party_pb2.StreamProgress(
            dataset=self.dataset,
            bytes=0 if hidden else self.bytes,
            frames=0 if hidden else self.frames,
            rows_shared=self.rows_shared,
            rows=0 if hidden else self.reported_rows(),
            done=self.done,
        )


def until_failure(frames: Iterator[bytes], failed: list[SealroomError]) -> Iterator[bytes]:
    """``frames``, until reading the source (or filtering it) fails: the error is kept in ``failed``
    for the agent to report, and the stream ends without its final frame, so the enclave refuses it
    and fails the job (nothing is released)."""
    try:
        yield from frames
    except SealroomError as err:
        failed.append(err)


def rebatch(batches: Iterator[pa.RecordBatch], target_bytes: int) -> Iterator[pa.RecordBatch]:
    """Slice batches so each sealed frame holds about ``target_bytes`` (1-4 MiB moves fastest)."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        per_row = max(1, batch.nbytes // batch.num_rows)
        step = max(1, target_bytes // per_row)
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


# Padding (see padded_batches): a filtered stream carries at least this many rows, a power of two.
MIN_PADDED_ROWS = 65_536


MAX_FRAME_ROWS = 65_536


MIN_FRAME_ROWS = 64


# Bytes assumed per variable-width value when sizing frames; also each padded frame's minimum
# filler per variable-width column and row.
VAR_BYTES_PER_ROW = 32


def filtered_batches(source: Source, registered: pa.Schema, inp: PlanInput) -> Iterator[pa.RecordBatch]:
    """The rows of ``inp``'s dataset that satisfy its filter, projected to ``inp.columns`` (in that
    order, with the source's exact Arrow types), streamed batch by batch. WHERE semantics (NULL drops
    the row), as in the enclave.

    A source that filters in its own engine (:class:`~connectors.sources.base.FilterPushdown`: the SQL
    sources) receives the projection and the filter, its literals as bound parameters, and applies
    itself whatever its engine cannot evaluate exactly as DuckDB does. For any other source only
    ``columns`` and ``filter_columns`` are read, and :func:`~connectors.sources.base.filter_batches`
    applies the filter here with a locked-down DuckDB.
    """
    assert inp.filter is not None
    if isinstance(source, FilterPushdown):
        return source.filtered_batches(inp.columns, inp.filter, schema=registered)
    wanted = set(inp.columns) | set(inp.filter_columns)
    read = [c for c in registered.names if c in wanted]
    return filter_batches(source.batches(read), inp.filter, inp.filter_columns, inp.columns, dataset=inp.qualified)


def _is_var_width(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
    )


def _row_width(t: pa.DataType) -> float:
    """Bytes one value takes in a frame, estimated from the type alone (never from the data)."""
    if _is_var_width(t):
        offset = 8 if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else 4
        return offset + VAR_BYTES_PER_ROW + 0.125
    try:
        return t.bit_width / 8 + 0.125
    except ValueError:
        return 64.0  # nested and other types


def frame_rows(schema: pa.Schema, target_bytes: int = TARGET_FRAME_BYTES) -> int:
    """Rows per frame of a padded stream: a power of two (64 to 65,536) that depends on the schema
    only, chosen so that a frame holds about ``target_bytes``."""
    width = sum(_row_width(f.type) for f in schema)
    rows = MAX_FRAME_ROWS
    while rows > MIN_FRAME_ROWS and rows * width > target_bytes:
        rows //= 2
    return rows


def _var_bytes(column: pa.Array) -> int:
    if len(column) == 0:
        return 0
    total = pc.sum(pc.binary_length(column)).as_py()
    return int(total or 0)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _filler(t: pa.DataType, rows: int, total: int) -> pa.Array:
    """``rows`` padding values of a variable-width type holding ``total`` bytes: the first NULL (so
    a padded frame always carries a validity bitmap), the others share the bytes."""
    if rows <= 1:
        return pa.nulls(rows, t)
    k = rows - 1
    q, r = divmod(max(0, total), k)
    unit: str | bytes = "\0" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"\0"
    values: list[Any] = [None] + [unit * (q + 1)] * r + [unit * q] * (k - r)
    return pa.array(values, t)


def _pad_frame(tail: pa.RecordBatch, schema: pa.Schema, rows: int, var_target: dict[str, int]) -> pa.RecordBatch:
    """``tail`` (real rows, fewer than ``rows``) completed with padding rows to ``rows`` rows."""
    p = tail.num_rows
    m = rows - p
    arrays = []
    for f in schema:
        if f.name == PAD_COLUMN:
            arrays.append(pa.concat_arrays([pa.repeat(False, p), pa.repeat(True, m)]))
            continue
        real = tail.column(f.name)
        if _is_var_width(f.type):
            pad = _filler(f.type, m, var_target[f.name] - _var_bytes(real))
        else:
            pad = pa.nulls(m, f.type)
        arrays.append(pa.concat_arrays([real, pad]))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def padded_batches(
    real: Iterator[pa.RecordBatch], schema: pa.Schema, *, target_bytes: int = TARGET_FRAME_BYTES
) -> Iterator[pa.RecordBatch]:
    """A filtered stream, cut into frames and padded so that its size does not tell how many rows
    matched.

    ``real`` are the matching rows (the columns of ``schema`` but :data:`PAD_COLUMN`); ``schema`` is
    the sealed schema, whose last column is :data:`PAD_COLUMN` (False for real rows, True for
    padding rows, which the enclave drops before anything reads its input).

    Why: a filtered stream's frame count and sizes, seen by the network and by the enclave's host,
    would otherwise count the matching rows, and could reveal a small count that the minimum group
    size exists to hide.

    The scheme: every frame holds ``F = frame_rows(schema)`` rows (a power of two that depends on
    the schema only); real rows are cut into frames of F rows (sooner if a frame reaches
    ``target_bytes``). Once ``n`` real rows have been read, the last real rows are completed with
    padding rows to F rows, and padding frames follow, until the stream holds
    ``max(65,536, next power of two >= n)`` rows. Padding rows are NULL in every column except that
    the variable-width (string, binary) ones carry filler bytes, so that every padded frame holds
    the same number of bytes in each such column: ``max(F * 32, next power of two >= the bytes of
    the real rows in that frame)``.

    What is hidden: for fewer than F matching rows (F is 2 MiB worth of rows, e.g. 32,768 rows of an
    integer, a string and a float) whose variable-width values hold under 32 bytes a row on average,
    the stream is the same whatever the count, 0 included: the same number of frames of the same
    sizes. Above that, the row count shows only to its power of two (the frame count), except that
    frames holding only real rows can be told apart from padded frames by their sizes: the count
    then shows to within F rows, and variable-width bytes to within a power of two. Nested types are
    padded with NULLs only.

    The cost: a filtered input always sends at least 65,536 rows of its projected columns (about
    ``65,536 x row width`` bytes, e.g. 3.4 MB for those three columns), and up to about twice its
    matching rows above that, in bandwidth, sealing time and the enclave's receive time (padding
    rows are dropped as each frame is opened, so the enclave does not hold them). Filter pushdown
    still sends no row that fails the filter and no column only the filter reads. Padding to the
    unfiltered row count instead would hide the count entirely, but would cost as much as sending
    every row; an unfiltered input is not padded (its size shows its row count, as it always has).
    """
    f_rows = frame_rows(schema, target_bytes)
    pending: list[pa.RecordBatch] = []
    rows = size = sent = 0

    def real_frame() -> pa.RecordBatch:
        batch = pa.concat_batches(pending) if len(pending) > 1 else pending[0]
        return pa.RecordBatch.from_arrays([*batch.columns, pa.repeat(False, batch.num_rows)], schema=schema)

    for batch in rebatch(real, target_bytes):
        per_row = max(1, batch.nbytes // batch.num_rows)
        start = 0
        while start < batch.num_rows:
            room = max(1, (target_bytes - size) // per_row)
            take = min(f_rows - rows, batch.num_rows - start, room)
            piece = batch.slice(start, take)
            pending.append(piece)
            rows += take
            size += piece.nbytes
            start += take
            if rows >= f_rows or take == room:
                yield real_frame()
                sent += rows
                pending, rows, size = [], 0, 0
    yield from _padding(pending, sent, schema, f_rows)


def _padding(pending: list[pa.RecordBatch], sent: int, schema: pa.Schema, f_rows: int) -> Iterator[pa.RecordBatch]:
    """The end of a padded stream (:func:`padded_batches`), once ``sent`` rows went in full frames:
    the last real rows (``pending``, fewer than ``f_rows``) completed with padding rows to a frame,
    then padding frames until the stream holds ``max(MIN_PADDED_ROWS, next power of two >= the real
    rows)`` rows."""
    data_schema = pa.schema([f for f in schema if f.name != PAD_COLUMN])
    rows = sum(b.num_rows for b in pending)
    target_rows = max(MIN_PADDED_ROWS, _next_pow2(sent + rows))
    empty = pa.RecordBatch.from_pylist([], schema=data_schema)
    tail = (pa.concat_batches(pending) if len(pending) > 1 else pending[0]) if rows else empty
    var_target = {
        f.name: max(f_rows * VAR_BYTES_PER_ROW, _next_pow2(_var_bytes(tail.column(f.name))))
        for f in data_schema
        if _is_var_width(f.type)
    }
    if rows:
        yield _pad_frame(tail, schema, f_rows, var_target)
        sent += f_rows
    filler: pa.RecordBatch | None = None
    while sent < target_rows:
        if filler is None:
            filler = _pad_frame(empty, schema, f_rows, var_target)
        yield filler
        sent += f_rows
