"""The dp policy rule, the plan's privacy block and the mechanism every checker derives from it."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, plan_query
from sealroom.errors import ConfigError, PolicyRefusalError
from sealroom.planning.checks import Checker, check_plan
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import DEFAULT_QUERY_EPSILON, charges, laplace_ci95
from sealroom.policy import DatasetPolicy
from sealroom.privacy_rule import duration_seconds

SCHEMA = pa.schema(
    [("customer_id", pa.int64()), ("segment", pa.string()), ("age", pa.int64()), ("amount", pa.float64())]
)


def _policy(*, dp: dict | None = None, segment_values: list[str] | None = None) -> DatasetPolicy:
    doc: dict = {
        "privacy_unit": "customer_id",
        "columns": {
            "customer_id": "join_key",
            "segment": {"role": "dimension", **({"values": segment_values} if segment_values else {})},
            "age": "dimension",
            "amount": {"role": "measure", "min": 0, "max": 5000},
        },
    }
    if dp is not None:
        doc["privacy"] = dp
    return DatasetPolicy.from_dict(doc, source="test.toml")


DP = {"mode": "dp", "epsilon_budget": 4.0, "max_query_epsilon": 1.0}


def _catalog(**policies: DatasetPolicy) -> dict[str, CatalogEntry]:
    return {f"{k}.loans": CatalogEntry(k, "loans", SCHEMA, p) for k, p in policies.items()}


def _plan(sql: str, catalog: dict[str, CatalogEntry], **kw) -> Plan:
    keys = {e.party: "ab" * 32 for e in catalog.values()}
    plan, _ = plan_query(sql, query_id="q1", analyst="alice", catalog=catalog, party_keys=keys, **kw)
    return plan


def test_policy_without_privacy_keeps_its_digest_and_dp_reads_back() -> None:
    plain = _policy()
    assert "privacy" not in plain.to_dict() and plain.dp is None
    dp = _policy(dp={**DP, "refresh": "P30D", "scope": "collaboration"})
    assert dp.dp is not None and dp.dp.refresh_seconds == 30 * 86400 and dp.dp.scope_key("x") == "collaboration"
    assert DatasetPolicy.from_json(dp.canonical()) == dp
    assert dp.digest() != plain.digest()


@pytest.mark.parametrize(
    ("privacy", "key"),
    [
        ({"mode": "dp"}, "privacy.epsilon_budget"),
        ({"mode": "dp", "epsilon_budget": 1, "refresh": "P1M"}, "privacy.refresh"),
        ({"mode": "dp", "epsilon_budget": 1, "max_query_epsilon": 2}, "privacy.max_query_epsilon"),
        ({"mode": "dp", "epsilon_budget": 1, "delta": 0.5}, "privacy.delta"),
        ({"mode": "threshold", "epsilon_budget": 1}, "privacy.epsilon_budget"),
        ({"mode": "laplace"}, "privacy.mode"),
    ],
)
def test_bad_privacy_tables_name_the_key(privacy: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _policy(dp=privacy)
    assert err.value.details["key"] == key


def test_durations() -> None:
    assert duration_seconds("P1W") == 7 * 86400
    assert duration_seconds("PT12H") == 12 * 3600
    assert duration_seconds("P1DT1H") == 90000
    assert duration_seconds("P1Y") is None and duration_seconds("P") is None and duration_seconds("PT") is None


def test_a_dp_plan_carries_its_epsilon_and_every_checker_recomputes_the_mechanism() -> None:
    catalog = _catalog(bank_a=_policy(dp=DP, segment_values=["retail", "sme"]))
    plan = _plan("SELECT segment, COUNT(*), SUM(amount), AVG(amount) FROM bank_a.loans GROUP BY segment", catalog)
    assert plan.privacy is not None and plan.privacy.epsilon == DEFAULT_QUERY_EPSILON and plan.privacy.delta == 0
    again = Plan.from_json(plan.to_json())
    assert again.hash == plan.hash
    mech = check_plan(again, Checker(stage="s1")).mechanisms["s1"]
    assert mech.domain == (("retail",), ("sme",)) and mech.selection is None
    # COUNT(*), SUM(amount), COUNT(amount): AVG reuses the SUM; three measurements share epsilon.
    assert [m.key for m in mech.measurements] == ["count(*)", "sum(loans.amount)", "count(loans.amount)"]
    each = DEFAULT_QUERY_EPSILON / 3
    assert all(math.isclose(m.epsilon, each) for m in mech.measurements)
    count, total, _ = mech.measurements
    assert count.sensitivity == 4 * 10 and total.sensitivity == 4 * 10 * 5000
    assert math.isclose(total.scale, total.sensitivity / each)
    assert [c.to_dict() for c in charges("alice", plan.inputs(), plan.privacy)] == [
        {"dataset": "bank_a.loans", "scope": "analyst:alice", "epsilon": DEFAULT_QUERY_EPSILON, "delta": 0.0}
    ]


def test_groups_without_a_public_domain_spend_delta_on_partition_selection() -> None:
    catalog = _catalog(bank_a=_policy(dp=DP))
    plan = _plan("SELECT age, COUNT(*) FROM bank_a.loans GROUP BY age", catalog, epsilon=1.0)
    assert plan.privacy is not None and plan.privacy.delta == 1e-7
    mech = check_plan(plan, Checker()).mechanisms["s1"]
    assert mech.selection is not None and mech.selection.threshold > mech.max_rows


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("SELECT VAR_POP(amount) FROM bank_a.loans", "dp_aggregate"),
        ("SELECT SUM(amount) / COUNT(*) FROM bank_a.loans", "dp_aggregate"),
        ("SELECT SUM(COALESCE(amount, 0)) FROM bank_a.loans", "dp_aggregate"),
        ("SELECT COUNT(DISTINCT age) FROM bank_a.loans", "dp_aggregate"),
    ],
)
def test_what_dp_mode_does_not_release(sql: str, rule: str) -> None:
    with pytest.raises(PolicyRefusalError) as err:
        _plan(sql, _catalog(bank_a=_policy(dp=DP)))
    assert err.value.details["rule"] == rule


def test_epsilon_above_the_owners_cap_and_mixed_modes_are_refused() -> None:
    with pytest.raises(PolicyRefusalError) as err:
        _plan("SELECT COUNT(*) FROM bank_a.loans", _catalog(bank_a=_policy(dp=DP)), epsilon=2.0)
    assert err.value.details["rule"] == "max_query_epsilon" and err.value.details["max_query_epsilon"] == 1.0
    mixed = _catalog(bank_a=_policy(dp=DP), bank_b=_policy())
    with pytest.raises(PolicyRefusalError) as err:
        _plan("SELECT COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id", mixed)
    assert err.value.details["rule"] == "privacy_mode"


def test_dp_inputs_join_on_their_units_only() -> None:
    both = _catalog(bank_a=_policy(dp=DP), bank_b=_policy(dp=DP))
    plan = _plan(
        "SELECT COUNT(*), SUM(b.amount) FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id",
        both,
    )
    assert plan.privacy is not None


def test_a_plan_with_a_weakened_privacy_block_is_refused_by_every_checker() -> None:
    from dataclasses import replace

    from sealroom.planning.privacy import PlanPrivacy

    catalog = _catalog(bank_a=_policy(dp=DP))
    plan = _plan("SELECT age, COUNT(*) FROM bank_a.loans GROUP BY age", catalog)
    no_delta = replace(plan, privacy=PlanPrivacy(plan.privacy.epsilon, 0.0))  # type: ignore[union-attr]
    with pytest.raises(PolicyRefusalError):
        check_plan(no_delta, Checker(stage="s1"))
    dropped = replace(plan, privacy=None)
    with pytest.raises(PolicyRefusalError):
        check_plan(dropped, Checker(party="bank_a"))


def test_discrete_ci95_covers_at_least_95_percent() -> None:
    for b in (0.5, 3.0, 40.0):
        t = laplace_ci95(b, discrete=True)
        q = math.exp(-1 / b)
        assert 2 * math.exp(-(t + 1) / b) / (1 + q) <= 0.05
        assert t == 0 or 2 * math.exp(-t / b) / (1 + q) > 0.05
    assert math.isclose(laplace_ci95(2.0), 2.0 * math.log(20))
