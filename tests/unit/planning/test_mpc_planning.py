"""Planning MPC and hybrid stages: when the planner chooses MPC, the plan format, the refusals that
say what would make a query runnable, explain, and the party agent's own re-check of an MPC stage."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from coordinator.planner import CatalogEntry, explain_text, plan_query
from sealroom.errors import ConfigError, InvalidQueryError, PolicyRefusalError
from sealroom.keys import generate_signing_key
from sealroom.planning.mpc_spec import StageSpec
from sealroom.planning.plan import (
    HelperHolder,
    MpcStage,
    PartyHolder,
    Plan,
    Stage,
    TeeStage,
    mpc_player_keys,
    mpc_stage_query,
)
from sealroom.policy import ColumnRule, DatasetPolicy, DatasetTrust, Dominance, TrustPolicy, load_policy_file

HOSPITALS = ("hospital_north", "hospital_south", "hospital_east")
SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("age", pa.int32()),
        ("age_band", pa.string()),
        ("diagnosis", pa.string()),
        ("length_of_stay", pa.int32()),
        ("cost", pa.float64()),
    ]
)
DIAGNOSES = ["cardiology", "oncology", "orthopedics"]
BANDS = ["0-39", "40-64", "65+"]
POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "patient_id",
        "min_group_size": 5,
        "columns": {
            "patient_id": "join_key",
            "diagnosis": {"role": "dimension", "values": DIAGNOSES},
            "age_band": {"role": "dimension", "values": BANDS},
            "age": {"role": "dimension", "bins": [0, 18, 65, 120]},
            "length_of_stay": {"role": "measure", "aggregates": ["sum", "avg", "min", "max"], "min": 0, "max": 365},
            "cost": {"role": "measure", "aggregates": ["sum", "avg", "stddev", "var"], "min": 0, "max": 1e6},
        },
    }
)
MPC_ONLY = dataclasses.replace(POLICY, trust=DatasetTrust(mpc_only=True))
UNION = (
    "(SELECT * FROM hospital_north.stays UNION ALL SELECT * FROM hospital_south.stays "
    "UNION ALL SELECT * FROM hospital_east.stays) s"
)
COHORT = (
    "SELECT diagnosis, age_band, COUNT(*) AS stays, AVG(length_of_stay) AS mean_stay, STDDEV_SAMP(cost) AS sd_cost "
    f"FROM {UNION} GROUP BY diagnosis, age_band ORDER BY diagnosis, age_band"
)
KEYS = {h: f"{n:02x}" * 32 for n, h in enumerate(HOSPITALS, 1)}


def _catalog(**policies: DatasetPolicy) -> dict[str, CatalogEntry]:
    return {f"{h}.stays": CatalogEntry(h, "stays", SCHEMA, policies.get(h, POLICY)) for h in HOSPITALS}


HELPER = "ab" * 32  # the coordinator's key, as the planner names it for its helper player


def _spec(stage: Stage) -> StageSpec:
    assert isinstance(stage, MpcStage)
    return stage.spec


def _plan(sql: str = COHORT, keys: dict[str, str] | None = None, **policies: DatasetPolicy) -> Plan:
    plan, _ = plan_query(
        sql, query_id="q1", analyst="alice", catalog=_catalog(**policies), party_keys=keys or KEYS, helper_key=HELPER
    )
    return plan


def _refusal(sql: str, **policies: DatasetPolicy) -> PolicyRefusalError:
    with pytest.raises(PolicyRefusalError) as info:
        _plan(sql, **policies)
    return info.value


# --------------------------------------------------------------------------------------------------
# when MPC is chosen


def test_tee_when_every_owner_accepts_the_enclave():
    plan = _plan()
    (stage,) = plan.stages
    assert stage.kind == "tee" and isinstance(stage, TeeStage) and stage.feeds is None
    assert set(stage.to_dict()) == {"id", "kind", "sql", "inputs", "output_columns", "min_group_size"}
    # Owners listing measurements with one in common still get one enclave stage.
    a = dataclasses.replace(POLICY, trust=DatasetTrust(measurements=("ab" * 32, "cd" * 32)))
    b = dataclasses.replace(POLICY, trust=DatasetTrust(measurements=("cd" * 32,)))
    assert [s.kind for s in _plan(hospital_north=a, hospital_south=b).stages] == ["tee"]


# Hashes of TEE plans computed with the code before MPC planning existed (git HEAD dc48dd2): a plan
# without an MPC stage must read and hash exactly as before, or every owner's stored approvals and
# receipts would stop verifying.
PINNED_SCHEMA = pa.schema(
    [("customer_id", pa.int64()), ("segment", pa.string()), ("rating", pa.string()), ("exposure", pa.float64())]
)
PINNED_POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "customer_id",
        "min_group_size": 3,
        "dominance": {"n": 1, "k": 80},
        "trust": {"measurements": ["ab" * 32]},
        "columns": {
            "customer_id": "join_key",
            "segment": "dimension",
            "rating": "dimension",
            "exposure": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 1e9},
        },
    }
)


@pytest.mark.parametrize(
    ("sql", "pinned"),
    [
        (
            "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS e FROM bank_a.loans a "
            "JOIN bank_b.loans b ON a.customer_id = b.customer_id WHERE a.rating = 'A' GROUP BY a.segment "
            "ORDER BY n DESC LIMIT 5",
            "b6cd7bf6bc8f040264ec6c65329e68bfa16e426183043a399f7dda287df8d799",
        ),
        (
            "SELECT segment, AVG(exposure) AS m FROM (SELECT * FROM bank_a.loans UNION ALL SELECT * FROM bank_b.loans "
            "WHERE rating <> 'C') u GROUP BY segment",
            "2e4c30bc114f70cf33f94f89f7201d8c173677c5a18915f38c4722c3271bc461",
        ),
    ],
)
def test_tee_plans_hash_as_before_mpc_planning(sql: str, pinned: str):
    catalog = {f"{p}.loans": CatalogEntry(p, "loans", PINNED_SCHEMA, PINNED_POLICY) for p in ("bank_a", "bank_b")}
    plan, _ = plan_query(
        sql, query_id="q-pin", analyst="alice", catalog=catalog, party_keys={"bank_a": "11" * 32, "bank_b": "22" * 32}
    )
    plan = dataclasses.replace(plan, salt="00" * 16, created_at=1700000000.0)
    assert plan.hash == pinned
    assert Plan.from_json(plan.to_json()).hash == pinned


def test_mpc_when_every_owner_is_mpc_only():
    plan = _plan(**{h: MPC_ONLY for h in HOSPITALS})
    (stage,) = plan.stages
    assert stage.kind == "mpc" and stage.id == "s1"
    assert isinstance(stage, MpcStage)
    spec = stage.spec
    assert [(p.name, p.holds_input) for p in spec.players] == [(h, True) for h in HOSPITALS]
    assert stage.holders_doc() == {str(n): {"party": h, "datasets": ["stays"]} for n, h in enumerate(HOSPITALS)}
    assert [i.qualified for i in stage.inputs] == [f"{h}.stays" for h in HOSPITALS]
    # Each party's input: what its partials read, plus its privacy unit; nothing is sent anywhere.
    assert stage.inputs[0].columns == ("patient_id", "age_band", "diagnosis", "length_of_stay", "cost")
    assert spec.threshold_on == "units" and not spec.units_disjoint and spec.min_group_size == 5
    assert [(a.name, a.func, a.column) for a in spec.aggregates] == [
        ("stays", "count", None),
        ("mean_stay", "avg", "length_of_stay"),
        ("sd_cost", "stddev_samp", "cost"),
    ]
    assert [(m.column, m.min, m.max, m.decimals) for m in spec.measures] == [
        ("length_of_stay", 0, 365, 0),
        ("cost", 0, 1e6, 4),
    ]
    assert spec.domain == tuple((d, b) for d in DIAGNOSES for b in BANDS)
    assert stage.release.to_dict() == {
        "outputs": [
            ["diagnosis", "group", "diagnosis"],
            ["age_band", "group", "age_band"],
            ["stays", "aggregate", "stays"],
            ["mean_stay", "aggregate", "mean_stay"],
            ["sd_cost", "aggregate", "sd_cost"],
        ],
        "having": None,
        "order_by": [["diagnosis", False, False], ["age_band", False, False]],
        "limit": None,
    }
    assert Plan.from_json(plan.to_json()).hash == plan.hash


def test_every_mpc_player_has_its_own_identity_key():
    """The players' keys come from the plan: owners' keys, None for the enclave (its attested job key),
    the helper's from its holders entry; one key behind two players, or a player without one, is refused."""
    plan = _plan(hospital_east=MPC_ONLY)
    stage = plan.stages[-1]
    assert mpc_player_keys(plan, stage) == {0: KEYS["hospital_east"], 1: None, 2: HELPER}
    assert isinstance(stage, MpcStage)
    for bad in (HelperHolder("coordinator", KEYS["hospital_east"]), HelperHolder("coordinator"), PartyHolder("x", ())):
        tampered = dataclasses.replace(stage, holders={**stage.holders, 2: bad})
        with pytest.raises(InvalidQueryError):
            mpc_player_keys(plan, tampered)


