"""PostgreSQL sources against the real server (tests/conftest.py: ``postgres``, ``pg_schema``):
schema-only registration, projection and filter pushdown proven on the server side, literals bound
as parameters, bounded memory on a table far larger than the batch budget, and errors that name the
dataset and what is wrong, never a value or a password."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings

from connectors.agent import filtered_batches
from connectors.sources import open_source
from connectors.sources.base import check_schema, filter_batches
from connectors.sources.databases import PostgresSource
from connectors.sources.memory import TableSource
from sealroom.errors import SourceError
from sealroom.planning.plan import PlanInput
from sealroom.policy import DatasetPolicy
from tests.unit.connectors.test_db_sources import KINDS, ROWS, predicates

pytestmark = pytest.mark.postgres

DATASET = "bank_a.loans"
SECRET = "ZZSECRET-pg-5d0e"

LOANS = pa.table(
    {
        "customer_id": pa.array(range(10), pa.int64()),
        "segment": ["retail", "sme", "retail", None, "Retail", "sme", "corporate", "retail", SECRET, "sme"],
        "rating": ["A", "B", None, "A", "A", "C", "A", "B", "A", "A"],
        "exposure": pa.array([1.0, 2.0, 3.0, None, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]),
        "defaulted": pa.array([True, False, None, False, True, False, False, True, False, True]),
    }
)


@pytest.fixture
def loans(pg_schema):
    pg_schema.ingest("loans", LOANS)
    return pg_schema


def _ids(batches) -> list[int]:
    return [row["customer_id"] for b in batches for row in b.to_pylist()]


def test_round_trip_with_exact_types(loans) -> None:
    source = open_source(loans.source("loans"), dataset=DATASET)
    assert isinstance(source, PostgresSource)
    assert source.schema == LOANS.schema
    got = pa.Table.from_batches(list(source.batches(batch_rows=3)))
    assert got.equals(LOANS)
    assert [b.num_rows for b in source.batches(["segment"], batch_rows=4)] == [4, 4, 2]
    assert sum(b.num_rows for b in source.batches([])) == 10  # the row count, no column asked for


def test_query_form(loans) -> None:
    uri = f"{loans.postgres.uri}?query=SELECT customer_id, exposure * 2 AS double_exposure FROM {loans.name}.loans"
    source = open_source(uri, dataset=DATASET)
    assert source.description == f"PostgreSQL query at {loans.postgres.uri}"
    assert source.schema.names == ["customer_id", "double_exposure"]
    got = list(source.filtered_batches(["double_exposure"], '"double_exposure" > 15'))
    assert [r["double_exposure"] for b in got for r in b.to_pylist()] == [16.0, 18.0, 20.0]


def test_schema_registration_runs_no_query(pg_schema) -> None:
    # Reading a row of this view divides by zero: describing it does not.
    pg_schema.execute(
        f"CREATE VIEW {pg_schema.name}.boom AS SELECT g AS id, 1 / (g - g) AS x FROM generate_series(1, 3) g"
    )
    source = open_source(pg_schema.source("boom"), dataset=DATASET)
    assert source.schema == pa.schema([("id", pa.int32()), ("x", pa.int32())])
    with pytest.raises(SourceError, match=r"a value could not be read or converted") as info:
        list(source.batches(["x"]))
    assert info.value.details["sqlstate"] == "22012"


def test_projection_and_filter_happen_in_postgresql(pg_schema) -> None:
    # A view whose 'poison' column fails for every row, and whose 'amount' fails for the rows a
    # filter excludes: reading it succeeds only if PostgreSQL itself projects and filters.
    pg_schema.ingest("loans", LOANS)
    pg_schema.execute(
        f"""CREATE VIEW {pg_schema.name}.guarded AS
        SELECT customer_id, segment, rating,
               CASE WHEN rating = 'A' THEN exposure ELSE exposure / 0 END AS amount,
               1 / (customer_id - customer_id) AS poison
        FROM {pg_schema.name}.loans"""
    )
    source = open_source(pg_schema.source("guarded"), dataset=DATASET)
    registered = source.schema
    sent: list[tuple[str, tuple[object, ...]]] = []
    source.on_execute = lambda sql, params: sent.append((sql, params))
    inp = PlanInput(
        party="bank_a",
        dataset="loans",
        columns=("customer_id", "amount"),
        policy=DatasetPolicy(),
        table="t0",
        filter=f"\"rating\" = 'A' AND \"segment\" <> '{SECRET}'",
        filter_columns=("rating", "segment"),
    )
    got = pa.Table.from_batches(list(filtered_batches(source, registered, inp)))
    assert got.column("customer_id").to_pylist() == [0, 4, 6, 9]  # NULL segment dropped, as WHERE does
    assert got.column("amount").to_pylist() == [1.0, 5.0, 7.0, 10.0]
    [(sql, params)] = sent
    assert sql == (
        'DECLARE "__sr_cursor" NO SCROLL CURSOR FOR SELECT "customer_id", "amount" '
        f'FROM "{pg_schema.name}"."guarded" WHERE ("rating" COLLATE "C" = $1) AND ("segment" COLLATE "C" <> $2)'
    )
    assert params == ("A", SECRET) and SECRET not in sql
    # Without pushdown (the same rows, filtered here) the poisoned view fails: the proof holds.
    with pytest.raises(SourceError, match="a value could not be read"):
        list(
            filter_batches(
                source.batches(["customer_id", "amount", "rating", "segment"]),
                inp.filter or "",
                inp.filter_columns,
                inp.columns,
                dataset=DATASET,
            )
        )


def test_filter_results_equal_duckdb_where(loans) -> None:
    source = open_source(loans.source("loans"), dataset=DATASET)
    local = TableSource(LOANS, dataset=DATASET)
    for predicate in [
        "\"segment\" < 's'",
        "\"segment\" IN ('sme', 'Retail') AND \"exposure\" BETWEEN 2 AND 6",
        '"segment" LIKE \'r%\' OR "defaulted"',
        'NOT "defaulted" AND "exposure" + 1 > 3',
        '"rating" IS NULL OR "segment" IS NULL',
        '"customer_id" > 2.5 AND "exposure" <> 8',
    ]:
        cols = [c for c in LOANS.column_names if f'"{c}"' in predicate]
        want = _ids(filter_batches(local.batches(), predicate, cols, ["customer_id"], dataset=DATASET))
        assert _ids(source.filtered_batches(["customer_id"], predicate)) == want, predicate


def _stream_in_subprocess(uri: str, batch_rows: int) -> dict:
    """Stream two columns of ``uri`` with a pushed filter in a fresh interpreter: rows, characters,
    and how much its peak RSS grew while streaming. (VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over exec, so a child of pytest would start at pytest's own peak.)"""
    script = textwrap.dedent(
        f"""
        import json, re
        import pyarrow.compute as pc
        from connectors.sources import open_source
        source = open_source({uri!r}, dataset="p.big")
        schema = source.schema
        def hwm():
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read())[1])
        base = hwm()
        n = total = 0
        predicate = '"v" >= 0 AND "label" <> \\'x\\''
        for batch in source.filtered_batches(["label", "v"], predicate, schema=schema, batch_rows={batch_rows}):
            n += batch.num_rows
            total += pc.sum(pc.utf8_length(batch.column("label"))).as_py()
        peak = hwm()
        print(json.dumps({{"rows": n, "chars": total, "growth": (peak - base) * 1024}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc (Linux)")
def test_streams_a_large_table_in_bounded_memory(pg_schema) -> None:
    rows = 3_000_000
    pg_schema.execute(
        f"CREATE TABLE {pg_schema.name}.big AS SELECT g::bigint AS id, md5(g::text) AS label, (g * 0.5)::float8 AS v "
        f"FROM generate_series(1, {rows}) g",
    )
    size = pg_schema.postgres.query(f"SELECT pg_table_size('{pg_schema.name}.big') AS n").column("n")[0].as_py()
    assert size > 200 * 10**6
    streamed = rows * (32 + 8 + 4 + 8)  # the two columns as Arrow holds them: 156 MB
    default = _stream_in_subprocess(pg_schema.source("big"), 131_072)
    small = _stream_in_subprocess(pg_schema.source("big"), 16_384)
    for out in (default, small):
        assert out["rows"] == rows and out["chars"] == 32 * rows
    # Measured: +34 MiB with FETCHes of 131,072 rows, +8 MiB with 16,384: a few batches, not the table.
    assert default["growth"] < streamed / 3, f"peak RSS grew {default['growth']} bytes for a {size}-byte table"
    assert small["growth"] < default["growth"]
    print(
        f"streamed {rows} rows of a {size}-byte table: peak RSS +{default['growth'] / 2**20:.0f} MiB "
        f"(batches of 131,072 rows), +{small['growth'] / 2**20:.0f} MiB (16,384 rows)"
    )


def test_errors_name_the_dataset_never_a_password_or_value(pg_schema) -> None:
    pg_schema.ingest("loans", LOANS)
    closed = "postgresql://root:hunter2-pw@127.0.0.1:1/test?table=loans"
    with pytest.raises(SourceError, match=r"cannot connect to the database server") as info:
        _ = open_source(closed, dataset=DATASET).schema
    assert "hunter2" not in str(info.value) and "hunter2" not in json.dumps(info.value.details)
    assert info.value.message.startswith(
        f"dataset {DATASET}: PostgreSQL table loans at postgresql://root@127.0.0.1:1/test"
    )

    base = pg_schema.postgres.uri
    with pytest.raises(SourceError, match=r"the database does not exist"):
        _ = open_source(base.rsplit("/", 1)[0] + "/no_such_db_sr?table=t", dataset=DATASET).schema
    with pytest.raises(SourceError, match=r"table sr_test_\w+\.nope at .*: the table does not exist"):
        _ = open_source(pg_schema.source("nope"), dataset=DATASET).schema

    source = open_source(pg_schema.source("loans"), dataset=DATASET)
    registered = source.schema
    pg_schema.execute(f"ALTER TABLE {pg_schema.name}.loans DROP COLUMN rating")
    with pytest.raises(SourceError, match=r"column rating: registered as string, missing from the source"):
        check_schema(source, registered)
    with pytest.raises(SourceError, match=r"column 'rating' does not exist"):
        list(source.batches(["rating"]))
    pg_schema.execute(f"ALTER TABLE {pg_schema.name}.loans ALTER COLUMN exposure TYPE real")
    with pytest.raises(SourceError, match=r"column exposure: registered as double, source now has float"):
        check_schema(source, registered)

    # A type the database changes mid-flight is caught when reading too: the value is never quoted.
    pg_schema.execute(f"ALTER TABLE {pg_schema.name}.loans ALTER COLUMN segment TYPE int USING length(segment)")
    with pytest.raises(SourceError, match=r"column 'segment' .* holds int32 values, but it is registered as string"):
        list(source.filtered_batches(["segment"], '"customer_id" > 0', schema=registered))


def test_queries_run_read_only(pg_schema) -> None:
    pg_schema.execute(f"CREATE SEQUENCE {pg_schema.name}.s")
    # sqlglot sees a SELECT; the READ ONLY transaction refuses the write it hides.
    source = open_source(f"{pg_schema.postgres.uri}?query=SELECT nextval('{pg_schema.name}.s') AS n", dataset=DATASET)
    with pytest.raises(SourceError, match=r"the query tried to write"):
        list(source.batches())
    with pytest.raises(SourceError, match=r"is a INSERT statement|is an INSERT statement|INSERT"):
        open_source(f"{pg_schema.postgres.uri}?query=INSERT INTO x VALUES (1)", dataset=DATASET)


def test_numeric_and_extension_types(pg_schema) -> None:
    pg_schema.execute(
        f"CREATE TABLE {pg_schema.name}.money (id int, amount numeric(12, 2), ratio numeric, doc jsonb)",
        f"INSERT INTO {pg_schema.name}.money VALUES (1, 1234567890.12, 0.5, '{{\"a\": 1}}'), (2, NULL, 1e-3, NULL)",
    )
    source = open_source(pg_schema.source("money"), dataset=DATASET)
    assert source.schema == pa.schema(
        [("id", pa.int32()), ("amount", pa.decimal128(12, 2)), ("ratio", pa.float64()), ("doc", pa.string())]
    )
    got = pa.Table.from_batches(list(source.batches()))
    assert got.schema == source.schema
    assert [str(v) for v in got.column("amount").to_pylist()] == ["1234567890.12", "None"]
    assert got.column("ratio").to_pylist() == [0.5, 0.001]
    pushed = list(source.filtered_batches(["id"], '"amount" > 1000 AND "ratio" < 1'))
    assert [r["id"] for b in pushed for r in b.to_pylist()] == [1]
    pg_schema.execute(f"INSERT INTO {pg_schema.name}.money VALUES (3, 'NaN', 'NaN', NULL)")
    with pytest.raises(SourceError, match=r"column 'amount' .* holds string values, but it is registered as decimal"):
        list(source.batches(["amount"]))


def test_only_columns_postgresql_compares_like_duckdb_are_pushed(pg_schema) -> None:
    # char(n) compares without its padding in PostgreSQL, and float4 against a literal differs: those
    # conditions are applied by DuckDB on the padded text and float32 values, as for a file source.
    pg_schema.execute(
        f"CREATE TABLE {pg_schema.name}.codes (id int, code char(4), score real, label text)",
        f"INSERT INTO {pg_schema.name}.codes VALUES (1, 'ab', 0.1, 'x'), (2, 'abcd', 0.5, 'y'), (3, NULL, NULL, 'z')",
    )
    source = open_source(pg_schema.source("codes"), dataset=DATASET)
    sent: list[str] = []
    source.on_execute = lambda sql, params: sent.append(sql)
    predicate = '"code" <> \'ab\' AND "score" = 0.1 AND "label" <> \'q\''
    got = _ids_of(source.filtered_batches(["id"], predicate))
    local = pa.Table.from_batches(list(source.batches()))
    want = _ids_of(
        filter_batches(iter(local.to_batches()), predicate, ["code", "score", "label"], ["id"], dataset=DATASET)
    )
    assert got == want
    assert sent[0] == (
        'DECLARE "__sr_cursor" NO SCROLL CURSOR FOR SELECT "id", "code", "score" '
        f'FROM "{pg_schema.name}"."codes" WHERE ("label" COLLATE "C" <> $1)'
    )


def _ids_of(batches) -> list[int]:
    return [row["id"] for b in batches for row in b.to_pylist()]


@pytest.fixture(scope="module")
def rows_table(postgres):
    """ROWS of the unit tests in a schema of this module's own (hypothesis reuses it across examples)."""
    name = f"sr_test_{uuid.uuid4().hex[:12]}"
    postgres.execute(f'CREATE SCHEMA "{name}"')
    with postgres.connect() as con, con.cursor() as cur:
        cur.adbc_ingest("loans", ROWS, mode="create", db_schema_name=name)
    yield f"{postgres.uri}?table={name}.loans"
    postgres.execute(f'DROP SCHEMA "{name}" CASCADE')


@settings(max_examples=80, deadline=None)
@given(predicate=predicates({**KINDS, "defaulted": "bool"}))
def test_property_postgresql_keeps_what_duckdb_keeps(rows_table, predicate: str) -> None:
    source = open_source(rows_table, dataset=DATASET)
    got = [r["id"] for b in source.filtered_batches(["id"], predicate) for r in b.to_pylist()]
    local = TableSource(ROWS, dataset=DATASET)
    used = [c for c in ROWS.column_names if f'"{c}"' in predicate]
    want = [
        r["id"]
        for b in filter_batches(local.batches(), predicate, used, ["id"], dataset=DATASET)
        for r in b.to_pylist()
    ]
    assert got == want


@pytest.mark.postgres
def test_a_nondeterministic_collation_does_not_widen_the_pushed_filter(pg_schema) -> None:
    """A column under a case-insensitive ICU collation: even '=' and IN would match 'ALICE' for
    'alice' in PostgreSQL. The pushed filter compares byte-wise (COLLATE "C"), as the plan's filter
    does, so a row the approved filter excludes never leaves the owner."""
    s = pg_schema.name
    pg_schema.execute(f"CREATE COLLATION {s}.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
    pg_schema.execute(f"CREATE TABLE {s}.people (name text COLLATE {s}.ci, v integer)")
    pg_schema.execute(f"INSERT INTO {s}.people VALUES ('alice', 1), ('ALICE', 2), ('bob', 3)")
    source = open_source(pg_schema.source("people"), dataset=DATASET)
    for predicate, expected in (
        ("\"name\" = 'alice'", [1]),
        ("\"name\" IN ('alice', 'bob')", [1, 3]),
        ("\"name\" <> 'alice'", [2, 3]),
    ):
        got = [
            r["v"]
            for b in source.filtered_batches(["name", "v"], predicate, schema=source.schema)
            for r in b.to_pylist()
        ]
        assert sorted(got) == expected, predicate
