"""Owners' signatures: approvals of plans, sealed-stream headers, owner commands and owner actions,
and a party's registration with the coordinator (:class:`Registration`).

An approval is an Ed25519 signature over a domain-separated message holding a plan hash (SHA-256
of the plan's canonical JSON, :mod:`sealroom.planning.plan`) and the query's :class:`LogPosition`:
where the coordinator's ``query_submitted`` entry sits in its transparency log, as the owner's agent
checked it (docs/audit.md, "No approval outside the log"). The enclave binds that position into its
signed result and refuses approvals that name different positions. Approvals without a position
(``sealroom/v1/approval``) are those of older releases: still verifiable in old receipts, never
accepted for a new release.

Manual approvals add two signed messages, both by the owner's key and domain-separated from the
approval itself (so neither can ever be taken for an approval, nor one for the other):

- an *owner command* (``sealroom approve/reject/revoke`` to the owner's own agent), which proves the
  command comes from whoever holds the party's signing key, not from anyone who can reach the agent;
- an *owner action* (the agent to the coordinator: SubmitApproval, RejectQuery, RevokeApproval, and
  SubmitCosignature for its witness co-signatures of the transparency log), which proves the party
  itself acts, for itself, on this query and plan (or checkpoint).

Both carry ``issued_at_ms``; receivers accept them only fresh and never twice.

Every ``verify_*`` here returns nothing and raises on failure (pyca's ``verify``), never a bool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.canonical import canonical_json
from sealroom.errors import ApprovalError, AuthenticationError
from sealroom.sealed import integrity_error
from sealroom.v1 import party_pb2

APPROVAL_DOMAIN = b"sealroom/v1/approval\x00"
# An approval that binds the query's log position (every approval since the log binding).
LOGGED_APPROVAL_DOMAIN = b"sealroom/v1/approval-logged\x00"
STREAM_DOMAIN = b"sealroom/v1/stream-header\x00"
OWNER_ACTION_DOMAIN = b"sealroom/v1/owner-action\x00"
OWNER_COMMAND_DOMAIN = b"sealroom/v1/owner-command\x00"
# "cosign": an agent's witness co-signature of the coordinator's log (SubmitCosignature), whose
# plan_hash field holds the SHA-256 of the co-signed checkpoint's body. Owner commands use the first three.
OWNER_ACTIONS = ("approve", "reject", "revoke", "cosign")
# How far an owner command's or action's issued_at may be from the receiver's clock.
OWNER_MESSAGE_MAX_SKEW_MS = 300_000


@dataclass(frozen=True)
class LogPosition:
    """Where a query's ``query_submitted`` entry sits in the coordinator's transparency log: its
    leaf index, and the size and root hash of the checkpoint it was proven included in."""

    leaf_index: int
    tree_size: int
    root_hash: bytes

    def __post_init__(self) -> None:
        if not (0 <= self.leaf_index < self.tree_size) or len(self.root_hash) != 32:
            raise ApprovalError(
                "the log position names no leaf of its checkpoint (leaf_index < tree_size, a 32-byte root hash)",
                details={"check": "log_position"},
            )

    def to_dict(self) -> dict[str, Any]:
        return {"leaf_index": self.leaf_index, "tree_size": self.tree_size, "root_hash": self.root_hash.hex()}

    def to_proto(self) -> party_pb2.LogPosition:
        return party_pb2.LogPosition(leaf_index=self.leaf_index, tree_size=self.tree_size, root_hash=self.root_hash)

    @classmethod
    def from_proto(cls, msg: party_pb2.LogPosition) -> LogPosition | None:
        """The position a request carries; None when it carries none (an empty message)."""
        if msg.tree_size == 0 and not msg.root_hash:
            return None
        return cls(int(msg.leaf_index), int(msg.tree_size), bytes(msg.root_hash))

    @classmethod
    def from_dict(cls, doc: Any) -> LogPosition:
        """The position from its JSON form (:meth:`to_dict`); ApprovalError when it is malformed."""
        try:
            if not isinstance(doc, dict) or set(doc) != {"leaf_index", "tree_size", "root_hash"}:
                raise ValueError
            index, size = doc["leaf_index"], doc["tree_size"]
            if type(index) is not int or type(size) is not int:
                raise ValueError
            return cls(index, size, bytes.fromhex(doc["root_hash"]))
        except (ValueError, TypeError):
            raise ApprovalError(
                "the log position is malformed (leaf_index, tree_size, root_hash)", details={"check": "log_position"}
            ) from None


def approval_message(plan_hash: str, log: LogPosition | None = None) -> bytes:
    """``"sealroom/v1/approval-logged" 0x00 canonical_json({plan_hash, log})``; without ``log``, the
    older ``"sealroom/v1/approval" 0x00 plan_hash`` (kept to verify old receipts)."""
    if log is None:
        return APPROVAL_DOMAIN + bytes.fromhex(plan_hash)
    return LOGGED_APPROVAL_DOMAIN + canonical_json({"plan_hash": plan_hash, "log": log.to_dict()})


def sign_approval(key: Ed25519PrivateKey, plan_hash: str, log: LogPosition | None = None) -> bytes:
    return key.sign(approval_message(plan_hash, log))


def verify_approval(
    public_key_hex: str, plan_hash: str, signature: bytes, *, party: str, log: LogPosition | None = None
) -> None:
    """Raise ApprovalError unless ``signature`` is ``party``'s approval of ``plan_hash`` (at the log
    position ``log``: an approval signed for another position does not verify)."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            signature, approval_message(plan_hash, log)
        )
    except (InvalidSignature, ValueError):
        raise ApprovalError(
            f"the approval of {party} does not verify for this plan"
            + (" and log position" if log is not None else "")
            + " (forged, or signed for another plan or position)",
            details={"party": party, "check": "approval_signature"},
        ) from None


