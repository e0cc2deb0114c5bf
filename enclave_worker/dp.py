"""Differential privacy inside the enclave: a dp stage bounded, aggregated and noised.

The mechanism (:class:`sealroom.planning.privacy.DpMechanism`) is derived from the plan alone by
every checker; this module only executes it, in one locked DuckDB connection (the inputs exposed
through the same clamping views as in the threshold engine, :mod:`enclave_worker.engine`):

1. the row relation: the residual query's FROM, JOIN and WHERE, selecting the group expressions,
   each dp input's privacy unit (a UNION ALL item tags each branch: its rows are bounded per
   (branch, unit)), and each measurement's argument and condition. Every expression is made total
   (``TRY``): no hidden value can make the stage fail;
2. contribution bounding, for every dp input in turn: at most ``max_rows`` rows per (unit, group),
   then at most ``max_groups`` groups per unit, both chosen in random order (DuckDB ``random()``,
   ordered inside window functions; a unit already within both bounds keeps its rows without a
   sort). A join that repeats one unit's rows cannot multiply its weight: the bounds apply to the
   joined rows;
3. per group, each measurement (COUNT(*), COUNT(arg), COUNT(DISTINCT unit), SUM(arg), with its
   FILTER condition) over the bounded rows;
4. the groups: a public domain releases exactly its keys (empty groups count 0, rows outside it are
   dropped); otherwise OpenDP's ``make_laplace_threshold`` over the per-group count of bounded rows
   keeps the groups it releases, and the others are never listed;
5. noise: one OpenDP measurement per mechanism measurement, over the vector of released groups
   (discrete Laplace for counts, OpenDP's floating-point-safe Laplace for sums), each checked with
   its own privacy map against the epsilon the mechanism gives it;
6. outputs in the query's order: group keys, noisy COUNTs (integers, possibly negative: the noise
   is unbiased), noisy SUMs, and AVG = noisy SUM / max(noisy COUNT, 1), clamped to the measure's
   range. Each aggregate output has a 95 % half-width per released row: the measurement's for a
   COUNT or SUM; for an AVG the delta-method interval (ci_sum + |avg|·ci_count) / max(noisy count, 1):
   the first-order error of the ratio (e_sum - avg·e_count) / count of two independent noise terms,
   each bounded by its own half-width (conservative: the two are added, not combined in quadrature).
   It describes the noise only: on a group whose noisy count is small, the clamp to [lo, hi] biases
   the average toward the range;
7. HAVING, ORDER BY and LIMIT on the noisy released table only (post-processing).

Errors are reported by kind only (DuckDB's messages can quote values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from enclave_worker.engine import Clamps, OnCancel, StageConnection
from sealroom.errors import InvalidQueryError, JobFailedError
from sealroom.planning.cells import total
from sealroom.planning.privacy import DpMechanism, Measurement, Selection
from sealroom.planning.resolve import DIALECT, Branch, Resolved, Source, expanded_projections, resolve
from sealroom.planning.sql import InputSpec, order_sql, replace_table

__all__ = ["DpOutcome", "bounded_cells", "run_dp_stage"]

# Relative slack when comparing an OpenDP privacy map with the epsilon (or delta) it is given:
# the map rounds conservatively, the mechanism's scale is sensitivity / epsilon in floating point.
MAP_TOLERANCE = 1e-9
ROWS_COLUMN = "__sr_n"  # per group: bounded rows (partition selection counts them)
INDEX_COLUMN = "__sr_i"  # per group: its position (the domain's order, or the key order)


@dataclass(frozen=True)
class DpOutcome:
    released: pa.Table  # exactly the query's output columns
    ci95: dict[str, list[float]]  # aggregate output column -> half-width per released row
    privacy: dict[str, Any]  # the mechanism, as the result document states it


def _ident(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql(DIALECT)


def _g(i: int) -> str:
    return _ident(f"__sr_g{i}")


def _m(i: int) -> str:
    return _ident(f"__sr_m{i}")


# --------------------------------------------------------------------------------------------
# the stage's SQL


@dataclass(frozen=True)
class _Bound:
    """One bounding step: the partition columns of a unit, and the limits (SQL over the row relation)."""

    units: tuple[str, ...]
    max_rows: str
    max_groups: str


@dataclass(frozen=True)
class _Stage:
    rows_sql: str  # the row relation
    bounds: tuple[_Bound, ...]
    n_groups: int
    names: tuple[str, ...]  # output columns, in order
    group_of: Mapping[str, int]  # group output column -> GROUP BY index
    having: exp.Expression | None  # over the noisy table's columns
    resolved: Resolved


def _total(sql: str) -> str:
    """``sql`` made total as the threshold engine makes its expressions
    (:func:`sealroom.planning.cells.total`: TRY_CAST, and TRY around what could raise)."""
    try:
        node = sqlglot.parse_one(sql, read=DIALECT)
    except SqlglotError:
        raise InvalidQueryError("the privacy mechanism names an expression that does not parse") from None
    return _total_node(node).sql(DIALECT)


def _total_node(node: exp.Expr) -> exp.Expression:
    """A copy of ``node`` made total (a WHERE or ON condition too: a conjunct that would raise is NULL,
    so its row is not kept, and a column equality stays bare, so joins keep their plan)."""
    copied = node.copy()
    assert isinstance(copied, exp.Expression)
    return total(copied)


def _kept_projections(src: Source, branch: Branch) -> list[exp.Expression]:
    """The projections of a UNION ALL branch the outer query reads."""
    projections = expanded_projections(branch)
    return [p for p, name in zip(projections, src.columns, strict=True) if name in src.needed]


def _stage(residual_sql: str, inputs: Sequence[InputSpec], mechanism: DpMechanism) -> _Stage:
    """The row relation of the residual query (see the module docstring), and what the release needs."""
    by_name = {i.qualified: i for i in inputs}
    bounds_by = {b.dataset: b for b in mechanism.bounds}
    r = resolve(residual_sql, {i.qualified: list(i.columns) for i in inputs})
    groups = [g.sql(DIALECT) for g in r.groups]
    if tuple(groups) != tuple(mechanism.group_sql):
        raise InvalidQueryError("the stage's groups differ from its privacy mechanism; re-plan the query")
    outputs = {}
    group_of: dict[str, int] = {}
    for e, name in zip(r.tree.expressions, r.names, strict=True):
        body = e.this if isinstance(e, exp.Alias) else e
        outputs[body.sql(DIALECT)] = name
        if name in mechanism.group_columns:
            group_of[name] = groups.index(body.sql(DIALECT))
    having = _having(r, outputs, groups)
    items: list[str] = [f"{_total(g)} AS {_g(i)}" for i, g in enumerate(groups)]
    steps: list[_Bound] = []
    # A second resolution to rewrite (its sources point into its own tree); ``r`` stays as written.
    w = resolve(residual_sql, {i.qualified: list(i.columns) for i in inputs})
    tree = w.tree
    for n, src in enumerate(w.sources):
        alias = src.alias
        if src.kind == "table":
            qualified = src.branches[0].qualified
            spec, bound = by_name[qualified], bounds_by.get(qualified)
            if bound is None or not spec.privacy_unit:
                raise InvalidQueryError(f"the privacy mechanism has no contribution bound for {qualified}")
            replace_table(src.branches[0].table, spec.table, alias)
            items.append(
                f"{exp.column(spec.privacy_unit, table=alias, quoted=True).sql(DIALECT)} AS {_ident(f'__sr_u{n}')}"
            )
            steps.append(_Bound((_ident(f"__sr_u{n}"),), str(int(bound.max_rows)), str(int(bound.max_groups))))
            continue
        rows_case, groups_case = [], []
        for k, br in enumerate(src.branches):
            spec, bound = by_name[br.qualified], bounds_by.get(br.qualified)
            if bound is None or not spec.privacy_unit:
                raise InvalidQueryError(f"the privacy mechanism has no contribution bound for {br.qualified}")
            kept = _kept_projections(src, br)
            unit = exp.cast(exp.column(spec.privacy_unit, quoted=True), "VARCHAR")
            tag = exp.alias_(exp.Literal.number(k), "__sr_branch", quoted=True)
            assert br.select is not None
            projections = [
                exp.alias_(_total_node(p.this if isinstance(p, exp.Alias) else p), p.alias_or_name, quoted=True)
                for p in kept
            ]
            br.select.set("expressions", [*projections, exp.alias_(unit, "__sr_unit", quoted=True), tag])
            where = br.select.args.get("where")
            if where is not None:
                where.set("this", _total_node(where.this))
            replace_table(br.table, spec.table, br.table.alias_or_name)
            rows_case.append(f"WHEN {k} THEN {int(bound.max_rows)}")
            groups_case.append(f"WHEN {k} THEN {int(bound.max_groups)}")
        b, u = _ident(f"__sr_b{n}"), _ident(f"__sr_u{n}")
        items.append(f"{exp.column('__sr_branch', table=alias, quoted=True).sql(DIALECT)} AS {b}")
        items.append(f"{exp.column('__sr_unit', table=alias, quoted=True).sql(DIALECT)} AS {u}")
        steps.append(_Bound((b, u), f"(CASE {b} {' '.join(rows_case)} END)", f"(CASE {b} {' '.join(groups_case)} END)"))
    for i, m in enumerate(mechanism.measurements):
        if m.argument is not None:
            items.append(f"{_total(m.argument)} AS {_ident(f'__sr_a{i}')}")
        if m.condition is not None:
            items.append(f"COALESCE({_total(m.condition)}, FALSE) AS {_ident(f'__sr_c{i}')}")
    where = tree.args.get("where")
    if where is not None:
        where.set("this", _total_node(where.this))
    for join in tree.args.get("joins") or []:
        on = join.args.get("on")
        if on is not None:
            join.set("on", _total_node(on))
    for key in ("group", "having", "order", "limit", "distinct"):
        tree.set(key, None)
    tree.set("expressions", [sqlglot.parse_one(item, read=DIALECT) for item in items])
    return _Stage(tree.sql(DIALECT), tuple(steps), len(groups), tuple(r.names), group_of, having, r)


def _having(r: Resolved, outputs: Mapping[str, str], groups: Sequence[str]) -> exp.Expression | None:
    """HAVING over the noisy table: each aggregate (or grouped expression) it names replaced by the
    output column (or hidden group key) holding its released value."""
    having = r.tree.args.get("having")
    if having is None:
        return None

    def swap(node: exp.Expression) -> exp.Expression:
        sql = node.sql(DIALECT)
        if sql in outputs and not (isinstance(node, exp.Column) and not node.table):
            return exp.column(outputs[sql], quoted=True)
        if sql in groups:
            return exp.column(f"__sr_g{groups.index(sql)}", quoted=True)
        return node

    return having.this.copy().transform(swap)


def _measure_sql(i: int, m: Measurement) -> str:
    filt = f" FILTER (WHERE {_ident(f'__sr_c{i}')})" if m.condition is not None else ""
    arg = _ident(f"__sr_a{i}")
    if m.func == "count" and m.argument is None:
        return f"count(*){filt}"
    if m.func == "count":
        return f"count({arg}){filt}"
    if m.func == "count_distinct":
        return f"count(DISTINCT {arg}){filt}"
    if m.func == "sum":
        return f"COALESCE(CAST(sum({arg}){filt} AS DOUBLE), 0.0)"
    raise InvalidQueryError(f"the privacy mechanism names an aggregate this enclave does not release ({m.func})")


def _bound_ctes(s: int, b: _Bound, current: str, keys: Sequence[str], *, last: bool) -> list[str]:
    """Step ``s`` of contribution bounding over relation ``current``: ``__sr_s<s>`` keeps at most
    max_rows rows per (unit, group) and max_groups groups per unit, chosen in random order.

    Units within both bounds keep all their rows as they are (hash aggregates only, no draw); only
    the rows of the others get a random draw (materialized, so every window reads the same draws)
    and go through the window functions, the only sorts of the release. The step's result is
    materialized unless it is the ``last``, which only the aggregate reads."""
    on = " AND ".join(f"c.{u} IS NOT DISTINCT FROM v.{u}" for u in b.units)
    units = ", ".join(b.units)
    ctes = [
        f"__sr_s{s}p AS (SELECT {', '.join([*b.units, *keys])}, count(*) AS __sr_c FROM {current} "
        f"GROUP BY {', '.join([*b.units, *keys])})",
        f"__sr_s{s}v AS (SELECT {units} FROM __sr_s{s}p GROUP BY {units} "
        f"HAVING max(__sr_c) > {b.max_rows} OR count(*) > {b.max_groups})",
        f"__sr_s{s}ok AS (SELECT c.* FROM {current} AS c ANTI JOIN __sr_s{s}v AS v ON {on})",
        f"__sr_s{s}x AS (SELECT c.* FROM {current} AS c SEMI JOIN __sr_s{s}v AS v ON {on})",
    ]
    # One sort per (unit, group): each row's rank in random order, and the group's random key (the
    # smallest draw of its rows, kept by any bound on its rows).
    window = f"(PARTITION BY {', '.join([*b.units, *keys])} ORDER BY __sr_r)"
    group_key = f", first_value(__sr_r) OVER {window} AS __sr_gr" if keys else ""
    ctes.append(f"__sr_s{s}r AS MATERIALIZED (SELECT *, random() AS __sr_r FROM __sr_s{s}x)")
    ctes.append(f"__sr_s{s}a AS (SELECT *, row_number() OVER {window} AS __sr_rn{group_key} FROM __sr_s{s}r)")
    if keys:
        # Ties of the group's random key are broken by the keys: distinct groups, distinct ranks.
        ctes.append(
            f"__sr_s{s}b AS (SELECT * EXCLUDE (__sr_rn, __sr_gr), dense_rank() OVER (PARTITION BY "
            f"{units} ORDER BY __sr_gr, {', '.join(keys)}) AS __sr_gn FROM __sr_s{s}a WHERE __sr_rn <= {b.max_rows})"
        )
        bounded = f"SELECT * EXCLUDE (__sr_gn, __sr_r) FROM __sr_s{s}b WHERE __sr_gn <= {b.max_groups}"
    else:
        bounded = f"SELECT * EXCLUDE (__sr_rn, __sr_r) FROM __sr_s{s}a WHERE __sr_rn <= {b.max_rows}"
    materialized = "" if last else " MATERIALIZED"
    ctes.append(f"__sr_s{s} AS{materialized} (SELECT * FROM __sr_s{s}ok UNION ALL BY NAME {bounded})")
    return ctes


def _cells_sql(stage: _Stage, mechanism: DpMechanism, key_types: Sequence[str]) -> str:
    """Per group: the bounded rows' count and every measurement (not noised yet)."""
    keys = [_g(i) for i in range(stage.n_groups)]
    ctes = [f"__sr_rows AS ({stage.rows_sql})"]
    current = "__sr_rows"
    public = mechanism.domain is not None and stage.n_groups > 0
    if public:
        casts = ", ".join(f"TRY_CAST({_ident(f'__sr_d{i}')} AS {t}) AS {_g(i)}" for i, t in enumerate(key_types))
        listed = ", ".join(f"unnest($d{i}::VARCHAR[]) AS {_ident(f'__sr_d{i}')}" for i in range(len(key_types)))
        ctes.append(f"__sr_domain AS (SELECT unnest($i::BIGINT[]) AS {_ident(INDEX_COLUMN)}, {listed})")
        ctes.append(f"__sr_dom AS (SELECT {_ident(INDEX_COLUMN)}, {casts} FROM __sr_domain)")
        on = " AND ".join(f"d.{k} = r.{k}" for k in keys)
        # Rows whose keys lie outside the public domain are dropped before bounding.
        ctes.append(
            f"__sr_in AS (SELECT r.* FROM __sr_rows AS r WHERE EXISTS (SELECT 1 FROM __sr_dom AS d WHERE {on}))"
        )
        current = "__sr_in"
    for s, b in enumerate(stage.bounds):
        ctes += _bound_ctes(s, b, current, keys, last=s == len(stage.bounds) - 1)
        current = f"__sr_s{s}"
    measures = [f"{_measure_sql(i, m)} AS {_m(i)}" for i, m in enumerate(mechanism.measurements)]
    group_by = f" GROUP BY {', '.join(keys)}" if keys else ""
    ctes.append(
        f"__sr_agg AS (SELECT {', '.join([*keys, f'count(*) AS {_ident(ROWS_COLUMN)}', *measures])} "
        f"FROM {current}{group_by})"
    )
    values = [ROWS_COLUMN, *(f"__sr_m{i}" for i in range(len(mechanism.measurements)))]
    if public:
        on = " AND ".join(f"a.{k} = d.{k}" for k in keys)
        zeros = ", ".join(f"COALESCE(a.{_ident(v)}, 0) AS {_ident(v)}" for v in values)
        select = (
            f"SELECT d.{_ident(INDEX_COLUMN)}, {', '.join(f'd.{k}' for k in keys)}, {zeros} "
            f"FROM __sr_dom AS d LEFT JOIN __sr_agg AS a ON {on} ORDER BY d.{_ident(INDEX_COLUMN)}"
        )
    else:
        order = f" ORDER BY {', '.join(f'{k} NULLS FIRST' for k in keys)}" if keys else ""
        select = f"SELECT row_number() OVER () - 1 AS {_ident(INDEX_COLUMN)}, * FROM (SELECT * FROM __sr_agg{order})"
    return f"WITH {', '.join(ctes)} {select}"


