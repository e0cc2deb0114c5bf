"""Disclosure rules through a real enclave worker: owners' bounds (clamping) and dominance rules carried
in a signed plan, applied to sealed uploads, and reported in the signed result document.

Plans come from the real planner with policies that declare column roles, bounds and dominance;
results are verified as the coordinator verifies them (evidence, signature, hashes).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import grpc
import pyarrow as pa
import pytest

from coordinator.tee_stage import verify_result
from sealroom.canonical import canonical_json
from sealroom.errors import AttestationError, PolicyRefusalError
from sealroom.planning.plan import Plan
from sealroom.policy import ColumnRule, DatasetPolicy, Dominance
from tests.harness.enclave import (
    SECRET,
    SECRET_NUMBER,
    EnclaveHandle,
    PartyData,
    approvals,
    loans_table,
    make_party,
    make_plan,
    rejection,
)

JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)
SINGLE_SQL = "SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment"

SEGMENTS = ("retail", "big", "vip", "mid", "solo", "-", "x", "y", "z")


def policy(
    *, lo: float | None = None, hi: float | None = None, dominance: Dominance | None = None, k: int = 2
) -> DatasetPolicy:
    return DatasetPolicy(
        privacy_unit="customer_id",
        min_group_size=k,
        columns={
            "customer_id": ColumnRule("join_key"),
            # A public domain: suppressed cells are listed by key (otherwise only counted).
            "segment": ColumnRule("dimension", values=SEGMENTS),
            "exposure": ColumnRule("measure", ("count", "sum", "avg"), lo, hi),
        },
        default_role="forbidden",
        dominance=dominance,
    )


def release(enclave: EnclaveHandle, plan: Plan, parties: list[PartyData]):
    """Create a job, upload every party's sealed stream, execute, and verify as the coordinator does."""
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
    return table, verified, resp, job


def _assert_no_value(suppressed: list[dict], caplog: pytest.LogCaptureFixture, *values: float) -> None:
    text = json.dumps(suppressed)
    for entry in suppressed:
        assert set(entry) == {"group", "rule", "reason"}
    for v in (SECRET_NUMBER, *values):
        assert str(v) not in text and repr(v) not in text
    assert SECRET not in caplog.text and str(SECRET_NUMBER) not in caplog.text


