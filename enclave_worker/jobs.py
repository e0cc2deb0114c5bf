"""Jobs inside the enclave: keys, evidence, sealed inputs, execution, signed results, wiping.

A job lives only in this process's memory. Its X25519 key opens the data keys parties seal to it;
its Ed25519 key signs the result; both are bound into every piece of evidence the job hands out.
A job fails as a whole (nothing released, its data dropped) when any stream fails to authenticate,
a party disconnects mid-stream, the memory limit is exceeded, or it outlives its TTL.

Filter pushdown: a party may filter its own rows before sealing. The job recomputes every input's
filter from the plan's SQL itself (:func:`sealroom.planning.plan.stage_pushdown`), refuses a plan whose
filters differ, and compiles and runs only the residual query. A filtered stream carries the
boolean column :data:`~sealroom.planning.sql.PAD_COLUMN` (and only a filtered one): its padding rows hide
how many rows matched, and are dropped as each frame is opened, before anything reads the input.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclave_worker.attester import Attester
from enclave_worker.config import EnclaveConfig
from enclave_worker.engine import Bounds, compile_for_job, run_stage, table_to_ipc
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
from sealroom.planning.checks import check_analyst, check_no_bounded_filter, strictest_datasets
from sealroom.planning.disclosure import check_uses
from sealroom.planning.plan import Plan, PlanInput, stage_pushdown
from sealroom.planning.sql import PAD_COLUMN, RESERVED_PREFIX, CompiledStage, InputSpec
from sealroom.policy import Dominance
from sealroom.sealed import OpeningStream, StreamHeader, integrity_error
from sealroom.signing import verify_approval, verify_stream_header

log = logging.getLogger(__name__)

RESULT_VERSION = 1


def _cancelled_within(connected: Callable[[], bool], *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while connected():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _disconnected(party: str) -> JobFailedError:
    return JobFailedError(f"{party} disconnected or its stream broke before the end; the job was stopped")


def _raw(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class _Input:
    spec: PlanInput
    table: pa.Table | None = None
    rows: int = 0  # rows received, padding included (what the sender and the network know anyway)
    bytes: int = 0  # plaintext bytes received, padding included
    frames: int = 0
    header_sha256: str = ""
    streaming: bool = False


@dataclass
class Job:
    id: str
    plan: Plan
    plan_hash: str
    compiled: CompiledStage | None  # None for a stage that feeds an MPC stage (``feed``)
    min_group_size: int
    rule_datasets: tuple[str, ...]
    hpke_key: X25519PrivateKey | None
    signing_key: Ed25519PrivateKey | None
    hpke_public: bytes
    signing_public: bytes
    created: float
    inputs: dict[tuple[str, str], _Input]
    issued_evidence: set[bytes] = field(default_factory=set)
    failed: SealroomError | None = None
    held_bytes: int = 0
    done: bool = False
    executing: bool = False
    clamps: dict[str, dict[str, Bounds]] = field(default_factory=dict)  # engine table -> column -> bounds
    dominance: dict[str, Dominance] = field(default_factory=dict)  # party.dataset -> its (n, k) rule
    rules: dict[str, Any] = field(default_factory=dict)  # the rules applied, for the result document
    feed: Any = None  # enclave_worker.mpc_feed.FeedPlayer: this job's player in the MPC stage it feeds
    token: bytes = field(default_factory=lambda: os.urandom(32), repr=False)  # its creator's, for control calls

    def wipe(self) -> None:
        """Drop every reference to the job's data and keys."""
        for inp in self.inputs.values():
            inp.table = None
        if self.feed is not None:
            self.feed.partials = None
            self.feed.cancelled.set()  # a failed or aborted job's player never starts, or stops
            if self.feed.kill is not None:
                self.feed.kill()
        self.hpke_key = None
        self.signing_key = None
        self.held_bytes = 0


