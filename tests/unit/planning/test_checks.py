"""One home per rule: the planner, an owner's agent and the enclave check a plan against the owners'
policies with the same entry point (:func:`sealroom.planning.checks.check_plan`), so one policy
change changes all three verdicts, with the same rule and the same message, and so does a change to
any rule function of :mod:`sealroom.planning.checks`, on a TEE plan and on a hybrid one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pyarrow.parquet as pq
import pytest

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from enclave_worker.jobs import JobRegistry
from sealroom.errors import PolicyRefusalError
from sealroom.keys import generate_signing_key
from sealroom.planning import checks
from sealroom.planning.checks import Checker, Violation, check_plan
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy, DatasetTrust, TrustPolicy
from tests.harness.enclave import PartyData, make_party, make_plan, secret_loans

SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2, analysts=("alice", "bob"))


KEYS = {"bank_a": generate_signing_key(), "bank_b": generate_signing_key()}


def _parties(a_policy: DatasetPolicy) -> tuple[PartyData, PartyData]:
    """The two banks, bank_a under ``a_policy``; the same keys every time."""
    return (
        make_party("bank_a", secret_loans(30), policy=a_policy, key=KEYS["bank_a"]),
        make_party("bank_b", secret_loans(30), policy=POLICY, key=KEYS["bank_b"]),
    )


def _agent(tmp_path: Path, party: PartyData) -> PartyAgent:
    """``party``'s real agent, holding its current policy and key."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{party.name}.parquet"
    pq.write_table(party.tables["loans"], path)
    config = PartyConfig(
        name=party.name,
        coordinator="127.0.0.1:9",
        signing_key=tmp_path / "unused.key",
        trust=TrustPolicy(),
        datasets=(DatasetConfig("loans", str(path), party.policies["loans"]),),
        unsafe_no_witness=True,  # no coordinator, so no log to witness
    )
    return PartyAgent(config, signing_key=party.key)


def _carrying(plan: Plan, policy: DatasetPolicy) -> Plan:
    """``plan`` with bank_a's input carrying ``policy`` (as a plan made after the change would):
    the planner refuses to make such a plan, so the agent and the enclave get it edited."""
    doc = json.loads(plan.to_json())
    for stage in doc["stages"]:
        for inp in stage["inputs"]:
            if inp["party"] == "bank_a":
                inp["policy"], inp["policy_digest"] = policy.to_dict(), policy.digest()
    return Plan.from_json(json.dumps(doc).encode())


def _refusal(check: Callable[[], object]) -> PolicyRefusalError:
    with pytest.raises(PolicyRefusalError) as info:
        check()
    return info.value


def test_one_policy_change_changes_the_planner_the_agent_and_the_enclave(tmp_path: Path, registry: JobRegistry):
    a, b = _parties(POLICY)
    plan = make_plan(SQL, [a, b])
    # Accepted by all three.
    assert _agent(tmp_path, a).review(plan.to_json())[1] is not None
    assert registry.create(plan.to_json()).min_group_size == 2

    # The analyst removed from bank_a's policy: all three refuse, with the same rule and message.
    only_bob = dataclasses.replace(POLICY, analysts=("bob",))
    a2, b2 = _parties(only_bob)
    edited = _carrying(plan, only_bob)
    refusals = [
        _refusal(lambda: make_plan(SQL, [a2, b2])),
        _refusal(lambda: _agent(tmp_path / "a2", a2).review(edited.to_json())),
        _refusal(lambda: registry.create(edited.to_json())),
    ]
    assert {(r.details["rule"], r.message) for r in refusals} == {
        (
            "analysts",
            "bank_a.loans may not be queried by analyst alice: its policy lists the analysts it allows; "
            "ask bank_a to add alice",
        )
    }

    # k raised on one input: the planner plans with it, the enclave applies it, and the agent refuses a
    # plan that would release smaller cells.
    strict = dataclasses.replace(POLICY, min_group_size=7)
    a3, b3 = _parties(strict)
    assert make_plan(SQL, [a3, b3]).stages[0].min_group_size == 7
    weaker = _carrying(plan, strict)  # still k = 2
    assert registry.create(weaker.to_json()).min_group_size == 7
    refused = _refusal(lambda: _agent(tmp_path / "a3", a3).review(weaker.to_json()))
    assert refused.details["rule"] == "min_group_size"


def test_check_plan_answers_for_the_checkers_inputs_only():
    """check_plan runs the shared rules over the inputs its checker answers for: an agent its own
    owner's, an enclave its stage's, the planner every input."""
    a, b = _parties(POLICY)
    plan = make_plan(SQL, [a, b])
    checked = check_plan(plan, Checker())
    assert set(checked.pushdowns) == {"s1"} and not checked.mpc_queries
    # The analyst removed from bank_a's policy: bank_b's agent does not answer for bank_a's input
    # (bank_a's agent refuses it), every other checker does.
    edited = _carrying(plan, dataclasses.replace(POLICY, analysts=("bob",)))
    check_plan(edited, Checker(party="bank_b"))
    for checker in (Checker(), Checker(party="bank_a"), Checker(stage="s1")):
        assert _refusal(lambda c=checker: check_plan(edited, c)).details["rule"] == "analysts"
    assert not check_plan(edited, Checker(stage="s2")).pushdowns  # no such stage: nothing to answer for


