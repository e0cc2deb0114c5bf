"""The ways the ingest benchmark moves its table: a sender process, a receiver process and one timed
transfer per run (the sealed path through a real party agent and enclave worker, Flight with and
without TLS, and the diagnostic paths)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from common import Processes, log
from ingest_data import DATASET, MALLOC_ENV, PARTY, RECEIVER_MODS, SENDER_MODS, SQL, split_path

from coordinator.planner import CatalogEntry, plan_query
from sealroom import pki
from sealroom.keys import generate_signing_key, public_key_hex, save_signing_key
from sealroom.policy import DatasetPolicy
from sealroom.rpc import TLSConfig, call, dial, fetch_server_certificate, wait_healthy_channel
from sealroom.v1 import common_pb2, enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

# The worker processes' script (ingest_workers.py ROLE ...).
WORKER_SCRIPT = str(Path(__file__).resolve().parent / "ingest_workers.py")


@dataclass(frozen=True)
class Setup:
    """What every route needs from one benchmark run: where to put files, the processes, the data
    file and its table, and the run's options."""

    tmp: Path
    procs: Processes
    ipc_path: Path
    schema: pa.Schema
    table_bytes: int
    frame_bytes: int  # 0: connectors.agent.TARGET_FRAME_BYTES
    dev_root: Path | None = None  # the SIMULATED dev root (the sealed paths)
    tls: tuple[Path, Path] | None = None  # certificate and key (flight-tls)


