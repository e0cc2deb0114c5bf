"""Owners choose their company: a dataset policy's ``combine_with`` lists the parties and datasets its
rows may meet in one query, and the planner, the owner's agent and the enclave all refuse any other
combination (one rule, :func:`sealroom.planning.checks.check_combine_with`, run by ``check_plan``),
naming the dataset, the party not allowed, the rule and what to do. A coordinator that lies (it
plans around the rule) is refused by the agent and the enclave on their own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from enclave_worker.jobs import JobRegistry
from sealroom.errors import ConfigError, PolicyRefusalError
from sealroom.keys import generate_signing_key
from sealroom.planning.checks import Checker, check_plan
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy, DatasetTrust, TrustPolicy, load_policy_file
from tests.harness.enclave import PartyData, make_party, make_plan, secret_loans
from tests.unit.planning.test_checks import hybrid_policy

JOIN = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id "
    "GROUP BY a.segment"
)
UNION = (
    "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM (SELECT * FROM bank_a.loans UNION ALL "
    "SELECT * FROM bank_b.loans) t GROUP BY segment"
)
OPEN = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
KEYS = {"bank_a": generate_signing_key(), "bank_b": generate_signing_key()}


def _banks(a: DatasetPolicy = OPEN, b: DatasetPolicy = OPEN) -> tuple[PartyData, PartyData]:
    return (
        make_party("bank_a", secret_loans(30), policy=a, key=KEYS["bank_a"]),
        make_party("bank_b", secret_loans(30), policy=b, key=KEYS["bank_b"]),
    )


def _agent(tmp_path: Path, party: PartyData) -> PartyAgent:
    """``party``'s real agent, holding its current policy and key."""
    d = tmp_path / party.name
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(party.tables["loans"], d / "loans.parquet")
    config = PartyConfig(
        name=party.name,
        coordinator="127.0.0.1:9",
        signing_key=d / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("loans", str(d / "loans.parquet"), party.policies["loans"]),),
        unsafe_no_witness=True,  # no coordinator, so no log to witness
    )
    return PartyAgent(config, signing_key=party.key)


def _lying(plan: Plan, party: str, policy: DatasetPolicy) -> Plan:
    """``plan`` carrying ``party``'s current ``policy``: what a coordinator that skips the rule (or
    a script with the planner's code) sends, since the planner itself refuses to make it."""
    doc = json.loads(plan.to_json())
    for stage in doc["stages"]:
        for inp in stage["inputs"]:
            if inp["party"] == party:
                inp["policy"], inp["policy_digest"] = policy.to_dict(), policy.digest()
    return Plan.from_json(json.dumps(doc).encode())


def _refusal(check) -> PolicyRefusalError:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyRefusalError) as info:
        check()
    return info.value


# --------------------------------------------------------------------------------------------
# the policy key


def test_combine_with_parses_sorted_round_trips_and_changes_the_digest_only_when_set(tmp_path: Path):
    policy = DatasetPolicy.from_dict({"privacy_unit": "customer_id", "combine_with": ["bank_c.loans", "bank_b"]})
    assert policy.combine_with == ("bank_b", "bank_c.loans")
    path = tmp_path / "p.toml"
    path.write_text(policy.to_toml())
    assert 'combine_with = ["bank_b", "bank_c.loans"]' in path.read_text()
    assert load_policy_file(path) == policy
    never = DatasetPolicy.from_dict({"privacy_unit": "customer_id", "combine_with": []})
    assert never.combine_with == () and load_policy_file(_write(tmp_path / "n.toml", never)) == never
    # Unset: the canonical form (and so every stored digest and receipt) is the one from before.
    unset = DatasetPolicy(privacy_unit="customer_id")
    assert "combine_with" not in unset.to_dict()
    assert len({unset.digest(), policy.digest(), never.digest()}) == 3
    assert DatasetPolicy.from_json(policy.canonical()) == policy


def _write(path: Path, policy: DatasetPolicy) -> Path:
    path.write_text(policy.to_toml())
    return path


@pytest.mark.parametrize("value", ["bank_b", [1], ["bank b"], ["a.b.c"], [""], ["bank_b."]])
def test_a_malformed_combine_with_is_refused_by_key(value: object):
    with pytest.raises(ConfigError) as info:
        DatasetPolicy.from_dict({"combine_with": value}, source="p.toml")
    assert info.value.details["key"] == "combine_with"


