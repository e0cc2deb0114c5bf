"""Running a plan's MPC stage: the coordinator's side (docs/adr/0004, docs/mpc.md).

The owners' agents run the players that hold their partial aggregates; the coordinator runs the
helper players the plan adds (they hold no input), each as its own ``python -m mpc.player``
process (the coordinator never imports MPyC). The exchange:

1. ``PrepareMpc`` at every owner holding a player: the agent checks its own approval of the plan,
   computes its partials from its own rows, and returns its player's name-constrained CA signed with
   the owner's key, and the address its player will listen on. The coordinator creates its helpers'
   identities the same way, under a key made for this session.
2. ``RunMpc`` at every owner at once, with every offer: each player verifies every offer against the
   identities the plan names before it trusts any CA, then the players run; the coordinator's
   helpers run beside them.
3. Every owner returns the opened result signed with its key; the coordinator checks the
   signatures and that every player opened the same result, then applies the stage's release
   (output columns, HAVING on released cells, ORDER BY, LIMIT).

A player that fails, stalls or disconnects ends the stage: every call returns an error naming it,
the coordinator's helpers are killed, and nothing is released.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import duckdb
import grpc
import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mpc.result import MpcResult, result_table, signing_message
from mpc.session import PlayerProcess, free_ports
from mpc.tls import PlayerIdentity, PlayerOffer
from sealroom import pki
from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError, JobFailedError, MpcError, SealroomError
from sealroom.planning.plan import (
    EnclaveHolder,
    Holder,
    MpcStage,
    PartyHolder,
    Plan,
    PlanInput,
    Release,
    mpc_player_keys,
    mpc_session,
)
from sealroom.rpc import Peer, call
from sealroom.signing import LogPosition
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

log = logging.getLogger(__name__)

RELEASE_VERSION = 1


@dataclass(frozen=True)
class MpcRelease:
    """A verified MPC release: the released table, the suppressed cells, and the signed record."""

    table: pa.Table
    suppressed: list[dict[str, Any]]
    record: dict[str, Any]  # what is stored as the release's result document (see release_record)


def plan_mpc_stage(plan: Plan) -> MpcStage | None:
    """The plan's MPC stage (None for a TEE plan). Every TEE stage of a plan with an MPC stage must
    feed it: the runtime runs one MPC stage, fed by at most one enclave job."""
    mpc = plan.mpc_stages()
    if not mpc:
        return None
    tee = plan.tee_stages()
    if len(mpc) != 1 or len(tee) > 1 or any(s.feeds != mpc[0].id for s in tee):
        raise InvalidQueryError(
            "this plan's stages are not one MPC stage, fed by at most one TEE stage; re-plan the query",
            details={"stage": mpc[0].id, "kind": "mpc"},
        )
    return mpc[0]


def enclave_player_index(stage: MpcStage) -> int:
    """The index of the enclave's player in ``stage`` (a hybrid plan's MPC stage)."""
    mine = [i for i, h in stage.holders.items() if isinstance(h, EnclaveHolder)]
    if len(mine) != 1:
        raise InvalidQueryError("plan is inconsistent: the MPC stage names no single enclave player")
    return mine[0]


@dataclass(frozen=True)
class EnclavePlayer:
    """The enclave's player in a hybrid plan's MPC stage: its job (at ``address``), prepared
    (``offer``), and what the owners' players check before they trust its CA (``attested``: the
    evidence binding the job's keys to the plan hash; the coordinator verified it already)."""

    index: int
    address: str
    tls_certificate: bytes  # the enclave's TLS certificate, which the job's evidence binds (pinned)
    job_id: str
    job_token: bytes  # the job's creator's token (CreateJob): only it may run the job's player
    offer: party_pb2.MpcOffer
    attested: party_pb2.EnclavePlayer

    @property
    def key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(bytes(self.attested.signing_public_key))


