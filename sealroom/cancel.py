"""Stopping work whose caller has gone: one check between the steps of a long call.

A gRPC handler keeps running after its caller's deadline passes or the caller cancels; the server
learns of it only by asking its context. :class:`CallScope` asks between steps (the coordinator
between the steps of planning, the enclave between a job's stages) and raises
:class:`~sealroom.errors.DeadlineExceededError` naming the step, so nobody works for a caller that
is no longer waiting. :data:`UNBOUNDED` never stops (work that no caller waits for).
"""

from __future__ import annotations

from typing import Protocol

from sealroom.errors import DeadlineExceededError


class CallContext(Protocol):
    """What :class:`CallScope` needs of a ``grpc.ServicerContext``."""

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


class CallScope:
    """The lifetime of one call: :meth:`check` raises once the call is cancelled or past its deadline."""

    def __init__(self, context: CallContext | None = None):
        self._context = context

    def ended(self) -> bool:
        """Whether the caller cancelled the call or its deadline passed."""
        if self._context is None:
            return False
        remaining = self._context.time_remaining()
        return not self._context.is_active() or (remaining is not None and remaining <= 0)

    def check(self, step: str) -> None:
        """Raise :class:`DeadlineExceededError` if the call has ended (``step``: what was about to run)."""
        if self.ended():
            raise DeadlineExceededError(
                f"the call was cancelled or its deadline passed; stopped before {step}. Retry with a "
                "longer deadline if the work needs it",
                details={"step": step},
            )


UNBOUNDED = CallScope()
