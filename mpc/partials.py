"""A party's local partial aggregates over the public group domain, computed by DuckDB on its own rows.

For every group key of the stage's domain, in order, the party computes what its layout needs:
row count, non-null count, sum and sum of squares of the clamped fixed-point measure, minimum and
maximum, and distinct privacy units. Groups the party does not hold get zeros (and neutral extrema:
the declared bound), so the vectors it secret-shares have the same length and form whatever rows it
holds: nothing reveals which groups it has. Rows whose key is outside the domain are left out (as
if filtered).

In a differentially private stage (``spec.dp``, see :mod:`sealroom.planning.mpc_privacy`), the party
first bounds its rows' contributions per privacy unit (at most ``max_rows`` rows per (unit, group),
at most ``max_groups`` groups per unit, chosen at random), then adds its Pólya noise share to each
noised vector (:func:`noise_share`) before anything leaves it.

DuckDB runs as in the enclave and the party agent's filter (no file or network access, no
extensions, locked settings). A DuckDB failure is reported by its kind only; its message could
quote a value.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from sealroom.duck import locked_connection
from sealroom.errors import ResourceExhaustedError, SourceError
from sealroom.planning.mpc_spec import GroupColumn, StageSpec

_VIEW = "__sealroom_mpc_rows"


def _connection() -> duckdb.DuckDBPyConnection:
    return locked_connection()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Partials:
    """One input-holding player's vectors over the domain (Python ints, fixed-point encoded).

    ``cap``: the capped count compared with the minimum group size (see
    :class:`sealroom.planning.mpc_spec.Layout`);
    ``values``: the exact vectors by layout name (``rows``, ``n:c``, ``s:c``, ``q:c``);
    ``extrema``: ``min:c`` / ``max:c`` vectors.
    """

    cap: list[int]
    values: dict[str, list[int]] = field(default_factory=dict)
    extrema: dict[str, list[int]] = field(default_factory=dict)

    def to_input(self, spec: StageSpec) -> dict[str, Any]:
        lay = spec.layout
        g = len(spec.domain)
        if len(self.cap) != g or set(self.values) != set(lay.rows) or set(self.extrema) != set(lay.extrema):
            raise ValueError("partials do not match the stage's layout")
        if any(len(v) != g for v in (*self.values.values(), *self.extrema.values())):
            raise ValueError("partials do not cover the group domain")
        return {"cap": self.cap, "values": self.values, "extrema": self.extrema}


def _group_expr(g: GroupColumn) -> str:
    col = _q(g.name)
    if g.bins is None:
        return col
    cases = " ".join(
        f"WHEN {col} >= {float(lo)!r} AND {col} < {float(hi)!r} THEN '{label}'"
        for (lo, hi), label in zip(zip(g.bins, g.bins[1:], strict=False), g.labels(), strict=True)
    )
    return f"CASE {cases} ELSE NULL END"


def _reader(rows: Any) -> pa.RecordBatchReader | pa.Table | None:
    if isinstance(rows, pa.Table | pa.RecordBatchReader):
        return rows
    if hasattr(rows, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(rows)
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return None

    def chain(first: pa.RecordBatch, rest: Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
        yield first
        yield from rest

    return pa.RecordBatchReader.from_batches(first.schema, chain(first, it))


def local_partials(rows: Any, spec: StageSpec, *, party: str) -> Partials:
    """This party's :class:`Partials` for ``spec`` from ``rows`` (a pyarrow Table, a
    RecordBatchReader, anything with ``__arrow_c_stream__``, or an iterable of record batches).

    Raises SourceError (a column is missing, a non-nullable measure holds NULLs, DuckDB failed) or
    ResourceExhaustedError (a group holds more rows than the stage's declared ``max_rows``, so the
    bit lengths chosen from it could overflow). Errors name the party and the column, never a value.
    """
    totals = _Totals.empty(spec)
    reader = _reader(rows)
    if reader is not None:
        _check_columns(set(reader.schema.names), spec, party)
        sql, outputs = _partials_sql(spec)
        for row in _fetch(reader, sql, party):
            totals.add(spec, row, outputs, party)
        totals.check_nulls(spec, party)
    if spec.dp is not None:
        rng = np.random.Generator(np.random.Philox(secrets.randbits(128)))
        for vector, scale in spec.dp.scales:
            share = noise_share(scale, spec.dp.share_shape, len(spec.domain), rng)
            totals.values[vector] = [int(v) + int(n) for v, n in zip(totals.values[vector], share, strict=True)]
    return _finish(spec, totals.units if spec.threshold_on == "units" else totals.counts, totals.values, totals.extrema)


def noise_share(scale: float, shape: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """One holder's Pólya noise share for ``size`` cells: NB(shape, p) - NB(shape, p) with
    p = 1 - e^{-1/scale} (integers). ``1 / shape`` such shares add up to one discrete Laplace of
    ``scale``: P(k) proportional to e^{-|k|/scale}."""
    p = -math.expm1(-1.0 / scale)
    return rng.negative_binomial(shape, p, size) - rng.negative_binomial(shape, p, size)


def _measure_columns(spec: StageSpec) -> list[str]:
    """The measure columns the stage's layout needs vectors of, in order."""
    lay = spec.layout
    return sorted({r.split(":", 1)[1] for r in (*lay.rows, *lay.extrema) if ":" in r})


