"""Registration by proof of possession, at the coordinator's service and store (no gRPC): a
registration is signed by the key it registers, fresh and never replayed; a new name or a new key
needs the operator's one-time enrolment token; every change is a ``party_registered`` log entry
that ``verify_log`` checks. The same attacks over real gRPC servers: tests/integration/test_registration.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import service
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, enrol_party
from sealroom.app.cli import main
from sealroom.audit.state import load_state_log
from sealroom.audit.verify import verify_log
from sealroom.errors import AuditError, AuthenticationError, CallerError, InvalidQueryError
from sealroom.keys import public_key_hex
from sealroom.policy import TrustPolicy
from sealroom.signing import OWNER_MESSAGE_MAX_SKEW_MS, Registration
from tests.harness.registration import dataset_info, registration_request


@pytest.fixture
def c(tmp_path: Path) -> Iterator[Coordinator]:
    coordinator = Coordinator(
        CoordinatorConfig(state_dir=tmp_path / "state", enclave="127.0.0.1:9", trust=TrustPolicy())
    )
    yield coordinator
    coordinator.shutdown()


def entries(c: Coordinator) -> list[dict[str, Any]]:
    assert c.store.log is not None  # type: ignore[attr-defined]
    return [json.loads(e) for e in c.store.log.store.entries()]  # type: ignore[attr-defined]


def registered(c: Coordinator, key: Ed25519PrivateKey, party: str = "bank_a", address: str = "127.0.0.1:1") -> None:
    token = enrol_party(c.config.state_dir, party).token
    service.register_party(registration_request(key, party, address, enrolment_token=token), c)


def verify(c: Coordinator) -> dict[str, Any]:
    return verify_log(load_state_log(c.config.state_dir).export, log_key=None).to_dict()


def test_a_new_name_needs_the_operators_enrolment_which_is_used_once(c: Coordinator) -> None:
    key, squatter = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(CallerError, match="not enrolled") as caught:
        service.register_party(registration_request(squatter, "bank_a", "10.6.6.6:1"), c)
    assert caught.value.details == {"party": "bank_a", "check": "enrolment"}
    token = enrol_party(c.config.state_dir, "bank_a").token
    other = enrol_party(c.config.state_dir, "bank_b").token
    for wrong in ("srt_not-the-token", other):  # a guessed token, or another name's
        with pytest.raises(CallerError, match="enrolment"):
            service.register_party(registration_request(squatter, "bank_a", "10.6.6.6:1", enrolment_token=wrong), c)
    assert c.store.parties() == {} and entries(c) == []

    service.register_party(registration_request(key, "bank_a", "127.0.0.1:1", enrolment_token=token), c)
    assert c.store.parties()["bank_a"].signing_public_key == public_key_hex(key)
    (enrolled, dataset) = entries(c)
    assert enrolled["type"] == "party_registered" and dataset["type"] == "dataset_registered"
    assert enrolled["event"]["change"] == "enrolled" and enrolled["event"]["owner_key"] == public_key_hex(key)
    assert "127.0.0.1" not in json.dumps(entries(c))  # the address enters the log by its hash only
    # The token is used up: the squatter who saw it cannot use it for another key.
    with pytest.raises(CallerError, match="registered with another signing key"):
        service.register_party(registration_request(squatter, "bank_a", "10.6.6.6:1", enrolment_token=token), c)
    assert c.store.parties()["bank_a"].address == "127.0.0.1:1"


def test_an_expired_enrolment_is_refused(c: Coordinator) -> None:
    token = enrol_party(c.config.state_dir, "bank_a", valid_seconds=0.05).token
    time.sleep(0.1)
    with pytest.raises(CallerError, match="expired"):
        service.register_party(
            registration_request(Ed25519PrivateKey.generate(), "bank_a", "127.0.0.1:1", enrolment_token=token), c
        )
    with pytest.raises(InvalidQueryError, match="reserved"):
        enrol_party(c.config.state_dir, "enclave")


def test_a_hijack_without_the_key_changes_nothing(c: Coordinator) -> None:
    key, thief = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registered(c, key)
    before, log_before = c.store.parties(), entries(c)
    # The victim's public key (GetInfo tells anyone), with the thief's signature; unsigned; the
    # thief's own key without an enrolment; and no datasets at all (every query on bank_a would fail).
    attempts = [
        (registration_request(thief, "bank_a", "10.6.6.6:1", registered_key=key), AuthenticationError),
        (registration_request(thief, "bank_a", "10.6.6.6:1", registered_key=key, signed=False), AuthenticationError),
        (registration_request(thief, "bank_a", "10.6.6.6:1"), CallerError),
        (registration_request(thief, "bank_a", "127.0.0.1:1", [], registered_key=key), AuthenticationError),
    ]
    for request, error in attempts:
        with pytest.raises(error):
            service.register_party(request, c)
    assert c.store.parties() == before and entries(c) == log_before
    assert [d.qualified for d in c.store.datasets()] == ["bank_a.loans"]


def test_a_replayed_stale_or_future_registration_is_refused(c: Coordinator) -> None:
    key = Ed25519PrivateKey.generate()
    token = enrol_party(c.config.state_dir, "bank_a").token
    first = registration_request(key, "bank_a", "127.0.0.1:1", enrolment_token=token)
    service.register_party(first, c)
    moved = registration_request(key, "bank_a", "127.0.0.1:2", issued_at_ms=first.issued_at_ms + 1)
    service.register_party(moved, c)
    for replay in (first, moved):  # the old address back, or the same request again
        with pytest.raises(AuthenticationError, match="replay") as caught:
            service.register_party(replay, c)
        assert caught.value.details["check"] == "replay"
    now = int(time.time() * 1000)
    for issued in (now - OWNER_MESSAGE_MAX_SKEW_MS - 5000, now + OWNER_MESSAGE_MAX_SKEW_MS + 5000):
        with pytest.raises(AuthenticationError, match="stale or dated in the future"):
            service.register_party(registration_request(key, "bank_a", "127.0.0.1:3", issued_at_ms=issued), c)
    assert c.store.parties()["bank_a"].address == "127.0.0.1:2"


def test_each_change_is_logged_once_and_verifies(c: Coordinator) -> None:
    key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registered(c, key)
    t = int(time.time() * 1000)
    service.register_party(registration_request(key, "bank_a", "127.0.0.1:1", issued_at_ms=t + 1), c)  # a restart
    service.register_party(registration_request(key, "bank_a", "127.0.0.1:2", issued_at_ms=t + 2), c)  # moved
    datasets = [dataset_info("bank_a"), dataset_info("bank_a", "cards")]
    service.register_party(registration_request(key, "bank_a", "127.0.0.1:2", datasets, issued_at_ms=t + 3), c)
    token = enrol_party(c.config.state_dir, "bank_a").token  # a lost key: the operator enrols the new one
    request = registration_request(
        new_key, "bank_a", "127.0.0.1:2", datasets, enrolment_token=token, issued_at_ms=t + 4
    )
    service.register_party(request, c)
    changes = [e["event"]["change"] for e in entries(c) if e["type"] == "party_registered"]
    assert changes == ["enrolled", "updated", "updated", "key_changed"]
    report = verify(c)
    assert report["entries_by_type"]["party_registered"] == 4


def test_a_party_with_no_datasets_does_not_break_audit_verify(c: Coordinator) -> None:
    registered(c, Ed25519PrivateKey.generate(), "bank_a")
    token = enrol_party(c.config.state_dir, "bank_z").token
    service.register_party(
        registration_request(Ed25519PrivateKey.generate(), "bank_z", "127.0.0.1:9", [], enrolment_token=token), c
    )
    report = verify(c)
    # Its key is exported as a witness key, and the log binds it (the party_registered entry).
    assert {"bank_a.witness", "bank_z.witness"} <= {w["name"] for w in report["witnesses"]}


def _lying_log(c: Coordinator, **changed: Any) -> None:
    """The coordinator appends, with its own log key, a party_registered entry it made up."""
    key = Ed25519PrivateKey.generate()
    reg = Registration.of(
        party="bank_a",
        owner_key=public_key_hex(key),
        address="10.6.6.6:1",
        datasets=[],
        issued_at_ms=int(time.time() * 1000) + 1000,
    )
    fields = {**vars(reg), "signature": reg.sign(key).hex(), "change": "enrolled", **changed}
    c.store.append_event("party_registered", **fields)


@pytest.mark.parametrize(
    ("changed", "check"),
    [
        ({"address_sha256": "0" * 64}, "registration_signature"),  # the signed address was swapped
        ({"signature": "ab" * 64}, "registration_signature"),
        ({"change": "updated"}, "registration_change"),  # bank_a's key replaced, called an update
        ({"change": "enrolled"}, "registration_change"),  # a second "first" registration
    ],
)
def test_audit_verify_refuses_a_registration_entry_the_party_did_not_sign(
    c: Coordinator, changed: dict[str, Any], check: str
) -> None:
    registered(c, Ed25519PrivateKey.generate())
    _lying_log(c, **changed)
    with pytest.raises(AuditError) as caught:
        verify(c)
    assert caught.value.details["check"] == check


def test_audit_verify_refuses_a_replayed_registration_entry(c: Coordinator) -> None:
    key = Ed25519PrivateKey.generate()
    registered(c, key)
    (first, *_) = entries(c)
    fields = dict(first["event"], change="updated")
    c.store.append_event("party_registered", **fields)  # the party's own old signature, logged again
    with pytest.raises(AuditError) as caught:
        verify(c)
    assert caught.value.details["check"] == "registration_replay"


def test_the_operators_command_enrols_from_the_coordinators_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'[coordinator]\nstate_dir = "{tmp_path / "state"}"\nenclave = "127.0.0.1:9"\n[tls]\nplaintext = true\n'
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["party", "enrol", "bank_a", "--config", str(config), "--valid-hours", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    token = out.split("\n")[1].strip()
    assert token.startswith("srt_") and f'enrolment_token = "{token}"' in out
    c = Coordinator(CoordinatorConfig(state_dir=tmp_path / "state", enclave="127.0.0.1:9", trust=TrustPolicy()))
    try:
        request = registration_request(Ed25519PrivateKey.generate(), "bank_a", "127.0.0.1:1", enrolment_token=token)
        assert service.register_party(request, c).datasets == ["bank_a.loans"]
    finally:
        c.shutdown()
    for bad in (["--valid-hours", "0"], ["--valid-hours", "721"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["party", "enrol", "bank_b", "--config", str(config), *bad])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["party", "enrol", "enclave", "--config", str(config)])  # a reserved name
    assert exit_info.value.code != 0 and "reserved" in capsys.readouterr().err