class Route:
    """One way to move the table: a sender process, a receiver process, and one timed run."""

    name: str
    receiver: str
    sender_pid: int
    receiver_pid: int

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Close client-side resources (the processes are stopped by :class:`Processes`)."""


class SealedRoute(Route):
    receiver = "enclave worker"

    def __init__(self, bench: Setup, name: str):
        self.name = name
        self.bench = bench
        base, mods = split_path(name)
        env = MALLOC_ENV if "malloc" in mods else None
        patched = "+".join(sorted(mods - {"malloc"}))
        tmp, procs, tag = bench.tmp, bench.procs, name.replace("+", "-")
        assert bench.dev_root is not None, "the sealed paths need the dev root"
        # TLS on both links, as the platform runs: a development CA beside the dev root.
        dev_tls = pki.DevPKI(bench.dev_root / "tls")
        for identity in (pki.coordinator(), pki.party(PARTY)):
            dev_tls.issue(identity)
        cfg = tmp / f"{tag}-enclave.toml"
        cfg.write_text(
            f'[enclave]\nlisten = "127.0.0.1:0"\nattester = "simulated"\ndev_root = "{bench.dev_root}"\n'
            f"memory_limit_mb = {max(2048, 3 * bench.table_bytes // 2**20)}\n"
            f'[tls]\nca = "{dev_tls.ca_cert}"\n'
        )
        port_file = tmp / f"{tag}-enclave.port"
        if mods & RECEIVER_MODS:
            argv = [sys.executable, WORKER_SCRIPT, "_enclave", "--mods", patched]
            log(f"{name}: starting an enclave worker patched for the diagnostic ({patched})")
        else:
            argv = [sys.executable, "-m", "sealroom.cli", "--log-level", "warning", "enclave", "serve"]
            log(f"{name}: starting the enclave worker (sealroom enclave serve, simulated attestation)")
        proc = procs.spawn(f"{tag}-enclave", [*argv, "--config", str(cfg), "--port-file", str(port_file)], env=env)
        self.receiver_pid = proc.pid
        self.enclave_address = f"127.0.0.1:{procs.wait_port(f'{tag}-enclave', port_file)}"
        as_coordinator = TLSConfig(
            ca=dev_tls.ca_cert, cert=dev_tls.cert(pki.coordinator()), key=dev_tls.key(pki.coordinator())
        )
        self.enclave_certificate = fetch_server_certificate(self.enclave_address, as_coordinator)
        self.channels: list[grpc.Channel] = [dial(self.enclave_address, as_coordinator, self.enclave_certificate)]
        wait_healthy_channel(self.channels[0], self.enclave_address)
        self.enclave = enclave_pb2_grpc.EnclaveStub(self.channels[0])
        # The party pins the measurement this worker reports (what `sealroom enclave measure` prints
        # for the code on disk when it started); it still verifies the evidence against it.
        measurement = call("enclave", self.enclave.GetInfo, common_pb2.Empty()).measurement

        key = generate_signing_key()
        save_signing_key(key, tmp / f"{tag}-party.key")
        self.party_key_hex = public_key_hex(key)
        party_cfg = tmp / f"{tag}-party.toml"
        party_cfg.write_text(
            f'[party]\nname = "{PARTY}"\ncoordinator = "127.0.0.1:1"\nsigning_key = "{tmp / f"{tag}-party.key"}"\n'
            "unsafe_no_witness = true\n"  # no coordinator here, so no transparency log to witness
            f'[trust]\nallow_simulated = true\ndev_root = "{bench.dev_root / "dev-root.crt"}"\n'
            f'measurements = ["{measurement}"]\n'
            f'[[dataset]]\nname = "{DATASET}"\nsource = "{bench.ipc_path}"\n'
            f'[dataset.policy]\nprivacy_unit = "id"\nmin_group_size = 5\n'
            f'[tls]\nca = "{dev_tls.ca_cert}"\ncert = "{dev_tls.cert(pki.party(PARTY))}"\n'
            f'key = "{dev_tls.key(pki.party(PARTY))}"\n'
        )
        port_file = tmp / f"{tag}-party.port"
        log(f"{name}: starting the party agent (connectors.agent.PartyAgent behind its gRPC server)")
        argv = [sys.executable, WORKER_SCRIPT, "_party", "--config", str(party_cfg), "--port-file", str(port_file)]
        if bench.frame_bytes:
            argv += ["--frame-bytes", str(bench.frame_bytes)]
        if mods & SENDER_MODS:
            argv += ["--mods", patched]
        proc = procs.spawn(f"{tag}-party", argv, env=env)
        self.sender_pid = proc.pid
        party_address = f"127.0.0.1:{procs.wait_port(f'{tag}-party', port_file)}"
        self.channels.append(dial(party_address, as_coordinator, pki.party(PARTY)))
        wait_healthy_channel(self.channels[1], party_address)
        self.party = party_pb2_grpc.PartyAgentStub(self.channels[1])
        self.queries = 0

    def run(self) -> dict[str, Any]:
        self.queries += 1
        entry = CatalogEntry(PARTY, DATASET, self.bench.schema, DatasetPolicy(privacy_unit="id"))
        plan, _ = plan_query(
            SQL,
            query_id=f"bench-{self.queries}",
            analyst="bench",
            catalog={entry.qualified: entry},
            party_keys={PARTY: self.party_key_hex},
        )
        plan_json = plan.to_json()
        job = call("enclave", self.enclave.CreateJob, enclave_pb2.CreateJobRequest(plan_json=plan_json))
        try:
            review = call("party", self.party.ReviewPlan, party_pb2.ReviewPlanRequest(plan_json=plan_json))
            if not review.approved:
                raise RuntimeError(f"the party agent refused the plan: {review.error_json.decode()}")
            request = party_pb2.ContributeRequest(
                plan_json=plan_json,
                job_id=job.job_id,
                enclave_address=self.enclave_address,
                enclave_tls_certificate=self.enclave_certificate,
            )
            t0 = time.perf_counter()
            out = call("party", self.party.Contribute, request, timeout=3600)
            seconds = time.perf_counter() - t0
        finally:
            call("enclave", self.enclave.AbortJob, enclave_pb2.JobRef(job_id=job.job_id, job_token=job.job_token))
        (upload,) = out.uploads
        # The party agent reports bytes and frames the enclave holds (row counts stay with the owner).
        return {"seconds": seconds, "bytes": upload.bytes, "frames": upload.frames}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class LineRoute(Route):
    """A server process and a client process that runs one transfer per ``put`` line on its stdin."""

    def __init__(
        self,
        bench: Setup,
        name: str,
        server: list[str],
        client: list[str],
        scheme: str,
        receiver: str,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.receiver = receiver
        procs = bench.procs
        tag = name.replace("+", "-")
        port_file = bench.tmp / f"{tag}.port"
        log(f"{name}: starting the server and the client")
        self.receiver_pid = procs.spawn(f"{tag}-server", [*server, "--port-file", str(port_file)], env=env).pid
        port = procs.wait_port(f"{tag}-server", port_file)
        location = f"{scheme}127.0.0.1:{port}"
        self.client = procs.spawn(f"{tag}-client", [*client, "--location", location], pipe=True, env=env)
        self.tag = tag
        self.sender_pid = self.client.pid
        self.procs = procs

    def run(self) -> dict[str, Any]:
        proc = self.client
        assert proc.stdin is not None and proc.stdout is not None
        t0 = time.perf_counter()
        proc.stdin.write(b"put\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        seconds = time.perf_counter() - t0
        if not line:
            raise RuntimeError(f"{self.name} client stopped:\n{self.procs.tail(self.tag + '-client')}")
        reply = json.loads(line)
        return {"seconds": seconds, "rows": reply["rows"], "bytes": reply["bytes"], "sender_seconds": reply["seconds"]}


def make_route(bench: Setup, name: str) -> Route:
    py, script, ipc_file = sys.executable, WORKER_SCRIPT, str(bench.ipc_path)
    base, mods = split_path(name)
    if base == "sealed":
        return SealedRoute(bench, name)
    env = MALLOC_ENV if "malloc" in mods else None
    extra = ["--mods", "+".join(sorted(mods - {"malloc"}))] if mods - {"malloc"} else []
    if bench.frame_bytes:
        extra += ["--frame-bytes", str(bench.frame_bytes)]
    if base == "grpc-raw":
        server, client = [py, script, "_raw-server"], [py, script, "_raw-client", "--ipc", ipc_file, *extra]
        return LineRoute(bench, name, server, client, "", "raw gRPC server", env)
    if base == "sealed-flight":
        server = [py, script, "_sflight-server", *extra]
        client = [py, script, "_sflight-client", "--ipc", ipc_file, *extra]
        return LineRoute(bench, name, server, client, "grpc://", "flight server (sealed frames)", env)
    server = [py, script, "_flight-server"]
    client = [py, script, "_flight-client", "--ipc", ipc_file]
    scheme = "grpc://"
    if base == "flight-tls":
        assert bench.tls is not None, "flight-tls needs its certificate"
        cert, key = bench.tls
        server += ["--tls-cert", str(cert), "--tls-key", str(key)]
        client += ["--tls-root", str(cert)]
        scheme = "grpc+tls://"
    return LineRoute(bench, name, server, client, scheme, "flight server", env)
