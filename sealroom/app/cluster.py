"""Start the whole platform on this machine: enclave worker, coordinator and one party agent per
organisation, each a real gRPC server on 127.0.0.1 in its own process.

Used by ``sealroom demo``, ``sealroom local`` and the end-to-end tests. Everything lives under one
state directory: the dev attestation root, a development CA and the TLS certificates it issued
(``tls/``: every link is TLS, docs/wire.md), the parties' signing keys, generated config files (an
operator's templates, see docs/operations.md), the coordinator's SQLite state and each process's log.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.service import enrol_party
from enclave_worker.config import EnclaveConfig
from sealroom import pki
from sealroom.app.client import Client
from sealroom.attestation import dev_init, enclave_measurement
from sealroom.audit.ropa import Collaboration
from sealroom.auth import generate_token, token_hash
from sealroom.config import toml_table
from sealroom.errors import ConfigError, UnavailableError
from sealroom.keys import generate_signing_key, save_signing_key
from sealroom.planning.limits import QueryLimits
from sealroom.policy import DatasetPolicy
from sealroom.rpc import Peer, TLSConfig, dial, fetch_server_certificate, wait_healthy_channel
from sealroom.spawn import python_command


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str
    policy: DatasetPolicy = field(default_factory=DatasetPolicy)
    description: str = ""


@dataclass(frozen=True)
class PartySpec:
    name: str
    datasets: tuple[DatasetSpec, ...]
    approval_ttl_seconds: float | None = None  # [party] approval_ttl_seconds (None: the agent's default)


class Cluster:
    """The platform's processes under one state directory. Use as a context manager."""

    def __init__(
        self,
        state_dir: Path,
        parties: Sequence[PartySpec],
        *,
        log: Callable[[str], None] = lambda msg: None,
        memory_limit_mb: int = 4096,
        party_timeout_seconds: float = 600.0,
        approval_timeout_seconds: float | None = None,
        analysts: Sequence[str] = ("analyst",),
        env: dict[str, str] | None = None,
        collaboration: Collaboration | None = None,
        mpc_scratch_dir: Path | None = None,
        coordinator_settings: dict[str, Any] | None = None,
        limits: QueryLimits | None = None,
        tls: bool = True,
        route: Callable[[str, str], str] | None = None,
    ):
        self.state_dir = Path(state_dir).resolve()
        self.parties = list(parties)
        self.log = log
        self.memory_limit_mb = memory_limit_mb
        self.party_timeout_seconds = party_timeout_seconds
        self.approval_timeout_seconds = approval_timeout_seconds
        self.analysts = tuple(analysts)
        self.env = env
        self.collaboration = collaboration  # the coordinator's [collaboration] (record of processing)
        self.mpc_scratch_dir = mpc_scratch_dir  # the enclave's [enclave] mpc_scratch_dir (None: its default)
        self.coordinator_settings = dict(coordinator_settings or {})  # more [coordinator] keys
        self.limits = limits  # the coordinator's [limits] (None: the defaults)
        # TLS on every link (a development CA under <state_dir>/tls); False: [tls] plaintext = true.
        self.tls = tls
        # ``route(link, address) -> address``: the address a component dials on ``link`` instead of
        # ``address`` (e.g. a recording relay, tests/harness/relay.py). Links: ``coordinator->enclave``
        # (the coordinator hands the same address to the agents, so agent->enclave goes there too),
        # ``party-<name>->coordinator``, and ``coordinator->party-<name>`` (the agent's advertised
        # address: it must keep the agent's port, e.g. 127.0.0.2:<port>). TLS checks names, not
        # addresses, so a rerouted link still works. None: every link direct.
        self.route = route
        self.pki = pki.DevPKI(self.state_dir / "tls")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._args: dict[str, list[str]] = {}
        self.addresses: dict[str, str] = {}
        self.measurement = ""

    # -- configuration -----------------------------------------------------------------------

    def _paths(self) -> dict[str, Path]:
        s = self.state_dir
        return {"dev": s / "dev", "keys": s / "keys", "config": s / "config", "logs": s / "logs", "run": s / "run"}

    def prepare(self) -> None:
        p = self._paths()
        for d in p.values():
            d.mkdir(parents=True, exist_ok=True)
        if not (p["dev"] / "dev-root.crt").exists():
            dev_init(p["dev"])
        if self.tls:  # the development CA and the certificates this platform needs (kept on restart)
            for identity in (pki.coordinator(), *(pki.party(party.name) for party in self.parties)):
                self.pki.issue(identity)
        enclave_values = {
            "listen": "127.0.0.1:0",
            "attester": "simulated",
            "dev_root": str(p["dev"]),
            "memory_limit_mb": self.memory_limit_mb,
        }
        if self.mpc_scratch_dir is not None:
            enclave_values["mpc_scratch_dir"] = str(self.mpc_scratch_dir)
        (p["config"] / "enclave.toml").write_text(toml_table("enclave", enclave_values) + self._tls_table(None))
        # The measurement a data owner pins: computed from the code and configuration, as
        # `sealroom enclave measure --config enclave.toml` prints it.
        self.measurement = enclave_measurement(EnclaveConfig.load(p["config"] / "enclave.toml").measured())
        for party in self.parties:
            key = p["keys"] / f"{party.name}.key"
            if not key.exists():
                save_signing_key(generate_signing_key(), key)
        # One bearer token per analyst; the coordinator's config holds only their hashes.
        for analyst in self.analysts:
            path = self.token_path(analyst)
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(generate_token())

    def _tls_table(self, identity: pki.Identity | None) -> str:
        """A component's ``[tls]`` table: the dev CA and ``identity``'s certificate (None: the enclave,
        which makes its own), or plaintext."""
        if not self.tls:
            return toml_table("tls", {"plaintext": True})
        values = {"ca": str(self.pki.ca_cert)}
        if identity is not None:
            values |= {"cert": str(self.pki.cert(identity)), "key": str(self.pki.key(identity))}
        return toml_table("tls", values)

    def _routed(self, link: str, address: str) -> str:
        return address if self.route is None else self.route(link, address)

    def _party_addresses(self, party: str) -> dict[str, str]:
        """``[party] listen`` and ``advertise_host``: a free port when the coordinator's link to the
        agent is routed (the agent advertises ``advertise_host:<its port>``)."""
        if self.route is None:
            return {"listen": "127.0.0.1:0"}
        with socket.create_server(("127.0.0.1", 0)) as s:
            listen = f"127.0.0.1:{s.getsockname()[1]}"
        host, port = self.route(f"coordinator->party-{party}", listen).rsplit(":", 1)
        if port != listen.rsplit(":", 1)[1]:
            raise ConfigError(f"route for coordinator->party-{party} must keep the agent's port ({listen})")
        return {"listen": listen, "advertise_host": host}

    @property
    def ca_path(self) -> Path:
        """The development CA's certificate: what an analyst passes as ``--ca`` (``Client(ca=...)``)."""
        return self.pki.ca_cert

    def tls_config(self, identity: pki.Identity | None = None) -> TLSConfig:
        """TLS as ``identity`` (None: no client certificate, as an analyst) on this platform's links."""
        if not self.tls:
            return TLSConfig.off()
        if identity is None:
            return TLSConfig(ca=self.pki.ca_cert)
        return TLSConfig(ca=self.pki.ca_cert, cert=self.pki.cert(identity), key=self.pki.key(identity))

    def dial(self, name: str, identity: pki.Identity | None = None) -> grpc.Channel:
        """A channel to component ``name`` (``coordinator``, ``enclave``, ``party-<name>``) as
        ``identity`` (default: the coordinator's certificate), checking it reached that component."""
        tls = self.tls_config(identity or pki.coordinator())
        address = self.addresses[name]
        peer: Peer
        if name == "coordinator":
            peer = pki.coordinator()
        elif name == "enclave":
            peer = fetch_server_certificate(address, tls)
        else:
            peer = pki.party(name.removeprefix("party-"))
        return dial(address, tls, peer)

    def _wait_healthy(self, name: str) -> None:
        with self.dial(name) as channel:
            wait_healthy_channel(channel, name)

    def token_path(self, analyst: str) -> Path:
        return self._paths()["keys"] / f"analyst-{analyst}.token"

    def token(self, analyst: str = "analyst") -> str:
        return self.token_path(analyst).read_text().strip()

    def _trust(self) -> dict[str, Any]:
        return {
            "allow_simulated": True,
            "dev_root": str(self._paths()["dev"] / "dev-root.crt"),
            "measurements": [self.measurement],
        }

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        p = self._paths()
        port_file = p["run"] / f"{name}.port"
        port_file.unlink(missing_ok=True)
        logf = open(p["logs"] / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Keep ~2 MiB frame buffers mapped instead of mmap/munmap per frame (measured in
        # benchmarks/README.md: 5-10x fewer page faults on the sealed path). See docs/operations.md.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "268435456")
        proc = subprocess.Popen(
            python_command("sealroom.cli", "--log-level", "info", *args, "--port-file", str(port_file)),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.state_dir,
        )
        logf.close()
        self.procs[name] = proc
        self._args[name] = args
        return proc

    def _wait_port(self, name: str, timeout: float = 60.0) -> str:
        port_file = self._paths()["run"] / f"{name}.port"
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UnavailableError(
                    f"{name} exited with status {proc.returncode} while starting; see {self.log_path(name)}"
                )
            if port_file.exists() and port_file.read_text().strip():
                address = f"127.0.0.1:{int(port_file.read_text())}"
                self.addresses[name] = address
                return address
            time.sleep(0.05)
        raise UnavailableError(f"{name} did not start within {timeout:.0f} s; see {self.log_path(name)}")

    def key_path(self, party: str) -> Path:
        """The party's signing key (what ``sealroom approve/reject/revoke --key`` needs)."""
        return self._paths()["keys"] / f"{party}.key"

    def approve_command(self, query_id: str, party: str) -> list[str]:
        """The owner's own command that approves ``query_id`` as ``party``'s data officer would run it:
        ``approve QUERY_ID --party-config CONFIG --agent ADDRESS --json`` (the arguments after
        ``sealroom``; the config gives the signing key and the party's TLS certificate)."""
        return [
            "approve",
            query_id,
            "--party-config",
            str(self.party_config_path(party)),
            "--agent",
            self.addresses[f"party-{party}"],
            "--json",
        ]

    def analyst_env(self, analyst: str = "analyst") -> dict[str, str]:
        """The environment the analyst commands (``sealroom datasets/submit/...``) read: the
        coordinator's address, ``analyst``'s token and the CA to check the coordinator against."""
        env = {"SEALROOM_COORDINATOR": self.coordinator_address, "SEALROOM_TOKEN": self.token(analyst)}
        if self.tls:
            env["SEALROOM_CA"] = str(self.ca_path)
        return env

    def owner_env(self, party: str) -> dict[str, str]:
        """The environment an owner's commands (``sealroom pending/approve/...``) read for ``party``: its
        agent's address, its signing key, and its TLS certificate with the CA."""
        env = {
            "SEALROOM_PARTY_AGENT": self.addresses[f"party-{party}"],
            "SEALROOM_PARTY_KEY": str(self.key_path(party)),
        }
        if self.tls:
            ident = pki.party(party)
            env |= {
                "SEALROOM_CA": str(self.pki.ca_cert),
                "SEALROOM_PARTY_CERT": str(self.pki.cert(ident)),
                "SEALROOM_PARTY_CERT_KEY": str(self.pki.key(ident)),
            }
        return env

    def party_config_path(self, party: str) -> Path:
        return self._paths()["config"] / f"party-{party}.toml"

    def approve_as_owner(self, query_id: str, party: str) -> subprocess.CompletedProcess[str]:
        """Run :meth:`approve_command` with the real CLI, as a person would; the caller reads the outcome."""
        return subprocess.run(
            python_command("sealroom.cli", *self.approve_command(query_id, party)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.state_dir,
        )

    def party_state_dir(self, party: str) -> Path:
        """The party agent's own state: its witness state of the coordinator's log."""
        return self.state_dir / "parties" / party

    def log_path(self, name: str) -> Path:
        return self._paths()["logs"] / f"{name}.log"

    def start(self) -> Cluster:
        self.prepare()
        p = self._paths()
        self.log("starting the enclave worker (simulated attestation)")
        self._spawn("enclave", ["enclave", "serve", "--config", str(p["config"] / "enclave.toml")])
        enclave = self._wait_port("enclave")
        for party in self.parties:  # the operator's enrolment of each party: a token its agent presents once
            token = enrol_party(self.state_dir / "coordinator", party.name).token
            fd = os.open(p["keys"] / f"{party.name}.enrolment", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
        coord_cfg = p["config"] / "coordinator.toml"
        coord_cfg.write_text(
            toml_table(
                "coordinator",
                {
                    "listen": "127.0.0.1:0",
                    "state_dir": str(self.state_dir / "coordinator"),
                    "enclave": self._routed("coordinator->enclave", enclave),
                    "party_timeout_seconds": self.party_timeout_seconds,
                    "approval_timeout_seconds": self.approval_timeout_seconds,
                    **self.coordinator_settings,
                },
            )
            + toml_table("trust", self._trust())
            + self._tls_table(pki.coordinator())
            + toml_table("analysts", {a: token_hash(self.token(a)) for a in self.analysts})
            + (toml_table("collaboration", self.collaboration.to_dict()) if self.collaboration is not None else "")
            + (toml_table("limits", dataclasses.asdict(self.limits)) if self.limits is not None else "")
        )
        self.log("starting the coordinator")
        self._spawn("coordinator", ["coordinator", "serve", "--config", str(coord_cfg)])
        coordinator = self._wait_port("coordinator")
        # The agents keep calling the coordinator (they witness its log before every approval), so a
        # restart("coordinator") binds the port it got now: its config names it from here on.
        coord_cfg.write_text(coord_cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "{coordinator}"', 1))
        for party in self.parties:
            cfg = self.party_config_path(party.name)
            text = (
                toml_table(
                    "party",
                    {
                        "name": party.name,
                        **self._party_addresses(party.name),
                        "coordinator": self._routed(f"party-{party.name}->coordinator", coordinator),
                        "signing_key": str(self.key_path(party.name)),
                        "enrolment_token": str(p["keys"] / f"{party.name}.enrolment"),
                        "approval_ttl_seconds": party.approval_ttl_seconds,
                        # What the agent co-signed of the coordinator's log, and the log key it trusted
                        # on first use (docs/audit.md, "Witnesses").
                        "state_dir": str(self.party_state_dir(party.name)),
                    },
                )
                + toml_table("trust", self._trust())
                + self._tls_table(pki.party(party.name))
            )
            for d in party.datasets:
                policy_file = p["config"] / f"policy-{party.name}.{d.name}.toml"
                policy_file.write_text(d.policy.to_toml())
                text += toml_table(
                    "dataset",
                    {"name": d.name, "source": d.source, "description": d.description, "policy": str(policy_file)},
                    array=True,
                )
            cfg.write_text(text)
            self.log(f"starting party agent {party.name}")
            self._spawn(f"party-{party.name}", ["party", "serve", "--config", str(cfg)])
        for party in self.parties:
            self._wait_port(f"party-{party.name}")
        for name in self.procs:
            self._wait_healthy(name)
        self.log(f"platform up: coordinator {coordinator}, enclave {enclave}, {len(self.parties)} party agents")
        return self

    def kill(self, name: str) -> None:
        """Stop one component abruptly (SIGKILL), as a crash would."""
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def restart(self, name: str) -> str:
        """Stop one component (if running) and start it again with the same configuration."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)  # a graceful stop lets query threads record their end (seconds on a busy host)
            except subprocess.TimeoutExpired:
                proc.kill()  # what is in flight is failed on restart anyway, from the durable state
                proc.wait()
        self._spawn(name, self._args[name])
        address = self._wait_port(name)
        self._wait_healthy(name)
        return address

    @property
    def coordinator_address(self) -> str:
        return self.addresses["coordinator"]

    @property
    def enclave_address(self) -> str:
        return self.addresses["enclave"]

    def client(self, analyst: str = "analyst", *, epsilon: float | None = None) -> Client:
        """A client of this platform's coordinator as ``analyst``, over TLS checked against the dev CA;
        ``epsilon``: its default for queries over dp datasets."""
        token = self.token(analyst)
        if not self.tls:
            return Client(self.coordinator_address, analyst=analyst, token=token, plaintext=True, epsilon=epsilon)
        return Client(self.coordinator_address, analyst=analyst, token=token, ca=self.ca_path, epsilon=epsilon)

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
