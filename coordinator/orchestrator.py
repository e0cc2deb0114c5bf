"""Job orchestration: approvals, the enclave job, the parties' streams, and the verified release.

The coordinator never touches rows or keys: it relays the plan, collects approvals (signatures it
cannot forge), asks each party agent to stream directly to the enclave, and verifies the enclave's
signed result against attestation evidence under its own trust policy before storing it. Any
failure ends the query as failed with a message naming the party or component; the enclave job is
aborted so nothing is released.

This module runs a query from its approvals to its end (:meth:`Orchestrator.run`) and stores an MPC
stage's release; a TEE stage's steps (the enclave job, the streams, execution, the verified release)
are in ``coordinator.tee_stage``, and an MPC stage's run in ``coordinator.mpc_stage``.

Manual approvals: an agent whose owner decides by hand answers the review ``pending``. The query
then waits in ``pending_approval`` -- its thread blocked on the query's condition, holding no channel
and no enclave job -- until every owner's approval is in (``SubmitApproval``), an owner rejects it
(``RejectQuery``: refused), or ``approval_timeout_seconds`` pass (failed, naming who did not
approve). Owners may revoke (``RevokeApproval``) until execution starts; a manual approval also
lapses when its agent says it does. Once every approval is in, every agent is asked again, so each
confirms (or refreshes) a live approval right before the enclave job is created.

No approval and no release outside the log: each ReviewPlan carries the query's ``query_submitted``
entry, the latest checkpoint and the proof that the entry is in it (:class:`LoggedQuery`, fixed once
per query so that every owner signs the same position). Each agent checks it against a checkpoint it
witnessed and signs the position into its approval; the enclave checks that every approval signs the
position it is given and binds it into its signed result; the receipt carries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pyarrow as pa

from coordinator.mpc_stage import EnclavePlayer, MpcRelease, enclave_player_index, plan_mpc_stage, run_mpc_stage
from coordinator.planner import ENCLAVE_PLAYER
from coordinator.store import CoordinatorStore, PartyRecord
from coordinator.tee_stage import TeeStageRunner, VerifiedResult, log_tee_stage
from sealroom import pki
from sealroom.attestation import AppraisalPolicy
from sealroom.audit.entries import LogEntry, is_ident
from sealroom.audit.receipts import MpcStage, TeeStage, build_receipt
from sealroom.canonical import canonical_json
from sealroom.errors import (
    ApprovalError,
    InvalidQueryError,
    JobFailedError,
    SealroomError,
    UnavailableError,
    from_code,
)
from sealroom.planning.plan import MpcStage as PlannedMpcStage
from sealroom.planning.plan import Plan
from sealroom.rpc import Peer, TLSConfig, call, dial, fetch_server_certificate
from sealroom.signing import LogPosition, check_issued_at, verify_approval, verify_owner_action
from sealroom.v1 import party_pb2, party_pb2_grpc

log = logging.getLogger(__name__)

MAX_REJECT_REASON = 1000


@dataclass(frozen=True)
class LoggedQuery:
    """A query's place in the transparency log, as the coordinator shows it to the owners: its
    ``query_submitted`` entry (canonical bytes), the signed checkpoint the entry is proven in, the
    inclusion proof, and the resulting position (what approvals and the enclave's result sign)."""

    entry: bytes
    checkpoint: str
    proof: tuple[bytes, ...]
    position: LogPosition

    def review_request(self, plan_json: bytes, query_id: str) -> party_pb2.ReviewPlanRequest:
        return party_pb2.ReviewPlanRequest(
            plan_json=plan_json,
            query_id=query_id,
            log_entry=self.entry,
            log_checkpoint=self.checkpoint,
            inclusion_proof=list(self.proof),
        )


@dataclass
class _Approvals:
    """A query in flight, as far as its approvals go. ``cond`` guards every field and every change to
    the query's approvals in the store."""

    plan: Plan
    logged: LoggedQuery
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Bumped by every owner action on a party's approval, so a review answer obtained before the
    # action never overwrites it.
    revision: dict[str, int] = field(default_factory=dict)
    # Manual approvals: when the party's agent stops honouring them (unix seconds).
    expires: dict[str, float] = field(default_factory=dict)
    # The newest issued_at_ms accepted from each party: an owner action is never accepted twice.
    last_issued: dict[str, int] = field(default_factory=dict)
    rejection: ApprovalError | None = None
    started: bool = False

    def bump(self, party: str) -> None:
        self.revision[party] = self.revision.get(party, 0) + 1


class Orchestrator:
    def __init__(
        self,
        store: CoordinatorStore,
        *,
        enclave_address: str,
        appraisal: AppraisalPolicy,
        party_timeout: float = 600.0,
        approval_timeout: float = 86400.0,
        on_finished: Callable[[str], None] | None = None,
        mpc_host: str = "127.0.0.1",
        mpc_timeout: float = 120.0,
        tls: TLSConfig | None = None,
    ):
        self.store = store
        self.tls = tls  # the coordinator's [tls]: its client certificate to the agents and the enclave
        self.enclave_address = enclave_address
        self.appraisal = appraisal
        self.party_timeout = party_timeout
        self.approval_timeout = approval_timeout
        self.on_finished = on_finished
        self.mpc_host = mpc_host
        self.mpc_timeout = mpc_timeout
        self._channels: set[grpc.Channel] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._approvals: dict[str, _Approvals] = {}

    @contextmanager
    def _channel(self, address: str, peer: Peer) -> Iterator[grpc.Channel]:
        """A channel to ``peer`` (a party's identity, or the enclave's pinned certificate) that
        :meth:`shutdown` can close, cancelling the calls in flight on it."""
        channel = dial(address, self.tls, peer)
        with self._lock:
            if self._stopping:
                channel.close()
                raise UnavailableError("the coordinator is shutting down")
            self._channels.add(channel)
        try:
            yield channel
        finally:
            with self._lock:
                self._channels.discard(channel)
            channel.close()

    def shutdown(self) -> None:
        """Cancel every call in flight; their queries end failed (and stay failed after a restart)."""
        with self._lock:
            self._stopping = True
            channels = list(self._channels)
            waiting = list(self._approvals.values())
        for ch in channels:
            ch.close()
        for w in waiting:
            with w.cond:
                w.cond.notify_all()

    def _logged(self, plan: Plan, submitted: LogEntry | None) -> LoggedQuery:
        """The query's ``query_submitted`` entry with the latest checkpoint and its inclusion proof."""
        if submitted is None or submitted.type != "query_submitted" or submitted.query_id != plan.query_id:
            raise JobFailedError(
                "the query's submission is not in the transparency log; nothing is approved or released outside it"
            )
        signed, proof = self.store.inclusion(submitted.seq)
        cp = signed.checkpoint
        return LoggedQuery(
            submitted.canonical(), signed.to_text(), tuple(proof), LogPosition(submitted.seq, cp.size, cp.root)
        )

    def run(self, plan: Plan, submitted: LogEntry | None = None) -> None:
        """Run a submitted plan to its end; ``submitted``: its ``query_submitted`` log entry."""
        qid = plan.query_id
        try:
            logged = self._logged(plan, submitted)
        except SealroomError as unlogged:
            self.store.update_query(qid, status="failed", error=unlogged.to_dict(), progress="failed")
            if self.on_finished is not None:
                self.on_finished(qid)
            return
        w = _Approvals(plan, logged)
        with self._lock:
            self._approvals[qid] = w
        try:
            self._run(plan, w)
        except SealroomError as caught:
            err = (
                JobFailedError("the coordinator stopped while this query was in flight; resubmit it")
                if self._stopping
                else caught
            )
            status = "refused" if err.code in ("policy_refusal", "approval", "invalid_query") else "failed"
            log.info("query %s %s: %s", qid, status, err.code)
            self.store.update_query(qid, status=status, error=err.to_dict(), progress=status)
            if status == "refused":
                self._log_rejection(plan, err)
        except Exception as exc:  # noqa: BLE001 - a query must end, whatever happened
            log.error("query %s failed with %s", qid, type(exc).__name__)
            log.debug("traceback", exc_info=exc)
            self.store.update_query(
                qid,
                status="failed",
                error={"code": "internal", "message": "internal error in the coordinator; see its log"},
                progress="failed",
            )
        finally:
            with self._lock:
                self._approvals.pop(qid, None)
            if self.on_finished is not None:
                self.on_finished(qid)

    def _log_rejection(self, plan: Plan, err: SealroomError) -> None:
        """A ``rejected`` entry when an involved owner (its agent, or its person) refused the plan."""
        party = err.details.get("party")
        if party not in plan.involved_parties():
            return
        rule = err.details.get("rule")
        extra = {"rule": rule} if is_ident(rule) else {}
        try:
            self.store.append_event("rejected", query_id=plan.query_id, party=party, plan_hash=plan.hash, **extra)
        except SealroomError as exc:
            log.error("query %s: the rejection could not be logged (%s)", plan.query_id, exc.code)

    # -- approvals ---------------------------------------------------------------------------

    def _review_all(
        self, plan: Plan, parties: Mapping[str, PartyRecord], logged: LoggedQuery
    ) -> dict[str, tuple[str, bytes, float] | None]:
        """Ask every involved agent to review the plan, with the query's log entry and its inclusion
        proof: party -> (plan_hash, signature, expires_at), or None when the agent holds it for its
        owner's decision. A refusal raises; an approval must sign the query's log position."""
        qid = plan.query_id
        request = logged.review_request(plan.to_json(), qid)
        involved = plan.involved_parties()

        def review(party: str) -> tuple[str, tuple[str, bytes, float] | None]:
            if party not in parties:
                raise UnavailableError(f"party {party} is not registered", details={"party": party})
            with self._channel(parties[party].address, pki.party(party)) as ch:
                resp = call(
                    party,
                    party_pb2_grpc.PartyAgentStub(ch).ReviewPlan,
                    request,
                    timeout=self.party_timeout,
                )
            if resp.pending and not resp.approved and not resp.error_json:
                return party, None
            if not resp.approved:
                doc = json.loads(resp.error_json or b"{}")
                err = from_code(doc.get("code", "approval"), doc.get("message", "rejected"), doc.get("details"))
                err.details.setdefault("party", party)
                raise err
            verify_approval(
                plan.parties[party], resp.plan_hash, bytes(resp.signature), party=party, log=logged.position
            )
            if resp.plan_hash != plan.hash:
                raise ApprovalError(f"{party} approved another plan", details={"party": party})
            return party, (resp.plan_hash, bytes(resp.signature), float(resp.expires_at))

        with ThreadPoolExecutor(max_workers=max(1, len(involved))) as pool:
            return dict(pool.map(review, involved))

    def _collect_approvals(self, plan: Plan, w: _Approvals) -> None:
        """Return once every involved party's approval is stored and its agent holds it live; mark
        the query running (from then on an approval can no longer be revoked)."""
        qid = plan.query_id
        involved = plan.involved_parties()
        deadline = time.monotonic() + self.approval_timeout
        while True:
            with w.cond:
                revisions = dict(w.revision)
            results = self._review_all(plan, self._parties(), w.logged)
            with w.cond:
                self._check_live(w)
                for party, res in results.items():
                    if w.revision.get(party, 0) != revisions.get(party, 0):
                        continue  # the owner acted while the agent answered: the owner's action stands
                    if res is None:
                        # The agent holds no live approval (never given, revoked or lapsed).
                        self.store.delete_approval(qid, party, event="approval_lapsed", cause="not_held_by_agent")
                        w.expires.pop(party, None)
                    else:
                        self.store.add_approval(qid, party, res[0], res[1])
                have = self.store.approvals(qid)
                if all(p in have for p in involved):
                    w.started = True
                    self.store.update_query(qid, status="running", progress="creating enclave job")
                    return
            self._wait_for_owners(plan, w, deadline)

    def _check_live(self, w: _Approvals) -> None:
        if self._stopping:
            raise UnavailableError("the coordinator is shutting down")
        if w.rejection is not None:
            raise w.rejection

    def _wait_for_owners(self, plan: Plan, w: _Approvals, deadline: float) -> None:
        """Block (without polling) until every involved party has an approval stored."""
        qid = plan.query_id
        involved = plan.involved_parties()
        shown: tuple[int, tuple[str, ...]] | None = None
        with w.cond:
            while True:
                self._check_live(w)
                now = time.time()
                for party, expires in list(w.expires.items()):
                    if expires <= now:
                        del w.expires[party]
                        w.bump(party)
                        if self.store.delete_approval(qid, party, event="approval_lapsed", cause="expired"):
                            log.info("query %s: the approval of %s lapsed", qid, party)
                have = self.store.approvals(qid)
                missing = tuple(p for p in involved if p not in have)
                if not missing:
                    return
                if shown != (len(have), missing):
                    shown = (len(have), missing)
                    self.store.update_query(
                        qid,
                        status="pending_approval",
                        progress=f"approvals {len(involved) - len(missing)}/{len(involved)}; "
                        f"awaiting {', '.join(missing)}",
                    )
                    log.info("query %s pending approval by %s", qid, ", ".join(missing))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobFailedError(
                        f"approval timed out after {self.approval_timeout:g} s: {', '.join(missing)} did not "
                        "approve the query",
                        details={"check": "approval_timeout", "awaiting": list(missing), "party": missing[0]},
                    )
                if w.expires:
                    remaining = min(remaining, max(0.05, min(w.expires.values()) - now))
                w.cond.wait(remaining)

    # -- owner actions (SubmitApproval, RejectQuery, RevokeApproval) ---------------------------

    def _in_flight(self, query_id: str, action: str) -> _Approvals:
        with self._lock:
            w = self._approvals.get(query_id)
        if w is None:
            row = self.store.query(query_id)  # NotFoundError for an unknown query
            started = row.status in ("running", "released")
            raise ApprovalError(
                f"query {query_id} is {row.status}"
                + ("; execution has started" if started else "; it no longer takes approvals"),
                details={"query_id": query_id, "status": row.status, "check": "query_state"},
            )
        return w

    def _authenticate(
        self,
        w: _Approvals,
        action: str,
        *,
        party: str,
        plan_hash: str,
        issued_at_ms: int,
        owner_signature: bytes,
        reason: str = "",
        expires_at_ms: int = 0,
    ) -> str:
        """Check that ``party`` itself signed this action for this query's plan; return its key."""
        plan = w.plan
        qid = plan.query_id
        if party not in plan.involved_parties():
            raise ApprovalError(
                f"query {qid} reads no data of {party}; only an involved party may {action} it",
                details={"party": party, "check": "party"},
            )
        key = plan.parties[party]
        registered = self.store.parties().get(party)
        if registered is None or registered.signing_public_key != key:
            raise ApprovalError(
                f"the plan of query {qid} names a key for {party} that is not its registered key",
                details={"party": party, "check": "party_key"},
            )
        verify_owner_action(
            key,
            owner_signature,
            action,
            query_id=qid,
            party=party,
            plan_hash=plan_hash,
            issued_at_ms=issued_at_ms,
            reason=reason,
            expires_at_ms=expires_at_ms,
        )
        if plan_hash != plan.hash:
            raise ApprovalError(
                f"{party} acted on another plan than the one query {qid} runs; the plan hashes differ",
                details={"party": party, "check": "approval_plan_hash"},
            )
        check_issued_at(issued_at_ms, int(time.time() * 1000), party=party)
        return key

    def _accept(self, w: _Approvals, action: str, party: str, issued_at_ms: int) -> None:
        """Under ``w.cond``: refuse an action on a query past approvals, or a replayed action."""
        if w.started:
            raise ApprovalError(
                f"execution has started; the {action} of {party} comes too late",
                details={"party": party, "check": "execution_started"},
            )
        if w.rejection is not None or self._stopping:
            raise ApprovalError(
                f"query {w.plan.query_id} is ending; it no longer takes approvals",
                details={"party": party, "check": "query_state"},
            )
        if issued_at_ms <= w.last_issued.get(party, 0):
            raise ApprovalError(
                f"this {action} request of {party} was already received or is older than its last one",
                details={"party": party, "check": "replay"},
            )
        w.last_issued[party] = issued_at_ms

    def _snapshot(self, w: _Approvals) -> tuple[str, list[str]]:
        qid = w.plan.query_id
        have = self.store.approvals(qid)
        return self.store.query(qid).status, [p for p in w.plan.involved_parties() if p not in have]

    def submit_approval(
        self,
        query_id: str,
        *,
        party: str,
        plan_hash: str,
        signature: bytes,
        expires_at_ms: int,
        issued_at_ms: int,
        owner_signature: bytes,
    ) -> tuple[str, list[str]]:
        """A party's manual approval: verified against its registered key and the query's plan hash."""
        w = self._in_flight(query_id, "approve")
        key = self._authenticate(
            w,
            "approve",
            party=party,
            plan_hash=plan_hash,
            issued_at_ms=issued_at_ms,
            owner_signature=owner_signature,
            expires_at_ms=expires_at_ms,
        )
        verify_approval(key, plan_hash, signature, party=party, log=w.logged.position)
        expires_at = expires_at_ms / 1000
        if expires_at <= time.time():
            raise ApprovalError(
                f"the approval of {party} has already lapsed", details={"party": party, "check": "approval_expired"}
            )
        with w.cond:
            self._accept(w, "approval", party, issued_at_ms)
            self.store.add_approval(query_id, party, plan_hash, signature)
            w.expires[party] = expires_at
            w.bump(party)
            w.cond.notify_all()
            log.info("query %s: %s approved", query_id, party)
            return self._snapshot(w)

    def reject_query(
        self, query_id: str, *, party: str, plan_hash: str, reason: str, issued_at_ms: int, owner_signature: bytes
    ) -> tuple[str, list[str]]:
        """A party's owner refuses the query: it ends refused, with the owner's reason."""
        w = self._in_flight(query_id, "reject")
        self._authenticate(
            w,
            "reject",
            party=party,
            plan_hash=plan_hash,
            issued_at_ms=issued_at_ms,
            owner_signature=owner_signature,
            reason=reason,
        )
        text = reason.strip()
        if not text or len(text) > MAX_REJECT_REASON:
            raise InvalidQueryError(f"a rejection needs a reason of 1 to {MAX_REJECT_REASON} characters")
        with w.cond:
            self._accept(w, "rejection", party, issued_at_ms)
            w.rejection = ApprovalError(
                f"{party} rejected this query: {text}",
                details={"party": party, "rule": "rejected_by_owner", "owner_reason": text},
            )
            w.cond.notify_all()
            log.info("query %s: rejected by %s", query_id, party)
            return "refused", []

    def revoke_approval(
        self, query_id: str, *, party: str, plan_hash: str, issued_at_ms: int, owner_signature: bytes
    ) -> tuple[str, list[str]]:
        """Remove a party's approval while execution has not started; the query waits for it again."""
        w = self._in_flight(query_id, "revoke")
        self._authenticate(
            w, "revoke", party=party, plan_hash=plan_hash, issued_at_ms=issued_at_ms, owner_signature=owner_signature
        )
        with w.cond:
            self._accept(w, "revocation", party, issued_at_ms)
            removed = self.store.delete_approval(
                query_id,
                party,
                event="approval_revoked",
                plan_hash=plan_hash,
                issued_at_ms=issued_at_ms,
                owner_signature=owner_signature.hex(),
            )
            w.expires.pop(party, None)
            w.bump(party)
            w.cond.notify_all()
            log.info("query %s: %s revoked its approval%s", query_id, party, "" if removed else " (none was held)")
            return self._snapshot(w)

    def _parties(self) -> dict[str, PartyRecord]:
        return self.store.parties()

    # -- running a plan ----------------------------------------------------------------------

    def _run(self, plan: Plan, w: _Approvals) -> None:
        mpc_stage = plan_mpc_stage(plan)
        if mpc_stage is not None and len(plan.stages) == 1:
            self._run_mpc(plan, mpc_stage, w)
            return
        # The parties whose rows go to the enclave (in a hybrid plan, not the mpc_only owners).
        streaming = sorted({i.party for s in plan.tee_stages() for i in s.inputs})
        parties = self._approve(plan, w)
        if mpc_stage is None:
            self._run_tee(plan, streaming, parties, w.logged.position)
        else:
            self._run_hybrid(plan, mpc_stage, streaming, parties, w.logged.position)

    def _approve(self, plan: Plan, w: _Approvals) -> dict[str, PartyRecord]:
        """1. Approvals: each owner checks the plan against its own policy and signs its hash, at once
        or (manual approval) when a person decides; the query is "running" from here on. Returns the
        parties as registered now (an agent may have restarted, and moved, while the query waited)."""
        involved = plan.involved_parties()
        self.store.update_query(plan.query_id, status="awaiting_approval", progress=f"approvals 0/{len(involved)}")
        self._collect_approvals(plan, w)
        return self._parties()

    def _tee_stage(self) -> TeeStageRunner:
        return TeeStageRunner(
            store=self.store,
            enclave_address=self.enclave_address,
            appraisal=self.appraisal,
            party_timeout=self.party_timeout,
            channel=self._channel,
            enclave_certificate=self._enclave_certificate,
        )

    def _enclave_certificate(self) -> bytes:
        """The certificate the enclave presents now (unverified: the TEE stage pins it and checks that
        the job's evidence binds it before anything is sent). Empty on a plaintext link."""
        return fetch_server_certificate(self.enclave_address, self.tls)

    def _run_tee(
        self, plan: Plan, streaming: Sequence[str], parties: Mapping[str, PartyRecord], logged: LogPosition
    ) -> None:
        """A TEE plan: 2. the enclave job, 3. the parties' streams, 4. execution (at the query's log
        position, which the approvals sign), then 5. the verified release (see coordinator.tee_stage)."""
        tee = self._tee_stage()
        with tee.job(plan) as job:
            tracker = job.stream(streaming, parties)
            approvals = self.store.approvals(plan.query_id)
            response = job.execute(approvals, tracker, logged)
        tee.release(plan, job.verify(response, logged), approvals, tracker, logged)

    def _run_hybrid(
        self,
        plan: Plan,
        mpc_stage: PlannedMpcStage,
        streaming: Sequence[str],
        parties: Mapping[str, PartyRecord],
        logged: LogPosition,
    ) -> None:
        """A hybrid plan: the enclave job and the streams as for a TEE plan, then the enclave computes
        the streamed inputs' partials and joins the MPC stage as a player, next to the mpc_only
        owners' players; the MPC stage's release records the enclave's document that fed it."""
        tee = self._tee_stage()
        with tee.job(plan) as job:
            tracker = job.stream(streaming, parties)
            approvals = self.store.approvals(plan.query_id)
            self.store.update_query(plan.query_id, progress=tracker.to_json("MPC stage: players computing"))
            index = enclave_player_index(mpc_stage)
            fed: list[VerifiedResult] = []

            def prepare_enclave() -> EnclavePlayer:
                player, feed = job.prepare_mpc_player(mpc_stage.id, index, approvals, logged)
                fed.append(feed)
                return player

            release = self._mpc_stage(plan, mpc_stage, parties, logged, prepare_enclave)
            (feed,) = fed
        self._release_mpc(plan, mpc_stage, release, feed=feed, logged=logged)

    def _run_mpc(self, plan: Plan, stage: PlannedMpcStage, w: _Approvals) -> None:
        """An MPC plan: approvals, then the owners' players and the coordinator's helpers."""
        parties = self._approve(plan, w)
        self.store.update_query(plan.query_id, progress="MPC stage: players computing (secret-shared)")
        logged = w.logged.position
        self._release_mpc(plan, stage, self._mpc_stage(plan, stage, parties, logged), feed=None, logged=logged)

    def _mpc_stage(
        self,
        plan: Plan,
        stage: PlannedMpcStage,
        parties: Mapping[str, PartyRecord],
        logged: LogPosition,
        prepare_enclave: Callable[[], EnclavePlayer] | None = None,
    ) -> MpcRelease:
        """Run the MPC stage with the involved owners' agents, this coordinator's helper identity
        and, in a hybrid plan, the enclave's player."""
        return run_mpc_stage(
            plan,
            stage,
            addresses={p: parties[p].address for p in plan.involved_parties()},
            channel=self._channel,
            host=self.mpc_host,
            timeout=self.mpc_timeout,
            helper=self.store.helper_identity(),
            prepare_enclave=prepare_enclave,
            log_position=logged,
        )

    def _release_mpc(
        self,
        plan: Plan,
        stage: PlannedMpcStage,
        release: MpcRelease,
        *,
        feed: VerifiedResult | None,
        logged: LogPosition,
    ) -> None:
        """Log the stages and store an MPC stage's release with its receipt (``feed``: the verified
        document of the enclave job that fed it, in a hybrid plan)."""
        qid = plan.query_id
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, release.table.schema) as writer:
            writer.write_table(release.table)
        arrow_table = sink.getvalue().to_pybytes()
        record = release.record
        stages: list[TeeStage | MpcStage] = []
        if feed is not None:
            log_tee_stage(self.store, plan, feed)
            stages.append(TeeStage(feed.result_json, feed.signature, feed.evidence))
        self.store.append_event(
            "stage_executed",
            query_id=qid,
            stage=stage.id,
            kind="mpc",
            plan_hash=plan.hash,
            simulated=False,
            result_doc_sha256=record["result_sha256"],
            players=len(record["players"]),
        )
        # The receipt binds the opened result and every player's signature over it: the owners' (their
        # keys from the plan), the enclave's (its attested job key), and, for the helper players the
        # coordinator ran (which opened the same result, checked in run_mpc_stage), the coordinator's,
        # with its log key.
        keys = dict(plan.parties)
        if feed is not None:
            keys[ENCLAVE_PLAYER] = str(feed.doc["signing_public_key"])
        signatures = {name: (keys[name], bytes.fromhex(sig)) for name, sig in record["signatures"].items()}
        for player in record["result"].get("players", []):
            if not player.get("holds_input", True) and player.get("name") not in signatures:
                helper = self.store.sign_mpc_result(record["result"])
                if helper is not None:
                    signatures[str(player["name"])] = helper
        stages.append(MpcStage(stage.id, record["result"], signatures))
        released_at = time.time()
        receipt = build_receipt(
            plan=plan,
            approvals=self.store.approvals(qid),
            stages=stages,
            submitted_at=self.store.query(qid).created_at,
            released_at=released_at,
            log_position=logged,
            result_sha256=hashlib.sha256(arrow_table).hexdigest(),
        )
        simulated = bool(receipt["simulated"])
        if feed is not None:
            record = {**record, "simulated": simulated, "feed": feed.doc}
        self.store.release(
            qid,
            arrow_table=arrow_table,
            suppressed=release.suppressed,
            result_json=canonical_json(record),
            signature=b"",
            evidence=feed.evidence if feed is not None else b"",
            simulated=simulated,
            receipt=receipt,
            released_at=released_at,
        )
        if simulated:
            log.warning("query %s released by MPC, its enclave player under SIMULATED attestation (no TEE)", qid)
        log.info("query %s released by MPC (%s)", qid, release.record["trust_assumption"])
