"""Database sources on real DuckDB and SQLite files: URI forms, schema-only registration, streaming,
filter pushdown with literals bound as parameters (and results identical to DuckDB's own WHERE),
and errors that name the dataset and what is wrong without quoting a value."""

from __future__ import annotations

import datetime
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.agent import PartyConfig, filtered_batches, padded_batches
from connectors.sources import open_source, resolve_spec
from connectors.sources.base import FilterPushdown, check_schema, filter_batches
from connectors.sources.database_uris import is_database_spec, redact_uri
from connectors.sources.databases import DuckDbSource, SqliteSource, validate_select
from connectors.sources.memory import TableSource
from connectors.sources.pushdown import translate_filter
from sealroom.config import file_table
from sealroom.errors import SourceError
from sealroom.planning.plan import PlanInput
from sealroom.planning.sql import PAD_COLUMN
from sealroom.policy import DatasetPolicy

DATASET = "bank_a.loans"
SECRET = "ZZSECRET-91b2"

ROWS = pa.table(
    {
        "id": pa.array(range(12), pa.int64()),
        "segment": ["retail", "Retail", "sme", None, "retail", "corporate", "sme", "retail", "a_b", "a%b", "", "zz"],
        "rating": ["A", "B", None, "A", "C", "A", "B", None, "A", "A", "B", "C"],
        "exposure": pa.array([1.5, 2.0, None, 4.0, 5.25, 6.0, 7.0, 8.0, -1.0, 0.0, 3.0, 9.5]),
        "defaulted": pa.array([True, False, None, False, True, False, False, True, False, True, False, None]),
        "opened": pa.array([datetime.date(2024, 1, 1) + datetime.timedelta(days=10 * i) for i in range(12)]),
    }
)
SCHEMA = ROWS.schema.append(pa.field("small", pa.float32()))


@pytest.fixture
def duckdb_file(tmp_path: Path) -> Path:
    path = tmp_path / "bank.duckdb"
    con = duckdb.connect(str(path))
    con.register("rows", ROWS)
    con.execute("CREATE TABLE loans AS SELECT * FROM rows")
    con.close()
    return path


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    path = tmp_path / "bank.db"
    con = sqlite3.connect(path)
    # NOCASE on purpose: pushed string comparisons must still be byte-wise, as in DuckDB.
    con.execute("CREATE TABLE loans (id INTEGER, segment TEXT COLLATE NOCASE, rating TEXT, exposure REAL, opened TEXT)")
    con.executemany(
        "INSERT INTO loans VALUES (?, ?, ?, ?, ?)",
        [
            (r["id"], r["segment"], r["rating"], r["exposure"], r["opened"].isoformat())
            for r in ROWS.drop_columns(["defaulted"]).to_pylist()
        ],
    )
    con.commit()
    con.close()
    return path


# --- Specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("postgresql://u@h:5432/db?table=t", True),
        ("postgres://u@h/db?query=SELECT 1", True),
        ("sqlite:///b.db?table=t", True),
        ("duckdb:///x.duckdb?table=t", True),
        ("data/x.duckdb?table=t", True),
        ("data/x.sqlite3?query=SELECT 1", True),
        ("data/x.duckdb", False),
        ("data/a.parquet", False),
        ("s3://bucket/a.parquet", False),
    ],
)
def test_database_specs_are_recognised(spec: str, expected: bool) -> None:
    assert is_database_spec(spec) is expected


def test_relative_paths_resolve_against_the_base(tmp_path: Path) -> None:
    assert resolve_spec("sqlite:///b.db?table=t", tmp_path) == f"sqlite:///{tmp_path}/b.db?table=t"
    assert resolve_spec("sqlite:////srv/b.db?table=t", tmp_path) == "sqlite:////srv/b.db?table=t"
    assert resolve_spec("duckdb:///d/x.duckdb?query=SELECT 1", tmp_path) == (
        f"duckdb:///{tmp_path}/d/x.duckdb?query=SELECT 1"
    )
    assert resolve_spec("x.duckdb?table=t", tmp_path) == f"{tmp_path}/x.duckdb?table=t"
    assert resolve_spec("a.parquet", tmp_path) == f"{tmp_path}/a.parquet"
    uri = "postgresql://u@h:5432/db?table=t"
    assert resolve_spec(uri, tmp_path) == uri