# --------------------------------------------------------------------------------------------
# the connection


def _session(
    inputs: Sequence[InputSpec],
    tables: Mapping[str, pa.Table],
    clamps: Clamps | None,
    threads: int,
    on_cancel: OnCancel | None,
) -> StageConnection:
    """The engine's connection over the stage's own inputs (a dp input always has its privacy unit:
    no per-row id)."""
    known = {i.table for i in inputs}
    mine = {name: table for name, table in tables.items() if name in known}
    return StageConnection(mine, clamps=clamps, threads=threads, on_cancel=on_cancel)


def _cells(session: StageConnection, stage: _Stage, mechanism: DpMechanism) -> pa.Table:
    def run(con: duckdb.DuckDBPyConnection) -> pa.Table:
        key_types: list[str] = []
        params: dict[str, Any] = {}
        if mechanism.domain is not None and stage.n_groups:
            described = con.execute(f"DESCRIBE {stage.rows_sql}").fetchall()
            types = {row[0]: str(row[1]) for row in described}
            key_types = [types[f"__sr_g{i}"] for i in range(stage.n_groups)]
            # The public domain as query parameters (lists: pyarrow would load pandas to convert them).
            params = {"i": list(range(len(mechanism.domain)))}
            params.update({f"d{i}": [str(key[i]) for key in mechanism.domain] for i in range(stage.n_groups)})
        return con.sql(_cells_sql(stage, mechanism, key_types), params=params or None).to_arrow_table()

    cells: pa.Table = session.run(run)
    return cells


