"""Enclave worker configuration (TOML ``[enclave]`` table)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealroom.config import Table, file_table

ATTESTERS = ("simulated",)


@dataclass(frozen=True)
class EnclaveConfig:
    listen: str = "127.0.0.1:0"
    attester: str = "simulated"
    dev_root: Path | None = None  # directory written by `sealroom dev init` (simulated only)
    memory_limit_bytes: int = 2 * 1024**3
    job_ttl_seconds: int = 900
    engine_threads: int = 2

    def measured(self) -> dict[str, Any]:
        """The configuration that is part of the enclave's measurement (security-relevant only)."""
        return {
            "attester": self.attester,
            "memory_limit_bytes": self.memory_limit_bytes,
            "job_ttl_seconds": self.job_ttl_seconds,
        }

    @classmethod
    def from_table(cls, t: Table) -> EnclaveConfig:
        t.check_keys({"listen", "attester", "dev_root", "memory_limit_mb", "job_ttl_seconds", "engine_threads"})
        attester = t.choice("attester", ATTESTERS, "simulated")
        return cls(
            listen=t.str("listen", "127.0.0.1:0"),
            attester=attester,
            dev_root=t.path("dev_root") if attester == "simulated" else t.opt_path("dev_root"),
            memory_limit_bytes=t.int("memory_limit_mb", 2048, minimum=1) * 1024 * 1024,
            job_ttl_seconds=t.int("job_ttl_seconds", 900, minimum=1),
            engine_threads=t.int("engine_threads", 2, minimum=1),
        )

    @classmethod
    def load(cls, path: Path) -> EnclaveConfig:
        root = file_table(path)
        root.check_keys({"enclave"})
        return cls.from_table(root.table("enclave"))
