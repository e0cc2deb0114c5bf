"""Differential privacy for a query: what it costs, how it is noised, and how accurate it is.

A plan that reads a dataset whose owner chose ``mode = "dp"`` (:class:`sealroom.privacy_rule.PrivacyRule`)
carries a privacy block (:class:`PlanPrivacy`: the epsilon the analyst asked for and the delta it
spends), covered by the plan hash each owner signs. Everything else is derived from the plan alone,
by :func:`dp_mechanism`, which the planner (for ``explain``), every owner's agent (before it
approves and charges its budget) and the enclave (which adds the noise) all call, so they agree on
every sensitivity and noise scale without trusting each other:

- contribution bounds per dp input (``max_groups_per_unit``, ``max_rows_per_unit``), which the
  enclave enforces on the joined rows, per unit, before aggregating;
- one measurement per distinct aggregate (AVG costs a SUM and a COUNT), plus partition selection
  when the groups have no public domain; the query's epsilon is split equally among them (basic
  composition), delta goes to partition selection only;
- noise: OpenDP's discrete Laplace for counts, its floating-point-safe Laplace for sums
  (:mod:`enclave_worker.dp` samples it); scale = L1 sensitivity / epsilon of the measurement.

Refusals are PolicyRefusalError naming the rule (``privacy_mode``, ``max_query_epsilon``,
``dp_aggregate``, ``dp_join``) and saying what to change. docs/privacy.md explains the accounting.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.resolve import DIALECT, Resolved, Source, expanded_projections, projected_columns, resolve
from sealroom.policy_roles import MAX_DOMAIN_VALUES

DEFAULT_QUERY_EPSILON = 0.5
CONFIDENCE = 0.95

__all__ = [
    "CONFIDENCE",
    "DEFAULT_QUERY_EPSILON",
    "Charge",
    "ContributionBound",
    "DpMechanism",
    "DpOutput",
    "Measurement",
    "PlanPrivacy",
    "Selection",
    "charges",
    "dp_inputs_mode",
    "dp_mechanism",
    "laplace_ci95",
    "plan_privacy_for",
    "selection_threshold",
]


@dataclass(frozen=True)
class PlanPrivacy:
    """The privacy block of a plan: ``{"mode": "dp", "epsilon": E, "delta": D}``."""

    epsilon: float
    delta: float
    mode: str = "dp"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, d: Any) -> PlanPrivacy:
        if (
            not isinstance(d, dict)
            or set(d) != {"mode", "epsilon", "delta"}
            or d["mode"] != "dp"
            or not _number(d["epsilon"])
            or not _number(d["delta"])
            or not d["epsilon"] > 0
            or not 0 <= d["delta"] < 1
        ):
            raise InvalidQueryError("plan is inconsistent: malformed privacy block")
        return cls(float(d["epsilon"]), float(d["delta"]))


@dataclass(frozen=True)
class Charge:
    """What one released plan spends of one dataset's budget."""

    dataset: str  # party.dataset
    scope: str  # "analyst:<name>" or "collaboration"
    epsilon: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "scope": self.scope, "epsilon": self.epsilon, "delta": self.delta}


@dataclass(frozen=True)
class ContributionBound:
    dataset: str
    unit: str
    max_groups: int
    max_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "unit": self.unit, "max_groups": self.max_groups, "max_rows": self.max_rows}


@dataclass(frozen=True)
class Measurement:
    """One noisy aggregate per group: ``func`` over ``argument`` (DuckDB SQL over the query's
    aliases; None for COUNT(*)), only on rows where ``condition`` holds (None: all rows)."""

    key: str
    func: str  # "count" | "count_distinct" | "sum"
    argument: str | None
    condition: str | None
    sensitivity: float  # L1, over all groups, of one unit
    discrete: bool  # integer noise (counts)
    epsilon: float
    scale: float
    lo: float | None = None  # a sum's clamped range
    hi: float | None = None

    @property
    def ci95(self) -> float:
        """Half-width of the 95 % interval of this measurement's noise."""
        return laplace_ci95(self.scale, discrete=self.discrete)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "aggregate": self.func,
            "mechanism": "discrete_laplace" if self.discrete else "laplace",
            "sensitivity": self.sensitivity,
            "epsilon": self.epsilon,
            "scale": self.scale,
            "ci95_half_width": self.ci95,
        }


