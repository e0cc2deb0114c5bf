"""A plan's TEE stage, the coordinator's side: the enclave job, the parties' sealed streams, and
the verified, logged release.

The steps (numbered as in the orchestrator's run):

2. The enclave creates a job for the plan: a fresh key pair inside the enclave, bound into evidence.
3. Each party's agent verifies that evidence itself and streams its sealed batches to the enclave;
   the coordinator only relays the request and shows how far each stream has got.
4. The enclave executes with every owner's approval (it re-verifies them itself), or, in a hybrid
   plan, computes the streamed inputs' partials and joins the MPC stage as a player.
5. The coordinator verifies the enclave's signed result (evidence under its own trust policy,
   signature, plan and result hashes), logs the stage and stores the release with its receipt.

Any failure before the release aborts the enclave job, so nothing is released.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.mpc_stage import EnclavePlayer
from coordinator.store import Approval, CoordinatorStore, DatasetRecord, PartyRecord
from sealroom import pki
from sealroom.attestation import AppraisalPolicy, Evidence, report_data_for, verify_enclave_evidence, verify_evidence
from sealroom.audit.entries import is_ident
from sealroom.audit.receipts import TeeStage, build_receipt
from sealroom.errors import AttestationError, JobFailedError, SealroomError
from sealroom.planning.plan import Plan
from sealroom.rpc import Peer, call
from sealroom.signing import LogPosition
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

log = logging.getLogger(__name__)

# Opens a channel to a peer (rpc.Peer: a party's identity or the enclave's pinned certificate) that the
# orchestrator can close on shutdown (cancelling the calls on it).
ChannelFactory = Callable[[str, Peer], AbstractContextManager[grpc.Channel]]


@dataclass(frozen=True)
class VerifiedResult:
    doc: dict[str, Any]
    result_json: bytes
    signature: bytes
    arrow_table: bytes
    evidence: bytes


def verify_result(
    response: enclave_pb2.ExecuteResponse | enclave_pb2.EnclavePrepareMpcResponse,
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

    def __init__(self, plan: Plan, datasets: Sequence[DatasetRecord]):
        shared = {(d.party, d.name): int(d.approximate_rows or 0) for d in datasets}
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


def log_tee_stage(store: CoordinatorStore, plan: Plan, verified: VerifiedResult) -> None:
    """Log the enclave's verified stage (``stage_executed``): hashes, platform and measurement only."""
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
    store.append_event("stage_executed", **stage_event)