def bounded_cells(
    residual_sql: str,
    inputs: Sequence[InputSpec],
    tables: Mapping[str, pa.Table],
    mechanism: DpMechanism,
    *,
    clamps: Clamps | None = None,
    threads: int = 2,
) -> pa.Table:
    """The groups with their bounded, clamped, not yet noised aggregates (``__sr_n``: bounded rows;
    ``__sr_m<i>``: measurement i): what the noise is added to. Never released; for tests."""
    stage = _stage(residual_sql, inputs, mechanism)
    session = _session(inputs, tables, clamps, threads, None)
    try:
        return _cells(session, stage, mechanism)
    finally:
        session.close()


# --------------------------------------------------------------------------------------------
# OpenDP


def _opendp() -> Any:
    import opendp.prelude as dp  # noqa: PLC0415 - loaded by dp jobs only

    dp.enable_features("contrib")
    return dp


def _within(spent: float, allowed: float) -> bool:
    return spent <= allowed * (1 + MAP_TOLERANCE) + 1e-15


def _refused(what: str) -> JobFailedError:
    return JobFailedError(
        f"the noise of {what} would spend more privacy than the plan's mechanism allows; nothing was released",
        details={"rule": "privacy_mechanism"},
    )


def _select(counts: Sequence[int], selection: Selection, mechanism: DpMechanism) -> list[int]:
    """Indices of the groups OpenDP's Laplace partition selection keeps (the others are never listed)."""
    dp = _opendp()
    domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=int))
    metric = dp.l01inf_distance(dp.absolute_distance(T=int))
    meas = dp.m.make_laplace_threshold(domain, metric, scale=selection.scale, threshold=int(selection.threshold))
    g, r = mechanism.max_groups, mechanism.max_rows
    eps, delta = meas.map((g, g * r, r))
    if not (_within(eps, selection.epsilon) and _within(delta, selection.delta)):
        raise _refused("partition selection")
    kept = _draw(meas, {str(i): int(c) for i, c in enumerate(counts)})
    return sorted(int(k) for k in kept)