def _check_columns(names: set[str], spec: StageSpec, party: str) -> None:
    needed = [c.name for c in spec.group_by] + _measure_columns(spec)
    if spec.threshold_on == "units":
        assert spec.unit_column is not None
        needed.append(spec.unit_column)
    for col in needed:
        if col not in names:
            raise SourceError(
                f"{party}'s rows have no column {col}, which the MPC stage needs",
                details={"party": party, "column": col},
            )


def _partials_sql(spec: StageSpec) -> tuple[str, list[str]]:
    """The one GROUP BY query over the party's rows, and the names of its columns after the group key."""
    # A dp stage's bounded rows carry their group keys (__k<i>), computed once.
    selects = [
        f"{_q('__k' + str(i)) if spec.dp is not None else _group_expr(c)} AS {_q('g' + str(i))}"
        for i, c in enumerate(spec.group_by)
    ]
    selects.append('COUNT(*) AS "rows"')
    outputs = ["rows"]
    for c in _measure_columns(spec):
        ms = spec.measure(c)
        # Clamped to the declared bounds first (as the enclave clamps), then fixed point, then to the
        # bounds in fixed point rounded inward (a no-op when the decimals represent the bounds, as the
        # planner chooses them). LEAST/GREATEST skip NULLs: keep NULL as NULL.
        value = f"LEAST(GREATEST(CAST({_q(c)} AS DOUBLE), {float(ms.min)!r}), {float(ms.max)!r})"
        fixed = f"CAST(round({value} * {ms.scale}) AS HUGEINT)"
        clamped = f"LEAST(GREATEST({fixed}, {ms.lo}), {ms.hi})"
        xq = f"(CASE WHEN {_q(c)} IS NULL THEN NULL ELSE {clamped} END)"
        selects += [
            f"COUNT({_q(c)}) AS {_q('n:' + c)}",
            f"COALESCE(SUM({xq}), 0) AS {_q('s:' + c)}",
            f"COALESCE(SUM({xq} * {xq}), 0) AS {_q('q:' + c)}",
            f"COALESCE(MIN({xq}), {ms.hi}) AS {_q('min:' + c)}",
            f"COALESCE(MAX({xq}), {ms.lo}) AS {_q('max:' + c)}",
        ]
        outputs += [f"{k}:{c}" for k in ("n", "s", "q", "min", "max")]
    if spec.threshold_on == "units":
        assert spec.unit_column is not None
        selects.append(f"COUNT(DISTINCT {_q(spec.unit_column)}) AS units")
        outputs.append("units")
    group_cols = ", ".join(_q("g" + str(i)) for i in range(len(spec.group_by)))
    source = _bounded_rows(spec) if spec.dp is not None else _VIEW
    sql = f"SELECT {', '.join(selects)} FROM {source} GROUP BY {group_cols}"  # noqa: S608 - names quoted
    return sql, outputs


def _bounded_rows(spec: StageSpec) -> str:
    """A dp stage's rows bounded per privacy unit: rows outside the bins (NULL group) dropped, at
    most ``max_rows`` rows per (unit, group) and ``max_groups`` groups per unit, both chosen at
    random. (Rows whose key is outside a ``values`` domain count towards the unit's groups, which
    only bounds the unit more.)"""
    assert spec.dp is not None and spec.unit_column is not None
    unit = _q(spec.unit_column)
    keys = [_q("__k" + str(i)) for i in range(len(spec.group_by))]
    keyed = ", ".join(f"{_group_expr(c)} AS {k}" for c, k in zip(spec.group_by, keys, strict=True))
    known = " AND ".join(f"{k} IS NOT NULL" for k in keys)
    part = ", ".join(keys)
    return (
        f"(WITH __keyed AS (SELECT *, {keyed}, random() AS __rr FROM {_VIEW}), "  # noqa: S608 - names quoted, bounds integers
        f"__rows AS (SELECT *, row_number() OVER (PARTITION BY {unit}, {part} ORDER BY __rr) AS __rn "
        f"FROM __keyed WHERE {known}), "
        f"__kept AS (SELECT * FROM __rows WHERE __rn <= {int(spec.dp.max_rows)}), "
        f"__groups AS (SELECT *, random() AS __r FROM (SELECT DISTINCT {unit} AS __u, {part} FROM __kept)), "
        f"__ranked AS (SELECT __u, {part}, row_number() OVER (PARTITION BY __u ORDER BY __r) AS __gn FROM __groups) "
        f"SELECT __kept.* FROM __kept JOIN __ranked ON __kept.{unit} IS NOT DISTINCT FROM __ranked.__u AND "
        + " AND ".join(f"__kept.{k} = __ranked.{k}" for k in keys)
        + f" WHERE __gn <= {int(spec.dp.max_groups)})"
    )


