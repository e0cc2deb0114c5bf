"""Resolution of an analyst's query: parse it, check it against Sealroom's SQL surface, resolve every
column against the datasets' columns (:func:`resolve`) and derive how each dataset column is used
(:func:`column_uses`).

This is where :mod:`sealroom.planning.sql` (analysis, filter pushdown, the enclave's compilation)
and :mod:`sealroom.planning.mpc_sql` (MPC stages) start: the planner, the enclave and each party
resolve a plan's SQL with this same code, so they refuse the same queries and agree on what a query
reads and how.

SQL surface: SELECT with COUNT(*), COUNT(col), COUNT(DISTINCT col), SUM, AVG, MIN, MAX,
VAR/STDDEV (samp, pop); FROM ``party.dataset`` items joined by inner equi-joins, or a subquery that
is a UNION ALL of ``SELECT ... FROM party.dataset [WHERE ...]`` branches; WHERE; GROUP BY; HAVING;
ORDER BY and LIMIT on the released output. Refusals are :class:`InvalidQueryError` saying what to
change. Messages may quote the analyst's own SQL, never party data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from sealroom.errors import InvalidQueryError
from sealroom.planning.expressions import UseWalker
from sealroom.planning.limits import DEFAULT_LIMITS, QueryLimits, check_sql_text, check_tree

DIALECT = "duckdb"
# Prefix of the columns Sealroom adds (ROW_ID, UNION_UNIT, PAD_COLUMN and the hidden unit counts of
# sealroom.planning.sql): a column the analyst's query names may not start with it.
RESERVED_PREFIX = "__sr_"

ALLOWED_AGGREGATES: dict[type, str] = {
    exp.Count: "COUNT",
    exp.Sum: "SUM",
    exp.Avg: "AVG",
    exp.Min: "MIN",
    exp.Max: "MAX",
    exp.Variance: "VAR_SAMP",
    exp.VariancePop: "VAR_POP",
    exp.Stddev: "STDDEV",
    exp.StddevSamp: "STDDEV_SAMP",
    exp.StddevPop: "STDDEV_POP",
}
# The names owners use for aggregates in their policies (sealroom.policy.MEASURE_AGGREGATES).
POLICY_AGGREGATE_NAMES: dict[type, str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Min: "min",
    exp.Max: "max",
    exp.Variance: "var",
    exp.VariancePop: "var",
    exp.Stddev: "stddev",
    exp.StddevSamp: "stddev",
    exp.StddevPop: "stddev",
}
SUPPORTED_AGGREGATES_TEXT = (
    "COUNT(*), COUNT(col), COUNT(DISTINCT col), SUM, AVG, MIN, MAX, VAR_SAMP, VAR_POP, STDDEV_SAMP, STDDEV_POP"
)


def query_refusal(message: str, **details: object) -> InvalidQueryError:
    """A refusal of the query (details without None values)."""
    return InvalidQueryError(message, details={k: v for k, v in details.items() if v is not None})


@dataclass
class Branch:
    """One dataset read by a FROM item (a table item has one; a UNION ALL item one per branch)."""

    qualified: str  # party.dataset
    table: exp.Table
    select: exp.Select | None  # the UNION ALL branch, None for a plain table item
    columns: list[str]  # columns available in the dataset (the schema as the caller knows it)
    star: list[str] = field(default_factory=list)  # what ``*`` expands to (``columns`` unless some are filter-only)


@dataclass
class Source:
    alias: str
    kind: str  # "table" | "union"
    branches: list[Branch]
    columns: list[str]  # columns visible to the outer query under this alias
    node: exp.Expression  # the FROM/JOIN item
    needed: list[str] = field(default_factory=list)  # outer-query columns used, in first-use order


@dataclass(frozen=True)
class OrderKey:
    column: str
    descending: bool
    nulls_first: bool | None


# --------------------------------------------------------------------------------------------
# parsing and resolution


def parse_query(sql: str, limits: QueryLimits = DEFAULT_LIMITS) -> exp.Select:
    """The one SELECT statement of ``sql``, within ``limits`` (text measured before the parse, the
    tree right after it): every component parses an analyst's SQL through here."""
    if not isinstance(sql, str) or not sql.strip():
        raise query_refusal("the query is empty: write one SELECT statement")
    check_sql_text(sql, limits)
    try:
        statements = [s for s in sqlglot.parse(sql, read=DIALECT) if s is not None]
    except RecursionError:
        raise query_refusal(
            f"the query nests too deeply to parse; stay within max_nesting_depth = {limits.max_nesting_depth}",
            limit="max_nesting_depth",
        ) from None
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" near line {first.get('line')}, column {first.get('col')}" if first else ""
        raise query_refusal(
            f"the query does not parse as SQL{where}: {first.get('description', 'syntax error')}"
        ) from None
    if len(statements) != 1:
        raise query_refusal(f"send exactly one SELECT statement (got {len(statements)})")
    tree = statements[0]
    check_tree(tree, limits)
    if isinstance(tree, exp.Union | exp.Intersect | exp.Except):
        raise query_refusal(
            "a set operation at the top level would combine row sets; put the UNION ALL of datasets in a "
            "subquery in FROM and aggregate over it, e.g. SELECT d, COUNT(*) FROM (SELECT * FROM a.t UNION "
            "ALL SELECT * FROM b.t) u GROUP BY d"
        )
    if not isinstance(tree, exp.Select):
        raise query_refusal(f"only SELECT queries are run (got {tree.key.upper()}); Sealroom never modifies data")
    return tree


