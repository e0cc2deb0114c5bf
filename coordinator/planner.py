"""The planner: from an analyst's SQL and the catalog to a plan every owner can check.

It refuses what Sealroom does not run (see :mod:`sealroom.planning.sql`), checks each involved dataset's
policy (on the full query: a filter a party applies itself is still a filter use of its columns),
and gives each party an input that holds only the columns the enclave's part of the query needs
plus the privacy unit (projection pushdown), and the filter the party applies itself before sealing
(filter pushdown), so the least data possible leaves it. The plan carries each involved policy,
so the enclave enforces the rules from what the owners signed, not from anything the coordinator
says later.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
import sqlglot.errors
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB

from coordinator.privacy_explain import check_epsilon, dp_stage_lines, privacy_lines, refuse_epsilon_without_dp
from sealroom.cancel import UNBOUNDED, CallScope
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.bounds import measure_from_rules, representing_decimals
from sealroom.planning.checks import (
    Checker,
    check_analyst,
    check_combine_with,
    check_plan,
    check_privacy,
    strictest_datasets,
    strictest_min_group_size,
)
from sealroom.planning.disclosure import check_uses
from sealroom.planning.limits import DEFAULT_LIMITS, QueryLimits
from sealroom.planning.mpc_privacy import mpc_noise
from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Measure, Player, StageSpec
from sealroom.planning.mpc_sql import MpcQuery, mpc_query
from sealroom.planning.plan import (
    EnclaveHolder,
    HelperHolder,
    Holder,
    MpcStage,
    PartyHolder,
    Plan,
    PlanInput,
    Release,
    Stage,
    TeeStage,
    declared_domains,
    stage_pushdown,
)
from sealroom.planning.privacy import PlanPrivacy, dp_inputs_mode, needs_partition_selection, plan_privacy_for
from sealroom.planning.sql import UNION_UNIT, Analysis, InputSpec, analyze, compile_stage
from sealroom.policy import DatasetPolicy


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


def plan_query(
    sql: str,
    *,
    query_id: str,
    analyst: str,
    catalog: Mapping[str, CatalogEntry],
    party_keys: Mapping[str, str],
    helper_key: str | None = None,
    limits: QueryLimits = DEFAULT_LIMITS,
    scope: CallScope = UNBOUNDED,
    epsilon: float | None = None,
) -> tuple[Plan, Analysis]:
    """Plan ``sql``. ``helper_key``: the coordinator's Ed25519 key (hex), named in an MPC plan as the
    identity of the helper player it runs (without it such a plan cannot run). ``limits``: the caps
    on the query's size; ``scope``: the analyst's call, checked between steps (planning stops with
    DeadlineExceededError once the call is cancelled or past its deadline). ``epsilon``: what a query
    over dp datasets spends (None: the default, :data:`sealroom.planning.privacy.DEFAULT_QUERY_EPSILON`
    capped at the strictest ``max_query_epsilon``); refused for a query that reads no dp dataset."""
    check_epsilon(epsilon)
    schemas = {q: e.schema.names for q, e in catalog.items()}
    scope.check("parsing the query")
    analysis = analyze(sql, schemas, limits=limits)
    scope.check("checking the owners' column rules")
    check_uses(analysis.uses, {q: catalog[q].policy for q in analysis.datasets}, schemas)
    entries = [catalog[q] for q in analysis.datasets]
    privacy = None
    if dp_inputs_mode(entries):
        privacy = plan_privacy_for(entries, _needs_selection(analysis, entries), epsilon)
    elif epsilon is not None:
        refuse_epsilon_without_dp(entries)
    request = _Request(analysis, query_id, analyst, catalog, party_keys, privacy)
    to_enclave, own_players, mpc_reason = _enclave_split([catalog[q] for q in analysis.datasets])
    scope.check("checking the inputs")
    inputs = [_checked_input(request, n, catalog[q]) for n, q in enumerate(analysis.datasets)]
    for inp in inputs:  # first: whom the owners let their rows meet (check_plan checks it again)
        check_combine_with(inp, inputs)
    scope.check("building the plan")
    if mpc_reason is not None:
        plan = _plan_mpc(
            request, to_enclave=to_enclave, own_players=own_players, reason=mpc_reason, helper_key=helper_key
        )
        return plan, analysis
    return _plan_tee(request, inputs), analysis


def _needs_selection(analysis: Analysis, entries: list[CatalogEntry]) -> bool:
    """Whether the query's groups need partition selection (no public domain), over the columns the
    full query reads."""
    views = [
        PlanInput(e.party, e.dataset, tuple(e.schema.names), e.policy, table=f"input_{n}")
        for n, e in enumerate(entries)
    ]
    return needs_partition_selection(analysis.sql, views)


def _checked_input(request: _Request, n: int, entry: CatalogEntry) -> PlanInput:
    """The input of ``entry`` (the ``n``-th dataset the query reads) to a TEE stage: the columns the
    enclave's part of the query needs plus the privacy unit, and the filter its party applies.
    Refuses an analyst its policy does not allow, a privacy unit the dataset lacks, or a party that
    is not registered."""
    analysis = request.analysis
    where = {"party": entry.party, "dataset": entry.dataset}
    check_analyst(request.analyst, party=entry.party, dataset=entry.dataset, policy=entry.policy)
    unit = entry.policy.privacy_unit
    if unit is not None and unit not in entry.schema.names:
        raise PolicyRefusalError(
            f"the policy of {entry.qualified} names privacy unit column {unit}, which the dataset does not have",
            details={**where, "column": unit, "rule": "privacy_unit"},
        )
    needed = set(analysis.needed_columns[entry.qualified]) | ({unit} if unit else set())
    if entry.party not in request.party_keys:
        raise InvalidQueryError(f"party {entry.party} is not registered", details=where)
    return PlanInput(
        entry.party,
        entry.dataset,
        tuple(c for c in entry.schema.names if c in needed),
        entry.policy,
        table=f"input_{n}",
        filter=analysis.filters[entry.qualified],
        filter_columns=analysis.filter_columns[entry.qualified],
    )


def _plan_tee(request: _Request, inputs: list[PlanInput]) -> Plan:
    """A plan of one TEE stage over ``inputs``, checked and compiled exactly as the enclave will
    (from the plan, over the columns it will receive), so a plan the enclave or a party would refuse
    is refused here, early."""
    stage = TeeStage(
        id="s1",
        sql=request.analysis.sql,
        inputs=tuple(inputs),
        output_columns=request.analysis.output_columns,
        min_group_size=strictest_min_group_size(i.policy for i in inputs),
    )
    plan = request.plan([stage], (i.party for i in inputs))
    pushed = check_plan(plan, request.checker()).pushdowns[stage.id]
    compile_stage(
        pushed.residual_sql,
        [InputSpec(i.qualified, i.table, i.columns, i.policy.privacy_unit) for i in inputs],
    )
    return plan


def output_rules(plan: Plan, analysis: Analysis) -> dict[str, list[str]]:
    """For each output column, the owners' rules that apply to it (for explain)."""
    stage = plan.stages[0]
    assert isinstance(stage, TeeStage)
    by_name = {i.qualified: i for i in stage.inputs}
    tree = sqlglot.parse_one(analysis.sql, read="duckdb")
    strictest = strictest_datasets(stage.inputs)[1]
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


