"""A data owner's review of a plan: every check its agent runs before it signs (or holds for its
owner) a plan that reads its data. Raises the refusal, naming the party, dataset, column and rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from connectors.witness import LogWitness
from sealroom.errors import ApprovalError, InvalidQueryError, PolicyRefusalError
from sealroom.planning.checks import check_analyst, check_stage_k, stage_consistency_violation, stage_rule_violation
from sealroom.planning.disclosure import check_uses
from sealroom.planning.mpc_sql import MpcQuery
from sealroom.planning.plan import (
    EnclaveHolder,
    HelperHolder,
    MpcStage,
    PartyHolder,
    Plan,
    PlanInput,
    Stage,
    TeeStage,
    mpc_player_keys,
    mpc_stage_query,
    stage_pushdown,
)
from sealroom.planning.sql import UNION_UNIT
from sealroom.policy import DatasetPolicy


@dataclass(frozen=True)
class Owner:
    """What the review needs to know of the owner: its name and key, its datasets' policies and
    registered schemas, and the witness of the coordinator's log (None: it does not witness)."""

    name: str
    public_key_hex: str
    policies: Mapping[str, DatasetPolicy]
    schemas: Mapping[str, pa.Schema]
    witness: LogWitness | None


def check_plan(owner: Owner, plan: Plan) -> list[PlanInput]:
    """Every policy check of a plan; return this party's inputs. Raises the refusal."""
    me = owner.name
    mine = [i for i in plan.inputs() if i.party == me]
    if not mine:
        raise ApprovalError(f"the plan reads no data of {me}; nothing to approve", details={"party": me})
    if plan.parties.get(me) != owner.public_key_hex:
        raise ApprovalError(
            f"the plan names a signing key for {me} that is not this agent's key",
            details={"party": me, "check": "party_key"},
        )
    for inp in mine:
        policy = owner.policies.get(inp.dataset)
        if policy is None:
            raise PolicyRefusalError(
                f"{me} has no dataset {inp.dataset}", details={"party": me, "dataset": inp.dataset}
            )
        where = {"party": me, "dataset": inp.dataset}
        if inp.policy.digest() != policy.digest():
            raise PolicyRefusalError(
                f"the plan carries a policy for {me}.{inp.dataset} that differs from the owner's "
                "current policy; re-plan the query",
                details={**where, "rule": "policy_digest"},
            )
        # The owner's current policy (its digest is the plan's, checked above).
        check_analyst(plan.analyst, party=me, dataset=inp.dataset, policy=policy)
        schema = owner.schemas[inp.dataset]
        for col in (*inp.columns, *inp.filter_columns):
            if col not in schema.names:
                raise PolicyRefusalError(f"{me}.{inp.dataset} has no column {col}", details={**where, "column": col})
        if policy.privacy_unit and policy.privacy_unit not in inp.columns:
            raise PolicyRefusalError(
                f"the plan does not carry the privacy unit of {me}.{inp.dataset}, so the enclave could "
                "not enforce the minimum group size",
                details={**where, "column": policy.privacy_unit, "rule": "privacy_unit"},
            )
    for stage in plan.stages:
        check_stage_k(stage, party=me)
        if isinstance(stage, MpcStage) or stage.feeds is not None:
            if any(i.party == me for i in stage.inputs):
                check_mpc_stage(owner, plan, stage)
        elif any(i.party == me for i in stage.inputs):
            # The filter this agent will run on its rows must be the one the SQL it signs implies,
            # and so must every other party's: otherwise the plan would not compute that SQL.
            stage_pushdown(stage)
    return mine


def check_mpc_stage(owner: Owner, plan: Plan, stage: Stage) -> None:
    """Re-check an MPC stage this party's data goes to (directly, or through the TEE stage feeding
    it) against this owner's own policies: it computes what the plan's SQL implies (filters,
    aggregates, group columns, release), k is at least each of its datasets' min_group_size and
    counts its privacy units, the measures' bounds lie inside its declared bounds, its columns are
    used only as their roles allow, the group domain is exactly what the involved policies
    declare, its datasets go to an enclave only where its policy allows and otherwise are held by
    its own player only, and the players and holders agree with the spec. Raises the refusal."""
    q = mpc_stage_query(plan, stage)
    target = plan.fed_stage(stage) if isinstance(stage, TeeStage) else stage
    refusal = _Refusal(owner.name, target.id)
    _check_computation(owner, plan, target, q, refusal)
    _check_players(owner, plan, target, refusal)
    _check_holders(owner, plan, target, refusal)


@dataclass(frozen=True)
class _Refusal:
    """The owner's refusal of one MPC stage: names the party, the stage and the rule."""

    party: str
    stage: str

    def __call__(self, message: str, rule: str, **details: object) -> PolicyRefusalError:
        return PolicyRefusalError(message, details={"party": self.party, "stage": self.stage, "rule": rule, **details})


