"""Job orchestration: approvals, the enclave job, the parties' streams, and the verified release.

The coordinator never touches rows or keys: it relays the plan, collects approvals (signatures it
cannot forge), asks each party agent to stream directly to the enclave, and verifies the enclave's
signed result against attestation evidence under its own trust policy before storing it. Any
failure ends the query as failed with a message naming the party or component; the enclave job is
aborted so nothing is released.

Manual approvals: an agent whose owner decides by hand answers the review ``pending``. The query
then waits in ``pending_approval`` -- its thread blocked on the query's condition, holding no channel
and no enclave job -- until every owner's approval is in (``SubmitApproval``), an owner rejects it
(``RejectQuery``: refused), or ``approval_timeout_seconds`` pass (failed, naming who did not
approve). Owners may revoke (``RevokeApproval``) until execution starts; a manual approval also
lapses when its agent says it does. Once every approval is in, every agent is asked again, so each
confirms (or refreshes) a live approval right before the enclave job is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.mpc_stage import EnclavePlayer, MpcRelease, enclave_player_index, plan_mpc_stage, run_mpc_stage
from coordinator.planner import ENCLAVE_PLAYER
from coordinator.store import Store
from sealroom.attestation import AppraisalPolicy, Evidence, report_data_for, verify_evidence
from sealroom.audit.receipts import MpcStage, TeeStage, build_receipt
from sealroom.audit.tlog import is_ident
from sealroom.canonical import canonical_json
from sealroom.errors import (
    ApprovalError,
    AttestationError,
    InvalidQueryError,
    JobFailedError,
    SealroomError,
    UnavailableError,
    from_code,
)
from sealroom.planning.plan import MpcStage as PlannedMpcStage
from sealroom.planning.plan import Plan
from sealroom.rpc import call, open_channel
from sealroom.signing import check_issued_at, verify_approval, verify_owner_action
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedResult:
    doc: dict[str, Any]
    result_json: bytes
    signature: bytes
    arrow_table: bytes
    evidence: bytes


def verify_result(
    response: Any,
    *,
    plan: Plan,
    hpke_public: bytes,
    signing_public: bytes,
    appraisal: AppraisalPolicy,
) -> VerifiedResult:
    """Check the enclave's signed result: evidence, signature, plan and result hashes."""
    evidence = Evidence.from_bytes(response.evidence)
    nonce = bytes.fromhex(plan.hash)
    verify_evidence(
        evidence,
        policy=appraisal,
        expected_report_data=report_data_for(
            hpke_public_key=hpke_public, signing_public_key=signing_public, nonce=nonce
        ),
        expected_nonce=nonce,
    )
    try:
        Ed25519PublicKey.from_public_bytes(signing_public).verify(response.signature, response.result_json)
    except InvalidSignature:
        raise AttestationError(
            "the enclave's result signature does not verify with its attested key",
            details={"check": "result_signature"},
        ) from None
    doc = json.loads(response.result_json)
    if doc.get("plan_hash") != plan.hash or doc.get("query_id") != plan.query_id:
        raise AttestationError("the enclave's result is for another plan", details={"check": "result_plan"})
    # A stage that feeds an MPC stage releases nothing: its document says so, and comes without a table.
    arrow_table = getattr(response, "arrow_table", None)
    released = doc.get("result_sha256") if arrow_table is None else hashlib.sha256(arrow_table).hexdigest()
    if doc.get("result_sha256") != released or (
        arrow_table is None and (released is not None or doc.get("released_rows"))
    ):
        raise AttestationError(
            "the released table does not match the hash the enclave signed", details={"check": "result_hash"}
        )
    if doc.get("attestation", {}).get("evidence_sha256") != evidence.digest().hex():
        raise AttestationError("the result names other evidence", details={"check": "result_evidence"})
    return VerifiedResult(
        doc,
        bytes(response.result_json),
        bytes(response.signature),
        bytes(arrow_table or b""),
        bytes(response.evidence),
    )