def sign_stream_header(key: Ed25519PrivateKey, header: bytes) -> bytes:
    """A party's signature over its sealed stream header: proves which owner sealed the stream.

    HPKE base mode alone would let anyone holding the job's public key seal rows under any party's
    name; the enclave accepts a stream only with this signature by the key the plan names.
    """
    return key.sign(STREAM_DOMAIN + header)


def verify_stream_header(public_key_hex: str, header: bytes, signature: bytes) -> None:
    """Raise the sealed stream's one :class:`~sealroom.errors.IntegrityError` unless ``signature`` is
    the owner's signature over ``header`` (the same error as every other stream check, so no detail
    of which check failed reaches the sender)."""
    if not _verifies(public_key_hex, signature, STREAM_DOMAIN + header):
        raise integrity_error()


def _owner_message(domain: bytes, action: str, fields: dict[str, Any]) -> bytes:
    if action not in OWNER_ACTIONS:
        raise ValueError(f"unknown owner action {action!r}")
    return domain + canonical_json({"action": action, **fields})


def owner_action_message(
    action: str,
    *,
    query_id: str,
    party: str,
    plan_hash: str,
    issued_at_ms: int,
    reason: str = "",
    expires_at_ms: int = 0,
) -> bytes:
    """What a party signs when it approves, rejects or revokes at the coordinator:
    ``"sealroom/v1/owner-action" 0x00 canonical_json({action, query_id, party, plan_hash, reason,
    issued_at_ms, expires_at_ms})``."""
    return _owner_message(
        OWNER_ACTION_DOMAIN,
        action,
        {
            "query_id": query_id,
            "party": party,
            "plan_hash": plan_hash,
            "reason": reason,
            "issued_at_ms": int(issued_at_ms),
            "expires_at_ms": int(expires_at_ms),
        },
    )


def sign_owner_action(key: Ed25519PrivateKey, action: str, **fields: Any) -> bytes:
    return key.sign(owner_action_message(action, **fields))


def verify_owner_action(public_key_hex: str, signature: bytes, action: str, **fields: Any) -> None:
    """Raise ApprovalError unless ``signature`` is the party's own signature over this action."""
    party = fields.get("party", "")
    if not _verifies(public_key_hex, signature, owner_action_message(action, **fields)):
        raise ApprovalError(
            f"the {action} request for {party} is not signed by {party}'s registered key; only a party "
            "may approve, reject or revoke for itself",
            details={"party": party, "check": "owner_signature"},
        )