@dataclass(frozen=True)
class DpOutput:
    """An output column released under dp: its aggregate and the measurements it is computed from."""

    column: str
    func: str  # "count" | "count_distinct" | "sum" | "avg"
    measurements: tuple[str, ...]  # keys: one, or (sum, count) for AVG
    lo: float | None = None  # AVG is clamped to its measure's range
    hi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "aggregate": self.func, "measurements": list(self.measurements)}


@dataclass(frozen=True)
class Selection:
    """Partition selection: a group is released only when its noisy count of (bounded) rows
    reaches ``threshold``."""

    epsilon: float
    delta: float
    scale: float
    threshold: int

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "scale": self.scale, "threshold": self.threshold}


@dataclass(frozen=True)
class DpMechanism:
    """How a dp stage is released (see the module docstring)."""

    epsilon: float
    delta: float
    bounds: tuple[ContributionBound, ...]
    group_columns: tuple[str, ...]
    group_sql: tuple[str, ...]  # the GROUP BY expressions (DuckDB SQL over the query's aliases)
    # Every group key released (each with noise): the public domain, or ((),) for a query without
    # GROUP BY (one cell); None: the groups go through partition selection.
    domain: tuple[tuple[Any, ...], ...] | None
    outputs: tuple[DpOutput, ...]
    measurements: tuple[Measurement, ...]
    selection: Selection | None
    max_groups: int  # G: the largest max_groups_per_unit of the dp inputs
    max_rows: int  # R

    def measurement(self, key: str) -> Measurement:
        return next(m for m in self.measurements if m.key == key)

    def output(self, column: str) -> DpOutput | None:
        return next((o for o in self.outputs if o.column == column), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "dp",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "contribution_bounds": [b.to_dict() for b in self.bounds],
            "outputs": [o.to_dict() for o in self.outputs],
            "mechanisms": [m.to_dict() for m in self.measurements],
            "groups": "public domain" if self.domain is not None else "partition selection",
            "partition_selection": self.selection.to_dict() if self.selection is not None else None,
        }

    def expected_error(self, column: str) -> str:
        """The 95 % error of output ``column``, as explain shows it."""
        out = self.output(column)
        if out is None:
            return ""
        if out.func == "avg":
            s, c = (self.measurement(k) for k in out.measurements)
            return f"±({s.ci95:.4g} + |avg|·{c.ci95:.4g}) / n for a group of n rows"
        return f"±{self.measurement(out.measurements[0]).ci95:.4g}"


# --------------------------------------------------------------------------------------------
# modes and the plan's privacy block


def dp_inputs_mode(inputs: Sequence[Any]) -> bool:
    """Whether a plan over ``inputs`` (PlanInputs, or anything with ``qualified`` and ``policy``) is
    released under dp: every input dp, or none. Mixing is refused (rule ``privacy_mode``): exact
    minimum-group-size or dominance decisions over a threshold dataset's rows joined with a dp
    dataset's rows would depend on the dp owner's units, outside any noise."""
    dp = [i for i in inputs if i.policy.dp is not None]
    if not dp:
        return False
    other = [i for i in inputs if i.policy.dp is None]
    if other:
        a, b = dp[0], other[0]
        raise PolicyRefusalError(
            f"{a.qualified} is released only with differential privacy and {b.qualified} only under exact "
            "thresholds; one query cannot combine them: query them separately, or ask the owners to choose "
            "the same privacy mode",
            details={
                "dataset": a.qualified,
                "other_dataset": b.qualified,
                "rule": "privacy_mode",
                "suggestion": f"query {a.qualified} and {b.qualified} separately",
            },
        )
    return True


def plan_privacy_for(inputs: Sequence[Any], delta_needed: bool, epsilon: float | None) -> PlanPrivacy:
    """The privacy block a dp plan over ``inputs`` carries: ``epsilon`` (the analyst's, or
    :data:`DEFAULT_QUERY_EPSILON` capped at the strictest ``max_query_epsilon``) and the strictest
    delta when partition selection needs one. Refuses (``max_query_epsilon``) an epsilon above the
    strictest cap."""
    rules = [(i.qualified, i.policy.dp) for i in inputs]
    cap_dataset, cap = min(((q, r.max_query_epsilon) for q, r in rules), key=lambda x: x[1])
    if epsilon is None:
        epsilon = min(DEFAULT_QUERY_EPSILON, cap)
    if not _number(epsilon) or not epsilon > 0:
        raise InvalidQueryError("epsilon must be a positive number, e.g. --epsilon 0.5", details={"rule": "epsilon"})
    if epsilon > cap:
        raise PolicyRefusalError(
            f"epsilon {epsilon:g} is more than {cap_dataset} allows for one query (max_query_epsilon = {cap:g}); "
            f"ask for at most {cap:g}",
            details={
                "dataset": cap_dataset,
                "rule": "max_query_epsilon",
                "epsilon": float(epsilon),
                "max_query_epsilon": cap,
                "suggestion": f"--epsilon {cap:g}",
            },
        )
    delta = min(r.delta for _, r in rules) if delta_needed else 0.0
    return PlanPrivacy(float(epsilon), delta)


