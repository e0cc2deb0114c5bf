"""The one way the audit package refuses: an :class:`~sealroom.errors.AuditError` whose
``details["check"]`` names the check that failed (the log's verifier, the receipt's verifier and the
witnesses all speak this way, so a caller and a test can tell which check refused)."""

from __future__ import annotations

from typing import Any

from sealroom.errors import AuditError

__all__ = ["refuse"]


def refuse(check: str, message: str, **details: Any) -> AuditError:
    """The error to raise when ``check`` fails: ``AuditError(message, details={"check": check, ...})``."""
    return AuditError(message, details={"check": check, **details})
