"""Jobs inside the enclave: keys, evidence, sealed inputs, execution, signed results, wiping.

:class:`JobRegistry` holds this enclave's jobs and runs their life cycle; a job and its one state
field are :mod:`enclave_worker.job`, the enclave's own check of a plan is
:mod:`enclave_worker.admission`.

A job lives only in this process's memory. Its X25519 key opens the data keys parties seal to it;
its Ed25519 key signs the result; both are bound into every piece of evidence the job hands out.
A job fails as a whole (nothing released, its data dropped) when any stream fails to authenticate,
a party disconnects mid-stream, the memory limit is exceeded, or it outlives its TTL.

Filter pushdown: a party may filter its own rows before sealing. The job recomputes every input's
filter from the plan's SQL itself (:func:`sealroom.planning.plan.stage_pushdown`), refuses a plan whose
filters differ, and compiles and runs only the residual query. A filtered stream carries the
boolean column :data:`~sealroom.planning.sql.PAD_COLUMN` (and only a filtered one): its padding rows hide
how many rows matched, and are dropped as each frame is opened, before anything reads the input.

A plan over datasets whose owners chose differential privacy is released by :mod:`enclave_worker.dp`
(noise from OpenDP, contribution bounds enforced here); its signed result states the mechanism, what
it charges each owner's budget and the 95 % half-width of every released aggregate (``ci95``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from enclave_worker.admission import admit
from enclave_worker.attester import Attester
from enclave_worker.config import EnclaveConfig
from enclave_worker.dp import run_dp_stage
from enclave_worker.engine import public_group_keys, run_stage, table_to_ipc
from enclave_worker.job import InputState, Job, JobInput
from sealroom.attestation import Evidence, report_data_for
from sealroom.canonical import canonical_json
from sealroom.errors import (
    ApprovalError,
    AuthenticationError,
    IntegrityError,
    InvalidQueryError,
    JobFailedError,
    NotFoundError,
    ResourceExhaustedError,
    SealroomError,
)
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import charges
from sealroom.planning.sql import PAD_COLUMN, InputSpec
from sealroom.sealed import OpeningStream, StreamHeader, integrity_error
from sealroom.signing import LogPosition, verify_approval, verify_stream_header

__all__ = ["RESULT_VERSION", "Job", "JobInput", "JobRegistry"]

log = logging.getLogger(__name__)

# 2: the result binds the query's log position ("log"; docs/audit.md, "No release outside the log").
RESULT_VERSION = 2


def _cancelled_within(connected: Callable[[], bool], *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while connected():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _disconnected(party: str) -> JobFailedError:
    return JobFailedError(f"{party} disconnected or its stream broke before the end; the job was stopped")


def _raw(public_key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class _Stream:
    """One party's stream, opened and verified to its end: its rows (padding dropped) and counts."""

    table: pa.Table
    rows: int  # padding included
    bytes: int  # padding included
    frames: int


