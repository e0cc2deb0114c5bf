"""SQL analysis: what an analyst's query reads, whether it only outputs aggregates, and how the
enclave runs it.

The same code serves two sides that do not trust each other:

- the coordinator's planner calls :func:`analyze` to refuse what Sealroom does not run (row-level
  output, unsupported aggregates, outer joins...) and to learn which columns each party must send
  (projection pushdown), and which filters each party applies itself (filter pushdown, see
  :func:`pushdown`);
- the enclave calls :func:`compile_stage` on the plan's SQL *itself*, with only the columns the
  parties actually sent, and adds the hidden per-cell privacy-unit counts that the disclosure rules
  need. It never runs SQL it did not compile.

Both start from :func:`sealroom.planning.resolve.resolve`, which parses the query, checks it
against Sealroom's SQL surface (described there) and resolves its columns. Refusals are
:class:`sealroom.errors.InvalidQueryError` saying what to change. Messages may quote the analyst's
own SQL, never party data.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp

from sealroom.planning.cells import active_rows, post_aggregate, sum_argument, total
from sealroom.planning.limits import DEFAULT_LIMITS, QueryLimits
from sealroom.planning.resolve import (
    DIALECT,
    Branch,
    OrderKey,
    Resolved,
    Source,
    check_branch_column,
    column_uses,
    expanded_projections,
    from_items,
    projected_columns,
    query_refusal,
    resolve,
    union_selects,
)

# Columns Sealroom adds (all start with resolve.RESERVED_PREFIX, which an analyst's column may not):
ROW_ID = "__sr_row"  # per-row id the enclave adds to inputs without a declared privacy unit
UNION_UNIT = "__sr_unit"
UNION_BRANCH = "__sr_branch"  # which branch (hence which dataset) a UNION ALL row comes from
# Boolean column a party adds to its sealed stream when it applies a filter itself: True marks a
# padding row (it hides how many rows matched), which the enclave drops before anything reads it.
PAD_COLUMN = "__sr_pad"


@dataclass(frozen=True)
class Analysis:
    """What the planner learns from a query."""

    sql: str  # normalised SQL (DuckDB dialect)
    datasets: tuple[str, ...]  # party.dataset, in order of appearance
    needed_columns: Mapping[str, tuple[str, ...]]  # per dataset: columns the query reads
    output_columns: tuple[str, ...]
    group_columns: tuple[str, ...]  # output columns that are group keys
    aggregates: tuple[str, ...]  # aggregate functions used
    order_by: tuple[OrderKey, ...]
    limit: int | None
    uses: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)  # see column_uses
    residual_sql: str = ""  # what the enclave runs: ``sql`` without the filters the parties apply
    filters: Mapping[str, str | None] = field(default_factory=dict)  # per dataset: the filter it applies
    filter_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per dataset: columns it reads


@dataclass(frozen=True)
class PushedFilter:
    """A predicate one dataset applies itself before sealing: DuckDB SQL over the dataset's own
    unqualified, quoted column names, and the columns it reads (in order of first use)."""

    sql: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Pushdown:
    """Filter pushdown of one query: what each dataset filters itself, and what remains."""

    residual_sql: str  # the query without the pushed filters: what the enclave compiles and runs
    filters: Mapping[str, PushedFilter]  # party.dataset -> its filter (datasets without one are absent)
    uses: Mapping[str, Mapping[str, frozenset[str]]]  # column_uses of the FULL query (pushed filters included)


@dataclass(frozen=True)
class UnitCheck:
    """A hidden per-cell count of the distinct privacy units of one input dataset."""

    column: str  # hidden output column name
    datasets: tuple[str, ...]  # the party.dataset counted by this check (one)
    unit: str  # human description, e.g. "customer_id" or "rows"
    expression: str = ""  # the unit expression in the compiled query (DuckDB SQL)
    condition: str = ""  # the rows of this dataset in its FROM item (a UNION ALL branch tag), or ""
    item: int = 0  # index of the FROM item


@dataclass(frozen=True)
class SubCheck:
    """Hidden per-cell counts of one dataset's units inside a conditional aggregate's sub-cell and
    inside its complement (see :mod:`sealroom.planning.cells`)."""

    inside: str  # hidden column: distinct units of the dataset among the rows the aggregate reads
    outside: str  # ... among the cell's other rows
    check: int  # index into CompiledStage.unit_checks: whose units


@dataclass(frozen=True)
class CompiledStage:
    """What the enclave runs: an aggregate query with hidden unit counts, then order/limit."""

    aggregate_sql: str
    output_columns: tuple[str, ...]
    group_columns: tuple[str, ...]
    unit_checks: tuple[UnitCheck, ...]
    order_by: tuple[OrderKey, ...]
    limit: int | None
    # every SUM/AVG argument of the outputs, as the dominance rule weighs it (cells.sum_argument)
    sum_arguments: tuple[str, ...] = ()
    uses: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)  # see column_uses
    sub_checks: tuple[SubCheck, ...] = ()  # sub-cells of conditional aggregates
    # group output column -> the (dataset, column) it outputs as is; absent when computed
    group_sources: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # (output column, total SQL over hidden columns of aggregate_sql): outputs computed after it
    post_outputs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class InputSpec:
    """The enclave's view of one input: which engine table holds it and its privacy unit."""

    qualified: str
    table: str
    columns: tuple[str, ...]
    privacy_unit: str | None


