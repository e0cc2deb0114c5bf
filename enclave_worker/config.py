"""Enclave worker configuration (TOML ``[enclave]`` table)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sealroom.config import Table, file_table
from sealroom.rpc import TLSConfig

ATTESTERS = ("simulated", "sev-snp", "tdx", "sgx", "nitro")
DEFAULT_TSM_PATH = Path("/sys/kernel/config/tsm/report")
DEFAULT_GRAMINE_PATH = Path("/dev/attestation")
DEFAULT_NSM_DEVICE = Path("/dev/nsm")
# Memory-backed on Linux; each player makes its own private (0700) directory under it with mkdtemp.
DEFAULT_MPC_SCRATCH = Path("/dev/shm")  # noqa: S108


@dataclass(frozen=True)
class EnclaveConfig:
    listen: str = "127.0.0.1:0"
    attester: str = "simulated"
    dev_root: Path | None = None  # directory written by `sealroom dev init` (simulated only)
    tsm_path: Path = DEFAULT_TSM_PATH  # configfs-tsm report directory (sev-snp, tdx)
    snp_certificates: Path | None = None  # VCEK (and ASK) file, when the host supplies no certificate table
    gramine_path: Path = DEFAULT_GRAMINE_PATH  # Gramine's attestation pseudo-files (sgx)
    nsm_device: Path = DEFAULT_NSM_DEVICE  # the Nitro Secure Module (nitro)
    memory_limit_bytes: int = 2 * 1024**3
    job_ttl_seconds: int = 900
    engine_threads: int = 2
    mpc_host: str = "127.0.0.1"  # where the enclave's MPC player listens (hybrid plans)
    # Where the enclave's MPC player keeps its TLS key: must be memory-backed inside the TEE (tmpfs).
    mpc_scratch_dir: Path = DEFAULT_MPC_SCRATCH
    # [tls] ca: callers must present a certificate of this CA (mutual TLS). The server certificate is
    # not configured: the worker makes its key at start and its evidence binds it (docs/wire.md).
    # Code-built configs default to plaintext (loopback only).
    tls: TLSConfig = TLSConfig.off()

    def measured(self) -> dict[str, Any]:
        """The configuration that is part of the enclave's measurement (security-relevant only)."""
        return {
            "attester": self.attester,
            "memory_limit_bytes": self.memory_limit_bytes,
            "job_ttl_seconds": self.job_ttl_seconds,
        }

    @classmethod
    def from_table(cls, t: Table) -> EnclaveConfig:
        t.check_keys(
            {
                "listen",
                "attester",
                "dev_root",
                "memory_limit_mb",
                "job_ttl_seconds",
                "engine_threads",
                "tsm_path",
                "snp_certificates",
                "gramine_path",
                "nsm_device",
                "mpc_host",
                "mpc_scratch_dir",
            }
        )
        attester = t.choice("attester", ATTESTERS, "simulated")
        return cls(
            listen=t.str("listen", "127.0.0.1:0"),
            attester=attester,
            dev_root=t.path("dev_root") if attester == "simulated" else t.opt_path("dev_root"),
            tsm_path=t.path("tsm_path", DEFAULT_TSM_PATH),
            snp_certificates=t.opt_path("snp_certificates"),
            gramine_path=t.path("gramine_path", DEFAULT_GRAMINE_PATH),
            nsm_device=t.path("nsm_device", DEFAULT_NSM_DEVICE),
            memory_limit_bytes=t.int("memory_limit_mb", 2048, minimum=1) * 1024 * 1024,
            job_ttl_seconds=t.int("job_ttl_seconds", 900, minimum=1),
            engine_threads=t.int("engine_threads", 2, minimum=1),
            mpc_host=t.str("mpc_host", "127.0.0.1"),
            mpc_scratch_dir=t.path("mpc_scratch_dir", DEFAULT_MPC_SCRATCH),
        )

    @classmethod
    def load(cls, path: Path) -> EnclaveConfig:
        root = file_table(path)
        root.check_keys({"enclave", "tls"})
        config = cls.from_table(root.table("enclave"))
        tls = TLSConfig.from_table(
            root.table("tls", required=False),
            role="enclave worker",
            own_cert=False,
            addresses={"enclave.listen": config.listen},
        )
        return replace(config, tls=tls)