def _check_common(select: exp.Select, *, where: str) -> None:
    if select.args.get("with_") or select.args.get("with"):
        raise query_refusal(f"WITH (common table expressions) is not supported {where}; inline the subquery")
    for node in select.find_all(exp.Window):
        raise query_refusal(f"window functions are not supported {where}: {node.sql(DIALECT)}")
    if select.args.get("distinct"):
        raise query_refusal(f"SELECT DISTINCT is not supported {where}; use GROUP BY and an aggregate")
    for key in ("offset", "qualify", "laterals", "pivots"):
        if select.args.get(key):
            raise query_refusal(f"{key.upper()} is not supported {where}")


def _dataset_of(table: exp.Table, schemas: Mapping[str, Sequence[str]]) -> str:
    if table.args.get("catalog") is not None or not table.db:
        raise query_refusal(
            f"{table.sql(DIALECT)} does not name a party dataset; write party.dataset (e.g. bank_a.loans)",
            table=table.sql(DIALECT),
        )
    qualified = f"{table.db}.{table.name}"
    if qualified not in schemas:
        known = ", ".join(sorted(schemas)) or "none"
        raise query_refusal(f"unknown dataset {qualified}; registered datasets: {known}", dataset=qualified)
    return qualified


def _output_name(e: exp.Expression) -> str:
    if isinstance(e, exp.Alias):
        return e.alias
    if isinstance(e, exp.Column):
        return e.name
    # Without table qualifiers, so the planner (analyst's text) and the enclave (the normalised,
    # qualified SQL of the plan) name an unaliased output the same way.
    bare = e.copy()
    for c in bare.find_all(exp.Column):
        c.set("table", None)
    return bare.sql(DIALECT).lower()


def union_selects(node: exp.Expression, alias: str) -> list[exp.Select]:
    """The SELECT branches of a UNION ALL, left to right."""
    selects: list[exp.Select] = []

    def flatten(n: exp.Expression) -> None:
        if isinstance(n, exp.Union):
            if n.args.get("distinct"):
                raise query_refusal("use UNION ALL, not UNION: duplicates across parties are real rows")
            flatten(n.this)
            flatten(n.expression)
        elif isinstance(n, exp.Select):
            selects.append(n)
        else:
            raise query_refusal("a subquery in FROM must be a UNION ALL of SELECTs from party datasets", subquery=alias)

    flatten(node)
    return selects