class JobRegistry:
    def __init__(self, config: EnclaveConfig, attester: Attester, *, clock: Any = time.time):
        self.config = config
        self.attester = attester
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._held = 0

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return self._held

    def _get(self, job_id: str) -> Job:
        self.reap()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError("no such job in this enclave (it may have finished, failed or expired)")
        return job

    def _fail(self, job: Job, err: SealroomError) -> None:
        with self._lock:
            if job.failed is None and not job.done:
                job.failed = err
                log.warning("job %s failed: %s", job.id, err.code)
            self._held -= job.held_bytes
            job.wipe()

    def reap(self) -> None:
        now = self.clock()
        with self._lock:
            expired = [
                j for j in self._jobs.values() if not j.executing and now - j.created > self.config.job_ttl_seconds
            ]
        for job in expired:
            self._fail(job, JobFailedError("the job expired before it was executed"))
            with self._lock:
                self._jobs.pop(job.id, None)

    # -- job life cycle ----------------------------------------------------------------------

    def create(self, plan_json: bytes) -> Job:
        plan = Plan.from_json(plan_json)
        tee = plan.tee_stages()
        if len(tee) != 1:
            raise InvalidQueryError("this enclave runs plans with exactly one TEE stage")
        stage = tee[0]
        specs = []
        inputs: dict[tuple[str, str], _Input] = {}
        tables = {i.table for i in stage.inputs}
        datasets = {(i.party, i.dataset) for i in stage.inputs}
        if len(tables) != len(stage.inputs) or len(datasets) != len(stage.inputs):
            # Two inputs sharing an engine table would let one owner's rows stand in for another's.
            raise InvalidQueryError("the plan names an input or an engine table twice")
        for inp in stage.inputs:
            check_analyst(plan.analyst, party=inp.party, dataset=inp.dataset, policy=inp.policy)
            unit = inp.policy.privacy_unit
            if unit is not None and unit not in inp.columns:
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
            specs.append(InputSpec(inp.qualified, inp.table, inp.columns, unit))
            inputs[(inp.party, inp.dataset)] = _Input(inp)
        compiled: CompiledStage | None = None
        feed = None
        if stage.feeds is not None:
            # A stage feeding an MPC stage: the enclave computes its inputs' partials over the MPC
            # stage's public domain and joins it as a player. The filters are recomputed for the MPC
            # stage's query; each owner re-checked the stage against its own policy before approving,
            # and the job runs only with every owner's approval.
            from enclave_worker.mpc_feed import FeedPlayer  # only hybrid jobs load mpc/ (never MPyC)

            feed = FeedPlayer.for_stage(plan, stage, host=self.config.mpc_host, scratch=self.config.mpc_scratch_dir)
        else:
            # The filters the parties apply must be exactly those the SQL implies (recomputed here, not
            # taken from the coordinator); the enclave runs the rest of the query, the residual.
            pushed = stage_pushdown(stage)
            # The enclave compiles the stage itself: the aggregate-only check and the hidden unit
            # counts do not depend on anything the coordinator computed.
            compiled = compile_for_job(pushed.residual_sql, specs)
            # ...and re-checks every owner's column rules on the full query, pushed filters included,
            # and on what it compiled (not the planner's word).
            policies = {i.qualified: i.policy for i in stage.inputs}
            names = {
                i.qualified: [*i.columns, *(c for c in i.filter_columns if c not in i.columns)] for i in stage.inputs
            }
            check_uses(pushed.uses, policies, names)
            check_uses(compiled.uses, policies, names)
        k, strictest = strictest_datasets(stage.inputs)
        # Every owner's rules apply to every cell: its bounds to its measure columns, its dominance
        # rule to its privacy units. Both come from the policies the owners signed in the plan.
        clamps: dict[str, dict[str, Bounds]] = {}
        clamped: list[dict[str, Any]] = []
        for inp in stage.inputs:
            for column in inp.columns:
                rule = inp.policy.rule(column)
                if rule.role == "measure" and (rule.min is not None or rule.max is not None):
                    clamps.setdefault(inp.table, {})[column] = (rule.min, rule.max)
                    clamped.append({"dataset": inp.qualified, "column": column, "min": rule.min, "max": rule.max})
            check_no_bounded_filter(inp)
        dominance = {i.qualified: i.policy.dominance for i in stage.inputs if i.policy.dominance is not None}
        rules: dict[str, Any] = {
            "min_group_size": k,
            "dominance": [{"dataset": d, "n": r.n, "k": r.k} for d, r in sorted(dominance.items())],
            "clamped": clamped,
        }
        if feed is not None:
            # What applies is the MPC stage's rule (checked above against every streamed policy),
            # inside the MPC: say that, not the TEE path's rules this job does not run.
            spec = feed.spec
            k = spec.min_group_size
            rules = {
                "min_group_size": k,
                "counted": "distinct privacy units" if spec.threshold_on == "units" else "rows",
                "applied_in": f"MPC stage {feed.mpc_stage.id}",
                "clamped": [{"column": m.column, "min": m.min, "max": m.max} for m in spec.measures],
                "mpc_spec_sha256": hashlib.sha256(canonical_json(spec.to_dict())).hexdigest(),
            }
        hpke_key = X25519PrivateKey.generate()
        signing_key = Ed25519PrivateKey.generate()
        job = Job(
            id=uuid.uuid4().hex,
            plan=plan,
            plan_hash=plan.hash,
            compiled=compiled,
            min_group_size=k,
            rule_datasets=strictest,
            hpke_key=hpke_key,
            signing_key=signing_key,
            hpke_public=_raw(hpke_key.public_key()),
            signing_public=_raw(signing_key.public_key()),
            created=self.clock(),
            inputs=inputs,
            clamps=clamps,
            dominance=dominance,
            rules=rules,
            feed=feed,
        )
        with self._lock:
            self._jobs[job.id] = job
        log.info("job %s created for plan %s (%d inputs)", job.id, job.plan_hash[:12], len(inputs))
        return job

    def attest(self, job_id: str, nonce: bytes) -> tuple[Evidence, Job]:
        """Evidence binding the job's keys and ``nonce``, and the job (whose public keys go with it)."""
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise InvalidQueryError("the nonce must be 16 to 64 random bytes")
        job = self._get(job_id)
        evidence = self.attester.attest(
            report_data=report_data_for(
                hpke_public_key=job.hpke_public, signing_public_key=job.signing_public, nonce=nonce
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
    ) -> tuple[str, _Input]:
        """Open one party's sealed stream; commit its table only when the whole stream verified.

        Any stream that fails authentication fails the whole job (invariant 8): the other parties'
        inputs are dropped with it and nothing is released.
        """
        header = StreamHeader.from_bytes(header_bytes)  # malformed: no job to fail
        ctx = header.context
        job = self._get(ctx.job_id)
        with self._lock:
            if (
                job.failed is not None
                or job.done
                or job.executing
                or (job.feed is not None and job.feed.identity is not None)
            ):
                raise JobFailedError("the job has ended or is executing; nothing more is accepted")
            inp = job.inputs.get((ctx.party, ctx.dataset))
            # Every check that a sender could fail on purpose raises the same IntegrityError.
            try:
                if (
                    inp is None
                    or inp.table is not None
                    or inp.streaming
                    or signature is None
                    or ctx.plan_hash.hex() != job.plan_hash
                    or ctx.evidence_hash not in job.issued_evidence
                    or job.hpke_key is None
                ):
                    raise integrity_error()
                verify_stream_header(job.plan.parties.get(ctx.party, ""), header_bytes, signature)
            except IntegrityError:
                self._fail(job, integrity_error())
                raise integrity_error() from None
            inp.streaming = True
            hpke_key = job.hpke_key
        batches: list[pa.RecordBatch] = []
        received = 0
        rows = 0
        frames_n = 0
        columns = list(inp.spec.columns)
        padded = inp.spec.filter is not None
        try:
            opener = OpeningStream(header, hpke_key)
            # A filtered input carries the padding flag as its last column; any other never does.
            expected = [*columns, PAD_COLUMN] if padded else columns
            if opener.schema.names != expected or (padded and opener.schema.field(PAD_COLUMN).type != pa.bool_()):
                raise integrity_error()
            schema = pa.schema([opener.schema.field(c) for c in columns])
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
                size = batch.nbytes
                with self._lock:
                    if job.failed is not None or job.done:
                        raise job.failed or JobFailedError("the job ended while this stream was in flight")
                    if self._held + size > self.config.memory_limit_bytes:
                        raise ResourceExhaustedError(
                            "the enclave's memory limit was exceeded while loading inputs; "
                            "raise enclave.memory_limit_mb or reduce the data the query needs"
                        )
                    self._held += size
                    job.held_bytes += size
                batches.append(batch)
            try:
                opener.close()
            except IntegrityError:
                # The stream ended without its final frame: a party cut off mid-stream, or a
                # truncated stream. gRPC can end the request iterator of a cancelled call a moment
                # before it reports the call inactive, so give the cancellation that moment.
                if _cancelled_within(connected, seconds=0.5):
                    raise _disconnected(ctx.party) from None
                raise
            table = pa.Table.from_batches(batches, schema=schema)
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
        finally:
            with self._lock:
                inp.streaming = False
        with self._lock:
            if job.failed is not None or job.done:
                raise job.failed or JobFailedError("the job ended while this stream was in flight")
            inp.table = table
            inp.rows = rows
            inp.bytes = received
            inp.frames = frames_n
            inp.header_sha256 = hashlib.sha256(header_bytes).hexdigest()
        log.info("job %s: input %s.%s loaded (%d frames)", job.id, ctx.party, ctx.dataset, frames_n)
        return job.id, inp

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
            if job.executing:
                raise JobFailedError("the job is already executing")
            if any(i.streaming for i in job.inputs.values()):
                err = JobFailedError("the job was asked to run while an input was still streaming; it was stopped")
                self._fail(job, err)
                self._jobs.pop(job.id, None)
                raise err
            job.executing = True
        return job

    def _end(self, job: Job) -> None:
        """The job is over, released or not: its data and keys are dropped."""
        with self._lock:
            self._held -= job.held_bytes
            job.wipe()
            job.done = True
            self._jobs.pop(job.id, None)

    def execute(self, job_id: str, approvals: dict[str, tuple[str, bytes]], token: bytes) -> dict[str, Any]:
        job = self._begin(job_id, token)
        try:
            if job.feed is not None:
                raise InvalidQueryError(
                    f"this job feeds MPC stage {job.feed.mpc_stage.id} and releases nothing itself; its player runs "
                    "with PrepareMpc and RunMpc"
                )
            return self._execute(job, approvals)
        except SealroomError as err:
            self._fail(job, err)
            raise
        finally:
            self._end(job)

    def _check_ready(self, job: Job, approvals: dict[str, tuple[str, bytes]]) -> None:
        """Every owner whose data the plan touches approved exactly this plan, and every input arrived."""
        if job.failed is not None:
            raise job.failed
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
            verify_approval(key_hex, plan_hash, signature, party=party)
        missing = [f"{p}.{d}" for (p, d), i in job.inputs.items() if i.table is None]
        if missing:
            raise JobFailedError(f"inputs missing: {', '.join(missing)} did not arrive", details={"missing": missing})

    def _signed(
        self, job: Job, approvals: dict[str, tuple[str, bytes]], stage: dict[str, Any]
    ) -> tuple[bytes, bytes, Evidence]:
        """The job's result document (``stage``: what the stage produced) with what it read, the rules,
        the approvals it checked and the attestation binding its keys to the plan hash; signed."""
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

    def _execute(self, job: Job, approvals: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
        # 1. Every owner whose data the plan touches approved exactly this plan; 2. every input
        # arrived, sealed to this job, for this plan.
        self._check_ready(job, approvals)
        assert job.compiled is not None
        tables = {i.spec.table: i.table for i in job.inputs.values() if i.table is not None}
        no_unit = frozenset(i.spec.table for i in job.inputs.values() if not i.spec.policy.privacy_unit)
        outcome = run_stage(
            job.compiled,
            tables,
            min_group_size=job.min_group_size,
            rule_datasets=job.rule_datasets,
            row_id_tables=no_unit,
            clamps=job.clamps,
            dominance=job.dominance,
            threads=self.config.engine_threads,
        )
        ipc = table_to_ipc(outcome.released)
        body, signature, evidence = self._signed(
            job,
            approvals,
            {
                "output_columns": list(job.compiled.output_columns),
                "released_rows": outcome.released.num_rows,
                "result_sha256": hashlib.sha256(ipc).hexdigest(),
                "suppressed": outcome.suppressed,
                "min_group_size": outcome.min_group_size,
            },
        )
        log.info(
            "job %s executed: %d cells released, %d suppressed",
            job.id,
            outcome.released.num_rows,
            len(outcome.suppressed),
        )
        return {"result_json": body, "signature": signature, "arrow_table": ipc, "evidence": evidence.to_bytes()}

    # -- the enclave as an MPC player (a stage that feeds an MPC stage) ------------------------

    def prepare_mpc(
        self, job_id: str, stage_id: str, index: int, approvals: dict[str, tuple[str, bytes]], token: bytes
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
            self._check_ready(job, approvals)
            if job.signing_key is None:
                raise JobFailedError("the job's keys were wiped before its player was prepared")
            offer = feed.prepare([(i.spec, i.table) for i in job.inputs.values()], job.signing_key.sign)
            with self._lock:  # the rows are not needed any more: only the partials go on
                self._held -= job.held_bytes
                job.held_bytes = 0
                for inp in job.inputs.values():
                    inp.table = None
            body, signature, evidence = self._signed(
                job,
                approvals,
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
            job.executing = False  # waits for RunMpc; the reaper ends it after the job's TTL
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
            if job.feed is None or job.feed.identity is None or job.failed is not None:
                raise JobFailedError("the job has no prepared MPC player (PrepareMpc comes first)")
            if job.executing:
                raise JobFailedError("the job's MPC player is already running")
            job.executing = True
            key = job.signing_key
        feed = job.feed

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
