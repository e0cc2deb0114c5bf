"""Fixtures for adversarial integration tests: real gRPC servers on 127.0.0.1, real cryptography.

The enclave worker runs in this process (``enclave_worker.server.build_server`` on port 0, with a
dev root from ``sealroom.attestation.dev_init``), so tests can look at its registry and capture its
log. Parties are simulated here with their real keys: plans come from the real planner, approvals
are real Ed25519 signatures, evidence is verified with a real appraisal policy, and sealed streams
are built exactly as ``connectors.agent.PartyAgent.contribute`` builds them (``SealingStream``,
``sign_stream_header``, the two binary metadata keys) -- except that a test can tamper with any
frame, header or signature before it goes on the wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from connectors.agent import DatasetConfig, PartyAgent, PartyConfig
from connectors.agent import build_server as build_agent_server
from coordinator.planner import CatalogEntry, plan_query
from enclave_worker.config import EnclaveConfig
from enclave_worker.jobs import Job, JobRegistry
from enclave_worker.server import build_server
from sealroom import pki
from sealroom.attestation import (
    AppraisalPolicy,
    Evidence,
    enclave_measurement,
    load_root_certificate,
    verify_enclave_evidence,
)
from sealroom.errors import SealroomError
from sealroom.keys import generate_signing_key, public_key_hex
from sealroom.planning.plan import Plan
from sealroom.policy import DatasetPolicy, TrustPolicy
from sealroom.rpc import Server, TLSConfig, dial, fetch_server_certificate, unwrap
from sealroom.sealed import SealingStream, StreamContext, integrity_error, schema_hash
from sealroom.signing import LogPosition, sign_approval, sign_stream_header
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc
from tests.harness.pki import as_coordinator, enclave_tls, tls_as

HEADER_METADATA_KEY = "sealroom-stream-header-bin"
SIGNATURE_METADATA_KEY = "sealroom-stream-signature-bin"
UPLOAD_PATH = "/sealroom.v1.EnclaveData/Upload"

# Distinctive values planted in party data: they must never show up in an error or a log line.
SECRET = "SECRET-ROW-VALUE-5e2d9c"
SECRET_NUMBER = 987654.125
INTEGRITY_MESSAGE = integrity_error().message

LOANS_SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string()), ("exposure", pa.float64())])


# --------------------------------------------------------------------------------------------------
# data and parties


def loans_table(rows: Sequence[tuple[int, str, float]]) -> pa.Table:
    return pa.table(
        {
            "customer_id": [r[0] for r in rows],
            "segment": [r[1] for r in rows],
            "exposure": [r[2] for r in rows],
        },
        schema=LOANS_SCHEMA,
    )


def secret_loans(n: int = 40) -> pa.Table:
    """A table whose rows carry SECRET and SECRET_NUMBER (plus ordinary rows)."""
    rows = [(i, SECRET if i % 3 == 0 else f"seg-{i % 4}", SECRET_NUMBER if i % 5 == 0 else float(i)) for i in range(n)]
    return loans_table(rows)


@dataclass
class PartyData:
    """A data owner as the enclave sees it: a name, a signing key and its datasets."""

    name: str
    key: Ed25519PrivateKey
    tables: dict[str, pa.Table]
    policies: dict[str, DatasetPolicy]

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self.key)

    def catalog(self) -> dict[str, CatalogEntry]:
        return {
            f"{self.name}.{ds}": CatalogEntry(self.name, ds, t.schema, self.policies[ds])
            for ds, t in self.tables.items()
        }


def make_party(
    name: str,
    table: pa.Table,
    *,
    dataset: str = "loans",
    policy: DatasetPolicy | None = None,
    key: Ed25519PrivateKey | None = None,
) -> PartyData:
    policy = policy or DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
    return PartyData(name, key or generate_signing_key(), {dataset: table}, {dataset: policy})


def make_plan(
    sql: str,
    parties: Sequence[PartyData],
    *,
    analyst: str = "alice",
    query_id: str | None = None,
    party_keys: dict[str, str] | None = None,
    helper_key: str | None = None,
) -> Plan:
    catalog: dict[str, CatalogEntry] = {}
    for p in parties:
        catalog.update(p.catalog())
    keys = party_keys or {p.name: p.public_key_hex for p in parties}
    plan, _ = plan_query(
        sql,
        query_id=query_id or "q_" + os.urandom(6).hex(),
        analyst=analyst,
        catalog=catalog,
        party_keys=keys,
        helper_key=helper_key,
    )
    return plan


# The log position the harness's approvals sign and its Execute requests carry: the enclave checks
# only that the approvals and the request agree (the owners' agents check the log itself).
HARNESS_LOG = LogPosition(0, 1, hashlib.sha256(b"harness log").digest())


def approval(
    plan: Plan | str, party: PartyData, *, key: Ed25519PrivateKey | None = None, log: LogPosition | None = HARNESS_LOG
) -> enclave_pb2.Approval:
    plan_hash = plan if isinstance(plan, str) else plan.hash
    return enclave_pb2.Approval(
        party=party.name, plan_hash=plan_hash, signature=sign_approval(key or party.key, plan_hash, log)
    )


def approvals(
    plan: Plan, parties: Sequence[PartyData], log: LogPosition | None = HARNESS_LOG
) -> list[enclave_pb2.Approval]:
    return [approval(plan, p, log=log) for p in parties]


# --------------------------------------------------------------------------------------------------
# the enclave


@dataclass
class Rejection:
    """A failed RPC: its gRPC status, and the SealroomError the server meant."""

    status: grpc.StatusCode
    error: SealroomError
    details: str


def rejection(exc: grpc.RpcError) -> Rejection:
    return Rejection(exc.code(), unwrap(exc, peer="enclave"), exc.details() or "")


@dataclass
class SealedStream:
    """One party's stream, ready to send (or to tamper with first)."""

    context: StreamContext
    header: bytes
    signature: bytes
    frames: list[bytes]


