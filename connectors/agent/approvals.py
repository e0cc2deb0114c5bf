"""The party agent's approvals: the plans it holds, their state, when approvals lapse, and the
owner's signed commands (approve, reject, revoke) as they change that state.

A held plan is in one :class:`PlanState`. An automatic approval starts ``APPROVED``; a plan that
waits for its owner (``approval = "manual"``) starts ``PENDING`` and is approved, rejected or revoked
only by a command signed with the party's own key, fresh, and never seen before (so nobody else who
can reach the agent, the coordinator included, decides for the owner). Every approval lapses after
``approval_ttl_seconds``; data moves (sealed to an enclave, or as MPC shares) only for a plan whose
approval this agent holds, live, itself (:meth:`Approvals.approved_plan`).

Bounds: at most ``max_pending_per_analyst`` plans of one analyst wait for the owner at once (so one
analyst, or whoever forges plans in one analyst's name, cannot fill the owner's queue for the
others), and at most :data:`MAX_PENDING` in all (a backstop); a pending plan is forgotten after
``pending_ttl_seconds``, and the reasons plans are no longer approved are remembered for the last
:data:`MAX_REMEMBERED` only.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from connectors.agent.claims import ClaimLog
from connectors.agent.ledger import BudgetLedger
from sealroom.errors import ApprovalError, NotFoundError, ResourceExhaustedError
from sealroom.planning.plan import Plan
from sealroom.signing import OWNER_MESSAGE_MAX_SKEW_MS, LogPosition, check_issued_at, verify_owner_command
from sealroom.v1 import party_pb2

log = logging.getLogger(__name__)


# At most this many plans wait for the owner at once, whoever they are for (a backstop behind the
# per-analyst quota, so the list never grows without bound); further manual plans are refused until
# some go.
MAX_PENDING = 1000

# At most this many plans of one analyst wait for the owner at once, by default
# ([party] max_pending_per_analyst): one analyst's flood leaves room for every other analyst's plans.
DEFAULT_MAX_PENDING_PER_ANALYST = 100


# Plans whose approval lapsed, was revoked or rejected, remembered to say so (bounded, oldest first).
MAX_REMEMBERED = 4096


class PlanState(enum.Enum):
    """Where a held plan stands."""

    PENDING = "pending"  # awaits the owner's decision: nothing signed
    APPROVED = "approved"  # signed, live until ``expires_at``; no data has moved for it yet
    USED = "used"  # signed and live, and data moved for it: it no longer awaits a decision
    SPENT = "spent"  # data moved for it, then its approval lapsed or was revoked


@dataclass
class HeldPlan:
    """A plan this agent reviewed and holds: approved (signed, until ``expires_at``) or, for manual
    approval, pending its owner's decision. ``manual`` says how it is approved, ``state`` where it is."""

    plan: Plan
    manual: bool
    received_at: float
    state: PlanState = PlanState.PENDING
    signature: bytes | None = None
    expires_at: float = 0.0
    # Where the log shows the query (checked at review: connectors.agent.review.check_logged); the
    # approval signs it. None only for an agent that does not witness, given no entry.
    position: LogPosition | None = None
    # When the coordinator's log shows the query submitted (unix seconds): what a privacy charge's
    # refresh window counts from (connectors/agent/ledger.py).
    submitted_at: float = 0.0

    @property
    def approved(self) -> bool:
        return self.state in (PlanState.APPROVED, PlanState.USED)

    @property
    def awaits_owner(self) -> bool:
        """Listed for the owner (``sealroom pending``): a manual plan no data has moved for."""
        return self.manual and self.state in (PlanState.PENDING, PlanState.APPROVED)

    def grant(self, signature: bytes, expires_at: float) -> None:
        self.signature, self.expires_at = signature, expires_at
        self.state = PlanState.USED if self.state is PlanState.SPENT else PlanState.APPROVED

    def withdraw(self) -> None:
        self.signature, self.expires_at = None, 0.0
        self.state = PlanState.SPENT if self.state in (PlanState.USED, PlanState.SPENT) else PlanState.PENDING

    def mark_used(self) -> None:
        self.state = PlanState.USED if self.approved else PlanState.SPENT


