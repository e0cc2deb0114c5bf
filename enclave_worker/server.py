"""gRPC edge of the enclave worker: thin servicers over :mod:`enclave_worker.jobs`."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from enclave_worker.attester import make_attester
from enclave_worker.config import EnclaveConfig
from enclave_worker.jobs import JobRegistry
from enclave_worker.tls import make_identity
from sealroom import __version__
from sealroom.callers import method_path, require_party_of
from sealroom.rpc import Server, caller_identity, create_server, raw_stream_handler, translate_errors
from sealroom.sealed import StreamHeader, integrity_error
from sealroom.signing import LogPosition
from sealroom.v1 import common_pb2, enclave_pb2, enclave_pb2_grpc, party_pb2
from sealroom.wire import DATA_SERVICE, HEADER_METADATA_KEY, SIGNATURE_METADATA_KEY, UPLOAD_METHOD, UPLOAD_PATH

log = logging.getLogger(__name__)

ATTEST_PATH = method_path(enclave_pb2.DESCRIPTOR.services_by_name["Enclave"].full_name, "Attest")


def loaded_packages() -> list[str]:
    return sorted({name.split(".")[0] for name in list(sys.modules) if not name.startswith("_")})


@translate_errors
class EnclaveServicer(enclave_pb2_grpc.EnclaveServicer):
    def __init__(self, registry: JobRegistry):
        self.registry = registry

    def GetInfo(  # noqa: N802
        self, request: common_pb2.Empty, context: grpc.ServicerContext
    ) -> enclave_pb2.EnclaveInfo:
        attester = self.registry.attester
        return enclave_pb2.EnclaveInfo(
            measurement=attester.measurement,
            attestation_format=attester.format,
            simulated=attester.simulated,
            loaded_packages=loaded_packages(),
            version=__version__,
            memory_limit_bytes=self.registry.config.memory_limit_bytes,
        )

    def CreateJob(  # noqa: N802
        self, request: enclave_pb2.CreateJobRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.CreateJobResponse:
        job = self.registry.create(request.plan_json)
        return enclave_pb2.CreateJobResponse(
            job_id=job.id, hpke_public_key=job.hpke_public, signing_public_key=job.signing_public, job_token=job.token
        )

    def Attest(  # noqa: N802
        self, request: enclave_pb2.AttestRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.AttestResponse:
        # The coordinator, or a party whose input the job awaits (sealroom.callers: JOB_MEMBER).
        caller = caller_identity(context)
        if caller is None or caller.role != "coordinator":
            require_party_of(ATTEST_PATH, caller, _job_parties(self.registry, request.job_id))
        evidence, job = self.registry.attest(request.job_id, request.nonce)
        return enclave_pb2.AttestResponse(
            evidence=evidence.to_bytes(),
            hpke_public_key=job.hpke_public,
            signing_public_key=job.signing_public,
            tls_key_sha256=self.registry.tls_key_sha256 or b"",
        )

    def Execute(  # noqa: N802
        self, request: enclave_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.ExecuteResponse:
        approvals = {a.party: (a.plan_hash, bytes(a.signature)) for a in request.approvals}
        logged = LogPosition.from_proto(request.log_position) if request.HasField("log_position") else None
        # A caller that goes away (cancel, deadline) interrupts the stage's DuckDB query.
        out = self.registry.execute(
            request.job_id, approvals, bytes(request.job_token), logged, on_cancel=context.add_callback
        )
        return enclave_pb2.ExecuteResponse(**out)

    def PrepareMpc(  # noqa: N802
        self, request: enclave_pb2.EnclavePrepareMpcRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.EnclavePrepareMpcResponse:
        approvals = {a.party: (a.plan_hash, bytes(a.signature)) for a in request.approvals}
        logged = LogPosition.from_proto(request.log_position) if request.HasField("log_position") else None
        out = self.registry.prepare_mpc(
            request.job_id, request.stage_id, request.index, approvals, bytes(request.job_token), logged
        )
        return enclave_pb2.EnclavePrepareMpcResponse(
            offer=party_pb2.MpcOffer(**out["offer"]),
            result_json=out["result_json"],
            signature=out["signature"],
            evidence=out["evidence"],
        )

    def RunMpc(  # noqa: N802
        self, request: enclave_pb2.EnclaveRunMpcRequest, context: grpc.ServicerContext
    ) -> party_pb2.MpcOutcome:
        offers = [
            {"index": o.index, "offer_json": o.offer_json, "host": o.host, "port": o.port} for o in request.offers
        ]
        result_json, signature = self.registry.run_mpc(
            request.job_id,
            offers,
            token=bytes(request.job_token),
            timeout_seconds=float(request.timeout_seconds),
            on_cancel=context.add_callback,  # a cancelled call stops the player at once
        )
        return party_pb2.MpcOutcome(result_json=result_json, signature=signature)

    def AbortJob(  # noqa: N802
        self, request: enclave_pb2.JobRef, context: grpc.ServicerContext
    ) -> common_pb2.Empty:
        self.registry.abort(request.job_id, bytes(request.job_token))
        return common_pb2.Empty()


def _job_parties(registry: JobRegistry, job_id: str) -> set[str]:
    """The parties whose inputs the job awaits (none for an unknown job)."""
    job = registry.job(job_id)
    return {party for party, _ in job.inputs} if job is not None else set()


def _upload(registry: JobRegistry) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
    def handle(frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        header = metadata.get(HEADER_METADATA_KEY)
        signature = metadata.get(SIGNATURE_METADATA_KEY)
        if not isinstance(header, bytes):
            raise integrity_error()
        # The caller streams only its own input to a job that awaits it (sealroom.callers: PARTY_OF_JOB),
        # checked before a frame is read: another party's stream is refused and fails no job.
        ctx = StreamHeader.from_bytes(header).context
        require_party_of(UPLOAD_PATH, caller_identity(context), _job_parties(registry, ctx.job_id) & {ctx.party})
        job_id, inp = registry.upload(
            header, signature if isinstance(signature, bytes) else None, frames, connected=context.is_active
        )
        return enclave_pb2.UploadSummary(
            job_id=job_id,
            party=inp.spec.party,
            dataset=inp.spec.dataset,
            frames=inp.frames,
            rows=inp.rows,
            bytes=inp.bytes,
        ).SerializeToString()

    return handle


def build_server(config: EnclaveConfig) -> tuple[Server, JobRegistry]:
    attester = make_attester(config)
    try:
        registry = JobRegistry(config, attester)
        tls = config.tls
        if not tls.plaintext:
            # Its own key, made now; every Attest binds it. Callers need a certificate of the CA.
            identity = make_identity()
            tls = tls.with_identity(identity.cert_pem, identity.key_pem)
            registry.tls_key_sha256 = identity.key_sha256
        server = create_server(
            config.listen,
            tls=tls,
            require_client_auth=True,
            handlers=(raw_stream_handler(DATA_SERVICE, UPLOAD_METHOD, _upload(registry)),),
        )
        enclave_pb2_grpc.add_EnclaveServicer_to_server(EnclaveServicer(registry), server.grpc)
    except BaseException:
        attester.close()  # its configfs-tsm entry or NSM descriptor does not outlive a failed start
        raise
    return server, registry


def serve(config: EnclaveConfig, *, ready: threading.Event | None = None, port_file: str | None = None) -> None:
    server, registry = build_server(config)
    server.start()
    log.info(
        "enclave worker listening on port %d (attester %s, measurement %s)",
        server.port,
        registry.attester.format,
        registry.attester.measurement[:16],
    )
    if port_file:
        Path(port_file).write_text(str(server.port))
    if ready is not None:
        ready.set()
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(5.0):
            registry.reap()

    threading.Thread(target=reaper, name="job-reaper", daemon=True).start()
    try:
        server.serve_until_signalled(on_stop=stop.set)
    finally:
        registry.attester.close()
