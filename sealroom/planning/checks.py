"""THE check of a plan against its owners' policies: one entry point, one function per rule, one
message per rule.

The planner (:mod:`coordinator.planner`), each owner's agent (:mod:`connectors.agent.review`) and
the enclave (:func:`enclave_worker.admission.admit`, called by
:meth:`enclave_worker.jobs.JobRegistry.create`, also for a stage feeding an MPC stage) all call
:func:`check_plan`, so a rule cannot read one way in one place and another way in the next,
and a policy change changes every verdict at once::

    checked = check_plan(plan, Checker(party="bank_a", columns=..., count_star=...))  # an agent
    checked = check_plan(plan, Checker(stage="s1"))                                  # the enclave
    checked = check_plan(plan, Checker(columns=..., count_star=...))                 # the planner

A :class:`Checker` says who checks and what it knows beyond the plan: the owner whose agent checks
(``party``: it answers for its own inputs only, and is named in every refusal), or the TEE stage an
enclave runs (``stage``: it answers for that stage's inputs); the registered columns of datasets it
knows (``columns``; else the columns the plan declares); and whether COUNT(col) may run as COUNT(*)
(``count_star``). :func:`check_plan` runs the shared rules in this order and returns what it
recomputed (:class:`PlanChecks`: each TEE stage's pushdown, each MPC stage's query), so a caller
compiles or runs from the same recomputation:

1. for every input it answers for: the analyst allow-list (:func:`check_analyst`), the company its
   owner lets it keep (:func:`check_combine_with`: every other party's dataset of the plan, whose
   rows meet its rows in the plan's one result), the privacy unit carried
   (:func:`check_unit_carried`), no owner-side filter on a column with declared bounds
   (:func:`check_no_bounded_filter`);
2. for every TEE stage holding such an input (and releasing its output): its pushed filters are
   the ones its SQL implies (:func:`sealroom.planning.plan.stage_pushdown`), and its columns are used
   only as their roles allow (:func:`sealroom.planning.disclosure.check_uses`, on the full query);
3. for every MPC stage computing over such an input (its own, or fed by a TEE stage):
   :func:`check_mpc_stage_rules`: it computes what its SQL implies (:func:`stage_consistency_violation`),
   it applies each such input's policy (k, privacy unit, bounds, dominance:
   :func:`stage_rule_violation`), and its columns are used only as their roles allow.

Policies are those the plan carries (covered by its hash and every owner's signature). An agent first
checks that each carried policy of its own is its owner's current one (same digest); what a checker
knows beyond that it adds on top, never as a second version of a rule: the agent its registered
schemas, its players and holders and its minimum group size on every stage (:func:`check_stage_k`);
the enclave what its engine needs of a plan (each privacy unit sent, :func:`missing_unit`,
answered as a query it cannot run; sound column and table names), what it compiles itself and the
strictest k it applies (:func:`strictest_datasets`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.disclosure import check_uses
from sealroom.planning.mpc_privacy import mpc_noise, noise_mismatch
from sealroom.planning.mpc_spec import GroupColumn, StageSpec
from sealroom.planning.mpc_sql import MpcQuery
from sealroom.planning.plan import (
    MpcStage,
    Plan,
    PlanInput,
    Release,
    Stage,
    TeeStage,
    declared_domains,
    mpc_stage_query,
    stage_pushdown,
)
from sealroom.planning.privacy import DpMechanism, dp_inputs_mode, dp_mechanism, plan_privacy_for
from sealroom.planning.sql import UNION_UNIT, Pushdown
from sealroom.policy import DatasetPolicy

__all__ = [
    "Checker",
    "PlanChecks",
    "Violation",
    "check_analyst",
    "check_combine_with",
    "check_mpc_stage_rules",
    "check_no_bounded_filter",
    "check_plan",
    "check_privacy",
    "check_stage_k",
    "check_unit_carried",
    "missing_unit",
    "stage_consistency_violation",
    "stage_rule_violation",
    "strictest_datasets",
    "strictest_min_group_size",
]

Detail = str | int | float | None


def _may_count_rows(_column: str) -> bool:
    """Without the registered schemas, COUNT(col) may run as COUNT(*): counting rows instead of
    values discloses nothing more than the planner's choice did."""
    return True