def charges(analyst: str, inputs: Iterable[Any], privacy: PlanPrivacy) -> list[Charge]:
    """What a released dp plan charges: (epsilon, delta) to each dp dataset it reads, once, in
    the scope its owner chose."""
    out: dict[str, Charge] = {}
    for i in inputs:
        rule = i.policy.dp
        if rule is not None and i.qualified not in out:
            out[i.qualified] = Charge(i.qualified, rule.scope_key(analyst), privacy.epsilon, privacy.delta)
    return [out[k] for k in sorted(out)]


# --------------------------------------------------------------------------------------------
# noise and intervals


def laplace_ci95(scale: float, *, discrete: bool = False) -> float:
    """Half-width t of the 95 % interval of Laplace noise of ``scale`` (P(|X| > t) <= 5 %): b·ln 20
    for the continuous law; for the discrete Laplace P(k) ∝ exp(-|k|/b) the smallest integer t with
    P(|X| > t) = 2 e^{-(t+1)/b} / (1 + e^{-1/b}) <= 5 %."""
    if scale <= 0:
        return 0.0
    alpha = 1 - CONFIDENCE
    if not discrete:
        return scale * math.log(1 / alpha)
    q = math.exp(-1 / scale)
    t = math.ceil(scale * math.log(2 / (alpha * (1 + q)))) - 1
    return float(max(t, 0))


def selection_threshold(max_groups: int, max_rows: int, scale: float, delta: float) -> int:
    """The smallest threshold at which OpenDP's Laplace partition selection over per-group counts
    (one unit: at most ``max_groups`` groups, ``max_rows`` each) spends at most ``delta``: from the
    closed form R + b·ln(G / 2δ), raised until OpenDP's own privacy map agrees."""
    import opendp.prelude as dp  # noqa: PLC0415 - loaded only where partition selection is planned

    dp.enable_features("contrib")
    domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=int))
    metric = dp.l01inf_distance(dp.absolute_distance(T=int))
    tau = max(1, math.ceil(max_rows + scale * math.log(max_groups / (2 * delta))))
    for _ in range(64):
        m = dp.m.make_laplace_threshold(domain, metric, scale=scale, threshold=tau)
        _, spent = m.map((max_groups, max_groups * max_rows, max_rows))
        if spent <= delta:
            return tau
        tau += max(1, math.ceil(scale / 8))
    raise InvalidQueryError("partition selection found no threshold for this delta", details={"rule": "dp_groups"})


# --------------------------------------------------------------------------------------------
# the mechanism of a stage


def _refuse(message: str, rule: str, **details: Any) -> PolicyRefusalError:
    return PolicyRefusalError(message, details={"rule": rule, **{k: v for k, v in details.items() if v is not None}})


