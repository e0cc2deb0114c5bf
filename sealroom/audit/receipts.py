"""Release receipts: one canonical, versioned, countersigned document per release, verifiable offline.

A receipt binds what a compliance reviewer must be able to say about one release:

- the query (id, SQL text, analyst) and the full plan it ran, with the plan hash (SHA-256 of the
  plan's canonical JSON): the involved datasets, their owners' policies and policy digests, and
  the owners' signing keys all come from the plan;
- every approval: party, public key, plan hash, Ed25519 signature over the plan hash and the log
  position;
- (version 2) the log position: the leaf index of the query's ``query_submitted`` entry in the
  coordinator's transparency log and the size and root hash of the checkpoint the owners' agents
  proved it in; every approval and every enclave result signs it (docs/audit.md, "No release
  outside the log"). Version 1 receipts, from before this binding, carry none; they still verify,
  as version 1, with their approvals over the plan hash alone;
- per stage, either the enclave's signed result document (with its signature by the job key and
  the attestation evidence envelope that binds that key), or the MPC result (the opened cells,
  suppressed group keys, rule, players, threshold and trust assumption) with every player's
  signature;
- the disclosure decisions: which cells were suppressed, by which rule (group labels and the
  rule's wording only; never a value);
- the SHA-256 of the released result (the Arrow IPC stream bytes the enclave hashed and signed);
- timestamps, and whether attestation was simulated (no TEE);
- for a plan that reads ``dp`` datasets, ``"privacy": {"charges": [...]}``: what the release charged
  each dataset's budget (:func:`sealroom.planning.privacy.charges` of the plan; the enclave signs the
  same list in its result document), absent otherwise (older receipts are unchanged);
- the coordinator's public key and countersignature over all of the above.

:func:`verify_receipt` checks a receipt with nothing but the receipt (and, if given, the result
file, an appraisal policy and the coordinator's pinned key), in numbered steps that each raise
:class:`~sealroom.errors.AuditError` with ``details["check"]`` naming the step. It returns a
:class:`VerifiedReceipt` describing what was established (e.g. whether evidence was appraised),
never a bool.

What the receipt deliberately reveals: the query text, plan (policies are published by their
owners), group labels of suppressed cells, counts of released rows. It holds no row value, no
pre-suppression value and no secret key. (It holds *public* keys and signatures.)
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.attestation import SIMULATED, AppraisalPolicy, Claims, Evidence
from sealroom.audit.receipt_stages import required_field, signature_verifies, verify_mpc_stage, verify_tee_stage
from sealroom.audit.refusals import refuse
from sealroom.canonical import canonical_json
from sealroom.errors import SealroomError
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import charges
from sealroom.signing import LogPosition, approval_message

__all__ = [
    "RECEIPT_KIND",
    "RECEIPT_VERSION",
    "RECEIPT_VERSIONS",
    "COUNTERSIGN_DOMAIN",
    "TeeStage",
    "MpcStage",
    "build_receipt",
    "countersign",
    "plan_charges",
    "receipt_sha256",
    "load_receipt",
    "VerifiedReceipt",
    "verify_receipt",
]

RECEIPT_KIND = "sealroom.receipt"
# 2: the receipt binds the query's log position ("log"); 1: older receipts without it (still verified).
RECEIPT_VERSION = 2
RECEIPT_VERSIONS = (1, 2)
COUNTERSIGN_DOMAIN = b"sealroom/v1/receipt-countersignature\x00"
RESULT_FORMAT = "arrow-ipc-stream"
_KEYS = frozenset(
    {
        "kind",
        "version",
        "query",
        "plan",
        "datasets",
        "approvals",
        "stages",
        "disclosure",
        "result",
        "simulated",
        "timestamps",
        "coordinator",
        "countersignature",
    }
)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class TeeStage:
    """A TEE stage's output as the enclave returned it (and the coordinator verified it):
    ``result_json`` (the exact signed bytes), ``signature`` (by the job's Ed25519 key) and
    ``evidence`` (the canonical evidence envelope bytes, ``Evidence.to_bytes()``)."""

    result_json: bytes
    signature: bytes
    evidence: bytes


@dataclass(frozen=True)
class MpcStage:
    """An MPC stage's opened result (``MpcResult.to_dict()``) and the players' signatures:
    player name -> (Ed25519 public key hex, signature over ``MpcResult.signing_message()``)."""

    stage_id: str
    result: Mapping[str, Any]
    signatures: Mapping[str, tuple[str, bytes]]


def _datasets(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "stage": stage.id,
            "party": i.party,
            "dataset": i.dataset,
            "policy_digest": i.policy.digest(),
            "columns": list(i.columns),
            "filtered_by_owner": i.filter is not None,
        }
        for stage in plan.stages
        for i in stage.inputs
    ]


def _tee_stage(stage: TeeStage) -> dict[str, Any]:
    try:
        doc = json.loads(stage.result_json)
        evidence = json.loads(stage.evidence)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("a TEE stage's result and evidence are JSON documents") from None
    if canonical_json(doc) != bytes(stage.result_json):
        raise ValueError("the enclave's result document is not canonical JSON; it would not verify in a receipt")
    Evidence.from_bytes(canonical_json(evidence))  # raises on a malformed envelope
    att = doc.get("attestation", {})
    return {
        "id": doc.get("stage"),
        "kind": "tee",
        "format": att.get("format"),
        "measurement": att.get("measurement"),
        "simulated": bool(doc.get("simulated")) or att.get("format") == SIMULATED,
        "result": doc,
        "signature": bytes(stage.signature).hex(),
        "evidence": evidence,
    }


def _mpc_stage(stage: MpcStage) -> dict[str, Any]:
    result = json.loads(canonical_json(dict(stage.result)))
    players = []
    for p in result.get("players", []):
        key, sig = stage.signatures.get(p.get("name"), ("", b""))
        players.append({"name": p.get("name"), "public_key": key, "signature": bytes(sig).hex()})
    return {
        "id": stage.stage_id,
        "kind": "mpc",
        "trust_assumption": result.get("trust_assumption"),
        "simulated": False,
        "result": result,
        "players": players,
    }


def _suppressed(stages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in stages:
        result = s["result"]
        if s["kind"] == "tee":
            out += [
                {"stage": s["id"], "group": c.get("group"), "rule": c.get("rule"), "reason": c.get("reason")}
                for c in result.get("suppressed", [])
            ]
        else:
            names = list(result.get("group_by", []))
            rule = result.get("rule", {}).get("name")
            for key in result.get("suppressed", []):
                group = dict(zip(names, key, strict=False)) if isinstance(key, list) else {}
                out.append({"stage": s["id"], "group": group, "rule": rule, "reason": "suppressed inside the MPC"})
    return out


def _rules(stages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {s["id"]: s["result"].get("rules" if s["kind"] == "tee" else "rule") for s in stages}


def _released(stages: Sequence[Mapping[str, Any]]) -> tuple[int | None, list[str] | None, str | None]:
    last = stages[-1]
    result = last["result"]
    if last["kind"] == "tee":
        return result.get("released_rows"), result.get("output_columns"), result.get("result_sha256")
    return len(result.get("cells", [])), [*result.get("group_by", []), *result.get("aggregates", [])], None


def build_receipt(
    *,
    plan: Plan,
    approvals: Mapping[str, tuple[str, bytes]],
    stages: Sequence[TeeStage | MpcStage],
    submitted_at: float,
    released_at: float,
    log_position: LogPosition,
    result_sha256: str | None = None,
) -> dict[str, Any]:
    """The receipt of one release, from what the coordinator holds at release time, not yet
    countersigned (call :func:`countersign`).

    ``approvals``: party -> (plan hash, signature), as the coordinator stored and the enclave
    checked them, at ``log_position`` (the query's place in the log, which they sign). ``stages`` in
    the plan's order; the last one produced the released table.
    ``result_sha256``: SHA-256 (hex) of the released table's Arrow IPC bytes; for a TEE stage it is
    taken from the enclave's signed result (and must agree if given). ``ValueError`` when the parts
    do not fit together (a caller bug: a receipt is only built from a verified release)."""
    if not stages:
        raise ValueError("a release has at least one stage")
    docs = [_tee_stage(s) if isinstance(s, TeeStage) else _mpc_stage(s) for s in stages]
    rows, columns, signed_sha = _released(docs)
    if signed_sha is not None and result_sha256 not in (None, signed_sha):
        raise ValueError("result_sha256 is not the hash the enclave signed")
    sha = signed_sha or result_sha256
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError("the released result's SHA-256 (hex) is needed")
    executed = [s["result"].get("executed_at") for s in docs if s["kind"] == "tee"]
    privacy = plan_charges(plan)
    if privacy is not None and not _within(_signed_charges(docs), privacy):
        raise ValueError("the enclave signed other privacy charges than the plan's")
    receipt: dict[str, Any] = {
        "kind": RECEIPT_KIND,
        "version": RECEIPT_VERSION,
        "query": {"id": plan.query_id, "sql": plan.sql, "analyst": plan.analyst, "plan_hash": plan.hash},
        "plan": plan.to_dict(),
        "log": log_position.to_dict(),
        "datasets": _datasets(plan),
        "approvals": [
            {
                "party": party,
                "public_key": plan.parties.get(party, ""),
                "plan_hash": approvals[party][0],
                "signature": bytes(approvals[party][1]).hex(),
            }
            for party in sorted(approvals)
        ],
        "stages": docs,
        "disclosure": {"suppressed": _suppressed(docs), "rules": _rules(docs)},
        "result": {"sha256": sha, "format": RESULT_FORMAT, "rows": rows, "columns": columns},
        "simulated": any(s["simulated"] for s in docs),
        "timestamps": {
            "submitted_at": float(submitted_at),
            "executed_at": max(executed) if executed else None,
            "released_at": float(released_at),
        },
    }
    if privacy is not None:
        receipt["privacy"] = {"charges": privacy}
    # Canonical JSON round trip: what is verified later is exactly what is built here.
    return json.loads(canonical_json(receipt))


def plan_charges(plan: Plan) -> list[dict[str, Any]] | None:
    """What releasing ``plan`` charges each dp dataset's budget (None: the plan reads no dp dataset)."""
    if plan.privacy is None:
        return None
    return json.loads(canonical_json([c.to_dict() for c in charges(plan.analyst, plan.inputs(), plan.privacy)]))


def _signed_charges(stages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The charges each TEE stage's enclave signed in its result (``"privacy": {"charges": ...}``)."""
    out = []
    for s in stages:
        privacy = s["result"].get("privacy") if s["kind"] == "tee" else None
        if isinstance(privacy, Mapping) and "charges" in privacy:
            out.append(privacy["charges"])
    return out


def _within(signed: Sequence[Any], expected: Sequence[Any]) -> bool:
    """Every charge a stage's enclave signed is one of the plan's (a stage charges the dp datasets
    it reads; the plan's list covers them all)."""
    return all(isinstance(charges, list) and all(c in expected for c in charges) for charges in signed)


def _signed_body(receipt: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in receipt.items() if k != "countersignature"}
    return COUNTERSIGN_DOMAIN + hashlib.sha256(canonical_json(body)).digest()


def countersign(receipt: Mapping[str, Any], coordinator_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``receipt`` naming the coordinator's public key and carrying its Ed25519
    countersignature over ``"sealroom/v1/receipt-countersignature" 0x00 || SHA-256(canonical JSON
    of every other field)``."""
    if not isinstance(coordinator_key, Ed25519PrivateKey):
        raise TypeError("the coordinator countersigns with an Ed25519PrivateKey")
    out = copy.deepcopy(dict(receipt))
    out.pop("countersignature", None)
    out["coordinator"] = {"public_key": _raw(coordinator_key.public_key()).hex()}
    out["countersignature"] = coordinator_key.sign(_signed_body(out)).hex()
    return out


def receipt_sha256(receipt: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the whole receipt's canonical JSON: what the log's ``released`` entry records."""
    return _sha256(canonical_json(dict(receipt)))


def load_receipt(data: bytes | str) -> dict[str, Any]:
    """Parse a receipt file; ``ValueError`` when it is not a JSON receipt at all (unusable input)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError("the receipt file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != RECEIPT_KIND:
        raise ValueError(f"the file is not a Sealroom receipt (kind {RECEIPT_KIND})")
    return doc


# --------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerifiedReceipt:
    """What :func:`verify_receipt` established about one release."""

    query_id: str
    plan_hash: str
    analyst: str
    result_sha256: str
    parties: tuple[str, ...]
    simulated: bool
    evidence_appraised: bool  # False: no appraisal policy was given, evidence was bound but not appraised
    claims: tuple[Claims, ...]
    coordinator_key: str
    coordinator_key_pinned: bool
    result_file_checked: bool
    suppressed_cells: int
    version: int = RECEIPT_VERSION
    # Where the log shows the query (version 2); None for a version 1 receipt, which binds none.
    log_position: LogPosition | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": True,
            "query_id": self.query_id,
            "plan_hash": self.plan_hash,
            "analyst": self.analyst,
            "result_sha256": self.result_sha256,
            "parties": list(self.parties),
            "simulated": self.simulated,
            "evidence_appraised": self.evidence_appraised,
            "claims": [c.to_json_dict() for c in self.claims],
            "coordinator_key": self.coordinator_key,
            "coordinator_key_pinned": self.coordinator_key_pinned,
            "result_file_checked": self.result_file_checked,
            "suppressed_cells": self.suppressed_cells,
            "version": self.version,
            "log": self.log_position.to_dict() if self.log_position is not None else None,
        }


def _key_hex(key: Ed25519PublicKey | bytes | str) -> str:
    if isinstance(key, Ed25519PublicKey):
        return _raw(key).hex()
    if isinstance(key, bytes):
        if len(key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return key.hex()
    if isinstance(key, str) and len(key) == 64:
        bytes.fromhex(key)
        return key.lower()
    raise ValueError("the coordinator key must be an Ed25519 public key, 32 raw bytes or 64 hex characters")


def verify_receipt(
    receipt: Mapping[str, Any],
    *,
    appraisal: AppraisalPolicy | None,
    coordinator_key: Ed25519PublicKey | bytes | str | None,
    result_bytes: bytes | None = None,
    now: datetime | None = None,
) -> VerifiedReceipt:
    """Verify a receipt offline; return what was established or raise ``AuditError`` naming the check.

    ``appraisal``: the reviewer's trust policy for the enclave evidence; ``None`` skips appraisal
    (the signatures and bindings are still checked, and the result says ``evidence_appraised=False``).
    Simulated evidence passes only with ``allow_simulated`` and the dev root pinned in it.
    ``coordinator_key``: the coordinator's key the reviewer trusts; ``None`` checks the
    countersignature against the key the receipt names (self-consistency only). ``result_bytes``: a
    result file to check is the one released. ``now``: appraise evidence as of this time (default:
    the time the enclave signed its result).

    Steps (``details["check"]``):

    1. ``format``: a receipt of this kind and a known version, with every field; ``log_position``:
       a version 2 receipt's log position is well formed;
    2. ``plan``/``plan_hash``: the plan parses and hashes to the plan hash;
    3. ``plan_summary``: query id, SQL, analyst and datasets are the plan's;
    4. ``approval_missing``/``approval_unexpected``/``approval_key``/``approval_plan_hash``/
       ``approval_signature``: every involved owner approved this plan hash (and, in version 2, the
       log position) with the key the plan names, and nobody else is listed;
    5. per stage (``stages`` names a mismatch with the plan's stages): TEE: ``result_signature``,
       ``result_plan``, ``result_approvals``, ``result_evidence``, ``evidence_binding``,
       ``stage_summary``, ``evidence`` (appraisal), ``result_log`` (version 2: the enclave signed the
       receipt's log position); MPC: ``mpc_player_key``, ``mpc_signature``,
       ``mpc_trust``;
    6. ``disclosure``: the suppressed cells and rules are those the stages signed; ``privacy_charges``:
       a dp plan's charges are its plan's and its enclave's;
    7. ``result_hash``: the released result's hash, rows and columns are those the last stage signed;
    8. ``simulated_flag``: the receipt says simulated exactly when a stage was;
    9. ``timestamps``: submitted <= released, and executed_at is the enclave's;
    10. ``result_file``: ``result_bytes`` hash to the released result's SHA-256;
    11. ``coordinator_key``/``countersignature``: the coordinator (the pinned key) countersigned
        everything above.
    """
    if appraisal is not None and not isinstance(appraisal, AppraisalPolicy):
        raise TypeError(f"appraisal must be an AppraisalPolicy or None, not {type(appraisal).__name__}")
    if result_bytes is not None and not isinstance(result_bytes, bytes | bytearray | memoryview):
        raise TypeError("result_bytes must be bytes")
    if coordinator_key is not None:
        coordinator_key = _key_hex(coordinator_key)  # ValueError for a key that is none
    try:
        return _verify_receipt(
            receipt, appraisal=appraisal, coordinator_key=coordinator_key, result_bytes=result_bytes, now=now
        )
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        # A structure no step expected (a list where an object belongs...): malformed, never a pass.
        raise refuse("format", f"the receipt is malformed ({type(exc).__name__})") from None


@dataclass(frozen=True)
class _Parts:
    """The receipt's top-level fields, each of the type step 1 checked."""

    query: dict[str, Any]
    plan: dict[str, Any]
    approvals: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    disclosure: dict[str, Any]
    result: dict[str, Any]
    timestamps: dict[str, Any]
    coordinator: dict[str, Any]
    version: int
    log: LogPosition | None


def _verify_receipt(
    receipt: Mapping[str, Any],
    *,
    appraisal: AppraisalPolicy | None,
    coordinator_key: Ed25519PublicKey | bytes | str | None,
    result_bytes: bytes | None,
    now: datetime | None,
) -> VerifiedReceipt:
    parts = _check_format(receipt)  # 1
    plan, plan_hash = _verify_plan(parts)  # 2
    _verify_plan_summary(receipt, parts, plan)  # 3
    involved = _verify_approvals(parts, plan, plan_hash)  # 4
    claims = _verify_stages(parts, plan, appraisal=appraisal, now=now)  # 5
    _verify_stage_logs(parts)  # 5
    _verify_disclosure(parts)  # 6
    _verify_privacy(receipt, parts, plan)  # 6b
    _verify_released(parts)  # 7
    simulated = _verify_simulated_flag(receipt, parts)  # 8
    _verify_timestamps(parts)  # 9
    if result_bytes is not None and _sha256(bytes(result_bytes)) != parts.result["sha256"]:  # 10
        raise refuse("result_file", "the result file is not the released result (its SHA-256 differs)")
    named_key = _verify_countersignature(receipt, parts, coordinator_key)  # 11
    return VerifiedReceipt(
        query_id=plan.query_id,
        plan_hash=plan_hash,
        analyst=plan.analyst,
        result_sha256=parts.result["sha256"],
        parties=tuple(involved),
        simulated=simulated,
        evidence_appraised=appraisal is not None,
        claims=tuple(claims),
        coordinator_key=str(named_key),
        coordinator_key_pinned=coordinator_key is not None,
        result_file_checked=result_bytes is not None,
        suppressed_cells=len(parts.disclosure["suppressed"]),
        version=parts.version,
        log_position=parts.log,
    )


def _check_format(receipt: Mapping[str, Any]) -> _Parts:
    """Step 1: a receipt of this kind and version, with every field."""
    if not isinstance(receipt, Mapping) or receipt.get("kind") != RECEIPT_KIND:
        raise refuse("format", f"not a {RECEIPT_KIND} document")
    version = receipt.get("version")
    if type(version) is not int or version not in RECEIPT_VERSIONS:
        raise refuse("format", f"receipt version {version!r} is not one of {', '.join(map(str, RECEIPT_VERSIONS))}")
    keys = _KEYS | {"log"} if version >= 2 else _KEYS
    if "privacy" in receipt:  # a dp plan's charges (step 6b checks them against the plan)
        keys = keys | {"privacy"}
    if set(receipt) != keys:
        raise refuse("format", f"a version {version} receipt has exactly the fields {', '.join(sorted(keys))}")
    log = None
    if version >= 2:
        try:
            log = LogPosition.from_dict(receipt["log"])
        except SealroomError as err:
            raise refuse("log_position", f"the receipt's log position: {err.message}") from None
    parts = _Parts(
        query=required_field(receipt, "query", dict, ""),
        plan=required_field(receipt, "plan", dict, ""),
        approvals=required_field(receipt, "approvals", list, ""),
        stages=required_field(receipt, "stages", list, ""),
        disclosure=required_field(receipt, "disclosure", dict, ""),
        result=required_field(receipt, "result", dict, ""),
        timestamps=required_field(receipt, "timestamps", dict, ""),
        coordinator=required_field(receipt, "coordinator", dict, ""),
        version=version,
        log=log,
    )
    stages, approvals = parts.stages, parts.approvals
    if not stages or not all(isinstance(s, dict) for s in stages) or not all(isinstance(a, dict) for a in approvals):
        raise refuse("format", "the receipt's stages or approvals are malformed")
    return parts


def _verify_plan(parts: _Parts) -> tuple[Plan, str]:
    """Step 2: the plan parses, holds nothing a plan does not, and hashes to the plan hash."""
    plan_json = canonical_json(parts.plan)
    try:
        plan = Plan.from_json(plan_json)
    except SealroomError as err:
        if err.details.get("stage") == "mpc" and err.details.get("rule") == "threshold":
            # An MPC stage without an honest majority does not even read as a plan.
            raise refuse(
                "mpc_trust", f"the receipt's plan has an MPC stage without an honest majority ({err.message})"
            ) from None
        raise refuse("plan", f"the receipt's plan does not parse: {err.message}") from None
    if plan.to_json() != plan_json:
        raise refuse("plan", "the receipt's plan holds fields a plan does not have")
    plan_hash = _sha256(plan_json)
    if parts.query.get("plan_hash") != plan_hash:
        raise refuse("plan_hash", "the receipt's plan does not hash to its plan hash")
    return plan, plan_hash


def _verify_plan_summary(receipt: Mapping[str, Any], parts: _Parts, plan: Plan) -> None:
    """Step 3: the query id, SQL, analyst and datasets are the plan's."""
    query = parts.query
    if (
        query.get("id") != plan.query_id
        or query.get("sql") != plan.sql
        or query.get("analyst") != plan.analyst
        or set(query) != {"id", "sql", "analyst", "plan_hash"}
    ):
        raise refuse("plan_summary", "the receipt's query id, SQL or analyst is not the plan's")
    if receipt["datasets"] != _datasets(plan):
        raise refuse("plan_summary", "the receipt's datasets or policy digests are not the plan's")


def _verify_approvals(parts: _Parts, plan: Plan, plan_hash: str) -> list[str]:
    """Step 4: every involved owner approved this plan hash with the key the plan names, and nobody
    else is listed. Returns the involved parties."""
    involved = plan.involved_parties()
    listed = [a.get("party") for a in parts.approvals]
    for owner in involved:
        if listed.count(owner) != 1:
            raise refuse("approval_missing", f"the receipt holds no single approval by {owner}", party=owner)
    for a in parts.approvals:
        party = a.get("party")
        if party not in involved:
            raise refuse("approval_unexpected", f"the receipt lists an approval by {party}, whose data it did not read")
        if a.get("public_key") != plan.parties.get(party):
            raise refuse("approval_key", f"the approval of {party} names another key than the plan", party=party)
        if a.get("plan_hash") != plan_hash:
            raise refuse("approval_plan_hash", f"the approval of {party} is for another plan", party=party)
        try:
            message = approval_message(plan_hash, parts.log)
        except ValueError:
            raise refuse("plan_hash", "the plan hash is not hex") from None
        if not signature_verifies(a.get("public_key"), a.get("signature"), message):
            raise refuse("approval_signature", f"the approval signature of {party} does not verify", party=party)
    return list(involved)


def _verify_stages(
    parts: _Parts, plan: Plan, *, appraisal: AppraisalPolicy | None, now: datetime | None
) -> list[Claims]:
    """Step 5: the receipt's stages are the plan's, and each verifies (:mod:`sealroom.audit.receipt_stages`)."""
    stages, approvals = parts.stages, parts.approvals
    if [(s.get("id"), s.get("kind")) for s in stages] != [(s.id, s.kind) for s in plan.stages]:
        raise refuse("stages", "the receipt's stages are not the plan's")
    claims: list[Claims] = []
    for stage in stages:
        if stage["kind"] == "tee":
            c = verify_tee_stage(stage, plan=plan, approvals=approvals, appraisal=appraisal, now=now)
            if c is not None:
                claims.append(c)
        else:
            job_keys = [str(s["result"].get("signing_public_key")) for s in stages if s["kind"] == "tee"]
            verify_mpc_stage(stage, plan=plan, job_keys=job_keys, coordinator_key=parts.coordinator.get("public_key"))
    return claims


def _verify_stage_logs(parts: _Parts) -> None:
    """Step 5, version 2: every stage's signed result binds the receipt's log position: the enclave's
    (which checked the approvals against it before it released or fed anything) and every MPC
    player's (an owner's player takes it from its approval)."""
    if parts.log is None:
        return
    for stage in parts.stages:
        if stage["result"].get("log") != parts.log.to_dict():
            raise refuse(
                "result_log",
                f"stage {stage.get('id')}: its players or enclave signed another log position than the receipt's",
                stage=stage.get("id"),
            )


def _verify_disclosure(parts: _Parts) -> None:
    """Step 6: the suppressed cells and rules are those the stages signed."""
    if parts.disclosure != {"suppressed": _suppressed(parts.stages), "rules": _rules(parts.stages)}:
        raise refuse("disclosure", "the receipt's disclosure decisions are not those the stages signed")


def _verify_privacy(receipt: Mapping[str, Any], parts: _Parts, plan: Plan) -> None:
    """Step 6b: a dp plan's receipt carries exactly the charges of its plan (and of what its enclave
    signed); any other receipt carries none."""
    expected = plan_charges(plan)
    if expected is None:
        if "privacy" in receipt:
            raise refuse("privacy_charges", "the receipt carries privacy charges for a plan that reads no dp dataset")
        return
    if receipt.get("privacy") != {"charges": expected} or not _within(_signed_charges(parts.stages), expected):
        raise refuse(
            "privacy_charges",
            "the receipt's privacy charges are not those of its plan (epsilon, delta and the dp datasets it "
            "reads) or of its enclave's signed result",
        )


def _verify_released(parts: _Parts) -> None:
    """Step 7: the released result's hash, rows and columns are those the last stage signed."""
    result = parts.result
    rows, columns, signed_sha = _released(parts.stages)
    if (
        not isinstance(result.get("sha256"), str)
        or (signed_sha is not None and result.get("sha256") != signed_sha)
        or result.get("rows") != rows
        or result.get("columns") != columns
        or result.get("format") != RESULT_FORMAT
    ):
        raise refuse("result_hash", "the receipt's result hash, rows or columns are not those the last stage signed")


def _verify_simulated_flag(receipt: Mapping[str, Any], parts: _Parts) -> bool:
    """Step 8: simulated is stated, never hidden: the receipt says simulated exactly when a stage was."""
    simulated = any(s.get("simulated") is True for s in parts.stages)
    if receipt.get("simulated") is not simulated:
        raise refuse("simulated_flag", "the receipt's simulated flag differs from its stages' attestation")
    return simulated


def _verify_timestamps(parts: _Parts) -> None:
    """Step 9: submitted <= released, and executed_at is the enclave's."""
    timestamps = parts.timestamps
    submitted, released = timestamps.get("submitted_at"), timestamps.get("released_at")
    executed = [s["result"].get("executed_at") for s in parts.stages if s["kind"] == "tee"]
    if (
        not isinstance(submitted, int | float)
        or not isinstance(released, int | float)
        or submitted > released
        or timestamps.get("executed_at") != (max(executed) if executed else None)
        or set(timestamps) != {"submitted_at", "executed_at", "released_at"}
    ):
        raise refuse("timestamps", "the receipt's timestamps are out of order or not the enclave's")


def _verify_countersignature(
    receipt: Mapping[str, Any], parts: _Parts, coordinator_key: Ed25519PublicKey | bytes | str | None
) -> Any:
    """Step 11: the coordinator (the pinned key, when given) countersigned everything above. Returns
    the key the receipt names."""
    coordinator = parts.coordinator
    named_key = coordinator.get("public_key")
    if coordinator_key is not None and _key_hex(coordinator_key) != named_key:
        raise refuse("coordinator_key", "the receipt is countersigned by another key than the coordinator's")
    if set(coordinator) != {"public_key"} or not signature_verifies(
        named_key, receipt.get("countersignature"), _signed_body(receipt)
    ):
        raise refuse("countersignature", "the coordinator's countersignature does not verify over this receipt")
    return named_key