# --------------------------------------------------------------------------------------------
# projection pushdown


def _branch_columns(src: Source, branch: Branch) -> tuple[list[exp.Expression], list[str]]:
    """Pruned projections of a UNION ALL branch and the dataset columns they (and WHERE) read."""
    assert branch.select is not None
    projections = expanded_projections(branch)
    kept = [p for p, name in zip(projections, src.columns, strict=True) if name in src.needed]
    reads: list[str] = []
    nodes: list[exp.Expression] = list(kept)
    if branch.select.args.get("where") is not None:
        nodes.append(branch.select.args["where"])
    for node in nodes:
        for col in node.find_all(exp.Column):
            check_branch_column(branch, col)
            if col.name not in reads:
                reads.append(col.name)
    return kept, reads


# --------------------------------------------------------------------------------------------
# filter pushdown

# Nodes that keep a condition in the enclave: what a party cannot (or must not) evaluate on its own.
NOT_PUSHABLE = (exp.AggFunc, exp.Subquery, exp.Select, exp.Window, exp.Placeholder, exp.Parameter, exp.Star)


def conjuncts(node: exp.Expression) -> list[exp.Expression]:
    """``node`` split on AND (through parentheses), left to right."""
    inner = node
    while isinstance(inner, exp.Paren):
        inner = inner.this
    if isinstance(inner, exp.And):
        return conjuncts(inner.this) + conjuncts(inner.expression)
    return [node]


def _conjunction(parts: Sequence[exp.Expression]) -> exp.Expr:
    copies = [p.copy() for p in parts]
    if len(copies) == 1:
        return copies[0]
    return exp.and_(*copies, copy=False)


def _push_target(conjunct: exp.Expression, by_alias: Mapping[str, Source]) -> Source | None:
    """The plain-table FROM item that alone holds every column of ``conjunct``, if any."""
    if any(isinstance(n, NOT_PUSHABLE) for n in conjunct.walk()):
        return None
    aliases = {c.table for c in conjunct.find_all(exp.Column)}
    if len(aliases) != 1:
        return None  # no column (a constant or random condition), or columns of several FROM items
    src = by_alias.get(aliases.pop())
    return src if src is not None and src.kind == "table" else None


def render_filter(parts: Sequence[exp.Expression]) -> PushedFilter:
    """The conjunction of ``parts`` over the dataset's own unqualified, quoted column names."""
    pred = _conjunction(parts)
    columns: list[str] = []
    for col in list(pred.find_all(exp.Column, bfs=False)):
        name = col.name
        for key in ("table", "db", "catalog"):
            col.set(key, None)
        col.set("this", exp.to_identifier(name, quoted=True))
        if name not in columns:
            columns.append(name)
    return PushedFilter(pred.sql(DIALECT), tuple(columns))


