"""Filter pushdown: which conditions each party applies itself, what the enclave still runs, what is
no longer sent, and that the planner, the enclave and the parties agree (a tampered filter is refused)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from connectors.agent import (
    MIN_PADDED_ROWS,
    DatasetConfig,
    PartyAgent,
    PartyConfig,
    filtered_batches,
    frame_rows,
    padded_batches,
)
from connectors.sources.memory import TableSource
from coordinator.planner import CatalogEntry, explain_text, plan_query
from enclave_worker.jobs import JobRegistry
from sealroom.errors import InvalidQueryError, PolicyRefusalError, SourceError
from sealroom.keys import generate_signing_key
from sealroom.planning.plan import Plan, PlanInput, stage_pushdown
from sealroom.planning.sql import PAD_COLUMN, analyze, pushdown
from sealroom.policy import DatasetPolicy, TrustPolicy

BANK = ["customer_id", "segment", "rating", "exposure", "defaulted"]
SCHEMAS = {f"bank_{x}.loans": BANK for x in "abc"}
HOSP = {f"h{i}.stays": ["patient_id", "diagnosis", "age", "cost"] for i in (1, 2)}
JOIN = "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id"
UNION = "FROM (SELECT * FROM h1.stays WHERE cost > 10 UNION ALL SELECT * FROM h2.stays) u"

BANK_SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("segment", pa.string()),
        ("rating", pa.string()),
        ("exposure", pa.float64()),
        ("defaulted", pa.bool_()),
    ]
)
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
SECRET = "SECRET-7f3a1c"


# --------------------------------------------------------------------------------------------------
# what is pushed, what stays


@pytest.mark.parametrize(
    ("where", "filters", "residual_where"),
    [
        # single-table conditions go to their dataset, AND-ed in the order written
        (
            "b.rating = 'A' AND a.segment <> 'sme' AND a.exposure > 10",
            {"bank_a.loans": '"segment" <> \'sme\' AND "exposure" > 10', "bank_b.loans": "\"rating\" = 'A'"},
            None,
        ),
        # an OR within one dataset is one condition of that dataset; nested parentheses are split on AND
        (
            "(a.rating = 'A' OR a.rating IS NULL) AND (b.defaulted AND b.exposure > 1)",
            {
                "bank_a.loans": '("rating" = \'A\' OR "rating" IS NULL)',
                "bank_b.loans": '"defaulted" AND "exposure" > 1',
            },
            None,
        ),
        # a condition across datasets stays in the enclave, the rest is pushed
        (
            "a.exposure + b.exposure > 100 AND b.rating = 'A'",
            {"bank_b.loans": "\"rating\" = 'A'"},
            "a.exposure + b.exposure > 100",
        ),
        # an OR across datasets stays
        ("(a.rating = 'A' OR b.rating = 'A')", {}, "(a.rating = 'A' OR b.rating = 'A')"),
        # a condition that reads no column stays (nothing for a party to apply it to)
        ("1 = 1 AND a.defaulted", {"bank_a.loans": '"defaulted"'}, "1 = 1"),
    ],
)
def test_single_dataset_conditions_are_pushed_and_the_rest_stays(where, filters, residual_where):
    an = analyze(f"SELECT a.segment, COUNT(*) {JOIN} WHERE {where} GROUP BY a.segment", SCHEMAS)
    assert {q: f for q, f in an.filters.items() if f is not None} == filters
    expected = f"SELECT a.segment, COUNT(*) {JOIN.replace(' a ', ' AS a ').replace(' b ', ' AS b ')}"
    if residual_where:
        expected += f" WHERE {residual_where}"
    assert an.residual_sql == expected + " GROUP BY a.segment"
    # The SQL the owners sign is the full query, filters included.
    assert an.sql.count("WHERE") == 1


def test_union_branch_where_is_pushed_but_a_condition_on_the_union_alias_stays():
    sql = f"SELECT diagnosis, COUNT(*), AVG(age) {UNION} WHERE u.age > 30 GROUP BY diagnosis"
    an = analyze(sql, HOSP)
    assert an.filters == {"h1.stays": '"cost" > 10', "h2.stays": None}
    assert an.filter_columns == {"h1.stays": ("cost",), "h2.stays": ()}
    assert an.residual_sql == (
        "SELECT u.diagnosis, COUNT(*), AVG(u.age) FROM (SELECT * FROM h1.stays UNION ALL SELECT * FROM h2.stays) "
        "AS u WHERE u.age > 30 GROUP BY u.diagnosis"
    )
    # cost is not sent: only h1's own filter reads it.
    assert an.needed_columns == {"h1.stays": ("diagnosis", "age"), "h2.stays": ("diagnosis", "age")}


def test_a_filter_only_column_is_no_longer_sent_but_is_still_a_filter_use():
    an = analyze(f"SELECT a.segment, SUM(b.exposure) {JOIN} WHERE b.rating = 'A' GROUP BY a.segment", SCHEMAS)
    assert an.needed_columns == {
        "bank_a.loans": ("customer_id", "segment"),
        "bank_b.loans": ("customer_id", "exposure"),
    }
    assert an.filter_columns["bank_b.loans"] == ("rating",)
    assert an.uses["bank_b.loans"]["rating"] == frozenset({"filter"})
    # A column both filtered on and used elsewhere is still sent.
    an = analyze(f"SELECT b.rating, COUNT(*) {JOIN} WHERE b.rating <> 'D' GROUP BY b.rating", SCHEMAS)
    assert "rating" in an.needed_columns["bank_b.loans"]
    assert an.uses["bank_b.loans"]["rating"] == frozenset({"filter", "group"})


def test_roles_still_apply_to_pushed_filters():
    policy = DatasetPolicy.from_dict(
        {"privacy_unit": "customer_id", "columns": {"customer_id": "join_key", "segment": "dimension"}}
    )
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", BANK_SCHEMA, policy)}
    with pytest.raises(PolicyRefusalError, match="rating is forbidden"):
        plan_query(
            "SELECT segment, COUNT(*) FROM bank_a.loans WHERE rating = 'A' GROUP BY segment",
            query_id="q",
            analyst="alice",
            catalog=catalog,
            party_keys={"bank_a": "00" * 32},
        )


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELECT COUNT(*) FROM (SELECT * FROM h1.stays WHERE __sr_pad UNION ALL SELECT * FROM h2.stays) u", "reserved"),
        (
            "SELECT COUNT(*) FROM (SELECT * FROM h1.stays WHERE age IN (SELECT age FROM h2.stays) "
            "UNION ALL SELECT * FROM h2.stays) u",
            "subqueries",
        ),
        ("SELECT COUNT(*) FROM (SELECT * FROM h1.stays WHERE x.cost > 1 UNION ALL SELECT * FROM h2.stays) u", "belong"),
    ],
)
def test_union_branch_filters_are_checked(sql, match):
    with pytest.raises(InvalidQueryError, match=match):
        analyze(sql, HOSP)


# --------------------------------------------------------------------------------------------------
# plans: planner, enclave and parties agree; a tampered filter is refused


def _catalog(policy: DatasetPolicy = POLICY) -> dict[str, CatalogEntry]:
    return {f"bank_{x}.loans": CatalogEntry(f"bank_{x}", "loans", BANK_SCHEMA, policy) for x in "ab"}


def _plan(sql: str, keys: dict[str, str] | None = None) -> Plan:
    keys = keys or {"bank_a": "00" * 32, "bank_b": "11" * 32}
    plan, _ = plan_query(sql, query_id="q1", analyst="alice", catalog=_catalog(), party_keys=keys)
    return plan


SQL = (
    f"SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total {JOIN} "
    "WHERE b.rating = 'A' AND NOT a.defaulted AND a.exposure > b.exposure GROUP BY a.segment"
)


def _retamper(plan: Plan, party: str, **changes: object) -> Plan:
    stage = plan.stages[0]
    inputs = tuple(dataclasses.replace(i, **changes) if i.party == party else i for i in stage.inputs)
    return dataclasses.replace(plan, stages=(dataclasses.replace(stage, inputs=inputs),))


def test_plan_carries_filters_and_round_trips():
    plan = _plan(SQL)
    a, b = plan.stages[0].inputs
    assert (a.columns, a.filter, a.filter_columns) == (
        ("customer_id", "segment", "exposure"),
        'NOT "defaulted"',
        ("defaulted",),
    )
    assert (b.columns, b.filter, b.filter_columns) == (("customer_id", "exposure"), "\"rating\" = 'A'", ("rating",))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash


def test_old_plans_without_filters_load_and_hash_as_before():
    plan = _plan(f"SELECT a.segment, COUNT(*) {JOIN} GROUP BY a.segment")
    doc = plan.to_json()
    assert b"filter" not in doc  # no keys when nothing is pushed: the plan reads as it always did
    assert Plan.from_json(doc).stages[0].inputs[0].filter is None
    assert Plan.from_json(doc).stages[0].inputs[0].filter_columns == ()


def test_planner_and_enclave_views_agree():
    plan = _plan(SQL)
    stage = plan.stages[0]
    pd = stage_pushdown(stage)  # what the enclave and each party recompute, from the plan alone
    for inp in stage.inputs:
        assert (pd.filters[inp.qualified].sql, pd.filters[inp.qualified].columns) == (inp.filter, inp.filter_columns)
    assert pd.residual_sql.endswith("WHERE a.exposure > b.exposure GROUP BY a.segment")


def test_enclave_compiles_only_the_residual(registry: JobRegistry):
    job = registry.create(_plan(SQL).to_json())
    sql = job.compiled.aggregate_sql
    assert "a.exposure > b.exposure" in sql
    assert "rating" not in sql and "defaulted" not in sql
    registry.abort(job.id, job.token)


@pytest.mark.parametrize(
    "changes",
    [
        {"filter": "\"rating\" = 'B'"},  # another predicate
        {"filter": "TRUE", "filter_columns": ()},  # a weaker one
        {"filter": None, "filter_columns": ()},  # dropped: the enclave would not apply it either
        {"filter_columns": ("rating", "segment")},  # read (and so disclose to DuckDB) another column
    ],
)
def test_enclave_refuses_a_plan_whose_filter_is_not_the_sqls(registry: JobRegistry, changes):
    tampered = _retamper(_plan(SQL), "bank_b", **changes)
    # Either the filter differs, or (filter columns dropped) the SQL no longer resolves over the inputs.
    with pytest.raises(InvalidQueryError, match="not the one its SQL implies|plan is inconsistent") as info:
        registry.create(tampered.to_json())
    assert info.value.details["check"] == "filter"


def test_enclave_refuses_a_filter_pushed_where_the_sql_has_none(registry: JobRegistry):
    plan = _plan(f"SELECT a.segment, COUNT(*) {JOIN} GROUP BY a.segment")
    tampered = _retamper(plan, "bank_a", filter="\"segment\" = 'x'", filter_columns=("segment",))
    with pytest.raises(InvalidQueryError, match="filter for bank_a.loans"):
        registry.create(tampered.to_json())


def test_enclave_refuses_a_residual_that_reads_a_filter_only_column(registry: JobRegistry):
    """A coordinator that declares a sent column filter-only cannot make the enclave read it."""
    plan = _plan(f"SELECT a.segment, COUNT(*) {JOIN} WHERE a.rating = 'A' GROUP BY a.segment")
    stage = plan.stages[0]
    a = stage.inputs[0]
    tampered = _retamper(plan, "bank_a", columns=tuple(c for c in a.columns if c != "segment"))
    with pytest.raises(InvalidQueryError, match="segment"):
        registry.create(tampered.to_json())


@pytest.fixture
def agent(tmp_path: Path) -> PartyAgent:
    table = pa.table(
        {
            "customer_id": pa.array(range(8), pa.int64()),
            "segment": [SECRET, "x", "y", "x", "y", "x", "y", "x"],
            "rating": ["A", "B", "A", "A", None, "A", "B", "A"],
            "exposure": pa.array([float(i) for i in range(8)]),
            "defaulted": [False, True, False, False, False, True, False, False],
        },
        schema=BANK_SCHEMA,
    )
    path = tmp_path / "b.parquet"
    pq.write_table(table, path)
    config = PartyConfig(
        name="bank_b",
        coordinator="127.0.0.1:9",
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("loans", str(path), POLICY),),
        unsafe_no_witness=True,  # no coordinator, so no log to witness
    )
    return PartyAgent(config, signing_key=generate_signing_key())


def test_agent_review_accepts_its_filter_and_refuses_a_tampered_one(agent: PartyAgent):
    keys = {"bank_a": "00" * 32, "bank_b": agent.public_key_hex}
    plan = _plan(SQL, keys)
    plan_hash, signature, _ = agent.review(plan.to_json())
    assert signature is not None and plan_hash == plan.hash
    for changes in (
        {"filter": "\"rating\" <> 'A'"},
        {"filter": None, "filter_columns": ()},
        {"filter_columns": ("rating", "segment")},
    ):
        with pytest.raises(InvalidQueryError, match="not the one its SQL implies|plan is inconsistent"):
            agent.review(_retamper(plan, "bank_b", **changes).to_json())
    # A filter column the dataset does not have is refused by name.
    bad = _retamper(plan, "bank_b", filter='"nope" = 1', filter_columns=("nope",))
    with pytest.raises(PolicyRefusalError, match="no column nope"):
        agent.review(bad.to_json())


def test_agent_refuses_another_partys_tampered_filter_too(agent: PartyAgent):
    """The plan it signs must compute the SQL it signs: every party's filter is checked."""
    keys = {"bank_a": "00" * 32, "bank_b": agent.public_key_hex}
    plan = _retamper(_plan(SQL, keys), "bank_a", filter='"defaulted" OR TRUE')
    with pytest.raises(InvalidQueryError, match="filter for bank_a.loans is not the one its SQL implies"):
        agent.review(plan.to_json())


