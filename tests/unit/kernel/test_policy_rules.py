"""Owners' policy files and the column rules the planner and the enclave enforce."""

from __future__ import annotations

import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, plan_query
from sealroom.errors import ConfigError, PolicyRefusalError
from sealroom.planning.disclosure import check_uses
from sealroom.planning.sql import analyze
from sealroom.policy import ColumnRule, DatasetPolicy, Dominance, load_policy_file

POLICY_TOML = """
privacy_unit = "customer_id"
min_group_size = 10
analysts = ["alice"]
approval = "auto"
dominance = { n = 2, k = 80 }

[columns]
customer_id = "join_key"
segment = "dimension"
rating = { role = "filter_only" }
exposure = { role = "measure", aggregates = ["sum", "avg"], min = 0, max = 1000000 }
ssn = "forbidden"
"""


def test_policy_file_round_trip(tmp_path):
    path = tmp_path / "loans.toml"
    path.write_text(POLICY_TOML)
    p = load_policy_file(path)
    assert p.privacy_unit == "customer_id" and p.min_group_size == 10 and p.analysts == ("alice",)
    assert p.approval == "auto" and p.dominance == Dominance(2, 80.0)
    assert p.rule("exposure") == ColumnRule("measure", ("sum", "avg"), 0.0, 1_000_000.0)
    assert p.rule("segment").role == "dimension"
    assert p.rule("unlisted").role == "forbidden"  # a policy that lists columns protects the rest
    assert DatasetPolicy().rule("anything").role == "open"
    assert DatasetPolicy.from_json(p.canonical()) == p and DatasetPolicy.from_json(p.canonical()).digest() == p.digest()


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("min_group_size = 0", "min_group_size", "integer >= 1"),
        ("min_group_size = true", "min_group_size", "integer >= 1"),
        ("approval = 'sometimes'", "approval", "one of auto"),
        ("analysts = []", "analysts", "non-empty list"),
        ("colour = 'red'", "colour", "unknown key"),
        ("[columns]\nx = 'boss'", "columns.x.role", "one of join_key"),
        ("[columns]\nx = { role = 'dimension', min = 1 }", "columns.x.min", "only a measure"),
        ("[columns]\nx = { role = 'measure', aggregates = ['median'] }", "columns.x.aggregates", "drawn from"),
        ("[columns]\nx = { role = 'measure', min = 5, max = 1 }", "columns.x.min", "at most"),
        ("[columns]\nx = { role = 'measure', max = 'lots' }", "columns.x.max", "a number"),
        ("dominance = { n = 0, k = 80 }", "dominance.n", "integer >= 1"),
        ("dominance = { n = 1, k = 120 }", "dominance.k", "percentage"),
        ("privacy_unit = 'id'\n[columns]\nid = 'measure'", "columns.id.role", "privacy unit"),
        ("default_role = 'maybe'", "default_role", "one of"),
    ],
)
def test_malformed_policies_name_file_key_and_expectation(tmp_path, text, key, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_policy_file(path)
    assert info.value.details == {"file": str(path), "key": key}
    assert str(path) in info.value.message


SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("segment", pa.string()),
        ("rating", pa.string()),
        ("exposure", pa.float64()),
        ("ssn", pa.string()),
    ]
)
POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "customer_id",
        "columns": {
            "customer_id": "join_key",
            "segment": "dimension",
            "rating": "filter_only",
            "exposure": {"role": "measure", "aggregates": ["sum", "avg"]},
            "ssn": "forbidden",
        },
    }
)
CATALOG = {f"bank_{x}.loans": CatalogEntry(f"bank_{x}", "loans", SCHEMA, POLICY) for x in "ab"}
KEYS = {"bank_a": "00" * 32, "bank_b": "00" * 32}
JOIN = "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id"


def plan(sql):
    return plan_query(sql, query_id="q", analyst="alice", catalog=CATALOG, party_keys=KEYS)