def test_all_forms_open_the_same_table(duckdb_file: Path, sqlite_file: Path, tmp_path: Path) -> None:
    forms = [
        f"duckdb:///{duckdb_file}?table=loans",
        f"{duckdb_file}?table=loans",
        f"duckdb:///{duckdb_file}?query=SELECT * FROM loans",
        f"sqlite:///{sqlite_file}?table=loans",
        f"{sqlite_file}?table=loans",  # .db: the header says SQLite
    ]
    for spec in forms:
        source = open_source(spec, dataset=DATASET)
        assert isinstance(source, FilterPushdown)
        got = pa.Table.from_batches(list(source.batches(["id", "segment"])))
        assert got.column("id").to_pylist() == list(range(12)), spec
        assert got.column("segment").to_pylist() == ROWS.column("segment").to_pylist(), spec
    renamed = tmp_path / "bank_copy.db"
    renamed.write_bytes(duckdb_file.read_bytes())
    assert isinstance(open_source(f"{renamed}?table=loans", dataset=DATASET), DuckDbSource)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("postgresql://u@h/db", r"needs exactly one of \?table=NAME or \?query="),
        ("postgresql://u@h/db?table=a&query=SELECT 1", r"needs exactly one of"),
        ("postgresql://u@h/db?table=a&table=b", r"gives table= twice"),
        ("sqlite://b.db?table=t", r"is not of the form sqlite:///PATH\?table=NAME"),
        ("sqlite:///b.db?query=SELECT 1", r"SQLite sources do not support"),
        ("duckdb:///b.duckdb?table=t&mode=rw", r"unknown parameters: mode"),
        ("postgresql://u@h/db?table=a.b.c.d", r"is not a table name"),
        ("/nowhere/x.duckdb?table=t", r"database file not found: /nowhere/x.duckdb"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, match: str) -> None:
    with pytest.raises(SourceError, match=match) as info:
        open_source(spec, dataset=DATASET)
    assert info.value.message.startswith(f"dataset {DATASET}: ")


def test_not_a_database_file(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"not a database at all")
    with pytest.raises(SourceError, match=r"is neither a DuckDB nor a SQLite database file"):
        open_source(f"{path}?table=t", dataset=DATASET)


def test_password_is_redacted_from_descriptions() -> None:
    source = open_source(
        "postgresql://alice:s3cr3t-pw@db.internal:6543/bank?table=loans&sslmode=require", dataset=DATASET
    )
    assert source.description == "PostgreSQL table loans at postgresql://alice@db.internal:6543/bank"
    assert "s3cr3t" not in redact_uri("postgresql://alice:s3cr3t@h/db?password=s3cr3t")


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("DELETE FROM loans", "is a DELETE statement"),
        ("SELECT 1; SELECT 2", "holds 2 statements"),
        ("SELECT * INTO copy FROM loans", "contains INTO"),
        ("WITH gone AS (DELETE FROM loans RETURNING *) SELECT * FROM gone", "contains DELETE"),
        ("SELECT * FROM loans WHERE id = $1", "contains PARAMETER"),
        ("SELECT * FROM loans FOR UPDATE", "contains LOCK"),
        ("SELEC nothing", "could not be parsed|is a"),
    ],
)
def test_queries_must_be_one_read_only_select(query: str, match: str) -> None:
    with pytest.raises(SourceError, match=match) as info:
        validate_select(query, dialect="postgres", dataset=DATASET)
    assert "give a single read-only SELECT" in info.value.message
    validate_select("WITH x AS (SELECT 1 AS a) SELECT a FROM x UNION ALL SELECT 2", dialect="postgres", dataset=DATASET)


# --- Schema and streaming ---------------------------------------------------------------------


