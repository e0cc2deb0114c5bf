"""The reviewer's options and state reading (sealroom.audit.review, sealroom.audit.state), without a
coordinator: how receipts are appraised, which releases and events a listing keeps, and what an
unusable state directory says. The commands over a real coordinator's state are tested in
test_ropa.py, tests/integration/test_audit_*.py and tests/e2e/test_audit_demo.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.attestation import AppraisalPolicy, dev_init
from sealroom.audit.notes import NoteSigner
from sealroom.audit.review import ReceiptAppraisal, ReleaseFilter, VerifyOptions
from sealroom.audit.state import load_state_log, state_dirs
from sealroom.errors import ConfigError

MEASUREMENT = "ab" * 48


def test_no_appraisal_by_default() -> None:
    appraisal = ReceiptAppraisal()
    assert not appraisal.appraises
    assert appraisal.policy_for({"stages": [{"measurement": MEASUREMENT}]}) is None
    assert VerifyOptions().appraisal == appraisal


def test_a_trust_policy_alone_is_used_as_it_is() -> None:
    trust = AppraisalPolicy(measurements=frozenset({MEASUREMENT}))
    appraisal = ReceiptAppraisal(trust=trust)
    assert appraisal.appraises
    assert appraisal.policy_for({}) is trust


def test_a_dev_root_without_trust_takes_the_receipts_measurements(tmp_path: Path) -> None:
    root = dev_init(tmp_path).certificate
    appraisal = ReceiptAppraisal(simulated_root=root)
    receipt = {"stages": [{"measurement": MEASUREMENT}, {"measurement": 7}, "not a stage"]}
    policy = appraisal.policy_for(receipt)
    assert appraisal.appraises and policy is not None
    assert policy.measurements == frozenset({MEASUREMENT})
    assert policy.allow_simulated and policy.simulated_roots == (root,)
    # A receipt that is not an object pins no measurement at all.
    empty = appraisal.policy_for(["not", "a", "receipt"])
    assert empty is not None and empty.measurements == frozenset()


def test_a_dev_root_with_trust_adds_the_root_to_the_trust_policy(tmp_path: Path) -> None:
    root = dev_init(tmp_path).certificate
    trust = AppraisalPolicy(measurements=frozenset({MEASUREMENT}))
    policy = ReceiptAppraisal(trust=trust, simulated_root=root).policy_for({"stages": [{"measurement": "cd" * 48}]})
    assert policy is not None
    assert policy.measurements == trust.measurements  # pinned by the trust policy, not the receipt
    assert policy.allow_simulated and policy.simulated_roots == (root,)


RELEASE = {"released_ts": 1_700_000_000, "datasets": ["bank_a.loans", "bank_b.loans"], "analyst": "alice"}


@pytest.mark.parametrize(
    ("selected", "kept"),
    [
        (ReleaseFilter(), True),
        (ReleaseFilter(since=datetime.fromtimestamp(1_700_000_000, UTC)), True),
        (ReleaseFilter(since=datetime.fromtimestamp(1_700_000_001, UTC)), False),
        (ReleaseFilter(dataset="bank_b.loans"), True),
        (ReleaseFilter(dataset="bank_c.loans"), False),
        (ReleaseFilter(analyst="alice"), True),
        (ReleaseFilter(analyst="bob"), False),
    ],
)
def test_which_releases_a_listing_keeps(selected: ReleaseFilter, kept: bool) -> None:
    assert selected.keeps_release(RELEASE) is kept


def test_a_release_without_a_release_time_is_left_out_of_a_since_listing() -> None:
    since = ReleaseFilter(since=datetime.fromtimestamp(0, UTC))
    assert not since.keeps_release({**RELEASE, "released_ts": "?"})


REFUSED = {"time_ms": 5000, "type": "query_refused", "party": "bank_a", "dataset": "loans", "analyst": "alice"}
REVOKED = {"time_ms": 5000, "type": "approval_revoked", "party": "bank_a", "dataset": None, "analyst": "alice"}


@pytest.mark.parametrize(
    ("selected", "event", "kept"),
    [
        (ReleaseFilter(), REFUSED, True),
        (ReleaseFilter(since=datetime.fromtimestamp(5, UTC)), REFUSED, True),
        (ReleaseFilter(since=datetime.fromtimestamp(6, UTC)), REFUSED, False),
        (ReleaseFilter(since=datetime.fromtimestamp(0, UTC)), {**REFUSED, "time_ms": None}, False),
        (ReleaseFilter(analyst="bob"), REFUSED, False),
        # A refusal names its dataset: only that one matches; a withdrawal names the party only.
        (ReleaseFilter(dataset="bank_a.loans"), REFUSED, True),
        (ReleaseFilter(dataset="bank_a.cards"), REFUSED, False),
        (ReleaseFilter(dataset="bank_a.cards"), REVOKED, True),
        (ReleaseFilter(dataset="bank_b.loans"), REVOKED, False),
    ],
)
def test_which_events_a_listing_keeps(selected: ReleaseFilter, event: dict[str, object], kept: bool) -> None:
    assert selected.keeps_event(event) is kept


def test_a_state_dir_that_is_none_is_unusable_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is not a directory$"):
        state_dirs(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"holds no coordinator state \(coordinator.db with log.json\)"):
        state_dirs(str(tmp_path))


def test_state_dirs_finds_every_coordinator_below(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name / "coordinator").mkdir(parents=True)
        (tmp_path / name / "coordinator" / "log.json").write_text("{}")
        (tmp_path / name / "coordinator" / "coordinator.db").write_bytes(b"")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "log.json").write_text("{}")  # no database: not a coordinator's state
    assert state_dirs(str(tmp_path)) == [tmp_path / "a" / "coordinator", tmp_path / "b" / "coordinator"]
    assert state_dirs(str(tmp_path / "a" / "coordinator")) == [tmp_path / "a" / "coordinator"]


def test_an_unreadable_or_mismatched_published_log_is_unusable_input(tmp_path: Path) -> None:
    (tmp_path / "log.json").write_text('{"origin": "someone.else"}')
    (tmp_path / "coordinator.db").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^cannot read the log key .*log.vkey: "):
        load_state_log(tmp_path)
    signer = NoteSigner("sealroom.coordinator/test", Ed25519PrivateKey.generate())
    (tmp_path / "log.vkey").write_text(signer.verifier.vkey())
    with pytest.raises(ConfigError, match=r": log.json and log.vkey name different logs$"):
        load_state_log(tmp_path)
    (tmp_path / "log.vkey").write_text("not a verifier key")
    with pytest.raises(ConfigError, match=r": the published log key or log.json is malformed: "):
        load_state_log(tmp_path)
