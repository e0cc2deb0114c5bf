from __future__ import annotations

import argparse
import os
from pathlib import Path

from sealroom.app.cli.common import EXIT_OK, UsageError, agent_address, emit, when


def cmd_pending(args: argparse.Namespace) -> int:
    from sealroom.rpc import call, open_channel
    from sealroom.v1 import common_pb2, party_pb2_grpc

    with open_channel(agent_address(args)) as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = call("party agent", stub.GetInfo, common_pb2.Empty(), timeout=30)
        resp = call("party agent", stub.ListPending, common_pb2.Empty(), timeout=30)
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
    if args.json:
        emit({"party": info.name, "plans": plans})
        return EXIT_OK
    if not plans:
        print(f"no plan awaits the decision of {info.name}'s owner")
        return EXIT_OK
    for p in plans:
        until = "the approval lapses" if p["state"] == "approved" else "forgotten if undecided"
        print(f"{p['query_id']}  [{p['state']}]  analyst {p['analyst']}  plan {p['plan_hash'][:16]}…")
        print(f"  sql: {p['sql']}")
        for dataset, columns in p["sends"].items():
            print(f"  {info.name} would send {dataset}: {', '.join(columns)}")
        print(f"  parties: {', '.join(p['parties'])}; min group size {p['min_group_size']}")
        print(f"  received {when(p['received_at'])}; {until} {when(p['expires_at'])}")
    return EXIT_OK


def _owner_command(args: argparse.Namespace, action: str) -> int:
    import time

    from sealroom.errors import ApprovalError
    from sealroom.keys import load_signing_key, public_key_hex
    from sealroom.rpc import call, open_channel
    from sealroom.signing import sign_owner_command
    from sealroom.v1 import common_pb2, party_pb2, party_pb2_grpc

    address = agent_address(args)
    key_path = args.key or os.environ.get("SEALROOM_PARTY_KEY")
    if not key_path:
        raise UsageError(
            "give the party's signing key with --key PATH (as `sealroom party init` wrote it), or set "
            "SEALROOM_PARTY_KEY: the agent obeys only commands signed with its own key"
        )
    key = load_signing_key(Path(key_path))
    reason = getattr(args, "reason", "") or ""
    if action == "reject" and not reason.strip():
        raise UsageError("reject needs --reason TEXT (the analyst sees it)")
    with open_channel(address) as ch:
        stub = party_pb2_grpc.PartyAgentStub(ch)
        info = call("party agent", stub.GetInfo, common_pb2.Empty(), timeout=30)
        if bytes(info.signing_public_key).hex() != public_key_hex(key):
            raise ApprovalError(
                f"{key_path} is not the signing key of party agent {info.name} at {address}",
                details={"party": info.name, "check": "owner_command_signature"},
            )
        issued = int(time.time() * 1000)
        plan_hash = (args.plan_hash or "").lower()
        signature = sign_owner_command(
            key,
            action,
            party=info.name,
            query_id=args.query_id,
            issued_at_ms=issued,
            reason=reason,
            plan_hash=plan_hash,
        )
        command = party_pb2.OwnerCommand(
            query_id=args.query_id, reason=reason, plan_hash=plan_hash, issued_at_ms=issued, signature=signature
        )
        method = {"approve": stub.Approve, "reject": stub.Reject, "revoke": stub.Revoke}[action]
        resp = call("party agent", method, command, timeout=90)
    doc = {
        "query_id": resp.query_id,
        "party": info.name,
        "action": action,
        "plan_hash": resp.plan_hash,
        "state": resp.state,
        "expires_at": resp.expires_at or None,
        "query_status": resp.query_status,
        "awaiting": list(resp.awaiting),
    }
    if args.json:
        emit(doc)
        return EXIT_OK
    done = {"approve": "approved", "reject": "rejected", "revoke": "revoked its approval of"}[action]
    print(f"{info.name} {done} query {resp.query_id} (plan {resp.plan_hash[:16]}…)")
    if action == "approve":
        print(f"  the approval lapses at {when(resp.expires_at)} unless the query runs before")
    awaiting = f"; awaiting {', '.join(resp.awaiting)}" if resp.awaiting else ""
    print(f"  query status: {resp.query_status}{awaiting}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _owner_command(args, "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    return _owner_command(args, "reject")


def cmd_revoke(args: argparse.Namespace) -> int:
    return _owner_command(args, "revoke")
