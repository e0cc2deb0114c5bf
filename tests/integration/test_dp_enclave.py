"""Differential privacy through a real enclave worker: a plan over dp datasets (from the real
planner), sealed uploads, real approvals, and the signed result verified as the coordinator does.

The enclave releases noisy aggregates with their 95 % half-widths and states the mechanism and
what the release charges each owner's budget, in the document it signs; it refuses a plan whose
privacy block was weakened after planning (every checker recomputes the mechanism from the plan).
"""

from __future__ import annotations

import dataclasses
import math
import os

import grpc
import pyarrow as pa
import pytest

from coordinator.planner import CatalogEntry, plan_query
from coordinator.tee_stage import verify_result
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import PlanPrivacy
from sealroom.policy import DatasetPolicy
from tests.harness.enclave import (
    SECRET_NUMBER,
    EnclaveHandle,
    PartyData,
    approvals,
    loans_table,
    make_party,
    rejection,
)

SEGMENTS = ["retail", "sme", "corporate"]
SQL = (
    "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total, AVG(exposure) AS mean "
    "FROM bank_a.loans GROUP BY segment ORDER BY segment"
)
JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(b.exposure) AS total FROM bank_a.loans a "
    "JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)


def dp_policy(*, domain: bool = True, max_query_epsilon: float = 1.0) -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {
                "customer_id": "join_key",
                "segment": {"role": "dimension", **({"values": SEGMENTS} if domain else {})},
                "exposure": {"role": "measure", "min": 0, "max": 1000},
            },
            "privacy": {"mode": "dp", "epsilon_budget": 4.0, "max_query_epsilon": max_query_epsilon},
        },
        source="test.toml",
    )


def dp_party(name: str, *, domain: bool = True, n: int = 300) -> PartyData:
    rows = [(i, SEGMENTS[i % 3], SECRET_NUMBER if i == 7 else float(i % 900)) for i in range(n)]
    return make_party(name, loans_table(rows), policy=dp_policy(domain=domain))


def dp_plan(sql: str, parties: list[PartyData], *, epsilon: float | None = None) -> Plan:
    catalog: dict[str, CatalogEntry] = {}
    for p in parties:
        catalog.update(p.catalog())
    plan, _ = plan_query(
        sql,
        query_id="q_" + os.urandom(6).hex(),
        analyst="alice",
        catalog=catalog,
        party_keys={p.name: p.public_key_hex for p in parties},
        epsilon=epsilon,
    )
    return plan


def release(enclave: EnclaveHandle, plan: Plan, parties: list[PartyData]) -> tuple[pa.Table, dict]:
    job = enclave.create_job(plan)
    for p in parties:
        enclave.upload(job.seal(p))
    resp = job.execute(approvals(plan, parties))
    verified = verify_result(
        resp, plan=plan, hpke_public=job.hpke_public, signing_public=job.signing_public, appraisal=enclave.appraisal
    )
    assert enclave.job(job.job_id) is None and enclave.held_bytes == 0
    table = pa.ipc.open_stream(verified.arrow_table).read_all()
    assert verified.doc["released_rows"] == table.num_rows
    return table, verified.doc


def test_a_dp_release_is_signed_with_its_mechanism_charges_and_intervals(
    enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture
) -> None:
    a = dp_party("bank_a")
    plan = dp_plan(SQL, [a], epsilon=0.8)
    assert plan.privacy == PlanPrivacy(0.8, 0.0)
    table, doc = release(enclave, plan, [a])
    assert table.column_names == ["segment", "n", "total", "mean"]
    assert table.column("segment").to_pylist() == sorted(SEGMENTS)  # the public domain, ORDER BY applied
    privacy = doc["privacy"]
    assert privacy["mode"] == "dp" and privacy["epsilon"] == 0.8 and privacy["delta"] == 0.0
    assert privacy["charges"] == [{"dataset": "bank_a.loans", "scope": "analyst:alice", "epsilon": 0.8, "delta": 0.0}]
    assert privacy["groups"] == "public domain" and privacy["partition_selection"] is None
    assert [b["max_groups"] for b in privacy["contribution_bounds"]] == [4]
    assert doc["rules"]["privacy"]["mechanisms"] == privacy["mechanisms"]
    assert doc["suppressed"] == []
    # One half-width per released row for every aggregate output, from the signed mechanism.
    assert set(doc["ci95"]) == {"n", "total", "mean"}
    assert all(len(v) == table.num_rows for v in doc["ci95"].values())
    by_key = {m["key"]: m for m in privacy["mechanisms"]}
    assert doc["ci95"]["n"] == [by_key["count(*)"]["ci95_half_width"]] * 3
    assert doc["ci95"]["total"] == [by_key["sum(loans.exposure)"]["ci95_half_width"]] * 3
    assert all(0 <= m <= 1000 for m in table.column("mean").to_pylist())  # AVG clamped to the bounds
    assert str(SECRET_NUMBER) not in caplog.text


