"""The party agent's configuration: ``[party]`` and one ``[[datasets]]`` table per dataset, from TOML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from connectors.agent.approvals import DEFAULT_MAX_PENDING_PER_ANALYST
from connectors.sources import resolve_spec
from sealroom.audit.notes import NoteVerifier
from sealroom.auth import TOKEN_PREFIX
from sealroom.config import Table, file_table
from sealroom.errors import (
    ConfigError,
)
from sealroom.policy import DatasetPolicy, TrustPolicy, load_policy_file
from sealroom.rpc import TLSConfig

# The keys of [party].
PARTY_KEYS = {
    "name",
    "listen",
    "coordinator",
    "signing_key",
    "advertise_host",
    "approval_ttl_seconds",
    "pending_ttl_seconds",
    "max_pending_per_analyst",
    "mpc_host",
    "state_dir",
    "log_key",
    "unsafe_no_witness",
    "enrolment_token",
}


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
    # At most this many plans of one analyst await the owner's manual decision at once (approvals.py).
    max_pending_per_analyst: int = DEFAULT_MAX_PENDING_PER_ANALYST
    mpc_host: str = "127.0.0.1"  # where this owner's MPC players listen (the other players connect)
    # The agent witnesses the coordinator's transparency log before it approves (connectors/witness.py).
    # state_dir: where it keeps what it co-signed (None: "<name>-state" next to the signing key);
    # log_key: the log's verifier key, pinned (None: trusted on first use, then kept in state_dir).
    state_dir: Path | None = None
    log_key: NoteVerifier | None = None
    # Approve without witnessing: tests and benchmarks without a coordinator only (logged as a warning).
    unsafe_no_witness: bool = False
    # The operator's one-time enrolment token (`sealroom party enrol NAME`), presented at registration:
    # needed for the name's first registration and for a new key; "" for none.
    enrolment_token: str = field(default="", repr=False)
    # [tls]: the collaboration CA and this party's certificate (party:<name>): the agent's server
    # identity, and its client certificate to the coordinator and the enclave. Code-built configs
    # default to plaintext (loopback only); a config file must say which (docs/configuration.md).
    tls: TLSConfig = TLSConfig.off()

    @property
    def witness_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.signing_key.parent / f"{self.name}-state"

    @classmethod
    def from_table(cls, root: Table) -> PartyConfig:
        root.check_keys({"party", "trust", "dataset", "tls"})
        p = root.table("party")
        p.check_keys(PARTY_KEYS)
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
            tls=_tls(root, p),
            name=name,
            coordinator=p.str("coordinator"),
            signing_key=p.path("signing_key"),
            trust=trust,
            datasets=tuple(datasets),
            listen=p.str("listen", "127.0.0.1:0"),
            advertise_host=p.str("advertise_host", "127.0.0.1"),
            approval_ttl_seconds=p.float("approval_ttl_seconds", 3600.0, minimum=1.0),
            pending_ttl_seconds=p.float("pending_ttl_seconds", 86400.0, minimum=1.0),
            max_pending_per_analyst=p.int("max_pending_per_analyst", DEFAULT_MAX_PENDING_PER_ANALYST, minimum=1),
            mpc_host=p.str("mpc_host", "127.0.0.1"),
            state_dir=p.opt_path("state_dir"),
            log_key=_log_key(p),
            unsafe_no_witness=p.bool("unsafe_no_witness", False),
            enrolment_token=_enrolment_token(p),
        )

    @classmethod
    def load(cls, path: Path) -> PartyConfig:
        return cls.from_table(file_table(path))


def _tls(root: Table, p: Table) -> TLSConfig:
    """``[tls]``: plaintext only where every address of ``[party]`` is on loopback."""
    return TLSConfig.from_table(
        root.table("tls", required=False),
        role="party agent",
        addresses={
            "party.listen": p.str("listen", "127.0.0.1:0"),
            "party.coordinator": p.str("coordinator"),
            "party.advertise_host": p.str("advertise_host", "127.0.0.1") + ":0",
        },
    )


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


def _enrolment_token(p: Table) -> str:
    """``[party] enrolment_token``: the token ``sealroom party enrol`` printed, or the path of a file
    holding it (keep it out of a config file that others read); "" when not set."""
    value = p.opt_str("enrolment_token")
    if value is None:
        return ""
    if value.startswith(TOKEN_PREFIX):
        return value
    try:
        token = p.path("enrolment_token").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        token = ""
    if not token.startswith(TOKEN_PREFIX):
        raise ConfigError(
            f"{p.source}: {p.prefix}enrolment_token is neither an enrolment token ({TOKEN_PREFIX}...) nor a readable "
            "file holding one; the coordinator's operator makes it with `sealroom party enrol NAME`",
            details={"file": p.source, "key": f"{p.prefix}enrolment_token"},
        )
    return token