@dataclass
class EnclaveHandle:
    """A client of one enclave worker; ``registry`` is set when the worker runs in this process."""

    address: str
    channel: grpc.Channel
    appraisal: AppraisalPolicy
    registry: JobRegistry | None = None
    server: Server | None = None
    certificate: bytes = b""  # the worker's self-made TLS certificate, which its evidence binds
    # A channel as a given party: the enclave takes a stream only from the party it names (docs/wire.md,
    # "Who may call what"). None: every upload goes over ``channel``.
    party_channel: Callable[[str], grpc.Channel] | None = None
    stub: enclave_pb2_grpc.EnclaveStub = field(init=False)
    upload_call: Any = field(init=False)
    party_channels: dict[str, grpc.Channel] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.stub = enclave_pb2_grpc.EnclaveStub(self.channel)
        self.upload_call = self.channel.stream_unary(
            UPLOAD_PATH, request_serializer=None, response_deserializer=enclave_pb2.UploadSummary.FromString
        )

    def create_job(self, plan: Plan | bytes) -> JobHandle:
        plan_json = plan if isinstance(plan, bytes) else plan.to_json()
        resp = self.stub.CreateJob(enclave_pb2.CreateJobRequest(plan_json=plan_json), timeout=10)
        job = JobHandle(
            enclave=self,
            plan_json=plan_json,
            job_id=resp.job_id,
            hpke_public=bytes(resp.hpke_public_key),
            signing_public=bytes(resp.signing_public_key),
            token=bytes(resp.job_token),
        )
        job.attest()
        return job

    def upload_as(self, party: str) -> Any:
        """The raw Upload method over a channel as ``party`` (over ``channel`` without ``party_channel``)."""
        if self.party_channel is None:
            return self.upload_call
        if party not in self.party_channels:
            self.party_channels[party] = self.party_channel(party)
        return self.party_channels[party].stream_unary(
            UPLOAD_PATH, request_serializer=None, response_deserializer=enclave_pb2.UploadSummary.FromString
        )

    def close(self) -> None:
        for channel in [self.channel, *self.party_channels.values()]:
            channel.close()

    def upload(
        self,
        stream: SealedStream | None = None,
        *,
        header: bytes | None = None,
        signature: bytes | None = None,
        frames: Iterable[bytes] | None = None,
        metadata: Sequence[tuple[str, bytes]] | None = None,
        sender: str | None = None,
    ) -> enclave_pb2.UploadSummary:
        """Send a stream through the raw Upload method, as the party agent does: as ``sender`` (by
        default the party the stream's context names, else bank_a)."""
        if sender is None:
            sender = stream.context.party if stream is not None else "bank_a"
        if stream is not None:
            header = stream.header if header is None else header
            signature = stream.signature if signature is None else signature
            frames = stream.frames if frames is None else frames
        if metadata is None:
            metadata = []
            if header is not None:
                metadata.append((HEADER_METADATA_KEY, header))
            if signature is not None:
                metadata.append((SIGNATURE_METADATA_KEY, signature))
        return self.upload_as(sender)(iter(list(frames or [])), metadata=tuple(metadata), timeout=30)

    def upload_rejected(self, stream: SealedStream | None = None, **kw: Any) -> Rejection:
        try:
            self.upload(stream, **kw)
        except grpc.RpcError as exc:
            return rejection(exc)
        raise AssertionError("the enclave accepted a stream it must reject")

    @property
    def held_bytes(self) -> int:
        assert self.registry is not None
        return self.registry.held_bytes

    def job(self, job_id: str) -> Job | None:
        """The registry's job object (None once it is gone)."""
        assert self.registry is not None
        return self.registry.job(job_id)


