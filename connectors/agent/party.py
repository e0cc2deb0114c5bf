"""The party agent itself: its datasets and key, the plans it approved (automatically or on its
owner's signed command), and contributing its rows, sealed, to an attested enclave."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from connectors.agent.config import PartyConfig
from connectors.agent.review import Owner, check_plan
from connectors.agent.streaming import (
    TARGET_FRAME_BYTES,
    StreamCounter,
    filtered_batches,
    padded_batches,
    rebatch,
    until_failure,
)
from connectors.sources import Source, check_schema, open_source
from connectors.witness import LogWitness
from sealroom.attestation import Claims, Evidence, report_data_for, verify_evidence
from sealroom.errors import (
    ApprovalError,
    AuditError,
    InvalidQueryError,
    NotFoundError,
    ResourceExhaustedError,
    SealroomError,
    UnavailableError,
)
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.planning.plan import Plan, PlanInput
from sealroom.planning.sql import PAD_COLUMN
from sealroom.policy import DatasetPolicy
from sealroom.rpc import call, open_channel, unwrap
from sealroom.sealed import SealingStream, StreamContext, schema_hash
from sealroom.signing import (
    OWNER_MESSAGE_MAX_SKEW_MS,
    check_issued_at,
    sign_approval,
    sign_owner_action,
    sign_stream_header,
    verify_owner_command,
)
from sealroom.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    enclave_pb2,
    enclave_pb2_grpc,
    party_pb2,
)
from sealroom.wire import HEADER_METADATA_KEY, SIGNATURE_METADATA_KEY, UPLOAD_PATH

log = logging.getLogger(__name__)


# At most this many plans wait for the owner at once (ReviewPlan is open to anyone who can reach the
# agent, so the list must not grow without bound); further manual plans are refused until some go.
MAX_PENDING = 1000


# Plans whose approval lapsed, was revoked or rejected, remembered to say so (bounded, oldest first).
MAX_REMEMBERED = 4096


COORDINATOR_CALL_TIMEOUT = 30.0


# Stream counters (GetProgress) are kept for this many recent jobs.
MAX_PROGRESS_JOBS = 64


@dataclass
class HeldPlan:
    """A plan this agent reviewed and holds: approved (signed, until ``expires_at``) or, for manual
    approval, pending its owner's decision."""

    plan: Plan
    manual: bool
    received_at: float
    signature: bytes | None = None
    expires_at: float = 0.0
    streamed: bool = False  # this agent has streamed for the plan (it no longer awaits a decision)

    @property
    def approved(self) -> bool:
        return self.signature is not None

    def withdraw(self) -> None:
        self.signature = None
        self.expires_at = 0.0