@dataclass(frozen=True)
class PendingInput:
    dataset: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class PendingPlan:
    """A manual plan as the owner reviews it (``sealroom pending``)."""

    query_id: str
    plan_hash: str
    analyst: str
    sql: str
    state: str  # "pending" or "approved"
    inputs: tuple[PendingInput, ...]  # this party's inputs only
    parties: tuple[str, ...]
    min_group_size: int
    received_at: float
    expires_at: float  # when the approval lapses, or when an undecided plan is forgotten


@dataclass(frozen=True)
class OwnerDecision:
    """What an owner's command did, as the agent reports it back to the owner."""

    query_id: str
    plan_hash: str
    state: str  # "approved", "rejected" or "pending"
    expires_at: float
    query_status: str
    awaiting: tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    """An owner's approval as held: the plan, whether this command signed it (``fresh``), and the
    approval (signature and expiry) as it stood then."""

    plan_hash: str
    held: HeldPlan
    fresh: bool
    signature: bytes
    expires_at: float


class Approvals:
    """The plans one party agent holds, and the owner's commands that decide them. Thread-safe."""

    def __init__(
        self,
        party: str,
        *,
        approval_ttl_seconds: float,
        pending_ttl_seconds: float,
        max_pending_per_analyst: int = DEFAULT_MAX_PENDING_PER_ANALYST,
        claims: ClaimLog | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        self.party = party
        self.max_pending_per_analyst = max_pending_per_analyst
        self.approval_ttl_seconds = approval_ttl_seconds
        self.pending_ttl_seconds = pending_ttl_seconds
        # plan hash -> held plan; query id -> plan hash (manual plans); plan hash -> why it is no
        # longer approved ("expired", "revoked", "rejected"); the digests of the owner's commands
        # received, until they could no longer pass as fresh. All guarded by _lock, pruned by _prune.
        self._held: dict[str, HeldPlan] = {}
        self._manual: dict[str, str] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._seen_commands: dict[bytes, float] = {}
        # What this owner's data already went to, per plan (claim): kept apart from the held plan, so
        # a new review, a lapsed approval or a restart (claims kept on disk) resets nothing.
        self._claims = claims if claims is not None else ClaimLog()
        # The owner's privacy budgets: reservations are released here when a plan is rejected,
        # revoked or lapses before its data flowed, and committed when its data first flows.
        self.ledger = ledger if ledger is not None else BudgetLedger(None, party=party)
        self._lock = threading.Lock()

    def held(self, plan_hash: str) -> HeldPlan | None:
        with self._lock:
            return self._held.get(plan_hash)

    # -- review ------------------------------------------------------------------------------

    def position(self, plan_hash: str) -> LogPosition | None:
        """The log position the held approval of this plan signs (None: none held, or none bound)."""
        with self._lock:
            held = self._held.get(plan_hash)
            return held.position if held is not None else None

    def hold(
        self,
        plan: Plan,
        *,
        manual: bool,
        sign: Callable[[str, LogPosition | None], bytes],
        position: LogPosition | None = None,
        submitted_at: float = 0.0,
    ) -> tuple[bytes | None, float]:
        """Hold a plan that passed review: approve it now (``sign`` the plan hash at the query's log
        ``position``; a new lifetime) or, if ``manual``, hold it (and its position) for the owner.
        Returns (signature, expires_at); (None, 0.0) while the plan waits for its owner. A plan the
        owner approved already returns that approval, unchanged."""
        me = self.party
        plan_hash = plan.hash
        now = time.time()
        with self._lock:
            self._prune(now)
            if self._gone.get(plan_hash) == "rejected":
                raise ApprovalError(
                    f"the owner of {me} rejected this plan", details={"party": me, "rule": "rejected_by_owner"}
                )
            if not manual:
                held = HeldPlan(plan, False, now, position=position, submitted_at=submitted_at)
                held.grant(sign(plan_hash, position), now + self.approval_ttl_seconds)
                self._held[plan_hash] = held
                self._gone.pop(plan_hash, None)
                log.info("approved plan %s for query %s", plan_hash[:12], plan.query_id)
                return held.signature, held.expires_at
            earlier = self._held.get(plan_hash)
            if earlier is not None:
                return earlier.signature, earlier.expires_at
            self._admit_manual(plan)
            self._held[plan_hash] = HeldPlan(plan, True, now, position=position, submitted_at=submitted_at)
            self._manual[plan.query_id] = plan_hash
        log.info("plan %s for query %s awaits the owner's approval", plan_hash[:12], plan.query_id)
        return None, 0.0

    def _admit_manual(self, plan: Plan) -> None:
        """Under _lock: refuse a second plan for one query, more than ``max_pending_per_analyst``
        undecided plans of one analyst, and more than MAX_PENDING in all."""
        me = self.party
        other = self._manual.get(plan.query_id)
        if other is not None and other != plan.hash:
            raise ApprovalError(
                f"another plan for query {plan.query_id} already awaits the decision of {me}'s owner; a query "
                "has one plan",
                details={"party": me, "check": "query_plan"},
            )
        undecided = [h.plan.analyst for h in self._held.values() if h.manual and not h.approved]
        analyst, quota = plan.analyst, self.max_pending_per_analyst
        if sum(1 for a in undecided if a == analyst) >= quota:
            raise ResourceExhaustedError(
                f"{quota} plans of analyst {analyst} already await the decision of {me}'s owner (at most "
                f"{quota} per analyst: [party] max_pending_per_analyst); try again once the owner decided some",
                details={"party": me, "analyst": analyst, "limit": "max_pending_per_analyst", "max": quota},
            )
        if len(undecided) >= MAX_PENDING:
            raise ResourceExhaustedError(
                f"{MAX_PENDING} plans already await the decision of {me}'s owner; try again later",
                details={"party": me, "limit": "pending_plans", "max": MAX_PENDING},
            )

    def _prune(self, now: float) -> None:
        """Under _lock: lapse expired approvals and forget stale plans, so nothing grows unbounded.

        A lapsed automatic approval is dropped. A lapsed manual one goes back to the owner (pending)
        while the plan is younger than ``pending_ttl_seconds``; a pending plan older than that is
        forgotten."""
        for plan_hash, held in list(self._held.items()):
            if held.approved and held.expires_at <= now:
                self._remember(plan_hash, "expired")
                if held.state is PlanState.APPROVED:  # no data flowed for it: its budget goes back
                    self.ledger.release(plan_hash, "expired")
                log.info("the approval of plan %s (query %s) lapsed", plan_hash[:12], held.plan.query_id)
                if held.manual and held.received_at + self.pending_ttl_seconds > now:
                    held.withdraw()
                else:
                    self._forget(plan_hash)
            elif not held.approved and held.received_at + self.pending_ttl_seconds <= now:
                self._forget(plan_hash)
        for digest, until in list(self._seen_commands.items()):
            if until <= now:
                del self._seen_commands[digest]

    def _forget(self, plan_hash: str) -> None:
        held = self._held.pop(plan_hash, None)
        if held is not None and self._manual.get(held.plan.query_id) == plan_hash:
            del self._manual[held.plan.query_id]

    def _remember(self, plan_hash: str, why: str) -> None:
        self._gone[plan_hash] = why
        self._gone.move_to_end(plan_hash)
        while len(self._gone) > MAX_REMEMBERED:
            self._gone.popitem(last=False)

    def lapse(self) -> None:
        """Lapse the approvals whose time is up now (their unspent budget goes back)."""
        with self._lock:
            self._prune(time.time())

    # -- data moves only for a live approval -------------------------------------------------

    def approved_plan(self, plan_json: bytes) -> Plan:
        """The plan, if this agent holds a live approval of exactly these bytes; else ApprovalError
        saying why (never approved, expired, revoked, or awaiting the owner). Data moves (sealed to an
        enclave, or as MPC shares) only for a plan this returns."""
        plan_hash = hashlib.sha256(plan_json).hexdigest()
        me = self.party
        with self._lock:
            self._prune(time.time())
            held = self._held.get(plan_hash)
            why = self._gone.get(plan_hash)
        if held is None or not held.approved:
            if why == "expired":
                raise ApprovalError(
                    f"the approval of {me} for this plan expired (approvals last "
                    f"{self.approval_ttl_seconds:g} s); it streams data only under a live approval",
                    details={"party": me, "check": "approval_expired"},
                )
            if why == "revoked":
                raise ApprovalError(
                    f"the owner of {me} revoked its approval of this plan; it streams no data for it",
                    details={"party": me, "check": "approval_revoked"},
                )
            raise ApprovalError(
                f"{me} did not approve this plan; it streams data only for plans it signed"
                + (" (the plan awaits the owner's decision)" if held is not None else ""),
                details={"party": me, "check": "own_approval"},
            )
        plan = held.plan
        if plan.to_json() != plan_json:
            raise ApprovalError(
                f"{me} did not approve this plan; it streams data only for plans it signed",
                details={"party": me, "check": "own_approval"},
            )
        return plan

    def claim(self, plan_hash: str, use: str) -> None:
        """Before this owner's data moves for an approved plan (``use``: ``"tee"``, its inputs sealed
        to an enclave job; ``"mpc:<stage>:<index>"``, its player of an MPC stage): each use once per
        plan, so the query's one ``query_submitted`` log entry, and the approval that signs it, make
        one release. A second enclave job or MPC run for the same plan (a coordinator replaying it,
        even after sending it for review again or after the agent restarted) gets nothing:
        ApprovalError (connectors/agent/claims.py).

        Before the claim, the plan's privacy charge is committed (connectors/agent/ledger.py: on disk,
        never given back); a plan whose reservation was released gets nothing."""
        self.ledger.commit(plan_hash)
        if not self._claims.claim(plan_hash, use):
            raise ApprovalError(
                f"{self.party} already sent its data for this plan ({use}); a query releases once, so "
                "run it again as a new query",
                details={"party": self.party, "check": "once_per_plan"},
            )

    def mark_used(self, plan_hash: str) -> None:
        """Data moved for this plan (sealed streams or MPC shares): it no longer awaits a decision."""
        with self._lock:
            held = self._held.get(plan_hash)
            if held is not None:
                held.mark_used()

    # -- the owner's decisions (manual approval) -----------------------------------------------

    def pending(self) -> list[PendingPlan]:
        """Manual plans held for the owner: waiting for a decision, or approved and still live."""
        me = self.party
        with self._lock:
            self._prune(time.time())
            held = [(h, p) for h, p in self._held.items() if p.awaits_owner]
        out = []
        for plan_hash, p in sorted(held, key=lambda x: x[1].received_at):
            out.append(
                PendingPlan(
                    query_id=p.plan.query_id,
                    plan_hash=plan_hash,
                    analyst=p.plan.analyst,
                    sql=p.plan.sql,
                    state="approved" if p.approved else "pending",
                    inputs=tuple(PendingInput(i.dataset, tuple(i.columns)) for i in p.plan.inputs() if i.party == me),
                    parties=tuple(p.plan.involved_parties()),
                    min_group_size=max(s.min_group_size for s in p.plan.stages),
                    received_at=p.received_at,
                    expires_at=p.expires_at if p.approved else p.received_at + self.pending_ttl_seconds,
                )
            )
        return out

    def authenticate(self, action: str, command: party_pb2.OwnerCommand, *, public_key_hex: str) -> None:
        """The command must be signed by this party's own key, and fresh."""
        me = self.party
        check_issued_at(command.issued_at_ms, int(time.time() * 1000), party=me)
        verify_owner_command(
            public_key_hex,
            bytes(command.signature),
            action,
            party=me,
            query_id=command.query_id,
            issued_at_ms=command.issued_at_ms,
            reason=command.reason,
            plan_hash=command.plan_hash,
        )

    def accept_command(self, action: str, command: party_pb2.OwnerCommand, *, public_key_hex: str) -> None:
        """The command must be signed by this party's own key, fresh, and never seen before."""
        me = self.party
        now = time.time()
        self.authenticate(action, command, public_key_hex=public_key_hex)
        digest = hashlib.sha256(bytes(command.signature)).digest()
        with self._lock:
            self._prune(now)
            if digest in self._seen_commands:
                raise ApprovalError(
                    f"this {action} command was already received; sign a new one",
                    details={"party": me, "check": "replay"},
                )
            self._seen_commands[digest] = now + 2 * OWNER_MESSAGE_MAX_SKEW_MS / 1000

    def find(self, command: party_pb2.OwnerCommand) -> tuple[str, HeldPlan]:
        """The manual plan the command names (NotFoundError if none awaits the owner)."""
        with self._lock:
            return self._find(command)

    def _find(self, command: party_pb2.OwnerCommand) -> tuple[str, HeldPlan]:
        """Under _lock: the manual plan the command names."""
        plan_hash = self._manual.get(command.query_id)
        held = self._held.get(plan_hash) if plan_hash else None
        if plan_hash is None or held is None:
            raise NotFoundError(
                f"no plan of query {command.query_id} awaits the decision of {self.party}'s owner; "
                "`sealroom pending` lists them",
                details={"party": self.party, "query_id": command.query_id},
            )
        pinned = command.plan_hash.lower()
        if pinned and (len(pinned) < 12 or not plan_hash.startswith(pinned)):
            raise ApprovalError(
                f"query {command.query_id} holds plan {plan_hash[:16]}..., not the plan you named; review it "
                "again with `sealroom pending`",
                details={"party": self.party, "check": "approval_plan_hash"},
            )
        return plan_hash, held

    def grant(self, command: party_pb2.OwnerCommand, *, sign: Callable[[str, LogPosition | None], bytes]) -> Grant:
        """The owner approves the plan the command names: ``sign`` it unless it is approved already."""
        now = time.time()
        with self._lock:
            plan_hash, held = self._find(command)
            fresh = not held.approved
            if fresh:
                held.grant(sign(plan_hash, held.position), now + self.approval_ttl_seconds)
                self._gone.pop(plan_hash, None)
            assert held.signature is not None
            return Grant(plan_hash, held, fresh, held.signature, held.expires_at)

    def refused(self, grant: Grant, *, query_gone: bool) -> None:
        """The coordinator did not take the owner's approval: the agent does not keep an approval
        nobody can use (it forgets the plan when the query is gone, else withdraws what it signed)."""
        with self._lock:
            if query_gone:
                self._forget(grant.plan_hash)
            elif grant.fresh and self._held.get(grant.plan_hash) is grant.held:
                grant.held.withdraw()
            if grant.fresh or query_gone:
                self.ledger.release(grant.plan_hash, "refused")

    def reject(self, command: party_pb2.OwnerCommand) -> tuple[str, HeldPlan]:
        """The owner rejects the plan the command names: dropped for good (a new review is refused)."""
        with self._lock:
            plan_hash, held = self._find(command)
            self._forget(plan_hash)
            self._remember(plan_hash, "rejected")
        self.ledger.release(plan_hash, "rejected")
        return plan_hash, held

    def revoke(self, command: party_pb2.OwnerCommand) -> tuple[str, HeldPlan]:
        """The owner withdraws its approval of the plan the command names: not honoured from now on."""
        me = self.party
        with self._lock:
            plan_hash, held = self._find(command)
            if not held.approved:
                raise ApprovalError(
                    f"{me} has not approved query {command.query_id}; there is nothing to revoke (reject it instead)",
                    details={"party": me, "check": "not_approved"},
                )
            held.withdraw()
            self._remember(plan_hash, "revoked")
        self.ledger.release(plan_hash, "revoked")  # kept when its data flowed already (committed)
        return plan_hash, held
