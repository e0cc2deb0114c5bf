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

DIALECT = "duckdb"
RESERVED_PREFIX = "__sr_"
ROW_ID = "__sr_row"  # per-row id the enclave adds to inputs without a declared privacy unit
UNION_UNIT = "__sr_unit"
# Boolean column a party adds to its sealed stream when it applies a filter itself: True marks a
# padding row (it hides how many rows matched), which the enclave drops before anything reads it.
PAD_COLUMN = "__sr_pad"

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
    """A hidden per-cell count of distinct privacy units for one FROM item."""

    column: str  # hidden output column name
    datasets: tuple[str, ...]  # party.dataset values counted by this check
    unit: str  # human description, e.g. "customer_id" or "rows"
    expression: str = ""  # the unit expression in the compiled query (DuckDB SQL)


@dataclass(frozen=True)
class CompiledStage:
    """What the enclave runs: an aggregate query with hidden unit counts, then order/limit."""

    aggregate_sql: str
    output_columns: tuple[str, ...]
    group_columns: tuple[str, ...]
    unit_checks: tuple[UnitCheck, ...]
    order_by: tuple[OrderKey, ...]
    limit: int | None
    sum_arguments: tuple[str, ...] = ()  # compiled SQL of every SUM(...) and AVG(...) argument in the outputs
    uses: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)  # see column_uses


@dataclass(frozen=True)
class InputSpec:
    """The enclave's view of one input: which engine table holds it and its privacy unit."""

    qualified: str
    table: str
    columns: tuple[str, ...]
    privacy_unit: str | None


# --------------------------------------------------------------------------------------------
# parsing and resolution


def _parse(sql: str) -> exp.Select:
    if not isinstance(sql, str) or not sql.strip():
        raise query_refusal("the query is empty: write one SELECT statement")
    try:
        statements = [s for s in sqlglot.parse(sql, read=DIALECT) if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" near line {first.get('line')}, column {first.get('col')}" if first else ""
        raise query_refusal(
            f"the query does not parse as SQL{where}: {first.get('description', 'syntax error')}"
        ) from None
    if len(statements) != 1:
        raise query_refusal(f"send exactly one SELECT statement (got {len(statements)})")
    tree = statements[0]
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


def _union_selects(node: exp.Expression, alias: str) -> list[exp.Select]:
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
    selects = _union_selects(inner, alias)
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


def _from_items(tree: exp.Select) -> list[exp.Expression]:
    """The FROM item and every JOIN item, in order."""
    frm = tree.args.get("from_")
    if frm is None:
        raise query_refusal("the query has no FROM clause; name party datasets as party.dataset")
    return [frm.this, *(join.this for join in tree.args.get("joins") or [])]


def _sources(
    tree: exp.Select, schemas: Mapping[str, Sequence[str]], hidden: Mapping[str, Sequence[str]]
) -> list[Source]:
    items = _from_items(tree)[:1]
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
    columns (:func:`resolve`): what :func:`analyze`, :func:`pushdown`, :func:`compile_stage` and
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
    sql: str, schemas: Mapping[str, Sequence[str]], hidden: Mapping[str, Sequence[str]] | None = None
) -> Resolved:
    """Parse, check and resolve ``sql``. ``hidden``: per dataset, columns that exist but that ``*``
    does not expand to (the enclave's view of filter-only columns, which it never receives)."""
    tree = _parse(sql)
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


_CONDITIONS = (exp.Predicate, exp.Connector, exp.Not)


def _use_of(col: exp.Column) -> str:
    """How the query uses one column reference: join, filter, group, or aggregate:<name>.

    A column inside an aggregate but in a condition (``COUNT(CASE WHEN key = 42 THEN 1 END)``,
    ``SUM(amount > 100)``) is a *filter* use, not an aggregation: otherwise conditional aggregates
    would test join keys or measures that the owner allows only to be joined or summed.
    """
    if any(isinstance(a, exp.AggFunc) for a in _ancestors(col)):
        child: exp.Expr = col
        for a in _ancestors(col):
            if isinstance(a, exp.AggFunc):
                break
            if isinstance(a, _CONDITIONS) or (isinstance(a, exp.If) and a.this is child):
                return "filter"
            child = a
    for a in _ancestors(col):
        if isinstance(a, exp.AggFunc):
            name = POLICY_AGGREGATE_NAMES.get(type(a), type(a).__name__.lower())
            if isinstance(a, exp.Count) and isinstance(a.this, exp.Distinct):
                name = "count_distinct"
            return f"aggregate:{name}"
    for a in _ancestors(col):
        if isinstance(a, exp.Join):
            return "join"
        if isinstance(a, exp.Where):
            return "filter"
    return "group"  # select list, GROUP BY, HAVING or ORDER BY outside an aggregate: output/grouping