def test_a_join_applies_both_owners_bounds_and_dominance_rules(
    enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a_rows: list[tuple[int, str, float]] = []
    b_rows: list[tuple[int, str, float]] = []

    def customers(ids, segment, a_exposure, b_exposure):
        for i, c in enumerate(ids):
            a_rows.append((c, segment, a_exposure[i] if isinstance(a_exposure, list) else a_exposure))
            b_rows.append((c, "-", b_exposure[i] if isinstance(b_exposure, list) else b_exposure))

    customers(range(1, 7), "retail", 100.0, 100.0)  # spread: released as is
    customers(range(30, 36), "big", SECRET_NUMBER, SECRET_NUMBER)  # clamped on both sides, then spread
    customers([10, 11, 12], "vip", [SECRET_NUMBER, 10.0, 10.0], 10.0)  # bank_a's largest unit > 80 %
    customers([20, 21, 22, 23], "mid", 100.0, [2000.0, 0.0, 0.0, 0.0])  # bank_b's two largest > 70 %
    customers([40], "solo", 1.0, 1.0)  # below the minimum group size
    a = make_party(
        "bank_a",
        loans_table(a_rows),
        policy=policy(lo=0.0, hi=1000.0, dominance=Dominance(1, 80.0)),
    )
    b = make_party("bank_b", loans_table(b_rows), policy=policy(lo=0.0, hi=500.0, dominance=Dominance(2, 70.0), k=3))
    table, verified, _, _ = release(enclave, make_plan(JOIN_SQL, [a, b]), [a, b])
    doc = verified.doc
    assert doc["rules"] == {
        "min_group_size": 3,
        "dominance": [
            {"dataset": "bank_a.loans", "n": 1, "k": 80.0},
            {"dataset": "bank_b.loans", "n": 2, "k": 70.0},
        ],
        "clamped": [
            {"dataset": "bank_a.loans", "column": "exposure", "min": 0.0, "max": 1000.0},
            {"dataset": "bank_b.loans", "column": "exposure", "min": 0.0, "max": 500.0},
        ],
    }
    assert doc["min_group_size"] == 3
    released = {r["segment"]: r for r in table.to_pylist()}
    assert released == {
        "retail": {"segment": "retail", "n": 6, "total": 1200.0},
        "big": {"segment": "big", "n": 6, "total": 6 * (1000.0 + 500.0)},  # clamped before summing
    }
    by_group = {e["group"]["segment"]: e for e in doc["suppressed"]}
    assert {s: e["rule"] for s, e in by_group.items()} == {
        "vip": "dominance",
        "mid": "dominance",
        "solo": "min_group_size",
    }
    assert by_group["vip"]["reason"] == (
        "the largest customer_id of bank_a.loans contributes at least 80% of a SUM or AVG in this cell "
        "(dominance rule of bank_a.loans)"
    )
    assert by_group["mid"]["reason"] == (
        "the 2 largest customer_id of bank_b.loans contribute at least 70% of a SUM or AVG in this cell "
        "(dominance rule of bank_b.loans)"
    )
    assert "fewer than 3 distinct customer_id" in by_group["solo"]["reason"]
    _assert_no_value(doc["suppressed"], caplog, 1000.0, 2000.0, 1010.0)


def test_without_bounds_or_dominance_the_rules_say_so(enclave: EnclaveHandle) -> None:
    rows = [(i, "x", 10.0) for i in range(5)] + [(100, "y", 5000.0), (101, "y", 1.0)]
    a = make_party("bank_a", loans_table(rows), policy=policy())
    table, verified, _, _ = release(enclave, make_plan(SINGLE_SQL, [a]), [a])
    assert verified.doc["rules"] == {"min_group_size": 2, "dominance": [], "clamped": []}
    assert sorted(table.column("segment").to_pylist()) == ["x", "y"]  # y is dominated, but no rule says so
    assert verified.doc["suppressed"] == []


def test_clamping_and_dominance_in_a_single_party_release(enclave: EnclaveHandle) -> None:
    # Unclamped, customer 100 would hold 99.9 % of "y"; clamped to 50 it holds 50 of 51 (98 %).
    rows = [(i, "x", float(10 + i)) for i in range(5)] + [(100, "y", SECRET_NUMBER), (101, "y", 1.0)]
    rows += [(200, "z", SECRET_NUMBER), (201, "z", SECRET_NUMBER), (202, "z", SECRET_NUMBER)]
    a = make_party("bank_a", loans_table(rows), policy=policy(hi=50.0, dominance=Dominance(1, 95.0)))
    table, verified, _, _ = release(enclave, make_plan(SINGLE_SQL, [a]), [a])
    assert sorted(table.to_pylist(), key=lambda r: r["segment"]) == [
        {"segment": "x", "n": 5, "total": 60.0},
        {"segment": "z", "n": 3, "total": 150.0},
    ]
    assert verified.doc["rules"]["clamped"] == [
        {"dataset": "bank_a.loans", "column": "exposure", "min": None, "max": 50.0}
    ]
    assert [(e["group"], e["rule"]) for e in verified.doc["suppressed"]] == [({"segment": "y"}, "dominance")]


def test_the_rules_are_covered_by_the_result_signature(enclave: EnclaveHandle) -> None:
    a = make_party("bank_a", loans_table([(i, "x", 10.0) for i in range(5)]), policy=policy(hi=5.0))
    plan = make_plan(SINGLE_SQL, [a])
    _, _, resp, job = release(enclave, plan, [a])
    doc = json.loads(resp.result_json)
    doc["rules"]["clamped"] = []  # a coordinator hiding that values were clamped
    forged = type(resp)()
    forged.CopyFrom(resp)
    forged.result_json = canonical_json(doc)
    with pytest.raises(AttestationError):
        verify_result(
            forged,
            plan=plan,
            hpke_public=job.hpke_public,
            signing_public=job.signing_public,
            appraisal=enclave.appraisal,
        )


def test_union_of_two_owners_with_their_own_rules(enclave: EnclaveHandle) -> None:
    sql = (
        "SELECT u.segment, SUM(u.exposure) AS total FROM "
        "(SELECT * FROM h1.loans UNION ALL SELECT * FROM h2.loans) u GROUP BY u.segment"
    )
    h1 = make_party(
        "h1", loans_table([(1, "x", 10.0), (2, "x", 10.0), (3, "y", 10.0), (4, "y", 10.0)]), policy=policy(hi=20.0)
    )
    h2 = make_party(
        "h2",
        loans_table([(5, "x", 10.0), (6, "x", 10.0), (7, "y", 900.0), (8, "y", 10.0)]),
        policy=policy(dominance=Dominance(1, 85.0)),
    )
    table, verified, _, _ = release(enclave, make_plan(sql, [h1, h2]), [h1, h2])
    assert table.to_pylist() == [{"segment": "x", "total": 40.0}]
    (entry,) = verified.doc["suppressed"]
    assert entry["group"] == {"segment": "y"} and entry["rule"] == "dominance"
    assert entry["reason"].endswith("(dominance rule of h2.loans)")
    assert verified.doc["rules"]["dominance"] == [{"dataset": "h2.loans", "n": 1, "k": 85.0}]
    assert verified.doc["rules"]["clamped"] == [{"dataset": "h1.loans", "column": "exposure", "min": None, "max": 20.0}]


def test_bounds_on_a_non_numeric_column_fail_the_job_without_a_release(
    enclave: EnclaveHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = make_party("bank_a", loans_table([(i, "x", 1.0) for i in range(5)]), policy=policy(hi=5.0))
    plan = make_plan(SINGLE_SQL, [a])
    job = enclave.create_job(plan)
    as_text = a.tables["loans"].set_column(2, "exposure", pa.array([SECRET] * 5))
    enclave.upload(job.seal(a, table=as_text))
    rej = job.execute_rejected(approvals(plan, [a]))
    assert rej.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "not numeric" in rej.details and SECRET not in rej.details and SECRET not in caplog.text
    assert enclave.job(job.job_id) is None and enclave.held_bytes == 0


def test_the_enclave_rechecks_column_roles_in_the_signed_policies(enclave: EnclaveHandle) -> None:
    """A plan whose SQL groups by a column the owner's signed policy makes a measure never runs,
    whatever the coordinator's planner said."""
    a = make_party("bank_a", loans_table([(i, "x", 1.0) for i in range(5)]), policy=policy())
    sql = "SELECT exposure, COUNT(*) AS n FROM bank_a.loans GROUP BY exposure"
    with pytest.raises(PolicyRefusalError):
        make_plan(sql, [a])
    # The coordinator plans it under an open policy, then puts the owner's real policy in the plan.
    open_party = dataclasses.replace(a, policies={"loans": DatasetPolicy(privacy_unit="customer_id")})
    doc = make_plan(sql, [open_party]).to_dict()
    doc["stages"][0]["inputs"][0]["policy"] = policy().to_dict()
    doc["stages"][0]["inputs"][0]["policy_digest"] = policy().digest()
    with pytest.raises(grpc.RpcError) as info:
        enclave.create_job(canonical_json(doc))
    rej = rejection(info.value)
    assert rej.status == grpc.StatusCode.PERMISSION_DENIED
    assert rej.error.details.get("column") == "exposure" and rej.error.details.get("rule") == "column_role"
