"""gRPC edge of the coordinator: thin servicers over the store, planner and orchestrator."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.orchestrator import Orchestrator
from coordinator.planner import RESERVED_PARTY_NAMES, catalog_from_rows, explain_text, plan_query
from coordinator.records import publish_collaboration, refusal_event
from coordinator.store import Store
from sealroom.audit.entries import is_ident
from sealroom.audit.notes import SignedCheckpoint
from sealroom.errors import AuthenticationError, InvalidQueryError, NotFoundError, SealroomError
from sealroom.keys import generate_signing_key, load_signing_key, public_key_hex, save_signing_key
from sealroom.policy import DatasetPolicy
from sealroom.rpc import Server, create_server, translate_errors
from sealroom.signing import check_issued_at, verify_owner_action
from sealroom.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_ANALYST = "analyst"
LOG_KEY_FILE = "log.key"  # the log's private key, when [coordinator] log_key is not set
LOG_VKEY_FILE = "log.vkey"  # the log's verifier key NAME+ID+KEY, published for reviewers
LOG_INFO_FILE = "log.json"  # origin, verifier key, public key and database, for reviewers' tools


def load_log_key(config: CoordinatorConfig) -> Ed25519PrivateKey:
    """The coordinator's log key: ``[coordinator] log_key``, or ``<state_dir>/log.key`` (created on first
    start, mode 0600)."""
    if config.log_key is not None:
        return load_signing_key(config.log_key)
    path = config.state_dir / LOG_KEY_FILE
    if not path.exists():
        save_signing_key(generate_signing_key(), path)
        log.info("created the transparency log key %s", path)
    return load_signing_key(path)


def publish_log_key(state_dir: Path, *, origin: str, vkey: str, public_key: str) -> None:
    """Write the log's public identity next to its database, for a reviewer with the state dir."""
    (state_dir / LOG_VKEY_FILE).write_text(vkey + "\n")
    info = {"origin": origin, "log_key": vkey, "public_key": public_key, "database": "coordinator.db"}
    (state_dir / LOG_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


class Coordinator:
    """The coordinator's behaviour, independent of gRPC."""

    def __init__(self, config: CoordinatorConfig):
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        key = load_log_key(config)
        self.store = Store(config.state_dir / "coordinator.db", log_key=key)
        assert self.store.log is not None
        publish_log_key(
            config.state_dir,
            origin=self.store.log.origin,
            vkey=self.store.log.signer.verifier.vkey(),
            public_key=public_key_hex(key),
        )
        publish_collaboration(self.store, config)  # for the record of processing (`sealroom audit ropa`)
        n = self.store.fail_in_flight("the coordinator restarted while this query was in flight; resubmit it")
        if n:
            log.warning("%d in-flight queries were marked failed after a restart", n)
        self.orchestrator = Orchestrator(
            self.store,
            enclave_address=config.enclave,
            appraisal=config.trust.appraisal(),
            party_timeout=config.party_timeout_seconds,
            approval_timeout=config.approval_timeout_seconds,
            mpc_host=config.mpc_host,
            mpc_timeout=config.mpc_timeout_seconds,
        )
        self._threads: dict[str, threading.Thread] = {}

    def register(self, request: coordinator_pb2.RegisterPartyRequest) -> list[str]:
        party = request.party
        if not party.name.isidentifier():
            raise InvalidQueryError("party names must be identifiers (letters, digits, _)")
        if party.name in RESERVED_PARTY_NAMES:
            raise InvalidQueryError(
                f"the party name {party.name!r} is reserved (it names a player the platform runs in MPC plans); "
                "register under another name",
                details={"party": party.name},
            )
        if len(party.signing_public_key) != 32:
            raise InvalidQueryError("signing_public_key must be a 32-byte Ed25519 public key")
        datasets = []
        for d in request.datasets:
            if d.party != party.name or not d.name.isidentifier():
                raise InvalidQueryError("each dataset must belong to the registering party and have an identifier name")
            policy = DatasetPolicy.from_json(d.policy_json)
            if policy.digest() != d.policy_digest:
                raise InvalidQueryError(f"the policy of {party.name}.{d.name} does not match its digest")
            datasets.append(
                {
                    "name": d.name,
                    "arrow_schema": bytes(d.arrow_schema),
                    "policy_json": bytes(d.policy_json),
                    "policy_digest": d.policy_digest,
                    "description": d.description,
                    "approximate_rows": max(0, int(d.approximate_rows)),
                }
            )
        self.store.register_party(party.name, party.address, bytes(party.signing_public_key).hex(), datasets)
        log.info("party %s registered %d datasets", party.name, len(datasets))
        return [f"{party.name}.{d['name']}" for d in datasets]

    def _plan(self, sql: str, analyst: str, query_id: str):
        catalog = catalog_from_rows(self.store.datasets())
        keys = {name: p["signing_public_key"] for name, p in self.store.parties().items()}
        helper = self.store.helper_identity()
        return plan_query(
            sql,
            query_id=query_id,
            analyst=analyst,
            catalog=catalog,
            party_keys=keys,
            helper_key=helper[0] if helper is not None else None,
        )

    def explain(self, sql: str, analyst: str):
        plan, analysis = self._plan(sql, analyst, "explain")
        rows = {f"{d['party']}.{d['name']}": d["approximate_rows"] for d in self.store.datasets()}
        return plan, explain_text(plan, analysis, rows)

    def submit(self, sql: str, analyst: str) -> tuple[str, str]:
        if not is_ident(analyst):
            raise InvalidQueryError(
                "analyst names are letters, digits and _ . : - (starting with a letter or digit), "
                "so that the audit log can record who submitted a query"
            )
        query_id = "q_" + secrets.token_hex(8)
        self.store.create_query(query_id, sql, analyst)
        try:
            plan, _ = self._plan(sql, analyst, query_id)
        except SealroomError as err:
            registered = [(d["party"], d["name"]) for d in self.store.datasets()]
            event = refusal_event(err, analyst=analyst, sql=sql, datasets=registered)
            self.store.refuse_query(query_id, error=err.to_dict(), event=event)  # logged as query_refused
            return query_id, "refused"
        self.store.update_query(query_id, plan_json=plan.to_json(), plan_hash=plan.hash)
        self.store.append_event(
            "query_submitted",
            query_id=query_id,
            analyst=analyst,
            sql_sha256=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
            plan_hash=plan.hash,
        )
        t = threading.Thread(target=self.orchestrator.run, args=(plan,), name=f"query-{query_id}", daemon=True)
        self._threads = {q: th for q, th in self._threads.items() if th.is_alive()}
        self._threads[query_id] = t
        t.start()
        return query_id, "planning"

    # -- the transparency log's witnesses (docs/audit.md, "Witnesses") -------------------------

    def checkpoint(self) -> tuple[str, str]:
        """(the latest checkpoint note with the co-signatures stored for it, the log's verifier key)."""
        signed = self.store.checkpoint()
        assert self.store.log is not None
        return signed.to_text(), self.store.log.signer.verifier.vkey()

    def submit_cosignature(
        self, party: str, checkpoint: str, *, query_id: str, issued_at_ms: int, owner_signature: bytes
    ) -> tuple[int, tuple[str, ...]]:
        """A party agent's witness co-signature of a checkpoint: the request is signed by the party's
        registered key (``owner_action_message("cosign", ..., plan_hash=SHA-256 of the checkpoint's
        body)``, fresh), like an owner action; the store then checks the witness signature itself and
        that the checkpoint is the log's. Returns (size, the witnesses now co-signing it)."""
        registered = self.store.parties().get(party)
        if registered is None:
            raise NotFoundError(f"party {party} is not registered", details={"party": party})
        if query_id and not is_ident(query_id):
            raise InvalidQueryError("a co-signature names its query by its id (q_...), or none")
        signed = SignedCheckpoint.from_text(checkpoint)
        verify_owner_action(
            registered["signing_public_key"],
            owner_signature,
            "cosign",
            query_id=query_id,
            party=party,
            plan_hash=hashlib.sha256(signed.checkpoint.body().encode("utf-8")).hexdigest(),
            issued_at_ms=issued_at_ms,
        )
        check_issued_at(issued_at_ms, int(time.time() * 1000), party=party)
        witnesses = self.store.add_cosignature(party, signed)
        log.info("party %s co-signed the log's checkpoint of size %d", party, signed.checkpoint.size)
        return signed.checkpoint.size, witnesses

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel in-flight work, let query threads record their end, then close the store."""
        self.orchestrator.shutdown()
        for t in list(self._threads.values()):
            t.join(timeout)
        self.store.close()


def _status(row, approvals: dict) -> coordinator_pb2.QueryStatus:
    involved: list[str] = []
    if row.plan_json:
        involved = sorted(json.loads(row.plan_json)["parties"])
    return coordinator_pb2.QueryStatus(
        query_id=row.id,
        status=row.status,
        sql=row.sql,
        analyst=row.analyst,
        created_at=row.created_at,
        updated_at=row.updated_at,
        error_json=json.dumps(row.error).encode() if row.error else b"",
        approved_by=sorted(approvals),
        awaiting=[p for p in involved if p not in approvals]
        if row.status in ("awaiting_approval", "pending_approval")
        else [],
        progress=row.progress,
    )


@translate_errors
class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def RegisterParty(self, request, context):  # noqa: N802
        return coordinator_pb2.RegisterPartyResponse(datasets=self.c.register(request))

    def ListDatasets(self, request, context):  # noqa: N802
        self._analyst(context)
        return coordinator_pb2.ListDatasetsResponse(
            datasets=[
                common_pb2.DatasetInfo(
                    party=d["party"],
                    name=d["name"],
                    arrow_schema=d["arrow_schema"],
                    policy_digest=d["policy_digest"],
                    policy_json=d["policy_json"],
                    description=d["description"],
                    approximate_rows=d["approximate_rows"],
                )
                for d in self.c.store.datasets()
            ],
            parties=[
                common_pb2.PartyInfo(
                    name=n, address=p["address"], signing_public_key=bytes.fromhex(p["signing_public_key"])
                )
                for n, p in sorted(self.c.store.parties().items())
            ],
        )

    def _analyst(self, context, claimed: str = "") -> str:
        """The caller, authenticated by its token when the coordinator has an analyst directory."""
        directory = self.c.config.analysts
        if directory is None:
            return claimed or DEFAULT_ANALYST
        name = directory.authenticate(context.invocation_metadata())
        if claimed and claimed != name:
            raise AuthenticationError(f"the token is {name}'s; it cannot act as {claimed}")
        return name

    def _own_query(self, context, query_id: str):
        analyst = self._analyst(context)
        row = self.c.store.query(query_id)
        if self.c.config.analysts is not None and row.analyst != analyst:
            # Another analyst's query: do not even confirm that it exists.
            raise NotFoundError(f"no query {query_id}; `sealroom status` lists your queries")
        return row

    def Explain(self, request, context):  # noqa: N802
        plan, text = self.c.explain(request.sql, self._analyst(context, request.analyst))
        return coordinator_pb2.ExplainResponse(plan_json=plan.to_json(), plan_hash=plan.hash, text=text)

    def Submit(self, request, context):  # noqa: N802
        qid, status = self.c.submit(request.sql, self._analyst(context, request.analyst))
        return coordinator_pb2.SubmitResponse(query_id=qid, status=status)

    def GetStatus(self, request, context):  # noqa: N802
        row = self._own_query(context, request.query_id)
        return _status(row, self.c.store.approvals(row.id))

    def GetResult(self, request, context):  # noqa: N802
        row = self._own_query(context, request.query_id)
        out = common_pb2.QueryResult(query_id=row.id, status=row.status, plan_json=row.plan_json or b"")
        if row.error:
            out.error_json = json.dumps(row.error).encode()
        if row.status == "released":
            rel = self.c.store.get_release(row.id)
            if rel is None:
                raise NotFoundError("the release record is missing")
            out.arrow_table = rel["arrow_table"]
            out.suppressed_json = json.dumps(rel["suppressed"]).encode()
            out.simulated = rel["simulated"]
            # receipt_json: the enclave's signed result as before ("result", "result_json", "signature",
            # "evidence"), plus "countersigned": the release receipt the coordinator countersigned and
            # logged (`sealroom receipt verify`; null for a release from before receipts).
            out.receipt_json = json.dumps(
                {
                    "result": json.loads(rel["result_json"]),
                    "result_json": rel["result_json"].decode(),
                    "signature": rel["signature"].hex(),
                    "evidence": rel["evidence"].decode(),
                    "countersigned": rel["receipt"],
                }
            ).encode()
        return out

    def ListQueries(self, request, context):  # noqa: N802
        analyst = self._analyst(context)
        mine = [r for r in self.c.store.queries() if self.c.config.analysts is None or r.analyst == analyst]
        return coordinator_pb2.ListQueriesResponse(queries=[_status(r, self.c.store.approvals(r.id)) for r in mine])

    # Manual approvals: each request is signed by the acting party's registered key (see
    # Orchestrator._authenticate), so only a party may approve, reject or revoke for itself.

    def SubmitApproval(self, request, context):  # noqa: N802
        status, awaiting = self.c.orchestrator.submit_approval(
            request.query_id,
            party=request.party,
            plan_hash=request.plan_hash,
            signature=bytes(request.signature),
            expires_at_ms=request.expires_at_ms,
            issued_at_ms=request.issued_at_ms,
            owner_signature=bytes(request.owner_signature),
        )
        return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)

    def RejectQuery(self, request, context):  # noqa: N802
        status, awaiting = self.c.orchestrator.reject_query(
            request.query_id,
            party=request.party,
            plan_hash=request.plan_hash,
            reason=request.reason,
            issued_at_ms=request.issued_at_ms,
            owner_signature=bytes(request.owner_signature),
        )
        return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)

    def RevokeApproval(self, request, context):  # noqa: N802
        status, awaiting = self.c.orchestrator.revoke_approval(
            request.query_id,
            party=request.party,
            plan_hash=request.plan_hash,
            issued_at_ms=request.issued_at_ms,
            owner_signature=bytes(request.owner_signature),
        )
        return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)

    # The transparency log, for the party agents that witness it. Checkpoints and proofs are public
    # (sizes, hashes, signatures); a co-signature is signed by the party's registered key.

    def GetCheckpoint(self, request, context):  # noqa: N802
        text, vkey = self.c.checkpoint()
        return coordinator_pb2.CheckpointResponse(checkpoint=text, log_key=vkey)

    def GetConsistencyProof(self, request, context):  # noqa: N802
        hashes = self.c.store.consistency_proof(int(request.old_size), int(request.new_size))
        return coordinator_pb2.ConsistencyProofResponse(hashes=hashes)

    def SubmitCosignature(self, request, context):  # noqa: N802
        size, witnesses = self.c.submit_cosignature(
            request.party,
            request.checkpoint,
            query_id=request.query_id,
            issued_at_ms=request.issued_at_ms,
            owner_signature=bytes(request.owner_signature),
        )
        return coordinator_pb2.SubmitCosignatureResponse(size=size, witnesses=witnesses)


def build_server(config: CoordinatorConfig) -> tuple[Server, Coordinator]:
    coordinator = Coordinator(config)
    server = create_server(config.listen)
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
