"""One catalog of Sealroom's errors.

Every error the platform raises on purpose is a :class:`SealroomError`. Each class maps to exactly
one gRPC status code and carries a *public* message (safe to send to any caller: it never contains a
row value, a key, or a literal from a party's data) and optional structured ``details`` (party,
dataset, column, rule, suggestion...) that are equally public. The gRPC edge (``sealroom.rpc``)
sends only these; anything else that escapes becomes :class:`InternalError` with a generic message,
and the original is logged on the server without being sent.

Errors also inherit a builtin where one fits (``ValueError``, ``PermissionError``...) so callers
can catch them idiomatically.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import grpc

__all__ = [
    "SealroomError",
    "InvalidQueryError",
    "PolicyRefusalError",
    "ApprovalError",
    "AttestationError",
    "AuthenticationError",
    "CallerError",
    "IntegrityError",
    "ResourceExhaustedError",
    "NotFoundError",
    "AlreadyExistsError",
    "UnavailableError",
    "JobFailedError",
    "ConfigError",
    "SourceError",
    "MpcError",
    "AuditError",
    "InternalError",
    "CATALOG",
    "from_code",
]


class SealroomError(Exception):
    """Base of every Sealroom error.

    ``message`` must be public: written for the person who reads it, saying what was wrong and how
    to fix it, and never containing a row value, key, or party data literal.
    """

    code: ClassVar[str] = "error"
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        return self.message


class InvalidQueryError(SealroomError, ValueError):
    """The SQL cannot be parsed or is outside what Sealroom runs (e.g. it would output rows)."""

    code = "invalid_query"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class PolicyRefusalError(SealroomError, PermissionError):
    """An owner's policy refuses the query; details name party, dataset, column, rule, suggestion."""

    code = "policy_refusal"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class ApprovalError(SealroomError):
    """An approval is missing, forged, for another plan, or was rejected."""

    code = "approval"
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class AttestationError(SealroomError):
    """Attestation evidence did not verify or did not pass the relying party's policy."""

    code = "attestation"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class AuthenticationError(SealroomError):
    """A caller could not be authenticated (a missing or invalid analyst token, or an enclave job's token)."""

    code = "unauthenticated"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class CallerError(SealroomError, PermissionError):
    """The caller is authenticated but may not call this method (another party, a non-coordinator)."""

    code = "permission_denied"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class IntegrityError(SealroomError):
    """A sealed batch or stream failed authentication (tampered, replayed, reordered, truncated...).

    Deliberately one type with one message for every way a stream can fail to authenticate, so a
    sender learns nothing from which check failed.
    """

    code = "integrity"
    grpc_status = grpc.StatusCode.DATA_LOSS


class ResourceExhaustedError(SealroomError):
    """A configured limit (memory, rows, message size) was exceeded."""

    code = "resource_exhausted"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(SealroomError):
    """The caller's deadline passed or the caller cancelled the call; the work was stopped."""

    code = "deadline_exceeded"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(SealroomError, LookupError):
    code = "not_found"
    grpc_status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SealroomError):
    code = "already_exists"
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class UnavailableError(SealroomError):
    """A component could not be reached (a party agent, the enclave worker, the coordinator)."""

    code = "unavailable"
    grpc_status = grpc.StatusCode.UNAVAILABLE


class JobFailedError(SealroomError):
    """A job ended without a release (a party dropped out, a batch was bad, a stage failed)."""

    code = "job_failed"
    grpc_status = grpc.StatusCode.ABORTED


class ConfigError(SealroomError, ValueError):
    """A configuration or policy file is malformed; the message names the file, the key, and what
    is expected."""

    code = "config"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class SourceError(SealroomError):
    """A data source cannot be read as registered (missing file, schema mismatch...)."""

    code = "source"
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class MpcError(JobFailedError):
    """An MPC session ended without a release: a player crashed, stalled, disconnected, refused a peer
    or failed. ``details`` name the player (``player`` index, ``party`` name) and the ``reason``;
    never a value."""

    code = "mpc"
    grpc_status = grpc.StatusCode.ABORTED


class AuditError(SealroomError):
    """A release receipt, transparency-log entry or checkpoint does not verify (tampered, forged,
    forked, truncated, or bound to something else). ``details["check"]`` names the failed check;
    ``details`` may also name the ``entry`` (sequence number), ``checkpoint`` (position) and
    ``query_id``. Never a value from the data."""

    code = "audit"
    grpc_status = grpc.StatusCode.DATA_LOSS


class InternalError(SealroomError):
    """Anything unexpected. Its public message is generic; the cause is only logged server-side."""

    code = "internal"
    grpc_status = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "internal error; the server log has the details", **kw: Any):
        super().__init__(message, **kw)


CATALOG: dict[str, type[SealroomError]] = {
    cls.code: cls
    for cls in (
        SealroomError,
        InvalidQueryError,
        PolicyRefusalError,
        ApprovalError,
        AttestationError,
        AuthenticationError,
        CallerError,
        IntegrityError,
        ResourceExhaustedError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        UnavailableError,
        JobFailedError,
        ConfigError,
        SourceError,
        MpcError,
        AuditError,
        InternalError,
    )
}


def from_code(code: str, message: str, details: dict[str, Any] | None = None) -> SealroomError:
    """Rebuild an error received over the wire (unknown codes become :class:`InternalError`)."""
    cls = CATALOG.get(code, InternalError)
    if cls is InternalError:
        return InternalError(message, details=details)
    return cls(message, details=details)
