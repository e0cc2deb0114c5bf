"""Each use of an owner's data for a plan is claimed once, and an agent's restart forgets no claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.agent.approvals import Approvals
from connectors.agent.claims import ClaimLog
from sealroom.errors import ApprovalError


def test_a_claim_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "claims.jsonl"
    log = ClaimLog(path)
    assert log.claim("a" * 64, "tee") and log.claim("a" * 64, "mpc:s1:0")
    assert not log.claim("a" * 64, "tee")
    again = ClaimLog(path)  # the agent restarted
    assert not again.claim("a" * 64, "tee") and not again.claim("a" * 64, "mpc:s1:0")
    assert again.claim("b" * 64, "tee")
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_approvals_refuse_a_second_use_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "claims.jsonl"

    def approvals() -> Approvals:
        return Approvals("bank_a", approval_ttl_seconds=60, pending_ttl_seconds=60, claims=ClaimLog(path))

    approvals().claim("c" * 64, "tee")
    with pytest.raises(ApprovalError) as info:
        approvals().claim("c" * 64, "tee")
    assert info.value.details["check"] == "once_per_plan"


def test_a_line_torn_by_a_crash_is_ignored_and_the_next_claim_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "claims.jsonl"
    ClaimLog(path).claim("d" * 64, "tee")
    with path.open("a") as f:
        f.write('{"plan_hash": "eeee')  # the crash came mid-write: that use never began
    log = ClaimLog(path)
    assert not log.claim("d" * 64, "tee")
    assert log.claim("e" * 64, "tee")
    assert not ClaimLog(path).claim("e" * 64, "tee")


def test_the_file_is_compacted_to_the_newest_plans(tmp_path: Path) -> None:
    path = tmp_path / "claims.jsonl"
    log = ClaimLog(path, limit=3)
    for i in range(10):
        assert log.claim(f"{i:064x}", "tee")
    assert len(path.read_text().splitlines()) <= 6
    reloaded = ClaimLog(path, limit=3)
    assert not reloaded.claim(f"{9:064x}", "tee")  # the newest are kept
    assert reloaded.claim(f"{0:064x}", "tee")  # the oldest were evicted (each had its own log entry)