@dataclass(frozen=True)
class Checker:
    """Who checks a plan (see the module docstring) and what it knows beyond the plan."""

    party: str | None = None  # an owner's agent: it answers for this owner's inputs only
    stage: str | None = None  # an enclave: it answers for the inputs of this TEE stage only
    columns: Mapping[str, Sequence[str]] = field(default_factory=dict)  # party.dataset -> registered columns
    count_star: Callable[[str], bool] = _may_count_rows  # whether COUNT(col) may run as COUNT(*)

    def answers_for(self, stage: Stage, inp: PlanInput) -> bool:
        """Whether this checker enforces the policy of ``inp`` (an input of ``stage``)."""
        return (self.party is None or inp.party == self.party) and (self.stage is None or stage.id == self.stage)

    def columns_of(self, inp: PlanInput) -> list[str]:
        """The columns of ``inp``'s dataset as this checker knows them: registered, or declared by
        the plan (sent, then filter-only)."""
        known = self.columns.get(inp.qualified)
        if known is not None:
            return list(known)
        return [*inp.columns, *(c for c in inp.filter_columns if c not in inp.columns)]


@dataclass(frozen=True)
class PlanChecks:
    """What :func:`check_plan` recomputed from the plan, by stage id."""

    pushdowns: Mapping[str, Pushdown]  # each checked TEE stage releasing its output
    mpc_queries: Mapping[str, MpcQuery]  # each checked MPC stage
    # Each TEE stage released under differential privacy (a plan reading dp datasets): its mechanism.
    mechanisms: Mapping[str, DpMechanism] = field(default_factory=dict)
    # Each MPC stage released under differential privacy: its mechanism (the same measurements and
    # scales as the enclave's; the noise the holders add is the stage spec's ``dp``).
    mpc_mechanisms: Mapping[str, DpMechanism] = field(default_factory=dict)


def check_plan(plan: Plan, checker: Checker) -> PlanChecks:
    """Every shared rule over ``plan``'s stages and the inputs ``checker`` answers for, in the order
    of the module docstring. Raises PolicyRefusalError or InvalidQueryError (a plan inconsistent with
    its SQL)."""
    mechanisms = check_privacy(plan)
    mpc_ids = {st.id for st in plan.mpc_stages()}
    mpc_mechanisms = {k: m for k, m in mechanisms.items() if k in mpc_ids}
    mechanisms = {k: m for k, m in mechanisms.items() if k not in mpc_ids}
    for stage in plan.stages:
        for inp in stage.inputs:
            if checker.answers_for(stage, inp):
                check_analyst(plan.analyst, party=inp.party, dataset=inp.dataset, policy=inp.policy)
                check_combine_with(inp, plan.inputs())
                check_unit_carried(inp)
                check_no_bounded_filter(inp)
    pushdowns: dict[str, Pushdown] = {}
    for tee in plan.tee_stages():
        if tee.feeds is None and _answers_for_any(checker, tee, tee.inputs):
            pushdowns[tee.id] = _check_tee_stage(tee, checker)
    queries: dict[str, MpcQuery] = {}
    for mpc in plan.mpc_stages():
        if any(_answers_for_any(checker, s, s.inputs) for s in _with_feeding(plan, mpc)):
            queries[mpc.id] = check_mpc_stage_rules(plan, mpc, checker)
    return PlanChecks(pushdowns, queries, mechanisms, mpc_mechanisms)