def test_whom_a_policy_lets_its_rows_meet():
    unset, never = OPEN, dataclasses.replace(OPEN, combine_with=())
    some = dataclasses.replace(OPEN, combine_with=("bank_b", "bank_c.loans"))
    assert unset.allows_combination("bank_a", "mule", "fake")
    assert never.allows_combination("bank_a", "bank_a", "cards")  # its own datasets, always
    assert not never.allows_combination("bank_a", "bank_b", "loans")
    assert some.allows_combination("bank_a", "bank_b", "anything")
    assert some.allows_combination("bank_a", "bank_c", "loans")
    assert not some.allows_combination("bank_a", "bank_c", "cards")
    assert not some.allows_combination("bank_a", "mule", "fake")


# --------------------------------------------------------------------------------------------
# planner, agent, enclave


@pytest.mark.parametrize("sql", [JOIN, UNION])
def test_a_combination_the_owner_does_not_list_is_refused_by_all_three(tmp_path: Path, registry: JobRegistry, sql: str):
    only_c = dataclasses.replace(OPEN, combine_with=("bank_c",))
    a, b = _banks(a=only_c)
    planner = _refusal(lambda: make_plan(sql, [a, b]))
    # A lying coordinator plans around the rule; bank_a's agent and the enclave refuse on their own.
    lying = _lying(make_plan(sql, list(_banks())), "bank_a", only_c)
    agent = _refusal(lambda: _agent(tmp_path, a).review(lying.to_json()))
    enclave = _refusal(lambda: registry.create(lying.to_json()))
    for refusal in (planner, agent, enclave):
        assert refusal.details["rule"] == "combine_with"
        assert refusal.details["party"] == "bank_a" and refusal.details["dataset"] == "loans"
        assert refusal.details["not_allowed"] == "bank_b" and "bank_b" in refusal.details["suggestion"]
        assert refusal.message.startswith("bank_a.loans may not be combined with data of bank_b (bank_b.loans)")
    # bank_b's own agent answers for bank_b's policy only, which allows any company.
    assert _agent(tmp_path, b).review(lying.to_json())[1] is not None


@pytest.mark.parametrize("allowed", [("bank_b",), ("bank_b.loans",), ("bank_b", "mule")])
def test_a_combination_the_owner_lists_runs(tmp_path: Path, registry: JobRegistry, allowed: tuple[str, ...]):
    a, b = _banks(a=dataclasses.replace(OPEN, combine_with=allowed))
    plan = make_plan(JOIN, [a, b])
    assert _agent(tmp_path, a).review(plan.to_json())[1] is not None
    assert registry.create(plan.to_json()).min_group_size == 2


def test_mpc_and_hybrid_plans_count_every_dataset_whose_rows_meet(tmp_path: Path, registry: JobRegistry):
    """bank_a keeps its data out of enclaves (its own MPC player), bank_b streams to the enclave
    feeding the MPC stage: their rows meet in the MPC stage, so either owner's combine_with applies,
    at the planner, at the owner's agent and (for the TEE side) at the enclave."""
    helper = generate_signing_key().public_key().public_bytes_raw().hex()
    mpc_only = DatasetTrust(mpc_only=True)
    a = make_party("bank_a", secret_loans(30), policy=hybrid_policy(trust=mpc_only), key=KEYS["bank_a"])
    b = make_party("bank_b", secret_loans(30), policy=hybrid_policy(), key=KEYS["bank_b"])
    plan = make_plan(UNION, [a, b], helper_key=helper)
    assert [type(s).__name__ for s in plan.stages] == ["TeeStage", "MpcStage"]

    # bank_a (the MPC side) combines with no other party.
    a_alone = hybrid_policy(trust=mpc_only, combine_with=())
    a2 = make_party("bank_a", secret_loans(30), policy=a_alone, key=KEYS["bank_a"])
    assert _refusal(lambda: make_plan(UNION, [a2, b], helper_key=helper)).details["not_allowed"] == "bank_b"
    lying = _lying(plan, "bank_a", a_alone)
    refused = _refusal(lambda: _agent(tmp_path, a2).review(lying.to_json()))
    assert (refused.details["rule"], refused.details["not_allowed"]) == ("combine_with", "bank_b")
    assert _refusal(lambda: check_plan(lying, Checker(stage="s2"))).details["party"] == "bank_a"

    # bank_b (the enclave side) combines with no other party: the enclave refuses its TEE stage.
    b_alone = hybrid_policy(combine_with=())
    lying = _lying(plan, "bank_b", b_alone)
    refused = _refusal(lambda: registry.create(lying.to_json()))
    assert (refused.details["party"], refused.details["not_allowed"]) == ("bank_b", "bank_a")
