"""Who may call each RPC: one declarative table for every method of every Sealroom service.

Every method names the one kind of caller it serves (:class:`Callers`), and the servicer wrapper
(:func:`sealroom.rpc.translate_errors`, and :func:`sealroom.rpc.raw_stream_handler` for the enclave's
upload stream) enforces it before the method does any work:

- a method missing from :data:`RULES` is refused to everyone (fail closed; a unit test walks the
  generated stubs so a new method cannot be forgotten);
- the transport kinds (``COORDINATOR``, ``PARTY_OF_JOB``) are decided here, by the identity the
  mutual-TLS handshake verified (:func:`sealroom.rpc.caller_identity`): no identity is
  :class:`~sealroom.errors.AuthenticationError` (UNAUTHENTICATED), another identity is
  :class:`~sealroom.errors.CallerError` (PERMISSION_DENIED);
- the kinds proved inside the call (``ANALYST``: a bearer token; ``OWNER``: a request signed by the
  agent's own key) are checked next by the servicer's ``prove_caller`` (a servicer serving such a
  method without one refuses it);
- ``SIGNED_BY_PARTY`` requests carry the acting party's signature over the request itself, which the
  handler verifies against the party's registered key as its first step (``sealroom.signing``).

docs/wire.md ("Who may call what") is this table in prose.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Any

from sealroom.errors import AuthenticationError, CallerError
from sealroom.pki import Identity
from sealroom.wire import UPLOAD_PATH


class Callers(enum.Enum):
    """The kinds of caller a method may serve, and how each is proven."""

    ANYONE = "anyone"
    COORDINATOR = "the coordinator"
    PARTY_OF_JOB = "a party the job names"
    JOB_MEMBER = "the coordinator or a party the job names"
    OWNER = "the agent's own owner"
    ANALYST = "an analyst"
    SIGNED_BY_PARTY = "the party that signs the request"

    @property
    def proof(self) -> str:
        return PROOFS[self]


PROOFS: Mapping[Callers, str] = {
    Callers.ANYONE: "nothing (public facts only)",
    Callers.COORDINATOR: "mutual TLS: a client certificate of the collaboration CA with CN `coordinator`",
    Callers.PARTY_OF_JOB: (
        "mutual TLS: a client certificate with CN `party:<name>`, and the job's plan names that party"
    ),
    Callers.JOB_MEMBER: (
        "mutual TLS: a client certificate with CN `coordinator`, or CN `party:<name>` of a party the job's plan names"
    ),
    Callers.OWNER: "the request is signed by the party's own signing key, fresh (sealroom.signing)",
    Callers.ANALYST: "the analyst's bearer token; a query's status and result only to the analyst who submitted it",
    Callers.SIGNED_BY_PARTY: "the request is signed by the party it names, with its registered key, fresh",
}

# Proved by the servicer's ``prove_caller`` hook before the method runs.
PROVED_BY_SERVICER = frozenset({Callers.OWNER, Callers.ANALYST})
# Proved by a signature the request carries (in its fields named ``*signature``).
SIGNED = frozenset({Callers.OWNER, Callers.SIGNED_BY_PARTY})

_C = Callers
RULES: Mapping[str, Callers] = {
    # -- the coordinator: analysts (token), parties (signed requests), the public log -------------
    "/sealroom.v1.Coordinator/RegisterParty": _C.SIGNED_BY_PARTY,
    "/sealroom.v1.Coordinator/ListDatasets": _C.ANALYST,
    "/sealroom.v1.Coordinator/Explain": _C.ANALYST,
    "/sealroom.v1.Coordinator/Submit": _C.ANALYST,
    "/sealroom.v1.Coordinator/GetStatus": _C.ANALYST,
    "/sealroom.v1.Coordinator/GetResult": _C.ANALYST,
    "/sealroom.v1.Coordinator/ListQueries": _C.ANALYST,
    "/sealroom.v1.Coordinator/GetBudget": _C.ANALYST,
    "/sealroom.v1.Coordinator/SubmitApproval": _C.SIGNED_BY_PARTY,
    "/sealroom.v1.Coordinator/RejectQuery": _C.SIGNED_BY_PARTY,
    "/sealroom.v1.Coordinator/RevokeApproval": _C.SIGNED_BY_PARTY,
    "/sealroom.v1.Coordinator/GetCheckpoint": _C.ANYONE,
    "/sealroom.v1.Coordinator/GetConsistencyProof": _C.ANYONE,
    "/sealroom.v1.Coordinator/SubmitCosignature": _C.SIGNED_BY_PARTY,
    # -- a party's agent: the coordinator drives queries, the owner decides -----------------------
    "/sealroom.v1.PartyAgent/ReviewPlan": _C.COORDINATOR,
    "/sealroom.v1.PartyAgent/Contribute": _C.COORDINATOR,
    "/sealroom.v1.PartyAgent/GetInfo": _C.ANYONE,
    "/sealroom.v1.PartyAgent/GetProgress": _C.COORDINATOR,
    "/sealroom.v1.PartyAgent/PrepareMpc": _C.COORDINATOR,
    "/sealroom.v1.PartyAgent/RunMpc": _C.COORDINATOR,
    "/sealroom.v1.PartyAgent/ListPending": _C.OWNER,
    "/sealroom.v1.PartyAgent/Approve": _C.OWNER,
    "/sealroom.v1.PartyAgent/Reject": _C.OWNER,
    "/sealroom.v1.PartyAgent/Revoke": _C.OWNER,
    # -- the enclave worker: the coordinator runs jobs, the job's parties attest and stream --------
    "/sealroom.v1.Enclave/GetInfo": _C.ANYONE,
    "/sealroom.v1.Enclave/CreateJob": _C.COORDINATOR,
    "/sealroom.v1.Enclave/Attest": _C.JOB_MEMBER,
    "/sealroom.v1.Enclave/Execute": _C.COORDINATOR,
    "/sealroom.v1.Enclave/AbortJob": _C.COORDINATOR,
    "/sealroom.v1.Enclave/PrepareMpc": _C.COORDINATOR,
    "/sealroom.v1.Enclave/RunMpc": _C.COORDINATOR,
    UPLOAD_PATH: _C.PARTY_OF_JOB,
}


def method_path(service: str, method: str) -> str:
    """The gRPC path of ``method`` of the service whose full name is ``service``."""
    return f"/{service}/{method}"


def admit(path: str, identity: Identity | None) -> Callers:
    """The rule of the method at ``path``, once the caller's transport identity satisfies it.

    Raises CallerError for a method without a rule (refused to everyone) or a caller of another
    identity, AuthenticationError for a caller without one where an identity is needed. The kinds
    proved inside the call (:data:`PROVED_BY_SERVICER`, ``SIGNED_BY_PARTY``) are returned for the
    servicer to check next."""
    rule = RULES.get(path)
    if rule is None:
        raise CallerError(f"{path} has no caller rule; it is refused to everyone", details={"method": path})
    if rule is Callers.COORDINATOR:
        _require(path, identity, "coordinator", rule)
    elif rule is Callers.PARTY_OF_JOB:
        _require(path, identity, "party", rule)
    elif rule is Callers.JOB_MEMBER and not (identity is not None and identity.role == "coordinator"):
        _require(path, identity, "party", rule)
    return rule


def unprovable(path: str) -> CallerError:
    """The refusal of a method whose rule this servicer has no way to prove (fail closed)."""
    return CallerError(f"{path} has no way to prove its callers here; it is refused", details={"method": path})


def require_signed(path: str, request: Any) -> None:
    """For a method whose callers sign their requests: AuthenticationError unless every signature
    field of ``request`` is filled (a request without its proof does no work; the servicer or the
    handler then verifies the signature itself)."""
    fields = signature_fields(request.DESCRIPTOR)
    if any(not getattr(request, name) for name in fields):
        raise AuthenticationError(
            f"{path} needs a request signed by {RULES[path].value} ({RULES[path].proof}); this one is unsigned",
            details={"method": path, "callers": RULES[path].name.lower()},
        )


def signature_fields(message: Any) -> list[str]:
    """The fields of a message descriptor that hold a caller's signature."""
    return [f.name for f in message.fields if f.name.endswith("signature")]


def _require(path: str, identity: Identity | None, role: str, rule: Callers) -> Identity:
    """``identity``, if it has ``role``; AuthenticationError for none, CallerError for another."""
    if identity is None:
        raise AuthenticationError(
            f"{path} may be called only by {rule.value}, proven by {rule.proof}; this call presented no "
            "certificate of the collaboration CA",
            details={"method": path, "callers": rule.name.lower()},
        )
    if identity.role != role:
        raise CallerError(
            f"{path} may be called only by {rule.value}, not by {identity}",
            details={"method": path, "callers": rule.name.lower(), "caller": str(identity)},
        )
    return identity


def require_party_of(path: str, identity: Identity | None, parties: Collection[str]) -> str:
    """For a ``PARTY_OF_JOB`` method (and a party calling a ``JOB_MEMBER`` one): the calling party's
    name, if ``parties`` (the parties the job's plan names) holds it; AuthenticationError or
    CallerError otherwise."""
    identity = _require(path, identity, "party", Callers.PARTY_OF_JOB)
    if identity.name not in parties:
        raise CallerError(
            f"{path} may be called only by a party the job names; {identity} is not one of them",
            details={"method": path, "callers": "party_of_job", "caller": str(identity)},
        )
    return identity.name