def check_privacy(plan: Plan) -> dict[str, DpMechanism]:
    """The plan's privacy block is the one its datasets' privacy modes imply: none without a dp
    dataset; with one, every dataset dp (:func:`sealroom.planning.privacy.dp_inputs_mode`), an
    epsilon within every owner's ``max_query_epsilon``, the delta partition selection needs, and a
    release every stage can make under dp (:func:`sealroom.planning.privacy.dp_mechanism`). Every
    checker runs it over the whole plan: a dp owner's guarantee depends on what every other input
    of the query is. Returns each released stage's mechanism (TEE and MPC stages, by id); an MPC
    stage's noise is :func:`sealroom.planning.mpc_privacy.mpc_noise`."""
    inputs = plan.inputs()
    dp = dp_inputs_mode(inputs)
    if not dp:
        if plan.privacy is not None:
            raise InvalidQueryError("plan is inconsistent: it carries a privacy block but reads no dp dataset")
        return {}
    if plan.privacy is None:
        raise PolicyRefusalError(
            "the plan reads datasets released only with differential privacy but carries no privacy block "
            "(epsilon); re-plan the query",
            details={"rule": "privacy_mode"},
        )
    mechanisms: dict[str, DpMechanism] = {}
    delta_needed = False
    for tee in plan.tee_stages():
        if tee.feeds is None:
            mechanisms[tee.id] = dp_mechanism(tee.sql, tee.inputs, plan.privacy, min_group_size=tee.min_group_size)
            delta_needed |= mechanisms[tee.id].selection is not None
    for mpc in plan.mpc_stages():
        # The enclave's mechanism over the stage's domain, noised by its input holders: the noise the
        # stage's spec carries must be exactly what the plan implies (sealroom.planning.mpc_privacy).
        mech, noise = mpc_noise(
            mpc.sql, plan.mpc_inputs(mpc), plan.privacy, mpc.spec, analyst=plan.analyst, plan_inputs=inputs
        )
        if noise_mismatch(mpc.spec, noise):
            raise PolicyRefusalError(
                f"MPC stage {mpc.id} reads datasets released only with differential privacy, and its noise is not "
                "the one the plan implies (contribution bounds, scales, shares); re-plan the query",
                details={"rule": "privacy_mode", "stage": mpc.id},
            )
        mechanisms[mpc.id] = mech
    expected = plan_privacy_for(inputs, delta_needed, plan.privacy.epsilon)
    if expected != plan.privacy:
        raise InvalidQueryError(
            "plan is inconsistent: its privacy block does not spend the delta its groups need; re-plan the query",
            details={"rule": "privacy_mode"},
        )
    return mechanisms


def _with_feeding(plan: Plan, stage: MpcStage) -> list[Stage]:
    """MPC stage ``stage`` and the TEE stages feeding it."""
    return [stage, *plan.feeding(stage)]


def _answers_for_any(checker: Checker, stage: Stage, inputs: Iterable[PlanInput]) -> bool:
    return any(checker.answers_for(stage, i) for i in inputs)


def _check_tee_stage(stage: TeeStage, checker: Checker) -> Pushdown:
    """A TEE stage's pushed filters are the ones its SQL implies, and the full query (pushed filters
    included) uses the columns the checker answers for only as their roles allow."""
    pushed = stage_pushdown(stage)
    mine = [i for i in stage.inputs if checker.answers_for(stage, i)]
    check_uses(
        {i.qualified: pushed.uses.get(i.qualified, {}) for i in mine},
        {i.qualified: i.policy for i in mine},
        {i.qualified: checker.columns_of(i) for i in mine},
    )
    return pushed


def check_mpc_stage_rules(plan: Plan, stage: MpcStage, checker: Checker) -> MpcQuery:
    """MPC stage ``stage`` computes what its SQL implies, over the domain the involved policies
    declare, and applies the rules of every input ``checker`` answers for (its own, or those of the
    TEE stages feeding it): k, privacy units, bounds, dominance, column roles. Returns the stage's
    query as recomputed from the plan (:func:`sealroom.planning.plan.mpc_stage_query`). Raises
    PolicyRefusalError (details: the checking party if any, the stage, the rule) or InvalidQueryError."""
    q = mpc_stage_query(plan, stage)
    checking = {"party": checker.party} if checker.party is not None else {}
    violation = stage_consistency_violation(stage, q, plan.mpc_inputs(stage), count_star=checker.count_star)
    if violation is not None:
        raise violation.refusal(**checking, stage=stage.id)
    mine = [i for s in _with_feeding(plan, stage) for i in s.inputs if checker.answers_for(s, i)]
    for inp in mine:
        violation = stage_rule_violation(
            stage.spec, inp.policy, dataset=inp.qualified, columns=checker.columns_of(inp), unit_column=UNION_UNIT
        )
        if violation is not None:
            raise violation.refusal(party=inp.party, stage=stage.id, dataset=inp.dataset)
    check_uses(
        {i.qualified: q.uses.get(i.qualified, {}) for i in mine},
        {i.qualified: i.policy for i in mine},
        {i.qualified: checker.columns_of(i) for i in mine},
    )
    return q