@dataclass
class JobHandle:
    enclave: EnclaveHandle
    plan_json: bytes
    job_id: str
    hpke_public: bytes
    signing_public: bytes
    token: bytes = b""  # the job's creator's token (Execute, PrepareMpc, RunMpc, AbortJob)
    evidence: Evidence | None = None
    nonce: bytes = b""

    @property
    def plan(self) -> Plan:
        return Plan.from_json(self.plan_json)

    def attest(self) -> Evidence:
        """Fresh nonce, evidence verified under a real appraisal policy (as a party agent does)."""
        self.nonce = os.urandom(32)
        att = self.enclave.stub.Attest(enclave_pb2.AttestRequest(job_id=self.job_id, nonce=self.nonce), timeout=10)
        evidence = Evidence.from_bytes(att.evidence)
        verify_enclave_evidence(
            evidence,
            self.enclave.appraisal,
            hpke_public_key=bytes(att.hpke_public_key),
            signing_public_key=bytes(att.signing_public_key),
            nonce=self.nonce,
            tls_cert=self.enclave.certificate or None,
            claimed_tls_key_sha256=bytes(att.tls_key_sha256),
        )
        assert bytes(att.hpke_public_key) == self.hpke_public
        self.evidence = evidence
        return evidence

    @property
    def evidence_hash(self) -> bytes:
        assert self.evidence is not None
        return self.evidence.digest()

    def seal(
        self,
        party: PartyData,
        dataset: str = "loans",
        *,
        table: pa.Table | None = None,
        columns: Sequence[str] | None = None,
        rows_per_frame: int = 8,
        context: Callable[[StreamContext], StreamContext] | None = None,
        sign_with: Ed25519PrivateKey | None = None,
        hpke_public: bytes | None = None,
        plan: Plan | None = None,
        payloads: Sequence[bytes] | None = None,
    ) -> SealedStream:
        """Seal ``party``'s projection of ``dataset`` for this job, exactly as the party agent does.

        ``context`` may rewrite the stream context (another job, plan hash, evidence...), ``sign_with``
        signs the header with another key, ``hpke_public`` seals to another job key, ``payloads`` seals
        these raw payloads (the last one final) instead of the table's record batches.
        """
        plan = plan or self.plan
        if columns is None:
            (inp,) = [i for i in plan.inputs() if i.party == party.name and i.dataset == dataset]
            columns = inp.columns
        source = party.tables[dataset] if table is None else table
        projected = pa.schema([source.schema.field(c) for c in columns])
        ctx = StreamContext(
            job_id=self.job_id,
            party=party.name,
            dataset=dataset,
            schema_hash=schema_hash(projected),
            plan_hash=bytes.fromhex(plan.hash),
            evidence_hash=self.evidence_hash,
        )
        if context is not None:
            ctx = context(ctx)
        sealer = SealingStream(ctx, projected, X25519PublicKey.from_public_bytes(hpke_public or self.hpke_public))
        header = sealer.header.to_bytes()
        if payloads is not None:
            frames = [sealer.seal(p, final=n == len(payloads) - 1) for n, p in enumerate(payloads)]
        else:
            batches = source.select(list(columns)).to_batches(max_chunksize=rows_per_frame)
            frames = list(sealer.frames(batches))
        return SealedStream(ctx, header, sign_stream_header(sign_with or party.key, header), frames)

    def execute(
        self, approvals: Sequence[enclave_pb2.Approval], log: LogPosition | None = HARNESS_LOG
    ) -> enclave_pb2.ExecuteResponse:
        request = enclave_pb2.ExecuteRequest(job_id=self.job_id, approvals=list(approvals), job_token=self.token)
        if log is not None:
            request.log_position.CopyFrom(log.to_proto())
        return self.enclave.stub.Execute(request, timeout=30)

    def execute_rejected(
        self, approvals: Sequence[enclave_pb2.Approval], log: LogPosition | None = HARNESS_LOG
    ) -> Rejection:
        try:
            self.execute(approvals, log)
        except grpc.RpcError as exc:
            return rejection(exc)
        raise AssertionError("the enclave released a result it must not release")


