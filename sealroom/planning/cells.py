"""What the enclave adds to a stage's SQL so that one query cannot single out a unit: total
expressions and the sub-cells of conditional aggregates.

Security model: the enclave runs only SQL that :func:`sealroom.planning.sql.compile_stage` produced.
Two properties of that SQL are built here, independently of the planner's column-use checks
(defense in depth: they hold for any expression the planner lets through):

- **total expressions** (:func:`total`): no row can make the query fail. Every CAST becomes
  TRY_CAST, and every scalar expression that could raise (arithmetic that can overflow or divide
  by zero, function calls, comparisons that cast implicitly) is evaluated inside DuckDB's
  ``TRY(...)``, so an error becomes NULL for that row. The engine also turns division by zero after
  aggregation into NULL (``error_on_division_by_zero``). A query therefore succeeds or fails
  independently of any hidden value (an error oracle would otherwise read a value out of a
  suppressed cell).
- **sub-cells** (:func:`active_rows`): a conditional aggregate (``FILTER (WHERE c)``, or an
  argument with CASE/IF/NULLIF/COALESCE) reads only part of its cell: the rows where its argument is
  *structurally live* (for FILTER, rows where ``c`` holds; for a CASE, rows whose selected arm is
  not a NULL or 0 literal; for NULLIF(a, b), rows where a <> b). Those rows form a sub-cell and the
  cell's other rows its complement; the engine requires both to hold 0 or at least k units of each
  input, so the difference of two aggregates of one cell cannot isolate fewer than k units.

What it does not do: it does not decide what the structure of an expression *means* (an arm such as
``amount - amount`` is zero without being a literal); the planner refuses such arguments, and the
dominance rule, computed on each unit's contribution to the very argument, catches a lone unit
carrying a SUM.
"""

from __future__ import annotations

from typing import cast

from sqlglot import exp

# Nodes that cannot raise on their own (given operands that do not raise).
_SAFE = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Null,
    exp.Boolean,
    exp.Paren,
    exp.And,
    exp.Or,
    exp.Not,
    exp.Star,
    exp.TryCast,
    exp.Try,
    exp.DataType,
    exp.Alias,
    exp.Tuple,
    exp.Distinct,
)
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.Is)
_CONDITIONAL = (exp.Case, exp.If, exp.Nullif, exp.Coalesce)


def _has_aggregate(node: exp.Expression) -> bool:
    return any(isinstance(n, exp.AggFunc) for n in node.walk())


def _risky(node: exp.Expression) -> bool:
    """Can evaluating ``node`` (no aggregate inside) raise for some row?"""
    for n in node.walk():
        if isinstance(n, _COMPARISONS):
            # Column against column (a join equality) or against NULL: no implicit cast of a literal;
            # kept bare so that DuckDB still plans a hash join on it.
            sides = [n.this, n.expression]
            if all(isinstance(s, exp.Column | exp.Null) for s in sides):
                continue
            return True
        if not isinstance(n, _SAFE):
            return True
    return False


def _try_casts(node: exp.Expression) -> exp.Expression:
    def swap(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Cast) and not isinstance(n, exp.TryCast):
            return exp.TryCast(this=n.this, to=n.args["to"])
        return n

    return node.transform(swap, copy=False)


def total(node: exp.Expression) -> exp.Expression:
    """``node`` rewritten so that no row makes it raise: casts become TRY_CAST and every maximal
    scalar sub-expression that could raise is wrapped in TRY(...). Aggregates are kept (TRY may not
    contain one): their arguments and FILTER conditions are made total instead."""
    if isinstance(node, exp.Alias | exp.Where | exp.Ordered):
        node.set("this", total(node.this))
        return node
    if isinstance(node, exp.Distinct):
        node.set("expressions", [total(e) for e in node.expressions])
        return node
    if isinstance(node, exp.And | exp.Paren) and not _has_aggregate(node):
        # Conjuncts apart: a bare join equality stays bare next to a wrapped condition.
        for key in ("this", "expression"):
            child = node.args.get(key)
            if isinstance(child, exp.Expression):
                node.set(key, total(child))
        return node
    if not _has_aggregate(node):
        node = _try_casts(node)
        return exp.Try(this=node) if _risky(node) else node
    for key, value in list(node.args.items()):
        if isinstance(value, exp.Expression):
            node.set(key, total(value))
        elif isinstance(value, list):
            node.set(key, [total(v) if isinstance(v, exp.Expression) else v for v in value])
    return node