def owner_command_message(
    action: str, *, party: str, query_id: str, issued_at_ms: int, reason: str = "", plan_hash: str = ""
) -> bytes:
    """What the owner signs to command its own agent (``sealroom approve/reject/revoke``):
    ``"sealroom/v1/owner-command" 0x00 canonical_json({action, party, query_id, plan_hash, reason,
    issued_at_ms})``. ``plan_hash`` is empty when the owner does not pin the plan."""
    return _owner_message(
        OWNER_COMMAND_DOMAIN,
        action,
        {
            "party": party,
            "query_id": query_id,
            "plan_hash": plan_hash,
            "reason": reason,
            "issued_at_ms": int(issued_at_ms),
        },
    )


def sign_owner_command(key: Ed25519PrivateKey, action: str, **fields: Any) -> bytes:
    return key.sign(owner_command_message(action, **fields))


def verify_owner_command(public_key_hex: str, signature: bytes, action: str, **fields: Any) -> None:
    """Raise ApprovalError unless ``signature`` is by the agent's own key over this command."""
    if not _verifies(public_key_hex, signature, owner_command_message(action, **fields)):
        raise ApprovalError(
            f"the {action} command is not signed by {fields.get('party', 'this party')}'s signing key; "
            "run it with the key the agent uses (--key, or SEALROOM_PARTY_KEY)",
            details={"party": fields.get("party", ""), "check": "owner_command_signature"},
        )


def check_issued_at(issued_at_ms: int, now_ms: int, *, party: str) -> None:
    """Raise ApprovalError unless an owner message's ``issued_at_ms`` is within the allowed skew."""
    if abs(now_ms - int(issued_at_ms)) > OWNER_MESSAGE_MAX_SKEW_MS:
        raise ApprovalError(
            f"the request of {party} is stale or dated in the future (more than "
            f"{OWNER_MESSAGE_MAX_SKEW_MS // 1000} s from this server's clock); check the clocks and retry",
            details={"party": party, "check": "issued_at"},
        )