def _branch_source(
    item: exp.Subquery, schemas: Mapping[str, Sequence[str]], hidden: Mapping[str, Sequence[str]]
) -> Source:
    alias = item.alias
    inner = item.this
    if not alias:
        raise query_refusal("a subquery in FROM needs an alias, e.g. (SELECT ... UNION ALL SELECT ...) AS u")
    selects = union_selects(inner, alias)
    if isinstance(inner, exp.Select):
        raise query_refusal(
            "a subquery in FROM must be a UNION ALL of datasets; put filters in the outer WHERE",
            subquery=alias,
        )
    branches: list[Branch] = []
    out_names: list[str] | None = None
    for sel in selects:
        _check_common(sel, where="inside the UNION ALL")
        for key in ("joins", "group", "having", "order", "limit"):
            if sel.args.get(key):
                raise query_refusal(f"{key.upper()} is not supported inside the UNION ALL {alias}; apply it outside")
        if any(sel.find_all(exp.AggFunc)):
            raise query_refusal(f"aggregates inside the UNION ALL {alias} are not supported; aggregate outside it")
        if any(n is not sel for n in sel.find_all(exp.Select, exp.Subquery)):
            raise query_refusal(f"subqueries inside the UNION ALL {alias} are not supported", subquery=alias)
        frm = sel.args.get("from_")
        if frm is None or not isinstance(frm.this, exp.Table):
            raise query_refusal(f"each branch of the UNION ALL {alias} must read one party dataset")
        qualified = _dataset_of(frm.this, schemas)
        cols = list(schemas[qualified])
        names: list[str] = []
        for proj in sel.expressions:
            if isinstance(proj, exp.Star):
                names.extend(cols)
            else:
                names.append(_output_name(proj))
        if out_names is None:
            out_names = names
        elif names != out_names:
            raise query_refusal(
                f"the branches of the UNION ALL {alias} do not have the same columns; select the same "
                "columns, in the same order, from each dataset",
                subquery=alias,
            )
        extra = [c for c in hidden.get(qualified, ()) if c not in cols]
        branches.append(Branch(qualified, frm.this, sel, cols + extra, cols))
    assert out_names is not None
    return Source(alias, "union", branches, out_names, item)


def from_items(tree: exp.Select) -> list[exp.Expression]:
    """The FROM item and every JOIN item, in order."""
    frm = tree.args.get("from_")
    if frm is None:
        raise query_refusal("the query has no FROM clause; name party datasets as party.dataset")
    return [frm.this, *(join.this for join in tree.args.get("joins") or [])]


def _sources(
    tree: exp.Select, schemas: Mapping[str, Sequence[str]], hidden: Mapping[str, Sequence[str]]
) -> list[Source]:
    items = from_items(tree)[:1]
    for join in tree.args.get("joins") or []:
        side = (join.side or "").upper()
        kind = (join.kind or "").upper()
        if side or kind not in ("", "INNER"):
            raise query_refusal(
                f"only inner joins are supported (got {' '.join(x for x in (side, kind) if x)} JOIN); "
                "an outer or cross join would expose rows that have no match",
            )
        if join.args.get("using"):
            raise query_refusal("JOIN ... USING is not supported; write JOIN ... ON a.key = b.key")
        if join.args.get("on") is None:
            raise query_refusal("every JOIN needs ON a.key = b.key (an equality between join-key columns)")
        items.append(join.this)
    sources: list[Source] = []
    for item in items:
        if isinstance(item, exp.Table):
            qualified = _dataset_of(item, schemas)
            alias = item.alias_or_name
            cols = list(schemas[qualified])
            cols += [c for c in hidden.get(qualified, ()) if c not in cols]
            sources.append(Source(alias, "table", [Branch(qualified, item, None, cols, cols)], cols, item))
        elif isinstance(item, exp.Subquery):
            sources.append(_branch_source(item, schemas, hidden))
        else:
            raise query_refusal(
                "FROM may name only party datasets (party.dataset), joined with inner joins, or a "
                f"UNION ALL of them in a subquery (got {item.sql(DIALECT)[:60]})"
            )
    seen: set[str] = set()
    for s in sources:
        if s.alias in seen:
            raise query_refusal(f"the name {s.alias} is used twice in FROM; give each dataset its own alias")
        seen.add(s.alias)
    return sources


