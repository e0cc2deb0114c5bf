"""Filter pushdown to a database: which conditions of a plan's filter a database evaluates exactly
as DuckDB does, rendered in its dialect with every literal a bound parameter (:func:`translate_filter`).

Pushed: comparisons, IN, BETWEEN, IS NULL, LIKE, AND/OR/NOT over columns whose types agree with the
literals, strings compared byte-wise (a binary collation). Everything else is the residual, which
the source applies here with DuckDB (:func:`connectors.sources.base.filter_batches`): the result has
WHERE semantics either way. An analyst's SQL comments never reach the database; a literal never
enters the SQL text.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp


@dataclass(frozen=True)
class SqlFilter:
    """A plan's filter split for one database: ``where`` (target dialect, literals replaced by
    placeholders) with its ``params`` in order, and the ``residual`` conditions the database cannot
    evaluate exactly as DuckDB does (DuckDB SQL, applied locally), with the columns they read."""

    where: str | None
    params: tuple[object, ...]
    residual: str | None
    residual_columns: tuple[str, ...]


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)
_ORDERING = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Between)
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INT64 = (-(2**63), 2**63 - 1)


def _category(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_float64(t):  # a FLOAT32 column against a literal compares differently
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_date32(t):
        return "date"
    return None


class _Translator:
    """Decides, per condition, whether a database evaluates it exactly as DuckDB would, and renders
    it with placeholders. ``dialect`` is sqlglot's: "postgres", "sqlite" or "duckdb"."""

    def __init__(self, schema: pa.Schema, dialect: str, pushable: frozenset[str] | None = None):
        self.dialect = dialect
        self.types: dict[str, str | None] = {}
        for field in schema:
            unique = len(schema.get_all_field_indices(field.name)) == 1
            allowed = pushable is None or field.name in pushable
            self.types[field.name] = _category(field.type) if unique and allowed else None

    # - which conditions

    def pushable(self, node: exp.Expr) -> bool:
        if isinstance(node, exp.Paren):
            return self.pushable(node.this)
        if isinstance(node, exp.And | exp.Or):
            return self.pushable(node.this) and self.pushable(node.expression)
        if isinstance(node, exp.Not):
            return self.pushable(node.this)
        if isinstance(node, exp.Column):  # a bare boolean column
            return self._column_type(node) == "bool"
        if isinstance(node, exp.Boolean):
            return True
        if isinstance(node, exp.Is):
            return self._column_type(node.this) is not None and isinstance(node.expression, exp.Null)
        if isinstance(node, _COMPARISONS):
            return self._compatible(node.this, node.expression, ordering=isinstance(node, _ORDERING))
        if isinstance(node, exp.Between):
            return self._compatible(node.this, node.args["low"], ordering=True) and self._compatible(
                node.this, node.args["high"], ordering=True
            )
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None or node.args.get("field"):
                return False
            items = node.expressions
            return bool(items) and all(self._compatible(node.this, item, ordering=False) for item in items)
        if isinstance(node, exp.Like):
            if node.args.get("escape") is not None or self.dialect == "sqlite":
                return False  # SQLite's LIKE ignores ASCII case
            pattern = node.expression
            if not (isinstance(pattern, exp.Literal) and pattern.is_string):
                return False
            if self.dialect == "postgres" and "\\" in pattern.this:
                return False  # PostgreSQL's LIKE escapes with a backslash by default, DuckDB's does not
            return self._column_type(node.this) == "string"
        return False

    def _column_type(self, node: exp.Expression) -> str | None:
        if not isinstance(node, exp.Column) or node.table:
            return None
        return self.types.get(node.name)

    def _literal_type(self, node: exp.Expression, column: str) -> str | None:
        value = _literal_value(node)
        if value is _NOT_LITERAL:
            return None
        if isinstance(value, bool):
            return "bool"
        if isinstance(value, int):
            return "int" if _INT64[0] <= value <= _INT64[1] else None
        if isinstance(value, float):
            return "float"
        if isinstance(value, datetime.date):
            return "date"
        if isinstance(value, str):
            # DuckDB casts a string literal to the type of the DATE column it is compared with.
            if column == "date" and _DATE_TEXT.match(value) and _iso_date(value) is not None:
                return "date"
            return "string"
        return None

    def _compatible(self, left: exp.Expression, right: exp.Expression, *, ordering: bool) -> bool:
        lt, rt = self._column_type(left), self._column_type(right)
        if lt is None and rt is None:
            return False
        if isinstance(left, exp.Null) or isinstance(right, exp.Null):
            return True  # NULL in a comparison: NULL everywhere
        column = lt if lt is not None else rt
        other = right if lt is not None else left
        assert column is not None
        if self._column_type(other) is not None:
            kind: str | None = self._column_type(other)
        else:
            kind = self._literal_type(other, column)
        if kind is None:
            return False
        if column == "date" and self.dialect == "sqlite":
            return False
        if column == kind:
            return True
        # A FLOAT column against an integer literal compares as DOUBLE in DuckDB as here; an INTEGER
        # column against a fractional literal compares as DECIMAL in DuckDB: not pushed.
        return column == "float" and kind == "int"

    # - rendering

    def render(self, node: exp.Expr) -> tuple[str, tuple[object, ...]]:
        tree = node.copy()
        params: list[object] = []
        self._collate(tree)
        tree = tree.transform(lambda n: self._bind(n, params), copy=False)
        return tree.sql(self.dialect), tuple(params)

    def _bind(self, node: exp.Expression, params: list[object]) -> exp.Expression:
        if isinstance(node, exp.Column):
            return exp.Column(this=exp.to_identifier(node.name, quoted=True))
        value = _literal_value(node)
        if value is _NOT_LITERAL:
            return node
        parent = node.parent
        column = None
        if parent is not None:
            for side in (parent.this, parent.args.get("expression")):
                if isinstance(side, exp.Column | exp.Collate):
                    column = self._column_type(side.this if isinstance(side, exp.Collate) else side)
        if isinstance(value, str) and column == "date":
            value = _iso_date(value)
        elif isinstance(value, int) and not isinstance(value, bool) and column == "float":
            value = float(value)
        params.append(value)
        if self.dialect == "postgres":
            return exp.Parameter(this=exp.Literal.number(len(params)))
        return exp.Placeholder()

    def _collate(self, tree: exp.Expr) -> None:
        """Compare strings byte-wise, as the local DuckDB filter does, whatever collation a column
        was declared with: ``COLLATE "C"`` for PostgreSQL (a nondeterministic ICU collation makes even
        ``=`` and ``IN`` case-insensitive), ``COLLATE C`` for DuckDB (a column may be ``NOCASE``),
        ``COLLATE BINARY`` for SQLite. Every string comparison, equality included: a row the plan's
        filter excludes must never leave the owner."""
        collation = {
            "postgres": lambda: exp.Identifier(this="C", quoted=True),
            "duckdb": lambda: exp.var("C"),
        }.get(self.dialect, lambda: exp.var("BINARY"))
        for node in list(tree.find_all(*_COMPARISONS, exp.Between, exp.In, exp.Like)):
            for key in ("this", "expression"):
                side = node.args.get(key)
                if isinstance(side, exp.Column) and self._column_type(side) == "string":
                    side.replace(exp.Collate(this=side.copy(), expression=collation()))


