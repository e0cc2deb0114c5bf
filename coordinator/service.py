"""The coordinator's behaviour behind its gRPC API: plain typed code over the store, the planner and
the orchestrator, with no gRPC context (``coordinator.servicer`` only delegates here).

:class:`Coordinator` holds the state (config, store, orchestrator, query threads) and does what the
API asks; one handler function per RPC takes the request message (and, for an analyst's call, the
call's metadata, which carries its token) and returns the response message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.budget import budget_lines, log_entries, remaining_lines
from coordinator.config import CoordinatorConfig
from coordinator.orchestrator import Orchestrator
from coordinator.planner import RESERVED_PARTY_NAMES, CatalogEntry, explain_text, plan_query
from coordinator.records import publish_collaboration, refusal_event
from coordinator.store import (
    Approval,
    CoordinatorStore,
    DatasetRecord,
    QueryRecord,
    ReleaseRecord,
    SignedRegistration,
    SQLiteStore,
)
from sealroom.audit.entries import is_ident
from sealroom.audit.notes import SignedCheckpoint
from sealroom.auth import generate_token
from sealroom.cancel import UNBOUNDED, CallScope
from sealroom.errors import AuthenticationError, InvalidQueryError, NotFoundError, SealroomError
from sealroom.keys import generate_signing_key, load_signing_key, public_key_hex, save_signing_key
from sealroom.planning.limits import check_sql_text
from sealroom.planning.plan import Plan
from sealroom.planning.sql import Analysis
from sealroom.policy import DatasetPolicy
from sealroom.ratelimit import RateLimiter
from sealroom.signing import Registration, check_issued_at, verify_owner_action
from sealroom.v1 import common_pb2, coordinator_pb2

log = logging.getLogger(__name__)

DEFAULT_ANALYST = "analyst"
LOG_KEY_FILE = "log.key"  # the log's private key, when [coordinator] log_key is not set
LOG_VKEY_FILE = "log.vkey"  # the log's verifier key NAME+ID+KEY, published for reviewers
LOG_INFO_FILE = "log.json"  # origin, verifier key, public key and database, for reviewers' tools
DATABASE_FILE = "coordinator.db"
ENROLMENT_VALID_SECONDS = 86400.0  # how long an operator's enrolment token stays usable, by default

# A call's metadata: (key, value) pairs, as gRPC hands them to a servicer.
Metadata = Sequence[tuple[str, str | bytes]]


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


def catalog_of(datasets: Sequence[DatasetRecord]) -> dict[str, CatalogEntry]:
    """The planner's catalog (``party.dataset`` -> entry) of the registered datasets."""
    out = {}
    for d in datasets:
        schema = pa.ipc.read_schema(pa.py_buffer(d.arrow_schema))
        policy = DatasetPolicy.from_json(d.policy_json)
        entry = CatalogEntry(d.party, d.name, schema, policy, int(d.approximate_rows))
        out[entry.qualified] = entry
    return out


def check_party_name(name: str) -> None:
    """InvalidQueryError unless ``name`` can name a party: an identifier, not a reserved player name."""
    if not name.isidentifier():
        raise InvalidQueryError("party names must be identifiers (letters, digits, _)")
    if name in RESERVED_PARTY_NAMES:
        raise InvalidQueryError(
            f"the party name {name!r} is reserved (it names a player the platform runs in MPC plans); "
            "register under another name",
            details={"party": name},
        )


def registration_of(request: coordinator_pb2.RegisterPartyRequest) -> list[DatasetRecord]:
    """The datasets a party registers, checked: identifier names, its own datasets, a policy that
    matches its digest, a 32-byte signing key."""
    party = request.party
    check_party_name(party.name)
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
            DatasetRecord(
                party=party.name,
                name=d.name,
                arrow_schema=bytes(d.arrow_schema),
                policy_json=bytes(d.policy_json),
                policy_digest=d.policy_digest,
                description=d.description,
                approximate_rows=max(0, int(d.approximate_rows)),
            )
        )
    return datasets


