"""gRPC edge of the coordinator: typed servicers that only delegate to ``coordinator.service``.

Each method takes its request message and returns its response message; what it does lives in the
service's handler of the same name. Errors are translated at this edge (``translate_errors``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from coordinator import service
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator, Metadata
from sealroom.callers import Callers, unprovable
from sealroom.cancel import CallScope
from sealroom.errors import ConfigError
from sealroom.rpc import Server, create_server, is_loopback, translate_errors
from sealroom.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


def _metadata(context: grpc.ServicerContext) -> Metadata:
    """The call's metadata (an analyst's call carries its token there)."""
    return tuple((m.key, m.value) for m in context.invocation_metadata())


@translate_errors
class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def prove_caller(self, rule: Callers, path: str, request: object, context: grpc.ServicerContext) -> None:
        """An analyst's methods (sealroom.callers: ANALYST): the call's token must name an analyst of
        this coordinator (each handler then keeps to that analyst's own queries)."""
        if rule is not Callers.ANALYST:
            raise unprovable(path)
        self.c.analyst(_metadata(context))

    # -- a party agent's calls -----------------------------------------------------------------

    def RegisterParty(  # noqa: N802
        self, request: coordinator_pb2.RegisterPartyRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterPartyResponse:
        return service.register_party(request, self.c)

    def SubmitApproval(  # noqa: N802
        self, request: coordinator_pb2.SubmitApprovalRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.OwnerActionResponse:
        return service.submit_approval(request, self.c)

    def RejectQuery(  # noqa: N802
        self, request: coordinator_pb2.RejectQueryRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.OwnerActionResponse:
        return service.reject_query(request, self.c)

    def RevokeApproval(  # noqa: N802
        self, request: coordinator_pb2.RevokeApprovalRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.OwnerActionResponse:
        return service.revoke_approval(request, self.c)

    def GetCheckpoint(  # noqa: N802
        self, request: coordinator_pb2.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CheckpointResponse:
        return service.get_checkpoint(self.c)

    def GetConsistencyProof(  # noqa: N802
        self, request: coordinator_pb2.ConsistencyProofRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ConsistencyProofResponse:
        return service.get_consistency_proof(request, self.c)

    def SubmitCosignature(  # noqa: N802
        self, request: coordinator_pb2.SubmitCosignatureRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.SubmitCosignatureResponse:
        return service.submit_cosignature(request, self.c)

    # -- an analyst's calls (authenticated by the token in the call's metadata) ----------------

    def ListDatasets(  # noqa: N802
        self, request: common_pb2.Empty, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListDatasetsResponse:
        return service.list_datasets(self.c, _metadata(context))

    def Explain(  # noqa: N802
        self, request: coordinator_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ExplainResponse:
        return service.explain(request, self.c, _metadata(context), CallScope(context))

    def Submit(  # noqa: N802
        self, request: coordinator_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.SubmitResponse:
        return service.submit(request, self.c, _metadata(context), CallScope(context))

    def GetStatus(  # noqa: N802
        self, request: coordinator_pb2.QueryRef, context: grpc.ServicerContext
    ) -> coordinator_pb2.QueryStatus:
        return service.get_status(request, self.c, _metadata(context))

    def GetResult(  # noqa: N802
        self, request: coordinator_pb2.QueryRef, context: grpc.ServicerContext
    ) -> common_pb2.QueryResult:
        return service.get_result(request, self.c, _metadata(context))

    def GetBudget(  # noqa: N802
        self, request: coordinator_pb2.GetBudgetRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.GetBudgetResponse:
        return service.get_budget(request, self.c, _metadata(context))

    def ListQueries(  # noqa: N802
        self, request: common_pb2.Empty, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListQueriesResponse:
        return service.list_queries(self.c, _metadata(context))


def build_server(config: CoordinatorConfig) -> tuple[Server, Coordinator]:
    if config.analysts is None and not is_loopback(config.listen):
        # Self-declared analyst names let anyone who reaches the coordinator act as an analyst the
        # owners allow: development only, so loopback only (as plaintext is).
        raise ConfigError(
            f"refusing to serve unauthenticated analysts on {config.listen}: it is not a loopback address; "
            "configure [analysts] (docs/configuration.md)",
            details={"address": config.listen},
        )
    coordinator = Coordinator(config)
    # Server-only TLS: analysts authenticate with their token, parties sign what they send.
    server = create_server(config.listen, tls=config.tls)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator), server.grpc)
    return server, coordinator


def serve(config: CoordinatorConfig, *, port_file: str | None = None) -> None:
    server, coordinator = build_server(config)
    server.start()
    log.info("coordinator listening on port %d", server.port)
    if config.analysts is None:
        log.warning("no [analysts] configured: analysts are NOT authenticated (names are self-declared)")
    if port_file:
        Path(port_file).write_text(str(server.port))
    server.serve_until_signalled(on_stop=coordinator.shutdown)
