"""The party agent's gRPC surface: each method converts messages and delegates to :class:`PartyAgent`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from connectors.agent.approvals import OwnerDecision
from connectors.agent.config import PartyConfig
from connectors.agent.party import PartyAgent
from sealroom.errors import (
    SealroomError,
)
from sealroom.rpc import Server, create_server, translate_errors
from sealroom.v1 import (
    common_pb2,
    party_pb2,
    party_pb2_grpc,
)

log = logging.getLogger(__name__)


@translate_errors
class PartyServicer(party_pb2_grpc.PartyAgentServicer):
    def __init__(self, agent: PartyAgent):
        self.agent = agent

    def ReviewPlan(self, request, context):  # noqa: N802
        try:
            plan_hash, signature, expires_at = self.agent.review(request.plan_json)
        except SealroomError as err:
            return party_pb2.ReviewPlanResponse(approved=False, error_json=err.to_json().encode())
        if signature is None:
            return party_pb2.ReviewPlanResponse(approved=False, pending=True, plan_hash=plan_hash)
        return party_pb2.ReviewPlanResponse(
            approved=True, plan_hash=plan_hash, signature=signature, expires_at=expires_at
        )

    def Contribute(self, request, context):  # noqa: N802
        out = self.agent.contribute(request.plan_json, request.job_id, request.enclave_address)
        return party_pb2.ContributeResponse(
            uploads=out.uploads, claims_json=json.dumps(out.claims.to_json_dict()).encode()
        )

    def GetProgress(self, request, context):  # noqa: N802
        return party_pb2.ProgressResponse(streams=[c.to_proto() for c in self.agent.progress(request.job_id)])

    def PrepareMpc(self, request, context):  # noqa: N802
        return self.agent.mpc_players.prepare(request.plan_json, request.stage_id, request.index)

    def RunMpc(self, request, context):  # noqa: N802
        # A cancelled call (the coordinator ends the stage: another player failed) stops the player.
        return self.agent.mpc_players.run(request, on_cancel=context.add_callback)

    def GetInfo(self, request, context):  # noqa: N802
        return common_pb2.PartyInfo(
            name=self.agent.config.name, signing_public_key=bytes.fromhex(self.agent.public_key_hex)
        )

    def ListPending(self, request, context):  # noqa: N802
        return party_pb2.ListPendingResponse(
            plans=[
                party_pb2.PendingPlan(
                    query_id=p.query_id,
                    plan_hash=p.plan_hash,
                    analyst=p.analyst,
                    sql=p.sql,
                    inputs=[party_pb2.PendingInput(dataset=i.dataset, columns=i.columns) for i in p.inputs],
                    state=p.state,
                    received_at=p.received_at,
                    expires_at=p.expires_at,
                    parties=p.parties,
                    min_group_size=p.min_group_size,
                )
                for p in self.agent.pending()
            ]
        )

    def Approve(self, request, context):  # noqa: N802
        return _decision(self.agent.approve(request))

    def Reject(self, request, context):  # noqa: N802
        return _decision(self.agent.reject(request))

    def Revoke(self, request, context):  # noqa: N802
        return _decision(self.agent.revoke(request))


def _decision(d: OwnerDecision) -> party_pb2.OwnerCommandResponse:
    return party_pb2.OwnerCommandResponse(
        query_id=d.query_id,
        plan_hash=d.plan_hash,
        state=d.state,
        expires_at=d.expires_at,
        query_status=d.query_status,
        awaiting=d.awaiting,
    )


def build_server(agent: PartyAgent) -> Server:
    server = create_server(agent.config.listen)
    party_pb2_grpc.add_PartyAgentServicer_to_server(PartyServicer(agent), server.grpc)
    return server


def serve(config: PartyConfig, *, port_file: str | None = None) -> None:
    agent = PartyAgent(config)
    server = build_server(agent)
    server.start()
    address = f"{config.advertise_host}:{server.port}"
    log.info("party agent %s listening on port %d", config.name, server.port)
    agent.register(address)
    if port_file:
        Path(port_file).write_text(str(server.port))
    server.serve_until_signalled()