def test_hybrid_plan_two_enclave_owners_and_one_mpc_only():
    plan = _plan(hospital_east=MPC_ONLY)
    tee, mpc = plan.stages
    assert (tee.id, tee.kind, tee.feeds, tee.output_columns) == ("s1", "tee", "s2", ())
    assert [i.qualified for i in tee.inputs] == ["hospital_north.stays", "hospital_south.stays"]
    assert (mpc.id, mpc.kind) == ("s2", "mpc") and [i.qualified for i in mpc.inputs] == ["hospital_east.stays"]
    assert isinstance(mpc, MpcStage)
    spec = mpc.spec
    assert [(p.name, p.holds_input) for p in spec.players] == [
        ("hospital_east", True),
        ("enclave", True),
        ("coordinator", False),
    ]
    assert mpc.holders_doc() == {
        "0": {"party": "hospital_east", "datasets": ["stays"]},
        "1": {"stage": "s1"},
        # The helper's identity is named in the plan (the coordinator's key): every owner approves it.
        "2": {"helper": "coordinator", "key": HELPER},
    }
    assert "helper players holding no input: coordinator" in spec.trust_assumption()
    assert plan.involved_parties() == sorted(HOSPITALS)
    # The plan's hash covers the spec: changing k, a bound or a player changes what owners sign.
    doc = json.loads(plan.to_json())
    doc["stages"][1]["mpc"]["min_group_size"] = 2
    assert Plan.from_json(json.dumps(doc).encode()).hash != plan.hash
    assert Plan.from_json(plan.to_json()).hash == plan.hash
    mpc_stage_query(plan, tee)  # both stages resolve from the plan alone