@pytest.mark.parametrize(
    ("sql", "party", "column", "use", "message"),
    [
        (
            f"SELECT b.customer_id, COUNT(*) {JOIN} GROUP BY b.customer_id",
            "bank_b",
            "customer_id",
            "group",
            "bank_b.loans.customer_id is a join key and cannot be grouped by or output: group by a dimension such "
            "as segment: customer_id is the privacy unit of bank_b.loans, which is never grouped by",
        ),
        (
            "SELECT segment, MAX(exposure) FROM bank_a.loans GROUP BY segment",
            "bank_a",
            "exposure",
            "aggregate:max",
            "use one of SUM, AVG on exposure, or ask bank_a to allow MAX on it",
        ),
        ("SELECT rating, COUNT(*) FROM bank_a.loans GROUP BY rating", "bank_a", "rating", "group", "filter-only"),
        ("SELECT COUNT(ssn) FROM bank_a.loans", "bank_a", "ssn", "aggregate:count", "does not share it"),
        (
            "SELECT a.segment, COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.segment = b.segment "
            "GROUP BY a.segment",
            "bank_a",
            "segment",
            "join",
            "join on a join key such as customer_id",
        ),
        ("SELECT SUM(segment) FROM bank_a.loans", "bank_a", "segment", "aggregate:sum", r"COUNT or COUNT\(DISTINCT\)"),
        (
            "SELECT segment, COUNT(*) FROM bank_a.loans WHERE exposure > 5 GROUP BY segment",
            "bank_a",
            "exposure",
            "filter",
            "remove the condition on exposure",
        ),
    ],
)
def test_refusals_name_party_dataset_column_rule_and_fix(sql, party, column, use, message):
    with pytest.raises(PolicyRefusalError, match=message) as info:
        plan(sql)
    d = info.value.details
    assert (d["party"], d["dataset"], d["column"], d["rule"], d["use"]) == (party, "loans", column, "column_role", use)
    assert d["suggestion"] and d["suggestion"] in info.value.message
    assert info.value.grpc_status.name == "PERMISSION_DENIED"


def test_allowed_uses_plan_fine():
    p = plan(
        f"SELECT a.segment, COUNT(DISTINCT a.customer_id) AS n, SUM(a.exposure + b.exposure) AS total, "
        f"AVG(b.exposure) {JOIN} WHERE a.rating = 'A' GROUP BY a.segment"
    )
    # rating is only filtered on: bank_a applies the filter itself and does not send the column.
    assert [i.columns for i in p[0].stages[0].inputs] == [
        ("customer_id", "segment", "exposure"),
        ("customer_id", "exposure"),
    ]
    assert [(i.filter, i.filter_columns) for i in p[0].stages[0].inputs] == [
        ("\"rating\" = 'A'", ("rating",)),
        (None, ()),
    ]


def test_union_branch_columns_are_charged_to_their_datasets():
    sql = (
        "SELECT segment, SUM(x) FROM (SELECT segment, exposure AS x FROM bank_a.loans "
        "UNION ALL SELECT segment, rating AS x FROM bank_b.loans) u GROUP BY segment"
    )
    with pytest.raises(PolicyRefusalError) as info:
        plan(sql)
    assert (info.value.details["party"], info.value.details["column"]) == ("bank_b", "rating")


def test_check_uses_is_usable_by_the_enclave_directly():
    an = analyze("SELECT segment, SUM(exposure) FROM bank_a.loans GROUP BY segment", {"bank_a.loans": SCHEMA.names})
    check_uses(an.uses, {"bank_a.loans": POLICY}, {"bank_a.loans": SCHEMA.names})
    strict = DatasetPolicy.from_dict({"columns": {"segment": "dimension"}})  # exposure unlisted -> forbidden
    with pytest.raises(PolicyRefusalError, match="exposure is forbidden"):
        check_uses(an.uses, {"bank_a.loans": strict}, {"bank_a.loans": SCHEMA.names})


