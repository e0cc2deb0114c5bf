"""The party agent itself: its datasets and key, reviewing plans (the approvals it holds are in
:mod:`connectors.agent.approvals`), carrying out its owner's signed commands, and contributing its
rows, sealed, to an attested enclave, or through its MPC players (:mod:`connectors.mpc_player`)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from connectors.agent.approvals import Approvals, OwnerDecision, PendingPlan
from connectors.agent.claims import CLAIMS_FILE, ClaimLog
from connectors.agent.config import PartyConfig
from connectors.agent.ledger import BudgetLedger, asks_of
from connectors.agent.review import Owner, Submitted, check_logged, check_plan, witness_refusal
from connectors.agent.streaming import (
    TARGET_FRAME_BYTES,
    StreamCounter,
    filtered_batches,
    padded_batches,
    rebatch,
    until_failure,
)
from connectors.clock import MillisecondIssuer
from connectors.sources import open_source
from connectors.sources.base import Source, check_schema
from connectors.witness import LogWitness
from sealroom import pki
from sealroom.attestation import Claims, Evidence, verify_enclave_evidence
from sealroom.audit.entries import LogEntry
from sealroom.audit.ledger import LEDGER_FILE
from sealroom.errors import (
    ApprovalError,
    AuditError,
    InvalidQueryError,
    SealroomError,
    UnavailableError,
)
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.planning.plan import Plan, PlanInput
from sealroom.planning.sql import PAD_COLUMN
from sealroom.policy import DatasetPolicy
from sealroom.rpc import call, dial, unwrap
from sealroom.sealed import SealingStream, StreamContext, schema_hash
from sealroom.signing import Registration, sign_approval, sign_owner_action, sign_stream_header, verify_owner_read
from sealroom.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    enclave_pb2,
    enclave_pb2_grpc,
    party_pb2,
)
from sealroom.wire import HEADER_METADATA_KEY, SIGNATURE_METADATA_KEY, UPLOAD_PATH

if TYPE_CHECKING:
    from connectors.mpc_player import MpcPlayers

log = logging.getLogger(__name__)


COORDINATOR_CALL_TIMEOUT = 30.0


# Stream counters (GetProgress) are kept for this many recent jobs.
MAX_PROGRESS_JOBS = 64


@dataclass(frozen=True)
class Contribution:
    """What a contribution sent: one upload summary per dataset streamed, and the enclave's claims."""

    uploads: list[party_pb2.DatasetUpload]
    claims: Claims


@dataclass(frozen=True)
class _Enclave:
    """An enclave job this agent attested: its evidence, the claims it verified and the job key."""

    evidence: Evidence
    claims: Claims
    job_key: X25519PublicKey


