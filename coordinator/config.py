"""Coordinator configuration (TOML ``[coordinator]`` and ``[trust]`` tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sealroom.audit.ropa import Collaboration
from sealroom.auth import AnalystDirectory
from sealroom.config import Table, file_table
from sealroom.errors import ConfigError
from sealroom.planning.limits import DEFAULT_LIMITS, QueryLimits
from sealroom.policy import TrustPolicy
from sealroom.rpc import TLSConfig


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    enclave: str
    trust: TrustPolicy
    listen: str = "127.0.0.1:0"
    party_timeout_seconds: float = 600.0
    approval_timeout_seconds: float = 86400.0
    mpc_host: str = "127.0.0.1"  # where the coordinator's helper MPC players listen
    mpc_timeout_seconds: float = 120.0  # an MPC stage's players must finish within this
    # None: analysts are not authenticated (self-declared names; development only, logged loudly).
    analysts: AnalystDirectory | None = None
    # The Ed25519 key that signs the transparency log's checkpoints and countersigns receipts (PEM,
    # PKCS#8). None: ``<state_dir>/log.key``, generated on first start (docs/audit.md).
    log_key: Path | None = None
    # The operator's [collaboration] declaration for the record of processing (docs/audit.md); None
    # when the config declares none (the record then lists it as a gap).
    collaboration: Collaboration | None = None
    # Per-analyst rate limit on Explain and Submit (one token bucket per analyst; sealroom/ratelimit.py):
    # calls a second (0: no limit) and the burst an analyst may make at once.
    analyst_calls_per_second: float = 10.0
    analyst_burst: int = 50
    # Caps on an analyst's SQL ([limits]: max_sql_bytes, max_expression_nodes, max_nesting_depth,
    # max_in_list; docs/configuration.md).
    limits: QueryLimits = DEFAULT_LIMITS
    # [tls]: the collaboration CA, and the coordinator's certificate (server for analysts and parties,
    # client certificate for the agents and the enclave). Code-built configs default to plaintext
    # (loopback only); a config file must say which (docs/configuration.md).
    tls: TLSConfig = TLSConfig.off()

    @classmethod
    def from_table(cls, root: Table) -> CoordinatorConfig:
        root.check_keys({"coordinator", "trust", "analysts", "collaboration", "limits", "tls"})
        c = root.table("coordinator")
        c.check_keys(
            {
                "listen",
                "state_dir",
                "enclave",
                "party_timeout_seconds",
                "approval_timeout_seconds",
                "mpc_host",
                "mpc_timeout_seconds",
                "log_key",
                "analyst_calls_per_second",
                "analyst_burst",
            }
        )
        t = root.table("trust", required=False)
        a = root.doc.get("analysts")
        if a is not None and not isinstance(a, dict):
            raise ConfigError(
                f'{root.source}: analysts must be a table of name = "sha256:..." lines',
                details={"file": root.source, "key": "analysts"},
            )
        listen = c.str("listen", "127.0.0.1:0")
        tls = TLSConfig.from_table(
            root.table("tls", required=False),
            role="coordinator",
            addresses={"coordinator.listen": listen, "coordinator.enclave": c.str("enclave")},
        )
        return cls(
            tls=tls,
            state_dir=c.path("state_dir"),
            enclave=c.str("enclave"),
            trust=TrustPolicy.from_dict(t.doc, source=root.source, base=root.base),
            listen=listen,
            party_timeout_seconds=c.float("party_timeout_seconds", 600.0, minimum=1.0),
            approval_timeout_seconds=c.float("approval_timeout_seconds", 86400.0, minimum=1.0),
            mpc_host=c.str("mpc_host", "127.0.0.1"),
            mpc_timeout_seconds=c.float("mpc_timeout_seconds", 120.0, minimum=1.0),
            analysts=AnalystDirectory(a, source=root.source) if a is not None else None,
            log_key=c.opt_path("log_key"),
            analyst_calls_per_second=c.float("analyst_calls_per_second", 10.0, minimum=0.0),
            analyst_burst=c.int("analyst_burst", 50, minimum=1),
            collaboration=Collaboration.from_table(root.table("collaboration"))
            if root.doc.get("collaboration") is not None
            else None,
            limits=QueryLimits.from_table(root.table("limits", required=False)),
        )

    @classmethod
    def load(cls, path: Path) -> CoordinatorConfig:
        return cls.from_table(file_table(path))
