"""Issue 13, attacks 3 and 5 (floods), against the real platform (enclave, coordinator and four party
agents as processes on 127.0.0.1).

- Attack 3, the mule: a party registered to hold 4 fake customers of 10,000 each, unioned with
  bank_a's one customer aged 37, would release that customer's exact amount. bank_a's policy lists
  whom its rows may be combined with (``combine_with = ["bank_b"]``): the mule query is refused,
  naming mule, and a combination bank_a allows still runs.
- Attack 5, floods: 1,005 forged ``ReviewPlan`` calls in one analyst's name fill only that analyst's
  share of bank_c's manual-approval queue (``[party] max_pending_per_analyst``), so another analyst's
  query is still reviewed, approved by the owner and released; and one analyst's Explain/Submit flood
  hits its own rate limit at the coordinator, not the others'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.canonical import canonical_json
from sealroom.errors import PolicyRefusalError, ResourceExhaustedError, from_code
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy
from sealroom.v1 import party_pb2, party_pb2_grpc

pytestmark = pytest.mark.slow

MULE_SQL = (
    "SELECT COUNT(*), SUM(u.amount) FROM (SELECT customer_id, amount FROM bank_a.loans WHERE age = 37 "
    "UNION ALL SELECT customer_id, amount FROM mule.fake) u"
)
ALLOWED_SQL = (
    "SELECT COUNT(*) AS n, SUM(u.amount) AS total FROM (SELECT customer_id, amount FROM bank_a.loans WHERE age >= 30 "
    "UNION ALL SELECT customer_id, amount FROM bank_b.loans WHERE age >= 30) u"
)
MANUAL_SQL = "SELECT segment, COUNT(*) AS n FROM bank_c.loans GROUP BY segment ORDER BY segment"

BANK_A = DatasetPolicy(privacy_unit="customer_id", min_group_size=5, combine_with=("bank_b",))
OPEN = DatasetPolicy(privacy_unit="customer_id", min_group_size=5)
MANUAL = DatasetPolicy(privacy_unit="customer_id", min_group_size=5, approval="manual")


def _loans(path, first_id: int, n: int, *, age: Callable[[int], int], amount: float) -> str:
    ids = list(range(first_id, first_id + n))
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array(ids, pa.int64()),
                "age": pa.array([age(i) for i in ids], pa.int64()),
                "segment": ["retail" if i % 2 else "sme" for i in ids],
                "amount": pa.array([amount + i for i in ids], pa.float64()),
            }
        ),
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("company")
    # bank_a: one customer aged 37 (id 7); the others 40 and over.
    bank_a = _loans(d / "a.parquet", 0, 40, age=lambda i: 37 if i == 7 else 40 + i % 20, amount=1000.0)
    parties = [
        PartySpec("bank_a", (DatasetSpec("loans", bank_a, BANK_A),)),
        PartySpec(
            "bank_b", (DatasetSpec("loans", _loans(d / "b.parquet", 100, 40, age=lambda i: 45, amount=0), OPEN),)
        ),
        PartySpec(
            "mule", (DatasetSpec("fake", _loans(d / "m.parquet", 900, 4, age=lambda i: 37, amount=10000), OPEN),)
        ),
        PartySpec(
            "bank_c", (DatasetSpec("loans", _loans(d / "c.parquet", 0, 30, age=lambda i: 50, amount=0), MANUAL),)
        ),
    ]
    with Cluster(
        d / "state",
        parties,
        party_timeout_seconds=60,
        approval_timeout_seconds=300,
        analysts=("alice", "mallory"),
        # One token every 10 s: however slow the machine, a refused analyst stays refused for the
        # few calls after the refusal, and a burst of 50 is more than the other tests use.
        coordinator_settings={"analyst_calls_per_second": 0.1, "analyst_burst": 50},
    ) as cluster:
        yield cluster


def wait_until(check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)
    return value


# --------------------------------------------------------------------------------------------
# attack 3: the mule


def test_a_mule_combination_is_refused_by_the_owners_combine_with(platform: Cluster):
    with platform.client("alice") as client:
        with pytest.raises(PolicyRefusalError) as info:
            client.explain(MULE_SQL)
        refused = client.run(MULE_SQL)
    assert refused.status == "refused" and refused.table is None
    for err in (info.value, refused.error):
        assert isinstance(err, PolicyRefusalError)
        assert err.details["rule"] == "combine_with" and err.details["not_allowed"] == "mule"
        assert (err.details["party"], err.details["dataset"]) == ("bank_a", "loans")
        assert "bank_a.loans may not be combined with data of mule (mule.fake)" in err.message


def test_a_combination_the_owner_allows_still_runs(platform: Cluster):
    with platform.client("alice") as client:
        result = client.run(ALLOWED_SQL)
    assert result.status == "released", result.error
    ((n, total),) = result.rows()  # every customer of both banks is 30 or over
    assert n == 80 and total == pytest.approx(sum(1000.0 + i for i in range(40)) + sum(range(100, 140)))


# --------------------------------------------------------------------------------------------
# attack 5: floods


def _forged(plan: dict[str, Any], n: int) -> bytes:
    """The plan with query id ``n``: what a forger (or a flooding analyst's coordinator) sends."""
    return Plan.from_json(canonical_json({**plan, "query_id": f"q_flood{n:04d}"})).to_json()


def test_a_flood_of_one_analysts_plans_leaves_another_analysts_query_unaffected(platform: Cluster):
    with platform.client("mallory") as mallory:
        plan = mallory.explain_plan(MANUAL_SQL)["plan"]  # a real plan in mallory's name, for bank_c
    held, refused = 0, []
    with platform.dial("party-bank_c") as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        for n in range(1005):
            resp = stub.ReviewPlan(party_pb2.ReviewPlanRequest(plan_json=_forged(plan, n)), timeout=30)
            if resp.pending:
                held += 1
            else:  # the agent answers a refusal in the response (error_json)
                doc = json.loads(resp.error_json)
                refused.append(from_code(doc["code"], doc["message"], doc["details"]))
    # Forged plans are not in the coordinator's log: the agent holds none of them, so the owner's
    # queue stays empty (a flood of real, logged queries meets the per-analyst quota instead:
    # tests/unit/connectors/test_approval_queue.py, and the rate limit below).
    assert (held, len(refused)) == (0, 1005)
    assert {e.details.get("rule") for e in refused} == {"not_in_log"}

    # alice's query is reviewed, awaits bank_c's owner, is approved and released.
    with platform.client("alice") as alice:
        qid = alice.submit(MANUAL_SQL).query_id
        wait_until(lambda: alice.status(qid)["status"] == "pending_approval")
        approved = platform.approve_as_owner(qid, "bank_c")
        assert approved.returncode == 0, approved.stderr
        assert json.loads(approved.stdout)["state"] == "approved"
        result = alice.query(qid).result(300)
    assert result.rows() == [["retail", 15], ["sme", 15]]


def test_one_analysts_call_flood_hits_its_own_rate_limit_only(platform: Cluster):
    with platform.client("mallory") as mallory, platform.client("alice") as alice:
        refusal = None
        for _ in range(60):  # a burst of 50, then one call every 10 s
            try:
                mallory.explain(MANUAL_SQL)
            except ResourceExhaustedError as err:
                refusal = err
                break
        assert refusal is not None, "60 Explain calls in a row never hit the rate limit"
        assert refusal.details["caller"] == "mallory" and refusal.details["retry_after_seconds"] > 0
        assert "analyst_calls_per_second" in refusal.message and "retry in" in refusal.message
        before = len(mallory.queries())
        with pytest.raises(ResourceExhaustedError):
            mallory.submit(MANUAL_SQL)  # Submit shares the bucket; nothing is recorded for it
        assert len(mallory.queries()) == before
        assert "bank_c" in alice.explain(MANUAL_SQL)  # alice's own bucket is full