def run_mpc_stage(
    plan: Plan,
    stage: MpcStage,
    *,
    addresses: dict[str, str],
    channel: Callable[[str, Peer], AbstractContextManager[grpc.Channel]],
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    prepare_enclave: Callable[[], EnclavePlayer] | None = None,
    helper: tuple[str, Callable[[bytes], bytes]] | None = None,
    log_position: LogPosition | None = None,
) -> MpcRelease:
    """Run ``stage`` with the owners' agents (party -> agent address) and return the verified release;
    raises MpcError or JobFailedError naming the player or party when anything fails.
    ``prepare_enclave`` (hybrid plans): prepares the enclave's player and returns it, called once the
    owners' players are prepared (so the evidence they check is fresh). ``helper``: the
    coordinator's identity (public key hex and ``sign``) for the helper players the plan names.
    ``log_position``: the query's log position; every player's result must bind it (the owners' players take
    it from their approvals, the enclave's from its PrepareMpc), or they disagree."""
    run = _StageRun(
        plan,
        stage,
        _Roster.of(stage, prepare_enclave is not None),
        _Calls(addresses, channel),
        host,
        timeout,
        log_position,
    )
    # 1. Offers: the owners' players, then the enclave's (prepared last, so the evidence the owners
    # check is fresh), then the coordinator's helpers.
    offers = run.prepare_owners()
    enclave = run.prepare_enclave(prepare_enclave, offers) if prepare_enclave is not None else None
    identities = _identities(plan, stage, enclave)
    helpers = run.prepare_helpers(helper, offers)
    all_offers = [offers[i] for i in range(len(stage.spec.players))]
    # 2. Run every player at once: the owners' through their agents, the helpers here.
    outcomes, helper_docs = run.run_players(all_offers, helpers, identities, enclave)
    # 3. Every player opened the same result, and every owner signed it.
    expected = run.agreed_result(identities, outcomes, helper_docs)
    table, suppressed, ci95 = release_cells(expected, stage.release)
    signatures = {stage.spec.players[i].name: outcomes[i].signature.hex() for i in outcomes}
    record = release_record(plan, stage, expected, signatures)
    if ci95 is not None:  # a dp stage: its mechanism and each released row's interval (as the enclave's)
        record["privacy"] = expected["privacy"]
        record["ci95"] = ci95
    log.info(
        "MPC stage %s of query %s: %d cells released, %d suppressed",
        stage.id,
        plan.query_id,
        table.num_rows,
        len(suppressed),
    )
    return MpcRelease(table, suppressed, record)


@dataclass(frozen=True)
class _Roster:
    """Who plays the stage: the owners' players (index -> holder), the enclave's, the helpers."""

    holders: dict[int, PartyHolder]
    helpers: list[int]
    fed: list[int]  # the enclave's player (a hybrid plan's), at most one
    names: dict[int, str]  # player index -> who runs it, for error messages

    @classmethod
    def of(cls, stage: MpcStage, with_enclave: bool) -> _Roster:
        holders = {i: h for i, h in stage.holders.items() if isinstance(h, PartyHolder)}
        fed = [i for i, h in stage.holders.items() if isinstance(h, EnclaveHolder)]
        if with_enclave != bool(fed):
            raise InvalidQueryError("the MPC stage's enclave player and the enclave job given do not match")
        names = {i: h.party for i, h in holders.items()}
        names.update({i: "the enclave" for i in fed})
        helpers = [i for i, p in enumerate(stage.spec.players) if not p.holds_input]
        return cls(holders, helpers, fed, names)


class _Calls:
    """The stage's calls to the owners' agents and the enclave; closing their channels cancels them."""

    def __init__(self, addresses: dict[str, str], channel: Callable[[str, Peer], AbstractContextManager[grpc.Channel]]):
        self._addresses = addresses
        self._channel = channel
        self._open: list[grpc.Channel] = []  # RunMpc calls in flight, closed to cancel them

    def party(self, party: str, method: str, request: Any, call_timeout: float) -> Any:
        with self._channel(self._addresses[party], pki.party(party)) as ch:
            self._open.append(ch)
            stub = party_pb2_grpc.PartyAgentStub(ch)
            try:
                return call(party, getattr(stub, method), request, timeout=call_timeout)
            except SealroomError as err:
                if isinstance(err, MpcError):
                    raise
                raise JobFailedError(
                    f"{party} could not take part in the MPC stage: {err.message}",
                    details={**err.details, "party": party, "cause": err.code},
                ) from None
            finally:
                self._open.remove(ch)

    def enclave(
        self, enclave: EnclavePlayer, request: enclave_pb2.EnclaveRunMpcRequest, call_timeout: float
    ) -> party_pb2.MpcOutcome:
        with self._channel(enclave.address, enclave.tls_certificate) as ch:
            self._open.append(ch)
            try:
                outcome: party_pb2.MpcOutcome = call(
                    "enclave", enclave_pb2_grpc.EnclaveStub(ch).RunMpc, request, timeout=call_timeout
                )
                return outcome
            except SealroomError as err:
                if isinstance(err, MpcError):
                    raise
                raise JobFailedError(
                    f"the enclave's MPC player could not take part in the MPC stage: {err.message}",
                    details={**err.details, "player": enclave.index, "cause": err.code},
                ) from None
            finally:
                self._open.remove(ch)

    def cancel(self) -> None:
        for ch in list(self._open):
            ch.close()