@dataclass(frozen=True)
class Enrolment:
    """An operator's enrolment of a party name: the one-time token (shown once, stored hashed) and
    when it expires (unix seconds)."""

    party: str
    token: str
    expires_at: float


def signed_registration(request: coordinator_pb2.RegisterPartyRequest) -> SignedRegistration:
    """The party's registration with its signature verified (AuthenticationError otherwise): the
    proof that the caller holds the key it registers. Whether that key may hold the name (enrolment),
    and whether the registration is fresh, the store checks where it records it."""
    party = request.party
    registration = Registration.of(
        party=party.name,
        owner_key=bytes(party.signing_public_key).hex(),
        address=party.address,
        datasets=request.datasets,
        issued_at_ms=request.issued_at_ms,
    )
    registration.verify(bytes(request.signature))
    return SignedRegistration(registration, bytes(request.signature), request.enrolment_token)


def enrol_party(state_dir: Path, party: str, *, valid_seconds: float = ENROLMENT_VALID_SECONDS) -> Enrolment:
    """The operator's enrolment of ``party`` at the coordinator whose state directory is ``state_dir``
    (running or not): a one-time token, stored hashed, that lets the party's agent register the name
    (or a new key for it) until it expires. ``sealroom party enrol`` prints it."""
    check_party_name(party)
    if not 0 < valid_seconds <= 30 * 86400:
        raise InvalidQueryError("an enrolment is valid for more than 0 s and at most 30 days")
    enrolment = Enrolment(party, generate_token(), time.time() + valid_seconds)
    store = SQLiteStore(Path(state_dir) / DATABASE_FILE)
    try:
        store.enrol(party, token=enrolment.token, expires_at=enrolment.expires_at)
    finally:
        store.close()
    log.info("enrolled party %s (token valid for %d s)", party, valid_seconds)
    return enrolment