def _outer_nodes(tree: exp.Select) -> list[exp.Expression]:
    """Parts of the outer query that may hold column references (not the FROM subqueries)."""
    nodes: list[exp.Expression] = list(tree.expressions)
    for key in ("where", "group", "having", "order"):
        if tree.args.get(key) is not None:
            nodes.append(tree.args[key])
    for join in tree.args.get("joins") or []:
        nodes.append(join.args["on"])
    return nodes


def _resolve_columns(tree: exp.Select, sources: list[Source]) -> None:
    by_alias = {s.alias: s for s in sources}
    output_aliases = {e.alias for e in tree.expressions if isinstance(e, exp.Alias)}
    for node in _outer_nodes(tree):
        for sub in node.find_all(exp.Subquery, exp.Select):
            if sub is not node:
                raise query_refusal("subqueries are supported only as a UNION ALL of datasets in FROM")
        for col in list(node.find_all(exp.Column)):
            name = col.name
            if name.startswith(RESERVED_PREFIX):
                raise query_refusal(f"column names starting with {RESERVED_PREFIX} are reserved", column=name)
            if isinstance(col.this, exp.Star):
                raise query_refusal("SELECT t.* would output rows; select aggregates and grouped dimensions")
            if col.args.get("db") is not None:
                raise query_refusal(
                    f"write columns as alias.column, not {col.sql(DIALECT)}; give the dataset an alias in FROM"
                )
            if col.table:
                src = by_alias.get(col.table)
                if src is None:
                    raise query_refusal(
                        f"{col.sql(DIALECT)} refers to {col.table}, which is not in FROM "
                        f"(FROM names: {', '.join(by_alias)})"
                    )
                if name not in src.columns:
                    raise query_refusal(
                        f"{src.alias} has no column {name}; its columns are: {', '.join(src.columns)}",
                        column=name,
                    )
            else:
                owners = [s for s in sources if name in s.columns]
                refers_to_output = any(isinstance(a, exp.Order | exp.Having | exp.Group) for a in _ancestors(col))
                if not owners:
                    if refers_to_output and name in output_aliases:
                        continue  # refers to an output alias
                    raise query_refusal(
                        f"no dataset in FROM has a column {name}",
                        column=name,
                    )
                if len(owners) > 1:
                    raise query_refusal(
                        f"column {name} is ambiguous: it exists in {', '.join(s.alias for s in owners)}; "
                        f"write alias.{name}",
                        column=name,
                    )
                src = owners[0]
                col.set("table", exp.to_identifier(src.alias))
            if name not in src.needed:
                src.needed.append(name)


def _ancestors(node: exp.Expression) -> list[exp.Expr]:
    out = []
    p = node.parent
    while p is not None:
        out.append(p)
        p = p.parent
    return out


def _check_join_conditions(tree: exp.Select) -> None:
    for join in tree.args.get("joins") or []:
        cond = join.args["on"]
        parts = list(cond.flatten()) if isinstance(cond, exp.And) else [cond]
        for part in parts:
            if not (
                isinstance(part, exp.EQ)
                and isinstance(part.this, exp.Column)
                and isinstance(part.expression, exp.Column)
                and part.this.table != part.expression.table
            ):
                raise query_refusal(
                    f"join conditions must be equalities between key columns of two datasets "
                    f"(a.key = b.key); got {part.sql(DIALECT)}"
                )


def _aggregates_in(node: exp.Expression) -> list[exp.AggFunc]:
    return list(node.find_all(exp.AggFunc))