def test_helper_players_below_three():
    # One owner alone is refused (see test_a_single_owner_mpc_query_is_refused_not_given_two_helpers);
    # two owners get one helper, the coordinator.
    two = _plan(
        "SELECT diagnosis, COUNT(*) AS n FROM (SELECT * FROM hospital_east.stays UNION ALL "
        "SELECT * FROM hospital_north.stays) u GROUP BY diagnosis",
        hospital_east=MPC_ONLY,
        hospital_north=MPC_ONLY,
    ).stages[0]
    assert [p.name for p in _spec(two).players] == [
        "hospital_east",
        "hospital_north",
        "coordinator",
    ]


def test_no_common_enclave_measurement_means_every_owner_runs_a_player():
    a = dataclasses.replace(POLICY, trust=DatasetTrust(measurements=("ab" * 32,)))
    b = dataclasses.replace(POLICY, trust=DatasetTrust(measurements=("cd" * 32,)))
    (stage,) = _plan(hospital_north=a, hospital_south=b).stages
    assert stage.kind == "mpc"
    assert [p.name for p in _spec(stage).players] == list(HOSPITALS)
    err = _refusal(
        "SELECT diagnosis, COUNT(DISTINCT patient_id) AS n FROM " + UNION + " GROUP BY diagnosis",
        hospital_north=a,
        hospital_south=b,
    )
    assert err.details["rule"] == "no_common_enclave" and "none in common" in err.message
    assert "common enclave measurement" in err.details["suggestion"]


