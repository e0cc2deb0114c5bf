"""A data owner's MPC player: the agent's side of an MPC stage (docs/adr/0004).

For a plan the owner approved, :meth:`MpcPlayers.prepare` computes the owner's partial aggregates
over the stage's public group domain from its own rows (the same projection and filters as a TEE
stage; nothing leaves the agent here), creates the player's name-constrained CA and key
(:class:`mpc.tls.PlayerIdentity`) and returns the CA signed with the owner's key, with the address
the player will listen on. :meth:`MpcPlayers.run` verifies every player's offer against the
identities the plan names (owners' keys; helpers are name-constrained to their own index), runs the
player (:class:`mpc.session.PlayerProcess`, its own process: the agent never imports MPyC), and
returns the opened result signed with the owner's key. Only secret shares of the partials leave the
agent, to the other players, over mutual TLS.

The players know their agent only through :class:`PlayerOwner`: its name, policies and schemas, and
callbacks for what only the agent decides (which plans it approved, its rows for an input, its
appraisal of an enclave, its signature). The agent builds them; this module never imports it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mpc.partials import Partials, local_partials
from mpc.result import MpcResult
from mpc.session import PlayerProcess, bounded_timeout, free_ports, player_addresses
from mpc.tls import PlayerIdentity, PlayerOffer, identity_keys
from sealroom.attestation import Claims, Evidence
from sealroom.errors import ApprovalError, InvalidQueryError, MpcError
from sealroom.planning.mpc_spec import StageSpec
from sealroom.planning.plan import (
    MpcStage,
    PartyHolder,
    Plan,
    PlanInput,
    mpc_player_keys,
    mpc_session,
    mpc_stage_query,
)
from sealroom.policy import DatasetPolicy
from sealroom.signing import LogPosition
from sealroom.v1 import party_pb2

log = logging.getLogger(__name__)

# Prepared players waiting for RunMpc (bounded; oldest first), and how long one may wait.
MAX_PREPARED = 64
PREPARED_TTL_SECONDS = 600.0


@dataclass(frozen=True)
class PlayerOwner:
    """What the MPC players need of their data owner's agent.

    ``approved_plan(plan_json)``: the plan, if the agent holds a live approval of exactly these bytes
    (else it raises why not); ``input_rows(input)``: the owner's rows for one plan input, its columns
    filtered by the owner itself; ``verify_enclave(evidence, hpke_pk, signing_pk, nonce)``: the
    claims of evidence that passes the agent's appraisal (else it raises); ``mark_used(plan_hash)``:
    data moved for the plan; ``sign(message)``: the owner's Ed25519 signature."""

    name: str
    policies: Mapping[str, DatasetPolicy]
    schemas: Mapping[str, pa.Schema]
    approved_plan: Callable[[bytes], Plan]
    input_rows: Callable[[PlanInput], Iterator[pa.RecordBatch]]
    verify_enclave: Callable[[Evidence, bytes, bytes, bytes], Claims]
    mark_used: Callable[[str], None]
    sign: Callable[[bytes], bytes]
    # Before the owner's data moves for a plan: ``claim(plan_hash, use)`` raises if that use of this
    # plan's data happened already (connectors.agent.approvals.Approvals.claim).
    claim: Callable[[str, str], None] = lambda plan_hash, use: None
    # The log position the owner's approval of a plan (by hash) signs; None when it signs none.
    logged: Callable[[str], LogPosition | None] = lambda plan_hash: None


@dataclass
class _Prepared:
    plan: Plan
    spec: StageSpec
    identity: PlayerIdentity
    partials: Partials
    host: str
    port: int
    created: float
    offer: party_pb2.MpcOffer | None = None


def mpc_stage(plan: Plan, stage_id: str) -> tuple[MpcStage, StageSpec]:
    for stage in plan.mpc_stages():
        if stage.id == stage_id:
            return stage, stage.spec
    raise InvalidQueryError(f"the plan has no MPC stage {stage_id!r}", details={"stage": stage_id})