def trusting(dev_dir: Path, measurement: str) -> AppraisalPolicy:
    """A data owner's appraisal policy that trusts exactly this simulated enclave."""
    return AppraisalPolicy(
        measurements=frozenset({measurement}),
        allow_simulated=True,
        simulated_roots=(load_root_certificate(dev_dir / "dev-root.crt"),),
    )


def start_enclave(dev_dir: Path, **config: Any) -> tuple[EnclaveHandle, Callable[[], None]]:
    """An in-process enclave worker on 127.0.0.1, port 0, over TLS (callers need a certificate of the
    session CA; it makes its own), and a client for it as the coordinator, pinned to its certificate."""
    config.setdefault("tls", enclave_tls())
    cfg = EnclaveConfig(listen="127.0.0.1:0", attester="simulated", dev_root=dev_dir, **config)
    server, registry = build_server(cfg)
    server.start()
    address = f"127.0.0.1:{server.port}"
    # The relying party computes the measurement it pins itself, from the code and configuration.
    measurement = enclave_measurement(cfg.measured())
    handle = connect_enclave(address, trusting(dev_dir, measurement), registry, server, tls=cfg.tls)

    def stop() -> None:
        handle.close()
        server.stop(grace=0.5)

    return handle, stop


def connect_enclave(
    address: str,
    appraisal: AppraisalPolicy,
    registry: JobRegistry | None = None,
    server: Server | None = None,
    *,
    tls: TLSConfig | None = None,
) -> EnclaveHandle:
    """A client of the enclave worker at ``address`` as the coordinator: over TLS pinned to the
    certificate it presents (its evidence must bind it: :meth:`JobHandle.attest`), unless the worker's
    ``tls`` is plaintext."""
    client_tls = TLSConfig.off() if tls is not None and tls.plaintext else as_coordinator()
    certificate = fetch_server_certificate(address, client_tls)
    handle = EnclaveHandle(address, dial(address, client_tls, certificate), appraisal, registry, server, certificate)
    if certificate:  # a party streams as itself: the enclave takes a stream only from the party it names
        handle.party_channel = lambda party: dial(address, tls_as(pki.party(party)), certificate)
    return handle


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def replace_context(**changes: Any) -> Callable[[StreamContext], StreamContext]:
    return lambda ctx: dataclasses.replace(ctx, **changes)


