"""A query's outcome as the analyst holds it: :class:`Result`, the released table, the suppressed
cells, and how it was produced; and how it reads (its text report, its notebook HTML).

A released cell is an aggregate that passed every involved owner's disclosure rules; a cell that did
not is *suppressed*: the result says which group it was and which rule suppressed it, never its value.

Under differential privacy (datasets in ``dp`` mode) every aggregate is noised: the enclave's signed
result carries, per output column, the half-width of each released cell's 95 % interval (``ci95``:
value ± half-width; about 95 % of such intervals hold the true value) and what the release cost
(``privacy``: epsilon, delta, mechanism per measurement, the charges). The DataFrame then has a
``<column>_ci95`` column after each noisy column, and the text report shows ``value ± half-width``.
A result without them (threshold mode) reads as before.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sealroom.app.cells import cell_text, format_table, html_table, jsonable
from sealroom.errors import SealroomError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Result", "render_result"]

# The column that marks suppressed cells in ``Result.to_pandas(with_suppressed=True)``.
SUPPRESSED_COLUMN = "suppressed"
# A notebook shows at most this many cells of a result (to_pandas() has them all).
HTML_MAX_ROWS = 50


@dataclass(frozen=True)
class Result:
    """A query's outcome: the released table, the suppressed cells, and how it was produced.

    ``status`` is ``released``, ``refused`` or ``failed`` (or a state still in progress when fetched
    early). ``table`` holds the released cells (``None`` unless released); ``suppressed`` lists the
    cells withheld by a disclosure rule, each ``{"group": {column: key}, "rule": ..., "reason": ...}``
    (``"group": None`` when a key has no public domain: the cell is counted, its key not shown)
    and never a value; ``receipt`` is the enclave's signed record of what ran on what; ``error`` the
    refusal or failure.
    """

    query_id: str
    status: str
    table: pa.Table | None
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    simulated: bool = False
    receipt: dict[str, Any] | None = None
    error: SealroomError | None = None

    @property
    def ci95(self) -> dict[str, list[float]]:
        """Under dp: per noisy output column, the half-width of each released cell's 95 % interval, in
        the released rows' order (empty for a result without noise)."""
        doc = self._signed_result().get("ci95")
        if not isinstance(doc, dict):
            return {}
        n = self.table.num_rows if self.table is not None else 0
        return {
            c: [float(x) for x in v]
            for c, v in doc.items()
            if c in self.columns and isinstance(v, list) and len(v) == n
        }

    @property
    def privacy(self) -> dict[str, Any] | None:
        """Under dp: what the release cost and how it was noised (``epsilon``, ``delta``, the
        ``mechanisms`` per measurement, ``charges`` per dataset...); None for a threshold release."""
        doc = self._signed_result().get("privacy")
        return doc if isinstance(doc, dict) else None

    def _signed_result(self) -> dict[str, Any]:
        res = (self.receipt or {}).get("result")
        return res if isinstance(res, dict) else {}

    @property
    def columns(self) -> list[str]:
        """The released table's column names (empty unless released)."""
        return list(self.table.column_names) if self.table is not None else []

    def rows(self) -> list[list[Any]]:
        """The released cells as Python lists, one per row (empty unless released)."""
        if self.table is None:
            return []
        cols = [c.to_pylist() for c in self.table.columns]
        return [list(r) for r in zip(*cols, strict=True)] if cols else []

    def raise_for_status(self) -> None:
        """Raise the refusal or failure (with its details) unless the query was released."""
        if self.status != "released":
            raise self.error or SealroomError(f"query {self.query_id} is {self.status}")

    def to_arrow(self) -> pa.Table:
        """The released cells as an Arrow table; raises the refusal or failure otherwise."""
        self.raise_for_status()
        assert self.table is not None
        return self.table

    def to_pandas(self, *, with_suppressed: bool = False) -> pd.DataFrame:
        """The released cells as a DataFrame; raises the refusal or failure otherwise.

        With ``with_suppressed=True`` each suppressed cell is appended as a row holding its group
        keys and missing values (``<NA>``) everywhere else, and a ``suppressed`` column names the
        rule that withheld it (``<NA>`` for released cells). Integer columns then use pandas'
        nullable integer types so that counts stay integers. HAVING, ORDER BY and LIMIT applied to
        the released cells only, so suppressed rows come last.

        Under dp each noisy column ``c`` is followed by ``c_ci95``: the half-width of that cell's
        95 % interval (``c ± c_ci95``).
        """
        table = _with_ci95(self.to_arrow(), self.ci95)
        if not with_suppressed:
            return table.to_pandas()
        import pandas as pd  # lazy: pandas is heavy, and only the DataFrame views need it (the CLI never does)

        flag = SUPPRESSED_COLUMN if SUPPRESSED_COLUMN not in table.column_names else f"_{SUPPRESSED_COLUMN}"
        schema = pa.schema([f.with_nullable(True) for f in table.schema])
        extra = pa.table([_keys(self.suppressed, f) for f in schema], schema=schema)
        df = pa.concat_tables([table.cast(schema), extra]).to_pandas(types_mapper=_nullable_ints)
        df[flag] = pd.array([None] * table.num_rows + [s.get("rule") for s in self.suppressed], dtype="string")
        return df

    def suppressed_frame(self) -> pd.DataFrame:
        """One row per suppressed cell: its group keys (in the result's column order), the ``rule``
        that suppressed it (``min_group_size``, ``dominance``) and the ``reason`` in words. Never a
        value."""
        import pandas as pd  # lazy: as in to_pandas

        keys: list[str] = []
        for s in self.suppressed:
            keys += [k for k in s["group"] or {} if k not in keys]
        order = {c: i for i, c in enumerate(self.columns)}
        keys.sort(key=lambda k: order.get(k, len(order)))
        return pd.DataFrame(
            [
                {**{k: (s["group"] or {}).get(k) for k in keys}, "rule": s.get("rule"), "reason": s["reason"]}
                for s in self.suppressed
            ],
            columns=[*keys, "rule", "reason"],
        )

    def stages(self) -> list[dict[str, Any]]:
        """The plan's stages: id, kind (``tee`` or ``mpc``) and the datasets each reads; a TEE stage
        feeding an MPC stage names it (``feeds``); an MPC stage lists its ``players``."""
        if not self.plan:
            return []
        return [
            {
                "id": s["id"],
                "kind": s["kind"],
                "inputs": [f"{i['party']}.{i['dataset']}" for i in s["inputs"]],
                **({"feeds": s["feeds"]} if "feeds" in s else {}),
                **({"players": s["mpc"]["players"]} if "mpc" in s else {}),
            }
            for s in self.plan["stages"]
        ]

    def inputs(self) -> list[dict[str, Any]]:
        """What went where, from the signed receipt: per dataset the columns sent (sealed) to the
        enclave, and the sealed frames and bytes."""
        if not self.receipt:
            return []
        # An MPC release names each dataset's player: an owner's own player (its rows never left, only
        # shares did), or in a hybrid plan the enclave's, which the rows were streamed (sealed) to.
        res = self.receipt["result"]
        streamed = {(i["party"], i["dataset"]): i for i in (res.get("feed") or res).get("inputs", []) if "frames" in i}
        out = []
        for i in res["inputs"]:
            entry: dict[str, Any] = {"dataset": f"{i['party']}.{i['dataset']}", "columns": list(i["columns"])}
            sent = streamed.get((i["party"], i["dataset"]))
            if sent is not None:
                entry.update(frames=sent["frames"], bytes=sent["bytes"])
            if "player" in i:
                entry["mpc_player"] = i["player"]
            out.append(entry)
        return out

    # -- display -----------------------------------------------------------------------------

    def _headline(self) -> str:
        if self.status == "released":
            sim = " [SIMULATED attestation: no TEE]" if self.simulated else ""
            return (
                f"query {self.query_id} released {self.table.num_rows if self.table is not None else 0} cells, "
                f"{len(self.suppressed)} suppressed{sim}"
            )
        reason = f": {self.error.message}" if self.error is not None else ""
        return f"query {self.query_id} {self.status}{reason}"

    def __repr__(self) -> str:
        return f"<sealroom.Result {self._headline()}>"

    def __str__(self) -> str:
        return render_result(self)

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<p><b>{esc(self._headline())}</b></p>"]
        if self.status != "released":
            if self.error is not None and self.error.details:
                parts.append(html_table(["detail", "value"], [[k, v] for k, v in self.error.details.items()]))
            return "\n".join(parts)
        rows = noisy_rows(self)
        parts.append(html_table(self.columns, rows[:HTML_MAX_ROWS]))
        if self.privacy is not None:
            parts.append(f"<p>{esc(privacy_summary(self))}</p>")
        if len(rows) > HTML_MAX_ROWS:
            parts.append(f"<p>... and {len(rows) - HTML_MAX_ROWS:,} more cells (to_pandas() has them all)</p>")
        if self.suppressed:
            frame = self.suppressed_frame()
            parts.append(f"<p>{len(self.suppressed)} suppressed cells (no values released):</p>")
            parts.append(html_table(list(frame.columns), frame.astype(object).values.tolist()[:HTML_MAX_ROWS]))
        inputs = self.inputs()
        if inputs:
            sent = "".join(
                f"<li>{esc(i['dataset'])}: {esc(', '.join(i['columns']))} ("
                + "; ".join(
                    ([f"{i['frames']} sealed frames to the enclave"] if "frames" in i else [])
                    + ([f"held by MPC player {i['mpc_player']}"] if "mpc_player" in i else [])
                )
                + ")</li>"
                for i in inputs
            )
            parts.append(f"<details><summary>what went where</summary><ul>{sent}</ul></details>")
        return "\n".join(parts)


