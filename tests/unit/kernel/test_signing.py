"""Owners' signatures (sealroom.signing): a known-answer and a negative test per function; every
``verify_*`` returns None on success and raises on failure (pyca's ``verify``), never a bool."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.errors import ApprovalError, IntegrityError
from sealroom.sealed import integrity_error
from sealroom.signing import (
    APPROVAL_DOMAIN,
    OWNER_MESSAGE_MAX_SKEW_MS,
    approval_message,
    check_issued_at,
    owner_action_message,
    owner_command_message,
    sign_approval,
    sign_owner_action,
    sign_owner_command,
    sign_stream_header,
    verify_approval,
    verify_owner_action,
    verify_owner_command,
    verify_stream_header,
)

# RFC 8032, test 1: the secret key, its public key, and its signature over the empty message.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
KEY = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_PUBLIC = OTHER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
PLAN = "ab" * 32
ACTION = {"query_id": "q1", "party": "bank_a", "plan_hash": PLAN, "issued_at_ms": 1_700_000_000_000}
COMMAND = {"party": "bank_a", "query_id": "q1", "issued_at_ms": 1_700_000_000_000}


def test_the_key_is_rfc8032s() -> None:
    public = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public.hex() == RFC8032_PUBLIC
    assert KEY.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


# --- approvals --------------------------------------------------------------------------------------


def test_an_approval_message_is_the_domain_and_the_plan_hash() -> None:
    assert approval_message(PLAN) == b"sealroom/v1/approval\x00" + bytes.fromhex(PLAN)
    assert approval_message(PLAN).startswith(APPROVAL_DOMAIN)


def test_an_approval_verifies_and_returns_nothing() -> None:
    signature = sign_approval(KEY, PLAN)
    assert KEY.public_key().verify(signature, approval_message(PLAN)) is None  # Ed25519 over the message
    assert verify_approval(RFC8032_PUBLIC, PLAN, signature, party="bank_a") is None


@pytest.mark.parametrize(
    ("public", "plan", "signature"),
    [
        (RFC8032_PUBLIC, "cd" * 32, "good"),  # another plan
        (OTHER_PUBLIC, PLAN, "good"),  # another party's key
        (RFC8032_PUBLIC, PLAN, "flipped"),  # a forged signature
        (RFC8032_PUBLIC, PLAN, "short"),  # not a signature at all
        ("zz", PLAN, "good"),  # not a key
    ],
)
def test_an_approval_that_does_not_verify_raises(public: str, plan: str, signature: str) -> None:
    good = sign_approval(KEY, PLAN)
    sig = {"good": good, "flipped": bytes([good[0] ^ 1]) + good[1:], "short": good[:10]}[signature]
    with pytest.raises(ApprovalError, match="the approval of bank_a does not verify for this plan") as info:
        verify_approval(public, plan, sig, party="bank_a")
    assert info.value.details == {"party": "bank_a", "check": "approval_signature"}


# --- stream headers ---------------------------------------------------------------------------------


def test_a_stream_header_signature_is_over_its_domain_and_verifies() -> None:
    header = b"header bytes"
    signature = sign_stream_header(KEY, header)
    assert KEY.public_key().verify(signature, b"sealroom/v1/stream-header\x00" + header) is None
    assert verify_stream_header(RFC8032_PUBLIC, header, signature) is None


@pytest.mark.parametrize("change", ["header", "key", "signature", "not_a_key"])
def test_a_stream_header_that_does_not_verify_raises_the_streams_one_integrity_error(change: str) -> None:
    header = b"header bytes"
    signature = sign_stream_header(KEY, header)
    public = {"key": OTHER_PUBLIC, "not_a_key": "00"}.get(change, RFC8032_PUBLIC)
    with pytest.raises(IntegrityError) as info:
        verify_stream_header(
            public,
            header + b"!" if change == "header" else header,
            signature[::-1] if change == "signature" else signature,
        )
    expected = integrity_error()
    assert (info.value.message, info.value.details) == (expected.message, expected.details)


def test_an_approval_is_not_a_stream_header_signature() -> None:
    """Domain separation: the same bytes signed as one kind never verify as the other."""
    header = bytes.fromhex(PLAN)
    with pytest.raises(IntegrityError):
        verify_stream_header(RFC8032_PUBLIC, header, sign_approval(KEY, PLAN))
    with pytest.raises(ApprovalError):
        verify_approval(RFC8032_PUBLIC, PLAN, sign_stream_header(KEY, header), party="bank_a")


# --- owner actions and commands ---------------------------------------------------------------------


def test_an_owner_action_message_is_known() -> None:
    assert owner_action_message("approve", **ACTION) == (
        b'sealroom/v1/owner-action\x00{"action":"approve","expires_at_ms":0,"issued_at_ms":1700000000000,'
        b'"party":"bank_a","plan_hash":"' + PLAN.encode() + b'","query_id":"q1","reason":""}'
    )


def test_an_owner_command_message_is_known() -> None:
    assert owner_command_message("reject", reason="no", **COMMAND) == (
        b'sealroom/v1/owner-command\x00{"action":"reject","issued_at_ms":1700000000000,"party":"bank_a",'
        b'"plan_hash":"","query_id":"q1","reason":"no"}'
    )


@pytest.mark.parametrize("build", [owner_action_message, owner_command_message])
def test_an_unknown_owner_action_is_a_caller_bug(build) -> None:
    fields = ACTION if build is owner_action_message else COMMAND
    with pytest.raises(ValueError, match="unknown owner action 'delete'"):
        build("delete", **fields)


def test_an_owner_action_verifies_and_returns_nothing() -> None:
    signature = sign_owner_action(KEY, "approve", **ACTION)
    assert verify_owner_action(RFC8032_PUBLIC, signature, "approve", **ACTION) is None


@pytest.mark.parametrize(
    ("public", "action", "fields"),
    [
        (RFC8032_PUBLIC, "reject", ACTION),  # another action
        (RFC8032_PUBLIC, "approve", {**ACTION, "query_id": "q2"}),  # another query
        (RFC8032_PUBLIC, "approve", {**ACTION, "issued_at_ms": 1}),  # replayed with another time
        (OTHER_PUBLIC, "approve", ACTION),  # another party's key
    ],
)
def test_an_owner_action_that_does_not_verify_raises(public: str, action: str, fields: dict) -> None:
    signature = sign_owner_action(KEY, "approve", **ACTION)
    with pytest.raises(ApprovalError, match="is not signed by bank_a's registered key") as info:
        verify_owner_action(public, signature, action, **fields)
    assert info.value.details == {"party": "bank_a", "check": "owner_signature"}


def test_an_owner_command_verifies_and_returns_nothing() -> None:
    signature = sign_owner_command(KEY, "approve", **COMMAND)
    assert verify_owner_command(RFC8032_PUBLIC, signature, "approve", **COMMAND) is None


def test_an_owner_command_is_not_an_owner_action() -> None:
    fields = {**COMMAND, "plan_hash": PLAN}
    command = sign_owner_command(KEY, "approve", **fields)
    with pytest.raises(ApprovalError, match="not signed by bank_a's registered key"):
        verify_owner_action(RFC8032_PUBLIC, command, "approve", **fields)


@pytest.mark.parametrize(("public", "fields"), [(OTHER_PUBLIC, COMMAND), (RFC8032_PUBLIC, {**COMMAND, "reason": "x"})])
def test_an_owner_command_that_does_not_verify_raises(public: str, fields: dict) -> None:
    signature = sign_owner_command(KEY, "approve", **COMMAND)
    with pytest.raises(ApprovalError, match="the approve command is not signed by bank_a's signing key") as info:
        verify_owner_command(public, signature, "approve", **fields)
    assert info.value.details == {"party": "bank_a", "check": "owner_command_signature"}


# --- freshness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, OWNER_MESSAGE_MAX_SKEW_MS, -OWNER_MESSAGE_MAX_SKEW_MS])
def test_an_owner_message_within_the_skew_is_fresh(offset: int) -> None:
    assert check_issued_at(1_000_000_000 + offset, 1_000_000_000, party="bank_a") is None


@pytest.mark.parametrize("offset", [OWNER_MESSAGE_MAX_SKEW_MS + 1, -OWNER_MESSAGE_MAX_SKEW_MS - 1])
def test_an_owner_message_outside_the_skew_is_refused(offset: int) -> None:
    with pytest.raises(ApprovalError, match="the request of bank_a is stale or dated in the future") as info:
        check_issued_at(1_000_000_000 + offset, 1_000_000_000, party="bank_a")
    assert info.value.details == {"party": "bank_a", "check": "issued_at"}