def _pushdown(r: Resolved) -> Pushdown:
    """Filter pushdown of a resolved query. Deterministic: the planner, the enclave and each party
    compute it from the same SQL and must agree (the enclave and the parties refuse a plan whose
    filters differ from theirs).

    - a conjunct of the outer WHERE (split on AND) whose columns all belong to one ``party.dataset``
      FROM item, with no aggregate, subquery or parameter, goes to that dataset;
    - a UNION ALL branch's own WHERE goes to the branch's dataset (when it reads a column);
    - everything else (conditions across FROM items, on a UNION ALL alias, constants, OR across
      tables) stays in the residual query, which the enclave runs.

    Pushing is exact for Sealroom's SQL surface: joins are inner, so a row that fails a condition
    on its own columns is in no output row; clamped measure columns cannot be filtered on (roles),
    so a party never filters a value the enclave would have clamped first.
    """
    by_alias = {s.alias: s for s in r.sources}
    pushed: dict[str, list[exp.Expression]] = {}
    kept: list[exp.Expression] = []
    where = r.tree.args.get("where")
    if where is not None:
        for conjunct in conjuncts(where.this):
            target = _push_target(conjunct, by_alias)
            if target is None:
                kept.append(conjunct)
            else:
                pushed.setdefault(target.branches[0].qualified, []).append(conjunct)
    cleared: set[tuple[int, int]] = set()  # (FROM item, branch) whose WHERE was pushed
    for n, src in enumerate(r.sources):
        for k, br in enumerate(src.branches):
            bw = br.select.args.get("where") if br.select is not None else None
            if bw is None:
                continue
            cols = list(bw.this.find_all(exp.Column))
            for col in cols:
                check_branch_column(br, col)
            if cols and not any(isinstance(x, NOT_PUSHABLE) for x in bw.this.walk()):
                pushed[br.qualified] = [bw.this]
                cleared.add((n, k))
    residual = r.tree.copy()
    if pushed and where is not None and len(kept) != len(conjuncts(where.this)):
        residual.set("where", exp.Where(this=_conjunction(kept)) if kept else None)
    items = from_items(residual)
    for n, k in cleared:
        item = items[n]
        assert isinstance(item, exp.Subquery)
        union_selects(item.this, item.alias)[k].set("where", None)
    return Pushdown(
        residual_sql=residual.sql(DIALECT),
        filters={q: render_filter(parts) for q, parts in pushed.items()},
        uses=column_uses(r),
    )