# --------------------------------------------------------------------------------------------
# One function per rule


def strictest_min_group_size(policies: Iterable[DatasetPolicy]) -> int:
    """The strictest (largest) minimum group size of the involved owners: where their rules meet,
    the strictest wins. ValueError without any policy (a stage always has inputs)."""
    sizes = [p.min_group_size for p in policies]
    if not sizes:
        raise ValueError("no policies")
    return max(sizes)


def strictest_datasets(inputs: Iterable[PlanInput]) -> tuple[int, tuple[str, ...]]:
    """The strictest minimum group size of ``inputs`` and the datasets (``party.dataset``, sorted)
    whose policies ask for it (named in suppressed cells' reasons)."""
    listed = list(inputs)
    k = strictest_min_group_size(i.policy for i in listed)
    return k, tuple(sorted(i.qualified for i in listed if i.policy.min_group_size == k))


def check_analyst(analyst: str, *, party: str, dataset: str, policy: DatasetPolicy) -> None:
    """Refuse (rule ``analysts``) when ``policy``, the policy of ``party.dataset``, does not allow
    ``analyst`` to query it; the message says whom to ask."""
    if policy.allows_analyst(analyst):
        return
    raise PolicyRefusalError(
        f"{party}.{dataset} may not be queried by analyst {analyst}: its policy lists the analysts it "
        f"allows; ask {party} to add {analyst}",
        details={
            "party": party,
            "dataset": dataset,
            "rule": "analysts",
            "suggestion": f"ask {party} to allow {analyst}",
        },
    )


def check_combine_with(inp: PlanInput, combined: Iterable[PlanInput]) -> None:
    """Refuse (rule ``combine_with``) when ``inp``'s policy does not let its rows meet those of another
    party's dataset in ``combined``: every input of a plan counts, since a plan answers one query and
    all its stages' rows meet in its one result (a join, a UNION ALL, an MPC or hybrid stage alike).
    The refusal names the dataset, the party it may not be combined with, and what to do."""
    for other in combined:
        if inp.policy.allows_combination(inp.party, other.party, other.dataset):
            continue
        raise PolicyRefusalError(
            f"{inp.qualified} may not be combined with data of {other.party} ({other.qualified}): its policy "
            f"lists whom its rows may be joined or unioned with (combine_with), and {other.party} is not "
            f"among them; leave {other.qualified} out of the query, or ask {inp.party} to add it",
            details={
                "party": inp.party,
                "dataset": inp.dataset,
                "rule": "combine_with",
                "not_allowed": other.party,
                "not_allowed_dataset": other.dataset,
                "suggestion": f"leave {other.qualified} out of the query, or ask {inp.party} to list "
                f"{other.party} in combine_with",
            },
        )


def missing_unit(inp: PlanInput) -> str | None:
    """The privacy unit column ``inp``'s policy names and the plan does not carry, or None."""
    unit = inp.policy.privacy_unit
    return unit if unit is not None and unit not in inp.columns else None


def check_unit_carried(inp: PlanInput) -> None:
    """Refuse (rule ``privacy_unit``) an input that does not carry its policy's privacy unit column
    (:func:`missing_unit`): without it the minimum group size could not be counted in distinct units."""
    unit = missing_unit(inp)
    if unit is not None:
        raise PolicyRefusalError(
            f"the plan does not carry the privacy unit of {inp.qualified}, so the enclave could "
            "not enforce the minimum group size",
            details={"party": inp.party, "dataset": inp.dataset, "column": unit, "rule": "privacy_unit"},
        )