class _NotLiteral:
    pass


_NOT_LITERAL: Any = _NotLiteral()


def _literal_value(node: exp.Expression) -> object:
    """A Python value for a literal node (number, string, boolean, ``DATE 'x'``), else _NOT_LITERAL."""
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    negative = False
    if isinstance(node, exp.Neg):
        negative, node = True, node.this
        if not (isinstance(node, exp.Literal) and not node.is_string):
            return _NOT_LITERAL
    if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal) and node.this.is_string:
        if node.to.is_type(exp.DataType.Type.DATE) and _DATE_TEXT.match(node.this.this):
            date = _iso_date(node.this.this)
            return _NOT_LITERAL if date is None else date
        return _NOT_LITERAL
    if not isinstance(node, exp.Literal):
        return _NOT_LITERAL
    if node.is_string:
        return node.this
    text = node.this
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return _NOT_LITERAL
    return -number if negative else number


def _iso_date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        return None


def _conjuncts(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.Paren) and isinstance(node.this, exp.And):
        return _conjuncts(node.this)
    if isinstance(node, exp.And):
        return [*_conjuncts(node.this), *_conjuncts(node.expression)]
    return [node]


def translate_filter(
    predicate: str, schema: pa.Schema, *, dialect: str, pushable: frozenset[str] | None = None
) -> SqlFilter:
    """Split ``predicate`` (DuckDB SQL over ``schema``'s column names, as the planner pushes it) into
    what a ``dialect`` database evaluates exactly as DuckDB does (rendered with placeholders, every
    literal a parameter) and the residual (DuckDB SQL, applied by the caller). Only conditions on
    the ``pushable`` columns (all when None) can go to the database."""
    tree = sqlglot.parse_one(predicate, read="duckdb")
    for node in tree.walk():  # an analyst's SQL comments are free text: they do not reach the database
        node.comments = None
    translator = _Translator(schema, dialect, pushable)
    pushed: list[exp.Expr] = []
    kept: list[exp.Expr] = []
    for conjunct in _conjuncts(tree):
        (pushed if translator.pushable(conjunct) else kept).append(conjunct)
    where: str | None = None
    params: tuple[object, ...] = ()
    if pushed:
        where, params = translator.render(exp.and_(*(exp.paren(c, copy=True) for c in pushed)))
    residual: str | None = None
    columns: list[str] = []
    if kept:
        node = exp.and_(*(exp.paren(c, copy=True) for c in kept))
        for col in node.find_all(exp.Column):
            if col.name not in columns:
                columns.append(col.name)
        residual = node.sql("duckdb")
    return SqlFilter(where, params, residual, tuple(columns))
