"""From the owners' policies to an MPC stage's public parameters (for the planner).

The strictest rule wins: a measure's bounds are the intersection of every involved owner's
declared ``[min, max]`` (and are required: MPC sums without bounds could overflow silently), and
the minimum group size is the largest any owner asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sealroom.errors import InvalidQueryError
from sealroom.planning.mpc_spec import Measure, StageSpec
from sealroom.policy import ColumnRule, DatasetPolicy


def measure_from_rules(
    column: str, rules: Iterable[tuple[str, ColumnRule]], *, decimals: int = 0, nullable: bool = True
) -> Measure:
    """The :class:`Measure` for ``column`` from ``(party.dataset, rule)`` pairs of every owner
    holding it. Raises InvalidQueryError naming the dataset whose policy declares no bounds, or
    whose bounds leave nothing in common."""
    lo: float | None = None
    hi: float | None = None
    for dataset, rule in rules:
        if rule.role != "open" and (rule.min is None or rule.max is None):
            raise InvalidQueryError(
                f"{dataset}.{column} has no declared bounds (min and max in its policy): an MPC stage needs them "
                "to choose bit lengths that cannot overflow; ask the owner to declare them",
                details={"dataset": dataset, "column": column, "rule": "bounds", "stage": "mpc"},
            )
        if rule.min is not None:
            lo = rule.min if lo is None else max(lo, rule.min)
        if rule.max is not None:
            hi = rule.max if hi is None else min(hi, rule.max)
    if lo is None or hi is None or lo > hi:
        raise InvalidQueryError(
            f"the owners' bounds for {column} leave no common range (or none is declared): an MPC stage needs one",
            details={"column": column, "rule": "bounds", "stage": "mpc"},
        )
    return Measure(column, lo, hi, decimals, nullable)


def _bound(v: float | None) -> str:
    return "none" if v is None else f"{v:g}"


def stage_rule_violation(
    spec: StageSpec, policy: DatasetPolicy, *, dataset: str, columns: Sequence[str], unit_column: str
) -> tuple[str, str, dict[str, Any]] | None:
    """The first rule of ``policy`` (the policy of ``dataset``, whose registered columns are
    ``columns``) that MPC stage ``spec`` does not apply, as (message, rule, details), or None. Every
    owner's agent checks its own datasets with this before it approves, and an enclave feeding the
    stage checks the datasets streamed to it: k at least the policy's minimum group size, its
    privacy units counted (never assumed disjoint, never a column the plan names; ``unit_column``
    is the one the players derive), the measures' bounds inside its own, and no dominance rule
    next to SUM or AVG (an MPC stage does not apply one)."""
    if spec.min_group_size < policy.min_group_size:
        return (
            f"the MPC stage releases cells of {spec.min_group_size}, below the minimum group size "
            f"{policy.min_group_size} of {dataset}",
            "min_group_size",
            {},
        )
    if policy.privacy_unit and spec.threshold_on != "units":
        return (
            f"the MPC stage counts rows, but {dataset} protects distinct {policy.privacy_unit} values "
            "(its privacy unit)",
            "privacy_unit",
            {},
        )
    if (spec.threshold_on == "units") != (spec.unit_column == unit_column) or (
        spec.unit_column is not None and spec.unit_column in columns
    ):
        return (
            "the MPC stage does not count this dataset's privacy unit (its unit column must be the one the player "
            f"derives from {dataset}'s privacy unit, never a column the plan names)",
            "privacy_unit",
            {},
        )
    if spec.threshold_on == "units" and spec.units_disjoint:
        return (
            f"the MPC stage assumes no privacy unit appears at two players, which the owner of {dataset} cannot know",
            "privacy_unit",
            {},
        )
    for m in spec.measures:
        rule = policy.rule(m.column)
        if rule.role == "open":
            continue
        if rule.min is None or rule.max is None or m.min < rule.min or m.max > rule.max:
            return (
                f"the MPC stage's bounds for {m.column} ([{m.min:g}, {m.max:g}]) are not inside those {dataset} "
                f"declares ([{_bound(rule.min)}, {_bound(rule.max)}])",
                "bounds",
                {"column": m.column},
            )
    if policy.dominance is not None and any(a.func in ("sum", "avg") for a in spec.aggregates):
        return (
            f"{dataset} has a dominance rule, which an MPC stage does not apply to its SUM/AVG",
            "dominance",
            {},
        )
    return None


def stage_consistency_violation(
    stage: Any, spec: StageSpec, q: Any, inputs: Sequence[Any], *, count_star: Callable[[str], bool]
) -> tuple[str, str, dict[str, Any]] | None:
    """The first way MPC stage ``stage`` (its ``spec``) does not compute what its SQL implies
    (``q``: :func:`sealroom.planning.plan.mpc_stage_query`), as (message, rule, details), or None: more
    helper players than may collude (the coordinator runs them all), the group
    columns, the aggregates (``count_star(col)``: whether COUNT(col) may run as COUNT(*), i.e. col
    holds no NULL), the release (outputs, HAVING, ORDER BY, LIMIT), and the group domain, which must
    be exactly what the policies of ``inputs`` (every input of the stage and of the stages feeding
    it, as the plan carries them) declare. Every owner's agent and an enclave feeding the stage
    check this."""
    import itertools

    from sealroom.planning.mpc_spec import GroupColumn
    from sealroom.planning.plan import Release, declared_domains

    # The coordinator runs every helper player: with more than t of them it would hold enough shares
    # to reconstruct the owners' partials (t + 1 colluding players learn every input).
    helpers = [p.name for p in spec.players if not p.holds_input]
    if len(helpers) > spec.t:
        return (
            f"the MPC stage has {len(helpers)} helper players ({', '.join(helpers)}), all run by the coordinator, "
            f"more than the {spec.t} that may collude at threshold t={spec.t}: the coordinator could reconstruct "
            "the owners' inputs",
            "players",
            {},
        )
    computed = [(a.name, a.func, a.column) for a in spec.aggregates]
    implied = list(q.aggregates)

    def same(x: tuple[str, str, str | None], y: tuple[str, str, str | None]) -> bool:
        if x == y:
            return True
        return x[:2] == y[:2] == (x[0], "count") and x[2] is None and y[2] is not None and count_star(y[2])

    if (
        [g.name for g in spec.group_by] != list(q.group_columns)
        or len(computed) != len(implied)
        or not all(same(x, y) for x, y in zip(computed, implied, strict=False))
        or stage.release != Release.of(q)
        or tuple(stage.output_columns) != tuple(o[0] for o in q.outputs)
    ):
        return (
            "the plan's MPC stage does not compute what its SQL says (group columns, aggregates or release "
            "differ); re-plan the query",
            "plan_consistency",
            {},
        )
    declared = declared_domains(q.group_columns, [(i.qualified, i.policy) for i in inputs])
    keys: list[list[Any]] = []
    for g, (kind, values) in zip(spec.group_by, declared, strict=True):
        want = GroupColumn(g.name, tuple(values)) if kind == "bins" else GroupColumn(g.name)
        if g != want:
            return (f"the MPC stage groups {g.name} otherwise than the policies declare", "domain", {"column": g.name})
        keys.append(want.labels() if kind == "bins" else list(values))
    if [list(k) for k in spec.domain] != [list(k) for k in itertools.product(*keys)]:
        return ("the MPC stage's group domain is not the one the involved policies declare", "domain", {})
    return None
