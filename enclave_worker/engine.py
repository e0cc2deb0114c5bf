"""The in-enclave SQL engine: DuckDB over the job's opened inputs, then the disclosure rules.

Security model: the engine runs only SQL that :func:`sealroom.sqlplan.compile_stage` produced from
the approved plan inside this process. DuckDB is opened with external access disabled and its
configuration locked before any analyst SQL runs, so a query cannot read files or load extensions.
Disclosure: a cell is released only when every hidden distinct-privacy-unit count reaches the
strictest minimum group size of the involved owners; otherwise only its group keys and the rule are
reported. HAVING, ORDER BY and LIMIT apply to released cells only, so they cannot be used to probe
suppressed values.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

from sealroom.errors import InvalidQueryError
from sealroom.sqlplan import DIALECT, ROW_ID, CompiledStage, InputSpec, compile_stage, order_sql

HAVING_COLUMN = "__sr_having"
RELEASABLE_COLUMN = "__sr_releasable"  # every unit count reaches k
KEEP_COLUMN = "__sr_keep"  # passes, and satisfies HAVING


@dataclass(frozen=True)
class StageOutcome:
    released: pa.Table
    suppressed: list[dict[str, Any]]
    min_group_size: int
    rule_datasets: tuple[str, ...]


def compile_for_job(sql: str, inputs: Sequence[InputSpec]) -> CompiledStage:
    """Compile, moving HAVING into a hidden boolean output evaluated after suppression."""
    tree = sqlglot.parse_one(sql, read=DIALECT)
    having = tree.args.get("having")
    if having is None:
        return compile_stage(sql, inputs)
    tree.set("having", None)
    tree.set("expressions", [*tree.expressions, exp.alias_(having.this, HAVING_COLUMN, quoted=True)])
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
    threads: int = 2,
) -> StageOutcome:
    """Run ``compiled`` over ``tables`` (engine name -> Arrow table) and apply the disclosure rules.

    Tables named in ``row_id_tables`` (inputs without a declared privacy unit) get a per-row id so
    that each row counts as one unit.
    """
    con = duckdb.connect(
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "threads": threads,
        }
    )
    try:
        for name, table in tables.items():
            if name not in row_id_tables:
                con.register(name, table)
                continue
            con.register(f"{name}__arrow", table)
            src = exp.to_identifier(f"{name}__arrow", quoted=True).sql(DIALECT)
            dst = exp.to_identifier(name, quoted=True).sql(DIALECT)
            row = exp.to_identifier(ROW_ID, quoted=True).sql(DIALECT)
            con.execute(f"CREATE VIEW {dst} AS SELECT *, row_number() OVER () AS {row} FROM {src}")
        con.execute("SET lock_configuration = true")
        # The disclosure decision is computed in the engine too: every unit count must reach k.
        k = int(min_group_size)
        checks = " AND ".join(
            f"COALESCE({exp.to_identifier(c.column, quoted=True).sql(DIALECT)} >= {k}, FALSE)"
            for c in compiled.unit_checks
        )
        having = (
            f"COALESCE({exp.to_identifier(HAVING_COLUMN, quoted=True).sql(DIALECT)}, FALSE)"
            if HAVING_COLUMN in compiled.aggregate_sql
            else "TRUE"
        )
        decided = (
            f"SELECT *, ({checks or 'TRUE'}) AS {RELEASABLE_COLUMN}, "
            f"({checks or 'TRUE'}) AND {having} AS {KEEP_COLUMN} "
            f"FROM ({compiled.aggregate_sql})"
        )
        try:
            cells = con.sql(decided).to_arrow_table()
        except duckdb.Error as exc:
            # DuckDB's messages can quote values (conversion errors); report the kind only.
            raise InvalidQueryError(
                f"the stage failed in the engine ({type(exc).__name__}); check column types and expressions"
            ) from None
        suppressed = _suppressed(cells, compiled, k, rule_datasets)
        released = cells.filter(cells[KEEP_COLUMN]).select(list(compiled.output_columns))
        if compiled.order_by or compiled.limit is not None:
            con.register("__sr_released", released)
            released = con.sql(order_sql("__sr_released", compiled.order_by, compiled.limit)).to_arrow_table()
        return StageOutcome(released, suppressed, min_group_size, tuple(rule_datasets))
    finally:
        con.close()


def _suppressed(
    cells: pa.Table,
    compiled: CompiledStage,
    k: int,
    rule_datasets: Sequence[str],
) -> list[dict[str, Any]]:
    failing = cells.filter(pc.invert(cells[RELEASABLE_COLUMN]))
    if failing.num_rows == 0:
        return []
    out: list[dict[str, Any]] = []
    groups = failing.select(list(compiled.group_columns)).to_pylist() if compiled.group_columns else None
    for i in range(failing.num_rows):
        short = [c for c in compiled.unit_checks if not (failing[c.column][i].as_py() or 0) >= k]
        check = short[0]
        out.append(
            {
                "group": _jsonable(groups[i]) if groups is not None else {},
                "rule": "min_group_size",
                "reason": (
                    f"fewer than {k} distinct {check.unit} of {', '.join(check.datasets)} in this cell "
                    f"(minimum group size, strictest of {', '.join(rule_datasets)})"
                ),
            }
        )
    out.sort(key=lambda d: [str(v) for v in d["group"].values()])
    return out


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