def test_schema_is_read_without_reading_rows(tmp_path: Path) -> None:
    path = tmp_path / "v.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE VIEW boom AS SELECT error('row read') AS x, 1 AS y")
    con.close()
    source = open_source(f"{path}?table=boom", dataset=DATASET)
    assert source.schema.names == ["x", "y"]  # the view is described, not run
    with pytest.raises(SourceError, match=r"DuckDB table boom in .*: a value could not be converted") as info:
        list(source.batches())
    assert "row read" not in str(info.value) and "row read" not in str(info.value.details)


def test_duckdb_streams_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "big.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT range AS id, range * 0.5 AS v FROM range(300000)")
    con.close()
    source = open_source(f"duckdb:///{path}?table=t", dataset=DATASET)
    sizes = [b.num_rows for b in source.batches(["v"], batch_rows=10_000)]
    assert sum(sizes) == 300_000 and max(sizes) <= 10_000 and len(sizes) >= 30


def test_sqlite_types_come_from_the_declared_columns(sqlite_file: Path) -> None:
    source = open_source(f"sqlite:///{sqlite_file}?table=loans", dataset=DATASET)
    assert source.schema == pa.schema(
        [
            ("id", pa.int64()),
            ("segment", pa.string()),
            ("rating", pa.string()),
            ("exposure", pa.float64()),
            ("opened", pa.string()),
        ]
    )
    got = pa.Table.from_batches(list(source.batches(["exposure", "id"], batch_rows=5)))
    assert got.column("exposure").to_pylist() == ROWS.column("exposure").to_pylist()


def test_database_opened_read_only(duckdb_file: Path, sqlite_file: Path) -> None:
    with pytest.raises(SourceError, match="is a CREATE statement"):
        open_source(f"duckdb:///{duckdb_file}?query=CREATE TABLE x AS SELECT 1", dataset=DATASET)
    # The files are not modified by reading them.
    before = (duckdb_file.read_bytes(), sqlite_file.read_bytes())
    for spec in (f"{duckdb_file}?table=loans", f"{sqlite_file}?table=loans"):
        list(open_source(spec, dataset=DATASET).batches())
    assert (duckdb_file.read_bytes(), sqlite_file.read_bytes()) == before


# --- Pushdown ---------------------------------------------------------------------------------


def test_pushed_sql_holds_no_literal_and_binds_them_in_order() -> None:
    predicate = (
        f'"segment" = \'{SECRET}\' AND "exposure" BETWEEN 1 AND 7.5 AND "id" IN (3, -4) '
        'AND NOT "rating" IS NULL AND "opened" >= \'2024-02-01\''
    )
    for dialect, mark in (("postgres", r"\$\d+"), ("duckdb", r"\?"), ("sqlite", r"\?")):
        # SQLite has no DATE: that comparison stays with DuckDB
        text = predicate.replace(" AND \"opened\" >= '2024-02-01'", "") if dialect == "sqlite" else predicate
        out = translate_filter(text, SCHEMA, dialect=dialect)
        assert out.where is not None and out.residual is None, dialect
        assert SECRET not in out.where and "7.5" not in out.where and "2024" not in out.where
        assert not re.search(r"'|\b\d", re.sub(mark, "", out.where)), out.where  # no literal at all
        expected: tuple[object, ...] = (SECRET, 1.0, 7.5, 3, -4, datetime.date(2024, 2, 1))
        assert out.params == (expected[:5] if dialect == "sqlite" else expected), dialect
    pg = translate_filter(predicate, SCHEMA, dialect="postgres")
    assert pg.where == (
        '("segment" COLLATE "C" = $1) AND ("exposure" BETWEEN $2 AND $3) AND ("id" IN ($4, $5)) '
        'AND (NOT "rating" IS NULL) AND ("opened" >= $6)'
    )


