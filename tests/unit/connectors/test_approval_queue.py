"""The owner's manual-approval queue is shared fairly: at most ``max_pending_per_analyst`` plans of one
analyst wait at once (so one analyst's flood, or a forger's in one analyst's name, leaves room for
every other analyst), and the global cap stays as a backstop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from connectors.agent import approvals as approvals_module
from connectors.agent.approvals import Approvals
from connectors.agent.config import PartyConfig
from coordinator.config import CoordinatorConfig
from sealroom.errors import ConfigError, ResourceExhaustedError
from sealroom.keys import generate_signing_key
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy
from tests.harness.enclave import make_party, make_plan, secret_loans

SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"
BANK_A = make_party("bank_a", secret_loans(12), policy=DatasetPolicy(approval="manual"), key=generate_signing_key())


def _plans(analyst: str, n: int) -> list[Plan]:
    plan = make_plan(SQL, [BANK_A], analyst=analyst)
    return [dataclasses.replace(plan, query_id=f"q_{analyst}_{i}") for i in range(n)]


def _queue(per_analyst: int) -> Approvals:
    return Approvals(
        "bank_a", approval_ttl_seconds=600.0, pending_ttl_seconds=3600.0, max_pending_per_analyst=per_analyst
    )


def _sign(plan_hash: str, position: object = None) -> bytes:
    return b"signed " + plan_hash.encode()


def test_one_analysts_flood_leaves_the_others_room() -> None:
    queue = _queue(per_analyst=100)
    refused = 0
    for p in _plans("mallory", 1005):
        try:
            assert queue.hold(p, manual=True, sign=_sign) == (None, 0.0)
        except ResourceExhaustedError as err:
            refused += 1
            assert err.details == {
                "party": "bank_a",
                "analyst": "mallory",
                "limit": "max_pending_per_analyst",
                "max": 100,
            }
            assert "[party] max_pending_per_analyst" in err.message and "100 plans of analyst mallory" in err.message
    assert refused == 905
    alice = _plans("alice", 1)[0]
    assert queue.hold(alice, manual=True, sign=_sign) == (None, 0.0)
    assert [p.analyst for p in queue.pending()].count("alice") == 1
    # Automatic approvals never queue, whatever the flood.
    auto = dataclasses.replace(_plans("mallory", 1)[0], query_id="q_auto")
    assert queue.hold(auto, manual=False, sign=_sign)[0] == _sign(auto.hash)


def test_the_global_cap_stays_a_backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals_module, "MAX_PENDING", 6)
    queue = _queue(per_analyst=3)
    for analyst in ("a1", "a2"):
        for p in _plans(analyst, 3):
            queue.hold(p, manual=True, sign=_sign)
    with pytest.raises(ResourceExhaustedError) as info:
        queue.hold(_plans("a3", 1)[0], manual=True, sign=_sign)
    assert info.value.details["limit"] == "pending_plans"
    assert "6 plans already await the decision of bank_a's owner" in info.value.message


def test_the_quota_and_the_rate_limit_are_configured_by_key(tmp_path: Path) -> None:
    party = tmp_path / "party.toml"
    base = (
        '[tls]\nplaintext = true\n[party]\nname = "bank_a"\ncoordinator = "127.0.0.1:7100"\nsigning_key = "a.key"\n'
        "{extra}\n"
        '[[dataset]]\nname = "loans"\nsource = "loans.csv"\n'
    )
    party.write_text(base.format(extra=""))
    assert PartyConfig.load(party).max_pending_per_analyst == 100
    party.write_text(base.format(extra="max_pending_per_analyst = 5"))
    assert PartyConfig.load(party).max_pending_per_analyst == 5
    party.write_text(base.format(extra="max_pending_per_analyst = 0"))
    with pytest.raises(ConfigError) as info:
        PartyConfig.load(party)
    assert info.value.details["key"] == "party.max_pending_per_analyst"

    coordinator = tmp_path / "coordinator.toml"
    base = '[tls]\nplaintext = true\n[coordinator]\nstate_dir = "s"\nenclave = "127.0.0.1:7200"\n{extra}\n'
    coordinator.write_text(base.format(extra=""))
    config = CoordinatorConfig.load(coordinator)
    assert (config.analyst_calls_per_second, config.analyst_burst) == (10.0, 50)
    coordinator.write_text(base.format(extra="analyst_calls_per_second = 0\nanalyst_burst = 3"))
    config = CoordinatorConfig.load(coordinator)
    assert (config.analyst_calls_per_second, config.analyst_burst) == (0.0, 3)
    coordinator.write_text(base.format(extra="analyst_burst = 0"))
    with pytest.raises(ConfigError):
        CoordinatorConfig.load(coordinator)