def dp_mechanism(
    sql: str,
    inputs: Sequence[Any],
    privacy: PlanPrivacy,
    *,
    min_group_size: int | None = None,
    public_domain: tuple[tuple[Any, ...], ...] | None = None,
) -> DpMechanism:
    """The mechanism of a dp stage running ``sql`` over ``inputs`` (PlanInputs: ``qualified``,
    ``columns``, ``filter_columns``, ``policy``) with the plan's ``privacy`` block. Deterministic: the
    planner, the agents and the enclave compute the same. Raises PolicyRefusalError for what dp
    mode does not release (see the module docstring) and InvalidQueryError for malformed SQL."""
    by_name = {i.qualified: i for i in inputs}
    schemas = {i.qualified: [*i.columns, *(c for c in i.filter_columns if c not in i.columns)] for i in inputs}
    r = resolve(sql, schemas)
    _check_joins(r, by_name)
    g = max(i.policy.dp.max_groups_per_unit for i in inputs)
    rows = max(i.policy.dp.max_rows_per_unit for i in inputs)
    bounds = tuple(
        ContributionBound(
            i.qualified, i.policy.privacy_unit, i.policy.dp.max_groups_per_unit, i.policy.dp.max_rows_per_unit
        )
        for i in inputs
    )
    outputs, specs = _outputs(r, by_name)
    _check_having(r, specs)
    if public_domain is not None:  # an MPC stage's: every cell of its domain is opened
        domain: tuple[tuple[Any, ...], ...] | None = public_domain
    else:
        domain = _public_domain(r, by_name) if r.groups else ((),)
    n_measurements = len(specs) + (1 if domain is None else 0)
    each = privacy.epsilon / n_measurements
    measurements = []
    for key, (func, arg, cond, lo, hi) in specs.items():
        if func == "sum":
            assert lo is not None and hi is not None
            sens = g * rows * max(abs(lo), abs(hi))
        elif func == "count_distinct":
            sens = float(g)
        else:
            sens = float(g * rows)
        measurements.append(Measurement(key, func, arg, cond, sens, func != "sum", each, sens / each, lo, hi))
    selection = None
    if domain is None:
        if privacy.delta <= 0:
            raise _refuse(
                "the groups have no public domain, so releasing them needs partition selection, which spends "
                "delta; the plan's privacy block spends none (re-plan the query)",
                "dp_groups",
            )
        scale = g * rows / each
        threshold = selection_threshold(g, rows, scale, privacy.delta)
        selection = Selection(each, privacy.delta, scale, max(threshold, int(min_group_size or 0)))
    elif privacy.delta != 0:
        raise _refuse("the plan spends delta although its groups have a public domain (re-plan the query)", "dp_groups")
    return DpMechanism(
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        bounds=bounds,
        group_columns=tuple(r.group_names),
        group_sql=tuple(gx.sql(DIALECT) for gx in r.groups),
        domain=domain,
        outputs=outputs,
        measurements=tuple(measurements),
        selection=selection,
        max_groups=g,
        max_rows=rows,
    )


def needs_partition_selection(sql: str, inputs: Sequence[Any]) -> bool:
    """Whether a dp stage over ``inputs`` groups by a column without a public domain (it then
    spends delta on partition selection)."""
    schemas = {i.qualified: [*i.columns, *(c for c in i.filter_columns if c not in i.columns)] for i in inputs}
    r = resolve(sql, schemas)
    return bool(r.groups) and _public_domain(r, {i.qualified: i for i in inputs}) is None


_Spec = tuple[str, str | None, str | None, float | None, float | None]  # func, argument, condition, lo, hi


def _outputs(r: Resolved, by_name: Mapping[str, Any]) -> tuple[tuple[DpOutput, ...], dict[str, _Spec]]:
    """Each aggregate output and the measurements they need (by key, in first-use order)."""
    specs: dict[str, _Spec] = {}
    outputs: list[DpOutput] = []
    by_alias = {s.alias: s for s in r.sources}
    for e, name in zip(r.tree.expressions, r.names, strict=True):
        if name in r.group_names:
            continue
        body = e.this if isinstance(e, exp.Alias) else e
        if isinstance(body, exp.Filter) and isinstance(body.this, exp.AggFunc):
            body = body.this  # AGG(...) FILTER (WHERE c): _aggregate reads the condition from its parent
        if not isinstance(body, exp.AggFunc):
            raise _refuse(
                f"in dp mode each output is a group column or one aggregate; {body.sql(DIALECT)} computes on "
                "aggregates (noise makes such results misleading): output the aggregates and combine them yourself",
                "dp_aggregate",
                output=name,
            )
        func, arg, cond, column = _aggregate(body, by_alias)
        lo = hi = None
        if func in ("sum", "avg"):
            lo, hi = _measure_bounds(column, by_alias, by_name, body)
        elif func == "count_distinct":
            _check_distinct_unit(column, by_alias, by_name, body)
        keys: list[str] = []
        parts = [("sum", arg), ("count", arg)] if func == "avg" else [(func, arg)]
        for f, a in parts:
            key = f"{f}({a or '*'})" + (f" filter({cond})" if cond else "")
            keys.append(key)
            specs.setdefault(key, (f, a, cond, lo if f == "sum" else None, hi if f == "sum" else None))
        outputs.append(DpOutput(name, func, tuple(keys), lo if func == "avg" else None, hi if func == "avg" else None))
    if not outputs:
        raise _refuse("in dp mode a query releases at least one aggregate (COUNT, SUM or AVG)", "dp_aggregate")
    return tuple(outputs), specs


