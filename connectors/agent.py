"""The party agent: a data owner's long-running process.

It registers its datasets with the coordinator (schema and policy digest only), reviews each plan
that touches its data against its own policy and signs the plan hash, and, for a plan it signed
itself, verifies the enclave's evidence against its own trust policy and streams only the columns
the plan needs, sealed to the enclave's attested job key. Its rows leave it only that way
(invariant 1); its signing key never leaves it.

Filter pushdown: when the plan gives one of its inputs a filter, the agent checks that the filter is
exactly the one :func:`sealroom.plan.stage_pushdown` derives from the plan's SQL (so the
coordinator cannot slip in a predicate of its own), applies it itself with a locked-down DuckDB over
the streamed batches, and sends only the matching rows, padded so that the stream's size does not
tell how many matched (see :func:`padded_batches`).

Manual approval: when any of its datasets in a plan has ``approval = "manual"``, the agent runs every
policy check and then holds the plan for its owner (``pending``) instead of signing it. The owner
decides with ``sealroom approve/reject/revoke`` -- commands signed with the party's own key, so nobody
else who can reach the agent (the coordinator included) can decide for the owner. Every approval,
manual or automatic, lapses after ``approval_ttl_seconds``; the agent streams only for a plan whose
approval it holds, live, itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from connectors.sources import FilterPushdown, Source, check_schema, filter_batches, open_source, resolve_spec
from connectors.witness import LogWitness
from sealroom.attestation import Claims, Evidence, report_data_for, verify_evidence
from sealroom.config import Table, file_table
from sealroom.disclosure import check_uses
from sealroom.errors import (
    ApprovalError,
    AuditError,
    ConfigError,
    InvalidQueryError,
    NotFoundError,
    PolicyRefusalError,
    ResourceExhaustedError,
    SealroomError,
    UnavailableError,
)
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.plan import (
    OWNER_MESSAGE_MAX_SKEW_MS,
    Plan,
    PlanInput,
    Stage,
    check_issued_at,
    mpc_player_keys,
    mpc_stage_query,
    sign_approval,
    sign_owner_action,
    sign_stream_header,
    stage_pushdown,
    verify_owner_command,
)
from sealroom.policy import DatasetPolicy, TrustPolicy, load_policy_file
from sealroom.rpc import Server, call, create_server, open_channel, translate_errors, unwrap
from sealroom.sealed import SealingStream, StreamContext, schema_hash
from sealroom.sqlplan import PAD_COLUMN, UNION_UNIT
from sealroom.tlog import NoteVerifier
from sealroom.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    enclave_pb2,
    enclave_pb2_grpc,
    party_pb2,
    party_pb2_grpc,
)

log = logging.getLogger(__name__)

HEADER_METADATA_KEY = "sealroom-stream-header-bin"
SIGNATURE_METADATA_KEY = "sealroom-stream-signature-bin"
UPLOAD_PATH = "/sealroom.v1.EnclaveData/Upload"
TARGET_FRAME_BYTES = 2 * 1024 * 1024
# At most this many plans wait for the owner at once (ReviewPlan is open to anyone who can reach the
# agent, so the list must not grow without bound); further manual plans are refused until some go.
MAX_PENDING = 1000
# Plans whose approval lapsed, was revoked or rejected, remembered to say so (bounded, oldest first).
MAX_REMEMBERED = 4096
COORDINATOR_CALL_TIMEOUT = 30.0
# Stream counters (GetProgress) are kept for this many recent jobs.
MAX_PROGRESS_JOBS = 64


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    source: str
    policy: DatasetPolicy
    description: str = ""


@dataclass(frozen=True)
class PartyConfig:
    name: str
    coordinator: str
    signing_key: Path
    trust: TrustPolicy
    datasets: tuple[DatasetConfig, ...]
    listen: str = "127.0.0.1:0"
    advertise_host: str = "127.0.0.1"
    approval_ttl_seconds: float = 3600.0
    pending_ttl_seconds: float = 86400.0
    mpc_host: str = "127.0.0.1"  # where this owner's MPC players listen (the other players connect)
    # The agent witnesses the coordinator's transparency log before it approves (connectors/witness.py).
    # state_dir: where it keeps what it co-signed (None: "<name>-state" next to the signing key);
    # log_key: the log's verifier key, pinned (None: trusted on first use, then kept in state_dir).
    state_dir: Path | None = None
    log_key: NoteVerifier | None = None
    # Approve without witnessing: tests and benchmarks without a coordinator only (logged as a warning).
    unsafe_no_witness: bool = False

    @property
    def witness_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.signing_key.parent / f"{self.name}-state"

    @classmethod
    def from_table(cls, root: Table) -> PartyConfig:
        root.check_keys({"party", "trust", "dataset"})
        p = root.table("party")
        p.check_keys(
            {
                "name",
                "listen",
                "coordinator",
                "signing_key",
                "advertise_host",
                "approval_ttl_seconds",
                "pending_ttl_seconds",
                "mpc_host",
                "state_dir",
                "log_key",
                "unsafe_no_witness",
            }
        )
        name = p.str("name")
        if not name.isidentifier():
            raise ConfigError(
                f"{root.source}: party.name must be an identifier (letters, digits, _), e.g. bank_a",
                details={"file": root.source, "key": "party.name"},
            )
        t = root.table("trust", required=False)
        trust = TrustPolicy.from_dict(t.doc, source=root.source, base=root.base)
        datasets: list[DatasetConfig] = []
        for d in root.tables("dataset"):
            d.check_keys({"name", "source", "policy", "description"})
            policy_value = d.doc.get("policy")
            if isinstance(policy_value, str):
                policy = load_policy_file(d.path("policy"))
            elif isinstance(policy_value, dict):
                policy = DatasetPolicy.from_dict(policy_value, source=root.source, prefix=f"{d.prefix}policy.")
            else:
                policy = DatasetPolicy()
            dname = d.str("name")
            if not dname.isidentifier():
                raise ConfigError(
                    f"{root.source}: {d.prefix}name must be an identifier (letters, digits, _), e.g. loans",
                    details={"file": root.source, "key": f"{d.prefix}name"},
                )
            if any(x.name == dname for x in datasets):
                raise ConfigError(
                    f"{root.source}: dataset {dname} is defined twice",
                    details={"file": root.source, "key": f"{d.prefix}name"},
                )
            # A relative file path (sqlite:///b.db, x.duckdb?table=t included) is relative to the file.
            source = resolve_spec(d.str("source"), root.base)
            description = d.doc.get("description", "")
            if not isinstance(description, str):
                raise ConfigError(
                    f"{root.source}: {d.prefix}description must be a string",
                    details={"file": root.source, "key": f"{d.prefix}description"},
                )
            datasets.append(DatasetConfig(dname, source, policy, description))
        if not datasets:
            raise ConfigError(
                f"{root.source}: no [[dataset]] tables; a party agent serves at least one dataset",
                details={"file": root.source, "key": "dataset"},
            )
        return cls(
            name=name,
            coordinator=p.str("coordinator"),
            signing_key=p.path("signing_key"),
            trust=trust,
            datasets=tuple(datasets),
            listen=p.str("listen", "127.0.0.1:0"),
            advertise_host=p.str("advertise_host", "127.0.0.1"),
            approval_ttl_seconds=p.float("approval_ttl_seconds", 3600.0, minimum=1.0),
            pending_ttl_seconds=p.float("pending_ttl_seconds", 86400.0, minimum=1.0),
            mpc_host=p.str("mpc_host", "127.0.0.1"),
            state_dir=p.opt_path("state_dir"),
            log_key=_log_key(p),
            unsafe_no_witness=p.bool("unsafe_no_witness", False),
        )

    @classmethod
    def load(cls, path: Path) -> PartyConfig:
        return cls.from_table(file_table(path))


def _log_key(p: Table) -> NoteVerifier | None:
    """``[party] log_key``: the coordinator's log verifier key ``NAME+KEYID+KEY``, or the path of a
    file holding one (e.g. a copy of the coordinator's published ``log.vkey``)."""
    value = p.opt_str("log_key")
    if value is None:
        return None
    where = {"file": p.source, "key": f"{p.prefix}log_key"}
    try:
        return NoteVerifier.from_vkey(value)
    except ValueError:
        pass  # a file that holds one
    try:
        text = p.path("log_key").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(
            f"{p.source}: {p.prefix}log_key is neither a verifier key NAME+KEYID+KEY nor a readable file",
            details=where,
        ) from None
    try:
        return NoteVerifier.from_vkey(text)
    except ValueError as exc:
        raise ConfigError(f"{p.source}: {p.prefix}log_key is not a verifier key: {exc}", details=where) from None


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

    def _check_plan(self, plan: Plan) -> list[PlanInput]:
        """Every policy check of a plan; return this party's inputs. Raises the refusal."""
        me = self.config.name
        mine = [i for i in plan.inputs() if i.party == me]
        if not mine:
            raise ApprovalError(f"the plan reads no data of {me}; nothing to approve", details={"party": me})
        if plan.parties.get(me) != self.public_key_hex:
            raise ApprovalError(
                f"the plan names a signing key for {me} that is not this agent's key",
                details={"party": me, "check": "party_key"},
            )
        for inp in mine:
            policy = self.policies.get(inp.dataset)
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
            if not policy.allows_analyst(plan.analyst):
                raise PolicyRefusalError(
                    f"{me}.{inp.dataset} may not be queried by analyst {plan.analyst}; ask {me} to add the "
                    "analyst to the dataset's policy",
                    details={**where, "rule": "analysts"},
                )
            schema = self.schemas[inp.dataset]
            for col in (*inp.columns, *inp.filter_columns):
                if col not in schema.names:
                    raise PolicyRefusalError(
                        f"{me}.{inp.dataset} has no column {col}", details={**where, "column": col}
                    )
            if policy.privacy_unit and policy.privacy_unit not in inp.columns:
                raise PolicyRefusalError(
                    f"the plan does not carry the privacy unit of {me}.{inp.dataset}, so the enclave could "
                    "not enforce the minimum group size",
                    details={**where, "column": policy.privacy_unit, "rule": "privacy_unit"},
                )
        for stage in plan.stages:
            if stage.min_group_size < max(i.policy.min_group_size for i in stage.inputs):
                raise PolicyRefusalError(
                    "the plan's minimum group size is weaker than an involved owner's policy",
                    details={"party": me, "rule": "min_group_size"},
                )
            if stage.kind == "mpc" or stage.feeds is not None:
                if any(i.party == me for i in stage.inputs):
                    self._check_mpc_stage(plan, stage)
            elif any(i.party == me for i in stage.inputs):
                # The filter this agent will run on its rows must be the one the SQL it signs implies,
                # and so must every other party's: otherwise the plan would not compute that SQL.
                stage_pushdown(stage)
        return mine

    def _check_mpc_stage(self, plan: Plan, stage: Stage) -> None:  # noqa: C901 - one check per rule, in order
        """Re-check an MPC stage this party's data goes to (directly, or through the TEE stage feeding
        it) against this owner's own policies: it computes what the plan's SQL implies (filters,
        aggregates, group columns, release), k is at least each of its datasets' min_group_size and
        counts its privacy units, the measures' bounds lie inside its declared bounds, its columns are
        used only as their roles allow, the group domain is exactly what the involved policies
        declare, its datasets go to an enclave only where its policy allows and otherwise are held by
        its own player only, and the players and holders agree with the spec. Raises the refusal."""
        from mpc.bounds import stage_consistency_violation, stage_rule_violation
        from mpc.spec import StageSpec

        me = self.config.name
        q = mpc_stage_query(plan, stage)
        if stage.feeds is not None:
            stage = next(s for s in plan.stages if s.id == stage.feeds)
        assert stage.mpc is not None and stage.holders is not None and stage.release is not None
        spec = StageSpec.from_dict(stage.mpc)
        feeding = [s for s in plan.stages if s.feeds == stage.id]
        every = [*stage.inputs, *(i for s in feeding for i in s.inputs)]
        mine = [i for i in every if i.party == me]

        def refuse(message: str, rule: str, **details: Any) -> PolicyRefusalError:
            return PolicyRefusalError(message, details={"party": me, "stage": stage.id, "rule": rule, **details})

        # What the stage computes is what the SQL this owner signs implies, over the domain the
        # involved policies (carried in the plan, digests checked) declare. COUNT(col) may run as
        # COUNT(*) only where col can hold no NULL (checked here for this party's own datasets; the
        # planner checked every registered schema).
        def count_star(col: str) -> bool:
            return not any(
                self.schemas[i.dataset].field(col).nullable for i in mine if col in self.schemas[i.dataset].names
            )

        violation = stage_consistency_violation(stage, spec, q, every, count_star=count_star)
        if violation is not None:
            raise refuse(violation[0], violation[1], **violation[2])
        for inp in mine:
            violation = stage_rule_violation(
                spec,
                self.policies[inp.dataset],
                dataset=f"{me}.{inp.dataset}",
                columns=self.schemas[inp.dataset].names,
                unit_column=UNION_UNIT,
            )
            if violation is not None:
                message, rule, details = violation
                raise refuse(message, rule, dataset=inp.dataset, **details)
        check_uses(
            {i.qualified: q.uses.get(i.qualified, {}) for i in mine},
            {i.qualified: self.policies[i.dataset] for i in mine},
            {i.qualified: self.schemas[i.dataset].names for i in mine},
        )
        # Who holds what: this party's MPC-side datasets only by its own player, its TEE-side ones only
        # where its policy accepts an enclave; helpers hold nothing.
        if set(stage.holders) != {str(n) for n in range(len(spec.players))}:
            raise refuse("the MPC stage's holders do not name exactly its players", "players")
        coordinator_key = self.witness.log_key if self.witness is not None else None
        if self.witness is not None and coordinator_key is None and any(not p.holds_input for p in spec.players):
            raise refuse(
                "the MPC stage has a helper player run by the coordinator, and this agent does not know the "
                "coordinator's log key yet to check the helper's identity (it learns it at registration, or pin it "
                "with [party] log_key)",
                "players",
            )
        for n, player in enumerate(spec.players):
            holder = stage.holders[str(n)]
            if player.holds_input == ("helper" in holder):
                raise refuse(f"the MPC stage's player {n} ({player.name}) and its holders disagree", "players")
            if "party" in holder and holder["party"] != player.name:
                raise refuse(
                    f"the MPC stage's player {n} ({player.name}) would hold {holder['party']}'s input", "players"
                )
            # A helper's identity is the coordinator's key (the log key this agent witnesses): a helper
            # under any other key could be someone else's second player.
            if "helper" in holder and (
                holder["helper"] != player.name
                or (coordinator_key is not None and holder.get("key") != coordinator_key.public_key.hex())
            ):
                raise refuse(
                    f"the MPC stage's helper player {n} is not named with the coordinator's key", "players", player=n
                )
        try:
            mpc_player_keys(plan, stage)
        except InvalidQueryError as err:
            raise refuse(err.message, "players") from None
        held = {(h["party"], d) for h in stage.holders.values() if "party" in h for d in h.get("datasets", ())}
        fed = {h["stage"] for h in stage.holders.values() if "stage" in h}
        for inp in stage.inputs:
            if (inp.party, inp.dataset) not in held:
                raise refuse(f"no player of its owner holds {inp.qualified} in the MPC stage", "players")
        if held != {(i.party, i.dataset) for i in stage.inputs} or fed != {s.id for s in feeding}:
            raise refuse("the MPC stage's holders do not match its inputs", "players")
        for s in feeding:
            for inp in s.inputs:
                if inp.party == me and self.policies[inp.dataset].trust.mpc_only:
                    raise refuse(
                        f"{me}.{inp.dataset} goes to no enclave (trust.mpc_only in its policy), and the plan streams "
                        "it to the enclave",
                        "mpc_only",
                        dataset=inp.dataset,
                    )

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
        mine = [i for s in plan.stages if s.kind == "tee" for i in s.inputs if i.party == me]
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
                    batches = _rebatch(source.batches(list(inp.columns)), TARGET_FRAME_BYTES)
                else:
                    batches = padded_batches(filtered_batches(source, registered, inp), projected)
                counter = StreamCounter(
                    inp.dataset, rows_shared=self.policies[inp.dataset].share_row_count, padded=inp.filter is not None
                )
                with self._lock:
                    self._streams.setdefault(job_id, []).append(counter)
                failed: list[SealroomError] = []
                frames = counter.count_frames(_until_failure(sealer.frames(counter.count_rows(batches)), failed))
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


class StreamCounter:
    """How far one dataset's sealed stream has got, for progress displays (``GetProgress``).

    Counts sealed bytes and frames (what the network sees anyway) and the rows sealed, padding rows
    included; rows are reported only when the owner shares the dataset's row count, and then
    rounded to two significant digits, as at registration. Never a value.
    """

    def __init__(self, dataset: str, *, rows_shared: bool, padded: bool = False):
        self.dataset = dataset
        self.rows_shared = rows_shared
        # A filtered stream is padded so that its size does not tell how many rows passed the filter;
        # counts taken while it streams would show real frames from padding ones by their rate and
        # size, so it reports nothing until it has ended.
        self.padded = padded
        self.rows = self.bytes = self.frames = 0
        self.done = False

    def count_rows(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.rows += batch.num_rows
            yield batch

    def count_frames(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            self.bytes += len(frame)
            self.frames += 1
            yield frame

    def reported_rows(self) -> int:
        return int(float(f"{self.rows:.2g}")) if self.rows_shared and self.rows else 0

    def to_proto(self) -> party_pb2.StreamProgress:
        hidden = self.padded and not self.done
        return party_pb2.StreamProgress(
            dataset=self.dataset,
            bytes=0 if hidden else self.bytes,
            frames=0 if hidden else self.frames,
            rows_shared=self.rows_shared,
            rows=0 if hidden else self.reported_rows(),
            done=self.done,
        )


def _until_failure(frames: Iterator[bytes], failed: list[SealroomError]) -> Iterator[bytes]:
    """``frames``, until reading the source (or filtering it) fails: the error is kept in ``failed``
    for the agent to report, and the stream ends without its final frame, so the enclave refuses it
    and fails the job (nothing is released)."""
    try:
        yield from frames
    except SealroomError as err:
        failed.append(err)


def _rebatch(batches: Iterator[pa.RecordBatch], target_bytes: int) -> Iterator[pa.RecordBatch]:
    """Slice batches so each sealed frame holds about ``target_bytes`` (1-4 MiB moves fastest)."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        per_row = max(1, batch.nbytes // batch.num_rows)
        step = max(1, target_bytes // per_row)
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


# -- filter pushdown and padding ---------------------------------------------------------------

# Padding (see padded_batches): a filtered stream carries at least this many rows, a power of two.
MIN_PADDED_ROWS = 65_536
MAX_FRAME_ROWS = 65_536
MIN_FRAME_ROWS = 64
# Bytes assumed per variable-width value when sizing frames; also each padded frame's minimum
# filler per variable-width column and row.
VAR_BYTES_PER_ROW = 32


def filtered_batches(source: Source, registered: pa.Schema, inp: PlanInput) -> Iterator[pa.RecordBatch]:
    """The rows of ``inp``'s dataset that satisfy its filter, projected to ``inp.columns`` (in that
    order, with the source's exact Arrow types), streamed batch by batch. WHERE semantics (NULL drops
    the row), as in the enclave.

    A source that filters in its own engine (:class:`~connectors.sources.FilterPushdown`: the SQL
    sources) receives the projection and the filter, its literals as bound parameters, and applies
    itself whatever its engine cannot evaluate exactly as DuckDB does. For any other source only
    ``columns`` and ``filter_columns`` are read, and :func:`~connectors.sources.filter_batches`
    applies the filter here with a locked-down DuckDB.
    """
    assert inp.filter is not None
    if isinstance(source, FilterPushdown):
        return source.filtered_batches(inp.columns, inp.filter, schema=registered)
    wanted = set(inp.columns) | set(inp.filter_columns)
    read = [c for c in registered.names if c in wanted]
    return filter_batches(source.batches(read), inp.filter, inp.filter_columns, inp.columns, dataset=inp.qualified)


def _is_var_width(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
    )


def _row_width(t: pa.DataType) -> float:
    """Bytes one value takes in a frame, estimated from the type alone (never from the data)."""
    if _is_var_width(t):
        offset = 8 if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else 4
        return offset + VAR_BYTES_PER_ROW + 0.125
    try:
        return t.bit_width / 8 + 0.125
    except ValueError:
        return 64.0  # nested and other types


def frame_rows(schema: pa.Schema, target_bytes: int = TARGET_FRAME_BYTES) -> int:
    """Rows per frame of a padded stream: a power of two (64 to 65,536) that depends on the schema
    only, chosen so that a frame holds about ``target_bytes``."""
    width = sum(_row_width(f.type) for f in schema)
    rows = MAX_FRAME_ROWS
    while rows > MIN_FRAME_ROWS and rows * width > target_bytes:
        rows //= 2
    return rows


def _var_bytes(column: pa.Array) -> int:
    if len(column) == 0:
        return 0
    total = pc.sum(pc.binary_length(column)).as_py()
    return int(total or 0)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _filler(t: pa.DataType, rows: int, total: int) -> pa.Array:
    """``rows`` padding values of a variable-width type holding ``total`` bytes: the first NULL (so
    a padded frame always carries a validity bitmap), the others share the bytes."""
    if rows <= 1:
        return pa.nulls(rows, t)
    k = rows - 1
    q, r = divmod(max(0, total), k)
    unit: str | bytes = "\0" if pa.types.is_string(t) or pa.types.is_large_string(t) else b"\0"
    values: list[Any] = [None] + [unit * (q + 1)] * r + [unit * q] * (k - r)
    return pa.array(values, t)


def _pad_frame(tail: pa.RecordBatch, schema: pa.Schema, rows: int, var_target: dict[str, int]) -> pa.RecordBatch:
    """``tail`` (real rows, fewer than ``rows``) completed with padding rows to ``rows`` rows."""
    p = tail.num_rows
    m = rows - p
    arrays = []
    for f in schema:
        if f.name == PAD_COLUMN:
            arrays.append(pa.concat_arrays([pa.repeat(False, p), pa.repeat(True, m)]))
            continue
        real = tail.column(f.name)
        if _is_var_width(f.type):
            pad = _filler(f.type, m, var_target[f.name] - _var_bytes(real))
        else:
            pad = pa.nulls(m, f.type)
        arrays.append(pa.concat_arrays([real, pad]))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def padded_batches(
    real: Iterator[pa.RecordBatch], schema: pa.Schema, *, target_bytes: int = TARGET_FRAME_BYTES
) -> Iterator[pa.RecordBatch]:
    """A filtered stream, cut into frames and padded so that its size does not tell how many rows
    matched.

    ``real`` are the matching rows (the columns of ``schema`` but :data:`PAD_COLUMN`); ``schema`` is
    the sealed schema, whose last column is :data:`PAD_COLUMN` (False for real rows, True for
    padding rows, which the enclave drops before anything reads its input).

    Why: a filtered stream's frame count and sizes, seen by the network and by the enclave's host,
    would otherwise count the matching rows, and could reveal a small count that the minimum group
    size exists to hide.

    The scheme: every frame holds ``F = frame_rows(schema)`` rows (a power of two that depends on
    the schema only); real rows are cut into frames of F rows (sooner if a frame reaches
    ``target_bytes``). Once ``n`` real rows have been read, the last real rows are completed with
    padding rows to F rows, and padding frames follow, until the stream holds
    ``max(65,536, next power of two >= n)`` rows. Padding rows are NULL in every column except that
    the variable-width (string, binary) ones carry filler bytes, so that every padded frame holds
    the same number of bytes in each such column: ``max(F * 32, next power of two >= the bytes of
    the real rows in that frame)``.

    What is hidden: for fewer than F matching rows (F is 2 MiB worth of rows, e.g. 32,768 rows of an
    integer, a string and a float) whose variable-width values hold under 32 bytes a row on average,
    the stream is the same whatever the count, 0 included: the same number of frames of the same
    sizes. Above that, the row count shows only to its power of two (the frame count), except that
    frames holding only real rows can be told apart from padded frames by their sizes: the count
    then shows to within F rows, and variable-width bytes to within a power of two. Nested types are
    padded with NULLs only.

    The cost: a filtered input always sends at least 65,536 rows of its projected columns (about
    ``65,536 x row width`` bytes, e.g. 3.4 MB for those three columns), and up to about twice its
    matching rows above that, in bandwidth, sealing time and the enclave's receive time (padding
    rows are dropped as each frame is opened, so the enclave does not hold them). Filter pushdown
    still sends no row that fails the filter and no column only the filter reads. Padding to the
    unfiltered row count instead would hide the count entirely, but would cost as much as sending
    every row; an unfiltered input is not padded (its size shows its row count, as it always has).
    """
    f_rows = frame_rows(schema, target_bytes)
    data_schema = pa.schema([f for f in schema if f.name != PAD_COLUMN])
    pending: list[pa.RecordBatch] = []
    rows = size = sent = 0

    def real_frame() -> pa.RecordBatch:
        batch = pa.concat_batches(pending) if len(pending) > 1 else pending[0]
        return pa.RecordBatch.from_arrays([*batch.columns, pa.repeat(False, batch.num_rows)], schema=schema)

    for batch in _rebatch(real, target_bytes):
        per_row = max(1, batch.nbytes // batch.num_rows)
        start = 0
        while start < batch.num_rows:
            room = max(1, (target_bytes - size) // per_row)
            take = min(f_rows - rows, batch.num_rows - start, room)
            piece = batch.slice(start, take)
            pending.append(piece)
            rows += take
            size += piece.nbytes
            start += take
            if rows >= f_rows or take == room:
                yield real_frame()
                sent += rows
                pending, rows, size = [], 0, 0
    total = sent + rows
    target_rows = max(MIN_PADDED_ROWS, _next_pow2(total))
    empty = pa.RecordBatch.from_pylist([], schema=data_schema)
    tail = (pa.concat_batches(pending) if len(pending) > 1 else pending[0]) if rows else empty
    var_target = {
        f.name: max(f_rows * VAR_BYTES_PER_ROW, _next_pow2(_var_bytes(tail.column(f.name))))
        for f in data_schema
        if _is_var_width(f.type)
    }
    if rows:
        yield _pad_frame(tail, schema, f_rows, var_target)
        sent += f_rows
    filler: pa.RecordBatch | None = None
    while sent < target_rows:
        if filler is None:
            filler = _pad_frame(empty, schema, f_rows, var_target)
        yield filler
        sent += f_rows


@translate_errors
class PartyServicer(party_pb2_grpc.PartyAgentServicer):
    def __init__(self, agent: PartyAgent):
        self.agent = agent

    def ReviewPlan(self, request, context):  # noqa: N802
        try:
            plan_hash, signature, expires_at = self.agent.review(request.plan_json)
        except SealroomError as err:
            return party_pb2.ReviewPlanResponse(approved=False, error_json=err.to_json().encode())
        if signature is None:
            return party_pb2.ReviewPlanResponse(approved=False, pending=True, plan_hash=plan_hash)
        return party_pb2.ReviewPlanResponse(
            approved=True, plan_hash=plan_hash, signature=signature, expires_at=expires_at
        )

    def Contribute(self, request, context):  # noqa: N802
        out = self.agent.contribute(request.plan_json, request.job_id, request.enclave_address)
        return party_pb2.ContributeResponse(
            uploads=out["uploads"], claims_json=json.dumps(out["claims"].to_json_dict()).encode()
        )

    def GetProgress(self, request, context):  # noqa: N802
        return party_pb2.ProgressResponse(streams=[c.to_proto() for c in self.agent.progress(request.job_id)])

    def PrepareMpc(self, request, context):  # noqa: N802
        return self.agent.mpc_players.prepare(request.plan_json, request.stage_id, request.index)

    def RunMpc(self, request, context):  # noqa: N802
        # A cancelled call (the coordinator ends the stage: another player failed) stops the player.
        return self.agent.mpc_players.run(request, on_cancel=context.add_callback)

    def GetInfo(self, request, context):  # noqa: N802
        return common_pb2.PartyInfo(
            name=self.agent.config.name, signing_public_key=bytes.fromhex(self.agent.public_key_hex)
        )

    def ListPending(self, request, context):  # noqa: N802
        return party_pb2.ListPendingResponse(
            plans=[
                party_pb2.PendingPlan(
                    query_id=p["query_id"],
                    plan_hash=p["plan_hash"],
                    analyst=p["analyst"],
                    sql=p["sql"],
                    inputs=[party_pb2.PendingInput(dataset=i["dataset"], columns=i["columns"]) for i in p["inputs"]],
                    state=p["state"],
                    received_at=p["received_at"],
                    expires_at=p["expires_at"],
                    parties=p["parties"],
                    min_group_size=p["min_group_size"],
                )
                for p in self.agent.pending()
            ]
        )

    def Approve(self, request, context):  # noqa: N802
        return party_pb2.OwnerCommandResponse(**self.agent.approve(request))

    def Reject(self, request, context):  # noqa: N802
        return party_pb2.OwnerCommandResponse(**self.agent.reject(request))

    def Revoke(self, request, context):  # noqa: N802
        return party_pb2.OwnerCommandResponse(**self.agent.revoke(request))


def build_server(agent: PartyAgent) -> Server:
    server = create_server(agent.config.listen)
    party_pb2_grpc.add_PartyAgentServicer_to_server(PartyServicer(agent), server.grpc)
    return server


def serve(config: PartyConfig, *, port_file: str | None = None) -> None:
    agent = PartyAgent(config)
    server = build_server(agent)
    server.start()
    address = f"{config.advertise_host}:{server.port}"
    log.info("party agent %s listening on port %d", config.name, server.port)
    agent.register(address)
    if port_file:
        Path(port_file).write_text(str(server.port))
    server.serve_until_signalled()
