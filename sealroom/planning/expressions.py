"""What an aggregate may compute: the uses of the columns inside an aggregate's argument, and the
constants it may not smuggle (threshold mode, hardened).

:func:`sealroom.planning.resolve.column_uses` walks every expression of a query through
:class:`UseWalker`, so the planner, every owner's agent and the enclave derive the same uses from
the same SQL and refuse the same queries (:func:`sealroom.planning.disclosure.check_uses` then
checks each use against the owner's role for the column).

Inside an aggregate, the argument's **value path** is the part whose value reaches the aggregate:
a column, parentheses, ``CAST(... AS DOUBLE)``, ``+ - *`` and unary minus between value-path nodes,
the THEN/ELSE arms of ``CASE`` and the arms of ``IF``, and the operands of ``COALESCE``
(for ``COUNT(DISTINCT ...)`` also its ``DISTINCT`` list). A column on the value path is used as
``aggregate:<name>`` (its value is summed, averaged, counted...). Everything else reveals a
comparison with a value:

- a column in a ``CASE``/``IF`` condition, a simple ``CASE x WHEN ...`` operand, or an aggregate's
  ``FILTER (WHERE ...)`` is an ``aggregate_filter`` use (a conditional aggregate: the column
  selects the rows the aggregate reads);
- a column under any other node on the value path (``NULLIF``, ``GREATEST``/``LEAST``, ``%``,
  ``//``, ``/``, ``floor``/``ceil``/``round``/``trunc``, ``abs``, ``sign``, comparisons, ``LIKE``,
  ``BETWEEN``, ``IN``, string and hash functions, casts to anything but DOUBLE, which round,
  overflow or turn a number into text) is used both as ``aggregate_filter`` and as
  ``aggregate:<name>``: the function compares the value with something, and its result still
  reaches the aggregate.

Columns of **several joined datasets** on one value path are also ``aggregate_combined`` uses,
except for ``+``/``-`` in ``SUM``, ``AVG`` and ``COUNT`` (``SUM(a.x + b.y)`` is ``SUM(a.x) +
SUM(b.y)`` over the same rows): a product with another party's column (``SUM(a.amount * b.w)``)
or ``MIN``/``MAX``/``VAR``/``STDDEV`` over a sum across datasets lets that party weight, offset or
zero out single rows of the other's, which neither k nor dominance on the other's rows sees. The
rows one dataset's NULLs leave out of ``SUM(a.x + b.y)`` are a sub-cell, the engine's matter.

**Constants.** On the value path of ``SUM``, ``AVG``, ``MIN``, ``MAX``, ``VAR*`` and ``STDDEV*``,
a constant (a literal, or any expression without a column) is refused (rule
``aggregate_constant``) unless it is ``NULL`` anywhere, or ``0`` as an arm of ``CASE``/``IF`` or an
operand of ``COALESCE``: ``SUM(CASE WHEN age = 37 THEN amount ELSE 1000 END)``, ``SUM(amount +
1000)``, ``SUM(amount * 2)`` and ``SUM(1)`` would shift a cell past its dominance rule or stand for
a count. ``COUNT(<any constant>)`` and ``COUNT(CASE WHEN c THEN 1 END)`` are allowed: a count does
not depend on the constant's value. In ``COUNT(DISTINCT ...)`` only ``NULL`` is allowed (``COUNT(
DISTINCT CASE WHEN c THEN 1 ELSE 2 END)`` would say whether any row of a cell matches ``c``).

Outside aggregates nothing changes: a column in WHERE is a ``filter`` use, in a JOIN condition a
``join`` use, and anywhere else (select list, GROUP BY, HAVING, ORDER BY, under any function) a
``group`` use, the strictest: the released group key reveals the whole expression.

A column of a ``UNION ALL`` subquery is its branches' projections, inlined where the column is
used: ``SUM(u.v)`` over ``SELECT amount + 1000 AS v FROM ...`` is ``SUM(amount + 1000)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlglot import exp

from sealroom.errors import InvalidQueryError

DIALECT = "duckdb"

# Aggregates whose result is (a function of) the values on their argument's value path.
VALUE_AGGREGATES = (
    exp.Sum,
    exp.Avg,
    exp.Min,
    exp.Max,
    exp.Variance,
    exp.VariancePop,
    exp.Stddev,
    exp.StddevSamp,
    exp.StddevPop,
)
# Aggregates that are sums over rows: a sum across datasets adds up each dataset's terms.
_LINEAR = (exp.Sum, exp.Avg, exp.Count)
# The one cast that keeps a number's value: any number fits a DOUBLE without an error, where a cast
# to an integer or DECIMAL(p, s) rounds (and can overflow) and a cast to text compares digits.
_VALUE_CASTS = frozenset({exp.DataType.Type.DOUBLE})

AGGREGATE_FILTER = "aggregate_filter"
AGGREGATE_COMBINED = "aggregate_combined"


@dataclass(frozen=True)
class ColumnUse:
    """One use of one dataset column: ``source`` is the FROM alias the query reads it through (a
    UNION ALL's columns all come through the subquery's alias)."""

    source: str
    dataset: str
    column: str
    use: str


# For a column of the outer query: (dataset, projection) per dataset it reads; projection is the
# column itself for a table item and the branch's expression for a UNION ALL (whose own columns
# belong to that branch's dataset). Empty for a reference to an output alias.
Leaves = Callable[[exp.Column], list[tuple[str, exp.Expression]]]


def aggregate_name(agg: exp.AggFunc, names: dict[type, str]) -> str:
    """The policy name of ``agg`` (``count_distinct`` for ``COUNT(DISTINCT ...)``)."""
    if isinstance(agg, exp.Count) and isinstance(agg.this, exp.Distinct):
        return "count_distinct"
    return names.get(type(agg), type(agg).__name__.lower())


class UseWalker:
    """Every column use of the expressions walked (:meth:`walk`), in order; refuses an aggregate
    that smuggles a constant (:class:`InvalidQueryError`, rule ``aggregate_constant``)."""

    def __init__(self, leaves: Leaves, aggregate_names: dict[type, str]) -> None:
        self._leaves = leaves
        self._names = aggregate_names
        self.uses: list[ColumnUse] = []

    # -- outside aggregates --------------------------------------------------------------------

    def walk(self, node: exp.Expression, context: str) -> None:
        """Record the uses in ``node``, where a column outside an aggregate is a ``context`` use
        (``join``, ``filter`` or ``group``)."""
        if isinstance(node, exp.Filter) and isinstance(node.this, exp.AggFunc):
            self._aggregate(node.this, node.expression)
        elif isinstance(node, exp.AggFunc):
            self._aggregate(node, None)
        elif isinstance(node, exp.Column):
            for source, dataset, column in self._columns(node):
                self._add(source, dataset, column, context)
        else:
            for child in node.iter_expressions():
                self.walk(child, context)

    # -- inside an aggregate -------------------------------------------------------------------

    def _aggregate(self, agg: exp.AggFunc, filter_clause: exp.Expression | None) -> None:
        extra = [k for k, v in agg.args.items() if k != "this" and isinstance(v, exp.Expression | list) and v]
        if extra:  # MAX(x, 3) is DuckDB's top 3 rows' values
            raise InvalidQueryError(
                f"the aggregate {agg.sql(DIALECT)} takes one argument: write {type(agg).__name__.upper()}(x)",
                details={"rule": "aggregate_arguments", "expression": agg.sql(DIALECT)},
            )
        walk = _AggregateWalk(self, agg, aggregate_name(agg, self._names))
        walk.value(agg.this, arm=False)
        if filter_clause is not None:
            walk.condition(filter_clause)
        walk.finish()

    # -- shared ----------------------------------------------------------------------------------

    def _add(self, source: str, dataset: str, column: str, use: str) -> None:
        self.uses.append(ColumnUse(source, dataset, column, use))

    def _columns(self, col: exp.Column, within: tuple[str, str] | None = None) -> Iterator[tuple[str, str, str]]:
        """(source, dataset, column) of every dataset column that ``col`` stands for."""
        if within is not None:
            yield within[0], within[1], col.name
            return
        for dataset, projection in self._leaves(col):
            for c in [projection] if isinstance(projection, exp.Column) else projection.find_all(exp.Column):
                yield col.table, dataset, c.name

    def expand(self, col: exp.Column, within: tuple[str, str] | None) -> list[tuple[str, str, exp.Expression]]:
        """(source, dataset, expression) that ``col`` stands for: itself, or each UNION ALL branch's
        projection (whose columns are then ``within`` that source and dataset)."""
        if within is not None:
            return [(within[0], within[1], col)]
        return [(col.table, dataset, projection) for dataset, projection in self._leaves(col)]


class _AggregateWalk:
    """The walk of one aggregate's argument (see the module docstring)."""

    def __init__(self, walker: UseWalker, agg: exp.AggFunc, name: str) -> None:
        self.w = walker
        self.agg = agg
        self.name = name
        self.value_use = f"aggregate:{name}"
        self.is_count = isinstance(agg, exp.Count)
        self.distinct = self.is_count and isinstance(agg.this, exp.Distinct)
        self.on_path: list[tuple[str, str, str]] = []  # (source, dataset, column) on the value path
        self.first = next(iter(self._beneath(agg.this, None)), None) if agg.this is not None else None

    def value(self, node: exp.Expression | None, *, arm: bool, within: tuple[str, str] | None = None) -> None:
        if node is None or isinstance(node, exp.Null | exp.Star):
            return
        if isinstance(node, exp.Column):
            for source, dataset, projection in self.w.expand(node, within):
                if isinstance(projection, exp.Column):
                    self.on_path.append((source, dataset, projection.name))
                    self.w._add(source, dataset, projection.name, self.value_use)
                else:
                    self.value(projection, arm=arm, within=(source, dataset))
        elif isinstance(node, exp.Paren | exp.Neg) or (
            isinstance(node, exp.Cast) and node.to.this in _VALUE_CASTS and not node.to.expressions
        ):
            self.value(node.this, arm=arm, within=within)
        elif isinstance(node, exp.Add | exp.Sub | exp.Mul):
            self.value(node.this, arm=False, within=within)
            self.value(node.expression, arm=False, within=within)
            if isinstance(node, exp.Mul) and len(self._sources(node, within)) > 1:
                self.combined(node, within)
        elif isinstance(node, exp.Case):
            if node.this is not None:
                self.condition(node.this, within)
            for branch in node.args.get("ifs") or []:
                self.condition(branch.this, within)
                self.value(branch.args.get("true"), arm=True, within=within)
            self.value(node.args.get("default"), arm=True, within=within)
        elif isinstance(node, exp.If):
            self.condition(node.this, within)
            self.value(node.args.get("true"), arm=True, within=within)
            self.value(node.args.get("false"), arm=True, within=within)
        elif isinstance(node, exp.Coalesce):
            for operand in [node.this, *node.expressions]:
                self.value(operand, arm=True, within=within)
        elif isinstance(node, exp.Distinct) and node is self.agg.this:
            for e in node.expressions:
                self.value(e, arm=False, within=within)
        elif not any(node.find_all(exp.Column)):
            self.constant(node, arm=arm)
        else:
            self.opaque(node, within, on_path=True)

    def condition(self, node: exp.Expression, within: tuple[str, str] | None = None) -> None:
        """Every column beneath ``node`` selects or compares rows inside the aggregate."""
        for source, dataset, column in self._beneath(node, within):
            self.w._add(source, dataset, column, AGGREGATE_FILTER)

    def opaque(self, node: exp.Expression, within: tuple[str, str] | None = None, *, on_path: bool = False) -> None:
        """A value-revealing function: its columns compare, and (on the value path) its result
        reaches the aggregate."""
        for source, dataset, column in self._beneath(node, within):
            self.w._add(source, dataset, column, AGGREGATE_FILTER)
            if on_path:
                self.on_path.append((source, dataset, column))
                self.w._add(source, dataset, column, self.value_use)

    def combined(self, node: exp.Expression, within: tuple[str, str] | None) -> None:
        for source, dataset, column in self._beneath(node, within):
            self.w._add(source, dataset, column, AGGREGATE_COMBINED)

    def constant(self, node: exp.Expression, *, arm: bool) -> None:
        if self.is_count and not self.distinct:
            return  # COUNT(1), COUNT(CASE WHEN c THEN 'x' END): a count ignores the value
        if arm and not self.distinct and _is_zero(node):
            return
        raise _constant_refusal(self.agg, node, self.first, distinct=self.distinct)

    def finish(self) -> None:
        """Columns of several joined datasets on the value path of a non-linear aggregate."""
        if isinstance(self.agg, _LINEAR) and not self.distinct:
            return
        if len({source for source, _, _ in self.on_path}) > 1:
            for source, dataset, column in self.on_path:
                self.w._add(source, dataset, column, AGGREGATE_COMBINED)

    def _beneath(self, node: exp.Expression, within: tuple[str, str] | None) -> Iterator[tuple[str, str, str]]:
        cols = [node] if isinstance(node, exp.Column) else list(node.find_all(exp.Column))
        for col in cols:
            yield from self.w._columns(col, within)

    def _sources(self, node: exp.Expression, within: tuple[str, str] | None) -> set[str]:
        return {source for source, _, _ in self._beneath(node, within)}


