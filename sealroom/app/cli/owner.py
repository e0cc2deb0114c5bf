"""A data owner's commands to its own party agent: list the plans awaiting a decision, and approve,
reject or revoke, each command signed with the owner's key (the agent obeys only its own key)."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom import pki
from sealroom.app.cli.common import EXIT_OK, Subparsers, UsageError, add_command, agent_address, emit, when, with_json
from sealroom.errors import ApprovalError
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.rpc import TLSConfig, call, dial
from sealroom.signing import sign_owner_command, sign_owner_read
from sealroom.v1 import common_pb2, party_pb2, party_pb2_grpc

DONE = {"approve": "approved", "reject": "rejected", "revoke": "revoked its approval of"}


def add_parsers(sub: Subparsers) -> None:
    owner(add_command(sub, "pending"), command=False).set_defaults(handler=cmd_pending)
    owner(add_command(sub, "approve")).set_defaults(handler=cmd_owner_command)
    rj = owner(add_command(sub, "reject"))
    rj.add_argument("--reason", required=True, help="why (the analyst sees it)")
    rj.set_defaults(handler=cmd_owner_command)
    owner(add_command(sub, "revoke")).set_defaults(handler=cmd_owner_command)


def owner(sp: argparse.ArgumentParser, *, command: bool = True) -> argparse.ArgumentParser:
    """An owner's request to its agent, signed with the party's key: a command on a query, or a read."""
    sp.add_argument("--agent", help="the party agent's address HOST:PORT (env SEALROOM_PARTY_AGENT)")
    sp.add_argument(
        "--party-config",
        help="the party agent's config file: its address, signing key and [tls] (flags given override it)",
    )
    sp.add_argument("--ca", help="the collaboration CA certificate (env SEALROOM_CA)")
    sp.add_argument("--cert", help="the party's TLS certificate, party:<name> (env SEALROOM_PARTY_CERT)")
    sp.add_argument("--cert-key", help="the key of --cert (env SEALROOM_PARTY_CERT_KEY)")
    sp.add_argument("--plaintext", action="store_true", help="no TLS: an agent with [tls] plaintext = true only")
    sp.add_argument("--key", help="the party's signing key, as `sealroom party init` wrote it (env SEALROOM_PARTY_KEY)")
    if command:
        sp.add_argument("query_id")
        sp.add_argument("--plan-hash", help="refuse unless the query's plan has this hash (or a 12+ hex prefix)")
    return with_json(sp)


# -- pending --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentLink:
    """How the owner reaches its own agent: its address, the TLS material (the party's own
    certificate: the agent requires one of the CA) and the identity the agent must present."""

    address: str
    tls: TLSConfig
    party: pki.Identity | None  # None: plaintext
    signing_key: str | None = None

    def channel(self) -> grpc.Channel:
        return dial(self.address, self.tls, self.party or pki.coordinator())


def agent_link(args: argparse.Namespace) -> AgentLink:
    """The link the flags describe: ``--party-config`` (the agent's config file) and explicit flags
    (which win), else ``SEALROOM_PARTY_AGENT``, ``SEALROOM_CA``, ``SEALROOM_PARTY_CERT``..."""
    from connectors.agent.config import PartyConfig  # the agent's config reader, only when asked for

    config = PartyConfig.load(Path(args.party_config)) if args.party_config else None
    address = args.agent or os.environ.get("SEALROOM_PARTY_AGENT")
    if not address and config is not None:
        address = _config_address(config)
    address = agent_address(address)
    key = (
        getattr(args, "key", None)
        or os.environ.get("SEALROOM_PARTY_KEY")
        or (str(config.signing_key) if config else None)
    )
    if args.plaintext or (config is not None and config.tls.plaintext and not (args.ca or args.cert)):
        return AgentLink(address, TLSConfig.off(), None, key)
    ca = args.ca or os.environ.get("SEALROOM_CA") or (config.tls.ca if config else None)
    cert = args.cert or os.environ.get("SEALROOM_PARTY_CERT") or (config.tls.cert if config else None)
    cert_key = args.cert_key or os.environ.get("SEALROOM_PARTY_CERT_KEY") or (config.tls.key if config else None)
    if not (ca and cert and cert_key):
        raise UsageError(
            "the party agent accepts only callers with a certificate of the collaboration CA: give --party-config "
            "FILE (the agent's config), or --ca, --cert and --cert-key (the party's own certificate and its key)"
        )
    tls = TLSConfig(ca=Path(ca), cert=Path(cert), key=Path(cert_key))
    try:
        party = pki.certificate_identity(Path(cert).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the party's certificate {cert} ({exc.strerror})") from None
    if party is None or party.role != "party":
        raise UsageError(f"{cert} is not a party's certificate (its name must be party:<name>)")
    return AgentLink(address, tls, party, key)


def _config_address(config: Any) -> str:
    """The agent's address from its config (``PartyConfig``): its listen port, advertised host."""
    host, _, port = config.listen.rpartition(":")
    if port == "0":
        raise UsageError(
            f"{config.name}'s agent listens on a port chosen at start: give its address with --agent HOST:PORT"
        )
    if host in ("0.0.0.0", "[::]", "::", ""):  # noqa: S104 - reading a listen address, not binding
        host = config.advertise_host
    return f"{host}:{port}"


def pending_plans(
    link: AgentLink, key: Ed25519PrivateKey, *, key_name: str = "the key"
) -> tuple[str, list[dict[str, Any]]]:
    """The agent's party name and the plans awaiting its owner (the ``--json`` document's shape); the
    request is signed with the owner's ``key`` (only the owner may read them)."""
    with link.channel() as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = _own_agent(stub, key, link.address, key_name)
        issued = int(time.time() * 1000)
        request = party_pb2.ListPendingRequest(
            issued_at_ms=issued, signature=sign_owner_read(key, "pending", party=info.name, issued_at_ms=issued)
        )
        resp = call("party agent", stub.ListPending, request, timeout=30)
    plans = [
        {
            "query_id": p.query_id,
            "plan_hash": p.plan_hash,
            "state": p.state,
            "analyst": p.analyst,
            "sql": p.sql,
            "sends": {i.dataset: list(i.columns) for i in p.inputs},
            "parties": list(p.parties),
            "min_group_size": p.min_group_size,
            "received_at": p.received_at,
            "expires_at": p.expires_at,
        }
        for p in resp.plans
    ]
    return info.name, plans


def cmd_pending(args: argparse.Namespace) -> int:
    link = agent_link(args)
    key, key_path = owner_key(link)
    party, plans = pending_plans(link, key, key_name=key_path)
    if args.json:
        emit({"party": party, "plans": plans})
        return EXIT_OK
    if not plans:
        print(f"no plan awaits the decision of {party}'s owner")
        return EXIT_OK
    for p in plans:
        until = "the approval lapses" if p["state"] == "approved" else "forgotten if undecided"
        print(f"{p['query_id']}  [{p['state']}]  analyst {p['analyst']}  plan {p['plan_hash'][:16]}…")
        print(f"  sql: {p['sql']}")
        for dataset, columns in p["sends"].items():
            print(f"  {party} would send {dataset}: {', '.join(columns)}")
        print(f"  parties: {', '.join(p['parties'])}; min group size {p['min_group_size']}")
        print(f"  received {when(p['received_at'])}; {until} {when(p['expires_at'])}")
    return EXIT_OK


# -- approve, reject, revoke ------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerCommandOutcome:
    """What the agent answered to a signed owner command."""

    query_id: str
    party: str
    action: str
    plan_hash: str
    state: str
    expires_at: float
    query_status: str
    awaiting: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "query_id": self.query_id,
            "party": self.party,
            "action": self.action,
            "plan_hash": self.plan_hash,
            "state": self.state,
            "expires_at": self.expires_at or None,
            "query_status": self.query_status,
            "awaiting": list(self.awaiting),
        }