def _identities(plan: Plan, stage: MpcStage, enclave: EnclavePlayer | None) -> dict[int, Ed25519PublicKey]:
    """Every player's identity key, as the plan names it (the enclave's: its attested job key)."""
    keys = mpc_player_keys(plan, stage)
    identities = {i: Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for i, k in keys.items() if k is not None}
    if enclave is not None:
        identities[enclave.index] = enclave.key
    return identities


@dataclass(frozen=True)
class _StageRun:
    """One run of an MPC stage, step by step (see run_mpc_stage)."""

    plan: Plan
    stage: MpcStage
    roster: _Roster
    calls: _Calls
    host: str
    timeout: float
    log: LogPosition | None = None  # the query's log position: every player's result binds it

    def prepare_owners(self) -> dict[int, party_pb2.MpcOffer]:
        """PrepareMpc at every owner holding a player, at once; their offers by player index."""
        plan_json = self.plan.to_json()
        with ThreadPoolExecutor(max_workers=max(1, len(self.roster.holders))) as pool:
            futures = {
                i: pool.submit(
                    self.calls.party,
                    h.party,
                    "PrepareMpc",
                    party_pb2.PrepareMpcRequest(plan_json=plan_json, stage_id=self.stage.id, index=i),
                    self.timeout,
                )
                for i, h in self.roster.holders.items()
            }
            return {i: f.result() for i, f in futures.items()}

    def prepare_enclave(
        self, prepare: Callable[[], EnclavePlayer], offers: dict[int, party_pb2.MpcOffer]
    ) -> EnclavePlayer:
        """The enclave's player, prepared; its offer added to ``offers``."""
        enclave = prepare()
        if enclave.offer.index != enclave.index or [enclave.index] != self.roster.fed:
            raise MpcError(
                "the enclave returned an offer for another player",
                details={"reason": "identity", "player": enclave.index},
            )
        offers[enclave.index] = enclave.offer
        return enclave

    def prepare_helpers(
        self, helper: tuple[str, Callable[[bytes], bytes]] | None, offers: dict[int, party_pb2.MpcOffer]
    ) -> dict[int, PlayerIdentity]:
        """The coordinator's helper players' identities, under its key (the one the plan names);
        their offers added to ``offers``."""
        keys = mpc_player_keys(self.plan, self.stage)
        identities: dict[int, PlayerIdentity] = {}
        for i in self.roster.helpers:
            if helper is None or keys[i] != helper[0]:
                raise MpcError(
                    f"the plan names another identity for helper player {i} than this coordinator's key; "
                    "re-plan the query",
                    details={"reason": "identity", "player": i},
                )
            identity = PlayerIdentity(mpc_session(self.plan, self.stage.id), i)
            (port,) = free_ports(1, self.host)
            offer = identity.offer(helper[1])
            identities[i] = identity
            offers[i] = party_pb2.MpcOffer(
                index=i, offer_json=json.dumps(offer.to_dict()).encode(), host=self.host, port=port
            )
        return identities

    def _helper_processes(
        self,
        all_offers: list[party_pb2.MpcOffer],
        helpers: dict[int, PlayerIdentity],
        identities: dict[int, Ed25519PublicKey],
    ) -> list[PlayerProcess]:
        parsed = [PlayerOffer.from_dict(json.loads(o.offer_json)) for o in all_offers]
        return [
            PlayerProcess(
                self.stage.spec,
                i,
                addresses=[(o.host, int(o.port)) for o in all_offers],
                credentials=identity.credentials(parsed, identities),
                partials=None,
                start_timeout=min(30.0, self.timeout),
                run_timeout=self.timeout,
                bind_host=self.host,
            )
            for i, identity in helpers.items()
        ]

    def _submit_all(
        self,
        pool: ThreadPoolExecutor,
        all_offers: list[party_pb2.MpcOffer],
        helper_players: list[PlayerProcess],
        enclave: EnclavePlayer | None,
    ) -> dict[Future[Any], tuple[str, int]]:
        """RunMpc at every owner and the enclave, and the helpers' waits: each future with its
        player's kind (``party`` or ``helper``) and index."""
        plan_json = self.plan.to_json()
        runs: dict[Future[Any], tuple[str, int]] = {}
        for i, h in self.roster.holders.items():
            request = party_pb2.RunMpcRequest(
                plan_json=plan_json,
                stage_id=self.stage.id,
                index=i,
                offers=all_offers,
                timeout_seconds=self.timeout,
                enclave=enclave.attested if enclave is not None else None,
            )
            runs[pool.submit(self.calls.party, h.party, "RunMpc", request, self.timeout + 30)] = ("party", i)
        runs.update({pool.submit(p.wait): ("helper", p.index) for p in helper_players})
        if enclave is not None:
            to_enclave = enclave_pb2.EnclaveRunMpcRequest(
                job_id=enclave.job_id, offers=all_offers, timeout_seconds=self.timeout, job_token=enclave.job_token
            )
            runs[pool.submit(self.calls.enclave, enclave, to_enclave, self.timeout + 30)] = ("party", enclave.index)
        return runs

    def run_players(
        self,
        all_offers: list[party_pb2.MpcOffer],
        helpers: dict[int, PlayerIdentity],
        identities: dict[int, Ed25519PublicKey],
        enclave: EnclavePlayer | None,
    ) -> tuple[dict[int, party_pb2.MpcOutcome], list[dict[str, Any]]]:
        """Run every player at once; the signed outcomes (player index -> outcome) and the helpers'
        opened documents. The first failure ends the stage everywhere: the calls are cancelled and
        the helpers stopped, and it is raised."""
        helper_players = self._helper_processes(all_offers, helpers, identities)
        outcomes: dict[int, party_pb2.MpcOutcome] = {}
        helper_docs: list[dict[str, Any]] = []
        errors: list[BaseException] = []  # in the order they happened: the first is the cause
        try:
            for p in helper_players:
                p.start()
            workers = max(1, len(self.roster.holders) + len(helper_players) + len(self.roster.fed))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                runs = self._submit_all(pool, all_offers, helper_players, enclave)
                for fut in as_completed(runs):
                    kind, i = runs[fut]
                    try:
                        value = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - the first one is raised below
                        if not errors:  # end the stage everywhere at once: cancel the calls, stop the helpers
                            self.calls.cancel()
                            for p in helper_players:
                                p.kill()
                        errors.append(exc)
                        continue
                    if kind == "party":
                        outcomes[i] = value
                    else:
                        helper_docs.append(value)
            if errors:
                raise _first(errors)
        finally:
            for p in helper_players:
                p.close()
        return outcomes, helper_docs

    def agreed_result(
        self,
        identities: dict[int, Ed25519PublicKey],
        outcomes: dict[int, party_pb2.MpcOutcome],
        helper_docs: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The opened result, once every owner's signature over it verified and every player (the
        helpers too) opened the same one."""
        spec, names = self.stage.spec, self.roster.names
        docs = {i: json.loads(o.result_json) for i, o in outcomes.items()}
        for i, o in outcomes.items():
            try:
                identities[i].verify(o.signature, signing_message(docs[i]))
            except InvalidSignature:
                raise MpcError(
                    f"MPC player {i} ({names[i]}) returned a result its owner's key did not sign",
                    details={"reason": "signature", "player": i, "party": names[i]},
                ) from None
        expected: dict[str, Any] = (
            docs[min(docs)] if docs else MpcResult.from_opened(spec, helper_docs[0]["result"], log=self.log).to_dict()
        )
        digest = hashlib.sha256(canonical_json(expected)).hexdigest()
        for i, doc in docs.items():
            if hashlib.sha256(canonical_json(doc)).hexdigest() != digest:
                raise MpcError(
                    f"MPC player {i} ({names[i]}) opened a different result than the others",
                    details={"reason": "disagreement", "player": i, "party": names[i]},
                )
        for doc in helper_docs:
            if MpcResult.from_opened(spec, doc["result"], log=self.log).digest() != digest:
                raise MpcError("a helper player opened a different result", details={"reason": "disagreement"})
        return expected


def _first(errors: list[BaseException]) -> BaseException:
    """The error to report: the first that happened (the cause; the others are its consequences,
    or the cancellations it triggered), preferring one that names a failed player."""
    for exc in errors:
        if isinstance(exc, MpcError) and exc.details.get("reason") not in ("peer_disconnected", "start_timeout"):
            return exc
    return errors[0]


def apply_release(doc: dict[str, Any], release: Release) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The released table (output columns in order; HAVING, ORDER BY and LIMIT on released cells
    only) and the suppressed cells (group keys and the rule, never a value)."""
    table, suppressed, _ = release_cells(doc, release)
    return table, suppressed


