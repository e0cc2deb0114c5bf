"""The ``issued_at_ms`` of the messages a data owner signs, from an issuer that never repeats one.

Every message an owner signs (a command to its agent, an approval, rejection or revocation sent to
the coordinator, a witness co-signature) carries ``issued_at_ms``, and its receivers refuse a
replay: the agent remembers each command's signature, the coordinator takes a party's actions on a
query only in increasing ``issued_at_ms``. Ed25519 signatures are deterministic, so two messages with
the same fields issued in the same millisecond are the same bytes, and the second is rightly refused
as a replay. ``int(time.time() * 1000)`` repeats whenever two messages are issued within one
millisecond (or the wall clock steps back), so an owner's messages take their stamp from one
:class:`MillisecondIssuer`, which hands out the current millisecond or, when that is not later than
the last one it issued, the next one after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class MillisecondIssuer:
    """Issues ``issued_at_ms`` stamps, strictly increasing, never more than needed ahead of the clock.

    Thread-safe. ``clock`` returns seconds since the epoch (``time.time`` unless a test injects one)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last_ms = 0
        self._lock = threading.Lock()

    def issue(self) -> int:
        """The next stamp: the clock's millisecond, or one past the last stamp when that is not later."""
        with self._lock:
            self._last_ms = max(int(self._clock() * 1000), self._last_ms + 1)
            return self._last_ms