def _check_aggregates(tree: exp.Select) -> list[str]:
    used: list[str] = []
    for key in ("where", "group"):
        part = tree.args.get(key)
        if part is not None and _aggregates_in(part):
            raise query_refusal(f"aggregates are not allowed in {key.upper()}; use HAVING")
    for join in tree.args.get("joins") or []:
        if _aggregates_in(join.args["on"]):
            raise query_refusal("aggregates are not allowed in JOIN conditions")
    nodes = list(tree.expressions) + [tree.args[k] for k in ("having", "order") if tree.args.get(k)]
    for node in nodes:
        for flt in node.find_all(exp.Filter):
            raise query_refusal(
                f"FILTER (WHERE ...) on an aggregate is not supported: {flt.sql(DIALECT)}; write the condition "
                "in a CASE, e.g. SUM(CASE WHEN cond THEN x END) or COUNT(CASE WHEN cond THEN 1 END)"
            )
        for agg in _aggregates_in(node):
            name = ALLOWED_AGGREGATES.get(type(agg))
            if name is None:
                raise query_refusal(
                    f"aggregate {agg.sql(DIALECT)} is not supported; supported: {SUPPORTED_AGGREGATES_TEXT}",
                    aggregate=type(agg).__name__.upper(),
                )
            inner_aggs = [a for a in agg.find_all(exp.AggFunc) if a is not agg]
            if inner_aggs:
                raise query_refusal(f"nested aggregates are not supported: {agg.sql(DIALECT)}")
            if isinstance(agg, exp.Count) and isinstance(agg.this, exp.Distinct):
                name = "COUNT(DISTINCT)"
            if name not in used:
                used.append(name)
    return used


def _group_exprs(tree: exp.Select) -> list[exp.Expression]:
    group = tree.args.get("group")
    if group is None:
        return []
    if (
        group.args.get("rollup")
        or group.args.get("cube")
        or group.args.get("grouping_sets")
        or any(isinstance(g, exp.Rollup | exp.Cube | exp.GroupingSets) for g in group.expressions)
    ):
        raise query_refusal(
            "ROLLUP, CUBE and GROUPING SETS are not supported: totals next to their parts could reveal "
            "suppressed cells; run separate queries"
        )
    out: list[exp.Expression] = []
    for g in group.expressions:
        if isinstance(g, exp.Literal) and not g.is_string:
            idx = int(g.this)
            if not 1 <= idx <= len(tree.expressions):
                raise query_refusal(f"GROUP BY {idx} is out of range: the query has {len(tree.expressions)} outputs")
            target = tree.expressions[idx - 1]
            target = target.this if isinstance(target, exp.Alias) else target
            if _aggregates_in(target):
                raise query_refusal(f"GROUP BY {idx} refers to an aggregate")
            out.append(target.copy())
        elif (
            isinstance(g, exp.Column)
            and not g.table
            and any(isinstance(e, exp.Alias) and e.alias == g.name for e in tree.expressions)
        ):
            target = next(e for e in tree.expressions if isinstance(e, exp.Alias) and e.alias == g.name)
            out.append(target.this.copy())
        else:
            out.append(g)
    return out


def _is_grouped(e: exp.Expression, groups_sql: set[str]) -> bool:
    """True when every column in ``e`` outside aggregates is covered by a GROUP BY expression."""
    if e.sql(DIALECT) in groups_sql:
        return True
    if isinstance(e, exp.AggFunc):
        return True
    if isinstance(e, exp.Column):
        return False
    return all(_is_grouped(child, groups_sql) for child in e.iter_expressions())