def test_a_join_key_that_is_not_the_unit_gets_the_make_it_a_dimension_suggestion():
    policy = DatasetPolicy.from_dict(
        {"privacy_unit": "ssn", "columns": {"customer_id": "join_key", "segment": "dimension", "ssn": "filter_only"}}
    )
    catalog = {"bank_b.loans": CatalogEntry("bank_b", "loans", SCHEMA, policy)}
    with pytest.raises(PolicyRefusalError) as info:
        plan_query(
            "SELECT customer_id, COUNT(*) FROM bank_b.loans GROUP BY customer_id",
            query_id="q",
            analyst="alice",
            catalog=catalog,
            party_keys=KEYS,
        )
    assert info.value.message == (
        "bank_b.loans.customer_id is a join key and cannot be grouped by or output: group by a dimension such as "
        "segment, or ask bank_b to make customer_id a dimension"
    )


@pytest.mark.parametrize("bad", ["version = true", "[columns]\nx = { role = 'measure', max = nan }"])
def test_booleans_and_nan_are_refused(tmp_path, bad):
    path = tmp_path / "p.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError):
        load_policy_file(path)


def test_policy_to_toml_reads_back_equal(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY_TOML)
    p = load_policy_file(path)
    again = tmp_path / "again.toml"
    again.write_text(p.to_toml())
    assert load_policy_file(again) == p and load_policy_file(again).digest() == p.digest()
    open_policy = DatasetPolicy(privacy_unit="id", min_group_size=3)
    again.write_text(open_policy.to_toml())
    assert load_policy_file(again) == open_policy


def test_explain_shows_rules_per_output_and_approval_modes():
    from coordinator.planner import explain_text

    strict = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 7,
            "approval": "auto",
            "dominance": {"n": 2, "k": 90},
            "columns": {
                "customer_id": "join_key",
                "segment": "dimension",
                "exposure": {"role": "measure", "aggregates": ["sum"], "min": 0, "max": 100},
            },
        }
    )
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", SCHEMA, strict)}
    p, an = plan_query(
        "SELECT segment, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment",
        query_id="explain",
        analyst="alice",
        catalog=catalog,
        party_keys=KEYS,
    )
    text = explain_text(p, an)
    assert "segment: group key" in text
    assert "total: min 7 distinct units per cell (bank_a.loans); bank_a.loans.exposure clamped to [0, 100]" in text
    assert "dominance (2, 90 %) of bank_a.loans" in text
    assert "bank_a.loans: customer_id, segment, exposure" in text
    assert "Approvals needed from: bank_a (automatic)" in text


@pytest.mark.parametrize(
    ("sql", "column", "use"),
    [
        # a condition on a join key inside an aggregate would locate one customer in a segment
        ("SELECT segment, COUNT(CASE WHEN customer_id = 42 THEN 1 END) FROM bank_a.loans GROUP BY segment",
         "customer_id", "aggregate_filter"),
        # a comparison on a measure inside an aggregate filters on it, which WHERE may not
        ("SELECT segment, COUNT(CASE WHEN exposure > 100 THEN 1 END) FROM bank_a.loans GROUP BY segment",
         "exposure", "aggregate_filter"),
        ("SELECT segment, SUM(CAST(exposure > 100 AS INT)) FROM bank_a.loans GROUP BY segment", "exposure",
         "aggregate_filter"),
    ],
)  # fmt: skip
def test_conditions_inside_aggregates_are_filter_uses(sql, column, use):
    with pytest.raises(PolicyRefusalError) as info:
        plan(sql)
    assert (info.value.details["column"], info.value.details["use"]) == (column, use)


def test_conditional_sums_on_dimensions_are_allowed():
    p, an = plan(
        "SELECT segment, SUM(CASE WHEN segment = 'retail' THEN exposure END) AS s FROM bank_a.loans GROUP BY 1"
    )
    assert an.uses["bank_a.loans"] == {"segment": {"group", "aggregate_filter"}, "exposure": {"aggregate:sum"}}