@pytest.mark.parametrize(
    ("predicate", "dialect", "pushed", "residual"),
    [
        # byte-wise string order: COLLATE "C" on PostgreSQL orderings, BINARY on every SQLite comparison
        ("\"segment\" < 'b'", "postgres", '("segment" COLLATE "C" < $1)', None),
        ("\"segment\" = 'b'", "postgres", '("segment" COLLATE "C" = $1)', None),
        ("\"segment\" = 'b'", "sqlite", '("segment" COLLATE BINARY = ?)', None),
        # SQLite's LIKE ignores case, PostgreSQL's escapes with a backslash: DuckDB keeps those
        ("\"segment\" LIKE 'r%'", "postgres", '("segment" COLLATE "C" LIKE $1)', None),
        ("\"segment\" LIKE 'r%'", "sqlite", None, "(\"segment\" LIKE 'r%')"),
        ("\"segment\" LIKE 'a\\_%'", "postgres", None, "(\"segment\" LIKE 'a\\_%')"),
        ("\"segment\" LIKE 'a\\_%'", "duckdb", '("segment" COLLATE C LIKE ?)', None),
        # arithmetic, functions, casts and mixed types stay with DuckDB; the rest is pushed
        ('"exposure" + 1 > 2 AND "id" > 3', "postgres", '("id" > $1)', '("exposure" + 1 > 2)'),
        ("lower(\"segment\") = 'sme'", "duckdb", None, "(LOWER(\"segment\") = 'sme')"),
        ('"id" > 2.5', "postgres", None, '("id" > 2.5)'),
        ("\"id\" = '3'", "postgres", None, "(\"id\" = '3')"),
        ('"exposure" > 2', "postgres", '("exposure" > $1)', None),
        # an OR is pushed only as a whole
        ('("id" = 1 OR "exposure" * 2 > 3) AND "rating" = \'A\'', "postgres", '("rating" COLLATE "C" = $1)', None),
        ('"defaulted" AND NOT "defaulted" IS NULL', "postgres", '("defaulted") AND (NOT "defaulted" IS NULL)', None),
        ("\"opened\" < DATE '2024-03-01'", "postgres", '("opened" < $1)', None),
        ("\"opened\" < '2024-03-01'", "sqlite", None, "(\"opened\" < '2024-03-01')"),
        ('"small" = 0.1', "postgres", None, '("small" = 0.1)'),
    ],
)
def test_what_each_database_is_given(predicate: str, dialect: str, pushed: str | None, residual: str | None) -> None:
    out = translate_filter(predicate, SCHEMA, dialect=dialect)
    assert out.where == pushed
    if predicate.startswith('("id" = 1 OR'):
        assert out.residual is not None and "OR" in out.residual
    else:
        assert out.residual == residual


PREDICATES = [
    "\"segment\" = 'retail'",
    "\"segment\" <> 'retail'",
    "\"segment\" < 'retail'",
    "\"segment\" >= 'Retail' AND \"segment\" <= 'sme'",
    "\"segment\" IN ('sme', 'zz', 'Retail')",
    "\"segment\" NOT IN ('sme', 'retail')",
    "\"segment\" LIKE 'r%'",
    "\"segment\" LIKE 'a_b'",
    '"segment" IS NULL OR "rating" = \'A\'',
    '"exposure" > 2',
    '"exposure" BETWEEN 1 AND 6.0',
    'NOT ("exposure" < 4)',
    '"exposure" + 1 > 5 AND "rating" <> \'C\'',
    '"id" IN (1, 3, 5, 7, 11) AND "exposure" IS NOT NULL',
    '"id" > 2.5',
    "\"opened\" >= '2024-02-01' AND \"opened\" < '2024-03-15'",
    '"rating" = \'A\' AND ("id" < 5 OR "segment" = \'a%b\')',
    "\"segment\" = ''",
    '"rating" = NULL',
]


def _local(predicate: str, columns: list[str], table: pa.Table) -> list[int]:
    source = TableSource(table, dataset=DATASET)
    used = [c for c in table.column_names if f'"{c}"' in predicate]
    read = list(dict.fromkeys([*columns, *used]))
    out = filter_batches(source.batches(read), predicate, used, columns, dataset=DATASET)
    return [row["id"] for b in out for row in b.to_pylist()]


