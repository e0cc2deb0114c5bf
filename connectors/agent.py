"""The party agent: a data owner's long-running process.

It registers its datasets with the coordinator (schema and policy digest only), reviews each plan
that touches its data against its own policy and signs the plan hash, and, for a plan it signed
itself, verifies the enclave's evidence against its own trust policy and streams only the columns
the plan needs, sealed to the enclave's attested job key. Its rows leave it only that way
(invariant 1); its signing key never leaves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from connectors.sources import Source, check_schema, open_source
from sealroom.attestation import Claims, Evidence, report_data_for, verify_evidence
from sealroom.config import Table, file_table
from sealroom.errors import (
    ApprovalError,
    ConfigError,
    PolicyRefusalError,
    SealroomError,
    UnavailableError,
)
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.plan import Plan, sign_approval, sign_stream_header
from sealroom.policy import DatasetPolicy, TrustPolicy, load_policy_file
from sealroom.rpc import Server, call, create_server, open_channel, translate_errors, unwrap
from sealroom.sealed import SealingStream, StreamContext, schema_hash
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

    @classmethod
    def from_table(cls, root: Table) -> PartyConfig:
        root.check_keys({"party", "trust", "dataset"})
        p = root.table("party")
        p.check_keys({"name", "listen", "coordinator", "signing_key", "advertise_host"})
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
            source = d.str("source")
            if "://" not in source:
                path = Path(source).expanduser()
                source = str(path if path.is_absolute() else root.base / path)
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
        )

    @classmethod
    def load(cls, path: Path) -> PartyConfig:
        return cls.from_table(file_table(path))


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
        self._approved: dict[str, Plan] = {}
        self._lock = threading.Lock()
        self.appraisal = config.trust.appraisal()

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

    def register(self, address: str, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        request = self.registration(address)
        with open_channel(self.config.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                try:
                    call("coordinator", stub.RegisterParty, request, timeout=10)
                    log.info("registered %d datasets with the coordinator", len(request.datasets))
                    return
                except UnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    # -- review ------------------------------------------------------------------------------

    def review(self, plan_json: bytes) -> tuple[str, bytes]:
        """Check a plan against this owner's policies; return (plan_hash, signature)."""
        plan = Plan.from_json(plan_json)
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
            for col in inp.columns:
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
        plan_hash = plan.hash
        signature = sign_approval(self.key, plan_hash)
        with self._lock:
            self._approved[plan_hash] = plan
        log.info("approved plan %s for query %s", plan_hash[:12], plan.query_id)
        return plan_hash, signature

    # -- contribution ------------------------------------------------------------------------

    def contribute(self, plan_json: bytes, job_id: str, enclave_address: str) -> dict[str, Any]:
        plan_hash = hashlib.sha256(plan_json).hexdigest()
        with self._lock:
            plan = self._approved.get(plan_hash)
        if plan is None or plan.to_json() != plan_json:
            raise ApprovalError(
                f"{self.config.name} did not approve this plan; it streams data only for plans it signed",
                details={"party": self.config.name, "check": "own_approval"},
            )
        mine = [i for i in plan.inputs() if i.party == self.config.name]
        with open_channel(enclave_address) as channel:
            enclave = enclave_pb2_grpc.EnclaveStub(channel)
            nonce = os.urandom(32)
            att = call("enclave", enclave.Attest, enclave_pb2.AttestRequest(job_id=job_id, nonce=nonce))
            evidence = Evidence.from_bytes(att.evidence)
            claims = self.verify_enclave(evidence, bytes(att.hpke_public_key), bytes(att.signing_public_key), nonce)
            job_key = X25519PublicKey.from_public_bytes(bytes(att.hpke_public_key))
            upload = channel.stream_unary(
                UPLOAD_PATH,
                request_serializer=None,
                response_deserializer=enclave_pb2.UploadSummary.FromString,
            )
            uploads = []
            for inp in mine:
                source = self.sources[inp.dataset]
                registered = self.schemas[inp.dataset]
                check_schema(source, registered)
                projected = pa.schema([registered.field(c) for c in inp.columns])
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
                frames = sealer.frames(_rebatch(source.batches(list(inp.columns)), TARGET_FRAME_BYTES))
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
                    raise unwrap(exc, peer="enclave") from None
                uploads.append(
                    # Row counts stay with the owner; the coordinator learns what it sees anyway.
                    party_pb2.DatasetUpload(dataset=inp.dataset, bytes=summary.bytes, frames=summary.frames)
                )
                log.info(
                    "streamed %s to job %s (%d frames)%s",
                    inp.dataset,
                    job_id,
                    summary.frames,
                    " under SIMULATED attestation" if claims.simulated else "",
                )
        return {"uploads": uploads, "claims": claims}

    def verify_enclave(self, evidence: Evidence, hpke_pk: bytes, signing_pk: bytes, nonce: bytes) -> Claims:
        return verify_evidence(
            evidence,
            policy=self.appraisal,
            expected_report_data=report_data_for(hpke_public_key=hpke_pk, signing_public_key=signing_pk, nonce=nonce),
            expected_nonce=nonce,
        )


def _rebatch(batches: Iterator[pa.RecordBatch], target_bytes: int) -> Iterator[pa.RecordBatch]:
    """Slice batches so each sealed frame holds about ``target_bytes`` (1-4 MiB moves fastest)."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        per_row = max(1, batch.nbytes // batch.num_rows)
        step = max(1, target_bytes // per_row)
        for start in range(0, batch.num_rows, step):
            yield batch.slice(start, step)


@translate_errors
class PartyServicer(party_pb2_grpc.PartyAgentServicer):
    def __init__(self, agent: PartyAgent):
        self.agent = agent

    def ReviewPlan(self, request, context):  # noqa: N802
        try:
            plan_hash, signature = self.agent.review(request.plan_json)
        except SealroomError as err:
            return party_pb2.ReviewPlanResponse(approved=False, error_json=err.to_json().encode())
        return party_pb2.ReviewPlanResponse(approved=True, plan_hash=plan_hash, signature=signature)

    def Contribute(self, request, context):  # noqa: N802
        out = self.agent.contribute(request.plan_json, request.job_id, request.enclave_address)
        return party_pb2.ContributeResponse(
            uploads=out["uploads"], claims_json=json.dumps(out["claims"].to_json_dict()).encode()
        )

    def GetInfo(self, request, context):  # noqa: N802
        return common_pb2.PartyInfo(
            name=self.agent.config.name, signing_public_key=bytes.fromhex(self.agent.public_key_hex)
        )


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