def _noised(values: Sequence[Any], m: Measurement) -> list[Any]:
    """``values`` (one per released group) with OpenDP's noise for measurement ``m``."""
    dp = _opendp()
    if m.discrete:
        domain = dp.vector_domain(dp.atom_domain(T=int))
        meas = dp.m.make_laplace(domain, dp.l1_distance(T=int), scale=m.scale)
        d_in: int | float = math.ceil(m.sensitivity)
        data: list[Any] = [int(v) for v in values]
    else:
        domain = dp.vector_domain(dp.atom_domain(T=float, nan=False))
        meas = dp.m.make_laplace(domain, dp.l1_distance(T=float), scale=m.scale)
        d_in = float(m.sensitivity)
        data = [float(v) for v in values]
    if not _within(meas.map(d_in), m.epsilon):
        raise _refused(m.func)
    return list(_draw(meas, data)) if data else []


def _draw(meas: Any, data: Any) -> Any:
    """OpenDP's release of ``data``; a failure (e.g. a count beyond its integer type) by kind only:
    OpenDP's messages can quote the values."""
    from opendp.mod import OpenDPException  # noqa: PLC0415 - loaded by dp jobs only

    try:
        return meas(data)
    except (OpenDPException, ValueError, TypeError, OverflowError) as exc:
        raise JobFailedError(
            f"the noise could not be drawn ({type(exc).__name__}); nothing was released",
            details={"rule": "privacy_mechanism"},
        ) from None