@pytest.mark.parametrize("predicate", PREDICATES)
def test_pushdown_returns_exactly_what_duckdb_keeps(predicate: str, duckdb_file: Path, sqlite_file: Path) -> None:
    expected = _local(predicate, ["id", "exposure"], ROWS)
    assert expected or predicate in ('"rating" = NULL',)
    duck = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    got = [r["id"] for b in duck.filtered_batches(["id", "exposure"], predicate) for r in b.to_pylist()]
    assert got == expected
    lite = open_source(f"sqlite:///{sqlite_file}?table=loans", dataset=DATASET)
    sqlite_rows = ROWS.drop_columns(["defaulted"]).set_column(4, "opened", ROWS.column("opened").cast(pa.string()))
    if '"defaulted"' not in predicate:
        want = _local(predicate, ["id", "exposure"], sqlite_rows)
        got = [r["id"] for b in lite.filtered_batches(["id", "exposure"], predicate) for r in b.to_pylist()]
        assert got == want


def test_the_agent_pushes_into_sql_sources_and_pads_after(duckdb_file: Path) -> None:
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    sent: list[tuple[str, tuple[object, ...]]] = []
    source.on_execute = lambda sql, params: sent.append((sql, params))
    registered = source.schema
    inp = PlanInput(
        party="bank_a",
        dataset="loans",
        columns=("id", "exposure"),
        policy=DatasetPolicy(),
        table="t0",
        filter=f"\"rating\" = '{SECRET}' OR \"segment\" = 'sme'",
        filter_columns=("rating", "segment"),
    )
    rows = list(filtered_batches(source, registered, inp))
    assert [r["id"] for b in rows for r in b.to_pylist()] == [2, 6]
    assert sent == [
        (
            'SELECT "id", "exposure" FROM "loans" WHERE ("rating" COLLATE C = ? OR "segment" COLLATE C = ?)',
            (SECRET, "sme"),
        )
    ]
    sealed = pa.schema([registered.field("id"), registered.field("exposure"), pa.field(PAD_COLUMN, pa.bool_(), False)])
    frames = list(padded_batches(iter(rows), sealed))
    assert sum(f.num_rows for f in frames) >= 65_536
    assert sum(not p for f in frames for p in f.column(PAD_COLUMN).to_pylist()) == 2


# --- Errors -----------------------------------------------------------------------------------


def test_missing_table_and_column(duckdb_file: Path, sqlite_file: Path) -> None:
    for spec in (f"{duckdb_file}?table=nope", f"sqlite:///{sqlite_file}?table=nope"):
        with pytest.raises(SourceError, match=rf"dataset {DATASET}: .* table nope in .*: the table does not exist"):
            _ = open_source(spec, dataset=DATASET).schema
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    with pytest.raises(SourceError, match=r"column 'segmnt' does not exist .* \(did you mean 'segment'\?\)"):
        source.batches(["segmnt"])


def test_schema_changed_since_registration(duckdb_file: Path) -> None:
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    registered = source.schema
    con = duckdb.connect(str(duckdb_file))
    con.execute("ALTER TABLE loans DROP COLUMN rating")
    con.execute("ALTER TABLE loans ALTER COLUMN id TYPE VARCHAR")
    con.close()
    with pytest.raises(SourceError, match="does not match its registered schema") as info:
        check_schema(source, registered)
    assert info.value.details["columns"] == ["id", "rating"]
    assert "column id: registered as int64, source now has string" in info.value.message


def test_sqlite_value_of_another_type_names_the_column_not_the_value(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER, amount REAL)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, float(i)) for i in range(50)] + [(50, SECRET)])
    con.commit()
    con.close()
    source = open_source(f"{path}?table=t", dataset=DATASET)
    with pytest.raises(SourceError) as info:
        list(source.batches(["amount"], batch_rows=10))
    err = info.value
    assert err.message.startswith(f"dataset {DATASET}: SQLite table t in {path}: column 'amount' holds values of ")
    assert err.details["column"] == "amount"
    assert SECRET not in err.message and SECRET not in str(err.details)
    assert err.__cause__ is None and err.__suppress_context__


def test_filter_literals_never_reach_errors(duckdb_file: Path) -> None:
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    with pytest.raises(SourceError) as info:
        # The OR cannot go to the database: DuckDB applies it here, and fails to bind the function.
        list(source.filtered_batches(["id"], f'no_such_function("segment") > 0 OR "rating" = \'{SECRET}\''))
    assert SECRET not in str(info.value) and SECRET not in str(info.value.details)


