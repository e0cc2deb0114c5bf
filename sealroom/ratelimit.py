"""Per-caller rate limits: one token bucket per caller (an analyst's name, a party's identity).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; each call takes one. A
caller that finds its bucket empty is refused with :class:`~sealroom.errors.ResourceExhaustedError`
naming the limit and when to retry, before any work is done for it. Buckets are independent, so one
caller's flood leaves every other caller's calls as they were::

    limits = RateLimiter(rate=10, burst=50, limit="[coordinator] analyst_calls_per_second")
    limits.take("alice")  # raises ResourceExhaustedError when alice is over her limit

The clock is injectable (``clock``: seconds, monotonic) so tests need not sleep. Memory is bounded:
past ``max_callers`` buckets, the full ones (callers idle long enough to be back at ``burst``, who
lose nothing by being forgotten) are dropped, and if none is full the oldest is.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sealroom.errors import ResourceExhaustedError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets keyed by caller. Thread-safe. ``rate <= 0`` disables the limit."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        limit: str,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 10_000,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self.limit = limit  # the setting to name in a refusal, e.g. "[coordinator] analyst_calls_per_second"
        self._clock = clock
        self._max_callers = max_callers
        # caller -> (tokens, when they were counted); least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The callers whose buckets are kept (at most ``max_callers``)."""
        with self._lock:
            return len(self._buckets)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def retry_after(self, caller: str) -> float:
        """Take one token from ``caller``'s bucket: 0.0 if there was one, else the seconds until
        there will be (nothing is taken then)."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.pop(caller, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            self._bound(now)
        return wait

    def take(self, caller: str, *, what: str = "calls") -> None:
        """Take one token for ``caller`` or raise ResourceExhaustedError (details: the caller, the
        limit's setting, ``retry_after_seconds``). ``what`` names the calls limited, for the message."""
        wait = self.retry_after(caller)
        if wait == 0.0:
            return
        retry = math.ceil(wait * 10) / 10
        raise ResourceExhaustedError(
            f"{caller} is over its rate limit for {what} ({self.rate:g} a second, bursts of {self.burst}; "
            f"{self.limit}); retry in {retry:g} s",
            details={"caller": caller, "limit": self.limit, "retry_after_seconds": retry},
        )

    def _bound(self, now: float) -> None:
        """Under _lock: forget full buckets, then the least recently used, past max_callers."""
        if len(self._buckets) <= self._max_callers:
            return
        for caller, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.rate >= self.burst:
                del self._buckets[caller]
        while len(self._buckets) > self._max_callers:
            self._buckets.popitem(last=False)