def column_uses(r: Resolved) -> dict[str, dict[str, frozenset[str]]]:
    """For each dataset and column the query reads, the set of ways it is used.

    Uses are ``join``, ``filter``, ``group`` (grouped by or output as a group key) and
    ``aggregate:<count|count_distinct|sum|avg|min|max|var|stddev>``. A column of a UNION ALL is
    charged to the dataset columns each branch projects into it; a branch's own WHERE is a filter.
    """
    by_alias = {s.alias: s for s in r.sources}
    out: dict[str, dict[str, set[str]]] = {}

    def add(qualified: str, column: str, use: str) -> None:
        out.setdefault(qualified, {}).setdefault(column, set()).add(use)

    for node in _outer_nodes(r.tree):
        cols = [node] if isinstance(node, exp.Column) else list(node.find_all(exp.Column))
        for col in cols:
            src = by_alias.get(col.table) if col.table else None
            if src is None:
                continue  # a reference to an output alias
            use = _use_of(col)
            if src.kind == "table":
                add(src.branches[0].qualified, col.name, use)
                continue
            i = src.columns.index(col.name)
            for br in src.branches:
                proj = expanded_projections(br)[i]
                for c in [proj] if isinstance(proj, exp.Column) else list(proj.find_all(exp.Column)):
                    add(br.qualified, c.name, use)
    for src in r.sources:
        for br in src.branches:
            where = br.select.args.get("where") if br.select is not None else None
            if where is not None:
                for c in where.find_all(exp.Column):
                    add(br.qualified, c.name, "filter")
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
    items = _from_items(residual)
    for n, k in cleared:
        item = items[n]
        assert isinstance(item, exp.Subquery)
        _union_selects(item.this, item.alias)[k].set("where", None)
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


def analyze(sql: str, schemas: Mapping[str, Sequence[str]]) -> Analysis:
    """Check that ``sql`` is in Sealroom's SQL surface and learn what it reads.

    ``schemas`` maps ``party.dataset`` to its column names. Raises InvalidQueryError.
    ``needed_columns`` are what each party must send for the residual query (the filters it applies
    itself are not part of it); ``uses`` are those of the full query, pushed filters included.
    """
    r = resolve(sql, schemas)
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
    columns, plus :data:`ROW_ID` where the input declares no privacy unit. Adds one hidden
    ``COUNT(DISTINCT unit)`` per FROM item and strips ORDER BY/LIMIT (applied to released rows only).
    """
    by_name = {i.qualified: i for i in inputs}
    schemas = {i.qualified: list(i.columns) for i in inputs}
    r = resolve(sql, schemas)
    _refuse_grouping_by_units(r, by_name)
    uses = column_uses(r)
    tree = r.tree
    checks: list[UnitCheck] = []
    hidden: list[exp.Expr] = []
    for n, src in enumerate(r.sources):
        if src.kind == "table":
            spec = by_name[src.branches[0].qualified]
            _replace_table(src.branches[0].table, spec.table, src.alias)
            unit_col = spec.privacy_unit or ROW_ID
            unit_expr: exp.Expression = exp.column(unit_col, table=src.alias, quoted=True)
            unit_desc = spec.privacy_unit or "rows"
        else:
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
                br.select.set("expressions", [*kept, exp.alias_(unit, UNION_UNIT, quoted=True)])
                _replace_table(br.table, spec.table, br.table.alias_or_name)
            unit_expr = exp.column(UNION_UNIT, table=src.alias, quoted=True)
            units = sorted({by_name[b.qualified].privacy_unit or "rows" for b in src.branches})
            unit_desc = " / ".join(units)
        name = f"__sr_units_{n}"
        hidden.append(exp.alias_(exp.Count(this=exp.Distinct(expressions=[unit_expr])), name, quoted=True))
        checks.append(UnitCheck(name, tuple(b.qualified for b in src.branches), unit_desc, unit_expr.sql(DIALECT)))
    outputs = []
    for e, out in zip(tree.expressions, r.names, strict=True):
        body = e.this if isinstance(e, exp.Alias) else e
        outputs.append(exp.alias_(body.copy(), out, quoted=True))
    sums = []
    for o in outputs:
        # AVG next to COUNT reveals the SUM, so AVG arguments fall under the dominance rule too.
        for agg in [*o.find_all(exp.Sum), *o.find_all(exp.Avg)]:
            arg = agg.this.sql(DIALECT)
            if arg not in sums:
                sums.append(arg)
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
    )


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
                    proj = expanded_projections(br)[src.columns.index(col.name)]
                    underlying = {
                        c.name for c in ([proj] if isinstance(proj, exp.Column) else proj.find_all(exp.Column))
                    }
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


def _replace_table(table: exp.Table, engine_name: str, alias: str) -> None:
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
