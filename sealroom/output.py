"""How results look to a person (aligned tables) and to a program (one JSON document)."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from sealroom.client import Result


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


def _cell(v: Any) -> str:
    v = jsonable(v)
    if v is None:
        return "·"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(jsonable(r[i]), int | float) or r[i] is None for r in rows) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(x.rstrip() for x in out)


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
    if result.error is not None:
        doc["reason"] = result.error.to_dict()
    if result.receipt:
        res = result.receipt["result"]
        doc["inputs"] = res["inputs"]
        doc["attestation"] = res["attestation"]
        doc["min_group_size"] = res["min_group_size"]
        doc["rules"] = res.get("rules", {})
    return doc


def render_result(result: Result, *, title: str | None = None, sql: str | None = None) -> str:
    lines = []
    if title:
        lines += [title, "=" * len(title)]
    if sql:
        lines += ["", *("  " + x for x in sql.strip().splitlines()), ""]
    if result.status != "released":
        reason = result.error.message if result.error else "no reason recorded"
        lines.append(f"{result.status.upper()}: {reason}")
        if result.error and result.error.details:
            lines.append("  details: " + json.dumps(jsonable(result.error.details), sort_keys=True))
        return "\n".join(lines)
    sim = "  [SIMULATED attestation: no TEE; for development only]" if result.simulated else ""
    lines.append(f"released {len(result.rows())} cells (query {result.query_id}){sim}")
    lines.append("")
    lines.append(format_table(result.columns, result.rows()))
    if result.suppressed:
        lines.append("")
        lines.append(f"suppressed {len(result.suppressed)} cells (no values released):")
        for s in result.suppressed:
            keys = sorted(
                s["group"], key=lambda k: result.columns.index(k) if k in result.columns else len(result.columns)
            )
            group = ", ".join(f"{k}={_cell(s['group'][k])}" for k in keys) or "(whole result)"
            lines.append(f"  {group}: {s['reason']}")
    if result.receipt:
        res = result.receipt["result"]
        lines.append("")
        lines.append("what went where:")
        for i in res["inputs"]:
            lines.append(
                f"  {i['party']}.{i['dataset']} -> enclave: columns {', '.join(i['columns'])}; "
                f"{i['frames']} sealed frames, {i['bytes']:,} bytes"
            )
        att = res["attestation"]
        lines.append(
            f"  enclave measurement {att['measurement'][:16]}... ({att['format']}); "
            f"approvals: {', '.join(a['party'] for a in res['approvals'])}"
        )
        lines.append("  coordinator saw: the plan, approvals, ciphertext sizes, and the released cells above")
    return "\n".join(lines)
