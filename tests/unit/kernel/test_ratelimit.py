"""Per-caller token buckets (sealroom/ratelimit.py), on an injected clock."""

from __future__ import annotations

import pytest

from sealroom.errors import ResourceExhaustedError
from sealroom.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, **kw: object) -> RateLimiter:
    return RateLimiter(rate=2.0, burst=3, limit="[coordinator] analyst_calls_per_second", clock=clock, **kw)  # type: ignore[arg-type]


def test_a_burst_then_the_rate_and_a_refusal_naming_the_limit_and_when_to_retry() -> None:
    clock = Clock()
    limits = _limiter(clock)
    for _ in range(3):
        limits.take("mallory")
    with pytest.raises(ResourceExhaustedError) as info:
        limits.take("mallory", what="Explain and Submit")
    err = info.value
    assert err.code == "resource_exhausted"
    assert err.details == {
        "caller": "mallory",
        "limit": "[coordinator] analyst_calls_per_second",
        "retry_after_seconds": 0.5,
    }
    assert err.message == (
        "mallory is over its rate limit for Explain and Submit (2 a second, bursts of 3; "
        "[coordinator] analyst_calls_per_second); retry in 0.5 s"
    )
    assert limits.retry_after("mallory") == pytest.approx(0.5)  # a refused call takes nothing
    clock.now += 0.5
    limits.take("mallory")  # one token back after 1/rate seconds
    assert limits.retry_after("mallory") == pytest.approx(0.5)
    clock.now += 100
    for _ in range(3):  # idle: back to the burst, never beyond it
        limits.take("mallory")
    assert limits.retry_after("mallory") > 0


def test_callers_have_their_own_buckets() -> None:
    clock = Clock()
    limits = _limiter(clock)
    for _ in range(3):
        limits.take("mallory")
    assert limits.retry_after("mallory") > 0
    for _ in range(3):
        limits.take("alice")


def test_rate_zero_is_no_limit_and_memory_is_bounded() -> None:
    clock = Clock()
    off = RateLimiter(rate=0, burst=1, limit="x", clock=clock)
    for _ in range(100):
        off.take("mallory")
    limits = _limiter(clock, max_callers=10)
    for i in range(100):
        limits.take(f"caller{i}")
    assert len(limits) <= 10
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0, limit="x")
