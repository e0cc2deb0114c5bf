"""The in-enclave SQL engine: DuckDB over the job's opened inputs, then the disclosure rules.

Security model: the engine runs only SQL that :func:`sealroom.planning.sql.compile_stage` produced from
the approved plan inside this process, plus the disclosure SQL built here from it. DuckDB is opened
with external access disabled and its configuration locked before any analyst SQL runs, so a query
cannot read files or load extensions.

Disclosure rules, all computed inside DuckDB, and all of them applied to every cell (the strictest
rule of every involved owner wins):

- clamping: a measure column with declared bounds is clamped to ``[min, max]`` in the view that
  exposes the input to the query, so every WHERE, JOIN and aggregate sees clamped values only;
- minimum group size, per input dataset on its own units: each dataset's distinct-privacy-unit
  count in the cell is 0 (it does not contribute, e.g. one UNION ALL branch) or reaches the
  strictest ``min_group_size`` k of the involved owners, and some dataset reaches k. Rows of one
  party can therefore never make a small group of another party's units releasable;
- sub-cells: a conditional aggregate (FILTER, CASE, NULLIF...) reads part of its cell; that part
  and the rest of the cell must each hold, per dataset, 0 or at least k units (rule ``sub_cell``,
  see :mod:`sealroom.planning.cells`), so two aggregates of one cell cannot be differenced down to
  fewer than k units;
- dominance ``(n, k)``: for an input whose owner declares it, a cell is suppressed when the ``n``
  largest contributions of that input's own privacy units (absolute values, each unit's clamped
  rows added up first; for a UNION ALL, that input's branch only) make at least ``k`` % of the
  total of absolute contributions, for any SUM or AVG argument in the cell (a conditional
  aggregate's argument included).

Every expression the engine evaluates is total (errors become NULL: compile_stage's TRY/TRY_CAST,
and division by zero after aggregation gives NULL), so no query succeeds or fails depending on a
hidden value; a failure that remains is reported by its kind only.

A cell that fails a rule is reported with its rule and a reason naming the rule's owner, never with
a value, a count or a share; with its group keys only when every group column shows keys of a
public domain (``public_keys``: the values or bin edges the owners declared), otherwise with
``"group": null``. HAVING, ORDER BY and LIMIT apply to released cells only, so they cannot be used
to probe suppressed values.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from sealroom.duck import locked_connection
from sealroom.errors import DeadlineExceededError, InvalidQueryError
from sealroom.planning.resolve import DIALECT, from_items, parse_query
from sealroom.planning.sql import ROW_ID, CompiledStage, InputSpec, UnitCheck, compile_stage, order_sql
from sealroom.policy import DatasetPolicy, Dominance

HAVING_COLUMN = "__sr_having"
RELEASABLE_COLUMN = "__sr_releasable"  # passes every disclosure rule
KEEP_COLUMN = "__sr_keep"  # passes, and satisfies HAVING
UNITS_OK_COLUMN = "__sr_units_ok"  # every dataset's unit count is 0 or reaches k, and one reaches k
SUB_OK_COLUMN = "__sr_sub_ok"  # every sub-cell and complement: 0 or at least k units per dataset
DOMINATED_COLUMN = "__sr_dominated"  # index of the first dominance rule the cell fails, or NULL
GROUP_KEY_PREFIX = "__sr_g"  # hidden group-key columns the dominance verdicts are joined on

Bounds = tuple[float | None, float | None]
OnCancel = Callable[[Callable[[], None]], object]  # gRPC's context.add_callback
Clamps = Mapping[str, Mapping[str, Bounds]]  # engine table -> column -> (min, max)

_INTEGER_RANGES = {
    "TINYINT": (-(2**7), 2**7 - 1),
    "SMALLINT": (-(2**15), 2**15 - 1),
    "INTEGER": (-(2**31), 2**31 - 1),
    "BIGINT": (-(2**63), 2**63 - 1),
    "HUGEINT": (-(2**127), 2**127 - 1),
    "UTINYINT": (0, 2**8 - 1),
    "USMALLINT": (0, 2**16 - 1),
    "UINTEGER": (0, 2**32 - 1),
    "UBIGINT": (0, 2**64 - 1),
    "UHUGEINT": (0, 2**128 - 1),
}
_FLOAT_TYPES = ("FLOAT", "DOUBLE")


@dataclass(frozen=True)
class StageOutcome:
    released: pa.Table
    suppressed: list[dict[str, Any]]
    min_group_size: int
    rule_datasets: tuple[str, ...]


@dataclass(frozen=True)
class _DominanceRule:
    dataset: str
    rule: Dominance
    check: int  # index into compiled.unit_checks: the count of ``dataset``'s own units


def compile_for_job(sql: str, inputs: Sequence[InputSpec]) -> CompiledStage:
    """Compile, moving HAVING into a hidden boolean output evaluated after suppression."""
    tree = parse_query(sql)  # within the query limits, before anything else reads it
    having = tree.args.get("having")
    if having is None:
        return compile_stage(sql, inputs)
    # HAVING may name an output alias (HAVING n > 1); once moved into the select list it could not,
    # so such references are replaced by the aliased expression. Input columns keep precedence.
    columns = {c for i in inputs for c in i.columns}
    aliases = {e.alias: e.this for e in tree.expressions if isinstance(e, exp.Alias) and e.alias not in columns}

    def unalias(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Column) and not node.table and node.name in aliases:
            return aliases[node.name].copy()
        return node

    condition = having.this.copy().transform(unalias)
    tree.set("having", None)
    tree.set("expressions", [*tree.expressions, exp.alias_(condition, HAVING_COLUMN, quoted=True)])
    compiled = compile_stage(tree.sql(DIALECT), inputs)
    return replace(
        compiled,
        output_columns=tuple(c for c in compiled.output_columns if c != HAVING_COLUMN),
        group_columns=tuple(c for c in compiled.group_columns if c != HAVING_COLUMN),
    )


def run_stage(
    compiled: CompiledStage,
    tables: Mapping[str, pa.Table],
    *,
    min_group_size: int,
    rule_datasets: Sequence[str],
    row_id_tables: frozenset[str] = frozenset(),
    clamps: Clamps | None = None,
    dominance: Mapping[str, Dominance] | None = None,
    public_keys: Mapping[str, frozenset[Any]] | None = None,
    threads: int = 2,
    on_cancel: OnCancel | None = None,
) -> StageOutcome:
    """Run ``compiled`` over ``tables`` (engine name -> Arrow table) and apply the disclosure rules.

    - ``row_id_tables``: inputs without a declared privacy unit; they get a per-row id so that each
      row counts as one unit.
    - ``clamps``: per engine table, the declared ``(min, max)`` of its measure columns (either may
      be None); values are clamped before anything reads them. NULLs stay NULL.
    - ``dominance``: per input (``party.dataset``), its owner's ``(n, k)`` dominance rule.
    - ``public_keys``: per group output column, the keys its owners declared public (values or bin
      edges, :func:`public_group_keys`); a suppressed cell is listed with its keys only when each
      of them is one of those, otherwise with ``"group": None``.
    - ``on_cancel``: registers a callback to run when the caller goes away (gRPC's
      ``context.add_callback``); it interrupts DuckDB, and the stage ends in DeadlineExceededError.
    """
    rules = _dominance_rules(compiled, dominance or {})
    stage = StageConnection(tables, row_id_tables=row_id_tables, clamps=clamps, threads=threads, on_cancel=on_cancel)
    try:
        k = int(min_group_size)
        compiled = stage.run(lambda con: _typed_comparisons(con, compiled))
        decided = _decision_sql(compiled, k, rules)
        cells: pa.Table = stage.run(lambda con: con.sql(decided).to_arrow_table())
        suppressed = _suppressed(cells, compiled, k, rule_datasets, rules, public_keys or {})
        released = cells.filter(cells[KEEP_COLUMN]).select(list(compiled.output_columns))
        if compiled.order_by or compiled.limit is not None:
            stage.con.register("__sr_released", released)
            released = stage.con.sql(order_sql("__sr_released", compiled.order_by, compiled.limit)).to_arrow_table()
        return StageOutcome(released, suppressed, min_group_size, tuple(rule_datasets))
    finally:
        stage.close()


class StageConnection:
    """One locked DuckDB connection over a job's inputs, for the threshold engine and the dp engine
    (:mod:`enclave_worker.dp`) alike: each input registered as is, or through the view that adds a
    per-row id (``row_id_tables``) and clamps its bounded measures (``clamps``: engine table ->
    column -> bounds); then the settings locked. ``on_cancel`` (gRPC's ``context.add_callback``)
    interrupts DuckDB when the caller goes away. :meth:`run` reports a failure by its kind only."""

    def __init__(
        self,
        tables: Mapping[str, pa.Table],
        *,
        row_id_tables: frozenset[str] = frozenset(),
        clamps: Clamps | None = None,
        threads: int = 2,
        on_cancel: OnCancel | None = None,
    ) -> None:
        self.con = locked_connection(threads=threads, lock=False)  # locked once the inputs are registered
        self.interrupted = threading.Event()
        if on_cancel is not None:

            def interrupt() -> None:
                self.interrupted.set()
                try:
                    self.con.interrupt()
                except duckdb.Error:  # the stage has ended and closed its connection
                    pass

            if on_cancel(interrupt) is False:  # the call had already ended
                self.con.close()
                raise DeadlineExceededError("the caller went away before the stage ran; nothing was computed")
        try:
            for name, table in tables.items():
                register_input(self.con, name, table, row_id=name in row_id_tables, bounds=(clamps or {}).get(name, {}))
            # DuckDB's common-subexpression optimizer costs about the cube of an expression's depth
            # (SUM(x + 1 + 1 ...) with 950 terms: 14 s, 0.2 s without it); the depth is capped by the
            # query limits, and this optimizer only shares repeated subexpressions, so it is off.
            self.con.execute("SET disabled_optimizers = 'common_subexpressions'")
            # Total expressions: x // 0 and x % 0 after aggregation give NULL, not an error that would
            # tell a hidden zero apart (what is computed before aggregation is wrapped in TRY).
            self.con.execute("SET error_on_division_by_zero = false")
            self.con.execute("SET lock_configuration = true")
        except BaseException:
            self.con.close()
            raise

    def run(self, what: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """``what(con)``; a DuckDB failure becomes DeadlineExceededError (the caller went away) or
        InvalidQueryError naming its kind (DuckDB's messages can quote values)."""
        try:
            return what(self.con)
        except duckdb.Error as exc:
            if self.interrupted.is_set():
                raise DeadlineExceededError(
                    "the caller went away; the stage was interrupted, nothing released"
                ) from None
            raise InvalidQueryError(
                f"the stage failed in the engine ({type(exc).__name__}); check column types and expressions"
            ) from None

    def close(self) -> None:
        self.con.close()


# --------------------------------------------------------------------------------------------
# inputs: per-row ids and clamping


def _ident(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql(DIALECT)


def register_input(
    con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, *, row_id: bool, bounds: Mapping[str, Bounds]
) -> None:
    """Expose ``table`` to the query as ``name``: as is, or through a view that adds the per-row id
    and clamps the bounded measure columns (same columns, same order)."""
    bounded = {c: b for c, b in bounds.items() if c in table.column_names and b != (None, None)}
    if not row_id and not bounded:
        con.register(name, table)
        return
    src = _ident(f"{name}__arrow")
    con.register(f"{name}__arrow", table)
    types = {row[0]: str(row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    items = []
    for column in table.column_names:
        col = _ident(column)
        if column in bounded:
            lo, hi = bounded[column]
            items.append(f"{_clamp_sql(col, types[column], lo, hi, column=column)} AS {col}")
        else:
            items.append(col)
    if row_id:
        items.append(f"row_number() OVER () AS {_ident(ROW_ID)}")
    con.execute(f"CREATE VIEW {_ident(name)} AS SELECT {', '.join(items)} FROM {src}")


def _clamp_sql(col: str, duck_type: str, lo: float | None, hi: float | None, *, column: str) -> str:
    """``col`` clamped to ``[lo, hi]`` as LEAST(GREATEST(col, lo), hi) would, keeping NULLs (DuckDB's
    LEAST/GREATEST skip NULLs) and, where the bounds allow it, the column's type."""
    for bound in (lo, hi):
        if bound is not None and (not isinstance(bound, int | float) or math.isnan(bound)):
            raise InvalidQueryError(
                f"the declared bounds of column {column} are not numbers", details={"column": column}
            )
    base = duck_type.upper()
    literals: list[str | None] = []
    exact = True  # the bounds are representable in the column's own type
    if base in _FLOAT_TYPES:
        literals = [None if b is None else f"CAST('{float(b)!r}' AS {base})" for b in (lo, hi)]
    elif base in _INTEGER_RANGES:
        t_min, t_max = _INTEGER_RANGES[base]
        for b, is_lo in ((lo, True), (hi, False)):
            if b is None or (is_lo and b <= t_min) or (not is_lo and b >= t_max):
                literals.append(None)  # no value of the type lies beyond this bound
            elif math.isfinite(b) and float(b).is_integer() and t_min <= int(b) <= t_max:
                literals.append(f"CAST({int(b)} AS {base})")
            else:
                exact = False
    elif base.startswith("DECIMAL"):
        precision, scale = (int(x) for x in base[base.index("(") + 1 : -1].split(","))
        limit = Decimal(10) ** (precision - scale)
        for b, is_lo in ((lo, True), (hi, False)):
            if b is None or (is_lo and b <= -limit) or (not is_lo and b >= limit):
                literals.append(None)
                continue
            try:
                d = Decimal(repr(float(b)))
                fits = d.quantize(Decimal(1).scaleb(-scale)) == d
            except InvalidOperation:
                fits = False
            if fits:
                literals.append(f"CAST('{d}' AS {base})")
            else:
                exact = False
    else:
        raise InvalidQueryError(
            f"column {column} has declared bounds but is not numeric ({duck_type}); its owner's policy "
            "can bound numeric measures only",
            details={"column": column, "rule": "bounds"},
        )
    if not exact:  # e.g. a fractional bound on an integer column: clamp in DOUBLE, as LEAST/GREATEST would
        col = f"CAST({col} AS DOUBLE)"
        literals = [None if b is None else f"CAST('{float(b)!r}' AS DOUBLE)" for b in (lo, hi)]
    lo_sql, hi_sql = literals
    whens = []
    if lo_sql is not None:
        whens.append(f"WHEN {col} < {lo_sql} THEN {lo_sql}")
    if hi_sql is not None:
        whens.append(f"WHEN {col} > {hi_sql} THEN {hi_sql}")
    if not whens:
        return col
    return f"CASE {' '.join(whens)} ELSE {col} END"


_NUMBERS = (*_INTEGER_RANGES, *_FLOAT_TYPES)
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ)


def _typed_comparisons(con: duckdb.DuckDBPyConnection, compiled: CompiledStage) -> CompiledStage:
    """Total expressions, the part only the engine can do: a comparison of two columns of different
    types (a VARCHAR join key against a BIGINT one) casts one side implicitly, which fails on some
    values; such a comparison is evaluated in TRY (compile_stage leaves column-to-column comparisons
    bare, so that joins on same-typed keys stay hash joins)."""
    try:
        tree = sqlglot.parse_one(compiled.aggregate_sql, read=DIALECT)
    except SqlglotError:
        return compiled
    if not isinstance(tree, exp.Select):
        return compiled
    types: dict[tuple[str, str], str] = {}
    for item in from_items(tree):
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM {item.sql(DIALECT)}").fetchall()
        except duckdb.Error:
            return compiled  # the query does not bind: it fails the same way whatever the data
        types.update({(item.alias_or_name, str(row[0])): str(row[1]).upper() for row in described})

    def same_family(a: exp.Column, b: exp.Column) -> bool:
        ta, tb = types.get((a.table, a.name)), types.get((b.table, b.name))
        return ta == tb or (ta in _NUMBERS and tb in _NUMBERS)

    mixed = [
        n
        for n in tree.find_all(*_COMPARISONS)
        if isinstance(n.this, exp.Column)
        and isinstance(n.expression, exp.Column)
        and not same_family(n.this, n.expression)
    ]
    if not mixed:
        return compiled
    for n in mixed:
        n.replace(exp.Try(this=n.copy()))
    return replace(compiled, aggregate_sql=tree.sql(DIALECT))


# --------------------------------------------------------------------------------------------
# the disclosure decision


def _dominance_rules(compiled: CompiledStage, dominance: Mapping[str, Dominance]) -> list[_DominanceRule]:
    out = []
    for dataset, rule in sorted(dominance.items()):
        checks = [i for i, c in enumerate(compiled.unit_checks) if c.datasets == (dataset,)]
        if not checks:
            raise InvalidQueryError(
                f"the dominance rule of {dataset} names an input the stage does not read",
                details={"dataset": dataset, "rule": "dominance"},
            )
        if not (isinstance(rule.n, int) and rule.n >= 1 and 0 < float(rule.k) <= 100):
            raise InvalidQueryError(
                f"the dominance rule of {dataset} is malformed", details={"dataset": dataset, "rule": "dominance"}
            )
        out.append(_DominanceRule(dataset, rule, checks[0]))
    return out


def _verdicts(compiled: CompiledStage, k: int) -> tuple[str, str]:
    """SQL of the units_ok and sub_ok verdicts over the hidden counts."""

    def zero_or_k(column: str) -> str:
        c = _ident(column)
        return f"COALESCE({c} = 0 OR {c} >= {k}, FALSE)"

    checks = compiled.unit_checks
    per_dataset = [zero_or_k(c.column) for c in checks]
    some = " OR ".join(f"COALESCE({_ident(c.column)} >= {k}, FALSE)" for c in checks)
    units = " AND ".join([*per_dataset, f"({some})"]) if checks else "TRUE"
    subs = " AND ".join(zero_or_k(col) for s in compiled.sub_checks for col in (s.inside, s.outside)) or "TRUE"
    return f"({units})", f"({subs})"


def _decision_sql(compiled: CompiledStage, k: int, rules: Sequence[_DominanceRule]) -> str:
    """The cells with hidden verdict columns: units_ok, sub_ok, dominated (rule index), releasable, keep."""
    units, subs = _verdicts(compiled, k)
    verdicts = f"{units} AS {_ident(UNITS_OK_COLUMN)}, {subs} AS {_ident(SUB_OK_COLUMN)}"
    named = compiled.aggregate_sql + " ".join(name for name, _ in compiled.post_outputs)
    having = f"COALESCE({_ident(HAVING_COLUMN)}, FALSE)" if HAVING_COLUMN in named else "TRUE"
    posts = "".join(f", {sql} AS {_ident(name)}" for name, sql in compiled.post_outputs)
    # Dominance applies to SUM cells: without a SUM in the outputs there is nothing to dominate.
    active = list(rules) if compiled.sum_arguments else []
    if not active:
        return (
            f"SELECT *, {verdicts}, NULL::INTEGER AS {_ident(DOMINATED_COLUMN)}, "
            f"{units} AND {subs} AS {_ident(RELEASABLE_COLUMN)}, "
            f"{units} AND {subs} AND {having} AS {_ident(KEEP_COLUMN)} "
            f"FROM (SELECT *{posts} FROM ({compiled.aggregate_sql}))"
        )
    try:
        tree = sqlglot.parse_one(compiled.aggregate_sql, read=DIALECT)
        if not isinstance(tree, exp.Select):
            raise InvalidQueryError("the compiled stage is not a SELECT")
        groups = _resolved_groups(tree)
        keys = [f"{GROUP_KEY_PREFIX}{i}" for i in range(len(groups))]
        cells = tree.copy()
        hidden_keys = [exp.alias_(g.copy(), key, quoted=True) for g, key in zip(groups, keys, strict=True)]
        cells.set("expressions", [*cells.expressions, *hidden_keys])
        ctes = [f"{_ident('__sr_cells')} AS (SELECT *{posts} FROM ({cells.sql(DIALECT)}))"]
        for c in sorted({r.check for r in active}):
            ctes.append(f"{_ident(f'__sr_contrib_{c}')} AS ({_contributions_sql(tree, groups, keys, compiled, c)})")
            ctes.append(f"{_ident(f'__sr_ranked_{c}')} AS ({_ranked_sql(c, keys, len(compiled.sum_arguments))})")
    except SqlglotError:
        raise InvalidQueryError("the compiled stage could not be extended with the dominance rule") from None
    joins = []
    dominated = []
    for i, r in enumerate(active):
        name = _ident(f"__sr_dom_{i}")
        ctes.append(f"{name} AS ({_dominated_sql(r, keys, len(compiled.sum_arguments))})")
        on = " AND ".join(f"c.{_ident(key)} IS NOT DISTINCT FROM d{i}.{_ident(key)}" for key in keys) or "TRUE"
        joins.append(f"LEFT JOIN {name} AS d{i} ON {on}")
        dominated.append(f"WHEN COALESCE(d{i}.{_ident('__sr_dominated')}, FALSE) THEN {i}")
    dom = f"(CASE {' '.join(dominated)} END)"
    releasable = f"({units} AND {subs} AND {dom} IS NULL)"
    return (
        f"WITH {', '.join(ctes)} "
        f"SELECT c.*, {verdicts}, {dom} AS {_ident(DOMINATED_COLUMN)}, "
        f"{releasable} AS {_ident(RELEASABLE_COLUMN)}, {releasable} AND {having} AS {_ident(KEEP_COLUMN)} "
        f"FROM {_ident('__sr_cells')} AS c {' '.join(joins)}"
    )


def _resolved_groups(tree: exp.Select) -> list[exp.Expression]:
    """The GROUP BY items with positions and output-alias references replaced by what they name."""
    group = tree.args.get("group")
    if group is None:
        return []
    bodies = [e.this if isinstance(e, exp.Alias) else e for e in tree.expressions]
    aliases = {e.alias: e.this for e in tree.expressions if isinstance(e, exp.Alias)}
    out: list[exp.Expression] = []
    for g in group.expressions:
        if isinstance(g, exp.Literal) and not g.is_string:
            out.append(bodies[int(g.this) - 1].copy())
            continue

        def unalias(node: exp.Expression) -> exp.Expression:
            if isinstance(node, exp.Column) and not node.table and node.name in aliases:
                return aliases[node.name].copy()
            return node

        out.append(g.copy().transform(unalias))
    return out


def _contributions_sql(
    tree: exp.Select, groups: Sequence[exp.Expression], keys: Sequence[str], compiled: CompiledStage, check: int
) -> str:
    """Per cell and per privacy unit of the dataset of ``check`` (its own rows only, in a UNION ALL):
    that unit's total of each SUM argument."""
    spec = compiled.unit_checks[check]
    unit = sqlglot.parse_one(spec.expression, read=DIALECT)
    contrib = tree.copy()
    if spec.condition:
        contrib = contrib.where(sqlglot.parse_one(spec.condition, read=DIALECT), dialect=DIALECT, copy=False)
    items: list[exp.Expr] = [exp.alias_(g.copy(), key, quoted=True) for g, key in zip(groups, keys, strict=True)]
    items.append(exp.alias_(unit.copy(), "__sr_u", quoted=True))
    for j, arg in enumerate(compiled.sum_arguments):
        items.append(exp.alias_(sqlglot.parse_one(f"SUM({arg})", read=DIALECT), f"__sr_c{j}", quoted=True))
    contrib.set("expressions", items)
    contrib.set("group", exp.Group(expressions=[*(g.copy() for g in groups), unit.copy()]))
    return contrib.sql(DIALECT)


def _ranked_sql(check: int, keys: Sequence[str], n_args: int) -> str:
    partition = f"PARTITION BY {', '.join(_ident(key) for key in keys)} " if keys else ""
    items = [_ident(key) for key in keys]
    for j in range(n_args):
        c = _ident(f"__sr_c{j}")
        items.append(f"ABS({c}) AS {_ident(f'__sr_a{j}')}")
        items.append(f"row_number() OVER ({partition}ORDER BY ABS({c}) DESC NULLS LAST) AS {_ident(f'__sr_r{j}')}")
    return f"SELECT {', '.join(items)} FROM {_ident(f'__sr_contrib_{check}')}"


def _dominated_sql(rule: _DominanceRule, keys: Sequence[str], n_args: int) -> str:
    """Per cell: do the n largest units make at least k % of the absolute total, for any SUM?"""
    n, k = int(rule.rule.n), float(rule.rule.k)
    tests = []
    for j in range(n_args):
        a, r = _ident(f"__sr_a{j}"), _ident(f"__sr_r{j}")
        top = f"CAST(SUM({a}) FILTER (WHERE {r} <= {n}) AS DOUBLE)"
        total = f"CAST(SUM({a}) AS DOUBLE)"
        tests.append(f"COALESCE({total} > 0 AND {top} * 100 >= {k!r} * {total}, FALSE)")
    group = f" GROUP BY {', '.join(_ident(key) for key in keys)}" if keys else ""
    select = [*(_ident(key) for key in keys), f"({' OR '.join(tests)}) AS {_ident('__sr_dominated')}"]
    return f"SELECT {', '.join(select)} FROM {_ident(f'__sr_ranked_{rule.check}')}{group}"


def _suppressed(
    cells: pa.Table,
    compiled: CompiledStage,
    k: int,
    rule_datasets: Sequence[str],
    rules: Sequence[_DominanceRule],
    public_keys: Mapping[str, frozenset[Any]],
) -> list[dict[str, Any]]:
    failing = cells.filter(pc.invert(cells[RELEASABLE_COLUMN]))
    if failing.num_rows == 0:
        return []
    listed: list[dict[str, Any]] = []
    unlisted: list[dict[str, Any]] = []
    groups = failing.select(list(compiled.group_columns)).to_pylist() if compiled.group_columns else None
    units_ok = failing[UNITS_OK_COLUMN].to_pylist()
    subs_ok = failing[SUB_OK_COLUMN].to_pylist()
    dominated = failing[DOMINATED_COLUMN].to_pylist()
    for i in range(failing.num_rows):
        if not units_ok[i]:
            counts = [failing[c.column][i].as_py() or 0 for c in compiled.unit_checks]
            short = [c for c, n in zip(compiled.unit_checks, counts, strict=True) if 0 < n < k]
            check = short[0] if short else compiled.unit_checks[0]  # an empty cell: no unit at all
            rule, reason = "min_group_size", _min_group_reason(check, k, rule_datasets)
        elif not subs_ok[i]:
            rule, reason = "sub_cell", _sub_cell_reason(failing, i, compiled, k, rule_datasets)
        else:
            rule, reason = "dominance", _dominance_reason(rules[int(dominated[i])], compiled.unit_checks)
        if groups is None:
            listed.append({"group": {}, "rule": rule, "reason": reason})
        elif _is_public(groups[i], public_keys):
            listed.append({"group": _jsonable(groups[i]), "rule": rule, "reason": reason})
        else:
            unlisted.append({"group": None, "rule": rule, "reason": reason})
    listed.sort(key=lambda d: [str(v) for v in d["group"].values()])
    unlisted.sort(key=lambda d: (d["rule"], d["reason"]))
    return listed + unlisted


def _is_public(keys: Mapping[str, Any], public_keys: Mapping[str, frozenset[Any]]) -> bool:
    """Every key of the cell is one its owners declared public (a suppressed cell's key that is not
    would tell the analyst that a rare value exists)."""
    for column, value in keys.items():
        allowed = public_keys.get(column)
        if allowed is None or value is None:
            return False
        try:
            if value not in allowed:
                return False
        except TypeError:  # an unhashable key (a list): never a declared value
            return False
    return True


def public_group_keys(compiled: CompiledStage, policies: Mapping[str, DatasetPolicy]) -> dict[str, frozenset[Any]]:
    """Per group output column that outputs an input column as is, the keys every dataset showing
    it declares public: its ``values``, or its ``bins`` edges. Columns without a domain are absent."""
    out: dict[str, frozenset[Any]] = {}
    for column, sources in compiled.group_sources.items():
        allowed: frozenset[Any] | None = None
        for dataset, name in sources:
            policy = policies.get(dataset)
            domain = policy.rule(name).domain if policy is not None else None
            if domain is None:
                allowed = None
                break
            keys = frozenset(domain[1])
            allowed = keys if allowed is None else allowed & keys
        if allowed:
            out[column] = allowed
    return out


def _min_group_reason(check: UnitCheck, k: int, rule_datasets: Sequence[str]) -> str:
    return (
        f"fewer than {k} distinct {check.unit} of {', '.join(check.datasets)} in this cell "
        f"(minimum group size, strictest of {', '.join(rule_datasets)})"
    )


def _sub_cell_reason(cells: pa.Table, i: int, compiled: CompiledStage, k: int, rule_datasets: Sequence[str]) -> str:
    check = compiled.unit_checks[0]
    for sub in compiled.sub_checks:
        counts = [cells[col][i].as_py() or 0 for col in (sub.inside, sub.outside)]
        if any(0 < n < k for n in counts):
            check = compiled.unit_checks[sub.check]
            break
    return (
        f"a conditional aggregate (CASE, IF, NULLIF, COALESCE or FILTER) reads, or leaves out, fewer than {k} "
        f"distinct {check.unit} of {', '.join(check.datasets)} in this cell (minimum group size of "
        f"sub-cells, strictest of {', '.join(rule_datasets)})"
    )


def _dominance_reason(rule: _DominanceRule, checks: Sequence[UnitCheck]) -> str:
    check = checks[rule.check]
    n, k = rule.rule.n, float(rule.rule.k)
    pct = f"{k:g}"
    largest = (
        f"largest {check.unit} of {', '.join(check.datasets)} contributes"
        if n == 1
        else (f"{n} largest {check.unit} of {', '.join(check.datasets)} contribute")
    )
    return f"the {largest} at least {pct}% of a SUM or AVG in this cell (dominance rule of {rule.dataset})"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out[k] = v if v is None or isinstance(v, bool | int | float | str) else str(v)
    return out


def table_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()