@dataclass(frozen=True)
class TeeStageRunner:
    """What a TEE stage needs from the orchestrator: the store, the enclave, the coordinator's own
    trust policy for the enclave's evidence, the parties' call timeout, and its channels."""

    store: CoordinatorStore
    enclave_address: str
    appraisal: AppraisalPolicy
    party_timeout: float
    channel: ChannelFactory
    # The certificate the enclave presents (fetched unverified; empty on a plaintext link).
    enclave_certificate: Callable[[], bytes] = lambda: b""

    @contextmanager
    def job(self, plan: Plan) -> Iterator[EnclaveJob]:
        """2. The enclave job: a fresh key pair inside the enclave for this plan, over TLS pinned to the
        certificate the enclave presents, which fresh evidence must bind before the job is used. A
        failure before the block ends aborts the job (best effort; the job also expires)."""
        certificate = self.enclave_certificate()
        with self.channel(self.enclave_address, certificate) as ch:
            enclave = enclave_pb2_grpc.EnclaveStub(ch)
            job = call("enclave", enclave.CreateJob, enclave_pb2.CreateJobRequest(plan_json=plan.to_json()))
            try:
                self._check_tls_binding(enclave, job, certificate)
                yield EnclaveJob(self, plan, enclave, job, certificate)
            except BaseException:
                try:
                    enclave.AbortJob(enclave_pb2.JobRef(job_id=job.job_id, job_token=job.job_token), timeout=10)
                except Exception:  # noqa: BLE001, S110 - best effort; the job also expires
                    pass
                raise

    def _check_tls_binding(
        self, enclave: enclave_pb2_grpc.EnclaveStub, job: enclave_pb2.CreateJobResponse, certificate: bytes
    ) -> None:
        """Fresh evidence over the pinned channel must bind the certificate (else a relay answered)."""
        if not certificate:
            return  # a plaintext link (loopback only): nothing to bind
        nonce = os.urandom(32)
        att = call("enclave", enclave.Attest, enclave_pb2.AttestRequest(job_id=job.job_id, nonce=nonce))
        verify_enclave_evidence(
            Evidence.from_bytes(att.evidence),
            self.appraisal,
            hpke_public_key=bytes(job.hpke_public_key),
            signing_public_key=bytes(job.signing_public_key),
            nonce=nonce,
            tls_cert=certificate,
            claimed_tls_key_sha256=bytes(att.tls_key_sha256),
        )

    def release(
        self,
        plan: Plan,
        verified: VerifiedResult,
        approvals: Mapping[str, Approval],
        tracker: StreamProgress,
        logged: LogPosition,
    ) -> None:
        """Log the verified stage, then store the release with its receipt (countersigned by the store
        with the log key) and its log entry, in one transaction."""
        qid = plan.query_id
        log_tee_stage(self.store, plan, verified)
        released_at = time.time()
        receipt = build_receipt(
            plan=plan,
            approvals=approvals,
            stages=[TeeStage(verified.result_json, verified.signature, verified.evidence)],
            submitted_at=self.store.query(qid).created_at,
            released_at=released_at,
            log_position=logged,
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


class EnclaveJob:
    """One plan's job in the enclave, from its creation (:meth:`TeeStageRunner.job`) on."""

    def __init__(
        self,
        stage: TeeStageRunner,
        plan: Plan,
        enclave: enclave_pb2_grpc.EnclaveStub,
        job: enclave_pb2.CreateJobResponse,
        certificate: bytes = b"",
    ):
        self.stage = stage
        self.certificate = certificate  # the enclave's TLS certificate its evidence binds (agents pin it)
        self.plan = plan
        self.plan_json = plan.to_json()
        self.enclave = enclave
        self.job = job

    def stream(self, streaming: Sequence[str], parties: Mapping[str, PartyRecord]) -> StreamProgress:
        """3. Each party verifies the enclave's evidence itself and streams sealed batches to it;
        returns once every stream has ended (raising the first party's failure)."""
        tracker = StreamProgress(self.plan, self.stage.store.datasets())
        self.stage.store.update_query(self.plan.query_id, progress=tracker.to_json("streaming"))
        with ThreadPoolExecutor(max_workers=max(1, len(streaming))) as pool:
            futures = {p: pool.submit(self._contribute, p, parties[p].address) for p in streaming}
            self._watch_streams(futures, parties, tracker)
            for fut in futures.values():
                fut.result()
        return tracker

    def _contribute(self, party: str, address: str) -> party_pb2.ContributeResponse:
        with self.stage.channel(address, pki.party(party)) as pch:
            try:
                return call(
                    party,
                    party_pb2_grpc.PartyAgentStub(pch).Contribute,
                    party_pb2.ContributeRequest(
                        plan_json=self.plan_json,
                        job_id=self.job.job_id,
                        enclave_address=self.stage.enclave_address,
                        enclave_tls_certificate=self.certificate,
                    ),
                    timeout=self.stage.party_timeout,
                )
            except SealroomError as err:
                raise JobFailedError(
                    f"{party} could not contribute: {err.message}",
                    details={**err.details, "party": party, "cause": err.code},
                ) from None

    def _watch_streams(
        self,
        futures: dict[str, Future[party_pb2.ContributeResponse]],
        parties: Mapping[str, PartyRecord],
        tracker: StreamProgress,
    ) -> None:
        """Until every party's stream has ended, ask each streaming agent how far it has got and
        publish it in the query's progress. Best effort: a failed or unanswered progress call is
        skipped (the party's Contribute call reports real failures), and an agent without
        GetProgress is not asked again."""
        qid, job_id = self.plan.query_id, self.job.job_id
        shown = ""
        with ExitStack() as stack:
            stubs: dict[str, party_pb2_grpc.PartyAgentStub] = {}
            for party in futures:
                try:
                    channel = stack.enter_context(self.stage.channel(parties[party].address, pki.party(party)))
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
                    self.stage.store.update_query(qid, progress=doc)
                    shown = doc
                if not streaming:
                    return
                wait([futures[p] for p in streaming], timeout=PROGRESS_INTERVAL)

    def execute(
        self, approvals: Mapping[str, Approval], tracker: StreamProgress, logged: LogPosition
    ) -> enclave_pb2.ExecuteResponse:
        """4. Execute with every approval at the query's log position; the enclave re-verifies them
        itself and binds the position into its result. Returns its signed result, not yet verified
        (:meth:`verify`)."""
        self.stage.store.update_query(self.plan.query_id, progress=tracker.to_json("executing in the enclave"))
        return call(
            "enclave",
            self.enclave.Execute,
            enclave_pb2.ExecuteRequest(
                job_id=self.job.job_id,
                approvals=approval_messages(approvals),
                job_token=self.job.job_token,
                log_position=logged.to_proto(),
            ),
            timeout=self.stage.party_timeout,
        )

    def prepare_mpc_player(
        self, stage_id: str, index: int, approvals: Mapping[str, Approval], logged: LogPosition
    ) -> tuple[EnclavePlayer, VerifiedResult]:
        """4'. A hybrid plan: the enclave computes the streamed inputs' partials and prepares its player
        (number ``index``) for the MPC stage ``stage_id``. Returns the player and the enclave's
        verified document for that stage (what fed the MPC stage)."""
        prepared = call(
            "enclave",
            self.enclave.PrepareMpc,
            enclave_pb2.EnclavePrepareMpcRequest(
                job_id=self.job.job_id,
                stage_id=stage_id,
                index=index,
                approvals=approval_messages(approvals),
                job_token=self.job.job_token,
                log_position=logged.to_proto(),
            ),
            timeout=self.stage.party_timeout,
        )
        feed = self.verify(prepared, logged)
        if feed.doc.get("feeds") != stage_id or feed.doc.get("player") != index:
            raise AttestationError(
                "the enclave's document is not for the MPC stage it was asked to join",
                details={"check": "result_plan"},
            )
        player = EnclavePlayer(
            index=index,
            address=self.stage.enclave_address,
            tls_certificate=self.certificate,
            job_id=self.job.job_id,
            job_token=bytes(self.job.job_token),
            offer=prepared.offer,
            attested=party_pb2.EnclavePlayer(
                evidence=feed.evidence,
                hpke_public_key=bytes(self.job.hpke_public_key),
                signing_public_key=bytes(self.job.signing_public_key),
            ),
        )
        return player, feed

    def verify(
        self, response: enclave_pb2.ExecuteResponse | enclave_pb2.EnclavePrepareMpcResponse, logged: LogPosition
    ) -> VerifiedResult:
        """5. The enclave's signed result, verified against this job's attested keys, the plan and the
        query's log position."""
        verified = verify_result(
            response,
            plan=self.plan,
            hpke_public=bytes(self.job.hpke_public_key),
            signing_public=bytes(self.job.signing_public_key),
            appraisal=self.stage.appraisal,
        )
        if verified.doc.get("log") != logged.to_dict():
            raise AttestationError(
                "the enclave's result binds another log position than the query's", details={"check": "result_log"}
            )
        return verified


def approval_messages(approvals: Mapping[str, Approval]) -> list[enclave_pb2.Approval]:
    """Every owner's stored approval, as the enclave takes them."""
    return [enclave_pb2.Approval(party=p, plan_hash=h, signature=s) for p, (h, s) in approvals.items()]