class Coordinator:
    """The coordinator's behaviour, independent of gRPC."""

    def __init__(self, config: CoordinatorConfig):
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        key = load_log_key(config)
        self.store: CoordinatorStore = SQLiteStore(config.state_dir / DATABASE_FILE, log_key=key)
        verifier = self.store.log_verifier()
        publish_log_key(config.state_dir, origin=verifier.name, vkey=verifier.vkey(), public_key=public_key_hex(key))
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
            tls=config.tls,
        )
        self._threads: dict[str, threading.Thread] = {}
        # Explain and Submit, per analyst: one analyst's flood leaves the others' calls as they were.
        self.analyst_limits = RateLimiter(
            rate=config.analyst_calls_per_second,
            burst=config.analyst_burst,
            limit="[coordinator] analyst_calls_per_second and analyst_burst",
        )

    # -- the catalog -------------------------------------------------------------------------

    def register(self, request: coordinator_pb2.RegisterPartyRequest) -> list[str]:
        """A party's registration: checked (:func:`registration_of`), signed by the key it registers
        (:func:`signed_registration`), then recorded by the store with its enrolment and freshness checks."""
        party = request.party
        datasets = registration_of(request)
        signed = signed_registration(request)
        self.store.register_party(party.name, party.address, signed.registration.owner_key, datasets, signed=signed)
        log.info("party %s registered %d datasets", party.name, len(datasets))
        return [d.qualified for d in datasets]

    # -- analysts: who calls, and their queries ----------------------------------------------

    def analyst(self, metadata: Metadata, claimed: str = "") -> str:
        """The caller, authenticated by its token when the coordinator has an analyst directory."""
        directory = self.config.analysts
        if directory is None:
            return claimed or DEFAULT_ANALYST
        name = directory.authenticate(metadata)
        if claimed and claimed != name:
            raise AuthenticationError(f"the token is {name}'s; it cannot act as {claimed}")
        return name

    def limited_analyst(self, metadata: Metadata, claimed: str = "") -> str:
        """:meth:`analyst`, then one call of its rate limit (ResourceExhaustedError when over it)."""
        analyst = self.analyst(metadata, claimed)
        self.analyst_limits.take(analyst, what="Explain and Submit")
        return analyst

    def own_query(self, metadata: Metadata, query_id: str) -> QueryRecord:
        """The caller's query (a query of another analyst is reported as unknown)."""
        analyst = self.analyst(metadata)
        row = self.store.query(query_id)
        if self.config.analysts is not None and row.analyst != analyst:
            # Another analyst's query: do not even confirm that it exists.
            raise NotFoundError(f"no query {query_id}; `sealroom status` lists your queries")
        return row

    def own_queries(self, metadata: Metadata) -> list[QueryRecord]:
        analyst = self.analyst(metadata)
        return [r for r in self.store.queries() if self.config.analysts is None or r.analyst == analyst]

    def _plan(
        self, sql: str, analyst: str, query_id: str, scope: CallScope, epsilon: float | None = None
    ) -> tuple[Plan, Analysis]:
        helper = self.store.helper_identity()
        return plan_query(
            sql,
            query_id=query_id,
            analyst=analyst,
            catalog=catalog_of(self.store.datasets()),
            party_keys={name: p.signing_public_key for name, p in self.store.parties().items()},
            helper_key=helper[0] if helper is not None else None,
            limits=self.config.limits,
            scope=scope,
            epsilon=epsilon,
        )

    def explain(
        self, sql: str, analyst: str, scope: CallScope = UNBOUNDED, epsilon: float | None = None
    ) -> tuple[Plan, str]:
        """Plan ``sql`` (spending ``epsilon`` of dp datasets' budgets; None: the default) and explain it."""
        check_sql_text(sql, self.config.limits)  # before anything parses it
        plan, analysis = self._plan(sql, analyst, "explain", scope, epsilon)
        scope.check("explaining the plan")
        rows = {d.qualified: d.approximate_rows for d in self.store.datasets()}
        text = explain_text(plan, analysis, rows)
        budget = remaining_lines(plan, log_entries(self.store))
        if budget:  # each owner's remaining privacy budget (coordinator/budget.py)
            text += "\nPrivacy budget (the owners' agents decide, from their own ledgers):\n"
            text += "".join(f"  {line}\n" for line in budget)
        return plan, text

    def submit(
        self, sql: str, analyst: str, scope: CallScope = UNBOUNDED, epsilon: float | None = None
    ) -> tuple[str, str]:
        """Plan ``sql`` and start it; ``epsilon``: what it spends of dp datasets' budgets (None: the
        default). Text over the size limit is refused before it is stored; a call that ends while its
        query is planned leaves the query refused (DeadlineExceededError)."""
        check_sql_text(sql, self.config.limits)  # before it is stored or parsed
        if not is_ident(analyst):
            raise InvalidQueryError(
                "analyst names are letters, digits and _ . : - (starting with a letter or digit), "
                "so that the audit log can record who submitted a query"
            )
        query_id = "q_" + secrets.token_hex(8)
        self.store.create_query(query_id, sql, analyst)
        try:
            plan, _ = self._plan(sql, analyst, query_id, scope, epsilon)
        except SealroomError as err:
            registered = [(d.party, d.name) for d in self.store.datasets()]
            event = refusal_event(err, analyst=analyst, sql=sql, datasets=registered)
            self.store.refuse_query(query_id, error=err.to_dict(), event=event)  # logged as query_refused
            return query_id, "refused"
        self.store.update_query(query_id, plan_json=plan.to_json(), plan_hash=plan.hash)
        submitted = self.store.append_event(
            "query_submitted",
            query_id=query_id,
            analyst=analyst,
            sql_sha256=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
            plan_hash=plan.hash,
        )
        t = threading.Thread(
            target=self.orchestrator.run, args=(plan, submitted), name=f"query-{query_id}", daemon=True
        )
        self._threads = {q: th for q, th in self._threads.items() if th.is_alive()}
        self._threads[query_id] = t
        t.start()
        return query_id, "planning"

    # -- the transparency log's witnesses (docs/audit.md, "Witnesses") -------------------------

    def checkpoint(self) -> tuple[str, str]:
        """(the latest checkpoint note with the co-signatures stored for it, the log's verifier key)."""
        signed = self.store.checkpoint()
        return signed.to_text(), self.store.log_verifier().vkey()

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
            registered.signing_public_key,
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