def _submitted_at(submitted: Submitted) -> float:
    """When the log shows the query submitted (unix seconds; checked by check_logged), else now: what
    a privacy charge's refresh window counts from. Never later than this agent's clock: a coordinator
    that dated its entries ahead, one window further each time, would otherwise put every charge in a
    window of its own (an honest log's entry is older than the review it comes with)."""
    now = time.time()
    if submitted.entry:
        try:
            return min(LogEntry.from_bytes(submitted.entry).time_ms / 1000, now)
        except (ValueError, TypeError):
            pass
    return now


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
        self._mpc_players: MpcPlayers | None = None  # made on first use
        # The owner's privacy budgets (connectors/agent/ledger.py): a ledger whose chain is broken
        # stops the agent here (AuditError naming the file and line); reservations whose approval
        # lapsed while it was down, before any data flowed, go back now.
        self.ledger = BudgetLedger(config.witness_state_dir / LEDGER_FILE, party=config.name)
        self.ledger.release_lapsed(time.time())
        self.approvals = Approvals(
            config.name,
            approval_ttl_seconds=config.approval_ttl_seconds,
            pending_ttl_seconds=config.pending_ttl_seconds,
            max_pending_per_analyst=config.max_pending_per_analyst,
            claims=ClaimLog(config.witness_state_dir / CLAIMS_FILE),
            ledger=self.ledger,
        )
        # The issued_at_ms of every message signed here (owner actions, witness co-signatures).
        self._issuer = MillisecondIssuer()
        self._lock = threading.Lock()  # guards _streams
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
                issued_at=self._issuer.issue,
            )

    # -- registration ------------------------------------------------------------------------

    def registration(
        self, address: str, datasets: list[common_pb2.DatasetInfo] | None = None
    ) -> coordinator_pb2.RegisterPartyRequest:
        """This party's registration, signed now by its key (:class:`sealroom.signing.Registration`),
        with the operator's enrolment token when the config has one. ``datasets``: the datasets'
        messages, when already made (:meth:`dataset_infos`)."""
        datasets = self.dataset_infos() if datasets is None else datasets
        issued = self._issuer.issue()
        registration = Registration.of(
            party=self.config.name,
            owner_key=self.public_key_hex,
            address=address,
            datasets=datasets,
            issued_at_ms=issued,
        )
        return coordinator_pb2.RegisterPartyRequest(
            party=common_pb2.PartyInfo(
                name=self.config.name,
                address=address,
                signing_public_key=bytes.fromhex(self.public_key_hex),
            ),
            datasets=datasets,
            issued_at_ms=issued,
            signature=registration.sign(self.key),
            enrolment_token=self.config.enrolment_token,
        )

    def dataset_infos(self) -> list[common_pb2.DatasetInfo]:
        """What this party registers of each dataset: schema, policy, description, approximate rows."""
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
        return datasets

    def _approximate_rows(self, dataset: str) -> int:
        """The dataset's row count to two significant digits (read streaming, no column loaded)."""
        n = sum(b.num_rows for b in self.sources[dataset].batches([]))
        return int(float(f"{n:.2g}")) if n else 0

    def register(self, address: str, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        datasets = self.dataset_infos()
        with dial(self.config.coordinator, self.config.tls, pki.coordinator()) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                request = self.registration(address, datasets)  # signed afresh at each attempt
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

    def review(self, plan_json: bytes, submitted: Submitted | None = None) -> tuple[str, bytes | None, float]:
        """Check a plan against this owner's policies and the coordinator's log; return (plan_hash,
        signature, expires_at).

        ``submitted``: the coordinator's ``query_submitted`` entry for the plan and its inclusion
        proof; the agent witnesses the log, checks the entry is in a checkpoint it co-signed
        (:func:`connectors.agent.review.check_logged`) and signs that log position into its approval.
        The signature is None when the plan waits for the owner's manual decision (any of this
        party's datasets in it has ``approval = "manual"``). A plan the owner already approved
        returns that approval, unchanged; an automatic approval is signed afresh (a new lifetime).
        """
        plan = Plan.from_json(plan_json)
        mine = self._check_plan(plan)
        manual = any(self.policies[i.dataset].approval == "manual" for i in mine)
        # Before holding or signing anything: the log must extend what this agent saw, and show the query.
        submitted = submitted or Submitted()
        position = check_logged(self._owner(), plan, submitted)
        at = _submitted_at(submitted)
        # The owner's budgets: refused when the charge does not fit; reserved (on disk) before an
        # automatic approval is signed; a manual one reserves when the owner approves.
        asks = asks_of(self.config.name, plan, self.policies)
        reserved = False
        if asks:
            self.approvals.lapse()
            self.ledger.release_lapsed(time.time())
            if manual:
                self.ledger.check(plan, asks, at)
            else:
                until = time.time() + self.config.approval_ttl_seconds + 1
                reserved = self.ledger.reserve(plan, asks, at=at, until=until)
        try:
            signature, expires_at = self.approvals.hold(
                plan, manual=manual, sign=partial(sign_approval, self.key), position=position, submitted_at=at
            )
        except BaseException:
            if reserved:
                self.ledger.release(plan.hash, "not_approved")
            raise
        return plan.hash, signature, expires_at

    # -- contribution ------------------------------------------------------------------------

    def progress(self, job_id: str) -> list[StreamCounter]:
        """This agent's streams for a job (empty before it streams; kept for the last
        :data:`MAX_PROGRESS_JOBS` jobs, so the final counts can be read once a stream has ended)."""
        with self._lock:
            return list(self._streams.get(job_id, ()))

    @property
    def mpc_players(self) -> MpcPlayers:
        """This agent's MPC players (imported on first use: agents without MPC stages never load mpc/)."""
        if self._mpc_players is None:
            from connectors.mpc_player import MpcPlayers, PlayerOwner  # lazy: see the docstring

            owner = PlayerOwner(
                name=self.config.name,
                policies=self.policies,
                schemas=self.schemas,
                approved_plan=self.approved_plan,
                input_rows=self.input_rows,
                verify_enclave=self.verify_enclave,
                mark_used=self.mark_used,
                claim=self.approvals.claim,
                sign=self.key.sign,
                logged=self.approvals.position,
            )
            self._mpc_players = MpcPlayers(owner, host=self.config.mpc_host)
        return self._mpc_players

    def approved_plan(self, plan_json: bytes) -> Plan:
        """The plan, if this agent holds a live approval of exactly these bytes (see
        :meth:`connectors.agent.approvals.Approvals.approved_plan`); else ApprovalError saying why."""
        return self.approvals.approved_plan(plan_json)

    def mark_used(self, plan_hash: str) -> None:
        """Data moved for this plan (sealed streams or MPC shares): it no longer awaits a decision."""
        self.approvals.mark_used(plan_hash)

    def input_rows(self, inp: PlanInput) -> Iterator[pa.RecordBatch]:
        """This owner's rows for one plan input: the source checked against its registered schema,
        then its columns, filtered here (or by the source's own engine) when the input has a filter."""
        source = self.sources[inp.dataset]
        registered = self.schemas[inp.dataset]
        check_schema(source, registered)
        if inp.filter is None:
            return source.batches(list(inp.columns))
        return filtered_batches(source, registered, inp)

    def contribute(
        self, plan_json: bytes, job_id: str, enclave_address: str, enclave_cert: bytes = b""
    ) -> Contribution:
        """Stream this owner's inputs of the plan's TEE stages, sealed to the enclave job's attested key,
        over TLS pinned to ``enclave_cert``, which the job's evidence must bind (docs/wire.md)."""
        plan = self.approved_plan(plan_json)
        me = self.config.name
        # Only what goes to an enclave: a dataset of this owner that an MPC stage reads directly stays
        # here (its own player holds its partials).
        mine = [i for s in plan.tee_stages() for i in s.inputs if i.party == me]
        if not mine:
            raise ApprovalError(f"the plan streams no data of {me} to an enclave", details={"party": me})
        with dial(enclave_address, self.config.tls, enclave_cert) as channel:
            enclave = self._attest(enclave_pb2_grpc.EnclaveStub(channel), job_id, mine, enclave_cert)
            # Once the attested worker is found, before a frame moves: a plan's data goes once (the
            # log's one entry is one release); a refused enclave or relay uses nothing up.
            self.approvals.claim(plan.hash, "tee")
            upload = channel.stream_unary(
                UPLOAD_PATH,
                request_serializer=None,
                response_deserializer=enclave_pb2.UploadSummary.FromString,
            )
            with self._lock:
                self._streams[job_id] = []
                while len(self._streams) > MAX_PROGRESS_JOBS:
                    self._streams.popitem(last=False)
            uploads = [self._stream(upload, plan.hash, job_id, inp, enclave) for inp in mine]
        self.mark_used(plan.hash)
        return Contribution(uploads, enclave.claims)

    def _attest(
        self, enclave: enclave_pb2_grpc.EnclaveStub, job_id: str, mine: list[PlanInput], tls_cert: bytes
    ) -> _Enclave:
        """The job's evidence, verified against this agent's appraisal and each dataset's trust, and
        binding the TLS certificate this channel is pinned to (else it is not the attested worker)."""
        me = self.config.name
        nonce = os.urandom(32)
        att = call("enclave", enclave.Attest, enclave_pb2.AttestRequest(job_id=job_id, nonce=nonce))
        evidence = Evidence.from_bytes(att.evidence)
        claims = self.verify_enclave(
            evidence,
            bytes(att.hpke_public_key),
            bytes(att.signing_public_key),
            nonce,
            tls_cert=tls_cert,
            claimed_tls_key=bytes(att.tls_key_sha256),
        )
        for inp in mine:  # each dataset's own trust section narrows the agent's
            self.policies[inp.dataset].trust.check(claims, dataset=f"{me}.{inp.dataset}")
        return _Enclave(evidence, claims, X25519PublicKey.from_public_bytes(bytes(att.hpke_public_key)))

    def _stream(
        self, upload: grpc.StreamUnaryMultiCallable, plan_hash: str, job_id: str, inp: PlanInput, enclave: _Enclave
    ) -> party_pb2.DatasetUpload:
        """Seal and stream one input to the enclave job; its upload summary."""
        rows = self.input_rows(inp)
        projected = pa.schema([self.schemas[inp.dataset].field(c) for c in inp.columns])
        if inp.filter is not None:
            projected = projected.append(pa.field(PAD_COLUMN, pa.bool_(), nullable=False))
        ctx = StreamContext(
            job_id=job_id,
            party=self.config.name,
            dataset=inp.dataset,
            schema_hash=schema_hash(projected),
            plan_hash=bytes.fromhex(plan_hash),
            evidence_hash=enclave.evidence.digest(),
        )
        sealer = SealingStream(ctx, projected, enclave.job_key)
        header = sealer.header.to_bytes()
        batches = rebatch(rows, TARGET_FRAME_BYTES) if inp.filter is None else padded_batches(rows, projected)
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
        log.info(
            "streamed %s to job %s (%d frames%s)%s",
            inp.dataset,
            job_id,
            summary.frames,
            ", filtered here and padded" if inp.filter is not None else "",
            " under SIMULATED attestation" if enclave.claims.simulated else "",
        )
        # Row counts stay with the owner; the coordinator learns what it sees anyway.
        return party_pb2.DatasetUpload(dataset=inp.dataset, bytes=summary.bytes, frames=summary.frames)

    # -- the owner's decisions (manual approval) -----------------------------------------------

    def pending(self) -> list[PendingPlan]:
        """Manual plans held for the owner: waiting for a decision, or approved and still live."""
        return self.approvals.pending()

    def authenticate_read(self, request: party_pb2.ListPendingRequest) -> None:
        """ApprovalError unless the owner's read request is signed by this agent's key, and fresh."""
        verify_owner_read(
            self.public_key_hex,
            bytes(request.signature),
            "pending",
            party=self.config.name,
            issued_at_ms=request.issued_at_ms,
            now_ms=int(time.time() * 1000),
        )

    def _coordinator_call(self, method: str, request: Any) -> Any:
        with dial(self.config.coordinator, self.config.tls, pki.coordinator()) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return call("coordinator", getattr(stub, method), request, timeout=COORDINATOR_CALL_TIMEOUT)

    def _witness_log(self, query_id: str) -> None:
        """Witness the coordinator's log before an approval (connectors/witness.py): co-sign its latest
        checkpoint once it is checked to extend the last one this agent co-signed. Raises
        ApprovalError naming the failed check (``fork``, ``rollback``, ``consistency_proof``...)."""
        if self.witness is None:
            return
        try:
            self.witness.witness(query_id=query_id)
        except AuditError as err:
            raise witness_refusal(self.config.name, query_id, err) from None

    def approve(self, command: party_pb2.OwnerCommand) -> OwnerDecision:
        """The owner approves: witness the log, sign the plan hash, hold the approval, send it to the
        coordinator."""
        self.approvals.accept_command("approve", command, public_key_hex=self.public_key_hex)
        me = self.config.name
        _, held = self.approvals.find(command)  # nothing awaits the owner: say so before calling the coordinator
        self._witness_log(command.query_id)
        # The owner's budgets: reserved (on disk) before the approval is signed; refused when it no
        # longer fits (other plans spent it while this one waited).
        asks = asks_of(me, held.plan, self.policies)
        reserved = False
        if asks:
            self.approvals.lapse()
            self.ledger.release_lapsed(time.time())
            until = time.time() + self.config.approval_ttl_seconds + 1
            reserved = self.ledger.reserve(held.plan, asks, at=held.submitted_at or time.time(), until=until)
        try:
            grant = self.approvals.grant(command, sign=partial(sign_approval, self.key))
        except BaseException:
            if reserved:
                self.ledger.release(held.plan.hash, "not_approved")
            raise
        plan_hash = grant.plan_hash
        qid = grant.held.plan.query_id
        issued = self._issuer.issue()
        expires_ms = int(grant.expires_at * 1000)
        request = coordinator_pb2.SubmitApprovalRequest(
            query_id=qid,
            party=me,
            plan_hash=plan_hash,
            signature=grant.signature,
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
            gone = err.code == "not_found" or err.details.get("check") == "query_state"
            self.approvals.refused(grant, query_gone=gone)
            raise
        log.info("the owner approved plan %s for query %s", plan_hash[:12], qid)
        return OwnerDecision(qid, plan_hash, "approved", grant.expires_at, resp.status, tuple(resp.awaiting))

    def reject(self, command: party_pb2.OwnerCommand) -> OwnerDecision:
        """The owner rejects: the agent drops the plan for good, and the coordinator refuses the query."""
        if not command.reason.strip():
            raise InvalidQueryError("a rejection needs a reason (--reason TEXT); the analyst sees it")
        self.approvals.accept_command("reject", command, public_key_hex=self.public_key_hex)
        me = self.config.name
        plan_hash, held = self.approvals.reject(command)
        qid = held.plan.query_id
        log.info("the owner rejected plan %s for query %s", plan_hash[:12], qid)
        issued = self._issuer.issue()
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
        return OwnerDecision(qid, plan_hash, "rejected", 0.0, resp.status, tuple(resp.awaiting))

    def revoke(self, command: party_pb2.OwnerCommand) -> OwnerDecision:
        """The owner withdraws an approval: the agent stops honouring it at once (the plan waits for
        the owner again), and the coordinator removes it unless execution has started."""
        self.approvals.accept_command("revoke", command, public_key_hex=self.public_key_hex)
        me = self.config.name
        plan_hash, held = self.approvals.revoke(command)
        qid = held.plan.query_id
        log.info("the owner revoked its approval of plan %s for query %s", plan_hash[:12], qid)
        issued = self._issuer.issue()
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
        return OwnerDecision(qid, plan_hash, "pending", 0.0, resp.status, tuple(resp.awaiting))

    def verify_enclave(
        self,
        evidence: Evidence,
        hpke_pk: bytes,
        signing_pk: bytes,
        nonce: bytes,
        *,
        tls_cert: bytes | None = None,
        claimed_tls_key: bytes = b"",
    ) -> Claims:
        """Appraise the enclave's evidence; with ``tls_cert`` (the certificate a TLS link to it is pinned
        to; None: evidence that binds no link, e.g. a signed result's) it must bind that key too."""
        return verify_enclave_evidence(
            evidence,
            self.appraisal,
            hpke_public_key=hpke_pk,
            signing_public_key=signing_pk,
            nonce=nonce,
            tls_cert=None if self.config.tls.plaintext else tls_cert,  # a plaintext link binds nothing
            claimed_tls_key_sha256=claimed_tls_key,
        )
