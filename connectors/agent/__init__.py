"""The party agent: a data owner's long-running process.

It registers its datasets with the coordinator (schema and policy digest only), reviews each plan
that touches its data against its own policy and signs the plan hash, and, for a plan it signed
itself, verifies the enclave's evidence against its own trust policy and streams only the columns
the plan needs, sealed to the enclave's attested job key. Its rows leave it only that way
(invariant 1); its signing key never leaves it.

Filter pushdown: when the plan gives one of its inputs a filter, the agent checks that the filter is
exactly the one :func:`sealroom.planning.plan.stage_pushdown` derives from the plan's SQL (so the
coordinator cannot slip in a predicate of its own), applies it itself with a locked-down DuckDB over
the streamed batches, and sends only the matching rows, padded so that the stream's size does not
tell how many matched (see :func:`padded_batches`).

Manual approval: when any of its datasets in a plan has ``approval = "manual"``, the agent runs every
policy check and then holds the plan for its owner (``pending``) instead of signing it. The owner
decides with ``sealroom approve/reject/revoke`` -- commands signed with the party's own key, so nobody
else who can reach the agent (the coordinator included) can decide for the owner. Every approval,
manual or automatic, lapses after ``approval_ttl_seconds``; the agent streams only for a plan whose
approval it holds, live, itself.

The package: ``config`` (the agent's configuration), ``review`` (the checks before it signs),
``approvals`` (the plans it holds, their state and lapse, the owner's commands as they change it),
``party`` (the agent: reviewing, carrying out the owner's commands, contributing), ``streaming``
(filtering, padding and framing what it streams) and ``servicer`` (the gRPC surface). Its MPC
players (:mod:`connectors.mpc_player`) know it only through the callbacks it gives them.
"""

from __future__ import annotations

from connectors.agent.config import DatasetConfig, PartyConfig
from connectors.agent.party import PartyAgent
from connectors.agent.servicer import PartyServicer, build_server, serve
from connectors.agent.streaming import (
    MIN_PADDED_ROWS,
    TARGET_FRAME_BYTES,
    StreamCounter,
    filtered_batches,
    frame_rows,
    padded_batches,
    rebatch,
)

__all__ = [
    "MIN_PADDED_ROWS",
    "TARGET_FRAME_BYTES",
    "DatasetConfig",
    "PartyAgent",
    "PartyConfig",
    "PartyServicer",
    "StreamCounter",
    "build_server",
    "filtered_batches",
    "frame_rows",
    "padded_batches",
    "rebatch",
    "serve",
]