# --------------------------------------------------------------------------------------------
# sub-cells of conditional aggregates


def _is_dead_literal(node: exp.Expression) -> bool:
    """A NULL or numeric 0 literal (possibly negated, parenthesised or cast)."""
    while isinstance(node, exp.Paren | exp.Neg | exp.Cast | exp.TryCast | exp.Try):
        node = node.this
    if isinstance(node, exp.Null):
        return True
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return float(node.this) == 0.0
        except ValueError:
            return False
    return False


_TRUE = None  # "live on every row": no sub-cell


def _and(parts: list[exp.Expression | None]) -> exp.Expression | None:
    kept = [p for p in parts if p is not None]
    if not kept:
        return _TRUE
    return cast(exp.Expression, exp.and_(*kept, copy=False)) if len(kept) > 1 else kept[0]


def _or(parts: list[exp.Expression | None]) -> exp.Expression | None:
    kept = [p for p in parts if p is not None]
    if len(kept) < len(parts):
        return _TRUE
    return cast(exp.Expression, exp.or_(*kept, copy=False)) if len(kept) > 1 else kept[0]


def _bool(p: exp.Expression | None) -> exp.Expression:
    return exp.true() if p is None else exp.Paren(this=p)


def _live(node: exp.Expression) -> exp.Expression | None:
    """A predicate true on the rows where ``node`` is structurally live (not a NULL/0 literal arm),
    or None when it is live on every row."""
    if _is_dead_literal(node):
        return exp.false()
    if not any(isinstance(n, _CONDITIONAL) for n in node.walk()):
        return _TRUE
    if isinstance(node, exp.Paren | exp.Cast | exp.TryCast | exp.Try | exp.Neg):
        return _live(node.this)
    if isinstance(node, exp.Case):
        ifs = [exp.If(this=i.this.copy(), true=_bool(_live(i.args["true"]))) for i in node.args.get("ifs") or []]
        default = node.args.get("default")
        out = exp.Case(ifs=ifs, default=exp.false() if default is None else _bool(_live(default)))
        if node.this is not None:
            out.set("this", node.this.copy())
        return out
    if isinstance(node, exp.If):
        false = node.args.get("false")
        return exp.Case(
            ifs=[exp.If(this=node.this.copy(), true=_bool(_live(node.args["true"])))],
            default=exp.false() if false is None else _bool(_live(false)),
        )
    if isinstance(node, exp.Nullif):
        equal = exp.EQ(this=node.this.copy(), expression=node.expression.copy())
        return exp.Case(ifs=[exp.If(this=equal, true=exp.false())], default=_bool(_live(node.this)))
    if isinstance(node, exp.Coalesce):
        return _or([_live(a) for a in [node.this, *node.expressions]])
    children = [c for c in node.iter_expressions() if not isinstance(c, exp.DataType)]
    if isinstance(node, exp.Add | exp.Sub | exp.Or):
        return _or([_live(c) for c in children])
    # Products, quotients, functions: NULL or 0 in a conditional operand makes the whole dead
    # (close enough for a sub-cell: the complement is checked as well).
    return _and([_live(c) for c in children])


def active_rows(agg: exp.AggFunc) -> exp.Expression | None:
    """The rows a conditional aggregate reads (its sub-cell), as a predicate over the stage's rows,
    or None when the aggregate reads every row of its cell."""
    parts: list[exp.Expression | None] = []
    parent = agg.parent
    if isinstance(parent, exp.Filter):
        where = parent.expression
        parts.append(exp.Paren(this=(where.this if isinstance(where, exp.Where) else where).copy()))
    arg = agg.this
    if isinstance(arg, exp.Distinct):
        parts += [_live(e) for e in arg.expressions]
    elif isinstance(arg, exp.Expression) and not isinstance(arg, exp.Star):
        parts.append(_live(arg))
    return _and(parts)