def pushdown(sql: str, inputs: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> Pushdown:
    """Filter pushdown of a plan's SQL, as the enclave and each party recompute it.

    ``inputs`` maps ``party.dataset`` to (the columns the party sends, the columns its filter
    reads): the view the plan declares. Filter-only columns resolve in the full query but are not
    part of what ``*`` expands to, as in the residual query the enclave compiles over what it
    receives. Raises InvalidQueryError like :func:`analyze`.
    """
    schemas = {q: list(cols) for q, (cols, _) in inputs.items()}
    hidden = {q: [c for c in fcols if c not in cols] for q, (cols, fcols) in inputs.items()}
    return _pushdown(resolve(sql, schemas, hidden))


def analyze(sql: str, schemas: Mapping[str, Sequence[str]], *, limits: QueryLimits = DEFAULT_LIMITS) -> Analysis:
    """Check that ``sql`` is in Sealroom's SQL surface and learn what it reads.

    ``schemas`` maps ``party.dataset`` to its column names. Raises InvalidQueryError.
    ``needed_columns`` are what each party must send for the residual query (the filters it applies
    itself are not part of it); ``uses`` are those of the full query, pushed filters included.
    ``limits``: the caps on the query's size (:mod:`sealroom.planning.limits`).
    """
    r = resolve(sql, schemas, limits=limits)
    datasets: list[str] = []
    for src in r.sources:
        for br in src.branches:
            if br.qualified in datasets:
                raise query_refusal(f"{br.qualified} appears twice; a self-join is not supported", dataset=br.qualified)
            datasets.append(br.qualified)
    normalised = r.tree.sql(DIALECT)
    pd = _pushdown(r)
    # What is sent: the columns the residual query reads (a filter-only column stays with its owner).
    rr = resolve(pd.residual_sql, schemas)
    needed: dict[str, list[str]] = {}
    for src in rr.sources:
        for br in src.branches:
            if src.kind == "table":
                reads = list(src.needed)
            else:
                _, reads = _branch_columns(src, br)
            order = {c: i for i, c in enumerate(br.columns)}
            needed[br.qualified] = sorted(reads, key=order.__getitem__)
    return Analysis(
        sql=normalised,
        datasets=tuple(datasets),
        needed_columns={k: tuple(needed[k]) for k in datasets},
        output_columns=tuple(r.names),
        group_columns=tuple(r.group_names),
        aggregates=tuple(r.aggregates),
        order_by=tuple(r.order),
        limit=r.limit,
        uses=pd.uses,
        residual_sql=pd.residual_sql,
        filters={q: pd.filters[q].sql if q in pd.filters else None for q in datasets},
        filter_columns={q: pd.filters[q].columns if q in pd.filters else () for q in datasets},
    )


def compile_stage(sql: str, inputs: Sequence[InputSpec]) -> CompiledStage:
    """Compile a stage's SQL for the in-enclave engine.

    ``inputs`` are the enclave's own view of what it holds; each engine table has the input's
    columns, plus :data:`ROW_ID` where the input declares no privacy unit. Adds, per cell:

    - one hidden ``COUNT(DISTINCT unit)`` per input dataset on its own units (a UNION ALL branch
      carries a hidden tag, :data:`UNION_BRANCH`, so each branch's dataset is counted apart);
    - per conditional aggregate (:func:`sealroom.planning.cells.active_rows`) and per input dataset,
      the units of its sub-cell and of the sub-cell's complement;

    makes every expression total (:func:`sealroom.planning.cells.total`) and strips ORDER BY/LIMIT
    (applied to released rows only).
    """
    by_name = {i.qualified: i for i in inputs}
    schemas = {i.qualified: list(i.columns) for i in inputs}
    r = resolve(sql, schemas)
    _refuse_grouping_by_units(r, by_name)
    uses = column_uses(r)
    groups = _group_sources(r)
    tree = r.tree
    checks: list[UnitCheck] = []
    for n, src in enumerate(r.sources):
        checks += _table_check(src, n, by_name) if src.kind == "table" else _union_checks(src, n, by_name)
    outputs = []
    for e, out in zip(tree.expressions, r.names, strict=True):
        body = e.this if isinstance(e, exp.Alias) else e
        outputs.append(exp.alias_(total(body.copy()), out, quoted=True))
    _make_total(tree)
    sums: list[str] = []
    actives: list[str] = []
    for o in outputs:
        # AVG next to COUNT reveals the SUM, so AVG arguments fall under the dominance rule too.
        for agg in [*o.find_all(exp.Sum), *o.find_all(exp.Avg)]:
            arg = sum_argument(agg).sql(DIALECT)
            if arg not in sums:
                sums.append(arg)
        for agg in o.find_all(exp.AggFunc):
            active = active_rows(agg)
            if active is not None:
                pred = f"COALESCE({total(active).sql(DIALECT)}, FALSE)"
                if pred not in actives:
                    actives.append(pred)
    hidden, subs = _hidden_counts(checks, actives)
    outputs, posts = _split_post_aggregates(outputs)
    tree.set("expressions", outputs + hidden)
    tree.set("order", None)
    tree.set("limit", None)
    return CompiledStage(
        aggregate_sql=tree.sql(DIALECT),
        output_columns=tuple(r.names),
        group_columns=tuple(r.group_names),
        unit_checks=tuple(checks),
        order_by=tuple(r.order),
        limit=r.limit,
        sum_arguments=tuple(sums),
        uses=uses,
        sub_checks=tuple(subs),
        group_sources=groups,
        post_outputs=tuple(posts),
    )


def _split_post_aggregates(outputs: list[exp.Expr]) -> tuple[list[exp.Expr], list[tuple[str, str]]]:
    """Outputs computing something that could raise over aggregates (cells.post_aggregate): in the
    aggregate query, a NULL placeholder (so GROUP BY positions keep their meaning) and the hidden
    columns it reads; the output itself is computed over them afterwards (``post_outputs``)."""
    kept: list[exp.Expr] = []
    leaves: list[exp.Expr] = []
    posts: list[tuple[str, str]] = []
    for i, o in enumerate(outputs):
        assert isinstance(o, exp.Alias)
        split = post_aggregate(o.this, f"__sr_post_{i}_")
        if split is None:
            kept.append(o)
            continue
        outer, parts = split
        kept.append(exp.alias_(exp.null(), f"__sr_post_{i}", quoted=True))
        leaves += [exp.alias_(e, name, quoted=True) for name, e in parts]
        posts.append((o.alias, outer.sql(DIALECT)))
    return kept + leaves, posts


def _table_check(src: Source, n: int, by_name: Mapping[str, InputSpec]) -> list[UnitCheck]:
    """A plain-table FROM item: its engine table, and the count of its dataset's units."""
    spec = by_name[src.branches[0].qualified]
    replace_table(src.branches[0].table, spec.table, src.alias)
    unit = exp.column(spec.privacy_unit or ROW_ID, table=src.alias, quoted=True)
    return [UnitCheck(f"__sr_units_{n}", (spec.qualified,), spec.privacy_unit or "rows", unit.sql(DIALECT), "", n)]


def _union_checks(src: Source, n: int, by_name: Mapping[str, InputSpec]) -> list[UnitCheck]:
    """A UNION ALL FROM item: each branch pruned, made total, given its unit and its branch tag,
    and one count per branch dataset of its own units."""
    checks = []
    for k, br in enumerate(src.branches):
        spec = by_name[br.qualified]
        kept, _ = _branch_columns(src, br)
        unit: exp.Expression
        if spec.privacy_unit:
            unit = exp.cast(exp.column(spec.privacy_unit, quoted=True), "VARCHAR")
        else:
            unit = exp.DPipe(
                this=exp.Literal.string(f"{k}:"),
                expression=exp.cast(exp.column(ROW_ID, quoted=True), "VARCHAR"),
            )
        assert br.select is not None
        tag = exp.alias_(exp.Literal.number(k), UNION_BRANCH, quoted=True)
        br.select.set("expressions", [*(total(p) for p in kept), exp.alias_(unit, UNION_UNIT, quoted=True), tag])
        bw = br.select.args.get("where")
        if bw is not None:
            bw.set("this", total(bw.this))
        replace_table(br.table, spec.table, br.table.alias_or_name)
        unit_sql = exp.column(UNION_UNIT, table=src.alias, quoted=True).sql(DIALECT)
        cond = exp.EQ(this=exp.column(UNION_BRANCH, table=src.alias, quoted=True), expression=exp.Literal.number(k))
        name = f"__sr_units_{n}_{k}"
        checks.append(UnitCheck(name, (spec.qualified,), spec.privacy_unit or "rows", unit_sql, cond.sql(DIALECT), n))
    return checks


# Conditional aggregates with distinct conditions one query may hold: their sub-cells split a cell
# into up to 2^n parts, each checked (below).
MAX_CONDITIONS = 6


def _hidden_counts(checks: Sequence[UnitCheck], actives: Sequence[str]) -> tuple[list[exp.Expr], list[SubCheck]]:
    """The hidden count columns: each dataset's units in the cell, then in each sub-cell (rows
    where an ``actives`` predicate holds) and its complement, and, with two conditions or more, in
    each part of the cell they split it into (rows where each predicate holds or not): two
    sub-cells that each pass (``age >= 37`` and ``age >= 38``) differ by the rows of one part, so
    every part must pass too, or their difference is one unit's value."""
    if len(actives) > MAX_CONDITIONS:
        raise query_refusal(
            f"the query has {len(actives)} conditional aggregates with different conditions; at most "
            f"{MAX_CONDITIONS} are released in one query (each combination of their conditions is a "
            "part of the cell that must pass the rules): split the query"
        )
    hidden: list[exp.Expr] = [_parse_alias(_distinct_units(c, None), c.column) for c in checks]
    subs: list[SubCheck] = []
    for i, pred in enumerate(actives):
        for j, c in enumerate(checks):
            inside, outside = f"__sr_sub_{i}_{j}_in", f"__sr_sub_{i}_{j}_out"
            hidden.append(_parse_alias(_distinct_units(c, pred), inside))
            hidden.append(_parse_alias(_distinct_units(c, f"NOT {pred}"), outside))
            subs.append(SubCheck(inside, outside, j))
    if len(actives) >= 2:
        for p, signs in enumerate(itertools.product((True, False), repeat=len(actives))):
            part = " AND ".join(pred if sign else f"NOT {pred}" for pred, sign in zip(actives, signs, strict=True))
            for j, c in enumerate(checks):
                name = f"__sr_part_{p}_{j}"
                hidden.append(_parse_alias(_distinct_units(c, part), name))
                subs.append(SubCheck(name, name, j))
    return hidden, subs


def _distinct_units(check: UnitCheck, predicate: str | None) -> str:
    conds = [c for c in (check.condition, predicate) if c]
    where = f" FILTER (WHERE {' AND '.join(conds)})" if conds else ""
    return f"COUNT(DISTINCT {check.expression}){where}"


def _parse_alias(sql: str, name: str) -> exp.Expr:
    return exp.alias_(sqlglot.parse_one(sql, read=DIALECT), name, quoted=True)


def _make_total(tree: exp.Select) -> None:
    """Every condition and group key of the outer query made total (the select list is done apart)."""
    for key in ("where", "having"):
        clause = tree.args.get(key)
        if clause is not None:
            clause.set("this", total(clause.this))
    group = tree.args.get("group")
    if group is not None:
        group.set("expressions", [total(g) for g in group.expressions])
    for join in tree.args.get("joins") or []:
        on = join.args.get("on")
        if on is not None:
            join.set("on", total(on))


def _group_sources(r: Resolved) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per group output column that outputs an input column as is: the (dataset, column) pairs it
    shows (one per UNION ALL branch). Group outputs computed by an expression are absent."""
    by_alias = {s.alias: s for s in r.sources}
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for e, name in zip(r.tree.expressions, r.names, strict=True):
        if name not in r.group_names:
            continue
        body = e.this if isinstance(e, exp.Alias) else e
        src = by_alias.get(body.table) if isinstance(body, exp.Column) else None
        if src is None:
            continue
        assert isinstance(body, exp.Column)
        if src.kind == "table":
            out[name] = ((src.branches[0].qualified, body.name),)
            continue
        pairs = []
        for br in src.branches:
            projection = expanded_projections(br)[src.columns.index(body.name)]
            inner = projection.this if isinstance(projection, exp.Alias) else projection
            if not isinstance(inner, exp.Column):
                break
            pairs.append((br.qualified, inner.name))
        else:
            out[name] = tuple(pairs)
    return out


def _refuse_grouping_by_units(r: Resolved, by_name: Mapping[str, InputSpec]) -> None:
    """Grouping by a privacy unit (or an expression of it) makes every cell one unit: all would be
    suppressed, and the suppressed list would disclose every identifier. Refuse it."""
    by_alias = {s.alias: s for s in r.sources}
    for g in r.groups:
        for col in [g] if isinstance(g, exp.Column) else list(g.find_all(exp.Column)):
            src = by_alias.get(col.table)
            if src is None:
                continue
            for br in src.branches:
                unit = by_name[br.qualified].privacy_unit
                if src.kind == "union":
                    # The outer name may rename the unit: look at what the branch projects into it.
                    underlying = set(projected_columns(src, br, col.name))
                else:
                    underlying = {col.name}
                if unit is not None and unit in underlying:
                    raise query_refusal(
                        f"GROUP BY {col.name} groups by the privacy unit of {br.qualified}: every cell would "
                        "hold one unit. Group by a dimension (e.g. a segment, region or age band) instead",
                        dataset=br.qualified,
                        column=col.name,
                        rule="privacy_unit",
                    )


def replace_table(table: exp.Table, engine_name: str, alias: str) -> None:
    table.set("db", None)
    table.set("catalog", None)
    table.set("this", exp.to_identifier(engine_name, quoted=True))
    table.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))


def order_sql(relation: str, order: Sequence[OrderKey], limit: int | None) -> str:
    """SQL applying ORDER BY/LIMIT to released rows held in ``relation``."""
    sql = f"SELECT * FROM {exp.to_identifier(relation, quoted=True).sql(DIALECT)}"
    if order:
        parts = []
        for k in order:
            p = exp.to_identifier(k.column, quoted=True).sql(DIALECT) + (" DESC" if k.descending else " ASC")
            if k.nulls_first is not None:
                p += " NULLS FIRST" if k.nulls_first else " NULLS LAST"
            parts.append(p)
        sql += " ORDER BY " + ", ".join(parts)
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql
