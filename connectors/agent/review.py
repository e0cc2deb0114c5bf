"""A data owner's review of a plan: every check its agent runs before it signs (or holds for its
owner) a plan that reads its data. Raises the refusal, naming the party, dataset, column and rule.

The rules every checker shares (analysts, privacy units, bounds, column roles, what each stage
computes, each MPC stage's k, units, bounds and dominance) are :func:`sealroom.planning.checks.check_plan`'s,
run as this owner's checker; what is here is what only an owner checks on top, and
:func:`check_logged`: that the coordinator's transparency log shows the query (no approval outside
the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from connectors.witness import LogWitness
from sealroom.audit.entries import LogEntry
from sealroom.audit.merkle import leaf_hash, verify_inclusion
from sealroom.audit.notes import SignedCheckpoint
from sealroom.errors import ApprovalError, AuditError, InvalidQueryError, PolicyRefusalError
from sealroom.planning import checks
from sealroom.planning.checks import Checker, check_stage_k
from sealroom.planning.plan import EnclaveHolder, HelperHolder, MpcStage, PartyHolder, Plan, PlanInput, mpc_player_keys
from sealroom.policy import DatasetPolicy
from sealroom.signing import LogPosition

log = logging.getLogger(__name__)


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
    """Every check of a plan before this owner signs it; return this party's inputs. Raises the
    refusal.

    This owner's own checks come first (the plan reads its data under its key, carries its current
    policies, names only registered columns); then every shared rule
    (:func:`sealroom.planning.checks.check_plan`, as this owner's checker over its registered
    schemas); then what only an owner checks: no stage's minimum group size weaker than its
    inputs' policies, and the players and holders of every MPC stage its data goes to."""
    me = owner.name
    mine = _own_inputs(owner, plan)
    checked = checks.check_plan(plan, _checker(owner, mine))
    for stage in plan.stages:
        check_stage_k(stage, party=me)
    for mpc in plan.mpc_stages():
        if mpc.id in checked.mpc_queries:  # this party's data goes to it (directly, or through an enclave)
            check_mpc_stage(owner, plan, mpc)
    return mine


@dataclass(frozen=True)
class Submitted:
    """What the coordinator sends with a plan (ReviewPlanRequest): its ``query_submitted`` entry,
    the signed checkpoint it proved the entry in, and the inclusion proof."""

    entry: bytes = b""
    checkpoint: str = ""
    proof: Sequence[bytes] = ()


def check_logged(owner: Owner, plan: Plan, submitted: Submitted) -> LogPosition | None:
    """No approval outside the log: the entry is the coordinator's ``query_submitted`` entry naming
    exactly this query, plan hash and analyst, and it is included in a checkpoint this agent has
    witnessed (:meth:`connectors.witness.LogWitness.prove_included`, which witnesses the newer
    checkpoint first). Returns the log position the approval signs. Raises ApprovalError
    (``rule`` ``not_in_log``) naming the check.

    An agent that does not witness (``unsafe_no_witness``, tests only) checks the entry and the proof
    against the checkpoint it is given, unverified; given nothing, it returns None and its approval
    binds no position (an enclave releases nothing on such approvals)."""
    me = owner.name

    def refuse(check: str, why: str) -> ApprovalError:
        return ApprovalError(
            f"{me} refuses to approve query {plan.query_id}: {why}; a query the coordinator's transparency log "
            "does not show gets no approval",
            details={"party": me, "check": check, "rule": "not_in_log"},
        )

    if not submitted.entry:
        if owner.witness is None:
            return None
        raise refuse("log_entry_missing", "the request carries no query_submitted log entry for it")
    try:
        entry = LogEntry.from_bytes(submitted.entry)
    except (ValueError, TypeError):
        raise refuse("log_entry", "the log entry sent with it is malformed") from None
    event = entry.event
    if (
        entry.type != "query_submitted"
        or event.get("query_id") != plan.query_id
        or event.get("plan_hash") != plan.hash
        or event.get("analyst") != plan.analyst
    ):
        raise refuse(
            "log_entry", "the log entry sent with it is not the query_submitted entry of this query, plan and analyst"
        )
    try:
        if owner.witness is not None:
            return owner.witness.prove_included(
                submitted.entry, entry.seq, submitted.checkpoint, submitted.proof, query_id=plan.query_id
            )
        cp = SignedCheckpoint.from_text(submitted.checkpoint).checkpoint
        verify_inclusion(leaf_hash(submitted.entry), index=entry.seq, size=cp.size, proof=submitted.proof, root=cp.root)
        log.warning(
            "query %s: log inclusion checked against an unwitnessed checkpoint (unsafe_no_witness)", plan.query_id
        )
        return LogPosition(entry.seq, cp.size, cp.root)
    except AuditError as err:
        check = str(err.details.get("check", "inclusion_proof"))
        if check in ("inclusion_checkpoint", "inclusion_proof"):
            raise refuse(
                check, f"its log entry is not proven in a checkpoint this agent witnessed ({err.message})"
            ) from None
        raise witness_refusal(me, plan.query_id, err) from None
    except (ValueError, ApprovalError):
        raise refuse("inclusion_proof", "the inclusion proof sent with it is malformed") from None