# --------------------------------------------------------------------------------------------------
# a real party agent


@dataclass
class Agent:
    """A running party agent for bank_a (its data in a parquet file) and what the enclave knows of it."""

    agent: PartyAgent
    stub: party_pb2_grpc.PartyAgentStub
    data: PartyData  # bank_a's key, table and policy, for building plans

    def review(self, plan: Plan | bytes) -> party_pb2.ReviewPlanResponse:
        plan_json = plan if isinstance(plan, bytes) else plan.to_json()
        return self.stub.ReviewPlan(party_pb2.ReviewPlanRequest(plan_json=plan_json, query_id="q"), timeout=10)

    def contribute(
        self, plan_json: bytes, job: JobHandle, address: str | None = None, certificate: bytes | None = None
    ) -> party_pb2.ContributeResponse:
        """Ask the agent to stream to ``job`` (at ``address``, presenting ``certificate``: by default
        the enclave's own), as the coordinator does."""
        request = party_pb2.ContributeRequest(
            plan_json=plan_json,
            job_id=job.job_id,
            enclave_address=address or job.enclave.address,
            enclave_tls_certificate=job.enclave.certificate if certificate is None else certificate,
        )
        return self.stub.Contribute(request, timeout=30)

    def contribute_refused(
        self, plan_json: bytes, job: JobHandle, address: str | None = None, certificate: bytes | None = None
    ) -> Rejection:
        try:
            self.contribute(plan_json, job, address, certificate)
        except grpc.RpcError as exc:
            return rejection(exc)
        raise AssertionError("the party agent streamed data it must not stream")


def start_agent(
    directory: Path, trust: TrustPolicy, policy: DatasetPolicy, *, sql_table: pa.Table | None = None
) -> tuple[Agent, Callable[[], None]]:
    """bank_a's PartyAgent serving ``loans`` (60 rows, parquet) under ``trust``, on 127.0.0.1 port 0."""
    directory.mkdir(parents=True, exist_ok=True)
    table = sql_table if sql_table is not None else secret_loans(60)
    path = directory / "bank_a.parquet"
    pq.write_table(table, path)
    key = generate_signing_key()
    config = PartyConfig(
        name="bank_a",
        coordinator="127.0.0.1:9",  # never contacted: these tests drive the agent directly
        signing_key=directory / "unused.key",
        trust=trust,
        datasets=(DatasetConfig("loans", str(path), policy),),
        unsafe_no_witness=True,  # no coordinator, so no log to witness (tests/integration/test_witness.py does)
        tls=tls_as(pki.party("bank_a")),
    )
    agent = PartyAgent(config, signing_key=key)
    server = build_agent_server(agent)
    server.start()
    channel = dial(f"127.0.0.1:{server.port}", as_coordinator(), pki.party("bank_a"))

    def cleanup() -> None:
        channel.close()
        server.stop(grace=0.5)

    data = make_party("bank_a", table, policy=policy, key=key)
    return Agent(agent, party_pb2_grpc.PartyAgentStub(channel), data), cleanup


# --------------------------------------------------------------------------------------------------
# MPC player processes of a running platform


def player_processes(cluster: Any) -> list[str]:
    """The command lines of the MPC player processes anywhere under ``cluster``'s processes."""
    import psutil

    found = []
    for proc in cluster.procs.values():
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "mpc.player" in " ".join(child.cmdline()):
                    found.append(" ".join(child.cmdline()))
    return found


def kill_first_player(pid: int, *, timeout: float) -> bool:
    """Kill the first MPC player process started under process ``pid`` (an agent, the enclave) as soon
    as it appears; False when none appeared within ``timeout`` seconds."""
    import psutil

    parent = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "mpc.player" in " ".join(child.cmdline()):
                    child.kill()
                    return True
        time.sleep(0.005)
    return False
