"""Sources read real files written to tmp_path: round trips, projection, errors that carry no data,
and bounded memory on files far larger than the allowed allocation."""

from __future__ import annotations

import gc
import gzip
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.ipc as paipc
import pyarrow.parquet as pq
import pytest

from connectors.sources import open_source
from connectors.sources.base import Source, check_schema
from connectors.sources.files import ArrowIpcSource, CsvSource, ParquetSource
from connectors.sources.memory import PandasSource, StreamSource, TableSource
from sealroom.errors import SourceError

DATASET = "bank_a.loans"
ROWS = 5_000
SECRET = "ZZSECRET-7c1f"


def synthetic_table(rows: int = ROWS, seed: int = 20240611) -> pa.Table:
    rng = np.random.default_rng(seed)
    i64_nulls = rng.random(rows) < 0.1
    f64_nulls = rng.random(rows) < 0.1
    s_nulls = rng.random(rows) < 0.1
    strings = [f"v{value}-{'ab'[value % 2]}" for value in rng.integers(0, 10**9, rows)]
    strings[3] = ""  # an empty string is not a null
    s_nulls[3] = False
    return pa.table(
        {
            "i64": pa.array(rng.integers(-(2**40), 2**40, rows), mask=i64_nulls),
            "i32": pa.array(rng.integers(-(2**31), 2**31 - 1, rows, dtype=np.int32)),
            "f64": pa.array(rng.normal(0, 1e6, rows), mask=f64_nulls),
            "s": pa.array(strings, pa.string(), mask=s_nulls),
        }
    )


TABLE = synthetic_table()
VALUES = [value for value in TABLE.column("s").to_pylist() if value]


def write_kind(kind: str, table: pa.Table, directory: Path) -> Path:
    path = directory / f"data.{kind}"
    if kind == "csv":
        pacsv.write_csv(table, path)
    elif kind == "csv.gz":
        with pa.CompressedOutputStream(str(path), "gzip") as out:
            pacsv.write_csv(table, out)
    elif kind == "tsv":
        pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(delimiter="\t"))
    elif kind in ("parquet", "pq"):
        pq.write_table(table, path, row_group_size=1_500)
    elif kind == "arrow":  # IPC file format, several batches
        with paipc.new_file(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=700)
    elif kind == "feather":
        feather.write_feather(table, path, chunksize=900)  # Feather v2, lz4-compressed
    elif kind == "ipc":  # IPC stream format: the file reader fails, the stream reader takes over
        with paipc.new_stream(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=700)
    else:
        raise AssertionError(kind)
    return path


FILE_KINDS = ["csv", "csv.gz", "tsv", "parquet", "pq", "arrow", "feather", "ipc"]
SOURCE_TYPES = {
    "csv": CsvSource,
    "csv.gz": CsvSource,
    "tsv": CsvSource,
    "parquet": ParquetSource,
    "pq": ParquetSource,
    "arrow": ArrowIpcSource,
    "feather": ArrowIpcSource,
    "ipc": ArrowIpcSource,
}


def expected_for(kind: str) -> pa.Table:
    if kind.startswith(("csv", "tsv")):  # CSV has no int32: inference gives int64
        return TABLE.cast(TABLE.schema.set(1, pa.field("i32", pa.int64())))
    return TABLE


def read_all(source: Source, columns: list[str] | None = None, batch_rows: int = 1_000) -> pa.Table:
    batches = list(source.batches(columns, batch_rows=batch_rows))
    assert all(batch.num_rows <= batch_rows for batch in batches)
    schema = source.schema if columns is None else pa.schema([source.schema.field(c) for c in columns])
    assert all(batch.schema.equals(schema) for batch in batches)
    return pa.Table.from_batches(batches, schema=schema)


def no_data_in(err: BaseException) -> bool:
    text = "".join(traceback.format_exception(err))
    return SECRET not in text and not any(value in text for value in VALUES)