def release_cells(
    doc: dict[str, Any], release: Release
) -> tuple[pa.Table, list[dict[str, Any]], dict[str, list[float]] | None]:
    """:func:`apply_release`, and for a dp stage the 95 % half-width of each released row per
    aggregate output column (in the released rows' order; None for a stage without dp)."""
    cells = result_table(doc)
    outputs = release.outputs
    table = pa.table({name: cells[source] for name, _kind, source in outputs})
    ci_doc = doc.get("ci95")
    ci_cols = {}
    if ci_doc is not None:  # carried through HAVING, ORDER BY and LIMIT, then split off
        ci_cols = {f"__ci95_{n}": name for n, (name, kind, source) in enumerate(outputs) if kind == "aggregate"}
        for hidden, name in ci_cols.items():
            source = next(src for nm, _k, src in outputs if nm == name)
            table = table.append_column(hidden, pa.array(ci_doc[source], pa.float64()))
    group_names = {source: name for name, kind, source in outputs if kind == "group"}
    if release.having or release.order_by or release.limit is not None:
        # DuckDB's relational API: each clause is parsed as one expression, never as statements, and
        # the analyst's output names are quoted identifiers (a '"' in a name is doubled).
        con = duckdb.connect(config={"enable_external_access": False, "threads": 1})
        try:
            rel = con.from_arrow(table)
            if release.having:
                rel = rel.filter(release.having)
            if release.order_by:
                rel = rel.order(
                    ", ".join(
                        f"{_ident(o.column)} {'DESC' if o.descending else 'ASC'} NULLS "
                        f"{'FIRST' if o.nulls_first else 'LAST'}"
                        for o in release.order_by
                    )
                )
            if release.limit is not None:
                rel = rel.limit(release.limit)
            table = rel.to_arrow_table()
        finally:
            con.close()
    ci95 = None
    if ci_doc is not None:
        ci95 = {name: [float(v) for v in table.column(hidden).to_pylist()] for hidden, name in ci_cols.items()}
        table = table.select([n for n in table.column_names if n not in ci_cols])
        return table, [], ci95
    k = doc["rule"]["min_group_size"]
    reason = (
        f"fewer than {k} {'distinct units' if doc['rule']['on'] == 'units' else 'rows'} in this cell "
        "(minimum group size, compared inside the MPC: the cell was never opened)"
    )
    suppressed = [
        {
            "group": {group_names.get(g, g): v for g, v in zip(doc["group_by"], key, strict=True)},
            "rule": "min_group_size",
            "reason": reason,
        }
        for key in doc["suppressed"]
    ]
    return table, suppressed, None