def test_renaming_the_privacy_unit_in_a_union_does_not_escape_the_group_by_refusal():
    from sealroom.planning.sql import InputSpec, compile_stage

    sql = (
        "SELECT c, COUNT(*) FROM (SELECT customer_id AS c, segment FROM bank_a.loans "
        "UNION ALL SELECT customer_id AS c, segment FROM bank_b.loans) u GROUP BY c"
    )
    specs = [
        InputSpec(f"bank_{x}.loans", f"t{i}", ("customer_id", "segment"), "customer_id") for i, x in enumerate("ab")
    ]
    with pytest.raises(Exception, match="privacy unit of bank_a.loans"):
        compile_stage(sql, specs)


def test_planner_and_enclave_name_unaliased_outputs_alike():
    from sealroom.planning.sql import InputSpec, compile_stage

    sql = (
        "SELECT segment, AVG(exposure) FROM (SELECT * FROM bank_a.loans UNION ALL SELECT * FROM bank_b.loans) u "
        "GROUP BY segment"
    )
    an = analyze(sql, {f"bank_{x}.loans": SCHEMA.names for x in "ab"})
    specs = [InputSpec(q, f"t{i}", an.needed_columns[q], None) for i, q in enumerate(an.datasets)]
    assert compile_stage(an.sql, specs).output_columns == an.output_columns == ("segment", "avg(exposure)")


def _claims(*, simulated=True, measurement="ab" * 48):
    from datetime import UTC, datetime

    from sealroom.attestation import Claims

    return Claims(
        platform="simulated",
        measurement=measurement,
        debug=False,
        tcb={},
        report_data=b"\0" * 64,
        nonce=b"\0" * 32,
        issued_at=datetime.now(UTC),
        simulated=simulated,
    )


def test_a_datasets_trust_section_narrows_the_agents(tmp_path):
    from sealroom.errors import AttestationError
    from sealroom.policy import DatasetTrust

    path = tmp_path / "p.toml"
    path.write_text(f'trust = {{ measurements = ["{"cd" * 48}"], allow_simulated = false }}\n')
    trust = load_policy_file(path).trust
    assert trust == DatasetTrust(("cd" * 48,), False, False)
    with pytest.raises(AttestationError, match="refuses simulated attestation") as info:
        trust.check(_claims(simulated=True, measurement="cd" * 48), dataset="bank_a.loans")
    assert info.value.details["check"] == "simulated"
    with pytest.raises(AttestationError, match="not among those") as info:
        trust.check(_claims(simulated=False), dataset="bank_a.loans")
    trust.check(_claims(simulated=False, measurement="cd" * 48), dataset="bank_a.loans")  # accepted
    DatasetTrust().check(_claims(), dataset="bank_a.loans")  # no section: the agent's [trust] decides
    path.write_text("trust = { mpc_only = true }\n")
    with pytest.raises(AttestationError, match="mpc_only"):
        load_policy_file(path).trust.check(_claims(simulated=False), dataset="bank_a.loans")
    again = tmp_path / "again.toml"
    again.write_text(load_policy_file(path).to_toml())
    assert load_policy_file(again) == load_policy_file(path)


def test_an_mpc_only_dataset_is_refused_with_what_to_do():
    mpc = DatasetPolicy.from_dict({"privacy_unit": "customer_id", "trust": {"mpc_only": True}})
    catalog = {"bank_a.loans": CatalogEntry("bank_a", "loans", SCHEMA, mpc)}
    with pytest.raises(PolicyRefusalError, match="goes to no enclave") as info:
        plan_query(
            "SELECT segment, COUNT(*) FROM bank_a.loans GROUP BY segment",
            query_id="q",
            analyst="alice",
            catalog=catalog,
            party_keys=KEYS,
        )
    assert info.value.details["rule"] == "mpc_only" and "measurement" in info.value.details["suggestion"]


@pytest.mark.parametrize("bad", ["trust = { mpc_only = 1 }", "trust = { measurements = ['zz'] }", "trust = 5"])
def test_malformed_trust_sections(tmp_path, bad):
    path = tmp_path / "p.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match="trust"):
        load_policy_file(path)