# -- messages ----------------------------------------------------------------------------------


def query_status(row: QueryRecord, approvals: Mapping[str, Approval]) -> coordinator_pb2.QueryStatus:
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


def receipt_json(release: ReleaseRecord) -> bytes:
    """A result's ``receipt_json``: the enclave's signed result as before ("result", "result_json",
    "signature", "evidence"), plus "countersigned": the release receipt the coordinator
    countersigned and logged (`sealroom receipt verify`; null for a release from before receipts)."""
    return json.dumps(
        {
            "result": json.loads(release.result_json),
            "result_json": release.result_json.decode(),
            "signature": release.signature.hex(),
            "evidence": release.evidence.decode(),
            "countersigned": release.receipt,
        }
    ).encode()


# -- one handler per RPC (coordinator.servicer delegates to these) -----------------------------


def request_epsilon(request: coordinator_pb2.QueryRequest) -> float | None:
    """The epsilon a query request asks for: None for 0 (the proto default: the planner's default);
    anything else goes to the planner, which refuses what is not a number > 0."""
    return None if request.epsilon == 0 else request.epsilon


def register_party(
    request: coordinator_pb2.RegisterPartyRequest, c: Coordinator
) -> coordinator_pb2.RegisterPartyResponse:
    return coordinator_pb2.RegisterPartyResponse(datasets=c.register(request))


def list_datasets(c: Coordinator, metadata: Metadata) -> coordinator_pb2.ListDatasetsResponse:
    c.analyst(metadata)
    return coordinator_pb2.ListDatasetsResponse(
        datasets=[
            common_pb2.DatasetInfo(
                party=d.party,
                name=d.name,
                arrow_schema=d.arrow_schema,
                policy_digest=d.policy_digest,
                policy_json=d.policy_json,
                description=d.description,
                approximate_rows=d.approximate_rows,
            )
            for d in c.store.datasets()
        ],
        parties=[
            common_pb2.PartyInfo(name=n, address=p.address, signing_public_key=bytes.fromhex(p.signing_public_key))
            for n, p in sorted(c.store.parties().items())
        ],
    )


def explain(
    request: coordinator_pb2.QueryRequest, c: Coordinator, metadata: Metadata, scope: CallScope = UNBOUNDED
) -> coordinator_pb2.ExplainResponse:
    plan, text = c.explain(request.sql, c.limited_analyst(metadata, request.analyst), scope, request_epsilon(request))
    return coordinator_pb2.ExplainResponse(plan_json=plan.to_json(), plan_hash=plan.hash, text=text)


def submit(
    request: coordinator_pb2.QueryRequest, c: Coordinator, metadata: Metadata, scope: CallScope = UNBOUNDED
) -> coordinator_pb2.SubmitResponse:
    qid, status = c.submit(request.sql, c.limited_analyst(metadata, request.analyst), scope, request_epsilon(request))
    return coordinator_pb2.SubmitResponse(query_id=qid, status=status)


def get_budget(
    request: coordinator_pb2.GetBudgetRequest, c: Coordinator, metadata: Metadata
) -> coordinator_pb2.GetBudgetResponse:
    """The caller's budgets: per dp dataset, its own analyst scope and the collaboration's."""
    analyst = c.analyst(metadata, request.analyst)
    policies = [(d.qualified, DatasetPolicy.from_json(d.policy_json)) for d in c.store.datasets()]
    if request.dataset and request.dataset not in {q for q, _ in policies}:
        raise NotFoundError(
            f"no dataset {request.dataset} is registered; `sealroom datasets` lists them",
            details={"dataset": request.dataset},
        )
    lines = budget_lines(policies, log_entries(c.store), analyst=analyst, dataset=request.dataset or None)
    return coordinator_pb2.GetBudgetResponse(lines=[coordinator_pb2.BudgetLine(**line.to_dict()) for line in lines])