class CStreamProducer:
    """A third-party object exporting an Arrow C stream."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.table.__arrow_c_stream__(requested_schema)


# --- Files: round trip, projection, missing columns -------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_round_trip(kind: str, tmp_path: Path) -> None:
    source = open_source(write_kind(kind, TABLE, tmp_path), dataset=DATASET)
    assert isinstance(source, SOURCE_TYPES[kind])
    assert isinstance(source, Source)
    assert source.dataset == DATASET
    assert str(tmp_path) in source.description
    expected = expected_for(kind)
    assert source.schema.equals(expected.schema)
    got = read_all(source)
    assert got.equals(expected)
    assert got.column("s")[3].as_py() == ""
    assert got.column("s").null_count == TABLE.column("s").null_count


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_projection_in_requested_order(kind: str, tmp_path: Path) -> None:
    source = open_source(write_kind(kind, TABLE, tmp_path), dataset=DATASET)
    got = read_all(source, ["s", "i64"], batch_rows=333)
    assert got.schema.names == ["s", "i64"]
    assert got.equals(expected_for(kind).select(["s", "i64"]))
    # No column at all still streams the row count.
    batches = list(source.batches([], batch_rows=2_000))
    assert all(batch.num_columns == 0 for batch in batches)
    assert sum(batch.num_rows for batch in batches) == ROWS


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_missing_column_names_column_and_available_columns_only(kind: str, tmp_path: Path) -> None:
    source = open_source(write_kind(kind, TABLE, tmp_path), dataset=DATASET)
    with pytest.raises(SourceError, match=r"column 'amount' does not exist") as info:
        source.batches(["i64", "amount"])  # raised before any batch is read
    err = info.value
    assert DATASET in err.message
    assert "available columns: i64, i32, f64, s" in err.message
    assert err.details["column"] == "amount"
    assert err.details["available"] == ["i64", "i32", "f64", "s"]
    assert no_data_in(err)


def test_close_misspelling_is_suggested(tmp_path: Path) -> None:
    source = open_source(write_kind("parquet", TABLE, tmp_path), dataset=DATASET)
    with pytest.raises(SourceError, match=r"did you mean 'f64'\?"):
        source.batches(["f46"])


def test_bad_column_requests(tmp_path: Path) -> None:
    source = open_source(TABLE, dataset=DATASET)
    with pytest.raises(SourceError, match="not one string"):
        source.batches("i64")
    with pytest.raises(SourceError, match="'s' is requested twice"):
        source.batches(["s", "i64", "s"])
    with pytest.raises(SourceError, match="must be strings, got int"):
        source.batches([1])  # type: ignore[list-item]
    with pytest.raises(SourceError, match="batch_rows must be a positive integer"):
        source.batches(batch_rows=0)


# --- Opening ----------------------------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "loans.parquet"
    with pytest.raises(SourceError, match=r"^dataset bank_a\.loans: file not found: ") as info:
        open_source(missing, dataset=DATASET)
    assert info.value.message == f"dataset {DATASET}: file not found: {missing}"
    assert info.value.details == {"dataset": DATASET, "path": str(missing)}


def test_file_removed_after_opening(tmp_path: Path) -> None:
    path = write_kind("csv", TABLE, tmp_path)
    source = open_source(str(path), dataset=DATASET)
    path.unlink()
    with pytest.raises(SourceError, match="file not found"):
        source.batches()


def test_unsupported_kinds_list_the_supported_ones(tmp_path: Path) -> None:
    sheet = tmp_path / "loans.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    with pytest.raises(SourceError, match=r"loans\.xlsx is not a supported source") as info:
        open_source(sheet, dataset=DATASET)
    for kind in (".csv", ".csv.gz", ".tsv", ".parquet", ".pq", ".arrow", ".feather", ".ipc", "DataFrame"):
        assert kind in info.value.message
    with pytest.raises(SourceError, match=r"URI with scheme 's3' is not a supported source"):
        open_source("s3://bucket/loans.parquet", dataset=DATASET)
    with pytest.raises(SourceError, match=r"needs exactly one of \?table=NAME or \?query="):
        open_source("postgresql://db.internal/loans", dataset=DATASET)
    with pytest.raises(SourceError, match=r"object of type builtins\.dict is not a supported source"):
        open_source({"i64": [1, 2]}, dataset=DATASET)
    with pytest.raises(SourceError, match="needs a dataset name"):
        open_source(TABLE, dataset="")


def test_unreadable_files_raise_source_error_without_cause(tmp_path: Path) -> None:
    for name, kind in (("bad.parquet", "Parquet"), ("bad.arrow", "an Arrow IPC file or stream")):
        path = tmp_path / name
        path.write_bytes(SECRET.encode() * 100)
        with pytest.raises(SourceError, match=f"could not be read as {kind}") as info:
            open_source(path, dataset=DATASET).schema
        assert info.value.__suppress_context__
        assert no_data_in(info.value)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="the file is empty"):
        open_source(empty, dataset=DATASET).schema
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SourceError, match="contains no parquet files"):
        open_source(tmp_path / "nothing", dataset=DATASET).schema


def test_parquet_directory_with_hive_partitions(tmp_path: Path) -> None:
    regions = pa.array(["eu", "us", "apac"] * (ROWS // 3) + ["eu"] * (ROWS % 3))
    table = TABLE.append_column("id", pa.array(range(ROWS), pa.int64())).append_column("region", regions)
    root = tmp_path / "loans"
    pq.write_to_dataset(table, root, partition_cols=["region"])
    assert sorted(p.name for p in root.iterdir()) == ["region=apac", "region=eu", "region=us"]

    source = open_source(root, dataset=DATASET)
    assert isinstance(source, ParquetSource)
    assert source.description == f"parquet directory {root}"
    assert source.schema.names == ["i64", "i32", "f64", "s", "id", "region"]
    assert source.schema.field("region").type == pa.string()
    got = read_all(source).sort_by("id")
    assert got.equals(table.sort_by("id"))

    got = read_all(source, ["region", "id"]).sort_by("id")
    assert got.schema.names == ["region", "id"]
    assert got.column("region").to_pylist() == regions.to_pylist()


# --- CSV specifics ----------------------------------------------------------------------------


def csv_with_bad_row(path: Path, bad: str, bad_index: int = 4_000) -> None:
    lines = ["a,b,c"] + [f"{i},{i * 1.5},x{i}" for i in range(ROWS)]
    lines[bad_index] = bad
    path.write_text("\n".join(lines) + "\n")


def test_csv_unconvertible_value_in_later_block(tmp_path: Path) -> None:
    path = tmp_path / "loans.csv"
    csv_with_bad_row(path, f"{SECRET},2.5,y")  # file line 4001, an int64 column
    source = CsvSource(path, dataset=DATASET, block_size=4_096)
    assert source.schema.field("a").type == pa.int64()  # the first block fixed the type
    with pytest.raises(SourceError) as info:
        for _ in source.batches(["c", "a"]):
            pass
    err = info.value
    assert err.message == (
        f"dataset {DATASET}: CSV file {path}, row 4001 (the header is row 1): column 'a' has a value "
        f"that does not convert to int64, the type inferred from the first 4096 bytes of the file; "
        f"fix the value, or convert the file to Parquet with an explicit schema"
    )
    assert err.details == {"dataset": DATASET, "path": str(path), "row": 4001, "column": "a", "type": "int64"}
    assert SECRET not in str(err)
    assert no_data_in(err)
    # Columns that are not requested are not converted: the bad value does not stop them.
    assert sum(batch.num_rows for batch in source.batches(["c", "b"])) == ROWS


def test_csv_wrong_field_count_in_later_block(tmp_path: Path) -> None:
    path = tmp_path / "loans.csv.gz"
    lines = ["a,b,c"] + [f"{i},{i * 1.5},x{i}" for i in range(ROWS)]
    lines[4_500] = f"1,2.0,z,{SECRET}"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    source = CsvSource(path, dataset=DATASET, block_size=4_096)
    with pytest.raises(SourceError, match=r"row 4501 \(the header is row 1\): expected 3 fields, found 4") as info:
        list(source.batches(["b"]))
    assert info.value.details["row"] == 4501
    assert SECRET not in str(info.value)
    assert no_data_in(info.value)


def test_tsv_is_tab_delimited(tmp_path: Path) -> None:
    path = tmp_path / "loans.tsv"
    path.write_text("name\tamount\nx, y\t1.5\n\t2\n")
    source = open_source(path, dataset=DATASET)
    assert source.description == f"TSV file {path}"
    got = read_all(source)
    assert got.column("name").to_pylist() == ["x, y", None]
    assert got.column("amount").to_pylist() == [1.5, 2.0]


# --- check_schema -----------------------------------------------------------------------------


def test_check_schema(tmp_path: Path) -> None:
    registered = TABLE.schema
    source = open_source(write_kind("parquet", TABLE, tmp_path), dataset=DATASET)
    assert check_schema(source, registered) is None
    # Nullability, metadata, order and extra source columns are not compared.
    subset = pa.schema([pa.field("s", pa.string(), nullable=False), pa.field("i64", pa.int64())])
    assert check_schema(source, subset.with_metadata({b"k": b"v"})) is None

    changed = TABLE.set_column(2, "f64", pc.cast(TABLE.column("f64"), pa.string()))
    changed = open_source(changed.drop_columns(["i32"]), dataset=DATASET)
    with pytest.raises(SourceError) as info:
        check_schema(changed, registered)
    err = info.value
    assert err.message == (
        f"dataset {DATASET}: in-memory Arrow table does not match its registered schema: "
        "column i32: registered as int32, missing from the source; "
        "column f64: registered as double, source now has string; "
        "restore the source or register the dataset again"
    )
    assert err.details["columns"] == ["i32", "f64"]
    assert no_data_in(err)


# --- In memory --------------------------------------------------------------------------------


def test_table_and_record_batch(tmp_path: Path) -> None:
    source = open_source(TABLE, dataset=DATASET)
    assert isinstance(source, TableSource)
    assert read_all(source).equals(TABLE)
    assert read_all(source).equals(TABLE)  # re-readable
    assert read_all(source, ["f64", "i32"], batch_rows=64).equals(TABLE.select(["f64", "i32"]))
    batch_source = open_source(TABLE.to_batches()[0], dataset=DATASET)
    assert read_all(batch_source, ["s"]).equals(TABLE.select(["s"]))


def test_pandas_dataframe() -> None:
    frame = TABLE.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}.get)
    frame.index = frame.index + 1_000  # not a column
    source = open_source(frame, dataset=DATASET)
    assert isinstance(source, PandasSource)
    expected = TABLE.cast(TABLE.schema.set(3, pa.field("s", pa.large_string())))
    assert source.schema.equals(expected.schema)
    assert source.schema.metadata is None
    assert read_all(source, batch_rows=777).equals(expected)
    assert read_all(source, ["s", "i32"]).equals(expected.select(["s", "i32"]))
    assert sum(batch.num_rows for batch in source.batches([])) == ROWS
    with pytest.raises(SourceError, match="column 'index' does not exist"):
        source.batches(["index"])

    labelled = open_source(pd.DataFrame({0: [1, 2, 3], "x": [0.5, None, 2.5]}), dataset=DATASET)
    assert labelled.schema.names == ["0", "x"]
    assert read_all(labelled, ["0"]).column("0").to_pylist() == [1, 2, 3]
    with pytest.raises(SourceError, match="duplicate column names"):
        open_source(pd.DataFrame([[1, 2]], columns=["a", "a"]), dataset=DATASET)


def test_arrow_c_stream_objects_are_one_shot() -> None:
    source = open_source(CStreamProducer(TABLE), dataset=DATASET)
    assert isinstance(source, StreamSource)
    assert source.description.endswith("CStreamProducer")
    assert source.schema.equals(TABLE.schema)
    with pytest.raises(SourceError, match="column 'nope' does not exist"):
        source.batches(["nope"])  # a bad request does not use up the stream
    assert read_all(source, ["s", "i64"], batch_rows=500).equals(TABLE.select(["s", "i64"]))
    with pytest.raises(SourceError, match=r"one-shot stream and was already read"):
        source.batches()

    reader = pa.RecordBatchReader.from_batches(TABLE.schema, TABLE.to_batches(max_chunksize=1_000))
    source = open_source(reader, dataset=DATASET)
    assert isinstance(source, StreamSource)
    assert read_all(source).equals(TABLE)
    with pytest.raises(SourceError, match="already read"):
        source.batches(["i64"])


# --- Bounded memory ---------------------------------------------------------------------------

MEMORY_LIMIT = 64 * 2**20  # each file's requested column alone is larger than this


def peak_while_streaming(source: Source, column: str, measure: Callable[[pa.Array], pa.Scalar]) -> tuple:
    """(peak bytes allocated by Arrow above the baseline, rows, sum of ``measure`` over ``column``)."""
    gc.collect()
    baseline = pa.total_allocated_bytes()
    peak, rows, total = 0, 0, 0
    for batch in source.batches([column], batch_rows=65_536):
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        assert batch.schema.names == [column]
        rows += batch.num_rows
        total += measure(batch.column(0)).as_py()
    return peak, rows, total


def test_parquet_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    rng = np.random.default_rng(11)
    schema = pa.schema([("a", pa.float64()), ("b", pa.float64())])
    chunk, chunks, expected = 400_000, 32, 0.0
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False, write_statistics=False) as w:
        for _ in range(chunks):
            columns = {name: rng.random(chunk) for name in schema.names}
            expected += float(columns["b"].sum())
            w.write_table(pa.table(columns, schema=schema))
            del columns
    assert path.stat().st_size > 200 * 10**6

    peak, rows, total = peak_while_streaming(open_source(path, dataset=DATASET), "b", pc.sum)
    assert rows == chunk * chunks
    assert total == pytest.approx(expected, rel=1e-9)
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated while streaming one column"


def test_csv_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    rng = np.random.default_rng(12)
    chunk, chunks, expected = 275_000, 8, 0
    schema = pa.schema([("id", pa.int64()), ("label", pa.string())])
    with pacsv.CSVWriter(path, schema) as writer:
        for k in range(chunks):
            halves = [pc.cast(pa.array(rng.integers(10**17, 10**18, chunk)), pa.string()) for _ in range(2)]
            label = pc.binary_join_element_wise(*halves, "-")  # 37 characters
            expected += pc.sum(pc.utf8_length(label)).as_py()
            writer.write_table(pa.table({"id": np.arange(k * chunk, (k + 1) * chunk), "label": label}, schema))
    assert path.stat().st_size > 100 * 10**6

    source = CsvSource(path, dataset=DATASET, block_size=256 * 1024)
    peak, rows, total = peak_while_streaming(source, "label", lambda array: pc.sum(pc.utf8_length(array)))
    assert rows == chunk * chunks
    assert total == expected
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated while streaming one column"