def send_owner_command(
    link: AgentLink,
    key: Ed25519PrivateKey,
    action: str,
    query_id: str,
    *,
    reason: str = "",
    plan_hash: str = "",
    key_name: str = "the key",
) -> OwnerCommandOutcome:
    """Sign ``action`` on ``query_id`` with the owner's ``key`` and send it to the agent ``link``
    reaches; refuse first if the key is not the agent's own (``key_name`` says which key)."""
    address = link.address
    with link.channel() as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = _own_agent(stub, key, address, key_name)
        issued = int(time.time() * 1000)
        signature = sign_owner_command(
            key, action, party=info.name, query_id=query_id, issued_at_ms=issued, reason=reason, plan_hash=plan_hash
        )
        command = party_pb2.OwnerCommand(
            query_id=query_id, reason=reason, plan_hash=plan_hash, issued_at_ms=issued, signature=signature
        )
        method = {"approve": stub.Approve, "reject": stub.Reject, "revoke": stub.Revoke}[action]
        resp = call("party agent", method, command, timeout=90)
    return OwnerCommandOutcome(
        query_id=resp.query_id,
        party=info.name,
        action=action,
        plan_hash=resp.plan_hash,
        state=resp.state,
        expires_at=resp.expires_at,
        query_status=resp.query_status,
        awaiting=tuple(resp.awaiting),
    )


def _own_agent(stub: party_pb2_grpc.PartyAgentStub, key: Ed25519PrivateKey, address: str, key_name: str) -> Any:
    """The agent's public facts (GetInfo), refused first if ``key`` is not the agent's own."""
    info = call("party agent", stub.GetInfo, common_pb2.Empty(), timeout=30)
    if bytes(info.signing_public_key).hex() != public_key_hex(key):
        raise ApprovalError(
            f"{key_name} is not the signing key of party agent {info.name} at {address}",
            details={"party": info.name, "check": "owner_command_signature"},
        )
    return info


def owner_key(link: AgentLink) -> tuple[Ed25519PrivateKey, str]:
    """The owner's signing key (--key, SEALROOM_PARTY_KEY or --party-config) and its path."""
    key_path = link.signing_key or os.environ.get("SEALROOM_PARTY_KEY")
    if not key_path:
        raise UsageError(
            "give the party's signing key with --key PATH (as `sealroom party init` wrote it), --party-config "
            "FILE, or set SEALROOM_PARTY_KEY: the agent answers only requests signed with its own key"
        )
    return load_signing_key(Path(key_path)), key_path


def cmd_owner_command(args: argparse.Namespace) -> int:
    action = args.command
    link = agent_link(args)
    key, key_path = owner_key(link)
    reason = getattr(args, "reason", "") or ""  # only reject takes --reason
    if action == "reject" and not reason.strip():
        raise UsageError("reject needs --reason TEXT (the analyst sees it)")
    plan_hash = (args.plan_hash or "").lower()
    out = send_owner_command(link, key, action, args.query_id, reason=reason, plan_hash=plan_hash, key_name=key_path)
    if args.json:
        emit(out.to_dict())
        return EXIT_OK
    print(f"{out.party} {DONE[action]} query {out.query_id} (plan {out.plan_hash[:16]}…)")
    if action == "approve":
        print(f"  the approval lapses at {when(out.expires_at)} unless the query runs before")
    awaiting = f"; awaiting {', '.join(out.awaiting)}" if out.awaiting else ""
    print(f"  query status: {out.query_status}{awaiting}")
    return EXIT_OK