# --------------------------------------------------------------------------------------------------
# domains


def test_domain_is_the_union_of_declared_values_and_the_shared_bins():
    cols = dict(POLICY.columns)
    cols["diagnosis"] = ColumnRule("dimension", values=("oncology", "prion_disease"))
    other = dataclasses.replace(MPC_ONLY, columns=cols)
    sql = f"SELECT diagnosis, age, COUNT(*) AS n, SUM(cost) AS c FROM {UNION} GROUP BY diagnosis, age"
    stage = _plan(sql, hospital_east=other).stages[-1]
    spec = _spec(stage)
    assert [g.to_dict() for g in spec.group_by] == [
        {"name": "diagnosis", "bins": None},
        {"name": "age", "bins": [0, 18, 65, 120]},
    ]
    diagnoses = [*DIAGNOSES, "prion_disease"]  # first-declared order, each once
    assert spec.domain == tuple((d, b) for d in diagnoses for b in ("[0, 18)", "[18, 65)", "[65, 120)"))


def _with(column: str, rule: ColumnRule, base: DatasetPolicy = MPC_ONLY) -> DatasetPolicy:
    return dataclasses.replace(base, columns={**base.columns, column: rule})


@pytest.mark.parametrize(
    ("east", "sql", "mpc_rule", "expected"),
    [
        (
            _with("diagnosis", ColumnRule("dimension")),
            f"SELECT diagnosis, COUNT(*) AS n FROM {UNION} GROUP BY diagnosis",
            "domain",
            "declare the domain of column diagnosis in hospital_east.stays's policy",
        ),
        (
            _with("age", ColumnRule("dimension", bins=(0, 40, 120))),
            f"SELECT age, COUNT(*) AS n FROM {UNION} GROUP BY age",
            "domain",
            "declare the same bins for age in every involved policy",
        ),
        (
            _with("age", ColumnRule("dimension", values=(1, 2))),
            f"SELECT age, COUNT(*) AS n FROM {UNION} GROUP BY age",
            "domain",
            "the same way (values or bins)",
        ),
        (
            MPC_ONLY,
            "SELECT a.diagnosis, COUNT(*) AS n FROM hospital_north.stays a JOIN hospital_east.stays b "
            "ON a.patient_id = b.patient_id GROUP BY a.diagnosis",
            "join",
            "drop the join",
        ),
        (
            MPC_ONLY,
            f"SELECT diagnosis, COUNT(DISTINCT patient_id) AS n FROM {UNION} GROUP BY diagnosis",
            "count_distinct",
            "use COUNT(*) or COUNT(column)",
        ),
        (
            MPC_ONLY,
            f"SELECT CASE WHEN age < 40 THEN 'young' ELSE 'old' END AS band, COUNT(*) AS n FROM {UNION} GROUP BY 1",
            "group_by",
            "GROUP BY the column itself",
        ),
        (
            MPC_ONLY,
            f"SELECT diagnosis, SUM(cost) AS c FROM {UNION} GROUP BY diagnosis HAVING COUNT(*) > 10",
            "having",
            "add COUNT(*) to the SELECT list",
        ),
        (
            MPC_ONLY,
            f"SELECT diagnosis, SUM(cost) / COUNT(*) AS c FROM {UNION} GROUP BY diagnosis",
            "output",
            "one aggregate",
        ),
        (
            MPC_ONLY,
            f"SELECT diagnosis, SUM(cost + length_of_stay) AS c FROM {UNION} GROUP BY diagnosis",
            "aggregate_argument",
            "aggregate a column directly",
        ),
        (
            _with("cost", ColumnRule("measure", ("sum",), 0, None)),
            f"SELECT diagnosis, SUM(cost) AS c FROM {UNION} GROUP BY diagnosis",
            "bounds",
            "declare min and max for cost",
        ),
        (
            dataclasses.replace(MPC_ONLY, dominance=Dominance(1, 80.0)),
            f"SELECT diagnosis, SUM(cost) AS c FROM {UNION} GROUP BY diagnosis",
            "dominance",
            "drop SUM and AVG",
        ),
        (
            MPC_ONLY,
            "SELECT diagnosis, COUNT(*) AS n FROM (SELECT age_band AS diagnosis, cost FROM hospital_north.stays "
            "UNION ALL SELECT diagnosis, cost FROM hospital_east.stays) u GROUP BY diagnosis",
            "union",
            "select diagnosis itself in every branch",
        ),
    ],
    ids=[
        "no-domain",
        "different-bins",
        "values-and-bins",
        "join",
        "count-distinct",
        "case-group",
        "having-not-output",
        "expression-of-aggregates",
        "aggregate-of-expression",
        "no-bounds",
        "dominance",
        "renamed-union-column",
    ],
)
def test_what_mpc_cannot_run_is_refused_with_what_would_make_it_runnable(
    east: DatasetPolicy, sql: str, mpc_rule: str, expected: str
):
    err = _refusal(sql, hospital_east=east)
    assert err.details["rule"] == "mpc_only" and err.details["party"] == "hospital_east"
    assert err.details["mpc_rule"] == mpc_rule, err.message
    assert expected in err.details["suggestion"], err.details["suggestion"]
    assert err.message.startswith("hospital_east.stays goes to no enclave (trust.mpc_only in its policy)")
    # Always the other way out, too.
    assert "ask hospital_east to accept an enclave measurement" in err.details["suggestion"]
    # The same query runs in the enclave when every owner accepts it (unless the SQL surface refuses it).
    if mpc_rule not in ("domain", "bounds", "dominance", "union", "join", "having"):
        assert _plan(sql).stages[0].kind == "tee"


