"""Limits on the size of a query: the one place where SQL text and parsed expressions are measured.

Security model: an analyst's SQL is untrusted input that every component parses (the coordinator to
plan it, each party agent to review it, the enclave to compile it). Parsing and planning cost grows
with the text, and DuckDB's optimizer grows faster than linearly with the depth of an expression, so
without limits one request can keep a server busy for minutes. :func:`check_sql_text` measures the
text *before* it is parsed (the parse of 10 MB is itself the cost); :func:`check_tree` measures the
parsed tree (expression nodes, nesting depth, ``IN``-list length) in one iterative walk, before
anything recursive touches it. Both raise :class:`~sealroom.errors.ResourceExhaustedError` naming
the limit, the query's value and how to change the limit.

The coordinator applies its ``[limits]`` table (docs/configuration.md); the agents and the enclave
apply :data:`DEFAULT_LIMITS` wherever they parse a plan's SQL (:func:`sealroom.planning.resolve.parse_query`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from sqlglot import exp

from sealroom.errors import ResourceExhaustedError

if TYPE_CHECKING:
    from sealroom.config import Table


@dataclass(frozen=True)
class QueryLimits:
    """Caps on one query. Every limit is a positive integer."""

    max_sql_bytes: int = 65_536  # UTF-8 bytes of the SQL text
    max_expression_nodes: int = 20_000  # nodes of the parsed statement
    max_nesting_depth: int = 256  # depth of the parsed statement (a + 1 + 1 ... nests one level per term)
    max_in_list: int = 10_000  # items of one IN (...) list

    @classmethod
    def from_table(cls, table: Table) -> QueryLimits:
        """The ``[limits]`` table of a configuration file (any key left out keeps its default)."""
        names = {f.name for f in fields(cls)}
        table.check_keys(names)
        return cls(**{f.name: table.int(f.name, getattr(cls(), f.name), minimum=1) for f in fields(cls)})


DEFAULT_LIMITS = QueryLimits()


def _exceeded(limit: str, value: int, maximum: int, what: str, *, exact: bool = True) -> ResourceExhaustedError:
    """``exact``: ``value`` is the query's measure (else the walk stopped there: "more than maximum")."""
    shown = str(value) if exact else f"more than {maximum}"
    return ResourceExhaustedError(
        f"the query has {what.format(shown)}, above the limit "
        f"{limit} = {maximum}; simplify the query, or ask the operator to raise {limit} in the [limits] "
        "table of the coordinator's configuration (docs/configuration.md)",
        details={"limit": limit, "value": value, "maximum": maximum},
    )


def check_sql_text(sql: str, limits: QueryLimits = DEFAULT_LIMITS) -> None:
    """Refuse SQL text longer than ``limits.max_sql_bytes``, without parsing it."""
    # len(str) bounds the UTF-8 length from below and costs nothing: only a text near the limit is encoded.
    size = len(sql)
    if size <= limits.max_sql_bytes // 4:
        return
    size = len(sql.encode("utf-8", errors="surrogatepass")) if size <= limits.max_sql_bytes else size
    if size > limits.max_sql_bytes:
        raise _exceeded("max_sql_bytes", size, limits.max_sql_bytes, "{} bytes of SQL")


def check_tree(tree: exp.Expr, limits: QueryLimits = DEFAULT_LIMITS) -> None:
    """Refuse a parsed statement with too many nodes, too deep a nesting or too long an IN list.

    One iterative walk (no recursion, so a deep tree cannot exhaust the stack), stopped at the first
    limit it passes."""
    nodes = 0
    stack: list[tuple[exp.Expr, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_expression_nodes:
            raise _exceeded(
                "max_expression_nodes", nodes, limits.max_expression_nodes, "{} expression nodes", exact=False
            )
        if depth > limits.max_nesting_depth:
            raise _exceeded("max_nesting_depth", depth, limits.max_nesting_depth, "a nesting depth of {}", exact=False)
        if isinstance(node, exp.In):
            items = len(node.expressions)
            if items > limits.max_in_list:
                raise _exceeded("max_in_list", items, limits.max_in_list, "an IN list of {} items")
        stack.extend((child, depth + 1) for child in node.iter_expressions())