def _aggregate(
    agg: exp.AggFunc, by_alias: Mapping[str, Source]
) -> tuple[str, str | None, str | None, exp.Column | None]:
    """(function, argument SQL, condition SQL, the column it reads) of a supported dp aggregate."""
    cond: exp.Expr | None = None
    node: exp.Expr = agg
    if isinstance(agg.parent, exp.Filter):  # FILTER (WHERE c) wraps the aggregate
        cond = agg.parent.expression.this if isinstance(agg.parent.expression, exp.Where) else None
    distinct = isinstance(agg, exp.Count) and isinstance(agg.this, exp.Distinct)
    if isinstance(agg, exp.Count):
        inner = agg.this.expressions[0] if distinct and len(agg.this.expressions) == 1 else agg.this
        if isinstance(inner, exp.Star) or inner is None:
            return "count", None, _sql(cond), None
        column, case_cond = _argument(inner, allow_one=not distinct)
        if case_cond is not None:
            cond = case_cond if cond is None else exp.and_(cond.copy(), case_cond.copy())
        if distinct:
            assert column is not None  # _argument returns a column unless allow_one
            return "count_distinct", column.sql(DIALECT), _sql(cond), column
        return "count", column.sql(DIALECT) if column is not None else None, _sql(cond), column
    func = {exp.Sum: "sum", exp.Avg: "avg"}.get(type(agg))
    if func is None:
        raise _refuse(
            f"{node.sql(DIALECT)} is not released in dp mode: use COUNT, COUNT(DISTINCT unit), SUM or AVG "
            "(MIN, MAX, VAR and STDDEV have no bounded-sensitivity release here)",
            "dp_aggregate",
        )
    column, case_cond = _argument(agg.this, allow_one=False)
    if column is None:
        raise _refuse(f"{agg.sql(DIALECT)}: in dp mode SUM and AVG take a bounded measure column", "dp_aggregate")
    if case_cond is not None:
        cond = case_cond if cond is None else exp.and_(cond.copy(), case_cond.copy())
    return func, column.sql(DIALECT), _sql(cond), column