def explain_text(
    plan: Plan, analysis: Analysis, rows: Mapping[str, int] | None = None, budget: Mapping[str, str] | None = None
) -> str:
    """A human-readable explanation of what would run, what each party sends, which rules apply to
    each output column (under dp: its noise and expected error), what the query spends of each dp
    dataset's budget (``budget``: party.dataset -> what is left, in words), and who approves."""
    title = f"Plan for analyst {plan.analyst}" + ("" if plan.query_id == "explain" else f", query {plan.query_id}")
    lines = [title, f"  plan hash {plan.hash} (a submitted query gets its own plan and hash)", ""]
    mpc = bool(plan.mpc_stages())
    if mpc:
        lines += _explain_mpc(plan)
    mechanisms = check_privacy(plan)
    for stage in () if mpc else plan.tee_stages():
        lines.append(f"Stage {stage.id} ({stage.kind.upper()}: runs inside an attested enclave worker)")
        if stage.id in mechanisms:
            lines += dp_stage_lines(mechanisms[stage.id], analysis.output_columns)
        else:
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
    lines += [*privacy_lines(plan, budget), ""]
    modes: dict[str, set[str]] = {}
    for inp in plan.inputs():
        modes.setdefault(inp.party, set()).add(inp.policy.approval)
    approvers = [f"{p} ({'manual' if 'manual' in m else 'automatic'})" for p, m in sorted(modes.items())]
    lines.append(f"Approvals needed from: {', '.join(approvers)}")
    if analysis.order_by or analysis.limit is not None:
        lines.append("ORDER BY / LIMIT apply to released cells only.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# MPC and hybrid plans (see docs/mpc.md, "Planning")

ENCLAVE_PLAYER = "enclave"
COORDINATOR_PLAYER = "coordinator"
MIN_PLAYERS = 3
# Player names the platform uses for the players it runs: no party may register under them.
RESERVED_PARTY_NAMES = frozenset({ENCLAVE_PLAYER, COORDINATOR_PLAYER})
MAX_GROUPS = 100_000  # the public group domain of one MPC stage (the product of its columns' domains)
FLOAT_DECIMALS = 4  # fixed-point decimals of a floating-point measure (fewer if its bounds would overflow)


@dataclass(frozen=True)
class _MpcReason:
    """Why a query must run as MPC: the dataset that refuses every enclave (or all of them, when no
    enclave measurement is common to all) and the words for it."""

    entry: CatalogEntry
    rule: str  # "mpc_only" | "no_common_enclave"
    text: str


def _refuses_enclaves(entry: CatalogEntry) -> bool:
    trust = entry.policy.trust
    return trust.mpc_only or trust.measurements == ()


def _enclave_split(
    entries: list[CatalogEntry],
) -> tuple[list[CatalogEntry], list[CatalogEntry], _MpcReason | None]:
    """(datasets streamed to the enclave, datasets whose owners run their own MPC players, why MPC).

    - every dataset accepts an enclave, and the datasets that list accepted measurements
      (``trust.measurements``) have one in common: no MPC (the plan is a TEE plan as before);
    - some datasets accept no enclave (``trust.mpc_only``, or an empty measurement list), and the
      others have a measurement in common: a hybrid plan (the others stream to the enclave, which
      joins the MPC stage as one player);
    - the datasets that accept enclaves have no measurement in common: every owner runs its own
      player (no enclave holds input).
    """
    refusing = [e for e in entries if _refuses_enclaves(e)]
    accepting = [e for e in entries if not _refuses_enclaves(e)]
    lists = [set(e.policy.trust.measurements or ()) for e in accepting if e.policy.trust.measurements is not None]
    if lists and not set.intersection(*lists):
        named = ", ".join(e.qualified for e in accepting if e.policy.trust.measurements is not None)
        return (
            [],
            entries,
            _MpcReason(
                accepting[0],
                "no_common_enclave",
                f"no enclave measurement is accepted by every involved dataset (the trust.measurements of {named} "
                "have none in common)",
            ),
        )
    if not refusing:
        return entries, [], None
    first = refusing[0]
    why = "trust.mpc_only" if first.policy.trust.mpc_only else "an empty trust.measurements"
    return (
        accepting,
        refusing,
        _MpcReason(first, "mpc_only", f"{first.qualified} goes to no enclave ({why} in its policy)"),
    )


def _cannot_run(reason: _MpcReason, message: str, mpc_rule: str, suggestion: str, **details: Any) -> PolicyRefusalError:
    e = reason.entry
    # The other way to make it runnable: the owners agree on an enclave.
    suggestion += (
        f"; or ask {e.party} to accept an enclave measurement (trust.measurements), so that the query runs in the "
        "enclave"
        if reason.rule == "mpc_only"
        else "; or ask the owners to accept a common enclave measurement (trust.measurements)"
    )
    return PolicyRefusalError(
        f"{reason.text}, so this query must run as MPC, and MPC cannot run it: {message}. To make it runnable: "
        f"{suggestion}",
        details={
            "party": e.party,
            "dataset": e.dataset,
            **{k: v for k, v in details.items() if v is not None},
            "rule": reason.rule,
            "mpc_rule": mpc_rule,
            "suggestion": suggestion,
        },
    )


def _decimals(column: str, fields: list[pa.Field]) -> int | None:
    """Fixed-point decimals for a measure: 0 for integers, the scale of decimals, FLOAT_DECIMALS for
    floating point; None for a non-numeric column."""
    out = 0
    for f in fields:
        t = f.type
        if pa.types.is_integer(t):
            continue
        if pa.types.is_decimal(t):
            out = max(out, min(int(t.scale), 12))  # type: ignore[attr-defined]
        elif pa.types.is_floating(t):
            out = max(out, FLOAT_DECIMALS)
        else:
            return None
    return out


def _mpc_domain(
    q: MpcQuery, catalog: Mapping[str, CatalogEntry], reason: _MpcReason
) -> tuple[list[GroupColumn], list[list[Any]]]:
    """The stage's group-by columns and public domain, from the owners' declarations: the union of
    the declared ``values`` (first-declared order), or the ``bins`` every owner declares alike."""
    group_by: list[GroupColumn] = []
    keys: list[list[Any]] = []
    try:
        declared = declared_domains(q.group_columns, [(ds, catalog[ds].policy) for ds in q.datasets])
    except InvalidQueryError as err:
        d = err.details
        raise _cannot_run(
            reason,
            err.message,
            "domain",
            str(d["suggestion"]),
            column=d.get("column"),
            domain_dataset=d.get("domain_dataset"),
        ) from None
    for col, (kind, declared_keys) in zip(q.group_columns, declared, strict=True):
        if kind == "bins":
            for ds in q.datasets:
                t = catalog[ds].schema.field(col).type
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
                    raise _cannot_run(
                        reason,
                        f"{ds}.{col} is not numeric, so it cannot be grouped into the declared bins",
                        "domain",
                        f"declare values (not bins) for {col}",
                        column=col,
                    )
            g = GroupColumn(col, declared_keys)
            group_by.append(g)
            keys.append(g.labels())
        else:
            group_by.append(GroupColumn(col))
            keys.append(list(declared_keys))
    size = 1
    for k in keys:
        size *= len(k)
    if size > MAX_GROUPS:
        raise _cannot_run(
            reason,
            f"the public group domain of {', '.join(q.group_columns)} has {size:,} cells, more than {MAX_GROUPS:,}",
            "domain",
            "group by fewer columns, or declare coarser domains",
        )
    return group_by, keys


@dataclass(frozen=True)
class _Request:
    """What every plan of one query is made from: the analysis of its SQL, who asks, the catalog
    and the parties' signing keys."""

    analysis: Analysis
    query_id: str
    analyst: str
    catalog: Mapping[str, CatalogEntry]
    party_keys: Mapping[str, str]
    privacy: PlanPrivacy | None = None  # a query over dp datasets: what it spends

    def plan(self, stages: list[Stage], parties: Iterable[str]) -> Plan:
        """A new plan of ``stages`` (its own salt and time), naming the keys of ``parties``."""
        return Plan(
            query_id=self.query_id,
            sql=self.analysis.sql,
            analyst=self.analyst,
            stages=tuple(stages),
            parties={p: self.party_keys[p] for p in sorted(set(parties))},
            salt=secrets.token_hex(16),
            created_at=round(time.time(), 3),
            privacy=self.privacy,
        )

    def checker(self, count_star: Callable[[str], bool] | None = None) -> Checker:
        """The planner as a checker of its own plans: every input, over the registered schemas
        (``count_star``: whether COUNT(col) may run as COUNT(*); for an MPC stage)."""
        columns = {q: e.schema.names for q, e in self.catalog.items()}
        return Checker(columns=columns) if count_star is None else Checker(columns=columns, count_star=count_star)


def _plan_mpc(
    request: _Request,
    *,
    to_enclave: list[CatalogEntry],
    own_players: list[CatalogEntry],
    reason: _MpcReason,
    helper_key: str | None = None,
) -> Plan:
    """An MPC plan (every owner runs a player) or a hybrid plan (owners who accept the enclave stream
    to a TEE stage whose enclave joins the MPC stage as one more player), or the refusal saying why
    the query cannot run as MPC and what would make it runnable."""
    q = _mpc_query(request, reason)
    entries = [request.catalog[ds] for ds in q.datasets]
    group_by, keys = _mpc_domain(q, request.catalog, reason)
    _refuse_unapplied_dominance(q, entries, reason)
    aggregates, decimals = _mpc_aggregates(q, entries, reason)
    mpc_id = "s2" if to_enclave else "s1"
    players, holders = _mpc_players(own_players, to_enclave, helper_key, reason)
    units = any(e.policy.privacy_unit for e in entries)

    def spec_with(measures: tuple[Measure, ...]) -> StageSpec:
        return StageSpec(
            session_id=f"{request.query_id}-{mpc_id}",
            group_by=tuple(group_by),
            domain=tuple(itertools.product(*keys)),
            aggregates=tuple(aggregates),
            players=tuple(players),
            measures=measures,
            min_group_size=strictest_min_group_size(e.policy for e in entries),
            threshold_on="units" if units else "rows",
            unit_column=UNION_UNIT if units else None,
        )

    spec = _mpc_spec(spec_with, entries, decimals, reason)
    if request.privacy is not None:
        request, spec = _mpc_dp(request, spec, entries, [*own_players, *to_enclave], q, reason)
    stages: list[Stage] = []
    if to_enclave:
        stages.append(
            TeeStage(
                id="s1",
                sql=request.analysis.sql,
                inputs=tuple(_mpc_input(request.analysis, q, e) for e in to_enclave),
                output_columns=(),
                min_group_size=spec.min_group_size,
                feeds=mpc_id,
            )
        )
    stages.append(
        MpcStage(
            id=mpc_id,
            sql=request.analysis.sql,
            inputs=tuple(_mpc_input(request.analysis, q, e) for e in own_players),
            output_columns=request.analysis.output_columns,
            min_group_size=spec.min_group_size,
            spec=spec,
            holders=holders,
            release=Release.of(q),
        )
    )
    plan = request.plan(stages, (e.party for e in entries))
    # Check the plan as every party and the enclave will, from the plan alone. COUNT(col) ran as
    # COUNT(*) where no registered schema lets col hold NULL (see _mpc_aggregates).
    check_plan(plan, request.checker(lambda col: not any(e.schema.field(col).nullable for e in entries)))
    return plan


def _mpc_query(request: _Request, reason: _MpcReason) -> MpcQuery:
    """What the MPC stage computes, or the refusal saying why MPC cannot run the query."""
    schemas = {q: e.schema.names for q, e in request.catalog.items()}
    try:
        return mpc_query(request.analysis.sql, schemas)
    except InvalidQueryError as err:
        d = err.details
        raise _cannot_run(
            reason,
            err.message,
            str(d.get("rule", "sql")),
            str(d.get("suggestion", "rewrite the query")),
            column=d.get("column"),
        ) from None


def _refuse_unapplied_dominance(q: MpcQuery, entries: list[CatalogEntry], reason: _MpcReason) -> None:
    """Owners' rules the MPC does not apply itself: refuse rather than release without them."""
    sums = [a for a in q.aggregates if a[1] in ("sum", "avg")]
    for e in entries:
        if e.policy.dominance is not None and sums:
            raise _cannot_run(
                reason,
                f"{e.qualified}'s policy has a dominance rule, which MPC stages do not apply, and the query asks "
                f"for {sums[0][1].upper()}({sums[0][2]})",
                "dominance",
                f"drop SUM and AVG from the query, or ask {e.party} to lift the dominance rule",
                column=sums[0][2],
            )


def _mpc_aggregates(
    q: MpcQuery, entries: list[CatalogEntry], reason: _MpcReason
) -> tuple[list[Aggregate], dict[str, int]]:
    """The stage's aggregates, and the fixed-point decimals of each measure they aggregate (in
    first-aggregated order). COUNT(col) of a column that holds no NULL anywhere is COUNT(*)."""
    aggregates: list[Aggregate] = []
    measured: list[str] = []
    decimals: dict[str, int] = {}
    for name, func, col in q.aggregates:
        if col is not None and func == "count" and any(e.policy.rule(col).role != "measure" for e in entries):
            if any(e.schema.field(col).nullable for e in entries):
                raise _cannot_run(
                    reason,
                    f"COUNT({col}) needs {col} declared as a measure with bounds in every involved policy",
                    "count_column",
                    "use COUNT(*)",
                    column=col,
                )
            col = None
        aggregates.append(Aggregate(name, func, col))
        if col is not None and col not in measured:
            measured.append(col)
    for col in measured:
        dec = _decimals(col, [e.schema.field(col) for e in entries])
        if dec is None:
            raise _cannot_run(
                reason, f"{col} is not numeric", "measure", f"aggregate a numeric column, not {col}", column=col
            )
        decimals[col] = dec
    return aggregates, decimals


def _mpc_players(
    own_players: list[CatalogEntry], to_enclave: list[CatalogEntry], helper_key: str | None, reason: _MpcReason
) -> tuple[list[Player], dict[int, Holder]]:
    """Players and what each holds: each owner of an MPC-side dataset runs one, then the enclave
    holding the others' partials, then helpers holding no input until there are three."""
    players: list[Player] = []
    holders: dict[int, Holder] = {}
    for e in own_players:
        if all(p.name != e.party for p in players):
            holders[len(players)] = PartyHolder(e.party, tuple(x.dataset for x in own_players if x.party == e.party))
            players.append(Player(e.party))
    if to_enclave:
        holders[len(players)] = EnclaveHolder("s1")
        players.append(Player(ENCLAVE_PLAYER))
    # One helper at most: the coordinator runs it, and at threshold t = 1 a second player run by the
    # coordinator would give it two of three shares, enough to reconstruct the owners' inputs.
    if len(players) < MIN_PLAYERS:
        # The plan names the helper's identity key, so every player (and every owner approving the
        # plan) knows which key the helper's offer must carry: nobody else can run it.
        holders[len(players)] = HelperHolder(COORDINATOR_PLAYER, helper_key or None)
        players.append(Player(COORDINATOR_PLAYER, holds_input=False))
    if len(players) < MIN_PLAYERS:
        raise _cannot_run(
            reason,
            f"an MPC stage needs at least {MIN_PLAYERS} players and only one owner ({players[0].name}) takes part: "
            "a second helper would be run by the coordinator too, which could then reconstruct its input",
            "players",
            "add a second owner's dataset to the query, or let the owner accept an enclave measurement",
        )
    return players, holders


def _mpc_spec(
    spec_with: Callable[[tuple[Measure, ...]], StageSpec],
    entries: list[CatalogEntry],
    decimals: dict[str, int],
    reason: _MpcReason,
) -> StageSpec:
    """The stage's spec (``spec_with`` its measures), its measures' bounds the intersection of the
    owners'; its fixed-point decimals represent those bounds exactly (``representing_decimals``),
    so the players clamp to exactly what the enclave would; a measure whose bounds would overflow
    gets fewer fixed-point decimals (its bounds then rounded inward) before the stage is refused."""
    for column in decimals:  # decimals that represent the bounds exactly
        decimals[column] = representing_decimals([e.policy.rule(column) for e in entries], decimals[column])
    while True:
        try:
            measures = [
                measure_from_rules(
                    col,
                    [(e.qualified, e.policy.rule(col)) for e in entries],
                    decimals=decimals[col],
                    nullable=any(e.schema.field(col).nullable for e in entries),
                )
                for col in decimals
            ]
            return spec_with(tuple(measures))
        except InvalidQueryError as err:
            col = err.details.get("column")
            if err.details.get("rule") == "overflow" and col in decimals and decimals[col] > 0:
                decimals[col] -= 1  # fewer fixed-point decimals before giving up
                continue
            d = err.details
            suggestion = {
                "bounds": f"declare min and max for {d.get('column')} in {d.get('dataset', 'every involved')} policy",
                "players": "involve parties with distinct names",
            }.get(str(d.get("rule")), "see the message")
            raise _cannot_run(
                reason, err.message, str(d.get("rule", "spec")), suggestion, column=d.get("column")
            ) from None


def _mpc_dp(
    request: _Request,
    spec: StageSpec,
    entries: list[CatalogEntry],
    holders: list[CatalogEntry],
    q: MpcQuery,
    reason: _MpcReason,
) -> tuple[_Request, StageSpec]:
    """A dp MPC stage: its public domain is released whole, so the plan spends no delta; its spec
    carries the noise its input holders add (:func:`sealroom.planning.mpc_privacy.mpc_noise`, the
    mechanism every checker recomputes)."""
    assert request.privacy is not None
    request = dataclasses.replace(request, privacy=plan_privacy_for(entries, False, request.privacy.epsilon))
    assert request.privacy is not None
    inputs = [_mpc_input(request.analysis, q, e) for e in holders]
    _, noise = mpc_noise(
        request.analysis.sql, inputs, request.privacy, spec, analyst=request.analyst, plan_inputs=inputs
    )
    try:
        return request, dataclasses.replace(spec, dp=noise)
    except InvalidQueryError as err:
        d = err.details
        raise _cannot_run(
            reason,
            err.message,
            str(d.get("rule", "dp")),
            "ask for a larger epsilon, or ask the owners for narrower bounds",
            column=d.get("column"),
        ) from None


def _mpc_input(analysis: Analysis, q: MpcQuery, e: CatalogEntry) -> PlanInput:
    """The input of ``e`` to an MPC or feeding stage: what its partials read plus its privacy unit,
    and the filter its owner applies."""
    n = analysis.datasets.index(e.qualified)
    unit_col = e.policy.privacy_unit
    needed = set(q.columns[e.qualified]) | ({unit_col} if unit_col else set())
    flt = q.filters.get(e.qualified)
    return PlanInput(
        e.party,
        e.dataset,
        tuple(c for c in e.schema.names if c in needed),
        e.policy,
        table=f"input_{n}",
        filter=flt.sql if flt is not None else None,
        filter_columns=flt.columns if flt is not None else (),
    )


def _explain_mpc(plan: Plan) -> list[str]:
    """Explain lines for an MPC or hybrid plan: both stages and who sees what."""
    lines: list[str] = []
    for stage in plan.stages:
        if isinstance(stage, TeeStage):
            lines.append(
                f"Stage {stage.id} (TEE: runs inside an attested enclave worker; releases nothing, feeds stage "
                f"{stage.feeds})"
            )
            lines.append(
                "  the enclave computes these parties' partial aggregates over the public group domain of stage "
                f"{stage.feeds}, and joins it as the player {ENCLAVE_PLAYER!r} holding them"
            )
            lines.append(
                "  inputs (each party applies its filter, then seals these columns to the enclave's attested key):"
            )
            _explain_inputs(stage, lines, sees="the enclave sees these rows; no other party or player does")
            continue
        spec = stage.spec
        info = spec.explain()
        lines.append(f"Stage {stage.id} (MPC: secure multiparty computation with MPyC; releases the output)")
        lines.append(f"  trust assumption: {info['trust_assumption']}")
        lines.append("  players:")
        for p in info["players"]:
            h = stage.holders.get(p["index"])
            if isinstance(h, EnclaveHolder):
                role = f"holds the partial aggregates the enclave computed in stage {h.stage}"
            elif isinstance(h, PartyHolder):
                role = f"holds the partial aggregates of {', '.join(h.party + '.' + d for d in h.datasets)}"
            else:
                role = "helper: holds no input, only computes on secret shares"
            lines.append(f"    {p['index']}: {p['name']} ({role})")
        groups = " x ".join(
            f"{g.name} ({'bins ' + ', '.join(g.labels()) if g.bins is not None else 'declared values'})"
            for g in spec.group_by
        )
        lines.append(f"  public group domain: {info['groups']} cells: {groups}")
        rule = info["rule"]
        on = "distinct privacy units" if rule["on"] == "units" else "rows"
        combine = (
            " (some single input holder must hold them: units are not known to be disjoint across players)"
            if rule["combine"] == "any_player"
            else ""
        )
        if spec.dp is not None:
            lines.append("  differential privacy: every cell is opened with noise its input holders add; no threshold")
            lines += [f"    {m['key']}: ±{m['ci95_half_width']:.4g} (95 %)" for m in spec.dp.privacy["mechanisms"]]
        else:
            lines.append(
                f"  rule applied inside the MPC: a cell passes with at least {rule['min_group_size']} {on}{combine}"
            )
        if spec.measures:
            bounds = "; ".join(f"{m.column} in [{m.min:g}, {m.max:g}], {m.decimals} decimals" for m in spec.measures)
            lines.append(f"  measures clamped to the owners' bounds: {bounds}")
        lines.append("  opened: " + "; ".join(info["opened"]))
        lines.append(f"  never opened: {info['never_opened']}")
        lines.append(f"  transport: {info['transport']}")
        if stage.release.having:
            lines.append(f"  HAVING {stage.release.having} applies to released cells only")
        if stage.inputs:
            lines.append(
                "  parties running their own player (they compute partials on their own rows; nothing leaves "
                "them but secret shares):"
            )
            _explain_inputs(stage, lines, sees="nobody sees these rows but their owner")
    return lines


def _explain_inputs(stage: Stage, lines: list[str], *, sees: str) -> None:
    for inp in stage.inputs:
        unit = inp.policy.privacy_unit or "each row"
        lines.append(
            f"    {inp.qualified}: {', '.join(inp.columns)}  [privacy unit: {unit}; min group size "
            f"{inp.policy.min_group_size}]"
        )
        if inp.filter is not None:
            lines.append(f"      filter applied by {inp.party}: {_readable(inp.filter)}")
    lines.append(f"    ({sees})")