def _is_zero(node: exp.Expression) -> bool:
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return float(node.this) == 0
        except ValueError:
            return False
    return False


def _constant_refusal(
    agg: exp.AggFunc, constant: exp.Expression, first: tuple[str, str, str] | None, *, distinct: bool
) -> InvalidQueryError:
    """Rule ``aggregate_constant``: what was written, and what to write instead (the analyst's SQL
    only)."""
    written = agg.sql(DIALECT)
    what = constant.sql(DIALECT)
    if distinct:
        suggestion = (
            "count distinct columns only, e.g. COUNT(DISTINCT CASE WHEN c THEN customer_id END); a constant "
            "in COUNT(DISTINCT ...) would say whether any row of the cell matches"
        )
    else:
        suggestion = (
            "aggregate columns only, and let a CASE yield a column, 0 or NULL (e.g. SUM(CASE WHEN c THEN amount "
            "END)); to count rows use COUNT(*) or COUNT(CASE WHEN c THEN 1 END); to scale or shift a result, "
            "apply the arithmetic outside the aggregate (e.g. 2 * SUM(amount))"
        )
    details: dict[str, object] = {"rule": "aggregate_constant", "expression": written, "suggestion": suggestion}
    if first is not None:  # the first column the aggregate reads names the dataset
        _, dataset, column = first
        party, name = dataset.split(".", 1)
        details.update(party=party, dataset=name, column=column)
    return InvalidQueryError(
        f"the aggregate {written} uses the constant {what} as a value, which could offset or stand in for "
        f"a cell's rows: {suggestion}",
        details=details,
    )