def test_a_filter_that_raises_on_a_value_drops_the_row_and_never_fails(duckdb_file: Path) -> None:
    """An error oracle: a pushed filter that raises on one row's hidden value would make the whole
    query fail, one bit per query (here: whether any row's segment is not a number). The filter is
    total: such a row is dropped, as the enclave drops it."""
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    everything = [r["id"] for b in source.batches(["id"]) for r in b.to_pylist()]
    assert not list(source.filtered_batches(["id"], 'CAST("segment" AS INTEGER) > 0'))
    raising_on_one = '1 // (CASE WHEN "id" = 1 THEN 0 ELSE 1 END) = 1'
    kept = [r["id"] for b in source.filtered_batches(["id"], raising_on_one) for r in b.to_pylist()]
    assert 1 in everything and sorted(kept) == sorted(i for i in everything if i != 1)


def test_sources_are_sources(duckdb_file: Path, sqlite_file: Path) -> None:
    assert isinstance(open_source(f"{duckdb_file}?table=loans", dataset=DATASET), DuckDbSource)
    assert isinstance(open_source(f"sqlite:///{sqlite_file}?table=loans", dataset=DATASET), SqliteSource)


def test_party_config_resolves_database_paths_against_its_file(sqlite_file: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "b.db").write_bytes(sqlite_file.read_bytes())
    path = conf / "party.toml"
    path.write_text(
        '[party]\nname = "bank_b"\ncoordinator = "127.0.0.1:1"\nsigning_key = "k.key"\n[tls]\nplaintext = true\n'
        '[[dataset]]\nname = "loans"\nsource = "sqlite:///b.db?table=loans"\n'
        '[[dataset]]\nname = "pg"\nsource = "postgresql://reader@db:5432/bank?table=loans"\n'
    )
    config = PartyConfig.from_table(file_table(path))
    assert [d.source for d in config.datasets] == [
        f"sqlite:///{conf}/b.db?table=loans",
        "postgresql://reader@db:5432/bank?table=loans",
    ]
    source = open_source(config.datasets[0].source, dataset="bank_b.loans")
    assert sum(b.num_rows for b in source.batches([])) == 12


@pytest.mark.parametrize(("require", "outcome"), [(False, "1 skipped"), (True, "1 failed")])
def test_postgres_tests_skip_only_outside_ci(require: bool, outcome: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SEALROOM_REQUIRE_POSTGRES")}
    env["SEALROOM_TEST_POSTGRES_URI"] = "postgresql://nobody@127.0.0.1:1/none"
    if require:
        env["SEALROOM_REQUIRE_POSTGRES"] = "1"
    root = Path(__file__).resolve().parents[3]
    test = "tests/integration/test_db_postgres.py::test_round_trip_with_exact_types"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert "PostgreSQL is not reachable at postgresql://nobody@127.0.0.1:1/none" in proc.stdout


# --- Property: the database and DuckDB keep the same rows -------------------------------------

_STRINGS = ["retail", "Retail", "sme", "", "a_b", "a%b", "zz", "A", "B", "r%", "%b", "_", "a\\_b"]


def _atom(column: str, kind: str) -> st.SearchStrategy[str]:
    q = f'"{column}"'
    if kind == "string":
        lit = st.sampled_from([f"'{v}'" for v in _STRINGS])
        return st.one_of(
            st.builds(lambda op, v: f"{q} {op} {v}", st.sampled_from(["=", "<>", "<", "<=", ">", ">="]), lit),
            st.builds(lambda vs: f"{q} IN ({', '.join(vs)})", st.lists(lit, min_size=1, max_size=3)),
            st.builds(lambda v: f"{q} LIKE {v}", lit),
            st.builds(lambda a, b: f"{q} BETWEEN {a} AND {b}", lit, lit),
        )
    if kind == "date":
        day = st.dates(datetime.date(2023, 12, 1), datetime.date(2024, 5, 1)).map(lambda d: f"'{d.isoformat()}'")
        return st.builds(lambda op, v: f"{q} {op} {v}", st.sampled_from(["=", "<", ">="]), day)
    if kind == "bool":
        return st.sampled_from([q, f"NOT {q}", f"{q} = TRUE", f"{q} <> FALSE"])
    number = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["1.5", "2.0", "5.25", "-1.0", "0.0", "1e1"]))
    return st.one_of(
        st.builds(lambda op, v: f"{q} {op} {v}", st.sampled_from(["=", "<>", "<", ">", "<=", ">="]), number),
        st.builds(lambda vs: f"{q} IN ({', '.join(vs)})", st.lists(number, min_size=1, max_size=3)),
        st.builds(lambda a, b: f"{q} BETWEEN {a} AND {b}", number, number),
        st.just(f"{q} + 1 > 4"),
    )