def _outputs(tree: exp.Select, groups: list[exp.Expression], written: list[str]) -> tuple[list[str], list[str]]:
    groups_sql = {g.sql(DIALECT) for g in groups}
    names: list[str] = []
    group_names: list[str] = []
    has_agg = False
    for e, written_name in zip(tree.expressions, written, strict=True):
        if isinstance(e, exp.Star):
            raise query_refusal(
                "SELECT * would output rows; Sealroom releases only aggregates. Select dimensions you "
                "GROUP BY and aggregates such as COUNT(*), SUM(x), AVG(x)"
            )
        body = e.this if isinstance(e, exp.Alias) else e
        if _aggregates_in(body):
            has_agg = True
        if not _is_grouped(body, groups_sql):
            raise query_refusal(
                f"the output {body.sql(DIALECT)} would release row-level values: it is neither aggregated "
                "nor in GROUP BY. Aggregate it (e.g. SUM, AVG, COUNT) or add it to GROUP BY",
                output=_output_name(e),
            )
        name = written_name
        base, i = name, 2
        while name in names:
            name = f"{base}_{i}"
            i += 1
        names.append(name)
        if body.sql(DIALECT) in groups_sql:
            group_names.append(name)
    if not has_agg and not groups:
        raise query_refusal(
            "the query outputs rows, not aggregates; Sealroom releases only aggregates. Add an aggregate "
            "(COUNT(*), SUM(x), AVG(x)...) and GROUP BY the dimensions you want"
        )
    return names, group_names


def _order_and_limit(tree: exp.Select, names: list[str]) -> tuple[list[OrderKey], int | None]:
    keys: list[OrderKey] = []
    order = tree.args.get("order")
    if order is not None:
        by_sql = {}
        for e, n in zip(tree.expressions, names, strict=True):
            body = e.this if isinstance(e, exp.Alias) else e
            by_sql[body.sql(DIALECT)] = n
        for o in order.expressions:
            target = o.this
            name: str | None = None
            if isinstance(target, exp.Literal) and not target.is_string:
                idx = int(target.this)
                if 1 <= idx <= len(names):
                    name = names[idx - 1]
            elif isinstance(target, exp.Column) and not target.table and target.name in names:
                name = target.name
            else:
                name = by_sql.get(target.sql(DIALECT))
            if name is None:
                raise query_refusal(
                    f"ORDER BY {target.sql(DIALECT)} must refer to an output column (by name, position, or "
                    "the same expression); ordering applies to the released output only"
                )
            keys.append(OrderKey(name, bool(o.args.get("desc")), o.args.get("nulls_first")))
    limit: int | None = None
    lim = tree.args.get("limit")
    if lim is not None:
        value = lim.expression
        if not (isinstance(value, exp.Literal) and not value.is_string and str(value.this).isdigit()):
            raise query_refusal("LIMIT must be a non-negative integer literal")
        limit = int(value.this)
    return keys, limit


@dataclass
class Resolved:
    """A query parsed, checked against Sealroom's SQL surface and resolved against the datasets'
    columns (:func:`resolve`): what :func:`sealroom.planning.sql.analyze`,
    :func:`sealroom.planning.sql.pushdown`, :func:`sealroom.planning.sql.compile_stage` and
    :func:`sealroom.planning.mpc_sql.mpc_query` start from."""

    tree: exp.Select
    sources: list[Source]
    groups: list[exp.Expression]
    names: list[str]
    group_names: list[str]
    aggregates: list[str]
    order: list[OrderKey]
    limit: int | None


def resolve(
    sql: str,
    schemas: Mapping[str, Sequence[str]],
    hidden: Mapping[str, Sequence[str]] | None = None,
    *,
    limits: QueryLimits = DEFAULT_LIMITS,
) -> Resolved:
    """Parse, check and resolve ``sql``. ``hidden``: per dataset, columns that exist but that ``*``
    does not expand to (the enclave's view of filter-only columns, which it never receives)."""
    tree = parse_query(sql, limits)
    _check_common(tree, where="")
    sources = _sources(tree, schemas, hidden or {})
    written = [_output_name(e) for e in tree.expressions]  # names as the analyst wrote them
    _resolve_columns(tree, sources)
    _check_join_conditions(tree)
    aggregates = _check_aggregates(tree)
    groups = _group_exprs(tree)
    names, group_names = _outputs(tree, groups, written)
    order, limit = _order_and_limit(tree, names)
    return Resolved(tree, sources, groups, names, group_names, aggregates, order, limit)


