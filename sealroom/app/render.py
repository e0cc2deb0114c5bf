"""How results look to a program (one JSON document) and how a query's progress looks to a person
(progress bars); a result's own text report is :func:`sealroom.app.result.render_result`.

Progress is drawn on stderr, and only when stderr is a terminal; a program reading ``--json`` output
gets one JSON document on stdout and no progress at all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sealroom.app.cells import jsonable
from sealroom.app.result import Result


def result_document(result: Result, *, title: str | None = None, sql: str | None = None) -> dict[str, Any]:
    """The JSON shape of one query's outcome (the contract of ``--json``)."""
    doc: dict[str, Any] = {}
    if title:
        doc["title"] = title
    if sql:
        doc["sql"] = sql
    doc.update(
        {
            "query_id": result.query_id,
            "status": result.status,
            "columns": result.columns,
            "rows": jsonable(result.rows()),
            "suppressed": jsonable(result.suppressed),
            "stages": result.stages(),
            "simulated": result.simulated,
        }
    )
    ci95 = result.ci95
    if ci95 or result.privacy is not None:  # dp: each noisy cell's 95 % half-width, and what the release cost
        doc["ci95"] = ci95
        doc["privacy"] = result.privacy
    if result.error is not None:
        doc["reason"] = result.error.to_dict()
    if result.receipt:
        res = result.receipt["result"]
        doc["inputs"] = res["inputs"]
        doc["min_group_size"] = res.get("min_group_size")
        if res.get("kind") == "sealroom.mpc_release":  # released by MPC: the players instead of one enclave
            doc["mpc"] = {"players": res["players"], "trust_assumption": res["trust_assumption"]}
            if "feed" in res:  # hybrid: the enclave that computed the streamed inputs' partials is a player
                doc["attestation"] = res["feed"]["attestation"]
        else:
            doc["attestation"] = res["attestation"]
            doc["rules"] = res.get("rules", {})
    return doc


# -- progress -------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)], "?")


def printable(value: object) -> str:
    """``value`` as text with control characters replaced: what the coordinator sends (states,
    names) is drawn on the analyst's terminal, and an escape sequence in it must not drive the terminal."""
    return str(value).translate(_CONTROL)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def progress_lines(status: dict[str, Any], *, width: int = 24) -> list[str]:
    """A query's progress as lines of text: its state, then, while the parties stream, one bar per
    party with what it has sent: sealed bytes and frames, and rows where its owner shares row counts
    (the bar fills against the owner's shared row count; without one it only moves). Counts only,
    never a value from the data. Text from the coordinator is drawn with control characters
    replaced, and malformed entries are skipped."""
    head = f"{printable(status['query_id'])}: {printable(status['status'])}"
    if status.get("progress") and status["progress"] != status["status"]:
        head += f" - {printable(status['progress'])}"
    lines = [head]
    raw = status.get("parties")
    parties: dict[str, dict[str, Any]] = (
        {printable(k): v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}
    )
    name_width = max((len(p) for p in parties), default=0)
    for party in sorted(parties):
        e = parties[party]
        rows = _count(e.get("rows")) if e.get("rows") is not None else None
        total, frames = _count(e.get("rows_total")), _count(e.get("frames"))
        if e.get("done"):
            fraction: float | None = 1.0
        elif rows is not None and total:
            fraction = min(1.0, rows / total)
        else:
            fraction = None
        if fraction is None:  # no total to fill against: a block that moves with every frame sent
            pos = (frames * 3) % max(1, width - 2)
            bar = " " * pos + "===" + " " * (width - 3 - pos)
            pct = "    "
        else:
            filled = int(round(fraction * width))
            bar = "#" * filled + "-" * (width - filled)
            pct = f"{fraction:4.0%}"
        parts = [f"  {party:<{name_width}} [{bar}] {pct}"]
        if rows is not None:
            parts.append(f"{rows:,}" + (f"/{total:,}" if total else "") + " rows")
        parts.append(f"{human_bytes(_count(e.get('bytes')))} in {frames:,} frames")
        parts.append("sent" if e.get("done") else "sending")
        lines.append("  ".join(parts))
    return lines


class ProgressDisplay:
    """The ``on_progress`` callback of :meth:`sealroom.app.client.QueryHandle.wait` for a terminal.

    On a TTY it redraws the query's state and one progress bar per streaming party in place; on
    anything else it writes one line per change of state or step (not per byte), prefixed with
    ``prefix``. Call :meth:`close` when the wait is over.
    """

    def __init__(self, stream: TextIO | None = None, *, prefix: str = "", tty: bool | None = None, width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.prefix = prefix
        self.width = width
        self._drawn = 0
        self._last: tuple[str, str] | None = None

    def __call__(self, status: dict[str, Any]) -> None:
        if self.tty:
            self._draw(progress_lines(status, width=self.width))
            return
        key = (str(status["status"]), str(status.get("progress", "")))
        if key != self._last:
            self._last = key
            self.stream.write(
                f"{self.prefix}{printable(status['query_id'])}: {printable(key[0])} {printable(key[1])}\n"
            )
            self.stream.flush()

    def _draw(self, lines: Sequence[str]) -> None:
        out = f"\x1b[{self._drawn}F" if self._drawn else ""  # back to the first line drawn last time
        out += "".join(f"{self.prefix}{line}\x1b[K\n" for line in lines)
        if len(lines) < self._drawn:  # clear what the previous drawing left below
            out += "\x1b[K\n" * (self._drawn - len(lines)) + f"\x1b[{self._drawn - len(lines)}F"
        self._drawn = len(lines)
        self.stream.write(out)
        self.stream.flush()

    def close(self) -> None:
        self._drawn = 0

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