def ci95_column(column: str, names: list[str]) -> str:
    """The name of ``column``'s interval column: ``<column>_ci95`` (with a leading ``_`` while that
    name is taken)."""
    name = f"{column}_ci95"
    while name in names:
        name = "_" + name
    return name


def _with_ci95(table: pa.Table, ci95: dict[str, list[float]]) -> pa.Table:
    """``table`` with ``<column>_ci95`` after each column that has intervals."""
    for column in [c for c in table.column_names if c in ci95]:
        at = table.column_names.index(column) + 1
        table = table.add_column(at, ci95_column(column, table.column_names), pa.array(ci95[column], pa.float64()))
    return table


def noisy_cell(value: Any, half_width: float) -> str:
    """A noisy cell as a person reads it: ``value ± half-width`` (the half-width to 3 significant
    digits, whole numbers as they are)."""
    w = float(half_width)
    if abs(w) >= 1000 or w.is_integer():
        width = f"{w:,.0f}"
    else:
        width = f"{w:.3g}"
    return f"{cell_text(value)} ± {width}"


def noisy_rows(result: Result) -> list[list[Any]]:
    """The released rows for display: under dp each noisy cell as ``value ± half-width`` (text);
    a result without intervals: its rows unchanged."""
    rows = result.rows()
    ci95 = result.ci95
    if not ci95:
        return rows
    at = [(result.columns.index(c), widths) for c, widths in ci95.items()]
    out = [list(row) for row in rows]
    for i, widths in at:
        cells = [noisy_cell(row[i], widths[n]) for n, row in enumerate(rows)]
        width = max((len(c) for c in cells), default=0)
        for row, cell in zip(out, cells, strict=True):
            row[i] = cell.rjust(width)  # numbers read right-aligned, as the table aligns plain numbers
    return out