class PartyAgent:
    def __init__(self, config: PartyConfig, *, signing_key: Ed25519PrivateKey | None = None):
        self.config = config
        self.key = signing_key or load_signing_key(config.signing_key)
        self.public_key_hex = public_key_hex(self.key)
        self.sources: dict[str, Source] = {}
        self.policies: dict[str, DatasetPolicy] = {}
        for d in config.datasets:
            self.sources[d.name] = open_source(d.source, dataset=f"{config.name}.{d.name}")
            self.policies[d.name] = d.policy
        self.schemas = {name: src.schema for name, src in self.sources.items()}
        self._mpc_players: Any = None  # connectors.mpc_player.MpcPlayers, made on first use
        # plan hash -> held plan; query id -> plan hash (manual plans); plan hash -> why it is no
        # longer approved ("expired", "revoked", "rejected"). All guarded by _lock, pruned by _prune.
        self._held: dict[str, HeldPlan] = {}
        self._manual: dict[str, str] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._seen_commands: dict[bytes, float] = {}
        self._last_issued_ms = 0
        self._lock = threading.Lock()
        self.appraisal = config.trust.appraisal()
        # job id -> this agent's streams for it (what GetProgress reports), the newest jobs last.
        self._streams: OrderedDict[str, list[StreamCounter]] = OrderedDict()
        # The witness of the coordinator's transparency log, consulted before every approval.
        self.witness: LogWitness | None = None
        if config.unsafe_no_witness:
            log.warning(
                "witnessing is OFF (unsafe_no_witness): this agent approves without checking that the "
                "coordinator's transparency log is consistent with what it saw; for tests and benchmarks only"
            )
        else:
            self.witness = LogWitness(
                party=config.name,
                key=self.key,
                state_dir=config.witness_state_dir,
                log_key=config.log_key,
                call=self._coordinator_call,
            )

    # -- registration ------------------------------------------------------------------------

    def registration(self, address: str) -> coordinator_pb2.RegisterPartyRequest:
        datasets = []
        for d in self.config.datasets:
            datasets.append(
                common_pb2.DatasetInfo(
                    party=self.config.name,
                    name=d.name,
                    arrow_schema=self.schemas[d.name].serialize().to_pybytes(),
                    policy_digest=d.policy.digest(),
                    policy_json=d.policy.canonical(),
                    description=d.description,
                    approximate_rows=self._approximate_rows(d.name) if d.policy.share_row_count else 0,
                )
            )
        return coordinator_pb2.RegisterPartyRequest(
            party=common_pb2.PartyInfo(
                name=self.config.name,
                address=address,
                signing_public_key=bytes.fromhex(self.public_key_hex),
            ),
            datasets=datasets,
        )

    def _approximate_rows(self, dataset: str) -> int:
        """The dataset's row count to two significant digits (read streaming, no column loaded)."""
        n = sum(b.num_rows for b in self.sources[dataset].batches([]))
        return int(float(f"{n:.2g}")) if n else 0

    def register(self, address: str, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        request = self.registration(address)
        with open_channel(self.config.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                try:
                    call("coordinator", stub.RegisterParty, request, timeout=10)
                    log.info("registered %d datasets with the coordinator", len(request.datasets))
                    if self.witness is not None:
                        self.witness.trust_on_first_use()
                    return
                except UnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    # -- review ------------------------------------------------------------------------------

    def _owner(self) -> Owner:
        return Owner(self.config.name, self.public_key_hex, self.policies, self.schemas, self.witness)

    def _check_plan(self, plan: Plan) -> list[PlanInput]:
        """Every policy check of a plan (:func:`connectors.agent.review.check_plan`); this party's inputs."""
        return check_plan(self._owner(), plan)

    def review(self, plan_json: bytes) -> tuple[str, bytes | None, float]:
        """Check a plan against this owner's policies; return (plan_hash, signature, expires_at).

        The signature is None when the plan waits for the owner's manual decision (any of this
        party's datasets in it has ``approval = "manual"``). A plan the owner already approved
        returns that approval, unchanged; an automatic approval is signed afresh (a new lifetime).
        """
        plan = Plan.from_json(plan_json)
        me = self.config.name
        mine = self._check_plan(plan)
        manual = any(self.policies[i.dataset].approval == "manual" for i in mine)
        plan_hash = plan.hash
        if not manual:
            self._witness_log(plan.query_id)  # before signing anything: the log must extend what it saw
        now = time.time()
        with self._lock:
            self._prune(now)
            if self._gone.get(plan_hash) == "rejected":
                raise ApprovalError(
                    f"the owner of {me} rejected this plan", details={"party": me, "rule": "rejected_by_owner"}
                )
            if not manual:
                signature = sign_approval(self.key, plan_hash)
                expires_at = now + self.config.approval_ttl_seconds
                self._held[plan_hash] = HeldPlan(plan, False, now, signature, expires_at)
                self._gone.pop(plan_hash, None)
                log.info("approved plan %s for query %s", plan_hash[:12], plan.query_id)
                return plan_hash, signature, expires_at
            held = self._held.get(plan_hash)
            if held is not None:
                return plan_hash, held.signature, held.expires_at
            other = self._manual.get(plan.query_id)
            if other is not None and other != plan_hash:
                raise ApprovalError(
                    f"another plan for query {plan.query_id} already awaits the decision of {me}'s owner; a query "
                    "has one plan",
                    details={"party": me, "check": "query_plan"},
                )
            if sum(1 for h in self._held.values() if h.manual and not h.approved) >= MAX_PENDING:
                raise ResourceExhaustedError(
                    f"{MAX_PENDING} plans already await the decision of {me}'s owner; try again later",
                    details={"party": me},
                )
            self._held[plan_hash] = HeldPlan(plan, True, now)
            self._manual[plan.query_id] = plan_hash
        log.info("plan %s for query %s awaits the owner's approval", plan_hash[:12], plan.query_id)
        return plan_hash, None, 0.0

    def _prune(self, now: float) -> None:
        """Under _lock: lapse expired approvals and forget stale plans, so nothing grows unbounded.

        A lapsed automatic approval is dropped. A lapsed manual one goes back to the owner (pending)
        while the plan is younger than ``pending_ttl_seconds``; a pending plan older than that is
        forgotten."""
        for plan_hash, held in list(self._held.items()):
            if held.approved and held.expires_at <= now:
                self._remember(plan_hash, "expired")
                log.info("the approval of plan %s (query %s) lapsed", plan_hash[:12], held.plan.query_id)
                if held.manual and held.received_at + self.config.pending_ttl_seconds > now:
                    held.withdraw()
                else:
                    self._forget(plan_hash)
            elif not held.approved and held.received_at + self.config.pending_ttl_seconds <= now:
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

    # -- contribution ------------------------------------------------------------------------

    def progress(self, job_id: str) -> list[StreamCounter]:
        """This agent's streams for a job (empty before it streams; kept for the last
        :data:`MAX_PROGRESS_JOBS` jobs, so the final counts can be read once a stream has ended)."""
        with self._lock:
            return list(self._streams.get(job_id, ()))

    @property
    def mpc_players(self) -> Any:
        """This agent's MPC players (imported on first use: agents without MPC stages never load mpc/)."""
        if self._mpc_players is None:
            from connectors.mpc_player import MpcPlayers

            self._mpc_players = MpcPlayers(self, approved_plan=self.approved_plan, host=self.config.mpc_host)
        return self._mpc_players

    def approved_plan(self, plan_json: bytes) -> Plan:
        """The plan, if this agent holds a live approval of exactly these bytes; else ApprovalError
        saying why (never approved, expired, revoked, or awaiting the owner). Data moves (sealed to an
        enclave, or as MPC shares) only for a plan this returns."""
        plan_hash = hashlib.sha256(plan_json).hexdigest()
        me = self.config.name
        with self._lock:
            self._prune(time.time())
            held = self._held.get(plan_hash)
            why = self._gone.get(plan_hash)
        if held is None or not held.approved:
            if why == "expired":
                raise ApprovalError(
                    f"the approval of {me} for this plan expired (approvals last "
                    f"{self.config.approval_ttl_seconds:g} s); it streams data only under a live approval",
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

    def contribute(self, plan_json: bytes, job_id: str, enclave_address: str) -> dict[str, Any]:
        plan = self.approved_plan(plan_json)
        plan_hash = hashlib.sha256(plan_json).hexdigest()
        me = self.config.name
        # Only what goes to an enclave: a dataset of this owner that an MPC stage reads directly stays
        # here (its own player holds its partials).
        mine = [i for s in plan.tee_stages() for i in s.inputs if i.party == me]
        if not mine:
            raise ApprovalError(f"the plan streams no data of {me} to an enclave", details={"party": me})
        with open_channel(enclave_address) as channel:
            enclave = enclave_pb2_grpc.EnclaveStub(channel)
            nonce = os.urandom(32)
            att = call("enclave", enclave.Attest, enclave_pb2.AttestRequest(job_id=job_id, nonce=nonce))
            evidence = Evidence.from_bytes(att.evidence)
            claims = self.verify_enclave(evidence, bytes(att.hpke_public_key), bytes(att.signing_public_key), nonce)
            for inp in mine:  # each dataset's own trust section narrows the agent's
                self.policies[inp.dataset].trust.check(claims, dataset=f"{me}.{inp.dataset}")
            job_key = X25519PublicKey.from_public_bytes(bytes(att.hpke_public_key))
            upload = channel.stream_unary(
                UPLOAD_PATH,
                request_serializer=None,
                response_deserializer=enclave_pb2.UploadSummary.FromString,
            )
            uploads = []
            with self._lock:
                self._streams[job_id] = []
                while len(self._streams) > MAX_PROGRESS_JOBS:
                    self._streams.popitem(last=False)
            for inp in mine:
                source = self.sources[inp.dataset]
                registered = self.schemas[inp.dataset]
                check_schema(source, registered)
                projected = pa.schema([registered.field(c) for c in inp.columns])
                if inp.filter is not None:
                    projected = projected.append(pa.field(PAD_COLUMN, pa.bool_(), nullable=False))
                ctx = StreamContext(
                    job_id=job_id,
                    party=self.config.name,
                    dataset=inp.dataset,
                    schema_hash=schema_hash(projected),
                    plan_hash=bytes.fromhex(plan_hash),
                    evidence_hash=evidence.digest(),
                )
                sealer = SealingStream(ctx, projected, job_key)
                header = sealer.header.to_bytes()
                if inp.filter is None:
                    batches = rebatch(source.batches(list(inp.columns)), TARGET_FRAME_BYTES)
                else:
                    batches = padded_batches(filtered_batches(source, registered, inp), projected)
                counter = StreamCounter(
                    inp.dataset, rows_shared=self.policies[inp.dataset].share_row_count, padded=inp.filter is not None
                )
                with self._lock:
                    self._streams.setdefault(job_id, []).append(counter)
                failed: list[SealroomError] = []
                frames = counter.count_frames(until_failure(sealer.frames(counter.count_rows(batches)), failed))
                try:
                    summary = upload(
                        frames,
                        metadata=(
                            (HEADER_METADATA_KEY, header),
                            (SIGNATURE_METADATA_KEY, sign_stream_header(self.key, header)),
                        ),
                        timeout=3600,
                    )
                except grpc.RpcError as exc:
                    if failed:  # the source or the filter failed here: say so, not "the enclave failed"
                        raise failed[0] from None
                    raise unwrap(exc, peer="enclave") from None
                if failed:
                    raise failed[0]
                counter.done = True
                uploads.append(
                    # Row counts stay with the owner; the coordinator learns what it sees anyway.
                    party_pb2.DatasetUpload(dataset=inp.dataset, bytes=summary.bytes, frames=summary.frames)
                )
                log.info(
                    "streamed %s to job %s (%d frames%s)%s",
                    inp.dataset,
                    job_id,
                    summary.frames,
                    ", filtered here and padded" if inp.filter is not None else "",
                    " under SIMULATED attestation" if claims.simulated else "",
                )
        self.mark_used(plan_hash)
        return {"uploads": uploads, "claims": claims}

    def mark_used(self, plan_hash: str) -> None:
        """Data moved for this plan (sealed streams or MPC shares): it no longer awaits a decision."""
        with self._lock:
            held = self._held.get(plan_hash)
            if held is not None:
                held.streamed = True

    # -- the owner's decisions (manual approval) -----------------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        """Manual plans held for the owner: waiting for a decision, or approved and still live."""
        now = time.time()
        me = self.config.name
        with self._lock:
            self._prune(now)
            held = [(h, p) for h, p in self._held.items() if p.manual and not p.streamed]
        out = []
        for plan_hash, p in sorted(held, key=lambda x: x[1].received_at):
            out.append(
                {
                    "query_id": p.plan.query_id,
                    "plan_hash": plan_hash,
                    "analyst": p.plan.analyst,
                    "sql": p.plan.sql,
                    "state": "approved" if p.approved else "pending",
                    "inputs": [
                        {"dataset": i.dataset, "columns": list(i.columns)} for i in p.plan.inputs() if i.party == me
                    ],
                    "parties": p.plan.involved_parties(),
                    "min_group_size": max(s.min_group_size for s in p.plan.stages),
                    "received_at": p.received_at,
                    "expires_at": p.expires_at if p.approved else p.received_at + self.config.pending_ttl_seconds,
                }
            )
        return out

    def _authorize(self, action: str, command: party_pb2.OwnerCommand) -> None:
        """The command must be signed by this party's own key, fresh, and never seen before."""
        me = self.config.name
        now = time.time()
        check_issued_at(command.issued_at_ms, int(now * 1000), party=me)
        verify_owner_command(
            self.public_key_hex,
            bytes(command.signature),
            action,
            party=me,
            query_id=command.query_id,
            issued_at_ms=command.issued_at_ms,
            reason=command.reason,
            plan_hash=command.plan_hash,
        )
        digest = hashlib.sha256(bytes(command.signature)).digest()
        with self._lock:
            self._prune(now)
            if digest in self._seen_commands:
                raise ApprovalError(
                    f"this {action} command was already received; sign a new one",
                    details={"party": me, "check": "replay"},
                )
            self._seen_commands[digest] = now + 2 * OWNER_MESSAGE_MAX_SKEW_MS / 1000

    def _find(self, command: party_pb2.OwnerCommand) -> tuple[str, HeldPlan]:
        """Under _lock: the manual plan the command names."""
        plan_hash = self._manual.get(command.query_id)
        held = self._held.get(plan_hash) if plan_hash else None
        if plan_hash is None or held is None:
            raise NotFoundError(
                f"no plan of query {command.query_id} awaits the decision of {self.config.name}'s owner; "
                "`sealroom pending` lists them",
                details={"party": self.config.name, "query_id": command.query_id},
            )
        pinned = command.plan_hash.lower()
        if pinned and (len(pinned) < 12 or not plan_hash.startswith(pinned)):
            raise ApprovalError(
                f"query {command.query_id} holds plan {plan_hash[:16]}..., not the plan you named; review it "
                "again with `sealroom pending`",
                details={"party": self.config.name, "check": "approval_plan_hash"},
            )
        return plan_hash, held

    def _issued_ms(self) -> int:
        with self._lock:
            self._last_issued_ms = max(int(time.time() * 1000), self._last_issued_ms + 1)
            return self._last_issued_ms

    def _coordinator_call(self, method: str, request: Any) -> Any:
        with open_channel(self.config.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return call("coordinator", getattr(stub, method), request, timeout=COORDINATOR_CALL_TIMEOUT)

    def _witness_log(self, query_id: str) -> None:
        """Witness the coordinator's log before an approval (connectors/witness.py): co-sign its latest
        checkpoint once it is checked to extend the last one this agent co-signed. Raises
        ApprovalError naming the failed check (``fork``, ``rollback``, ``consistency_proof``...)."""
        if self.witness is None:
            return
        me = self.config.name
        try:
            self.witness.witness(query_id=query_id)
        except AuditError as err:
            check = str(err.details.get("check", "audit"))
            log.error(
                "refusing to approve query %s: the coordinator's transparency log failed the witness check (%s)",
                query_id,
                check,
            )
            raise ApprovalError(
                f"{me} refuses to approve query {query_id}: the coordinator's transparency log failed the "
                f"witness check ({check}): {err.message}",
                details={"party": me, "check": check, "rule": "log_witness"},
            ) from None

    def approve(self, command: party_pb2.OwnerCommand) -> dict[str, Any]:
        """The owner approves: witness the log, sign the plan hash, hold the approval, send it to the
        coordinator."""
        self._authorize("approve", command)
        me = self.config.name
        with self._lock:
            self._find(command)  # nothing awaits the owner: say so before calling the coordinator
        self._witness_log(command.query_id)
        now = time.time()
        with self._lock:
            plan_hash, held = self._find(command)
            fresh = not held.approved
            if fresh:
                held.signature = sign_approval(self.key, plan_hash)
                held.expires_at = now + self.config.approval_ttl_seconds
                self._gone.pop(plan_hash, None)
            signature, expires_at = held.signature, held.expires_at
        assert signature is not None
        qid = held.plan.query_id
        issued = self._issued_ms()
        expires_ms = int(expires_at * 1000)
        request = coordinator_pb2.SubmitApprovalRequest(
            query_id=qid,
            party=me,
            plan_hash=plan_hash,
            signature=signature,
            expires_at_ms=expires_ms,
            issued_at_ms=issued,
            owner_signature=sign_owner_action(
                self.key,
                "approve",
                query_id=qid,
                party=me,
                plan_hash=plan_hash,
                issued_at_ms=issued,
                expires_at_ms=expires_ms,
            ),
        )
        try:
            resp = self._coordinator_call("SubmitApproval", request)
        except SealroomError as err:
            # The coordinator did not take it: the agent does not keep an approval nobody can use.
            with self._lock:
                if err.code == "not_found" or err.details.get("check") == "query_state":
                    self._forget(plan_hash)
                elif fresh and self._held.get(plan_hash) is held:
                    held.withdraw()
            raise
        log.info("the owner approved plan %s for query %s", plan_hash[:12], qid)
        return {
            "query_id": qid,
            "plan_hash": plan_hash,
            "state": "approved",
            "expires_at": expires_at,
            "query_status": resp.status,
            "awaiting": list(resp.awaiting),
        }

    def reject(self, command: party_pb2.OwnerCommand) -> dict[str, Any]:
        """The owner rejects: the agent drops the plan for good, and the coordinator refuses the query."""
        if not command.reason.strip():
            raise InvalidQueryError("a rejection needs a reason (--reason TEXT); the analyst sees it")
        self._authorize("reject", command)
        me = self.config.name
        with self._lock:
            plan_hash, held = self._find(command)
            self._forget(plan_hash)
            self._remember(plan_hash, "rejected")
        qid = held.plan.query_id
        log.info("the owner rejected plan %s for query %s", plan_hash[:12], qid)
        issued = self._issued_ms()
        reason = command.reason.strip()
        resp = self._coordinator_call(
            "RejectQuery",
            coordinator_pb2.RejectQueryRequest(
                query_id=qid,
                party=me,
                plan_hash=plan_hash,
                reason=reason,
                issued_at_ms=issued,
                owner_signature=sign_owner_action(
                    self.key, "reject", query_id=qid, party=me, plan_hash=plan_hash, issued_at_ms=issued, reason=reason
                ),
            ),
        )
        return {
            "query_id": qid,
            "plan_hash": plan_hash,
            "state": "rejected",
            "expires_at": 0.0,
            "query_status": resp.status,
            "awaiting": list(resp.awaiting),
        }

    def revoke(self, command: party_pb2.OwnerCommand) -> dict[str, Any]:
        """The owner withdraws an approval: the agent stops honouring it at once (the plan waits for
        the owner again), and the coordinator removes it unless execution has started."""
        self._authorize("revoke", command)
        me = self.config.name
        with self._lock:
            plan_hash, held = self._find(command)
            if not held.approved:
                raise ApprovalError(
                    f"{me} has not approved query {command.query_id}; there is nothing to revoke (reject it instead)",
                    details={"party": me, "check": "not_approved"},
                )
            held.withdraw()
            self._remember(plan_hash, "revoked")
        qid = held.plan.query_id
        log.info("the owner revoked its approval of plan %s for query %s", plan_hash[:12], qid)
        issued = self._issued_ms()
        try:
            resp = self._coordinator_call(
                "RevokeApproval",
                coordinator_pb2.RevokeApprovalRequest(
                    query_id=qid,
                    party=me,
                    plan_hash=plan_hash,
                    issued_at_ms=issued,
                    owner_signature=sign_owner_action(
                        self.key, "revoke", query_id=qid, party=me, plan_hash=plan_hash, issued_at_ms=issued
                    ),
                ),
            )
        except SealroomError as err:
            err.message = f"{err.message}; this agent no longer honours the approval and streams nothing for it"
            err.args = (err.message,)
            raise
        return {
            "query_id": qid,
            "plan_hash": plan_hash,
            "state": "pending",
            "expires_at": 0.0,
            "query_status": resp.status,
            "awaiting": list(resp.awaiting),
        }

    def verify_enclave(self, evidence: Evidence, hpke_pk: bytes, signing_pk: bytes, nonce: bytes) -> Claims:
        return verify_evidence(
            evidence,
            policy=self.appraisal,
            expected_report_data=report_data_for(hpke_public_key=hpke_pk, signing_public_key=signing_pk, nonce=nonce),
            expected_nonce=nonce,
        )