def test_having_on_outputs_and_filters_every_party_applies():
    sql = (
        "SELECT diagnosis, COUNT(*) AS n, MAX(length_of_stay) AS longest FROM (SELECT * FROM hospital_north.stays "
        "WHERE age_band <> '65+' UNION ALL SELECT * FROM hospital_east.stays) u WHERE u.diagnosis <> 'oncology' "
        "GROUP BY diagnosis HAVING COUNT(*) > 10 AND n < 1000"
    )
    (stage,) = _plan(sql, hospital_east=MPC_ONLY, hospital_north=MPC_ONLY).stages
    north, east = stage.inputs
    assert north.filter == "\"age_band\" <> '65+' AND \"diagnosis\" <> 'oncology'"
    assert north.filter_columns == ("age_band", "diagnosis")
    assert (east.filter, east.filter_columns) == ("\"diagnosis\" <> 'oncology'", ("diagnosis",))
    assert isinstance(stage, MpcStage) and stage.release.having == '"n" > 10 AND "n" < 1000'


def test_a_tampered_filter_in_an_mpc_stage_is_refused():
    plan = _plan(
        f"SELECT diagnosis, COUNT(*) AS n FROM {UNION} WHERE s.age_band = '0-39' GROUP BY diagnosis",
        hospital_east=MPC_ONLY,
    )
    doc = json.loads(plan.to_json())
    doc["stages"][0]["inputs"][0]["filter"] = "TRUE"
    tampered = Plan.from_json(json.dumps(doc).encode())
    with pytest.raises(InvalidQueryError, match="not the one its SQL implies"):
        mpc_stage_query(tampered, tampered.stages[1])


def test_malformed_mpc_stages_are_refused():
    doc = json.loads(_plan(hospital_east=MPC_ONLY).to_json())
    for edit in (
        lambda d: d["stages"][1].pop("holders"),
        lambda d: d["stages"][0].__setitem__("mpc", {}),
        lambda d: d["stages"][1].__setitem__("kind", "gpu"),
        lambda d: d["stages"][1].__setitem__("feeds", "s1"),
    ):
        bad = json.loads(json.dumps(doc))
        edit(bad)
        with pytest.raises(InvalidQueryError, match="plan is inconsistent"):
            Plan.from_json(json.dumps(bad).encode())