class JobRegistry:
    def __init__(self, config: EnclaveConfig, attester: Attester, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.attester = attester
        self.clock = clock
        # SHA-256 of the worker's TLS key (enclave_worker/tls.py), bound into every Attest; None: plaintext.
        self.tls_key_sha256: bytes | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._held = 0

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return self._held

    def job(self, job_id: str) -> Job | None:
        """The job ``job_id`` if this enclave still holds it (no reaping, no token: for inspection)."""
        with self._lock:
            return self._jobs.get(job_id)

    def _get(self, job_id: str) -> Job:
        self.reap()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError("no such job in this enclave (it may have finished, failed or expired)")
        return job

    def _fail(self, job: Job, err: SealroomError) -> None:
        with self._lock:
            if job.fail(err):
                log.warning("job %s failed: %s", job.id, err.code)
            self._held -= job.held_bytes
            job.wipe()

    def reap(self) -> None:
        now = self.clock()
        with self._lock:
            expired = [
                j for j in self._jobs.values() if not j.held_by_a_call and now - j.created > self.config.job_ttl_seconds
            ]
        for job in expired:
            self._fail(job, JobFailedError("the job expired before it was executed"))
            with self._lock:
                self._jobs.pop(job.id, None)

    # -- job life cycle ----------------------------------------------------------------------

    def create(self, plan_json: bytes) -> Job:
        """A job for ``plan_json``, once the enclave's own check of the plan (admission.admit) passed."""
        admitted = admit(Plan.from_json(plan_json), self.config)
        hpke_key = X25519PrivateKey.generate()
        signing_key = Ed25519PrivateKey.generate()
        job = Job(
            id=uuid.uuid4().hex,
            plan=admitted.plan,
            plan_hash=admitted.plan.hash,
            compiled=admitted.compiled,
            min_group_size=admitted.min_group_size,
            rule_datasets=admitted.rule_datasets,
            hpke_key=hpke_key,
            signing_key=signing_key,
            hpke_public=_raw(hpke_key.public_key()),
            signing_public=_raw(signing_key.public_key()),
            created=self.clock(),
            inputs={(i.party, i.dataset): JobInput(i) for i in admitted.stage.inputs},
            clamps=admitted.clamps,
            dominance=admitted.dominance,
            rules=admitted.rules,
            feed=admitted.feed,
            dp=admitted.dp,
            residual_sql=admitted.residual_sql,
        )
        with self._lock:
            self._jobs[job.id] = job
        log.info("job %s created for plan %s (%d inputs)", job.id, job.plan_hash[:12], len(job.inputs))
        return job

    def attest(self, job_id: str, nonce: bytes) -> tuple[Evidence, Job]:
        """Evidence binding the job's keys and ``nonce``, and the job (whose public keys go with it)."""
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise InvalidQueryError("the nonce must be 16 to 64 random bytes")
        job = self._get(job_id)
        evidence = self.attester.attest(
            report_data=report_data_for(
                hpke_public_key=job.hpke_public,
                signing_public_key=job.signing_public,
                nonce=nonce,
                tls_key_sha256=self.tls_key_sha256,
            ),
            nonce=nonce,
        )
        with self._lock:
            job.issued_evidence.add(evidence.digest())
        return evidence, job

    def upload(
        self,
        header_bytes: bytes,
        signature: bytes | None,
        frames: Iterable[bytes],
        *,
        connected: Callable[[], bool] = lambda: True,
    ) -> tuple[str, JobInput]:
        """Open one party's sealed stream; commit its table only when the whole stream verified.

        Any stream that fails authentication fails the whole job (invariant 8): the other parties'
        inputs are dropped with it and nothing is released.
        """
        header = StreamHeader.from_bytes(header_bytes)  # malformed: no job to fail
        ctx = header.context
        job = self._get(ctx.job_id)
        inp, hpke_key = self._admit_stream(job, header, header_bytes, signature)
        try:
            stream = self._read_stream(job, inp, OpeningStream(header, hpke_key), frames, connected)
        except SealroomError as caught:
            err = caught
            if isinstance(err, IntegrityError) and not connected():
                # A cancelled call can look like a stream cut short; say what happened.
                err = _disconnected(ctx.party)
            self._fail(job, err)
            raise err from None
        except Exception as exc:  # a disconnect can also surface as a grpc error from the iterator
            err = _disconnected(ctx.party)
            self._fail(job, err)
            raise err from exc
        else:
            self._commit(job, inp, stream, header_bytes)
        finally:
            with self._lock:
                if inp.state is InputState.STREAMING:  # failed or refused: the input did not arrive
                    inp.state = InputState.WAITING
        log.info("job %s: input %s.%s loaded (%d frames)", job.id, ctx.party, ctx.dataset, stream.frames)
        return job.id, inp

    def _admit_stream(
        self, job: Job, header: StreamHeader, header_bytes: bytes, signature: bytes | None
    ) -> tuple[JobInput, X25519PrivateKey]:
        """The input a stream fills, marked streaming, and the job key that opens it. Every check that
        a sender could fail on purpose fails the job with the same IntegrityError."""
        ctx = header.context
        with self._lock:
            job.check_receiving()
            inp = job.inputs.get((ctx.party, ctx.dataset))
            hpke_key = job.hpke_key
            try:
                if (
                    inp is None
                    or inp.state is not InputState.WAITING
                    or signature is None
                    or ctx.plan_hash.hex() != job.plan_hash
                    or ctx.evidence_hash not in job.issued_evidence
                    or hpke_key is None
                ):
                    raise integrity_error()
                verify_stream_header(job.plan.parties.get(ctx.party, ""), header_bytes, signature)
            except IntegrityError:
                self._fail(job, integrity_error())
                raise integrity_error() from None
            inp.state = InputState.STREAMING
        return inp, hpke_key

    def _read_stream(
        self,
        job: Job,
        inp: JobInput,
        opener: OpeningStream,
        frames: Iterable[bytes],
        connected: Callable[[], bool],
    ) -> _Stream:
        """Open every frame (padding rows dropped as each is opened), holding its size against the
        memory limit, and the end of the stream."""
        columns = list(inp.spec.columns)
        padded = inp.spec.filter is not None
        # A filtered input carries the padding flag as its last column; any other never does.
        expected = [*columns, PAD_COLUMN] if padded else columns
        if opener.schema.names != expected or (padded and opener.schema.field(PAD_COLUMN).type != pa.bool_()):
            raise integrity_error()
        batches: list[pa.RecordBatch] = []
        received = rows = frames_n = 0
        for frame in frames:
            batch = opener.open_batch(frame)
            frames_n += 1
            if batch is None:
                continue
            received += batch.nbytes
            rows += batch.num_rows
            if padded:
                # Drop the padding rows (NULL flags too, as WHERE NOT would) before anything else.
                batch = batch.filter(pc.invert(batch.column(PAD_COLUMN))).select(columns)
                if batch.num_rows == 0:
                    continue
            self._hold(job, batch.nbytes)
            batches.append(batch)
        try:
            opener.close()
        except IntegrityError:
            # The stream ended without its final frame: a party cut off mid-stream, or a truncated
            # stream. gRPC can end the request iterator of a cancelled call a moment before it
            # reports the call inactive, so give the cancellation that moment.
            if _cancelled_within(connected, seconds=0.5):
                raise _disconnected(inp.spec.party) from None
            raise
        schema = pa.schema([opener.schema.field(c) for c in columns])
        return _Stream(pa.Table.from_batches(batches, schema=schema), rows, received, frames_n)

    def _hold(self, job: Job, size: int) -> None:
        """Count ``size`` more bytes held for ``job``, within the enclave's memory limit."""
        with self._lock:
            job.check_alive()
            if self._held + size > self.config.memory_limit_bytes:
                raise ResourceExhaustedError(
                    "the enclave's memory limit was exceeded while loading inputs; "
                    "raise enclave.memory_limit_mb or reduce the data the query needs"
                )
            self._held += size
            job.held_bytes += size

    def _commit(self, job: Job, inp: JobInput, stream: _Stream, header_bytes: bytes) -> None:
        """The verified stream becomes the input (unless the job ended meanwhile)."""
        with self._lock:
            job.check_alive()
            inp.table = stream.table
            inp.rows = stream.rows
            inp.bytes = stream.bytes
            inp.frames = stream.frames
            inp.header_sha256 = hashlib.sha256(header_bytes).hexdigest()
            inp.state = InputState.LOADED

    def _authorized(self, job_id: str, token: bytes) -> Job:
        """The job, if ``token`` is the one its creator got: the parties know the job id (they stream
        to it) but may not run, end or join it. A wrong token changes nothing about the job."""
        job = self._get(job_id)
        if not hmac.compare_digest(job.token, bytes(token)):
            raise AuthenticationError("only the job's creator may run, end or join it (the job token is wrong)")
        return job

    def _begin(self, job_id: str, token: bytes) -> Job:
        """The job, marked executing (the reaper and late uploads leave it alone from here)."""
        job = self._authorized(job_id, token)
        with self._lock:
            if job.streaming:
                err = JobFailedError("the job was asked to run while an input was still streaming; it was stopped")
                self._fail(job, err)
                self._jobs.pop(job.id, None)
                raise err
            job.begin()
        return job

    def _end(self, job: Job) -> None:
        """The job is over, released or not: its data and keys are dropped."""
        with self._lock:
            self._held -= job.held_bytes
            job.wipe()
            job.end()
            self._jobs.pop(job.id, None)

    def execute(
        self,
        job_id: str,
        approvals: dict[str, tuple[str, bytes]],
        token: bytes,
        log_position: LogPosition | None = None,
        *,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> dict[str, Any]:
        """Run the job's stage; ``on_cancel`` (gRPC's ``context.add_callback``) interrupts it when the
        caller goes away."""
        job = self._begin(job_id, token)
        try:
            if job.feed is not None:
                raise InvalidQueryError(
                    f"this job feeds MPC stage {job.feed.mpc_stage.id} and releases nothing itself; its player runs "
                    "with PrepareMpc and RunMpc"
                )
            return self._execute(job, approvals, log_position, on_cancel)
        except SealroomError as err:
            self._fail(job, err)
            raise
        finally:
            self._end(job)

    def _check_ready(
        self, job: Job, approvals: dict[str, tuple[str, bytes]], log_position: LogPosition | None
    ) -> LogPosition:
        """Every owner whose data the plan touches approved exactly this plan at the same log position
        (the query's ``query_submitted`` entry in the coordinator's log, which each owner's agent
        checked against a checkpoint it witnessed), and every input arrived. Returns the position."""
        job.raise_if_failed()
        if log_position is None:
            raise ApprovalError(
                "the request names no log position; the enclave releases only a query whose submission the "
                "coordinator's transparency log shows, at the position the owners' approvals sign",
                details={"check": "log_position_missing"},
            )
        for party in job.plan.involved_parties():
            if party not in approvals:
                raise ApprovalError(
                    f"no approval from {party}, whose data this plan reads",
                    details={"party": party, "check": "approval_missing"},
                )
            plan_hash, signature = approvals[party]
            if plan_hash != job.plan_hash:
                raise ApprovalError(
                    f"the approval of {party} is for another plan",
                    details={"party": party, "check": "approval_plan_hash"},
                )
            key_hex = job.plan.parties.get(party)
            if key_hex is None:
                raise ApprovalError(f"the plan carries no signing key for {party}", details={"party": party})
            verify_approval(key_hex, plan_hash, signature, party=party, log=log_position)
        missing = [f"{p}.{d}" for (p, d), i in job.inputs.items() if i.table is None]
        if missing:
            raise JobFailedError(f"inputs missing: {', '.join(missing)} did not arrive", details={"missing": missing})
        return log_position

    def _signed(
        self, job: Job, approvals: dict[str, tuple[str, bytes]], log_position: LogPosition, stage: dict[str, Any]
    ) -> tuple[bytes, bytes, Evidence]:
        """The job's result document (``stage``: what the stage produced) with what it read, the rules,
        the approvals it checked, the log position they sign and the attestation binding its keys to
        the plan hash; signed."""
        nonce = bytes.fromhex(job.plan_hash)
        evidence = self.attester.attest(
            report_data=report_data_for(
                hpke_public_key=job.hpke_public, signing_public_key=job.signing_public, nonce=nonce
            ),
            nonce=nonce,
        )
        tee = job.plan.tee_stages()[0]
        doc = {
            "version": RESULT_VERSION,
            "kind": "sealroom.result",
            "job_id": job.id,
            "query_id": job.plan.query_id,
            "plan_hash": job.plan_hash,
            "log": log_position.to_dict(),
            "stage": tee.id,
            **stage,
            "rules": job.rules,
            "inputs": [
                {
                    "party": i.spec.party,
                    "dataset": i.spec.dataset,
                    "columns": list(i.spec.columns),
                    "frames": i.frames,
                    "bytes": i.bytes,
                    "stream_header_sha256": i.header_sha256,
                }
                for i in job.inputs.values()
            ],
            "approvals": [
                {"party": p, "plan_hash": approvals[p][0], "signature": approvals[p][1].hex()}
                for p in job.plan.involved_parties()
            ],
            "attestation": {
                "format": self.attester.format,
                "simulated": self.attester.simulated,
                "measurement": self.attester.measurement,
                "evidence_sha256": evidence.digest().hex(),
            },
            "hpke_public_key": job.hpke_public.hex(),
            "signing_public_key": job.signing_public.hex(),
            "simulated": self.attester.simulated,
            "executed_at": self.clock(),
        }
        body = canonical_json(doc)
        if job.signing_key is None:
            raise JobFailedError("the job's keys were wiped before it could sign its result")
        return body, job.signing_key.sign(body), evidence

    def _execute(
        self,
        job: Job,
        approvals: dict[str, tuple[str, bytes]],
        log_position: LogPosition | None,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> dict[str, Any]:
        # 1. Every owner whose data the plan touches approved exactly this plan at one log position;
        # 2. every input arrived, sealed to this job, for this plan.
        logged = self._check_ready(job, approvals, log_position)
        assert job.compiled is not None
        tables = {i.spec.table: i.table for i in job.inputs.values() if i.table is not None}
        if job.dp is not None:
            return self._execute_dp(job, approvals, logged, tables, on_cancel)
        no_unit = frozenset(i.spec.table for i in job.inputs.values() if not i.spec.policy.privacy_unit)
        outcome = run_stage(
            job.compiled,
            tables,
            min_group_size=job.min_group_size,
            rule_datasets=job.rule_datasets,
            row_id_tables=no_unit,
            clamps=job.clamps,
            dominance=job.dominance,
            # A suppressed cell shows its keys only where its owners declared them public.
            public_keys=public_group_keys(job.compiled, {i.spec.qualified: i.spec.policy for i in job.inputs.values()}),
            threads=self.config.engine_threads,
            on_cancel=on_cancel,
        )
        out = self._released(
            job,
            approvals,
            logged,
            outcome.released,
            {"suppressed": outcome.suppressed, "min_group_size": outcome.min_group_size},
        )
        log.info(
            "job %s executed: %d cells released, %d suppressed",
            job.id,
            outcome.released.num_rows,
            len(outcome.suppressed),
        )
        return out

    def _released(
        self,
        job: Job,
        approvals: dict[str, tuple[str, bytes]],
        logged: LogPosition,
        released: pa.Table,
        decided: dict[str, Any],
    ) -> dict[str, Any]:
        """The released table as Arrow IPC and the signed result document naming it (its output
        columns, rows and hash, with ``decided``: what the engine decided about the cells)."""
        assert job.compiled is not None
        ipc = table_to_ipc(released)
        body, signature, evidence = self._signed(
            job,
            approvals,
            logged,
            {
                "output_columns": list(job.compiled.output_columns),
                "released_rows": released.num_rows,
                "result_sha256": hashlib.sha256(ipc).hexdigest(),
                **decided,
            },
        )
        return {"result_json": body, "signature": signature, "arrow_table": ipc, "evidence": evidence.to_bytes()}

    def _execute_dp(
        self,
        job: Job,
        approvals: dict[str, tuple[str, bytes]],
        logged: LogPosition,
        tables: dict[str, pa.Table],
        on_cancel: Callable[[Callable[[], None]], object] | None,
    ) -> dict[str, Any]:
        """Release a dp stage (:mod:`enclave_worker.dp`): noisy aggregates, their 95 % half-widths, the
        mechanism and what it charges each owner's budget; nothing is suppressed or listed."""
        assert job.compiled is not None and job.dp is not None and job.plan.privacy is not None
        stage = job.plan.tee_stages()[0]
        outcome = run_dp_stage(
            job.residual_sql,
            [InputSpec(i.qualified, i.table, i.columns, i.policy.privacy_unit) for i in stage.inputs],
            tables,
            job.dp,
            clamps=job.clamps,
            threads=self.config.engine_threads,
            on_cancel=on_cancel,
        )
        spent = charges(job.plan.analyst, stage.inputs, job.plan.privacy)
        out = self._released(
            job,
            approvals,
            logged,
            outcome.released,
            {
                "suppressed": [],
                "min_group_size": job.min_group_size,
                "privacy": {**outcome.privacy, "charges": [c.to_dict() for c in spent]},
                "ci95": outcome.ci95,
            },
        )
        log.info("job %s executed with differential privacy: %d groups released", job.id, outcome.released.num_rows)
        return out

    # -- the enclave as an MPC player (a stage that feeds an MPC stage) ------------------------

    def prepare_mpc(
        self,
        job_id: str,
        stage_id: str,
        index: int,
        approvals: dict[str, tuple[str, bytes]],
        token: bytes,
        log_position: LogPosition | None = None,
    ) -> dict[str, Any]:
        """With every approval and input in: compute the inputs' partials, drop the rows, and return
        the player's signed offer with the job's signed feed document and its evidence."""
        job = self._begin(job_id, token)
        try:
            feed = job.feed
            if feed is None or stage_id != feed.mpc_stage.id or index != feed.index:
                raise InvalidQueryError(
                    f"this job does not feed MPC stage {stage_id} as player {index}",
                    details={"stage": stage_id, "player": index},
                )
            if feed.identity is not None:
                raise JobFailedError("the job's MPC player was already prepared")
            logged = self._check_ready(job, approvals, log_position)
            if job.signing_key is None:
                raise JobFailedError("the job's keys were wiped before its player was prepared")
            feed.log = logged  # the player's signed result binds it too
            offer = feed.prepare([(i.spec, i.table) for i in job.inputs.values()], job.signing_key.sign)
            with self._lock:  # the rows are not needed any more: only the partials go on
                self._held -= job.held_bytes
                job.drop_rows()
            body, signature, evidence = self._signed(
                job,
                approvals,
                logged,
                {
                    "feeds": feed.mpc_stage.id,
                    "player": feed.index,
                    "output_columns": [],
                    "released_rows": 0,
                    "result_sha256": None,
                    "suppressed": [],
                    "min_group_size": job.min_group_size,
                },
            )
        except BaseException as exc:
            err = exc if isinstance(exc, SealroomError) else JobFailedError("the enclave could not prepare its player")
            self._fail(job, err)
            self._end(job)
            if err is exc:
                raise
            raise err from exc
        with self._lock:
            job.prepared()  # waits for RunMpc; the reaper ends it after the job's TTL
        log.info("job %s: MPC player %d prepared for stage %s", job.id, index, stage_id)
        return {"offer": offer, "result_json": body, "signature": signature, "evidence": evidence.to_bytes()}

    def run_mpc(
        self,
        job_id: str,
        offers: list[dict[str, Any]],
        *,
        token: bytes,
        timeout_seconds: float,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> tuple[bytes, bytes]:
        """Run the prepared player; the opened result and the job key's signature over it. The job
        ends here, whatever happens."""
        job = self._authorized(job_id, token)
        with self._lock:
            job.run_player()
            key = job.signing_key
        feed = job.feed
        assert feed is not None, "a job is PREPARED only when its MPC player was prepared"

        def sign(message: bytes) -> bytes:
            with self._lock:  # a job that failed or was aborted while its player ran signs nothing
                if job.failed is not None or job.signing_key is None:
                    raise job.failed or JobFailedError("the job ended while its MPC player ran")
                return job.signing_key.sign(message)

        try:
            if key is None:
                raise JobFailedError("the job's keys were wiped before its player ran")
            return feed.run(offers, key.public_key(), sign, timeout_seconds=timeout_seconds, on_cancel=on_cancel)
        except SealroomError as err:
            self._fail(job, err)
            raise
        except Exception as exc:
            failed = JobFailedError("the enclave's MPC player failed; nothing was released")
            self._fail(job, failed)
            raise failed from exc
        finally:
            self._end(job)

    def abort(self, job_id: str, token: bytes) -> None:
        try:
            job = self._authorized(job_id, token)
        except NotFoundError:
            return
        self._fail(job, JobFailedError("the job was aborted"))
        with self._lock:
            self._jobs.pop(job.id, None)