# --------------------------------------------------------------------------------------------
# the release


def _noisy_columns(
    cells: pa.Table, kept: Sequence[int], stage: _Stage, mechanism: DpMechanism
) -> tuple[dict[str, list[Any]], dict[str, list[float]]]:
    """Every aggregate output of the ``kept`` groups (noisy, as Python lists), and its half-widths."""
    noisy: dict[str, list[Any]] = {}
    for i, m in enumerate(mechanism.measurements):
        values = cells[f"__sr_m{i}"].to_pylist()
        noisy[m.key] = _noised([values[k] for k in kept], m)
    columns: dict[str, list[Any]] = {}
    ci: dict[str, list[float]] = {}
    for name in stage.names:
        if name in stage.group_of:
            continue
        out = mechanism.output(name)
        if out is None:
            raise InvalidQueryError(f"the privacy mechanism does not release output {name}; re-plan the query")
        if out.func == "avg":
            s, c = (mechanism.measurement(k) for k in out.measurements)
            sums, counts = noisy[s.key], noisy[c.key]
            lo = out.lo if out.lo is not None else -math.inf
            hi = out.hi if out.hi is not None else math.inf
            columns[name] = [min(max(sv / max(cv, 1), lo), hi) for sv, cv in zip(sums, counts, strict=True)]
            # Delta method: the ratio's first-order error from both noisy terms, over the noisy count.
            ci[name] = [(s.ci95 + abs(a) * c.ci95) / max(cv, 1) for a, cv in zip(columns[name], counts, strict=True)]
            continue
        m = mechanism.measurement(out.measurements[0])
        columns[name] = noisy[m.key]
        ci[name] = [m.ci95] * len(kept)
    return columns, ci