# --------------------------------------------------------------------------------------------------
# explain


def test_explain_shows_both_stages_and_who_sees_what():
    plan, analysis = plan_query(
        COHORT, query_id="q1", analyst="alice", catalog=_catalog(hospital_east=MPC_ONLY), party_keys=KEYS
    )
    text = explain_text(plan, analysis)
    assert "Stage s1 (TEE: runs inside an attested enclave worker; releases nothing, feeds stage s2)" in text
    assert "Stage s2 (MPC" in text
    assert "hospital_north.stays: patient_id, age_band, diagnosis, length_of_stay, cost" in text
    assert "0: hospital_east (holds the partial aggregates of hospital_east.stays)" in text
    assert "1: enclave (holds the partial aggregates the enclave computed in stage s1)" in text
    assert "2: coordinator (helper: holds no input, only computes on secret shares)" in text
    assert "trust assumption: semi-honest, honest majority: no 2 of the 3 players collude" in text
    assert "a cell passes with at least 5 distinct privacy units" in text
    assert "public group domain: 9 cells" in text
    assert "COUNT(*) of passing groups, as stays" in text and "never opened" in text
    assert "Approvals needed from: hospital_east (automatic), hospital_north (automatic)" in text


# --------------------------------------------------------------------------------------------------
# policies: domains


def test_domains_round_trip_through_toml_and_json(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY.to_toml())
    again = load_policy_file(path)
    assert again == POLICY and again.digest() == POLICY.digest()
    assert DatasetPolicy.from_json(POLICY.canonical()) == POLICY
    assert POLICY.rule("age").domain == ("bins", (0, 18, 65, 120))
    assert POLICY.rule("diagnosis").domain == ("values", tuple(DIAGNOSES))
    assert tomllib.loads(POLICY.to_toml())["columns"]["age"] == {"role": "dimension", "bins": [0, 18, 65, 120]}
    # A domain is part of the digest the owner registers and every plan carries.
    narrower = _with("diagnosis", ColumnRule("dimension", values=("oncology",)), POLICY)
    assert narrower.digest() != POLICY.digest()
    # A policy without domains reads and hashes as before.
    assert "values" not in json.dumps(DatasetPolicy.from_dict({"columns": {"d": "dimension"}}).to_dict())


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"role": "dimension", "bins": [0, 18, 18]}, "bins"),
        ({"role": "dimension", "bins": [5]}, "bins"),
        ({"role": "dimension", "bins": [0, "x"]}, "bins"),
        ({"role": "dimension", "values": []}, "values"),
        ({"role": "dimension", "values": ["a", "a"]}, "values"),
        ({"role": "dimension", "values": [True]}, "values"),
        ({"role": "dimension", "values": [1.5]}, "values"),
        ({"role": "dimension", "values": ["a"], "bins": [0, 1]}, "bins"),
        ({"role": "measure", "values": ["a"]}, "values"),
        ({"role": "join_key", "bins": [0, 1]}, "bins"),
    ],
)
def test_malformed_domains_are_refused_by_key(rule: dict[str, Any], key: str):
    with pytest.raises(ConfigError, match=f"columns.c.{key}"):
        DatasetPolicy.from_dict({"columns": {"c": rule}}, source="p.toml")


# --------------------------------------------------------------------------------------------------
# the party agent's review of an MPC stage


def _agent(tmp_path: Path, party: str, policy: DatasetPolicy) -> PartyAgent:
    path = tmp_path / f"{party}.parquet"
    pq.write_table(SCHEMA.empty_table(), path)
    config = PartyConfig(
        name=party,
        coordinator="127.0.0.1:9",
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("stays", str(path), policy),),
        unsafe_no_witness=True,  # no coordinator, so no log to witness
    )
    return PartyAgent(config, signing_key=generate_signing_key())


def _edit(plan: Plan, change: Any) -> Plan:
    doc = json.loads(plan.to_json())
    change(doc)
    return Plan.from_json(json.dumps(doc).encode())