# --------------------------------------------------------------------------------------------------
# the party's side: filtering and padding


def _input(sql: str, party: str = "bank_b") -> PlanInput:
    (inp,) = [i for i in _plan(sql).stages[0].inputs if i.party == party]
    return inp


def test_filtered_batches_keep_matching_rows_with_exact_types():
    table = pa.table(
        {
            "customer_id": pa.array(range(10), pa.int64()),
            "segment": [f"s{i % 3}" for i in range(10)],
            "rating": ["A", None, "B", "A", "A", "C", None, "A", "B", "A"],
            "exposure": pa.array([float(i) for i in range(10)]),
            "defaulted": [i % 4 == 0 for i in range(10)],
        },
        schema=BANK_SCHEMA,
    )
    inp = _input(f"SELECT a.segment, COUNT(*) {JOIN} WHERE b.rating = 'A' AND NOT b.defaulted GROUP BY a.segment")
    assert inp.filter_columns == ("rating", "defaulted") and "rating" not in inp.columns
    source = TableSource(table, dataset="bank_b.loans")
    out = pa.Table.from_batches(list(filtered_batches(source, BANK_SCHEMA, inp)))
    assert out.schema == pa.schema([BANK_SCHEMA.field(c) for c in inp.columns])
    assert out.column("customer_id").to_pylist() == [3, 7, 9]  # NULL ratings are dropped, as WHERE does


