"""The planner: from an analyst's SQL and the catalog to a plan every owner can check.

It refuses what Sealroom does not run (see :mod:`sealroom.sqlplan`), checks each involved dataset's
policy (on the full query: a filter a party applies itself is still a filter use of its columns),
and gives each party an input that holds only the columns the enclave's part of the query needs
plus the privacy unit (projection pushdown), and the filter the party applies itself before sealing
(filter pushdown), so the least data possible leaves it. The plan carries each involved policy,
so the enclave enforces the rules from what the owners signed, not from anything the coordinator
says later.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
import sqlglot.errors
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB

from sealroom.disclosure import check_uses
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.plan import Plan, PlanInput, Stage, stage_pushdown
from sealroom.policy import DatasetPolicy
from sealroom.sqlplan import Analysis, InputSpec, analyze, compile_stage


@dataclass(frozen=True)
class CatalogEntry:
    party: str
    dataset: str
    schema: pa.Schema
    policy: DatasetPolicy
    approximate_rows: int = 0  # 0: the owner does not share it

    @property
    def qualified(self) -> str:
        return f"{self.party}.{self.dataset}"


def catalog_from_rows(rows: list[dict[str, Any]]) -> dict[str, CatalogEntry]:
    out = {}
    for r in rows:
        schema = pa.ipc.read_schema(pa.py_buffer(r["arrow_schema"]))
        policy = DatasetPolicy.from_json(r["policy_json"])
        entry = CatalogEntry(r["party"], r["name"], schema, policy, int(r.get("approximate_rows", 0)))
        out[entry.qualified] = entry
    return out


def plan_query(
    sql: str,
    *,
    query_id: str,
    analyst: str,
    catalog: Mapping[str, CatalogEntry],
    party_keys: Mapping[str, str],
) -> tuple[Plan, Analysis]:
    schemas = {q: e.schema.names for q, e in catalog.items()}
    analysis = analyze(sql, schemas)
    check_uses(analysis.uses, {q: catalog[q].policy for q in analysis.datasets}, schemas)
    inputs = []
    for n, qualified in enumerate(analysis.datasets):
        entry = catalog[qualified]
        where = {"party": entry.party, "dataset": entry.dataset}
        if not entry.policy.allows_analyst(analyst):
            raise PolicyRefusalError(
                f"{qualified} may not be queried by analyst {analyst}: its policy lists the analysts it "
                f"allows; ask {entry.party} to add {analyst}",
                details={**where, "rule": "analysts", "suggestion": f"ask {entry.party} to allow {analyst}"},
            )
        if entry.policy.trust.mpc_only:
            raise PolicyRefusalError(
                f"{qualified} goes to no enclave (trust.mpc_only in its policy), and this version runs queries "
                f"only in attested enclaves: ask {entry.party} to accept an enclave measurement, or leave "
                f"{qualified} out of the query",
                details={
                    **where,
                    "rule": "mpc_only",
                    "suggestion": f"ask {entry.party} to accept an enclave measurement (trust.measurements)",
                },
            )
        unit = entry.policy.privacy_unit
        if unit is not None and unit not in entry.schema.names:
            raise PolicyRefusalError(
                f"the policy of {qualified} names privacy unit column {unit}, which the dataset does not have",
                details={**where, "column": unit, "rule": "privacy_unit"},
            )
        needed = set(analysis.needed_columns[qualified]) | ({unit} if unit else set())
        columns = tuple(c for c in entry.schema.names if c in needed)
        if entry.party not in party_keys:
            raise InvalidQueryError(f"party {entry.party} is not registered", details=where)
        inputs.append(
            PlanInput(
                entry.party,
                entry.dataset,
                columns,
                entry.policy,
                table=f"input_{n}",
                filter=analysis.filters[qualified],
                filter_columns=analysis.filter_columns[qualified],
            )
        )
    stage = Stage(
        id="s1",
        kind="tee",
        sql=analysis.sql,
        inputs=tuple(inputs),
        output_columns=analysis.output_columns,
        min_group_size=max(i.policy.min_group_size for i in inputs),
    )
    # Recompute the pushdown and compile exactly as the enclave will (from the plan, over the columns
    # it will receive), so a plan the enclave or a party would refuse is refused here, early.
    pushed = stage_pushdown(stage)
    compile_stage(
        pushed.residual_sql,
        [InputSpec(i.qualified, i.table, i.columns, i.policy.privacy_unit) for i in inputs],
    )
    involved = {i.party for i in inputs}
    plan = Plan(
        query_id=query_id,
        sql=analysis.sql,
        analyst=analyst,
        stages=(stage,),
        parties={p: party_keys[p] for p in sorted(involved)},
        salt=secrets.token_hex(16),
        created_at=round(time.time(), 3),
    )
    return plan, analysis


def output_rules(plan: Plan, analysis: Analysis) -> dict[str, list[str]]:
    """For each output column, the owners' rules that apply to it (for explain)."""
    stage = plan.stages[0]
    by_name = {i.qualified: i for i in stage.inputs}
    tree = sqlglot.parse_one(analysis.sql, read="duckdb")
    strictest = sorted(i.qualified for i in stage.inputs if i.policy.min_group_size == stage.min_group_size)
    out: dict[str, list[str]] = {}
    for expression, name in zip(tree.expressions, analysis.output_columns, strict=True):
        rules = [f"min {stage.min_group_size} distinct units per cell ({', '.join(strictest)})"]
        if name in analysis.group_columns:
            rules.insert(0, "group key (shown for suppressed cells too)")
        names = {c.name for c in expression.find_all(exp.Column)}
        for qualified, used in sorted(analysis.uses.items()):
            policy = by_name[qualified].policy
            for column in sorted(names & set(used)):
                rule = policy.rule(column)
                if rule.role == "measure" and (rule.min is not None or rule.max is not None):
                    rules.append(f"{qualified}.{column} clamped to [{_bound(rule.min)}, {_bound(rule.max)}]")
            if policy.dominance and any(isinstance(n, exp.Sum) for n in expression.find_all(exp.Sum)):
                d = policy.dominance
                rules.append(f"dominance ({d.n}, {d.k:g} %) of {qualified}")
        out[name] = rules
    return out


