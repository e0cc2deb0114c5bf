"""One enclave job and its life cycle: one state field, every transition guarded.

A job is single-use, like pyca's ``finalize``: it receives its inputs, is executed (or prepares and
runs its MPC player) once, and ends done or failed. Each transition is a method that raises when the
job is in a state it may not leave that way, with the error callers have always seen; the registry
(:class:`enclave_worker.jobs.JobRegistry`) calls them under its lock.

    RECEIVING --begin--> EXECUTING --prepared--> PREPARED --run_player--> RUNNING_MPC
        any live state --fail--> FAILED (terminal: the error says why; an abort is a failure)
        any live state --end---> DONE   (terminal; a failed job stays FAILED)

Each input has its own state: WAITING for its party's stream, STREAMING while one is opened,
LOADED once the whole stream verified.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclave_worker.engine import Bounds
from sealroom.errors import JobFailedError, SealroomError
from sealroom.planning.plan import Plan, PlanInput
from sealroom.planning.privacy import DpMechanism
from sealroom.planning.sql import CompiledStage
from sealroom.policy import Dominance

if TYPE_CHECKING:
    # Only for the annotation: a TEE-only job never loads mpc/ (enclave_worker.jobs imports it lazily
    # for hybrid jobs, and a test checks what a running worker has loaded).
    from enclave_worker.mpc_feed import FeedPlayer

__all__ = ["InputState", "Job", "JobInput", "JobState"]


class JobState(enum.Enum):
    RECEIVING = "receiving"  # created: hands out evidence and accepts the parties' streams
    EXECUTING = "executing"  # Execute or PrepareMpc holds the job
    PREPARED = "prepared"  # its MPC player is prepared and waits for RunMpc
    RUNNING_MPC = "running_mpc"  # its MPC player runs
    DONE = "done"  # ended: released (or prepared and ran), data and keys dropped
    FAILED = "failed"  # failed or aborted: nothing released, data and keys dropped


class InputState(enum.Enum):
    WAITING = "waiting"
    STREAMING = "streaming"
    LOADED = "loaded"


_LIVE = frozenset({JobState.RECEIVING, JobState.EXECUTING, JobState.PREPARED, JobState.RUNNING_MPC})
_HELD_BY_A_CALL = frozenset({JobState.EXECUTING, JobState.RUNNING_MPC})


@dataclass
class JobInput:
    """One party's input to the job: what the plan says it is, and what arrived."""

    spec: PlanInput
    table: pa.Table | None = None
    rows: int = 0  # rows received, padding included (what the sender and the network know anyway)
    bytes: int = 0  # plaintext bytes received, padding included
    frames: int = 0
    header_sha256: str = ""
    state: InputState = InputState.WAITING


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
    inputs: dict[tuple[str, str], JobInput]
    issued_evidence: set[bytes] = field(default_factory=set)
    held_bytes: int = 0
    clamps: dict[str, dict[str, Bounds]] = field(default_factory=dict)  # engine table -> column -> bounds
    dominance: dict[str, Dominance] = field(default_factory=dict)  # party.dataset -> its (n, k) rule
    rules: dict[str, object] = field(default_factory=dict)  # the rules applied, for the result document
    feed: FeedPlayer | None = None  # this job's player in the MPC stage it feeds (hybrid plans)
    dp: DpMechanism | None = None  # released with differential privacy (enclave_worker.dp) when set
    residual_sql: str = ""  # what the enclave runs of the stage's SQL (the parties apply the pushed filters)
    token: bytes = field(default_factory=lambda: os.urandom(32), repr=False)  # its creator's, for control calls
    state: JobState = JobState.RECEIVING
    error: SealroomError | None = None  # why it failed (set with FAILED)

    @property
    def failed(self) -> SealroomError | None:
        """Why the job failed or was aborted; None while it has not."""
        return self.error if self.state is JobState.FAILED else None

    @property
    def streaming(self) -> bool:
        """A party's stream is being opened (a job is never run meanwhile)."""
        return any(i.state is InputState.STREAMING for i in self.inputs.values())

    @property
    def held_by_a_call(self) -> bool:
        """Execute, PrepareMpc or RunMpc holds the job (the reaper leaves it alone)."""
        return self.state in _HELD_BY_A_CALL

    # -- transitions -------------------------------------------------------------------------

    def check_receiving(self) -> None:
        """A stream may start only while the job receives its inputs."""
        if self.state is not JobState.RECEIVING:
            raise JobFailedError("the job has ended or is executing; nothing more is accepted")

    def check_alive(self) -> None:
        """An in-flight stream goes on only while the job has neither failed nor ended."""
        if self.state is JobState.FAILED:
            raise self._error()
        if self.state is JobState.DONE:
            raise JobFailedError("the job ended while this stream was in flight")

    def begin(self) -> None:
        """Execute or PrepareMpc takes the job: RECEIVING or PREPARED -> EXECUTING. A failed job stays
        FAILED: the call goes on to report why it failed (its readiness check raises the failure)."""
        if self.state in _HELD_BY_A_CALL or self.state is JobState.DONE:
            raise JobFailedError("the job is already executing")
        if self.state is not JobState.FAILED:
            self.state = JobState.EXECUTING

    def prepared(self) -> None:
        """PrepareMpc prepared the job's player: EXECUTING -> PREPARED (it waits for RunMpc; the
        reaper ends it after the job's TTL). A job aborted meanwhile stays FAILED."""
        if self.state is JobState.FAILED:
            return
        if self.state is not JobState.EXECUTING:
            raise JobFailedError("the job's MPC player was prepared outside PrepareMpc")
        self.state = JobState.PREPARED

    def run_player(self) -> None:
        """RunMpc takes the job: PREPARED -> RUNNING_MPC."""
        if self.state is JobState.RUNNING_MPC:
            raise JobFailedError("the job's MPC player is already running")
        if self.state is not JobState.PREPARED:
            raise JobFailedError("the job has no prepared MPC player (PrepareMpc comes first)")
        self.state = JobState.RUNNING_MPC

    def fail(self, err: SealroomError) -> bool:
        """A live job -> FAILED with ``err``; True if this call failed it (an ended job stays as it is)."""
        if self.state not in _LIVE:
            return False
        self.state = JobState.FAILED
        self.error = err
        return True

    def end(self) -> None:
        """The job is over: -> DONE, unless it failed."""
        if self.state is not JobState.FAILED:
            self.state = JobState.DONE

    def raise_if_failed(self) -> None:
        if self.state is JobState.FAILED:
            raise self._error()

    def _error(self) -> SealroomError:
        assert self.error is not None, "a job is FAILED only through fail(), which sets its error"
        return self.error

    # -- data --------------------------------------------------------------------------------

    def drop_rows(self) -> None:
        """Drop every input's rows (their size is the registry's to release)."""
        for inp in self.inputs.values():
            inp.table = None
        self.held_bytes = 0

    def wipe(self) -> None:
        """Drop every reference to the job's data and keys."""
        self.drop_rows()
        if self.feed is not None:
            self.feed.stop()  # a failed or aborted job's player never starts, or stops
        self.hpke_key = None
        self.signing_key = None