def test_filter_errors_quote_no_value():
    table = pa.table(
        {
            "customer_id": pa.array([1, 2], pa.int64()),
            "segment": ["x", "y"],
            "rating": [SECRET, "1"],
            "exposure": pa.array([1.0, 2.0]),
            "defaulted": [False, False],
        },
        schema=BANK_SCHEMA,
    )
    inp = _input(f"SELECT a.segment, COUNT(*) {JOIN} WHERE CAST(b.rating AS INTEGER) > 0 GROUP BY a.segment")
    # A filter that raises on a value drops that row (an error would be an oracle on the value).
    kept = list(filtered_batches(TableSource(table, dataset="bank_b.loans"), BANK_SCHEMA, inp))
    assert [r["customer_id"] for b in kept for r in b.to_pylist()] == [2]
    # An error that remains (here a function DuckDB does not know) is reported by its kind only.
    broken = dataclasses.replace(inp, filter=f'no_such_function("rating") OR "rating" = \'{SECRET}\'')
    with pytest.raises(SourceError) as info:
        list(filtered_batches(TableSource(table, dataset="bank_b.loans"), BANK_SCHEMA, broken))
    assert SECRET not in info.value.message and SECRET not in str(info.value.details)
    assert "CatalogException" in info.value.message or "BinderException" in info.value.message