def check_branch_column(branch: Branch, col: exp.Column) -> None:
    """A column inside a UNION ALL branch must be one of the branch dataset's own columns."""
    if isinstance(col.this, exp.Star) or col.args.get("db") is not None:
        raise query_refusal(f"write {col.sql(DIALECT)} as a plain column of {branch.qualified} in the UNION ALL")
    if col.table and col.table != branch.table.alias_or_name:
        raise query_refusal(f"{col.sql(DIALECT)} does not belong to {branch.qualified} in the UNION ALL")
    if col.name.startswith(RESERVED_PREFIX):
        raise query_refusal(f"column names starting with {RESERVED_PREFIX} are reserved", column=col.name)
    if col.name not in branch.columns:
        raise query_refusal(
            f"{branch.qualified} has no column {col.name}; its columns are: {', '.join(branch.columns)}",
            column=col.name,
            dataset=branch.qualified,
        )


def column_uses(r: Resolved) -> dict[str, dict[str, frozenset[str]]]:
    """For each dataset and column the query reads, the set of ways it is used.

    Outside aggregates: ``join`` (in a JOIN condition), ``filter`` (in WHERE, or a UNION ALL
    branch's own WHERE) and ``group`` (anywhere else: grouped by, output as a group key, in HAVING
    or ORDER BY). Inside an aggregate (:mod:`sealroom.planning.expressions`, which also refuses
    constants smuggled into an aggregate's value): ``aggregate:<count|count_distinct|sum|avg|min|
    max|var|stddev>`` for a column whose value reaches the aggregate, ``aggregate_filter`` for a
    column that selects or compares rows (a CASE/IF condition, FILTER (WHERE ...), or under a
    value-revealing function such as NULLIF, GREATEST, % or a cast to text: then also the
    aggregate's use), ``aggregate_combined`` for a column combined with another joined dataset's
    columns where that could weight single rows. A column of a UNION ALL is its branches'
    projections, inlined where it is used.
    """
    by_alias = {s.alias: s for s in r.sources}

    def leaves(col: exp.Column) -> list[tuple[str, exp.Expression]]:
        src = by_alias.get(col.table) if col.table else None
        if src is None:
            return []  # a reference to an output alias
        if src.kind == "table":
            return [(src.branches[0].qualified, col)]
        out: list[tuple[str, exp.Expression]] = []
        for br in src.branches:
            projection = expanded_projections(br)[src.columns.index(col.name)]
            out.append((br.qualified, projection.this if isinstance(projection, exp.Alias) else projection))
        return out

    walker = UseWalker(leaves, POLICY_AGGREGATE_NAMES)
    for node in _outer_nodes(r.tree):
        parent = node.parent
        context = "join" if isinstance(parent, exp.Join) else "filter" if isinstance(node, exp.Where) else "group"
        walker.walk(node, context)
    out: dict[str, dict[str, set[str]]] = {}
    for u in walker.uses:
        out.setdefault(u.dataset, {}).setdefault(u.column, set()).add(u.use)
    for src in r.sources:
        for br in src.branches:
            where = br.select.args.get("where") if br.select is not None else None
            if where is not None:
                for c in where.find_all(exp.Column):
                    out.setdefault(br.qualified, {}).setdefault(c.name, set()).add("filter")
    return {q: {c: frozenset(u) for c, u in cols.items()} for q, cols in out.items()}


def expanded_projections(branch: Branch) -> list[exp.Expression]:
    assert branch.select is not None
    out: list[exp.Expression] = []
    for proj in branch.select.expressions:
        if isinstance(proj, exp.Star):
            out.extend(exp.column(c) for c in branch.star)
        else:
            out.append(proj)
    return out


def projected_columns(src: Source, branch: Branch, column: str) -> list[str]:
    """The dataset columns that ``branch`` projects into the UNION ALL output ``column`` of ``src``
    (the column itself, the columns of an expression, or none for a constant)."""
    projection = expanded_projections(branch)[src.columns.index(column)]
    return [c.name for c in projection.find_all(exp.Column)]