@pytest.fixture
def east(tmp_path: Path) -> PartyAgent:
    return _agent(tmp_path, "hospital_east", MPC_ONLY)


def _hybrid(agent: PartyAgent, sql: str = COHORT, **policies: DatasetPolicy) -> Plan:
    keys = {**KEYS, agent.config.name: agent.public_key_hex}
    return _plan(sql, keys, **{"hospital_east": MPC_ONLY, **policies})


def test_agent_approves_a_valid_mpc_stage_its_own_player_and_the_feeding_stage(east: PartyAgent, tmp_path: Path):
    plan = _hybrid(east)
    plan_hash, signature, _ = east.review(plan.to_json())
    assert plan_hash == plan.hash and signature is not None
    north = _agent(tmp_path, "hospital_north", POLICY)
    plan = _hybrid(north)
    assert north.review(plan.to_json())[1] is not None  # it streams to the enclave feeding the MPC stage


def _spec_edit(key: str, value: Any) -> Any:
    def change(doc: dict[str, Any]) -> None:
        doc["stages"][1]["mpc"][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (_spec_edit("min_group_size", 2), "min_group_size"),
        (lambda d: d["stages"][1].__setitem__("min_group_size", 2), "min_group_size"),
        (_spec_edit("threshold_on", "rows"), "privacy_unit"),
        (_spec_edit("units_disjoint", True), "privacy_unit"),
        (
            lambda d: d["stages"][1]["mpc"]["measures"][1].__setitem__("max", 1e7),
            "bounds",
        ),
        (lambda d: d["stages"][1]["mpc"].__setitem__("domain", d["stages"][1]["mpc"]["domain"][:-1]), "domain"),
        (
            lambda d: d["stages"][1]["mpc"].__setitem__(
                "domain", [*d["stages"][1]["mpc"]["domain"], ["prion_disease", "0-39"]]
            ),
            "domain",
        ),
        (lambda d: d["stages"][1]["holders"].__setitem__("0", {"party": "enclave", "datasets": ["stays"]}), "players"),
        (
            lambda d: d["stages"][1]["mpc"]["players"].__setitem__(0, {"name": "hospital_north", "holds_input": True}),
            "players",
        ),
        (
            lambda d: d["stages"][1]["mpc"]["aggregates"][1].__setitem__("func", "sum"),
            "plan_consistency",
        ),
        (lambda d: d["stages"][1]["release"].__setitem__("limit", 1), "plan_consistency"),
    ],
    ids=[
        "k-in-spec",
        "k-of-stage",
        "rows-not-units",
        "units-disjoint",
        "wider-bounds",
        "domain-missing-key",
        "domain-extra-key",
        "held-by-another",
        "player-renamed",
        "other-aggregate",
        "release-limit",
    ],
)
def test_agent_refuses_each_violation_naming_the_rule(east: PartyAgent, change: Any, rule: str):
    plan = _edit(_hybrid(east), change)
    with pytest.raises(PolicyRefusalError) as info:
        east.review(plan.to_json())
    assert info.value.details["rule"] == rule, info.value.message


def test_agent_refuses_an_analyst_and_column_uses_its_policy_does_not_allow(east: PartyAgent, tmp_path: Path):
    only_bob = dataclasses.replace(MPC_ONLY, analysts=("bob",))
    agent = _agent(tmp_path, "hospital_east", only_bob)
    permissive = dataclasses.replace(only_bob, analysts=("*",))
    plan = _edit(
        _hybrid(agent, hospital_east=permissive),
        lambda d: (
            d["stages"][1]["inputs"][0].__setitem__("policy", only_bob.to_dict())
            or d["stages"][1]["inputs"][0].__setitem__("policy_digest", only_bob.digest())
        ),
    )
    with pytest.raises(PolicyRefusalError) as info:
        agent.review(plan.to_json())
    assert info.value.details["rule"] == "analysts"
    # Its own roles, from the policy it holds: the planner ran with a laxer one (cost summable only).
    strict = _with("cost", ColumnRule("measure", ("sum",), 0.0, 1e6))
    agent = _agent(tmp_path, "hospital_east", strict)
    plan = _edit(
        _hybrid(agent),
        lambda d: (
            d["stages"][1]["inputs"][0].__setitem__("policy", strict.to_dict())
            or d["stages"][1]["inputs"][0].__setitem__("policy_digest", strict.digest())
        ),
    )
    with pytest.raises(PolicyRefusalError) as info:
        agent.review(plan.to_json())
    assert info.value.details["rule"] == "column_role" and info.value.details["column"] == "cost"