def test_filters_run_without_file_access(tmp_path: Path):
    secret_file = tmp_path / "s.txt"
    secret_file.write_text("x")
    table = pa.table({"customer_id": [1], "segment": ["x"], "rating": ["A"], "exposure": [1.0], "defaulted": [False]})
    inp = dataclasses.replace(
        _input(f"SELECT a.segment, COUNT(*) {JOIN} WHERE b.rating = 'A' GROUP BY a.segment"),
        filter=f"\"rating\" IN (SELECT content FROM read_text('{secret_file}'))",
    )
    with pytest.raises(SourceError, match="failed in DuckDB"):
        list(filtered_batches(TableSource(table.cast(BANK_SCHEMA), dataset="bank_b.loans"), BANK_SCHEMA, inp))


SEALED = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("segment", pa.string()),
        ("exposure", pa.float64()),
        pa.field(PAD_COLUMN, pa.bool_(), nullable=False),
    ]
)


def _real(n: int) -> list[pa.RecordBatch]:
    if n == 0:
        return []
    t = pa.table(
        {
            "customer_id": pa.array(range(n), pa.int64()),
            "segment": [None if i % 7 == 3 else f"segment-{i % 5}" for i in range(n)],
            "exposure": pa.array([None if i % 11 == 5 else float(i) for i in range(n)], pa.float64()),
        }
    )
    return t.to_batches(max_chunksize=1000)