MAX_REJECT_REASON = 1000
HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}")
# How often the coordinator asks the party agents how far their streams have got.
PROGRESS_INTERVAL = 0.25


class StreamProgress:
    """Per-party progress of a job's sealed streams, as the query's ``progress`` shows it.

    While the parties stream (and while the enclave executes) ``progress`` is one JSON document::

        {"text": "streaming 1/3 parties",
         "parties": {"bank_a": {"bytes": 4194336, "frames": 2, "rows": 12000, "rows_total": 30000, "done": false}}}

    ``bytes`` and ``frames`` are the sealed stream's size, which the coordinator sees anyway; ``rows``
    (padding rows included, two significant digits) only where the owner shares its row count, else
    null; ``rows_total`` is the registered (rounded) row count of an unfiltered input whose owner
    shares it, else null. Never a value from the data. Clients show ``text`` where they want a line.
    """

    def __init__(self, plan: Plan, datasets: Sequence[dict[str, Any]]):
        shared = {(d["party"], d["name"]): int(d.get("approximate_rows") or 0) for d in datasets}
        self.parties: dict[str, dict[str, Any]] = {}
        # Only what is streamed to an enclave (in a hybrid plan, not the mpc_only owners' data).
        streamed = [i for s in plan.tee_stages() for i in s.inputs]
        for party in sorted({i.party for i in streamed}):
            mine = [i for i in streamed if i.party == party]
            totals = [shared.get((party, i.dataset), 0) if i.filter is None else 0 for i in mine]
            self.parties[party] = {
                "bytes": 0,
                "frames": 0,
                "rows": None,
                "rows_total": sum(totals) if totals and all(totals) else None,
                "done": False,
            }

    def update(self, party: str, streams: Sequence[party_pb2.StreamProgress]) -> None:
        entry = self.parties[party]
        if not streams or entry["done"]:
            return
        entry["bytes"] = sum(s.bytes for s in streams)
        entry["frames"] = sum(s.frames for s in streams)
        entry["rows"] = sum(s.rows for s in streams) if all(s.rows_shared for s in streams) else None

    def finish(self, party: str, streams: Sequence[party_pb2.StreamProgress] | None) -> None:
        """The party's stream has ended: its final counts (when its agent gave them)."""
        if streams:
            self.update(party, streams)
        self.parties[party]["done"] = True

    def to_json(self, phase: str) -> str:
        done = sum(1 for e in self.parties.values() if e["done"])
        text = f"streaming {done}/{len(self.parties)} parties" if phase == "streaming" else phase
        return json.dumps({"text": text, "parties": self.parties}, sort_keys=True)