def get_status(request: coordinator_pb2.QueryRef, c: Coordinator, metadata: Metadata) -> coordinator_pb2.QueryStatus:
    row = c.own_query(metadata, request.query_id)
    return query_status(row, c.store.approvals(row.id))


def get_result(request: coordinator_pb2.QueryRef, c: Coordinator, metadata: Metadata) -> common_pb2.QueryResult:
    row = c.own_query(metadata, request.query_id)
    out = common_pb2.QueryResult(query_id=row.id, status=row.status, plan_json=row.plan_json or b"")
    if row.error:
        out.error_json = json.dumps(row.error).encode()
    if row.status == "released":
        release = c.store.get_release(row.id)
        if release is None:
            raise NotFoundError("the release record is missing")
        out.arrow_table = release.arrow_table
        out.suppressed_json = json.dumps(release.suppressed).encode()
        out.simulated = release.simulated
        out.receipt_json = receipt_json(release)
    return out


def list_queries(c: Coordinator, metadata: Metadata) -> coordinator_pb2.ListQueriesResponse:
    return coordinator_pb2.ListQueriesResponse(
        queries=[query_status(r, c.store.approvals(r.id)) for r in c.own_queries(metadata)]
    )


# Manual approvals: each request is signed by the acting party's registered key (see
# Orchestrator.submit_approval and its siblings), so only a party may approve, reject or revoke for itself.


def submit_approval(
    request: coordinator_pb2.SubmitApprovalRequest, c: Coordinator
) -> coordinator_pb2.OwnerActionResponse:
    status, awaiting = c.orchestrator.submit_approval(
        request.query_id,
        party=request.party,
        plan_hash=request.plan_hash,
        signature=bytes(request.signature),
        expires_at_ms=request.expires_at_ms,
        issued_at_ms=request.issued_at_ms,
        owner_signature=bytes(request.owner_signature),
    )
    return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)


def reject_query(request: coordinator_pb2.RejectQueryRequest, c: Coordinator) -> coordinator_pb2.OwnerActionResponse:
    status, awaiting = c.orchestrator.reject_query(
        request.query_id,
        party=request.party,
        plan_hash=request.plan_hash,
        reason=request.reason,
        issued_at_ms=request.issued_at_ms,
        owner_signature=bytes(request.owner_signature),
    )
    return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)


def revoke_approval(
    request: coordinator_pb2.RevokeApprovalRequest, c: Coordinator
) -> coordinator_pb2.OwnerActionResponse:
    status, awaiting = c.orchestrator.revoke_approval(
        request.query_id,
        party=request.party,
        plan_hash=request.plan_hash,
        issued_at_ms=request.issued_at_ms,
        owner_signature=bytes(request.owner_signature),
    )
    return coordinator_pb2.OwnerActionResponse(query_id=request.query_id, status=status, awaiting=awaiting)


# The transparency log, for the party agents that witness it. Checkpoints and proofs are public
# (sizes, hashes, signatures); a co-signature is signed by the party's registered key.


def get_checkpoint(c: Coordinator) -> coordinator_pb2.CheckpointResponse:
    text, vkey = c.checkpoint()
    return coordinator_pb2.CheckpointResponse(checkpoint=text, log_key=vkey)


def get_consistency_proof(
    request: coordinator_pb2.ConsistencyProofRequest, c: Coordinator
) -> coordinator_pb2.ConsistencyProofResponse:
    hashes = c.store.consistency_proof(int(request.old_size), int(request.new_size))
    return coordinator_pb2.ConsistencyProofResponse(hashes=hashes)


def submit_cosignature(
    request: coordinator_pb2.SubmitCosignatureRequest, c: Coordinator
) -> coordinator_pb2.SubmitCosignatureResponse:
    size, witnesses = c.submit_cosignature(
        request.party,
        request.checkpoint,
        query_id=request.query_id,
        issued_at_ms=request.issued_at_ms,
        owner_signature=bytes(request.owner_signature),
    )
    return coordinator_pb2.SubmitCosignatureResponse(size=size, witnesses=witnesses)
