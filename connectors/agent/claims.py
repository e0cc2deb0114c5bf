"""What an owner's data already went to, per approved plan: each use once, across restarts.

A query's one ``query_submitted`` log entry, and the approvals that sign its position, make one
release. So the agent claims each use of its data for a plan (``"tee"``: its inputs sealed to an
enclave job; ``"mpc:<stage>:<index>"``: its player of an MPC stage) before the data moves, and a
second enclave job or MPC run for the same plan (a coordinator replaying a released query) gets
nothing. The claims are appended to a file in the agent's state directory and flushed to disk
before the data moves, so an agent's restart forgets none of them (at most the newest ``limit``
plans are kept; evicting one takes that many newer plans, each with its own log entry).

The file holds plan hashes and use names only, one JSON object a line; a line torn by a crash
(the last one) is ignored: its use had not begun, since the claim returns only once it is durable.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from connectors.witness import write_atomically

CLAIMS_FILE = "claims.jsonl"
MAX_CLAIMED = 20_000


class ClaimLog:
    def __init__(self, path: Path | None = None, *, limit: int = MAX_CLAIMED) -> None:
        """``path``: the file that keeps the claims (None: memory only, for tools and tests)."""
        self.path = path
        self.limit = limit
        self._claimed: OrderedDict[str, set[str]] = OrderedDict()
        self._lines = 0
        self._torn = False  # the file ends in a torn line: the next claim starts a new one
        self._lock = threading.Lock()
        if path is not None and path.exists():
            text = path.read_text()
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    doc = json.loads(line)
                    self._remember(str(doc["plan_hash"]), str(doc["use"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash: its use never began
                self._lines += 1

    def _remember(self, plan_hash: str, use: str) -> None:
        self._claimed.setdefault(plan_hash, set()).add(use)
        self._claimed.move_to_end(plan_hash)
        while len(self._claimed) > self.limit:
            self._claimed.popitem(last=False)

    def claim(self, plan_hash: str, use: str) -> bool:
        """Claim ``use`` of ``plan_hash``; False if it was claimed before (now or before a restart).
        Returns once the claim is on disk."""
        with self._lock:
            if use in self._claimed.get(plan_hash, ()):
                return False
            self._remember(plan_hash, use)
            if self.path is not None:
                self._append(json.dumps({"plan_hash": plan_hash, "use": use}, sort_keys=True))
            return True

    def _append(self, line: str) -> None:
        assert self.path is not None
        if self._lines >= 2 * self.limit:  # compact: keep only what is remembered
            lines = [
                json.dumps({"plan_hash": h, "use": u}, sort_keys=True)
                for h, uses in self._claimed.items()
                for u in sorted(uses)
            ]
            write_atomically(self.path, "".join(f"{x}\n" for x in lines))
            self._lines, self._torn = len(lines), False
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, ("\n" if self._torn else "").encode() + (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._torn = False
        self._lines += 1