@dataclass
class _Approvals:
    """A query in flight, as far as its approvals go. ``cond`` guards every field and every change to
    the query's approvals in the store."""

    plan: Plan
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
        store: Store,
        *,
        enclave_address: str,
        appraisal: AppraisalPolicy,
        party_timeout: float = 600.0,
        approval_timeout: float = 86400.0,
        on_finished: Callable[[str], None] | None = None,
        mpc_host: str = "127.0.0.1",
        mpc_timeout: float = 120.0,
    ):
        self.store = store
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
    def _channel(self, address: str) -> Iterator[grpc.Channel]:
        """A channel that :meth:`shutdown` can close, cancelling the calls in flight on it."""
        channel = open_channel(address)
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

    def run(self, plan: Plan) -> None:
        qid = plan.query_id
        w = _Approvals(plan)
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

    def _review_all(self, plan: Plan, parties: dict[str, dict[str, Any]]) -> dict[str, tuple[str, bytes, float] | None]:
        """Ask every involved agent to review the plan: party -> (plan_hash, signature, expires_at),
        or None when the agent holds it for its owner's decision. A refusal raises."""
        qid = plan.query_id
        plan_json = plan.to_json()
        involved = plan.involved_parties()

        def review(party: str) -> tuple[str, tuple[str, bytes, float] | None]:
            if party not in parties:
                raise UnavailableError(f"party {party} is not registered", details={"party": party})
            with self._channel(parties[party]["address"]) as ch:
                resp = call(
                    party,
                    party_pb2_grpc.PartyAgentStub(ch).ReviewPlan,
                    party_pb2.ReviewPlanRequest(plan_json=plan_json, query_id=qid),
                    timeout=self.party_timeout,
                )
            if resp.pending and not resp.approved and not resp.error_json:
                return party, None
            if not resp.approved:
                doc = json.loads(resp.error_json or b"{}")
                err = from_code(doc.get("code", "approval"), doc.get("message", "rejected"), doc.get("details"))
                err.details.setdefault("party", party)
                raise err
            verify_approval(plan.parties[party], resp.plan_hash, bytes(resp.signature), party=party)
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
            results = self._review_all(plan, self._parties())
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
        if registered is None or registered["signing_public_key"] != key:
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
        verify_approval(key, plan_hash, signature, party=party)
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

    def _parties(self) -> dict[str, dict[str, Any]]:
        return self.store.parties()

    def _watch_streams(
        self,
        qid: str,
        job_id: str,
        futures: dict[str, Future[party_pb2.ContributeResponse]],
        parties: dict[str, dict[str, Any]],
        tracker: StreamProgress,
    ) -> None:
        """Until every party's stream has ended, ask each streaming agent how far it has got and
        publish it in the query's progress. Best effort: a failed or unanswered progress call is
        skipped (the party's Contribute call reports real failures), and an agent without
        GetProgress is not asked again."""
        shown = ""
        with ExitStack() as stack:
            stubs: dict[str, party_pb2_grpc.PartyAgentStub] = {}
            for party in futures:
                try:
                    channel = stack.enter_context(self._channel(parties[party]["address"]))
                except SealroomError:
                    continue
                stubs[party] = party_pb2_grpc.PartyAgentStub(channel)

            def ask(party: str) -> Sequence[party_pb2.StreamProgress] | None:
                stub = stubs.get(party)
                if stub is None:
                    return None
                try:
                    return list(stub.GetProgress(party_pb2.ProgressRequest(job_id=job_id), timeout=2).streams)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        stubs.pop(party)
                except ValueError:  # the channel was closed: the coordinator is stopping
                    pass
                return None

            while True:
                for party, fut in futures.items():
                    if fut.done() and fut.exception() is None and not tracker.parties[party]["done"]:
                        tracker.finish(party, ask(party))  # the agent keeps its final counts
                streaming = [p for p, fut in futures.items() if not fut.done()]
                for party in streaming:
                    streams = ask(party)
                    if streams is not None:
                        tracker.update(party, streams)
                doc = tracker.to_json("streaming")
                if doc != shown:
                    self.store.update_query(qid, progress=doc)
                    shown = doc
                if not streaming:
                    return
                wait([futures[p] for p in streaming], timeout=PROGRESS_INTERVAL)

    def _run_mpc(self, plan: Plan, stage: PlannedMpcStage, w: _Approvals) -> None:
        """An MPC plan: approvals, then the owners' players and the coordinator's helpers."""
        qid = plan.query_id
        involved = plan.involved_parties()
        self.store.update_query(qid, status="awaiting_approval", progress=f"approvals 0/{len(involved)}")
        self._collect_approvals(plan, w)
        parties = self._parties()
        self.store.update_query(qid, progress="MPC stage: players computing (secret-shared)")
        self._release_mpc(plan, stage, self._mpc_stage(plan, stage, parties), feed=None)

    def _mpc_stage(
        self,
        plan: Plan,
        stage: PlannedMpcStage,
        parties: dict[str, dict[str, Any]],
        prepare_enclave: Callable[[], EnclavePlayer] | None = None,
    ) -> MpcRelease:
        """Run the MPC stage with the involved owners' agents, this coordinator's helper identity
        and, in a hybrid plan, the enclave's player."""
        return run_mpc_stage(
            plan,
            stage,
            addresses={p: parties[p]["address"] for p in plan.involved_parties()},
            channel=self._channel,
            host=self.mpc_host,
            timeout=self.mpc_timeout,
            helper=self.store.helper_identity(),
            prepare_enclave=prepare_enclave,
        )

    def _release_mpc(
        self, plan: Plan, stage: PlannedMpcStage, release: MpcRelease, *, feed: VerifiedResult | None
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
            self._log_tee_stage(plan, feed)
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

    def _log_tee_stage(self, plan: Plan, verified: VerifiedResult) -> None:
        att = verified.doc.get("attestation", {})
        stage_event: dict[str, Any] = {
            "query_id": plan.query_id,
            "stage": str(verified.doc.get("stage")),
            "kind": "tee",
            "plan_hash": plan.hash,
            "simulated": bool(verified.doc["simulated"]),
            "evidence_sha256": att.get("evidence_sha256"),
            "result_doc_sha256": hashlib.sha256(verified.result_json).hexdigest(),
        }
        if is_ident(att.get("format")):
            stage_event["platform"] = att["format"]
        measurement = str(att.get("measurement") or "").lower()
        if HEX.fullmatch(measurement):  # every platform's measurement is hex; the log takes nothing else
            stage_event["measurement"] = measurement
        self.store.append_event("stage_executed", **stage_event)

    def _run(self, plan: Plan, w: _Approvals) -> None:
        qid = plan.query_id
        mpc_stage = plan_mpc_stage(plan)
        if mpc_stage is not None and len(plan.stages) == 1:
            self._run_mpc(plan, mpc_stage, w)
            return
        involved = plan.involved_parties()
        # The parties whose rows go to the enclave (in a hybrid plan, not the mpc_only owners).
        streaming = sorted({i.party for s in plan.tee_stages() for i in s.inputs})
        plan_json = plan.to_json()
        self.store.update_query(qid, status="awaiting_approval", progress=f"approvals 0/{len(involved)}")

        # 1. Approvals: each owner checks the plan against its own policy and signs its hash, at once
        # or (manual approval) when a person decides; the query is "running" from here on.
        self._collect_approvals(plan, w)
        parties = self._parties()  # an agent may have restarted (and moved) while the query waited

        # 2. The enclave job: a fresh key pair inside the enclave for this plan.
        with self._channel(self.enclave_address) as ch:
            enclave = enclave_pb2_grpc.EnclaveStub(ch)
            job = call("enclave", enclave.CreateJob, enclave_pb2.CreateJobRequest(plan_json=plan_json))
            try:
                # 3. Each party verifies the enclave's evidence itself and streams sealed batches to it.
                tracker = StreamProgress(plan, self.store.datasets())
                self.store.update_query(qid, progress=tracker.to_json("streaming"))

                def contribute(party: str) -> party_pb2.ContributeResponse:
                    with self._channel(parties[party]["address"]) as pch:
                        try:
                            return call(
                                party,
                                party_pb2_grpc.PartyAgentStub(pch).Contribute,
                                party_pb2.ContributeRequest(
                                    plan_json=plan_json, job_id=job.job_id, enclave_address=self.enclave_address
                                ),
                                timeout=self.party_timeout,
                            )
                        except SealroomError as err:
                            raise JobFailedError(
                                f"{party} could not contribute: {err.message}",
                                details={**err.details, "party": party, "cause": err.code},
                            ) from None

                with ThreadPoolExecutor(max_workers=max(1, len(streaming))) as pool:
                    futures = {p: pool.submit(contribute, p) for p in streaming}
                    self._watch_streams(qid, job.job_id, futures, parties, tracker)
                    for fut in futures.values():
                        fut.result()

                approvals = self.store.approvals(qid)
                approval_msgs = [
                    enclave_pb2.Approval(party=p, plan_hash=h, signature=s) for p, (h, s) in approvals.items()
                ]
                if mpc_stage is not None:
                    # 4'. A hybrid plan: the enclave computes the streamed inputs' partials and joins
                    # the MPC stage as a player, next to the mpc_only owners' players.
                    self.store.update_query(qid, progress=tracker.to_json("MPC stage: players computing"))
                    index = enclave_player_index(mpc_stage)
                    fed: list[VerifiedResult] = []

                    def prepare_enclave() -> EnclavePlayer:
                        prepared = call(
                            "enclave",
                            enclave.PrepareMpc,
                            enclave_pb2.EnclavePrepareMpcRequest(
                                job_id=job.job_id,
                                stage_id=mpc_stage.id,
                                index=index,
                                approvals=approval_msgs,
                                job_token=job.job_token,
                            ),
                            timeout=self.party_timeout,
                        )
                        feed = verify_result(
                            prepared,
                            plan=plan,
                            hpke_public=bytes(job.hpke_public_key),
                            signing_public=bytes(job.signing_public_key),
                            appraisal=self.appraisal,
                        )
                        if feed.doc.get("feeds") != mpc_stage.id or feed.doc.get("player") != index:
                            raise AttestationError(
                                "the enclave's document is not for the MPC stage it was asked to join",
                                details={"check": "result_plan"},
                            )
                        fed.append(feed)
                        return EnclavePlayer(
                            index=index,
                            address=self.enclave_address,
                            job_id=job.job_id,
                            job_token=bytes(job.job_token),
                            offer=prepared.offer,
                            attested=party_pb2.EnclavePlayer(
                                evidence=feed.evidence,
                                hpke_public_key=bytes(job.hpke_public_key),
                                signing_public_key=bytes(job.signing_public_key),
                            ),
                        )

                    release = self._mpc_stage(plan, mpc_stage, parties, prepare_enclave)
                    (feed,) = fed
                else:
                    # 4. Execute with every approval; the enclave re-verifies them itself.
                    self.store.update_query(qid, progress=tracker.to_json("executing in the enclave"))
                    resp = call(
                        "enclave",
                        enclave.Execute,
                        enclave_pb2.ExecuteRequest(job_id=job.job_id, approvals=approval_msgs, job_token=job.job_token),
                        timeout=self.party_timeout,
                    )
            except BaseException:
                try:
                    enclave.AbortJob(enclave_pb2.JobRef(job_id=job.job_id, job_token=job.job_token), timeout=10)
                except Exception:  # noqa: BLE001, S110 - best effort; the job also expires
                    pass
                raise

        if mpc_stage is not None:
            self._release_mpc(plan, mpc_stage, release, feed=feed)
            return
        # 5. Verify and store the release.
        verified = verify_result(
            resp,
            plan=plan,
            hpke_public=bytes(job.hpke_public_key),
            signing_public=bytes(job.signing_public_key),
            appraisal=self.appraisal,
        )
        self._log_tee_stage(plan, verified)
        # 6. The receipt (countersigned by the store with the log key) and the release, with its log
        # entry, in one transaction.
        released_at = time.time()
        receipt = build_receipt(
            plan=plan,
            approvals=approvals,
            stages=[TeeStage(verified.result_json, verified.signature, verified.evidence)],
            submitted_at=self.store.query(qid).created_at,
            released_at=released_at,
        )
        self.store.release(
            qid,
            arrow_table=verified.arrow_table,
            suppressed=verified.doc["suppressed"],
            result_json=verified.result_json,
            signature=verified.signature,
            evidence=verified.evidence,
            simulated=bool(verified.doc["simulated"]),
            receipt=receipt,
            released_at=released_at,
            progress=tracker.to_json("released"),  # what each party sent stays visible in the status
        )
        if verified.doc["simulated"]:
            log.warning("query %s released under SIMULATED attestation (no TEE)", qid)
        else:
            log.info("query %s released", qid)