class MpcPlayers:
    """The MPC players one agent runs, at most one per (plan, stage, index)."""

    def __init__(self, owner: PlayerOwner, *, host: str = "127.0.0.1"):
        self.owner = owner
        self.host = host
        self._lock = threading.Lock()
        self._prepared: OrderedDict[tuple[str, str, int], _Prepared] = OrderedDict()

    # -- PrepareMpc ---------------------------------------------------------------------------

    def prepare(self, plan_json: bytes, stage_id: str, index: int) -> party_pb2.MpcOffer:
        me = self.owner.name
        plan = self.owner.approved_plan(plan_json)
        stage, spec = mpc_stage(plan, stage_id)
        holder = stage.holders.get(index)
        if not isinstance(holder, PartyHolder) or holder.party != me:
            raise ApprovalError(
                f"player {index} of stage {stage_id} is not {me}'s to run", details={"party": me, "player": index}
            )
        mpc_stage_query(plan, stage)  # the stage computes what its SQL says (raises otherwise)
        mine = [i for i in stage.inputs if i.party == me and i.dataset in holder.datasets]
        if not mine:
            raise ApprovalError(f"{me} holds no input of stage {stage_id}", details={"party": me})
        key = (plan.hash, stage_id, index)
        with self._lock:
            self._prune()
            earlier = self._prepared.get(key)
        if earlier is not None and earlier.offer is not None:
            return earlier.offer  # prepared already: the same player (a second call replaces nothing)
        partials = local_partials(self._rows(mine, spec), spec, party=me)
        identity = PlayerIdentity(mpc_session(plan, stage_id), index)
        (port,) = free_ports(1, self.host)
        offer = party_pb2.MpcOffer(
            index=index,
            offer_json=json.dumps(identity.offer(self.owner.sign).to_dict()).encode(),
            host=self.host,
            port=port,
        )
        prepared = _Prepared(plan, spec, identity, partials, self.host, port, time.monotonic(), offer)
        with self._lock:
            self._prune()
            earlier = self._prepared.setdefault(key, prepared)  # two calls at once: the first one stays
        log.info("MPC stage %s of plan %s: player %d prepared", stage_id, plan.hash[:12], index)
        return earlier.offer or offer

    def _rows(self, inputs: list[PlanInput], spec: StageSpec) -> Iterator[pa.RecordBatch]:
        """This owner's rows for the stage: each input's columns, filtered by the owner itself, with
        its privacy unit (whatever each dataset calls it) as the stage's unit column."""

        def one(inp: PlanInput) -> Iterator[pa.RecordBatch]:
            registered = self.owner.schemas[inp.dataset]
            batches = self.owner.input_rows(inp)
            if spec.unit_column is None:
                return batches
            unit = self.owner.policies[inp.dataset].privacy_unit  # the owner's own policy, not the plan's
            if unit is None or spec.unit_column in registered.names:
                raise ApprovalError(
                    f"the MPC stage counts units in a column {inp.dataset} does not derive from its privacy unit",
                    details={"party": self.owner.name, "dataset": inp.dataset, "rule": "privacy_unit"},
                )
            return (
                pa.RecordBatch.from_arrays([*b.columns, b.column(unit)], names=[*b.schema.names, spec.unit_column])
                for b in batches
            )

        return itertools.chain.from_iterable(one(i) for i in inputs)

    def _prune(self) -> None:
        now = time.monotonic()
        for key, p in list(self._prepared.items()):
            if now - p.created > PREPARED_TTL_SECONDS:
                del self._prepared[key]
        while len(self._prepared) >= MAX_PREPARED:
            self._prepared.popitem(last=False)

    # -- RunMpc -------------------------------------------------------------------------------

    def run(
        self, request: party_pb2.RunMpcRequest, *, on_cancel: Callable[[Callable[[], None]], object] | None = None
    ) -> party_pb2.MpcOutcome:
        me = self.owner.name
        plan = self.owner.approved_plan(request.plan_json)
        stage, spec = mpc_stage(plan, request.stage_id)
        key = (plan.hash, request.stage_id, request.index)
        with self._lock:  # taken only once the request checks out: a bad request does not use it up
            prepared = self._prepared.get(key)
        if prepared is None:
            raise ApprovalError(
                f"{me} has no prepared player {request.index} for stage {request.stage_id} of this plan "
                "(prepare it first; a prepared player waits at most "
                f"{PREPARED_TTL_SECONDS:.0f} s)",
                details={"party": me, "player": request.index},
            )
        offers = [PlayerOffer.from_dict(json.loads(o.offer_json)) for o in request.offers]
        addresses = player_addresses(
            spec,
            request.index,
            {o.index: (o.host, int(o.port)) for o in request.offers},
            (prepared.host, prepared.port),
        )
        enclave = self._enclave_key(plan, stage, request.enclave) if request.HasField("enclave") else None
        # Every player's identity key as the plan names it (the helpers' too: never one the request
        # brings, or whoever calls could add players of its own); the enclave's is its attested key.
        identities = identity_keys(mpc_player_keys(plan, stage), enclave)
        credentials = prepared.identity.credentials(offers, identities)
        with self._lock:
            if self._prepared.get(key) is not prepared:
                raise ApprovalError(
                    f"{me}'s player {request.index} for stage {request.stage_id} is already running or gone",
                    details={"party": me, "player": request.index},
                )
            del self._prepared[key]
        # One run of this player per plan: a second run of the stage would be a second release.
        self.owner.claim(plan.hash, f"mpc:{request.stage_id}:{request.index}")
        # The coordinator proposes the deadline; the owner bounds it (a player never runs for longer).
        timeout = bounded_timeout(float(request.timeout_seconds))
        self.owner.mark_used(plan.hash)
        with PlayerProcess(
            spec,
            request.index,
            addresses=addresses,
            credentials=credentials,
            partials=prepared.partials,
            start_timeout=min(30.0, timeout),
            run_timeout=timeout,
            bind_host=prepared.host,
        ) as player:
            player.start()
            # gRPC runs it when the call ends, cancelled or not; False: the call has ended already.
            if on_cancel is not None and on_cancel(player.kill) is False:
                player.kill()
            doc = player.wait()
        result = MpcResult.from_opened(spec, doc["result"], log=self.owner.logged(plan.hash))
        log.info("MPC stage %s of plan %s: player %d done", request.stage_id, plan.hash[:12], request.index)
        return party_pb2.MpcOutcome(result_json=result.canonical(), signature=self.owner.sign(result.signing_message()))

    def _enclave_key(self, plan: Plan, stage: MpcStage, enclave: party_pb2.EnclavePlayer) -> Ed25519PublicKey:
        """The enclave player's identity key (hybrid plans): the signing key of the job that the
        evidence binds to this plan's hash. The evidence must pass this agent's own appraisal and
        the trust section of every dataset streamed to that enclave (as the plan carries those
        owners' policies): this owner does not send the enclave its data, but its player must know
        the enclave is the code those owners accepted, not the coordinator posing as a player."""
        feeding = plan.feeding(stage)
        if not feeding:
            raise MpcError(
                "the coordinator sent an enclave player for a stage no TEE stage feeds",
                details={"reason": "identity", "stage": stage.id},
            )
        evidence = Evidence.from_bytes(bytes(enclave.evidence))
        signing = bytes(enclave.signing_public_key)
        claims = self.owner.verify_enclave(evidence, bytes(enclave.hpke_public_key), signing, bytes.fromhex(plan.hash))
        for s in feeding:
            for inp in s.inputs:
                inp.policy.trust.check(claims, dataset=inp.qualified)
        return Ed25519PublicKey.from_public_bytes(signing)