def privacy_summary(result: Result) -> str:
    """One line: what a dp release cost and what its intervals mean."""
    p = result.privacy or {}
    names = {"discrete_laplace": "discrete Laplace", "laplace": "Laplace"}
    kinds = [names[k] for m in p.get("mechanisms") or [] if isinstance(m, dict) and (k := m.get("mechanism")) in names]
    how = f" ({', '.join(dict.fromkeys(kinds))} noise)" if kinds else ""
    eps, delta = p.get("epsilon"), p.get("delta", 0.0)
    cost = (
        f": this release spent epsilon {eps:g} and delta {delta:g} of each dp dataset's budget"
        if isinstance(eps, int | float) and isinstance(delta, int | float)
        else ""
    )
    return f"differential privacy{how}{cost}; value ± half-width is a 95 % interval (noisy counts may be negative)"


def _keys(suppressed: list[dict[str, Any]], f: pa.Field) -> pa.Array:
    """A suppressed cells' column: its group key where the column is one, else nulls."""
    values = [(s["group"] or {}).get(f.name) for s in suppressed]
    if all(v is None for v in values):
        return pa.nulls(len(values), f.type)
    try:
        return pa.array(values, type=f.type)
    except (pa.ArrowException, TypeError, ValueError):
        try:  # keys travel as JSON: a date or decimal key comes back as text
            return pa.array([None if v is None else str(v) for v in values]).cast(f.type)
        except (pa.ArrowException, TypeError, ValueError):
            return pa.nulls(len(values), f.type)