def _release_sql(stage: _Stage, mechanism: DpMechanism, aggregates: Sequence[str]) -> str:
    """The noisy table (outputs, hidden group keys, half-widths ``__sr_ci<j>``) of the kept groups,
    from the cells and the noisy values passed as list parameters, then HAVING, ORDER BY, LIMIT."""
    index = _ident(INDEX_COLUMN)
    noise = [f"unnest($k::BIGINT[]) AS {index}"]
    for j, name in enumerate(aggregates):
        out = mechanism.output(name)
        assert out is not None
        discrete = out.func != "avg" and mechanism.measurement(out.measurements[0]).discrete
        noise.append(f"unnest($v{j}::{'BIGINT' if discrete else 'DOUBLE'}[]) AS {_ident(f'__sr_v{j}')}")
        noise.append(f"unnest($c{j}::DOUBLE[]) AS {_ident(f'__sr_ci{j}')}")
    select = []
    for name in stage.names:
        if name in stage.group_of:
            select.append(f"c.{_g(stage.group_of[name])} AS {_ident(name)}")
        else:
            select.append(f"n.{_ident(f'__sr_v{aggregates.index(name)}')} AS {_ident(name)}")
    select += [f"c.{_g(i)}" for i in range(stage.n_groups)]
    select += [f"n.{_ident(f'__sr_ci{j}')}" for j in range(len(aggregates))]
    select.append(f"c.{index}")
    sql = (
        f"WITH __sr_noise AS (SELECT {', '.join(noise)}) "
        f"SELECT {', '.join(select)} FROM __sr_cells AS c JOIN __sr_noise AS n ON c.{index} = n.{index}"
    )
    condition = "TRUE"
    if stage.having is not None:
        condition = exp.func("COALESCE", exp.Try(this=stage.having.copy()), exp.false()).sql(DIALECT)
    return f"SELECT * FROM ({sql}) WHERE {condition} ORDER BY {index}"