def _ident(name: object) -> str:
    return '"' + str(name).replace('"', '""') + '"'


def release_record(plan: Plan, stage: MpcStage, doc: dict[str, Any], signatures: dict[str, str]) -> dict[str, Any]:
    """The stored record of an MPC release: the opened result, the owners' signatures over it, the
    players and the trust assumption; what a receipt binds for an MPC stage."""

    def held(h: Holder) -> list[PlanInput]:
        if isinstance(h, EnclaveHolder):  # the enclave's player: the inputs of the TEE stage feeding this one
            return [i for s in plan.feeding(stage) if s.id == h.stage for i in s.inputs]
        if isinstance(h, PartyHolder):
            return [i for i in stage.inputs if i.party == h.party and i.dataset in h.datasets]
        return []

    inputs = [
        {"party": i.party, "dataset": i.dataset, "columns": list(i.columns), "player": n}
        for n, h in sorted(stage.holders.items())
        for i in held(h)
    ]
    return {
        "version": RELEASE_VERSION,
        "kind": "sealroom.mpc_release",
        "query_id": plan.query_id,
        "plan_hash": plan.hash,
        "stage": stage.id,
        "result": doc,
        "result_sha256": hashlib.sha256(canonical_json(doc)).hexdigest(),
        "signatures": signatures,
        "players": doc["players"],
        "trust_assumption": doc["trust_assumption"],
        "min_group_size": doc["rule"]["min_group_size"],
        "released_rows": len(doc["cells"]),
        "inputs": inputs,
        "simulated": False,
    }