def witness_refusal(party: str, query_id: str, err: AuditError) -> ApprovalError:
    """The refusal of an approval whose witness check of the coordinator's log failed (logged)."""
    check = str(err.details.get("check", "audit"))
    log.error(
        "refusing to approve query %s: the coordinator's transparency log failed the witness check (%s)",
        query_id,
        check,
    )
    return ApprovalError(
        f"{party} refuses to approve query {query_id}: the coordinator's transparency log failed the "
        f"witness check ({check}): {err.message}",
        details={"party": party, "check": check, "rule": "log_witness"},
    )


def _own_inputs(owner: Owner, plan: Plan) -> list[PlanInput]:
    """This party's inputs, once the plan names this agent's key, carries each of its datasets'
    current policy (same digest: the shared rules then read the owner's own policy) and names only
    columns the dataset registers. Raises the refusal."""
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
        schema = owner.schemas[inp.dataset]
        for col in (*inp.columns, *inp.filter_columns):
            if col not in schema.names:
                raise PolicyRefusalError(f"{me}.{inp.dataset} has no column {col}", details={**where, "column": col})
    return mine


def _checker(owner: Owner, mine: list[PlanInput]) -> Checker:
    """This owner as a checker of the shared rules: it answers for its own inputs, over their
    registered schemas."""
    schemas = {i.qualified: owner.schemas[i.dataset] for i in mine}

    # COUNT(col) may run as COUNT(*) only where col can hold no NULL (checked here for this party's
    # own datasets; the planner checked every registered schema).
    def count_star(col: str) -> bool:
        return not any(s.field(col).nullable for s in schemas.values() if col in s.names)

    return Checker(party=owner.name, columns={q: s.names for q, s in schemas.items()}, count_star=count_star)


def check_mpc_stage(owner: Owner, plan: Plan, stage: MpcStage) -> None:
    """What only an owner checks of an MPC stage its data goes to (directly, or through the TEE
    stage feeding it), on top of the shared rules: its datasets go to an enclave only where its
    policy allows and otherwise are held by its own player only, and the players and holders agree
    with the spec (a helper under the coordinator's key). Raises the refusal."""
    refusal = _Refusal(owner.name, stage.id)
    _check_players(owner, plan, stage, refusal)
    _check_holders(owner, plan, stage, refusal)


@dataclass(frozen=True)
class _Refusal:
    """The owner's refusal of one MPC stage: names the party, the stage and the rule."""

    party: str
    stage: str

    def __call__(self, message: str, rule: str, **details: object) -> PolicyRefusalError:
        return PolicyRefusalError(message, details={"party": self.party, "stage": self.stage, "rule": rule, **details})


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
