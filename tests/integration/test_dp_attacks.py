"""Issue 14's attacks that combine queries, against a dataset in dp mode, on real servers.

The data is the issue's: 60 customers, exactly one aged 37 (amount 4321.50), and for the first 30 a
secret bit. In threshold mode differencing, averaging and reconstruction recover the values exactly
(threshold mode does not stop attacks across queries; docs/privacy.md). In dp mode each analyst's
budget (scope "analyst", epsilon 4) bounds what all their queries together reveal: the attacks run
until the owner's agent refuses (rule ``privacy_budget``), and what they recover is no better than
the published intervals say, which is far from the secret.

Noise is OpenDP's and unseeded, so every statistical assertion is chosen to fail with probability
below 1e-4 when the mechanism is right (each says how).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.planning.privacy import laplace_ci95
from sealroom.policy import DatasetPolicy

pytestmark = pytest.mark.slow

TARGET_AMOUNT = 4321.50
N = 60
N_BITS = 30
BUDGET = 4.0


def _table() -> pa.Table:
    rng = random.Random(14)
    ages = [rng.choice([25, 31, 44, 52, 63]) for _ in range(N)]
    ages[11] = 37  # the only customer aged 37
    amounts = [round(rng.uniform(100, 5000), 2) for _ in range(N)]
    amounts[11] = TARGET_AMOUNT
    bits = [rng.randint(0, 1) for _ in range(N)]
    return pa.table(
        {
            "customer_id": pa.array(range(100000, 100000 + N), pa.int64()),
            "idx": pa.array(range(N), pa.int64()),
            "age": pa.array(ages, pa.int64()),
            "segment": [("retail", "sme", "corporate")[i % 3] for i in range(N)],
            "amount": pa.array(amounts, pa.float64()),
            "secret": pa.array(bits, pa.int64()),
        }
    )


def _policy() -> DatasetPolicy:
    return DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 5,
            "columns": {
                "customer_id": "join_key",
                "idx": "dimension",
                "age": "dimension",
                "segment": {"role": "dimension", "values": ["retail", "sme", "corporate"]},
                "amount": {"role": "measure", "aggregates": ["sum", "avg", "count"], "min": 0, "max": 5000},
                "secret": {"role": "measure", "aggregates": ["sum"], "min": 0, "max": 1},
            },
            "privacy": {
                "mode": "dp",
                "epsilon_budget": BUDGET,
                "scope": "analyst",
                "max_query_epsilon": 1.0,
                "max_groups_per_unit": 1,
                "max_rows_per_unit": 1,
            },
        },
        source="test",
    )


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("dp_attacks")
    pq.write_table(_table(), d / "customers.parquet")
    parties = [PartySpec("bank_a", (DatasetSpec("customers", str(d / "customers.parquet"), _policy()),))]
    analysts = ("differ", "averager", "reconstructor", "repeater")
    with Cluster(d / "state", parties, analysts=analysts, party_timeout_seconds=60) as cluster:
        yield cluster


def _value(result, column: str) -> tuple[float, float]:
    """The released value of ``column`` in a one-row result and its 95 % half-width."""
    assert result.status == "released", result.error
    frame = result.to_pandas()
    return float(frame[column].iloc[0]), float(frame[f"{column}_ci95"].iloc[0])


def _spend_until_refused(client, sql: str, epsilon: float) -> tuple[list[tuple[float, float]], object]:
    """Run ``sql`` at ``epsilon`` until the owner refuses; the released (value, half-width) pairs
    and the refusal."""
    released = []
    for _ in range(int(BUDGET / epsilon) + 2):
        result = client.run(sql, timeout=120, epsilon=epsilon)
        if result.status != "released":
            return released, result.error
        released.append(_value(result, "total"))
    pytest.fail("the owner never refused: the budget was not enforced")


def test_differencing_recovers_nothing_the_intervals_do_not_predict(platform) -> None:
    with platform.client("differ") as c:
        with_all = c.run("SELECT SUM(amount) AS total FROM bank_a.customers", timeout=120, epsilon=1.0)
        without = c.run("SELECT SUM(amount) AS total FROM bank_a.customers WHERE age <> 37", timeout=120, epsilon=1.0)
        (a, ha), (b, hb) = _value(with_all, "total"), _value(without, "total")
    # Each answer has Laplace noise of scale 5000 / 1.0: the difference's 95 % error is ~ 1.4 × 15,000,
    # three times the secret. The published half-widths say so before anyone subtracts.
    assert ha > 2 * TARGET_AMOUNT and hb > 2 * TARGET_AMOUNT
    # The difference is consistent with the intervals (a 1e-6 event otherwise: |L1 - L2| > 2·(ha + hb)).
    assert abs((a - b) - TARGET_AMOUNT) < 2 * (ha + hb)


def test_averaging_repeats_until_the_owner_refuses(platform) -> None:
    with platform.client("averager") as c:
        released, refusal = _spend_until_refused(
            c, "SELECT SUM(amount) AS total FROM bank_a.customers WHERE age = 37", 0.5
        )
    # Exactly the budget's worth of queries ran: 4.0 / 0.5 = 8.
    assert len(released) == int(BUDGET / 0.5)
    assert refusal.details["rule"] == "privacy_budget"
    assert refusal.details["epsilon_left"] < 0.5 and "averager" in refusal.message
    values = np.array([v for v, _ in released])
    # Laplace scale b = 5000 / 0.5 = 10,000 per answer; the mean of 8 has sd sqrt(2)·b/sqrt(8) = 5000,
    # more than the amount itself: the attacker cannot pin it down.
    predicted_sd = math.sqrt(2) * 10_000 / math.sqrt(len(values))
    assert predicted_sd > TARGET_AMOUNT
    # ... and what it gets is consistent with that (8 sd: probability below 1e-6 by Chebyshev-tight tails).
    assert abs(values.mean() - TARGET_AMOUNT) < 8 * predicted_sd


def test_reconstruction_recovers_no_more_than_chance_once_the_budget_is_spent(platform) -> None:
    rng = random.Random(7)
    table = _table()
    truth = table.column("secret").to_pylist()[:N_BITS]
    rows, answers = [], []
    with platform.client("reconstructor") as c:
        epsilon = BUDGET / 25
        refused = None
        for _ in range(30):
            subset = sorted(rng.sample(range(N_BITS), N_BITS // 2))
            sql = f"SELECT SUM(secret) AS total FROM bank_a.customers WHERE idx IN ({', '.join(map(str, subset))})"
            result = c.run(sql, timeout=120, epsilon=epsilon)
            if result.status != "released":
                refused = result.error
                break
            rows.append([1.0 if i in subset else 0.0 for i in range(N_BITS)])
            answers.append(_value(result, "total")[0])
    assert refused is not None and refused.details["rule"] == "privacy_budget"
    assert len(answers) <= 25
    # The least-squares reconstruction that recovers 30/30 bits from exact answers (threshold mode)...
    estimate, *_ = np.linalg.lstsq(np.array(rows), np.array(answers), rcond=None)
    recovered = sum(int(e > 0.5) == t for e, t in zip(estimate, truth, strict=True))
    # ... recovers about half of them here: noise of scale 1 / 0.16 = 6.25 per answer swamps a bit.
    # 26 or more of 30 by chance has probability 3e-5.
    assert recovered <= 25


def test_the_budget_is_per_analyst_and_each_release_shows_its_interval(platform) -> None:
    with platform.client("repeater") as c:
        first = c.run("SELECT segment, COUNT(*) AS n FROM bank_a.customers GROUP BY segment", timeout=120, epsilon=1.0)
        second = c.run("SELECT segment, COUNT(*) AS n FROM bank_a.customers GROUP BY segment", timeout=120, epsilon=1.0)
        budget = c.budget()
    a, b = first.to_pandas(), second.to_pandas()
    # A public domain: all three segments, every time, each with the interval of its mechanism
    # (discrete Laplace, sensitivity 1 with one row and one group per customer, epsilon 1).
    assert sorted(a["segment"]) == ["corporate", "retail", "sme"] == sorted(b["segment"])
    assert list(a["n_ci95"]) == [laplace_ci95(1.0, discrete=True)] * 3
    mine = [row for row in budget if row["scope"] == "analyst:repeater"]
    assert mine and math.isclose(mine[0]["spent"], 2.0) and math.isclose(mine[0]["left"], BUDGET - 2.0)