def run_dp_stage(
    residual_sql: str,
    inputs: Sequence[InputSpec],
    tables: Mapping[str, pa.Table],
    mechanism: DpMechanism,
    *,
    clamps: Clamps | None = None,
    threads: int = 2,
    on_cancel: OnCancel | None = None,
) -> DpOutcome:
    """Release the dp stage ``residual_sql`` over ``tables`` (engine name -> Arrow table) with
    ``mechanism`` (see the module docstring). ``clamps``: per engine table, the measures' declared
    bounds; ``on_cancel`` as for :func:`enclave_worker.engine.run_stage`."""
    stage = _stage(residual_sql, inputs, mechanism)
    session = _session(inputs, tables, clamps, threads, on_cancel)
    try:
        cells = _cells(session, stage, mechanism)
        kept = list(range(cells.num_rows))
        if mechanism.domain is None:
            if mechanism.selection is None:
                raise InvalidQueryError("the privacy mechanism has neither a public domain nor partition selection")
            kept = _select(cells[ROWS_COLUMN].to_pylist(), mechanism.selection, mechanism)
        columns, ci = _noisy_columns(cells, kept, stage, mechanism)
        aggregates = [n for n in stage.names if n not in stage.group_of]
        params: dict[str, Any] = {"k": kept}
        for j, name in enumerate(aggregates):
            params[f"v{j}"], params[f"c{j}"] = columns[name], ci[name]
        released = session.run(
            lambda con: _post_process(con, cells, _release_sql(stage, mechanism, aggregates), params, stage)
        )
        ci95 = {name: released[f"__sr_ci{j}"].to_pylist() for j, name in enumerate(aggregates)}
        return DpOutcome(released.select(list(stage.names)), ci95, mechanism.to_dict())
    finally:
        session.close()


def _post_process(
    con: duckdb.DuckDBPyConnection, cells: pa.Table, sql: str, params: dict[str, Any], stage: _Stage
) -> pa.Table:
    """The released table: ``sql`` over the cells, then ORDER BY and LIMIT (half-widths kept on their rows)."""
    con.register("__sr_cells", cells)
    released = con.sql(sql, params=params).to_arrow_table()
    r = stage.resolved
    if not r.order and r.limit is None:
        return released
    con.register("__sr_released", released)
    out: pa.Table = con.sql(order_sql("__sr_released", r.order, r.limit)).to_arrow_table()
    return out
