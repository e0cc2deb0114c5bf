"""The enclave as an MPC player: a TEE stage that feeds an MPC stage (hybrid plans, docs/mpc.md).

Owners who accept the enclave stream sealed batches to it as for any TEE stage. Instead of running
the query and releasing cells, the job computes those inputs' partial aggregates over the MPC
stage's public group domain (:func:`mpc.partials.local_partials`, the same code every owner's own
player runs), drops the rows, and joins the MPC stage as the player the plan names (``holders``:
``{"stage": "<this stage>"}``) next to the ``mpc_only`` owners' players:

1. :meth:`FeedPlayer.prepare` (after every owner's approval is checked and every input arrived):
   the partials, the player's name-constrained CA (:class:`mpc.tls.PlayerIdentity`) signed with
   the job's attested key, and the job's signed feed document (what arrived from whom, the rules,
   the attestation) with evidence binding the job's keys to the plan hash. The ``mpc_only``
   owners check that evidence before their players trust the enclave's CA: the player is this
   enclave, not the coordinator posing as one.
2. :meth:`FeedPlayer.run`: verify every offer against the identities the plan names, run the
   player (``python -m mpc.player``, its own process: the worker itself never imports MPyC), and
   sign the opened result with the job's key.

Only secret shares of the partials leave the enclave, to the other players, over mutual TLS.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mpc.partials import Partials, local_partials
from mpc.result import MpcResult
from mpc.session import PlayerProcess, bounded_timeout, free_ports, player_addresses
from mpc.tls import PlayerIdentity, PlayerOffer, identity_keys
from sealroom.errors import InvalidQueryError, JobFailedError, MpcError
from sealroom.planning.mpc_spec import StageSpec
from sealroom.planning.plan import (
    EnclaveHolder,
    MpcStage,
    Plan,
    PlanInput,
    TeeStage,
    mpc_player_keys,
    mpc_session,
)
from sealroom.signing import LogPosition

log = logging.getLogger(__name__)

# The name the planner gives the enclave's player (coordinator.planner.ENCLAVE_PLAYER).
ENCLAVE_PLAYER = "enclave"


@dataclass
class FeedPlayer:
    """The MPC side of one feeding job: which player it is, and (once prepared) its state."""

    plan: Plan
    stage: TeeStage
    mpc_stage: MpcStage
    spec: StageSpec
    index: int
    host: str
    scratch: Path
    partials: Partials | None = None
    identity: PlayerIdentity | None = None
    port: int = 0
    kill: Callable[[], None] | None = None  # stops the running player process (abort, job failure)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the job ended: never start
    log: LogPosition | None = None  # the query's log position, as the approvals signed it (PrepareMpc)

    @classmethod
    def for_stage(cls, plan: Plan, stage: TeeStage, *, host: str, scratch: Path) -> FeedPlayer:
        """Check that ``stage`` feeds an MPC stage of ``plan`` as exactly one input-holding player
        (the enclave's), in the MPC stage's own session, among players whose identities the plan
        names. Whether the MPC stage applies the rules of every dataset streamed to this enclave
        (k, privacy units, bounds, dominance, column roles, at most t helper players; its filters
        recomputed for its query) is :func:`sealroom.planning.checks.check_plan`'s, which
        :func:`enclave_worker.admission.admit` runs first. Raises InvalidQueryError."""
        target = plan.fed_stage(stage)
        spec = target.spec
        mine = [i for i, h in target.holders.items() if isinstance(h, EnclaveHolder) and h.stage == stage.id]
        if (
            len(mine) != 1
            or not 0 <= mine[0] < len(spec.players)
            or not spec.players[mine[0]].holds_input
            or spec.players[mine[0]].name != ENCLAVE_PLAYER
        ):
            raise InvalidQueryError(
                f"plan is inconsistent: stage {stage.feeds} does not name the enclave as the one player holding "
                f"stage {stage.id}'s partials"
            )
        if spec.session_id != f"{plan.query_id}-{target.id}":
            raise InvalidQueryError("plan is inconsistent: the MPC stage's session is not its own")
        mpc_player_keys(plan, target)  # every other player has an identity the enclave can check
        check_scratch(scratch)  # before any data arrives
        return cls(plan, stage, target, spec, mine[0], host, scratch)

    def stop(self) -> None:
        """The job ended (failed, aborted or done): drop the partials; the player never starts, or
        is killed if it runs."""
        self.partials = None
        self.cancelled.set()
        if self.kill is not None:
            self.kill()

    def prepare(self, tables: list[tuple[PlanInput, pa.Table]], sign: Callable[[bytes], bytes]) -> dict[str, Any]:
        """Compute the partials from the inputs' rows (each with its privacy unit as the stage's
        unit column), create the player's identity and reserve its port; return the offer."""
        self.partials = local_partials(_rows(tables, self.spec), self.spec, party=ENCLAVE_PLAYER)
        self.identity = PlayerIdentity(mpc_session(self.plan, self.mpc_stage.id), self.index)
        (self.port,) = free_ports(1, self.host)
        offer = self.identity.offer(sign)
        return {
            "index": self.index,
            "offer_json": json.dumps(offer.to_dict()).encode(),
            "host": self.host,
            "port": self.port,
        }

    def run(
        self,
        offers: list[dict[str, Any]],
        own_key: Ed25519PublicKey,
        sign: Callable[[bytes], bytes],
        *,
        timeout_seconds: float,
        on_cancel: Callable[[Callable[[], None]], object] | None = None,
    ) -> tuple[bytes, bytes]:
        """Run the player with every player's offer; return the opened result (canonical JSON) and
        the job key's signature over it. Raises MpcError naming the player that failed."""
        if self.cancelled.is_set():
            raise JobFailedError("the job ended before its MPC player ran; nothing was released")
        if self.partials is None or self.identity is None:
            raise MpcError(
                "the enclave's player was not prepared (PrepareMpc comes first)",
                details={"reason": "not_prepared", "player": self.index},
            )
        parsed = [PlayerOffer.from_dict(json.loads(o["offer_json"])) for o in offers]
        addresses = player_addresses(
            self.spec,
            self.index,
            {int(o["index"]): (str(o["host"]), int(o["port"])) for o in offers},
            (self.host, self.port),
        )
        # Every player's identity key as the plan names it (which every owner approved); this player's
        # own is the job's key. Never a key the request brings, or whoever calls could add players.
        identities = identity_keys(mpc_player_keys(self.plan, self.mpc_stage), own_key)
        credentials = self.identity.credentials(parsed, identities)
        timeout = bounded_timeout(timeout_seconds)
        partials, self.partials = self.partials, None  # the player process holds them from here on
        with PlayerProcess(
            self.spec,
            self.index,
            addresses=addresses,
            credentials=credentials,
            partials=partials,
            start_timeout=min(30.0, timeout),
            run_timeout=timeout,
            bind_host=self.host,
            # Its TLS key is a file MPyC reads: in memory inside the TEE, never on a disk the host sees
            # (a private directory under the scratch directory, removed when the player ends).
            scratch=check_scratch(self.scratch),
        ) as player:
            del partials
            self.kill = player.kill
            if self.cancelled.is_set():  # the job ended meanwhile: start() now refuses
                player.kill()
            player.start()
            if on_cancel is not None and on_cancel(player.kill) is False:
                player.kill()
            doc = player.wait()
        result = MpcResult.from_opened(self.spec, doc["result"], log=self.log)
        log.info("MPC stage %s of plan %s: enclave player %d done", self.mpc_stage.id, self.plan.hash[:12], self.index)
        return result.canonical(), sign(result.signing_message())


