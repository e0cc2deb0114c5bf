"""The party agent's gRPC surface: each method converts messages and delegates to :class:`PartyAgent`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc

from connectors.agent.approvals import OwnerDecision
from connectors.agent.config import PartyConfig
from connectors.agent.party import PartyAgent
from connectors.agent.review import Submitted
from sealroom.callers import Callers, unprovable
from sealroom.errors import ApprovalError, CallerError, SealroomError
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

    def prove_caller(
        self, rule: Callers, path: str, request: party_pb2.ListPendingRequest | party_pb2.OwnerCommand, context: object
    ) -> None:
        """The owner's methods (sealroom.callers: OWNER): the request must be signed by this agent's own
        key, fresh; any other signer is refused (PERMISSION_DENIED) before the method runs."""
        if rule is not Callers.OWNER:
            raise unprovable(path)
        try:
            if isinstance(request, party_pb2.ListPendingRequest):
                self.agent.authenticate_read(request)
            else:
                action = path.rsplit("/", 1)[-1].lower()
                self.agent.approvals.authenticate(action, request, public_key_hex=self.agent.public_key_hex)
        except ApprovalError as err:
            raise CallerError(err.message, details={**err.details, "method": path}) from None

    def ReviewPlan(  # noqa: N802
        self, request: party_pb2.ReviewPlanRequest, context: grpc.ServicerContext
    ) -> party_pb2.ReviewPlanResponse:
        try:
            submitted = Submitted(request.log_entry, request.log_checkpoint, tuple(request.inclusion_proof))
            plan_hash, signature, expires_at = self.agent.review(request.plan_json, submitted)
        except SealroomError as err:
            return party_pb2.ReviewPlanResponse(approved=False, error_json=err.to_json().encode())
        if signature is None:
            return party_pb2.ReviewPlanResponse(approved=False, pending=True, plan_hash=plan_hash)
        return party_pb2.ReviewPlanResponse(
            approved=True, plan_hash=plan_hash, signature=signature, expires_at=expires_at
        )

    def Contribute(  # noqa: N802
        self, request: party_pb2.ContributeRequest, context: grpc.ServicerContext
    ) -> party_pb2.ContributeResponse:
        out = self.agent.contribute(
            request.plan_json, request.job_id, request.enclave_address, bytes(request.enclave_tls_certificate)
        )
        return party_pb2.ContributeResponse(
            uploads=out.uploads, claims_json=json.dumps(out.claims.to_json_dict()).encode()
        )

    def GetProgress(  # noqa: N802
        self, request: party_pb2.ProgressRequest, context: grpc.ServicerContext
    ) -> party_pb2.ProgressResponse:
        return party_pb2.ProgressResponse(streams=[c.to_proto() for c in self.agent.progress(request.job_id)])

    def PrepareMpc(  # noqa: N802
        self, request: party_pb2.PrepareMpcRequest, context: grpc.ServicerContext
    ) -> party_pb2.MpcOffer:
        return self.agent.mpc_players.prepare(request.plan_json, request.stage_id, request.index)

    def RunMpc(  # noqa: N802
        self, request: party_pb2.RunMpcRequest, context: grpc.ServicerContext
    ) -> party_pb2.MpcOutcome:
        # A cancelled call (the coordinator ends the stage: another player failed) stops the player.
        return self.agent.mpc_players.run(request, on_cancel=context.add_callback)

    def GetInfo(  # noqa: N802
        self, request: common_pb2.Empty, context: grpc.ServicerContext
    ) -> common_pb2.PartyInfo:
        return common_pb2.PartyInfo(
            name=self.agent.config.name, signing_public_key=bytes.fromhex(self.agent.public_key_hex)
        )

    def ListPending(  # noqa: N802
        self, request: party_pb2.ListPendingRequest, context: grpc.ServicerContext
    ) -> party_pb2.ListPendingResponse:
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

    def Approve(  # noqa: N802
        self, request: party_pb2.OwnerCommand, context: grpc.ServicerContext
    ) -> party_pb2.OwnerCommandResponse:
        return _decision(self.agent.approve(request))

    def Reject(  # noqa: N802
        self, request: party_pb2.OwnerCommand, context: grpc.ServicerContext
    ) -> party_pb2.OwnerCommandResponse:
        return _decision(self.agent.reject(request))

    def Revoke(  # noqa: N802
        self, request: party_pb2.OwnerCommand, context: grpc.ServicerContext
    ) -> party_pb2.OwnerCommandResponse:
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
    # Mutual TLS: only holders of a certificate of the collaboration CA get through the handshake.
    server = create_server(agent.config.listen, tls=agent.config.tls, require_client_auth=True)
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
