"""The enclave's own check of a plan before it creates a job for it (DESIGN.md invariant 3).

The enclave does not trust the coordinator's checks: from the plan alone (with the policies the
owners signed into it) it re-checks every shared rule through :func:`sealroom.planning.checks.check_plan`
(which recomputes each input's pushed filter from the plan's SQL, or, for a stage that feeds an MPC
stage, checks that MPC stage against every streamed policy), compiles the stage itself, and derives
the rules it will apply to every released cell. A stage that feeds an MPC stage joins it as a
player instead of compiling (:meth:`enclave_worker.mpc_feed.FeedPlayer.for_stage`). A stage over
datasets whose owners chose differential privacy keeps the mechanism check_plan recomputed from the
plan (:func:`sealroom.planning.privacy.dp_mechanism`): it is released with noise
(:mod:`enclave_worker.dp`), and its rules are that mechanism.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from enclave_worker.config import EnclaveConfig
from enclave_worker.engine import Bounds, compile_for_job
from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError
from sealroom.planning.checks import Checker, check_plan, missing_unit, strictest_datasets
from sealroom.planning.disclosure import check_uses
from sealroom.planning.plan import Plan, PlanInput, TeeStage
from sealroom.planning.privacy import DpMechanism
from sealroom.planning.resolve import RESERVED_PREFIX
from sealroom.planning.sql import CompiledStage, InputSpec, Pushdown
from sealroom.policy import Dominance

if TYPE_CHECKING:
    # Only for the annotation: admit() imports it lazily, for hybrid jobs only (a TEE-only worker
    # never loads mpc/).
    from enclave_worker.mpc_feed import FeedPlayer

__all__ = ["Admission", "admit"]


@dataclass(frozen=True)
class Admission:
    """A plan the enclave accepted, and what a job for it runs with."""

    plan: Plan
    stage: TeeStage
    compiled: CompiledStage | None  # None for a stage that feeds an MPC stage (``feed``)
    feed: FeedPlayer | None
    min_group_size: int
    rule_datasets: tuple[str, ...]  # the datasets whose policies ask for that k
    clamps: dict[str, dict[str, Bounds]]  # engine table -> column -> bounds
    dominance: dict[str, Dominance]  # party.dataset -> its (n, k) rule
    rules: dict[str, object]  # the rules applied, as the result document states them
    # The stage's differential-privacy mechanism (a plan reading dp datasets), recomputed from the
    # plan by check_plan: the stage is then released with noise (enclave_worker.dp), not thresholds.
    dp: DpMechanism | None = None
    residual_sql: str = ""  # the stage's SQL without the filters the parties apply (a released stage)


def admit(plan: Plan, config: EnclaveConfig) -> Admission:
    """Check ``plan`` against every owner's policy it carries; raise the refusal, or return the
    admission (InvalidQueryError or PolicyRefusalError).

    First what this engine needs of a plan (one TEE stage, no input or engine table named twice,
    sound column names, every privacy unit sent); then every shared rule, as the checker of its
    TEE stage (:func:`sealroom.planning.checks.check_plan`, over the columns the plan declares); then
    its own compilation of the stage and the rules it applies to every released cell."""
    stage = _single_tee_stage(plan)
    specs = [_input_spec(inp) for inp in stage.inputs]
    checker = Checker(stage=stage.id)
    checked = check_plan(plan, checker)
    compiled: CompiledStage | None = None
    feed: FeedPlayer | None = None
    if stage.feeds is not None:
        # A stage feeding an MPC stage: the enclave computes its inputs' partials over the MPC
        # stage's public domain and joins it as a player. check_plan checked the MPC stage against
        # every streamed policy, its filters recomputed for the MPC stage's query; each owner
        # re-checked the stage against its own policy before approving, and the job runs only with
        # every owner's approval.
        from enclave_worker.mpc_feed import FeedPlayer  # only hybrid jobs load mpc/ (never MPyC)

        feed = FeedPlayer.for_stage(plan, stage, host=config.mpc_host, scratch=config.mpc_scratch_dir)
    else:
        compiled = _compile(stage, checked.pushdowns[stage.id], specs, checker)
    k, strictest = strictest_datasets(stage.inputs)
    # Every owner's rules apply to every cell: its bounds to its measure columns, its dominance
    # rule to its privacy units. Both come from the policies the owners signed in the plan.
    clamps, clamped = _clamps(stage)
    dominance = {i.qualified: i.policy.dominance for i in stage.inputs if i.policy.dominance is not None}
    rules: dict[str, object] = {
        "min_group_size": k,
        "dominance": [{"dataset": d, "n": r.n, "k": r.k} for d, r in sorted(dominance.items())],
        "clamped": clamped,
    }
    if feed is not None:
        k, rules = _feed_rules(feed)
    mechanism = checked.mechanisms.get(stage.id)
    if mechanism is not None:
        # Released under dp: the threshold rules do not apply (exact decisions on a dp owner's rows
        # would leak outside the noise); the compilation above still checked the SQL and its uses.
        rules = {"privacy": mechanism.to_dict(), "clamped": clamped}
    pushed = checked.pushdowns.get(stage.id)
    residual = pushed.residual_sql if pushed is not None else ""
    return Admission(plan, stage, compiled, feed, k, strictest, clamps, dominance, rules, mechanism, residual)


def _single_tee_stage(plan: Plan) -> TeeStage:
    tee = plan.tee_stages()
    if len(tee) != 1:
        raise InvalidQueryError("this enclave runs plans with exactly one TEE stage")
    stage = tee[0]
    tables = {i.table for i in stage.inputs}
    datasets = {(i.party, i.dataset) for i in stage.inputs}
    if len(tables) != len(stage.inputs) or len(datasets) != len(stage.inputs):
        # Two inputs sharing an engine table would let one owner's rows stand in for another's.
        raise InvalidQueryError("the plan names an input or an engine table twice")
    return stage


def _input_spec(inp: PlanInput) -> InputSpec:
    """The engine's view of one input, once its privacy unit is sent and its column names are
    sound (InvalidQueryError: the engine could not run it)."""
    # The rule is checks.check_unit_carried's (a policy refusal); the enclave has always answered a
    # plan without it as a query it cannot run (INVALID_ARGUMENT), and keeps that answer.
    unit = missing_unit(inp)
    if unit is not None:
        raise InvalidQueryError(
            f"the plan does not send the privacy unit column of {inp.qualified}",
            details={"dataset": inp.qualified, "column": unit},
        )
    if len(set(inp.columns)) != len(inp.columns) or any(
        c.startswith(RESERVED_PREFIX) for c in (*inp.columns, *inp.filter_columns)
    ):
        raise InvalidQueryError(
            f"the plan's columns of {inp.qualified} repeat a name or use the reserved prefix {RESERVED_PREFIX}",
            details={"dataset": inp.qualified},
        )
    return InputSpec(inp.qualified, inp.table, inp.columns, inp.policy.privacy_unit)


def _compile(stage: TeeStage, pushed: Pushdown, specs: list[InputSpec], checker: Checker) -> CompiledStage:
    """The residual query, compiled by the enclave itself; every owner's column rules re-checked
    on what it compiled."""
    # ``pushed``: the filters the parties apply, recomputed from the SQL by check_plan (not taken
    # from the coordinator), which also checked the column rules on the full query; the enclave
    # runs the rest of the query, the residual. It compiles it itself: the aggregate-only check
    # and the hidden unit counts do not depend on anything the coordinator computed.
    compiled = compile_for_job(pushed.residual_sql, specs)
    # ...and re-checks every owner's column rules on what it compiled (not the planner's word).
    check_uses(
        compiled.uses,
        {i.qualified: i.policy for i in stage.inputs},
        {i.qualified: checker.columns_of(i) for i in stage.inputs},
    )
    return compiled


def _clamps(stage: TeeStage) -> tuple[dict[str, dict[str, Bounds]], list[dict[str, object]]]:
    """Every input's measure bounds (engine table -> column -> bounds, and as the result document
    lists them)."""
    clamps: dict[str, dict[str, Bounds]] = {}
    clamped: list[dict[str, object]] = []
    for inp in stage.inputs:
        for column in inp.columns:
            rule = inp.policy.rule(column)
            if rule.role == "measure" and (rule.min is not None or rule.max is not None):
                clamps.setdefault(inp.table, {})[column] = (rule.min, rule.max)
                clamped.append({"dataset": inp.qualified, "column": column, "min": rule.min, "max": rule.max})
    return clamps, clamped


def _feed_rules(feed: FeedPlayer) -> tuple[int, dict[str, object]]:
    """What applies to a feeding job is the MPC stage's rule (checked against every streamed policy
    by check_plan in admit), inside the MPC: say that, not the TEE path's rules it does not run."""
    spec = feed.spec
    return spec.min_group_size, {
        "min_group_size": spec.min_group_size,
        "counted": "distinct privacy units" if spec.threshold_on == "units" else "rows",
        "applied_in": f"MPC stage {feed.mpc_stage.id}",
        "clamped": [{"column": m.column, "min": m.min, "max": m.max} for m in spec.measures],
        "mpc_spec_sha256": hashlib.sha256(canonical_json(spec.to_dict())).hexdigest(),
    }