# --------------------------------------------------------------------------------------------
# A rule changed in sealroom.planning.checks changes every checker's verdict

CHANGED = "a rule of sealroom.planning.checks, changed"


def _refuse(*_args: object, **_kwargs: object) -> NoReturn:
    """A rule that refuses whatever it is asked (a changed check_* function)."""
    raise PolicyRefusalError(CHANGED, details={"rule": "changed"})


def _violated(*_args: object, **_kwargs: object) -> Violation:
    """A rule that every MPC stage breaks (a changed *_violation function)."""
    return Violation(CHANGED, "changed")


def _verdicts(checkers: list[Callable[[], object]]) -> set[tuple[object, str]]:
    """The (rule, message) of each checker's refusal."""
    return {(r.details["rule"], r.message) for r in map(_refusal, checkers)}


@pytest.mark.parametrize(
    ("rule", "changed"),
    [
        ("check_analyst", _refuse),
        ("check_combine_with", _refuse),
        ("check_unit_carried", _refuse),
        ("check_no_bounded_filter", _refuse),
        ("check_uses", _refuse),
    ],
)
def test_a_changed_rule_changes_every_verdict_on_a_tee_plan(
    tmp_path: Path, registry: JobRegistry, monkeypatch: pytest.MonkeyPatch, rule: str, changed: Callable[..., object]
):
    """The planner, bank_a's agent and the enclave accept the plan; with one rule function of
    sealroom.planning.checks changed, all three refuse it through check_plan, with its rule and
    message."""
    a, b = _parties(POLICY)
    plan = make_plan(SQL, [a, b])
    agent = _agent(tmp_path, a)
    assert agent.review(plan.to_json())[1] is not None
    assert registry.create(plan.to_json()).min_group_size == 2

    monkeypatch.setattr(checks, rule, changed)
    verdicts = _verdicts(
        [
            lambda: make_plan(SQL, [a, b]),
            lambda: agent.review(plan.to_json()),
            lambda: registry.create(plan.to_json()),
        ]
    )
    assert verdicts == {("changed", CHANGED)}


HYBRID_SQL = (
    "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM (SELECT * FROM bank_a.loans UNION ALL "
    "SELECT * FROM bank_b.loans) t GROUP BY segment"
)


def hybrid_policy(**changes: Any) -> DatasetPolicy:
    """The banks' policy for the hybrid plan: declared segments and bounded exposures (an MPC stage
    needs both); ``changes``: fields to replace (``trust``, ``combine_with``)."""
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 2,
            "columns": {
                "customer_id": "join_key",
                "segment": {"role": "dimension", "values": ["seg-0", "seg-1", "seg-2", "seg-3"]},
                "exposure": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 1000},
            },
        }
    )
    return dataclasses.replace(policy, **changes)


@pytest.mark.parametrize(
    ("rule", "changed"),
    [
        ("stage_consistency_violation", _violated),
        ("stage_rule_violation", _violated),
        ("check_uses", _refuse),
    ],
)
def test_a_changed_rule_changes_every_verdict_on_a_hybrid_plan(
    tmp_path: Path, registry: JobRegistry, monkeypatch: pytest.MonkeyPatch, rule: str, changed: Callable[..., object]
):
    """bank_a keeps its data out of any enclave (its own MPC player), bank_b streams to the enclave
    feeding the MPC stage. The planner, both agents and the enclave accept the plan; with one MPC
    rule of sealroom.planning.checks changed, all four refuse it through check_plan."""
    helper = generate_signing_key().public_key().public_bytes_raw().hex()  # the coordinator's helper player
    mpc_only = hybrid_policy(trust=DatasetTrust(mpc_only=True))
    a = make_party("bank_a", secret_loans(30), policy=mpc_only, key=KEYS["bank_a"])
    b = make_party("bank_b", secret_loans(30), policy=hybrid_policy(), key=KEYS["bank_b"])
    plan = make_plan(HYBRID_SQL, [a, b], helper_key=helper)
    assert [type(s).__name__ for s in plan.stages] == ["TeeStage", "MpcStage"]
    agents = [_agent(tmp_path / p.name, p) for p in (a, b)]
    for agent in agents:
        assert agent.review(plan.to_json())[1] is not None
    registry.create(plan.to_json())

    monkeypatch.setattr(checks, rule, changed)
    verdicts = _verdicts(
        [
            lambda: make_plan(HYBRID_SQL, [a, b], helper_key=helper),
            *(lambda agent=agent: agent.review(plan.to_json()) for agent in agents),
            lambda: registry.create(plan.to_json()),
        ]
    )
    assert verdicts == {("changed", CHANGED)}