def test_agent_refuses_to_stream_an_mpc_only_dataset_to_the_enclave(tmp_path: Path):
    agent = _agent(tmp_path, "hospital_north", MPC_ONLY)
    # A coordinator that moves hospital_north's mpc_only dataset into the enclave's stage.
    plan = _hybrid(agent, hospital_north=POLICY)

    def move(d: dict[str, Any]) -> None:
        inp = d["stages"][0]["inputs"][0]
        inp["policy"], inp["policy_digest"] = MPC_ONLY.to_dict(), MPC_ONLY.digest()

    with pytest.raises(PolicyRefusalError) as info:
        agent.review(_edit(plan, move).to_json())
    assert info.value.details["rule"] == "mpc_only"


def test_agent_refuses_a_malformed_spec_as_inconsistent(east: PartyAgent):
    doc = json.loads(_hybrid(east).to_json())
    doc["stages"][1]["mpc"].pop("domain")
    with pytest.raises(InvalidQueryError, match="malformed MPC stage spec"):
        east.review(json.dumps(doc).encode())


# --------------------------------------------------------------------------------------------------
# found by review: the coordinator runs every helper, and the unit column is the owner's own


def _with_helpers(doc: dict[str, Any]) -> None:
    """Two more helper players (m = 5, t = 2): the coordinator would run three of five players."""
    mpc = doc["stages"][1]["mpc"]
    mpc["players"] += [{"name": "helper_x", "holds_input": False}, {"name": "helper_y", "holds_input": False}]
    mpc["threshold"] = 2


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (_with_helpers, "players"),
        (_spec_edit("unit_column", "cost"), "privacy_unit"),
        (_spec_edit("unit_column", "__sr_other"), "privacy_unit"),
    ],
    ids=["more-helpers-than-t", "unit-column-a-plain-column", "unit-column-renamed"],
)
def test_agent_refuses_what_would_let_the_coordinator_reconstruct_or_miscount(east: PartyAgent, change: Any, rule: str):
    plan = _edit(_hybrid(east), change)
    with pytest.raises(PolicyRefusalError) as info:
        east.review(plan.to_json())
    assert info.value.details["rule"] == rule, info.value.message


def test_a_single_owner_mpc_query_is_refused_not_given_two_helpers():
    """With one owner, both helpers would be the coordinator's: two of three shares, enough to
    reconstruct the owner's input. The planner refuses and says what would make it runnable."""
    err = _refusal(
        "SELECT diagnosis, COUNT(*) AS n FROM hospital_east.stays GROUP BY diagnosis", hospital_east=MPC_ONLY
    )
    assert err.details["mpc_rule"] == "players" and "second owner" in err.message


def test_mpc_decimals_represent_the_owners_bounds():
    """An integer measure whose owner allows at most 2.5 gets one fixed-point decimal, so the players
    clamp to 2.5 exactly as the enclave does (issue 14: bounds mean the same on every path)."""
    rules = dict(POLICY.columns)
    rules["length_of_stay"] = dataclasses.replace(rules["length_of_stay"], max=2.5)
    policy = dataclasses.replace(MPC_ONLY, columns=rules)
    sql = f"SELECT diagnosis, SUM(length_of_stay) AS los FROM {UNION} GROUP BY diagnosis"
    spec = _spec(_plan(sql, **{h: policy for h in HOSPITALS}).stages[0])
    (m,) = spec.measures
    assert (m.max, m.decimals, m.hi, m.exact) == (2.5, 1, 25, True)