def _readable(predicate: str) -> str:
    """A pushed filter as an owner would write it: identifiers unquoted where that reads the same."""
    keywords = DuckDB.Tokenizer.KEYWORDS
    try:
        tree = sqlglot.parse_one(predicate, read="duckdb")
        for ident in tree.find_all(exp.Identifier):
            name = ident.name
            if name.isidentifier() and name == name.lower() and name.upper() not in keywords:
                ident.set("quoted", False)
        return tree.sql("duckdb")
    except sqlglot.errors.SqlglotError:
        return predicate


def _bound(v: float | None) -> str:
    return "-inf" if v is None else f"{v:g}"


def explain_text(plan: Plan, analysis: Analysis, rows: Mapping[str, int] | None = None) -> str:
    """A human-readable explanation of what would run, what each party sends, which rules apply to
    each output column, and who approves."""
    title = f"Plan for analyst {plan.analyst}" + ("" if plan.query_id == "explain" else f", query {plan.query_id}")
    lines = [title, f"  plan hash {plan.hash} (a submitted query gets its own plan and hash)", ""]
    for stage in plan.stages:
        lines.append(f"Stage {stage.id} ({stage.kind.upper()}: runs inside an attested enclave worker)")
        lines.append("  outputs and the rules that apply to them:")
        for name, rules in output_rules(plan, analysis).items():
            lines.append(f"    {name}: {'; '.join(rules)}")
        lines.append(
            "  a cell that fails a rule is suppressed: its group keys and the rule are shown, never its values"
        )
        residual = stage_pushdown(stage).residual_sql
        if any(sqlglot.parse_one(residual, read="duckdb").find_all(exp.Where)):
            lines.append(
                "  filters: the rest of WHERE (conditions across datasets or on a UNION ALL) is applied "
                "inside the enclave"
            )
        lines.append(
            "  inputs (each party applies its filter, then seals these columns to the enclave's attested key):"
        )
        for inp in stage.inputs:
            unit = inp.policy.privacy_unit or "each row"
            lines.append(
                f"    {inp.qualified}: {', '.join(inp.columns)}  "
                f"[privacy unit: {unit}; min group size {inp.policy.min_group_size}]"
            )
            if rows and rows.get(inp.qualified):
                lines.append(f"      about {rows[inp.qualified]:,} rows in the dataset (shared by its owner)")
            if inp.filter is not None:
                lines.append(f"      filter applied by {inp.party}: {_readable(inp.filter)}")
    lines.append("")
    modes: dict[str, set[str]] = {}
    for inp in plan.inputs():
        modes.setdefault(inp.party, set()).add(inp.policy.approval)
    approvers = [f"{p} ({'manual' if 'manual' in m else 'automatic'})" for p, m in sorted(modes.items())]
    lines.append(f"Approvals needed from: {', '.join(approvers)}")
    if analysis.order_by or analysis.limit is not None:
        lines.append("ORDER BY / LIMIT apply to released cells only.")
    return "\n".join(lines)