def _argument(node: exp.Expression, *, allow_one: bool) -> tuple[exp.Column | None, exp.Expression | None]:
    """A bare column, or CASE WHEN c THEN column END (for a count also THEN 1): (column or None for
    the literal 1, condition or None)."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Column):
        return node, None
    if isinstance(node, exp.Case) and len(node.args.get("ifs") or []) == 1 and node.this is None:
        default = node.args.get("default")
        if default is None or isinstance(default, exp.Null):
            when = node.args["ifs"][0]
            then = when.args.get("true")
            if isinstance(then, exp.Column):
                return then, when.this
            if allow_one and isinstance(then, exp.Literal) and not then.is_string and str(then.this) == "1":
                return None, when.this
    raise _refuse(
        f"{node.sql(DIALECT)}: in dp mode an aggregate takes a column, or CASE WHEN condition THEN column END "
        "(its sensitivity must follow from the owners' bounds); compute other expressions after the release",
        "dp_aggregate",
    )


def _datasets_of(column: exp.Column, by_alias: Mapping[str, Source]) -> list[tuple[str, str]]:
    """(party.dataset, dataset column) pairs an outer column reads."""
    src = by_alias[column.table]
    if src.kind == "table":
        return [(src.branches[0].qualified, column.name)]
    out = []
    for br in src.branches:
        cols = projected_columns(src, br, column.name)
        proj = _projection(src, br, column.name)
        if (
            len(cols) != 1
            or not isinstance(proj, exp.Column | exp.Alias)
            or (isinstance(proj, exp.Alias) and not isinstance(proj.this, exp.Column))
        ):
            raise _refuse(
                f"in dp mode each branch of {src.alias} must select {column.name} as a plain column", "dp_aggregate"
            )
        out.append((br.qualified, cols[0]))
    return out


def _projection(src: Source, br: Any, name: str) -> exp.Expression:
    return expanded_projections(br)[src.columns.index(name)]


def _measure_bounds(
    column: exp.Column | None, by_alias: Mapping[str, Source], by_name: Mapping[str, Any], agg: exp.Expr
) -> tuple[float, float]:
    assert column is not None
    lo: float | None = None
    hi: float | None = None
    for qualified, name in _datasets_of(column, by_alias):
        rule = by_name[qualified].policy.rule(name)
        if rule.role != "measure" or rule.min is None or rule.max is None:
            raise _refuse(
                f"{agg.sql(DIALECT)}: {qualified}.{name} has no declared bounds, and in dp mode a SUM or AVG "
                "needs them (its sensitivity); ask the owner to declare min and max for it",
                "dp_aggregate",
                dataset=qualified,
                column=name,
            )
        lo = rule.min if lo is None else min(lo, rule.min)
        hi = rule.max if hi is None else max(hi, rule.max)
    assert lo is not None and hi is not None
    return lo, hi


def _check_distinct_unit(
    column: exp.Column | None, by_alias: Mapping[str, Source], by_name: Mapping[str, Any], agg: exp.Expr
) -> None:
    assert column is not None
    for qualified, name in _datasets_of(column, by_alias):
        if name != by_name[qualified].policy.privacy_unit:
            raise _refuse(
                f"{agg.sql(DIALECT)}: in dp mode COUNT(DISTINCT) counts the privacy unit only "
                f"({by_name[qualified].policy.privacy_unit} of {qualified})",
                "dp_aggregate",
                dataset=qualified,
                column=name,
            )


def _check_having(r: Resolved, specs: Mapping[str, _Spec]) -> None:
    """HAVING may test released (noisy) outputs only: an aggregate it names must be an output."""
    having = r.tree.args.get("having")
    if having is None:
        return
    outputs = {(e.this if isinstance(e, exp.Alias) else e).sql(DIALECT) for e in r.tree.expressions}
    for agg in having.find_all(exp.AggFunc):
        if agg.sql(DIALECT) not in outputs:
            raise _refuse(
                f"HAVING {agg.sql(DIALECT)}: in dp mode HAVING tests released outputs only; add it to the select list",
                "dp_aggregate",
            )


def _check_joins(r: Resolved, by_name: Mapping[str, Any]) -> None:
    """Two dp inputs meet in one stage only joined on their privacy units (each joined row then
    belongs to one unit of each, and bounding one bounds the other); a UNION ALL is joined to
    nothing."""
    if len(r.sources) < 2:
        return
    for src in r.sources:
        if src.kind != "table":
            raise _refuse(
                f"in dp mode a UNION ALL ({src.alias}) is not joined to other datasets; aggregate it on its own",
                "dp_join",
            )
    units = {s.alias: by_name[s.branches[0].qualified].policy.privacy_unit for s in r.sources}
    linked: set[str] = {r.sources[0].alias}
    for join in r.tree.args.get("joins") or []:
        cond = join.args["on"]
        parts = list(cond.flatten()) if isinstance(cond, exp.And) else [cond]
        for part in parts:
            a, b = part.this, part.expression
            if isinstance(a, exp.Column) and isinstance(b, exp.Column):
                if a.name == units.get(a.table) and b.name == units.get(b.table):
                    if a.table in linked or b.table in linked:
                        linked |= {a.table, b.table}
    missing = [s for s in r.sources if s.alias not in linked]
    if missing:
        q = missing[0].branches[0].qualified
        raise _refuse(
            f"in dp mode datasets are joined on their privacy units only; join {q} on "
            f"{units[missing[0].alias]} = the other dataset's privacy unit (one person's rows on both sides)",
            "dp_join",
            dataset=q,
        )


def _public_domain(r: Resolved, by_name: Mapping[str, Any]) -> tuple[tuple[Any, ...], ...] | None:
    """Every group key, when each group column is a plain column whose values every dataset holding
    it declares (``values``); None otherwise (groups then go through partition selection)."""
    by_alias = {s.alias: s for s in r.sources}
    keys: list[list[Any]] = []
    for g in r.groups:
        if not isinstance(g, exp.Column) or g.table not in by_alias:
            return None
        values: list[Any] = []
        try:
            pairs = _datasets_of(g, by_alias)
        except PolicyRefusalError:
            return None
        for qualified, name in pairs:
            declared = by_name[qualified].policy.rule(name).values
            if declared is None:
                return None
            values += [v for v in declared if v not in values]
        keys.append(values)
    if math.prod(len(k) for k in keys) > MAX_DOMAIN_VALUES:
        return None
    return tuple(itertools.product(*keys))


def _sql(node: exp.Expr | None) -> str | None:
    return node.sql(DIALECT) if node is not None else None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
