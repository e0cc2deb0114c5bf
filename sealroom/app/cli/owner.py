"""A data owner's commands to its own party agent: list the plans awaiting a decision, and approve,
reject or revoke, each command signed with the owner's key (the agent obeys only its own key)."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.app.cli.common import EXIT_OK, Subparsers, UsageError, add_command, agent_address, emit, when, with_json
from sealroom.errors import ApprovalError
from sealroom.keys import load_signing_key, public_key_hex
from sealroom.rpc import call, open_channel
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
    sp.add_argument("--key", help="the party's signing key, as `sealroom party init` wrote it (env SEALROOM_PARTY_KEY)")
    if command:
        sp.add_argument("query_id")
        sp.add_argument("--plan-hash", help="refuse unless the query's plan has this hash (or a 12+ hex prefix)")
    return with_json(sp)


# -- pending --------------------------------------------------------------------------------------


def pending_plans(
    address: str, key: Ed25519PrivateKey, *, key_name: str = "the key"
) -> tuple[str, list[dict[str, Any]]]:
    """The agent's party name and the plans awaiting its owner (the ``--json`` document's shape); the
    request is signed with the owner's ``key`` (only the owner may read them)."""
    with open_channel(address) as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = _own_agent(stub, key, address, key_name)
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
    key, key_path = owner_key(args)
    party, plans = pending_plans(agent_address(args.agent), key, key_name=key_path)
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
    address: str,
    key: Ed25519PrivateKey,
    action: str,
    query_id: str,
    *,
    reason: str = "",
    plan_hash: str = "",
    key_name: str = "the key",
) -> OwnerCommandOutcome:
    """Sign ``action`` on ``query_id`` with the owner's ``key`` and send it to the agent at
    ``address``; refuse first if the key is not the agent's own (``key_name`` says which key)."""
    with open_channel(address) as ch:
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


def owner_key(args: argparse.Namespace) -> tuple[Ed25519PrivateKey, str]:
    """The owner's signing key (--key or SEALROOM_PARTY_KEY) and its path."""
    key_path = args.key or os.environ.get("SEALROOM_PARTY_KEY")
    if not key_path:
        raise UsageError(
            "give the party's signing key with --key PATH (as `sealroom party init` wrote it), or set "
            "SEALROOM_PARTY_KEY: the agent answers only requests signed with its own key"
        )
    return load_signing_key(Path(key_path)), key_path


def cmd_owner_command(args: argparse.Namespace) -> int:
    action = args.command
    address = agent_address(args.agent)
    key, key_path = owner_key(args)
    reason = getattr(args, "reason", "") or ""  # only reject takes --reason
    if action == "reject" and not reason.strip():
        raise UsageError("reject needs --reason TEXT (the analyst sees it)")
    plan_hash = (args.plan_hash or "").lower()
    out = send_owner_command(address, key, action, args.query_id, reason=reason, plan_hash=plan_hash, key_name=key_path)
    if args.json:
        emit(out.to_dict())
        return EXIT_OK
    print(f"{out.party} {DONE[action]} query {out.query_id} (plan {out.plan_hash[:16]}…)")
    if action == "approve":
        print(f"  the approval lapses at {when(out.expires_at)} unless the query runs before")
    awaiting = f"; awaiting {', '.join(out.awaiting)}" if out.awaiting else ""
    print(f"  query status: {out.query_status}{awaiting}")
    return EXIT_OK