def test_padding_hides_small_counts_and_keeps_every_real_row():
    shapes = set()
    for n in (0, 1, 4, 999, 3000):
        batches = list(padded_batches(iter(_real(n)), SEALED))
        table = pa.Table.from_batches(batches)
        assert table.num_rows == MIN_PADDED_ROWS
        real = table.filter(pc.invert(table.column(PAD_COLUMN)))
        assert (
            real.drop_columns([PAD_COLUMN]).to_pylist()
            == pa.Table.from_batches(_real(n) or [], schema=SEALED.remove(3)).to_pylist()
        )
        shapes.add(tuple(b.serialize().size for b in batches))
    # Same number of frames, same sizes, whatever the count.
    assert len(shapes) == 1
    (shape,) = shapes
    assert len(shape) == MIN_PADDED_ROWS // frame_rows(SEALED)


def test_padding_rounds_large_counts_up_to_a_power_of_two():
    n = MIN_PADDED_ROWS + 5
    batches = list(padded_batches(iter(_real(n)), SEALED))
    assert sum(b.num_rows for b in batches) == 2 * MIN_PADDED_ROWS
    assert sum(pc.sum(pc.invert(b.column(PAD_COLUMN))).as_py() for b in batches) == n


def test_explain_names_the_filter_each_party_applies():
    plan, an = plan_query(
        f"SELECT a.segment, COUNT(*) {JOIN} WHERE b.rating = 'A' GROUP BY a.segment",
        query_id="explain",
        analyst="alice",
        catalog=_catalog(),
        party_keys={"bank_a": "00" * 32, "bank_b": "11" * 32},
    )
    text = explain_text(plan, an)
    assert "filter applied by bank_b: rating = 'A'" in text
    assert "inside the enclave" not in text  # everything was pushed
    assert "bank_b.loans: customer_id  [" in text  # rating is not sent
    plan, an = plan_query(
        SQL,
        query_id="explain",
        analyst="alice",
        catalog=_catalog(),
        party_keys={"bank_a": "0" * 64, "bank_b": "1" * 64},
    )
    text = explain_text(plan, an)
    assert "filter applied by bank_a: NOT defaulted" in text
    assert "the rest of WHERE" in text and "inside the enclave" in text


def test_pushdown_view_hides_filter_only_columns_from_star():
    """The enclave's view: a star branch expands to what is sent, not to what a filter reads."""
    an = analyze(f"SELECT diagnosis, COUNT(*) {UNION} GROUP BY diagnosis", HOSP)
    view = {q: (("patient_id", "diagnosis"), an.filter_columns[q]) for q in an.datasets}
    pd = pushdown(an.sql, view)
    assert pd.filters["h1.stays"].sql == '"cost" > 10' and "h2.stays" not in pd.filters
    assert "cost" not in pd.residual_sql


def test_unqualified_columns_are_pushed_to_their_dataset():
    an = analyze("SELECT segment, COUNT(*) FROM bank_a.loans WHERE rating = 'A' GROUP BY segment", SCHEMAS)
    assert an.filters == {"bank_a.loans": "\"rating\" = 'A'"}
    assert an.residual_sql == "SELECT loans.segment, COUNT(*) FROM bank_a.loans GROUP BY loans.segment"
