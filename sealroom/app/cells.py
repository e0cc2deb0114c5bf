"""How values look: JSON-safe values, one cell as a person reads it, and tables of cells (aligned
text for a terminal, HTML for a notebook). The lowest piece of the application's display code: the
result record and the renderers use it, it uses nothing of theirs.
"""

from __future__ import annotations

import html
import math
from decimal import Decimal
from typing import Any


def jsonable(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def cell_text(v: Any) -> str:
    """One cell as a person reads it: thousands separators, 4 decimals below 1,000, ``·`` for null."""
    v = jsonable(v)
    if v is None:
        return "·"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[cell_text(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(jsonable(r[i]), int | float) or r[i] is None for r in rows) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(x.rstrip() for x in out)


def html_table(columns: list[str], rows: list[list[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell_text(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