def test_two_runs_of_one_query_release_different_noise(enclave: EnclaveHandle) -> None:
    a, b = dp_party("bank_a"), dp_party("bank_b")
    plan = dp_plan(JOIN_SQL, [a, b], epsilon=1.0)
    first, doc = release(enclave, plan, [a, b])
    second, _ = release(enclave, plan, [a, b])
    assert first.column("segment").to_pylist() == second.column("segment").to_pylist()
    # Continuous Laplace noise: two equal draws have probability 0.
    assert first.column("total").to_pylist() != second.column("total").to_pylist()
    assert [c["dataset"] for c in doc["privacy"]["charges"]] == ["bank_a.loans", "bank_b.loans"]
    # The true total of each segment is within a few half-widths of what was released.
    truth = {s: 0.0 for s in SEGMENTS}
    for i in range(300):
        truth[SEGMENTS[i % 3]] += min(SECRET_NUMBER if i == 7 else float(i % 900), 1000.0)
    for row, half in zip(first.to_pylist(), doc["ci95"]["total"], strict=True):
        # 20 half-widths: exceeded with probability 20^-20
        assert math.isclose(row["total"], truth[row["segment"]], abs_tol=20 * half)


def test_groups_without_a_public_domain_go_through_partition_selection(enclave: EnclaveHandle) -> None:
    a = dp_party("bank_a", domain=False, n=9000)
    plan = dp_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [a], epsilon=1.0)
    assert plan.privacy is not None and plan.privacy.delta > 0
    table, doc = release(enclave, plan, [a])
    assert doc["privacy"]["groups"] == "partition selection" and doc["suppressed"] == []
    threshold = doc["privacy"]["partition_selection"]["threshold"]
    assert threshold < 3000  # 3000 rows per segment: each kept with overwhelming probability
    assert sorted(table.column("segment").to_pylist()) == sorted(SEGMENTS)
    assert doc["privacy"]["charges"][0]["delta"] == plan.privacy.delta


@pytest.mark.parametrize("tamper", ["epsilon_past_the_cap", "delta_zeroed", "block_dropped"])
def test_a_plan_with_a_tampered_privacy_block_is_refused(enclave: EnclaveHandle, tamper: str) -> None:
    a = dp_party("bank_a", domain=False)
    plan = dp_plan("SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment", [a], epsilon=1.0)
    assert plan.privacy is not None and plan.privacy.delta > 0
    privacy = {
        "epsilon_past_the_cap": PlanPrivacy(5.0, plan.privacy.delta),
        "delta_zeroed": PlanPrivacy(plan.privacy.epsilon, 0.0),
        "block_dropped": None,
    }[tamper]
    tampered = dataclasses.replace(plan, privacy=privacy)
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(tampered)
    rej = rejection(info.value)
    assert isinstance(rej.error, PolicyRefusalError | InvalidQueryError)
    expected = {
        "epsilon_past_the_cap": "max_query_epsilon",
        "delta_zeroed": "dp_groups",
        "block_dropped": "privacy_mode",
    }
    assert rej.error.details.get("rule") == expected[tamper]
    assert enclave.registry is not None and not enclave.registry._jobs