def _check_computation(owner: Owner, plan: Plan, stage: MpcStage, q: MpcQuery, refuse: _Refusal) -> None:
    """What the stage computes is what the SQL this owner signs implies, over the domain the
    involved policies (carried in the plan, digests checked) declare, under this owner's rules
    (k, privacy units, bounds) and column roles."""
    me = owner.name
    every = plan.mpc_inputs(stage)
    mine = [i for i in every if i.party == me]

    # COUNT(col) may run as COUNT(*) only where col can hold no NULL (checked here for this party's
    # own datasets; the planner checked every registered schema).
    def count_star(col: str) -> bool:
        return not any(
            owner.schemas[i.dataset].field(col).nullable for i in mine if col in owner.schemas[i.dataset].names
        )

    violation = stage_consistency_violation(stage, stage.spec, q, every, count_star=count_star)
    if violation is not None:
        raise refuse(violation[0], violation[1], **violation[2])
    for inp in mine:
        violation = stage_rule_violation(
            stage.spec,
            owner.policies[inp.dataset],
            dataset=f"{me}.{inp.dataset}",
            columns=owner.schemas[inp.dataset].names,
            unit_column=UNION_UNIT,
        )
        if violation is not None:
            message, rule, details = violation
            raise refuse(message, rule, dataset=inp.dataset, **details)
    check_uses(
        {i.qualified: q.uses.get(i.qualified, {}) for i in mine},
        {i.qualified: owner.policies[i.dataset] for i in mine},
        {i.qualified: owner.schemas[i.dataset].names for i in mine},
    )


def _check_players(owner: Owner, plan: Plan, stage: MpcStage, refuse: _Refusal) -> None:
    """The holders name exactly the spec's players, each holding what its kind may hold; a helper's
    identity is the coordinator's key (the log key this agent witnesses): a helper under any other
    key could be someone else's second player."""
    spec = stage.spec
    if set(stage.holders) != set(range(len(spec.players))):
        raise refuse("the MPC stage's holders do not name exactly its players", "players")
    coordinator_key = owner.witness.log_key if owner.witness is not None else None
    if owner.witness is not None and coordinator_key is None and any(not p.holds_input for p in spec.players):
        raise refuse(
            "the MPC stage has a helper player run by the coordinator, and this agent does not know the "
            "coordinator's log key yet to check the helper's identity (it learns it at registration, or pin it "
            "with [party] log_key)",
            "players",
        )
    for n, player in enumerate(spec.players):
        holder = stage.holders[n]
        if player.holds_input == isinstance(holder, HelperHolder):
            raise refuse(f"the MPC stage's player {n} ({player.name}) and its holders disagree", "players")
        if isinstance(holder, PartyHolder) and holder.party != player.name:
            raise refuse(f"the MPC stage's player {n} ({player.name}) would hold {holder.party}'s input", "players")
        if isinstance(holder, HelperHolder) and (
            holder.helper != player.name
            or (coordinator_key is not None and holder.key != coordinator_key.public_key.hex())
        ):
            raise refuse(
                f"the MPC stage's helper player {n} is not named with the coordinator's key", "players", player=n
            )
    try:
        mpc_player_keys(plan, stage)
    except InvalidQueryError as err:
        raise refuse(err.message, "players") from None


def _check_holders(owner: Owner, plan: Plan, stage: MpcStage, refuse: _Refusal) -> None:
    """Who holds what: every MPC-side dataset only its owner's own player, the TEE-side ones only
    the enclave, and this owner's TEE-side datasets only where its policy accepts an enclave."""
    me = owner.name
    feeding = plan.feeding(stage)
    held = {(h.party, d) for h in stage.holders.values() if isinstance(h, PartyHolder) for d in h.datasets}
    fed = {h.stage for h in stage.holders.values() if isinstance(h, EnclaveHolder)}
    for inp in stage.inputs:
        if (inp.party, inp.dataset) not in held:
            raise refuse(f"no player of its owner holds {inp.qualified} in the MPC stage", "players")
    if held != {(i.party, i.dataset) for i in stage.inputs} or fed != {s.id for s in feeding}:
        raise refuse("the MPC stage's holders do not match its inputs", "players")
    for s in feeding:
        for inp in s.inputs:
            if inp.party == me and owner.policies[inp.dataset].trust.mpc_only:
                raise refuse(
                    f"{me}.{inp.dataset} goes to no enclave (trust.mpc_only in its policy), and the plan streams "
                    "it to the enclave",
                    "mpc_only",
                    dataset=inp.dataset,
                )