# Filesystems whose files live in memory (statfs f_type): inside a confidential VM that memory is
# the guest's (encrypted); on a disk, the host could read the player's TLS key.
MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 512)]  # f_type comes first on Linux


def filesystem_type(path: Path) -> int | None:
    """The statfs magic of the filesystem ``path`` (a directory, not followed if a symlink) is on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        buf = _StatFs()
        if ctypes.CDLL(None, use_errno=True).fstatfs(fd, ctypes.byref(buf)) != 0:
            return None
        return int(buf.f_type) & 0xFFFFFFFF
    except (OSError, AttributeError):  # no libc fstatfs (not Linux)
        return None
    finally:
        os.close(fd)


def check_scratch(path: Path) -> Path:
    """``path`` (resolved) if it is a directory on a memory-backed filesystem (tmpfs or ramfs, asked
    of the kernel for the directory itself); else InvalidQueryError saying to set
    ``[enclave] mpc_scratch_dir``."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        real = None
    kind = filesystem_type(real) if real is not None else None
    if kind not in MEMORY_FILESYSTEMS:
        raise InvalidQueryError(
            "the enclave's MPC player needs a memory-backed scratch directory for its TLS key (a tmpfs inside the "
            f"TEE), and {path} is not one: set [enclave] mpc_scratch_dir to such a directory",
            details={"check": "mpc_scratch_dir"},
        )
    assert real is not None
    return real


def _rows(tables: list[tuple[PlanInput, pa.Table]], spec: StageSpec) -> pa.Table:
    """The enclave's rows for the stage, as one table: every input's columns the stage reads (group
    columns and measures), with its privacy unit as the stage's unit column, types unified across
    inputs (an int32 and an int64 column, or float32 and float64, are one column). Units of
    different inputs are compared as text (a unit that two owners hold counts once: the count can
    only come out lower, never higher); an input whose owner declares no privacy unit counts each
    row as its own unit."""
    lay = spec.layout
    needed = [g.name for g in spec.group_by]
    for r in (*lay.rows, *lay.extrema):
        if ":" in r and r.split(":", 1)[1] not in needed:
            needed.append(r.split(":", 1)[1])
    parts = []
    for n, (inp, table) in enumerate(tables):
        missing = [c for c in needed if c not in table.schema.names]
        if missing:
            raise InvalidQueryError(
                f"{inp.qualified} brings no column {missing[0]}, which the MPC stage reads",
                details={"dataset": inp.qualified, "column": missing[0]},
            )
        part = table.select(needed)
        if spec.unit_column is not None:
            unit = inp.policy.privacy_unit
            if unit is not None:
                units = pc.cast(table.column(unit), pa.string())
            else:
                units = pa.array([f"\x00row:{n}:{i}" for i in range(table.num_rows)], pa.string())
            part = part.append_column(spec.unit_column, units)
        parts.append(part)
    if not parts:
        return pa.table({})
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise InvalidQueryError(
            "the streamed inputs' columns the MPC stage reads have types that do not combine (e.g. text and "
            "numbers under one name)",
            details={"check": "schema"},
        ) from None