def check_stage_k(stage: Stage, *, party: str) -> None:
    """Refuse (rule ``min_group_size``) a stage whose minimum group size is weaker than the
    strictest of its inputs' policies (``party``: the owner checking it, named in the refusal)."""
    if stage.min_group_size < strictest_min_group_size(i.policy for i in stage.inputs):
        raise PolicyRefusalError(
            "the plan's minimum group size is weaker than an involved owner's policy",
            details={"party": party, "rule": "min_group_size"},
        )


def check_no_bounded_filter(inp: PlanInput) -> None:
    """Refuse (rule ``bounds``) an owner-side filter on a column with declared bounds: a party
    filters raw values, and the enclave would have clamped them first. Roles already forbid
    filtering on a measure: this keeps it so whatever roles allow."""
    for column in inp.filter_columns:
        rule = inp.policy.rule(column)
        if rule.min is not None or rule.max is not None:
            raise PolicyRefusalError(
                f"{inp.qualified}.{column} has declared bounds and cannot be filtered on by its party",
                details={"party": inp.party, "dataset": inp.dataset, "column": column, "rule": "bounds"},
            )


class Violation(NamedTuple):
    """A rule an MPC stage breaks: the message, the rule, and details naming where (a tuple, so
    ``message, rule, details = violation`` reads it)."""

    message: str
    rule: str
    details: Mapping[str, Detail] = MappingProxyType({})

    def refusal(self, **where: Detail) -> PolicyRefusalError:
        """The refusal, its details naming ``where`` (who checks, the stage, the dataset) and the rule."""
        return PolicyRefusalError(self.message, details={**where, "rule": self.rule, **self.details})


def _bound(v: float | None) -> str:
    return "none" if v is None else f"{v:g}"


def stage_rule_violation(
    spec: StageSpec, policy: DatasetPolicy, *, dataset: str, columns: Sequence[str], unit_column: str
) -> Violation | None:
    """The first rule of ``policy`` (the policy of ``dataset``, whose columns are ``columns``) that
    MPC stage ``spec`` does not apply, or None: k at least the policy's minimum group size, its
    privacy units counted (never assumed disjoint, never a column the plan names; ``unit_column``
    is the one the players derive), the measures' bounds inside its own, and no dominance rule
    next to SUM or AVG (an MPC stage does not apply one)."""
    if spec.min_group_size < policy.min_group_size:
        return Violation(
            f"the MPC stage releases cells of {spec.min_group_size}, below the minimum group size "
            f"{policy.min_group_size} of {dataset}",
            "min_group_size",
        )
    unit_violation = _unit_violation(spec, policy, dataset=dataset, columns=columns, unit_column=unit_column)
    if unit_violation is not None:
        return unit_violation
    for m in spec.measures:
        rule = policy.rule(m.column)
        if rule.role == "open":
            continue
        if rule.min is None or rule.max is None or m.min < rule.min or m.max > rule.max:
            return Violation(
                f"the MPC stage's bounds for {m.column} ([{m.min:g}, {m.max:g}]) are not inside those {dataset} "
                f"declares ([{_bound(rule.min)}, {_bound(rule.max)}])",
                "bounds",
                {"column": m.column},
            )
    if policy.dominance is not None and any(a.func in ("sum", "avg") for a in spec.aggregates):
        return Violation(
            f"{dataset} has a dominance rule, which an MPC stage does not apply to its SUM/AVG", "dominance"
        )
    return None


def _unit_violation(
    spec: StageSpec, policy: DatasetPolicy, *, dataset: str, columns: Sequence[str], unit_column: str
) -> Violation | None:
    """The privacy-unit rule of :func:`stage_rule_violation`."""
    if policy.privacy_unit and spec.threshold_on != "units":
        return Violation(
            f"the MPC stage counts rows, but {dataset} protects distinct {policy.privacy_unit} values "
            "(its privacy unit)",
            "privacy_unit",
        )
    if (spec.threshold_on == "units") != (spec.unit_column == unit_column) or (
        spec.unit_column is not None and spec.unit_column in columns
    ):
        return Violation(
            "the MPC stage does not count this dataset's privacy unit (its unit column must be the one the player "
            f"derives from {dataset}'s privacy unit, never a column the plan names)",
            "privacy_unit",
        )
    if spec.threshold_on == "units" and spec.units_disjoint:
        return Violation(
            f"the MPC stage assumes no privacy unit appears at two players, which the owner of {dataset} cannot know",
            "privacy_unit",
        )
    return None