def predicates(kinds: dict[str, str]) -> st.SearchStrategy[str]:
    """Filters as the planner pushes them, over columns of the given kinds."""
    atoms = st.one_of(
        *(_atom(c, k) for c, k in kinds.items()),
        st.sampled_from([f'"{c}" IS NULL' for c in kinds] + [f'NOT "{c}" IS NULL' for c in kinds]),
    )
    return st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.builds(lambda a, b: f"{a} AND {b}", inner, inner),
            st.builds(lambda a, b: f"({a} OR {b})", inner, inner),
            inner.map(lambda a: f"NOT ({a})"),
        ),
        max_leaves=4,
    )


KINDS = {"id": "int", "segment": "string", "rating": "string", "exposure": "float", "opened": "date"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(predicate=predicates({**KINDS, "defaulted": "bool"}))
def test_property_duckdb_file_keeps_what_duckdb_keeps(predicate: str, duckdb_file: Path) -> None:
    source = open_source(f"{duckdb_file}?table=loans", dataset=DATASET)
    got = [r["id"] for b in source.filtered_batches(["id"], predicate) for r in b.to_pylist()]
    assert got == _local(predicate, ["id"], ROWS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(predicate=predicates({**KINDS, "opened": "string"}))
def test_property_sqlite_keeps_what_duckdb_keeps(predicate: str, sqlite_file: Path) -> None:
    sqlite_rows = ROWS.drop_columns(["defaulted"]).set_column(4, "opened", ROWS.column("opened").cast(pa.string()))
    source = open_source(f"sqlite:///{sqlite_file}?table=loans", dataset=DATASET)
    got = [r["id"] for b in source.filtered_batches(["id"], predicate) for r in b.to_pylist()]
    assert got == _local(predicate, ["id"], sqlite_rows)


def test_a_case_insensitive_column_does_not_widen_the_pushed_filter(tmp_path: Path) -> None:
    """A DuckDB column declared COLLATE NOCASE: the filter pushed into the database must keep the
    rows the plan's filter keeps (byte-wise, as the enclave and the local filter compare), so a row
    the approved filter excludes never leaves the owner."""
    import duckdb

    path = tmp_path / "nocase.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t (name VARCHAR COLLATE NOCASE, v INTEGER)")
    con.execute("INSERT INTO t VALUES ('alice', 1), ('ALICE', 2), ('bob', 3)")
    con.close()
    source = open_source(f"duckdb:///{path}?table=t", dataset=DATASET)
    for predicate, expected in (
        ("\"name\" = 'alice'", [1]),
        ("\"name\" IN ('alice', 'bob')", [1, 3]),
        ("\"name\" <> 'alice'", [2, 3]),
        ("\"name\" LIKE 'a%'", [1]),
    ):
        got = [
            r["v"]
            for b in source.filtered_batches(["name", "v"], predicate, schema=source.schema)
            for r in b.to_pylist()
        ]
        assert sorted(got) == expected, predicate


def test_comments_in_the_analysts_sql_do_not_reach_the_database() -> None:
    schema = pa.schema([("segment", pa.string()), ("id", pa.int64())])
    pg = translate_filter(
        '"segment" = \'b\' /* note: customer 4711 */ AND "id" > 2 -- trailing', schema, dialect="postgres"
    )
    assert pg.where is not None and "4711" not in pg.where and "note" not in pg.where and "--" not in pg.where
