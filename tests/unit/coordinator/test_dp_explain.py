"""What the analyst learns before running: explain of a dp plan (per output column the mechanism,
its epsilon, sensitivity and expected 95 % error; contribution bounds; public domain or partition
selection; what each dp dataset's budget pays), of a threshold plan (its limit across queries), and
the epsilon the planner accepts."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, explain_text, plan_query
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.checks import check_privacy
from sealroom.planning.privacy import laplace_ci95
from sealroom.policy import DatasetPolicy

SCHEMA = pa.schema(
    [("customer_id", pa.int64()), ("segment", pa.string()), ("age", pa.int64()), ("amount", pa.float64())]
)
DP = {"mode": "dp", "epsilon_budget": 4.0, "max_query_epsilon": 1.0, "max_groups_per_unit": 2, "max_rows_per_unit": 3}


def _policy(dp: dict | None = None) -> DatasetPolicy:
    doc: dict = {
        "privacy_unit": "customer_id",
        "columns": {
            "customer_id": "join_key",
            "segment": {"role": "dimension", "values": ["retail", "sme", "corporate"]},
            "age": "dimension",
            "amount": {"role": "measure", "min": -100, "max": 5000},
        },
    }
    if dp is not None:
        doc["privacy"] = dp
    return DatasetPolicy.from_dict(doc, source="test.toml")


def _catalog(**policies: DatasetPolicy) -> dict[str, CatalogEntry]:
    return {f"{k}.loans": CatalogEntry(k, "loans", SCHEMA, p) for k, p in policies.items()}


def _explain(sql: str, catalog: dict[str, CatalogEntry], **kw) -> tuple[str, object]:
    keys = {e.party: "ab" * 32 for e in catalog.values()}
    plan, analysis = plan_query(sql, query_id="explain", analyst="alice", catalog=catalog, party_keys=keys, **kw)
    return explain_text(plan, analysis), plan


def _line(text: str, start: str) -> str:
    return next(x.strip() for x in text.splitlines() if x.strip().startswith(start))


def test_explain_of_a_dp_plan_shows_each_column_s_noise_and_expected_error():
    sql = "SELECT segment, COUNT(*) AS n, SUM(amount) AS total, AVG(amount) AS mean FROM bank_a.loans GROUP BY segment"
    text, plan = _explain(sql, _catalog(bank_a=_policy(DP)), epsilon=0.6)
    mech = check_privacy(plan)["s1"]  # what every checker computes from the plan
    each = 0.6 / 3  # COUNT(*), SUM(amount), COUNT(amount)
    count_ci = laplace_ci95(2 * 3 / each, discrete=True)
    sum_ci = laplace_ci95(2 * 3 * 5000 / each)
    n = _line(text, "n:")
    assert "COUNT(*) with discrete Laplace noise" in n and "epsilon 0.2," in n and "sensitivity 6," in n
    assert n.endswith(f"expected error ±{count_ci:.4g}") and mech.expected_error("n") == f"±{count_ci:.4g}"
    total = _line(text, "total:")
    assert "SUM(loans.amount) clamped to [-100, 5000] with Laplace noise" in total and "sensitivity 30000" in total
    assert total.endswith(f"expected error ±{sum_ci:.4g}")
    mean = _line(text, "mean:")
    assert "AVG = noisy SUM" in mean and "discrete Laplace" in mean and "for a group of n rows" in mean
    assert _line(text, "segment:") == "segment: group key (public domain)"
    assert "bank_a.loans: at most 2 groups and 3 rows per group for each customer_id" in text
    assert "all 3 groups are released, empty ones too (with noise)" in text
    assert "epsilon 0.6 split equally among 3 measurements" in text
    assert "this query spends epsilon 0.6 and delta 0 of each dp dataset's budget" in text
    assert "bank_a.loans: epsilon 0.6, delta 0 from the budget of analyst alice" in text
    # A dp release suppresses nothing by rule: the threshold wording is not there.
    assert "min 5 distinct units" not in text and "threshold mode" not in text
    assert not math.isclose(count_ci, 0)


def test_explain_of_groups_without_a_public_domain_shows_partition_selection():
    text, plan = _explain("SELECT age, COUNT(*) AS n FROM bank_a.loans GROUP BY age", _catalog(bank_a=_policy(DP)))
    sel = check_privacy(plan)["s1"].selection
    assert sel is not None and plan.privacy is not None and plan.privacy.epsilon == 0.5  # the default
    assert _line(text, "age:") == "age: group key (partition selection)"
    assert f"reaches {sel.threshold} (Laplace scale {sel.scale:.4g}, epsilon 0.25, delta 1e-07)" in text
    assert "groups below it are dropped and never listed" in text
    assert "spends epsilon 0.5 and delta 1e-07" in text


def test_explain_leaves_room_for_each_owner_s_remaining_budget_and_the_collaboration_scope():
    shared = _policy({**DP, "scope": "collaboration"})
    keys = {"bank_a": "ab" * 32}
    plan, analysis = plan_query(
        "SELECT COUNT(*) AS n FROM bank_a.loans",
        query_id="explain",
        analyst="alice",
        catalog=_catalog(bank_a=shared),
        party_keys=keys,
    )
    text = explain_text(plan, analysis, budget={"bank_a.loans": "3.5 of 4 left"})
    assert "bank_a.loans: epsilon 0.5, delta 0 from the shared budget; 3.5 of 4 left" in text
    assert "groups: one cell (no GROUP BY)" in text


def test_explain_of_a_threshold_plan_says_it_does_not_stop_differencing_across_queries():
    text, plan = _explain(
        "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", _catalog(bank_a=_policy())
    )
    assert plan.privacy is None
    lines = [x for x in text.splitlines() if "differencing across queries" in x]
    assert len(lines) == 1 and lines[0].startswith("Privacy: threshold mode")
    assert "min 5 distinct units per cell" in text


def test_an_epsilon_above_the_strictest_cap_is_refused_naming_the_dataset_and_the_cap():
    strict = _policy({**DP, "max_query_epsilon": 0.3})
    catalog = _catalog(bank_a=_policy(DP), bank_b=strict)
    sql = "SELECT COUNT(*) FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id"
    with pytest.raises(PolicyRefusalError) as err:
        _explain(sql, catalog, epsilon=0.5)
    d = err.value.details
    assert (d["rule"], d["dataset"], d["max_query_epsilon"], d["epsilon"]) == (
        "max_query_epsilon",
        "bank_b.loans",
        0.3,
        0.5,
    )
    assert "bank_b.loans" in err.value.message and "0.3" in err.value.message
    # Left out, the default is capped at the strictest owner's limit instead of refused.
    _, plan = _explain(sql, catalog)
    assert plan.privacy is not None and plan.privacy.epsilon == 0.3


def test_an_epsilon_for_threshold_datasets_only_is_refused():
    with pytest.raises(InvalidQueryError) as err:
        _explain("SELECT COUNT(*) FROM bank_a.loans", _catalog(bank_a=_policy()), epsilon=0.5)
    assert err.value.details["rule"] == "epsilon" and err.value.details["datasets"] == "bank_a.loans"
    assert "no dataset of this query is in dp mode" in err.value.message and "leave --epsilon" in err.value.message


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf, True, "0.5"])
def test_an_unusable_epsilon_is_refused_before_planning(value):
    with pytest.raises(InvalidQueryError) as err:
        _explain("SELECT COUNT(*) FROM bank_a.loans", _catalog(bank_a=_policy(DP)), epsilon=value)
    assert err.value.details["rule"] == "epsilon"