def stage_consistency_violation(
    stage: MpcStage, q: MpcQuery, inputs: Sequence[PlanInput], *, count_star: Callable[[str], bool]
) -> Violation | None:
    """The first way MPC stage ``stage`` does not compute what its SQL implies (``q``:
    :func:`sealroom.planning.plan.mpc_stage_query`), or None: more helper players than may collude
    (the coordinator runs them all), the group columns, the aggregates (``count_star(col)``: whether
    COUNT(col) may run as COUNT(*), i.e. col holds no NULL), the release (outputs, HAVING, ORDER BY,
    LIMIT), and the group domain, which must be exactly what the policies of ``inputs`` (every input
    of the stage and of the stages feeding it, as the plan carries them) declare."""
    spec = stage.spec
    # The coordinator runs every helper player: with more than t of them it would hold enough shares
    # to reconstruct the owners' partials (t + 1 colluding players learn every input).
    helpers = [p.name for p in spec.players if not p.holds_input]
    if len(helpers) > spec.t:
        return Violation(
            f"the MPC stage has {len(helpers)} helper players ({', '.join(helpers)}), all run by the coordinator, "
            f"more than the {spec.t} that may collude at threshold t={spec.t}: the coordinator could reconstruct "
            "the owners' inputs",
            "players",
        )
    if not _computes_its_sql(stage, q, count_star):
        return Violation(
            "the plan's MPC stage does not compute what its SQL says (group columns, aggregates or release "
            "differ); re-plan the query",
            "plan_consistency",
        )
    return _domain_violation(spec, q, inputs)


def _computes_its_sql(stage: MpcStage, q: MpcQuery, count_star: Callable[[str], bool]) -> bool:
    """Group columns, aggregates, release and output columns are those the SQL implies."""
    computed = [(a.name, a.func, a.column) for a in stage.spec.aggregates]
    implied = list(q.aggregates)

    def same(x: tuple[str, str, str | None], y: tuple[str, str, str | None]) -> bool:
        if x == y:
            return True
        return x[:2] == y[:2] == (x[0], "count") and x[2] is None and y[2] is not None and count_star(y[2])

    return (
        [g.name for g in stage.spec.group_by] == list(q.group_columns)
        and len(computed) == len(implied)
        and all(same(x, y) for x, y in zip(computed, implied, strict=False))
        and stage.release == Release.of(q)
        and tuple(stage.output_columns) == tuple(o[0] for o in q.outputs)
    )


def _domain_violation(spec: StageSpec, q: MpcQuery, inputs: Sequence[PlanInput]) -> Violation | None:
    """The group domain is exactly the one the policies of ``inputs`` declare, taken in the order
    the SQL reads their datasets (as the planner derives it: the union of declared values keeps
    first-declared order)."""
    policies = {i.qualified: i.policy for i in inputs}
    declared = declared_domains(q.group_columns, [(ds, policies[ds]) for ds in q.datasets])
    keys: list[list[object]] = []
    for g, (kind, values) in zip(spec.group_by, declared, strict=True):
        want = GroupColumn(g.name, tuple(values)) if kind == "bins" else GroupColumn(g.name)
        if g != want:
            return Violation(
                f"the MPC stage groups {g.name} otherwise than the policies declare", "domain", {"column": g.name}
            )
        keys.append(list(want.labels()) if kind == "bins" else list(values))
    if [list(k) for k in spec.domain] != [list(k) for k in itertools.product(*keys)]:
        return Violation("the MPC stage's group domain is not the one the involved policies declare", "domain")
    return None