def _nullable_ints(t: pa.DataType) -> Any:
    import pandas as pd  # lazy: as in Result.to_pandas

    if pa.types.is_integer(t):
        return pd.api.types.pandas_dtype(str(t).replace("int", "Int").replace("uInt", "UInt"))
    return None


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
    lines.append(format_table(result.columns, noisy_rows(result)))
    if result.privacy is not None:
        lines.append("")
        lines.append(privacy_summary(result))
    if result.suppressed:
        lines.append("")
        lines.append(f"suppressed {len(result.suppressed)} cells (no values released):")
        for s in result.suppressed:
            if s["group"] is None:
                lines.append(f"  (key not shown: no public domain): {s['reason']}")
                continue
            keys = sorted(
                s["group"], key=lambda k: result.columns.index(k) if k in result.columns else len(result.columns)
            )
            group = ", ".join(f"{k}={cell_text(s['group'][k])}" for k in keys) or "(whole result)"
            lines.append(f"  {group}: {s['reason']}")
    if result.receipt:
        res = result.receipt["result"]
        lines.append("")
        lines.append("what went where:")
        if res.get("kind") == "sealroom.mpc_release":
            lines += _mpc_where(res)
        else:
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


def _mpc_where(res: dict[str, Any]) -> list[str]:
    """What went where in an MPC release: each dataset's player, and for a hybrid plan what was
    streamed (sealed) to the enclave that joined the MPC as a player."""
    lines = []
    players = res["players"]
    feed = res.get("feed") or {}
    streamed = {(i["party"], i["dataset"]): i for i in feed.get("inputs", [])}
    for i in res["inputs"]:
        player = players[i["player"]]["name"] if i["player"] < len(players) else i["player"]
        sent = streamed.get((i["party"], i["dataset"]))
        if sent is not None:
            lines.append(
                f"  {i['party']}.{i['dataset']} -> enclave: columns {', '.join(i['columns'])}; "
                f"{sent['frames']} sealed frames, {sent['bytes']:,} bytes; the enclave holds its partials as MPC "
                f"player {i['player']} ({player})"
            )
        else:
            lines.append(
                f"  {i['party']}.{i['dataset']}: stayed with its owner; MPC player {i['player']} ({player}) computed "
                "its partials, only secret shares left"
            )
    helpers = [f"{n} ({p['name']})" for n, p in enumerate(players) if not p.get("holds_input", True)]
    if helpers:
        lines.append(f"  helper player {', '.join(helpers)}: held no input, computed on secret shares only")
    lines.append(f"  trust assumption: {res['trust_assumption']}")
    if feed:
        att = feed["attestation"]
        lines.append(f"  enclave measurement {att['measurement'][:16]}... ({att['format']})")
    return lines