def _fetch(reader: pa.RecordBatchReader | pa.Table, sql: str, party: str) -> list[tuple[Any, ...]]:
    """``sql`` over the party's rows in a locked DuckDB connection; a failure is reported by its kind only."""
    con = _connection()
    try:
        con.register(_VIEW, reader)
        try:
            return con.sql(sql).fetchall()
        except duckdb.Error as exc:
            raise SourceError(
                f"the local MPC partials of {party} failed in DuckDB ({type(exc).__name__}); check the measure "
                "columns' types and values against the stage's declared bounds",
                details={"party": party, "error": type(exc).__name__},
            ) from None
        finally:
            con.unregister(_VIEW)
    finally:
        con.close()


@dataclass
class _Totals:
    """The party's vectors over the domain while the grouped rows are read (zeros and neutral
    extrema for the groups it does not hold), and the NULLs seen per measure."""

    index: dict[tuple[Any, ...], int]
    counts: list[int]
    units: list[int]
    values: dict[str, list[int]]
    extrema: dict[str, list[int]]
    nulls: dict[str, int]

    @classmethod
    def empty(cls, spec: StageSpec) -> _Totals:
        lay = spec.layout
        g = len(spec.domain)
        return cls(
            index={tuple(k): i for i, k in enumerate(spec.domain)},
            counts=[0] * g,
            units=[0] * g,
            values={r: [0] * g for r in lay.rows},
            extrema={e: [_neutral(spec, e)] * g for e in lay.extrema},
            nulls={c: 0 for c in _measure_columns(spec)},
        )

    def add(self, spec: StageSpec, row: tuple[Any, ...], outputs: list[str], party: str) -> None:
        """One grouped row: its key's place in the domain (a key outside it is left out, as if
        filtered), after the ``max_rows`` check."""
        ng = len(spec.group_by)
        i = self.index.get(tuple(row[:ng]))
        if i is None:
            return
        got = dict(zip(outputs, row[ng:], strict=True))
        rows_n = int(got["rows"])
        if rows_n > spec.max_rows:
            raise ResourceExhaustedError(
                f"{party} holds more rows in one group than the MPC stage's max_rows ({spec.max_rows}) allows, "
                "so its sums could overflow the chosen bit lengths: raise max_rows in the stage",
                details={"party": party, "rule": "max_rows"},
            )
        self.counts[i] = rows_n
        if "units" in got:
            self.units[i] = int(got["units"])
        if "rows" in self.values:
            self.values["rows"][i] = rows_n
        for c in self.nulls:
            self.nulls[c] += rows_n - int(got[f"n:{c}"])
            for kind in ("n", "s", "q"):
                if f"{kind}:{c}" in self.values:
                    self.values[f"{kind}:{c}"][i] = int(got[f"{kind}:{c}"])
            for kind in ("min", "max"):
                if f"{kind}:{c}" in self.extrema and got[f"n:{c}"]:  # no value here: keep the neutral fill
                    self.extrema[f"{kind}:{c}"][i] = int(got[f"{kind}:{c}"])

    def check_nulls(self, spec: StageSpec, party: str) -> None:
        for c, n in self.nulls.items():
            if n and not spec.measure(c).nullable:
                raise SourceError(
                    f"{party}'s measure {c} holds NULLs, but the MPC stage declares it not nullable",
                    details={"party": party, "column": c},
                )


def _neutral(spec: StageSpec, name: str) -> int:
    """What a player without a value contributes to MIN (the upper bound) or MAX (the lower bound)."""
    kind, column = name.split(":", 1)
    ms = spec.measure(column)
    return ms.hi if kind == "min" else ms.lo


def _finish(
    spec: StageSpec, counts: list[int], values: dict[str, list[int]], extrema: dict[str, list[int]]
) -> Partials:
    lay = spec.layout
    k = spec.min_group_size
    if lay.cap == 1:
        cap = [int(c >= k) for c in counts]
    else:
        cap = [min(c, lay.cap) for c in counts]
    return Partials(cap=cap, values=values, extrema=extrema)