def _is_constant(node: exp.Expression) -> bool:
    while isinstance(node, exp.Paren | exp.Neg | exp.Cast | exp.TryCast | exp.Try):
        node = node.this
    return isinstance(node, exp.Literal)


def _strip_constants(node: exp.Expression) -> exp.Expression:
    """A CASE/IF arm or COALESCE fallback that is a constant becomes NULL, an added constant 0."""
    if isinstance(node, exp.Case):
        for i in node.args.get("ifs") or []:
            if _is_constant(i.args["true"]):
                i.set("true", exp.null())
        default = node.args.get("default")
        if default is not None and _is_constant(default):
            node.set("default", exp.null())
    elif isinstance(node, exp.If):
        for key in ("true", "false"):
            arm = node.args.get(key)
            if arm is not None and _is_constant(arm):
                node.set(key, exp.null())
    elif isinstance(node, exp.Coalesce):
        node.set("expressions", [exp.null() if _is_constant(e) else e for e in node.expressions])
    elif isinstance(node, exp.Add | exp.Sub):
        for key in ("this", "expression"):
            if _is_constant(node.args[key]):
                node.set(key, exp.Literal.number(0))
    return node


def sum_argument(agg: exp.AggFunc) -> exp.Expression:
    """What one row adds to a SUM/AVG, as the dominance rule weighs it: the argument restricted to
    the FILTER's rows if any, with constants it could smuggle in taken out (a CASE arm or a
    COALESCE fallback that is a constant counts as NULL, an added constant as 0), so that a unit's
    share is that of its own measure values: ``SUM(CASE WHEN age = 37 THEN amount ELSE 1000 END)``
    is dominated by the one unit aged 37."""
    arg = agg.this.copy().transform(_strip_constants, copy=False)
    parent = agg.parent
    if isinstance(parent, exp.Filter):
        where = parent.expression
        cond = (where.this if isinstance(where, exp.Where) else where).copy()
        return exp.Case(ifs=[exp.If(this=cond, true=arg)])
    return arg


# --------------------------------------------------------------------------------------------
# expressions over aggregates


_KEEP_AS_IS = (exp.DataType, exp.Var, exp.Identifier, exp.Literal, exp.Null, exp.Boolean)


def post_aggregate(node: exp.Expression, prefix: str) -> tuple[exp.Expression, list[tuple[str, exp.Expression]]] | None:
    """Split an output that computes something that could raise *over* aggregates (``SUM(x) //
    COUNT(*)``, ``COUNT(*) * 9223372036854775807``): TRY may not contain an aggregate, so the
    aggregates (and the grouped expressions beside them) become hidden columns ``<prefix>N`` of the
    aggregate query, and the rest an expression over those columns, evaluated total in an outer
    query. Returns None when ``node`` needs no split (no aggregate, or nothing risky around them)."""
    if not _has_aggregate(node) or isinstance(node, exp.AggFunc | exp.Filter):
        return None
    leaves: list[tuple[str, exp.Expression]] = []

    def split(n: exp.Expression) -> exp.Expression:
        if isinstance(n, _KEEP_AS_IS):
            return n
        if isinstance(n, exp.AggFunc | exp.Filter) or not _has_aggregate(n):
            name = f"{prefix}{len(leaves)}"
            leaves.append((name, n.copy()))
            return exp.column(name, quoted=True)
        for key, value in list(n.args.items()):
            if isinstance(value, exp.Expression):
                n.set(key, split(value))
            elif isinstance(value, list):
                n.set(key, [split(v) if isinstance(v, exp.Expression) else v for v in value])
        return n

    outer = split(node.copy())
    if not _risky(outer) and not any(isinstance(n, exp.Cast) for n in outer.walk()):
        return None
    return total(outer), leaves
