"""The issuer of ``issued_at_ms``: it never repeats a millisecond, whatever the clock does."""

from __future__ import annotations

import threading

from connectors.clock import MillisecondIssuer


class FakeClock:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def test_a_clock_that_stands_still_or_steps_back_still_gets_new_stamps() -> None:
    clock = FakeClock(1_700_000_000.0004)
    issuer = MillisecondIssuer(clock)
    assert [issuer.issue() for _ in range(3)] == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    clock.seconds -= 5  # the wall clock steps back: the stamps do not
    assert issuer.issue() == 1_700_000_000_003


def test_the_stamp_follows_the_clock_once_it_moves_past_the_last_one() -> None:
    clock = FakeClock(1_700_000_000.0)
    issuer = MillisecondIssuer(clock)
    assert issuer.issue() == 1_700_000_000_000
    clock.seconds = 1_700_000_001.25
    assert issuer.issue() == 1_700_000_001_250


def test_threads_never_share_a_stamp() -> None:
    issuer = MillisecondIssuer(FakeClock(1_700_000_000.0))
    stamps: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [issuer.issue() for _ in range(500)]
        with lock:
            stamps.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(stamps) == list(range(1_700_000_000_000, 1_700_000_000_000 + 2000))