def _verifies(public_key_hex: str, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- party registration (RegisterParty) --------------------------------------------------------

REGISTRATION_DOMAIN = b"sealroom/v1/party-registration\x00"


class RegisteredDataset(Protocol):
    """What a registration binds of one dataset: a ``DatasetInfo`` message or a stored dataset record."""

    @property
    def name(self) -> str: ...
    @property
    def arrow_schema(self) -> bytes: ...
    @property
    def policy_digest(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def approximate_rows(self) -> int: ...


def registration_datasets_sha256(datasets: Iterable[RegisteredDataset]) -> str:
    """SHA-256 (hex) of what a registration says of its datasets: the canonical JSON of
    ``[{name, policy_digest, schema_sha256, description_sha256, approximate_rows}]`` sorted by name
    (the policy is bound by its digest, which the coordinator recomputes from the policy it stores)."""
    summaries = sorted(
        (
            {
                "name": d.name,
                "policy_digest": d.policy_digest,
                "schema_sha256": hashlib.sha256(bytes(d.arrow_schema)).hexdigest(),
                "description_sha256": hashlib.sha256(d.description.encode("utf-8")).hexdigest(),
                "approximate_rows": int(d.approximate_rows),
            }
            for d in datasets
        ),
        key=lambda s: str(s["name"]),
    )
    return hashlib.sha256(canonical_json(summaries)).hexdigest()


@dataclass(frozen=True)
class Registration:
    """What a party signs, with the key it registers, when it registers with the coordinator
    (``RegisterParty``): ``"sealroom/v1/party-registration" 0x00 canonical_json({party, owner_key,
    address_sha256, datasets_sha256, datasets, issued_at_ms})``.

    The address and the dataset list enter by their SHA-256, so every signed field is one that the
    log's ``party_registered`` entry records and ``sealroom audit verify`` checks the party's own
    signature without learning where its agent listens. ``owner_key`` is the Ed25519 public key
    (hex) being registered: the signature proves its holder asked for this registration."""

    party: str
    owner_key: str
    address_sha256: str
    datasets_sha256: str
    datasets: int
    issued_at_ms: int

    @classmethod
    def of(
        cls, *, party: str, owner_key: str, address: str, datasets: Sequence[RegisteredDataset], issued_at_ms: int
    ) -> Registration:
        return cls(
            party=party,
            owner_key=owner_key,
            address_sha256=hashlib.sha256(address.encode("utf-8")).hexdigest(),
            datasets_sha256=registration_datasets_sha256(datasets),
            datasets=len(datasets),
            issued_at_ms=int(issued_at_ms),
        )

    def message(self) -> bytes:
        return REGISTRATION_DOMAIN + canonical_json(
            {
                "party": self.party,
                "owner_key": self.owner_key,
                "address_sha256": self.address_sha256,
                "datasets_sha256": self.datasets_sha256,
                "datasets": self.datasets,
                "issued_at_ms": self.issued_at_ms,
            }
        )

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return key.sign(self.message())

    def verify(self, signature: bytes) -> None:
        """Raise AuthenticationError unless ``signature`` is by ``owner_key`` over this registration."""
        if not signature or not _verifies(self.owner_key, signature, self.message()):
            raise AuthenticationError(
                f"the registration of {self.party} is not signed by the key it registers (unsigned, forged, or "
                "altered on the way); a party agent signs its registration with its own signing key",
                details={"party": self.party, "check": "registration_signature"},
            )

    def check_fresh(self, now_ms: int, *, last_ms: int = 0) -> None:
        """Raise AuthenticationError unless ``issued_at_ms`` is within the allowed skew of ``now_ms``
        and later than ``last_ms`` (the party's last accepted registration): no replay."""
        if abs(now_ms - self.issued_at_ms) > OWNER_MESSAGE_MAX_SKEW_MS:
            raise AuthenticationError(
                f"the registration of {self.party} is stale or dated in the future (more than "
                f"{OWNER_MESSAGE_MAX_SKEW_MS // 1000} s from the coordinator's clock); check the clocks and retry",
                details={"party": self.party, "check": "issued_at"},
            )
        if self.issued_at_ms <= last_ms:
            raise AuthenticationError(
                f"the registration of {self.party} is not newer than its last accepted one: a replay is refused; "
                "the agent signs a fresh registration at each start",
                details={"party": self.party, "check": "replay"},
            )


# -- an owner's reads from its own agent -------------------------------------------------------------

OWNER_READ_DOMAIN = b"sealroom/v1/owner-read\x00"
# What an owner may read from its agent with a signed request ("pending": ListPending).
OWNER_READS = ("pending",)


def owner_read_message(what: str, *, party: str, issued_at_ms: int) -> bytes:
    """What the owner signs to read ``what`` from its own agent (``sealroom pending``):
    ``"sealroom/v1/owner-read" 0x00 canonical_json({read, party, issued_at_ms})``, domain-separated
    from approvals, commands and actions so a read request can never be taken for any of them."""
    if what not in OWNER_READS:
        raise ValueError(f"unknown owner read {what!r}")
    return OWNER_READ_DOMAIN + canonical_json({"read": what, "party": party, "issued_at_ms": int(issued_at_ms)})


def sign_owner_read(key: Ed25519PrivateKey, what: str, *, party: str, issued_at_ms: int) -> bytes:
    return key.sign(owner_read_message(what, party=party, issued_at_ms=issued_at_ms))


def verify_owner_read(
    public_key_hex: str, signature: bytes, what: str, *, party: str, issued_at_ms: int, now_ms: int
) -> None:
    """Raise ApprovalError unless ``signature`` is by the agent's own key over this read, and fresh."""
    if not _verifies(public_key_hex, signature, owner_read_message(what, party=party, issued_at_ms=issued_at_ms)):
        raise ApprovalError(
            f"the request to read the {what} plans is not signed by {party}'s signing key; only its owner "
            "may read them (run it with the key the agent uses: --key, or SEALROOM_PARTY_KEY)",
            details={"party": party, "check": "owner_read_signature"},
        )
    check_issued_at(issued_at_ms, now_ms, party=party)
