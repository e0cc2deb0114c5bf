"""MPC stages: what a query asks of one, if it can run as one (:func:`mpc_query`).

The planner, each party and the runtime compute it from a plan's SQL and must agree. It starts
from the same resolution of the query as :mod:`sealroom.planning.sql` (the SQL surface's own
refusals come first) and refuses, with a rule and a suggestion, what an MPC stage over
horizontally partitioned data cannot compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlglot import exp

from sealroom.errors import InvalidQueryError
from sealroom.planning.resolve import (
    DIALECT,
    OrderKey,
    Resolved,
    Source,
    check_branch_column,
    column_uses,
    expanded_projections,
    query_refusal,
    resolve,
)
from sealroom.planning.sql import NOT_PUSHABLE, PushedFilter, conjuncts, render_filter

# sqlglot aggregate class -> MPC aggregate function (sealroom.planning.mpc_spec.AGGREGATES; COUNT is handled apart).
MPC_AGGREGATES: dict[type, str] = {
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Min: "min",
    exp.Max: "max",
    exp.Variance: "var_samp",
    exp.VariancePop: "var_pop",
    exp.Stddev: "stddev_samp",
    exp.StddevSamp: "stddev_samp",
    exp.StddevPop: "stddev_pop",
}


@dataclass(frozen=True)
class MpcQuery:
    """What an MPC stage computes for a query (see :func:`mpc_query`).

    - ``group_columns``: the dataset columns grouped by, in GROUP BY order;
    - ``aggregates``: ``(output name, func, column or None)`` in output order (``func`` as in
      :data:`sealroom.planning.mpc_spec.AGGREGATES`; ``count`` with None is COUNT(*));
    - ``outputs``: per output column, ``(name, "group" | "aggregate", group column or aggregate name)``;
    - ``having``: a condition over output names (DuckDB SQL, quoted identifiers) applied to the
      released cells, or None;
    - ``filters``: per dataset, the filter it applies itself (its branch's WHERE and the outer WHERE);
    - ``columns``: per dataset, the columns its partials read (group and aggregated columns).
    """

    sql: str
    datasets: tuple[str, ...]
    group_columns: tuple[str, ...]
    aggregates: tuple[tuple[str, str, str | None], ...]
    outputs: tuple[tuple[str, str, str], ...]
    having: str | None
    order_by: tuple[OrderKey, ...]
    limit: int | None
    filters: Mapping[str, PushedFilter]
    columns: Mapping[str, tuple[str, ...]]
    uses: Mapping[str, Mapping[str, frozenset[str]]]


def _mpc_refuse(message: str, rule: str, suggestion: str, **details: object) -> InvalidQueryError:
    return query_refusal(message, stage="mpc", rule=rule, suggestion=suggestion, **details)


def _mpc_aggregate(body: exp.Expression, name: str) -> tuple[str, str, str | None]:
    if isinstance(body, exp.Count):
        arg = body.this
        if isinstance(arg, exp.Distinct):
            raise _mpc_refuse(
                f"COUNT(DISTINCT ...) ({name}) cannot run as MPC: distinct counts do not add up across parties",
                "count_distinct",
                "use COUNT(*) or COUNT(column) instead of COUNT(DISTINCT ...)",
                output=name,
            )
        if arg is None or isinstance(arg, exp.Star):
            return (name, "count", None)
        func = "count"
    elif type(body) in MPC_AGGREGATES:
        arg = body.this
        func = MPC_AGGREGATES[type(body)]
    else:
        raise _mpc_refuse(
            f"the output {name} is not a single aggregate; MPC stages release each aggregate as it is computed",
            "output",
            f"write {name} as one aggregate of a column (e.g. AVG(x)), not an expression of aggregates",
            output=name,
        )
    if not isinstance(arg, exp.Column) or body.args.get("expressions"):
        raise _mpc_refuse(
            f"{body.sql(DIALECT)} aggregates an expression; MPC stages aggregate plain columns",
            "aggregate_argument",
            f"aggregate a column directly, e.g. {func.upper().split('_')[0]}(column)",
            output=name,
        )
    return (name, func, arg.name)


def mpc_query(
    sql: str, schemas: Mapping[str, Sequence[str]], hidden: Mapping[str, Sequence[str]] | None = None
) -> MpcQuery:
    """Check that ``sql`` can run as an MPC stage and learn what it computes. Deterministic: the
    planner, each party and the runtime compute it from the plan's SQL and must agree.

    An MPC stage takes decomposable aggregates (COUNT(*), COUNT(col), SUM, AVG, VAR/STDDEV samp
    and pop, MIN, MAX of plain columns) over horizontally partitioned data: one dataset, or a
    UNION ALL of datasets projecting the same columns under their own names; GROUP BY plain
    columns (whose public domain the owners declare); WHERE conditions every party applies itself
    (a condition on a UNION ALL's columns goes to every branch); HAVING only on output columns
    (applied to the released cells). Raises InvalidQueryError with ``details["rule"]`` and
    ``details["suggestion"]`` (the SQL surface's own refusals come first, as from :func:`analyze`).
    """
    r = resolve(sql, schemas, hidden)
    src = _partitioned_source(r)
    groups = _group_columns(r)
    selected = _selected(r, groups)
    having = _mpc_having(r.tree.args.get("having"), selected.group_output, selected.agg_output)
    outer = _outer_conditions(r)
    read = list(groups) + [a[2] for a in selected.aggregates if a[2] is not None]
    return MpcQuery(
        sql=r.tree.sql(DIALECT),
        datasets=tuple(br.qualified for br in src.branches),
        group_columns=tuple(groups),
        aggregates=tuple(selected.aggregates),
        outputs=tuple(selected.outputs),
        having=having,
        order_by=tuple(r.order),
        limit=r.limit,
        filters=_branch_filters(src, outer),
        columns={br.qualified: _ordered(read, br.columns) for br in src.branches},
        uses=column_uses(r),
    )


def _partitioned_source(r: Resolved) -> Source:
    """The query's one FROM item: a dataset, or a UNION ALL of distinct datasets each selecting the
    needed columns under their own names (an MPC stage cannot join rows across parties)."""
    if len(r.sources) != 1:
        raise _mpc_refuse(
            "the query joins datasets row by row, which an MPC stage cannot do (each party aggregates only "
            "its own rows)",
            "join",
            "drop the join: aggregate one dataset, or the UNION ALL of datasets with the same columns",
        )
    src = r.sources[0]
    datasets = [br.qualified for br in src.branches]
    if len(set(datasets)) != len(datasets):
        raise _mpc_refuse("a dataset appears twice in the UNION ALL", "union", "name each dataset once")
    if src.kind == "union":
        for br in src.branches:
            projections = expanded_projections(br)
            for name in src.needed:
                proj = projections[src.columns.index(name)]
                if not (isinstance(proj, exp.Column) and proj.name == name):
                    raise _mpc_refuse(
                        f"{br.qualified} projects {proj.sql(DIALECT)} as {name} in the UNION ALL; an MPC stage "
                        "needs every branch to select the column under its own name",
                        "union",
                        f"select {name} itself in every branch (or SELECT *)",
                        dataset=br.qualified,
                        column=name,
                    )
    return src


def _group_columns(r: Resolved) -> list[str]:
    """The dataset columns grouped by, in GROUP BY order: plain columns only (their public domain
    is declared by the owners)."""
    groups: list[str] = []
    for g in r.groups:
        if not isinstance(g, exp.Column):
            raise _mpc_refuse(
                f"GROUP BY {g.sql(DIALECT)} is an expression; an MPC stage groups by columns whose public domain "
                "the owners declare",
                "group_by",
                "GROUP BY the column itself: a dimension with declared values, or with declared bins to group a "
                "numeric column into ranges",
            )
        if g.name not in groups:
            groups.append(g.name)
    return groups


@dataclass(frozen=True)
class _Selected:
    """The SELECT list as an MPC stage releases it (see :class:`MpcQuery`), and the output name of
    each group column and of each aggregate (by its SQL), for HAVING."""

    aggregates: list[tuple[str, str, str | None]]
    outputs: list[tuple[str, str, str]]
    group_output: dict[str, str]
    agg_output: dict[str, str]


def _selected(r: Resolved, groups: Sequence[str]) -> _Selected:
    """Each output is a group column or a single aggregate of a plain column."""
    selected = _Selected([], [], {}, {})
    for e, name in zip(r.tree.expressions, r.names, strict=True):
        body = e.this if isinstance(e, exp.Alias) else e
        if isinstance(body, exp.Column) and body.name in groups:
            selected.outputs.append((name, "group", body.name))
            selected.group_output.setdefault(body.name, name)
            continue
        selected.aggregates.append(_mpc_aggregate(body, name))
        selected.outputs.append((name, "aggregate", name))
        selected.agg_output.setdefault(body.sql(DIALECT), name)
    return selected


def _outer_conditions(r: Resolved) -> list[exp.Expression]:
    """The conjuncts of the outer WHERE, each one every party can apply on its own rows."""
    where = r.tree.args.get("where")
    outer = conjuncts(where.this) if where is not None else []
    for c in outer:
        if any(isinstance(n, NOT_PUSHABLE) for n in c.walk()) or not any(c.find_all(exp.Column)):
            raise _mpc_refuse(
                f"the condition {c.sql(DIALECT)} cannot be applied by each party on its own rows",
                "filter",
                "filter on the datasets' own columns only (no subqueries, parameters or constant conditions)",
            )
    return outer


def _branch_filters(src: Source, outer: Sequence[exp.Expression]) -> dict[str, PushedFilter]:
    """Per dataset, the filter it applies itself: its branch's own WHERE, then the outer WHERE."""
    filters: dict[str, PushedFilter] = {}
    for br in src.branches:
        parts: list[exp.Expression] = []
        own = br.select.args.get("where") if br.select is not None else None
        if own is not None:
            for col in own.this.find_all(exp.Column):
                check_branch_column(br, col)
            parts.append(own.this)
        parts += outer
        if parts:
            filters[br.qualified] = render_filter(parts)
    return filters


def _ordered(read: Sequence[str], columns: Sequence[str]) -> tuple[str, ...]:
    """The distinct columns of ``read`` in the dataset's column order."""
    order = {c: i for i, c in enumerate(columns)}
    return tuple(sorted(set(read), key=lambda c: order.get(c, len(order))))


def _mpc_having(having: exp.Having | None, groups: Mapping[str, str], aggs: Mapping[str, str]) -> str | None:
    """HAVING rewritten over output names, or a refusal if it tests anything not in the output."""
    if having is None:
        return None
    cond = having.this.copy()
    outputs = set(groups.values()) | set(aggs.values())

    def refuse(what: str) -> InvalidQueryError:
        return _mpc_refuse(
            f"HAVING tests {what}, which is not an output; an MPC stage opens only the output aggregates of "
            "passing cells, so HAVING can only test those",
            "having",
            f"add {what} to the SELECT list, or drop the HAVING condition",
        )

    for agg in list(cond.find_all(exp.AggFunc)):
        name = aggs.get(agg.sql(DIALECT))
        if name is None:
            raise refuse(agg.sql(DIALECT))
        agg.replace(exp.column(name, quoted=True))
    for col in list(cond.find_all(exp.Column)):
        if col.table:
            name = groups.get(col.name)
            if name is None:
                raise refuse(col.name)
            col.replace(exp.column(name, quoted=True))
        elif col.name in outputs:
            col.set("this", exp.to_identifier(col.name, quoted=True))
        else:
            raise refuse(col.name)
    return cond.sql(DIALECT)
