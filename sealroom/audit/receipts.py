"""Release receipts: one canonical, versioned, countersigned document per release, verifiable offline.

A receipt binds what a compliance reviewer must be able to say about one release:

- the query (id, SQL text, analyst) and the full plan it ran, with the plan hash (SHA-256 of the
  plan's canonical JSON): the involved datasets, their owners' policies and policy digests, and
  the owners' signing keys all come from the plan;
- every approval: party, public key, plan hash, Ed25519 signature over the plan hash;
- per stage, either the enclave's signed result document (with its signature by the job key and
  the attestation evidence envelope that binds that key), or the MPC result (the opened cells,
  suppressed group keys, rule, players, threshold and trust assumption) with every player's
  signature;
- the disclosure decisions: which cells were suppressed, by which rule (group labels and the
  rule's wording only; never a value);
- the SHA-256 of the released result (the Arrow IPC stream bytes the enclave hashed and signed);
- timestamps, and whether attestation was simulated (no TEE);
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
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.attestation import SIMULATED, AppraisalPolicy, Claims, Evidence, report_data_for, verify_evidence
from sealroom.canonical import canonical_json
from sealroom.errors import AttestationError, AuditError, SealroomError
from sealroom.planning.plan import HelperHolder, Plan, mpc_player_keys
from sealroom.planning.plan import MpcStage as PlannedMpcStage
from sealroom.signing import approval_message

__all__ = [
    "RECEIPT_KIND",
    "RECEIPT_VERSION",
    "COUNTERSIGN_DOMAIN",
    "MPC_RESULT_DOMAIN",
    "TeeStage",
    "MpcStage",
    "build_receipt",
    "countersign",
    "receipt_digest",
    "load_receipt",
    "VerifiedReceipt",
    "verify_receipt",
]

RECEIPT_KIND = "sealroom.receipt"
RECEIPT_VERSION = 1
RESULT_KIND = "sealroom.result"
COUNTERSIGN_DOMAIN = b"sealroom/v1/receipt-countersignature\x00"
# The MPC players' signing domain (mpc.result.SIGN_DOMAIN; the kernel does not import mpc, a test
# checks the two agree).
MPC_RESULT_DOMAIN = b"sealroom/v1/mpc-result\x00"
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


def _refuse(check: str, message: str, **details: Any) -> AuditError:
    return AuditError(message, details={"check": check, **details})


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _verifies(public_key_hex: Any, signature_hex: Any, message: bytes) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


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
    result_sha256: str | None = None,
) -> dict[str, Any]:
    """The receipt of one release, from what the coordinator holds at release time, not yet
    countersigned (call :func:`countersign`).

    ``approvals``: party -> (plan hash, signature), as the coordinator stored and the enclave
    checked them. ``stages`` in the plan's order; the last one produced the released table.
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
    receipt: dict[str, Any] = {
        "kind": RECEIPT_KIND,
        "version": RECEIPT_VERSION,
        "query": {"id": plan.query_id, "sql": plan.sql, "analyst": plan.analyst, "plan_hash": plan.hash},
        "plan": plan.to_dict(),
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
    # Canonical JSON round trip: what is verified later is exactly what is built here.
    return json.loads(canonical_json(receipt))


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


def receipt_digest(receipt: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the whole receipt's canonical JSON (what the log's ``released`` entry records)."""
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


def _get(doc: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(doc, Mapping) or not isinstance(doc.get(key), kind):
        raise _refuse("format", f"the receipt's {where}{key} is missing or malformed")
    return doc[key]


def _verify_tee_stage(
    stage: Mapping[str, Any],
    *,
    plan: Plan,
    approvals: list[Mapping[str, Any]],
    appraisal: AppraisalPolicy | None,
    now: datetime | None,
) -> Claims | None:
    sid = stage.get("id")
    doc = _get(stage, "result", dict, f"stage {sid} ")
    signature = _get(stage, "signature", str, f"stage {sid} ")
    envelope = _get(stage, "evidence", dict, f"stage {sid} ")
    job_key = doc.get("signing_public_key")
    # 5a. The enclave signed this result document with its job key.
    if not _verifies(job_key, signature, canonical_json(doc)):
        raise _refuse(
            "result_signature",
            f"stage {sid}: the enclave's result signature does not verify with the job key it names",
            stage=sid,
        )
    # 5b. ...for this plan, query and stage.
    if (
        doc.get("kind") != RESULT_KIND
        or doc.get("plan_hash") != plan.hash
        or doc.get("query_id") != plan.query_id
        or doc.get("stage") != sid
    ):
        raise _refuse(
            "result_plan", f"stage {sid}: the enclave's result is for another plan, query or stage", stage=sid
        )
    # 5c. ...having checked exactly the approvals this receipt shows.
    seen = sorted((a.get("party"), a.get("plan_hash"), a.get("signature")) for a in doc.get("approvals", []))
    shown = sorted((a.get("party"), a.get("plan_hash"), a.get("signature")) for a in approvals)
    if seen != shown:
        raise _refuse(
            "result_approvals",
            f"stage {sid}: the approvals the enclave checked are not the ones this receipt shows",
            stage=sid,
        )
    # 5d. The evidence is the one the result names, answering the plan-hash nonce.
    try:
        evidence = Evidence.from_bytes(canonical_json(envelope))
    except AttestationError:
        raise _refuse("result_evidence", f"stage {sid}: the evidence envelope is malformed", stage=sid) from None
    att = doc.get("attestation") if isinstance(doc.get("attestation"), dict) else {}
    if att.get("evidence_sha256") != evidence.digest().hex():
        raise _refuse(
            "result_evidence", f"stage {sid}: the result names other attestation evidence than the receipt's", stage=sid
        )
    nonce = bytes.fromhex(plan.hash)
    if evidence.nonce != nonce:
        raise _refuse(
            "evidence_binding", f"stage {sid}: the evidence answers another nonce than this plan's hash", stage=sid
        )
    # 5e. Stage summary fields agree with what the enclave signed.
    simulated = bool(doc.get("simulated")) or evidence.format == SIMULATED or bool(att.get("simulated"))
    if (
        stage.get("format") != att.get("format")
        or stage.get("format") != evidence.format
        or stage.get("measurement") != att.get("measurement")
        or stage.get("simulated") is not simulated
    ):
        raise _refuse(
            "stage_summary",
            f"stage {sid}: its format, measurement or simulated flag differs from what the enclave signed",
            stage=sid,
        )
    if appraisal is None:
        return None
    # 5f. The evidence binds the job keys (and the nonce) and passes the reviewer's appraisal,
    # as of the time the enclave signed (evidence is long expired when a receipt is audited).
    try:
        hpke = bytes.fromhex(doc.get("hpke_public_key", ""))
        signing = bytes.fromhex(job_key)
        expected = report_data_for(hpke_public_key=hpke, signing_public_key=signing, nonce=nonce)
    except (ValueError, TypeError):
        raise _refuse("evidence_binding", f"stage {sid}: the result names malformed job keys", stage=sid) from None
    at = now
    if at is None:
        executed = doc.get("executed_at")
        if not isinstance(executed, int | float):
            raise _refuse("format", f"stage {sid}: the result has no executed_at time")
        at = datetime.fromtimestamp(executed, UTC)
    try:
        claims = verify_evidence(
            evidence, policy=appraisal, expected_report_data=expected, expected_nonce=nonce, now=at
        )
    except AttestationError as err:
        inner = err.details.get("check")
        check = "evidence_binding" if inner in ("report_data", "nonce") else "evidence"
        raise AuditError(
            f"stage {sid}: the attestation evidence does not verify ({inner}): {err.message}",
            details={"check": check, "attestation_check": inner, "stage": sid},
        ) from None
    if claims.measurement != att.get("measurement"):
        raise _refuse(
            "evidence_binding", f"stage {sid}: the result names another measurement than the evidence", stage=sid
        )
    return claims


def _legacy_helpers(stage: PlannedMpcStage, coordinator_key: Any) -> PlannedMpcStage:
    """A plan from before the helpers' keys were named in ``holders``: its helper players are the
    coordinator's, so they must have signed with the key that countersigned the receipt (the pinned
    coordinator key, when the reviewer gives one; step 11 checks it)."""
    if not isinstance(coordinator_key, str):
        return stage
    missing = {
        i: HelperHolder(p.name, coordinator_key)
        for i, p in enumerate(stage.spec.players)
        if not p.holds_input and i not in stage.holders
    }
    return dataclasses.replace(stage, holders={**stage.holders, **missing}) if missing else stage


def _verify_mpc_stage(
    stage: Mapping[str, Any], *, plan: Plan, job_keys: Sequence[str], coordinator_key: Any = None
) -> None:
    sid = stage.get("id")
    result = _get(stage, "result", dict, f"stage {sid} ")
    players = _get(stage, "players", list, f"stage {sid} ")
    message = MPC_RESULT_DOMAIN + hashlib.sha256(canonical_json(result)).digest()
    named = [str(p.get("name")) for p in result.get("players", []) if isinstance(p, dict)]
    signers = {str(p.get("name")): p for p in players if isinstance(p, dict)}
    if not named or sorted(named) != sorted(signers):
        raise _refuse("mpc_signature", f"stage {sid}: not every MPC player signed the result", stage=sid)
    # Every player signs with the identity the plan names for it (by its index, not its name): an
    # owner's player with the owner's key, a helper with the key its holders entry names (the
    # coordinator's), the enclave's player with the attested job key of the TEE stage feeding it.
    planned_stage = next((s for s in plan.mpc_stages() if s.id == sid), None)
    try:
        keyed = _legacy_helpers(planned_stage, coordinator_key) if planned_stage is not None else None
        named_keys = mpc_player_keys(plan, keyed) if keyed is not None else None
    except SealroomError:
        named_keys = None
    if named_keys is None or len(named_keys) != len(named):
        raise _refuse("mpc_plan", f"stage {sid}: the plan names no identity for every MPC player", stage=sid)
    for i, name in enumerate(named):
        sig = signers[name]
        expected = named_keys[i]
        if expected is None:
            expected = job_keys[0] if len(job_keys) == 1 else None
            if expected is None:
                raise _refuse("mpc_player_key", f"stage {sid}: no attested job key for the enclave player", stage=sid)
        if expected != sig.get("public_key"):
            raise _refuse(
                "mpc_player_key", f"stage {sid}: player {name} signed with a key that is not its own", stage=sid
            )
        if not _verifies(sig.get("public_key"), sig.get("signature"), message):
            raise _refuse("mpc_signature", f"stage {sid}: the signature of player {name} does not verify", stage=sid)
    # The opened result is the one of this plan's MPC stage: its spec (players, domain, aggregates,
    # bounds, k, threshold) is the one the owners approved, as part of the plan hash.
    planned = planned_stage
    if planned is None:
        raise _refuse("mpc_plan", f"stage {sid}: the plan has no such MPC stage", stage=sid)
    spec = planned.spec.to_dict()  # as the planner wrote it and the owners approved it
    rule = result.get("rule") if isinstance(result.get("rule"), dict) else {}
    if (
        result.get("spec_digest") != hashlib.sha256(canonical_json(spec)).hexdigest()
        or result.get("session_id") != spec.get("session_id")
        or rule.get("min_group_size") != spec.get("min_group_size")
        or result.get("threshold") != spec.get("threshold")
        or [p.get("name") for p in result.get("players", []) if isinstance(p, dict)]
        != [p.get("name") for p in spec.get("players", []) if isinstance(p, dict)]
    ):
        raise _refuse(
            "mpc_plan",
            f"stage {sid}: the MPC result is not the one of this plan's stage (spec, session, k, threshold or players "
            "differ)",
            stage=sid,
        )
    m = len(named)
    t = result.get("threshold")
    if stage.get("trust_assumption") != result.get("trust_assumption") or type(t) is not int or m < 3 or not 2 * t < m:
        raise _refuse(
            "mpc_trust",
            f"stage {sid}: the MPC's trust assumption is misstated or not an honest majority (t < m/2, m >= 3)",
            stage=sid,
        )
    if stage.get("simulated") is not False:
        raise _refuse("stage_summary", f"stage {sid}: an MPC stage is never simulated", stage=sid)


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

    1. ``format``: a receipt of this kind and version, with every field;
    2. ``plan``/``plan_hash``: the plan parses and hashes to the plan hash;
    3. ``plan_summary``: query id, SQL, analyst and datasets are the plan's;
    4. ``approval_missing``/``approval_unexpected``/``approval_key``/``approval_plan_hash``/
       ``approval_signature``: every involved owner approved this plan hash with the key the plan
       names, and nobody else is listed;
    5. per stage (``stages`` names a mismatch with the plan's stages): TEE: ``result_signature``,
       ``result_plan``, ``result_approvals``, ``result_evidence``, ``evidence_binding``,
       ``stage_summary``, ``evidence`` (appraisal); MPC: ``mpc_player_key``, ``mpc_signature``,
       ``mpc_trust``;
    6. ``disclosure``: the suppressed cells and rules are those the stages signed;
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
        raise _refuse("format", f"the receipt is malformed ({type(exc).__name__})") from None


def _verify_receipt(
    receipt: Mapping[str, Any],
    *,
    appraisal: AppraisalPolicy | None,
    coordinator_key: Ed25519PublicKey | bytes | str | None,
    result_bytes: bytes | None,
    now: datetime | None,
) -> VerifiedReceipt:
    # 1. Format.
    if not isinstance(receipt, Mapping) or receipt.get("kind") != RECEIPT_KIND:
        raise _refuse("format", f"not a {RECEIPT_KIND} document")
    if receipt.get("version") != RECEIPT_VERSION:
        raise _refuse("format", f"receipt version {receipt.get('version')!r} is not {RECEIPT_VERSION}")
    if set(receipt) != _KEYS:
        raise _refuse("format", f"a receipt has exactly the fields {', '.join(sorted(_KEYS))}")
    query = _get(receipt, "query", dict, "")
    plan_doc = _get(receipt, "plan", dict, "")
    approvals = _get(receipt, "approvals", list, "")
    stages = _get(receipt, "stages", list, "")
    disclosure = _get(receipt, "disclosure", dict, "")
    result = _get(receipt, "result", dict, "")
    timestamps = _get(receipt, "timestamps", dict, "")
    coordinator = _get(receipt, "coordinator", dict, "")
    if not stages or not all(isinstance(s, dict) for s in stages) or not all(isinstance(a, dict) for a in approvals):
        raise _refuse("format", "the receipt's stages or approvals are malformed")

    # 2. The plan and its hash.
    plan_json = canonical_json(plan_doc)
    try:
        plan = Plan.from_json(plan_json)
    except SealroomError as err:
        if err.details.get("stage") == "mpc" and err.details.get("rule") == "threshold":
            # An MPC stage without an honest majority does not even read as a plan.
            raise _refuse(
                "mpc_trust", f"the receipt's plan has an MPC stage without an honest majority ({err.message})"
            ) from None
        raise _refuse("plan", f"the receipt's plan does not parse: {err.message}") from None
    if plan.to_json() != plan_json:
        raise _refuse("plan", "the receipt's plan holds fields a plan does not have")
    plan_hash = _sha256(plan_json)
    if query.get("plan_hash") != plan_hash:
        raise _refuse("plan_hash", "the receipt's plan does not hash to its plan hash")

    # 3. The summary fields are the plan's.
    if (
        query.get("id") != plan.query_id
        or query.get("sql") != plan.sql
        or query.get("analyst") != plan.analyst
        or set(query) != {"id", "sql", "analyst", "plan_hash"}
    ):
        raise _refuse("plan_summary", "the receipt's query id, SQL or analyst is not the plan's")
    if receipt["datasets"] != _datasets(plan):
        raise _refuse("plan_summary", "the receipt's datasets or policy digests are not the plan's")

    # 4. Approvals.
    involved = plan.involved_parties()
    listed = [a.get("party") for a in approvals]
    for party in involved:
        if listed.count(party) != 1:
            raise _refuse("approval_missing", f"the receipt holds no single approval by {party}", party=party)
    for a in approvals:
        party = a.get("party")
        if party not in involved:
            raise _refuse(
                "approval_unexpected", f"the receipt lists an approval by {party}, whose data it did not read"
            )
        if a.get("public_key") != plan.parties.get(party):
            raise _refuse("approval_key", f"the approval of {party} names another key than the plan", party=party)
        if a.get("plan_hash") != plan_hash:
            raise _refuse("approval_plan_hash", f"the approval of {party} is for another plan", party=party)
        try:
            message = approval_message(plan_hash)
        except ValueError:
            raise _refuse("plan_hash", "the plan hash is not hex") from None
        if not _verifies(a.get("public_key"), a.get("signature"), message):
            raise _refuse("approval_signature", f"the approval signature of {party} does not verify", party=party)

    # 5. Stages.
    if [(s.get("id"), s.get("kind")) for s in stages] != [(s.id, s.kind) for s in plan.stages]:
        raise _refuse("stages", "the receipt's stages are not the plan's")
    claims: list[Claims] = []
    for stage in stages:
        if stage["kind"] == "tee":
            c = _verify_tee_stage(stage, plan=plan, approvals=approvals, appraisal=appraisal, now=now)
            if c is not None:
                claims.append(c)
        else:
            job_keys = [str(s["result"].get("signing_public_key")) for s in stages if s["kind"] == "tee"]
            _verify_mpc_stage(
                stage, plan=plan, job_keys=job_keys, coordinator_key=receipt["coordinator"].get("public_key")
            )

    # 6. Disclosure decisions.
    if disclosure != {"suppressed": _suppressed(stages), "rules": _rules(stages)}:
        raise _refuse("disclosure", "the receipt's disclosure decisions are not those the stages signed")

    # 7. The released result.
    rows, columns, signed_sha = _released(stages)
    if (
        not isinstance(result.get("sha256"), str)
        or (signed_sha is not None and result.get("sha256") != signed_sha)
        or result.get("rows") != rows
        or result.get("columns") != columns
        or result.get("format") != RESULT_FORMAT
    ):
        raise _refuse("result_hash", "the receipt's result hash, rows or columns are not those the last stage signed")

    # 8. Simulated is stated, never hidden.
    simulated = any(s.get("simulated") is True for s in stages)
    if receipt.get("simulated") is not simulated:
        raise _refuse("simulated_flag", "the receipt's simulated flag differs from its stages' attestation")

    # 9. Timestamps.
    submitted, released = timestamps.get("submitted_at"), timestamps.get("released_at")
    executed = [s["result"].get("executed_at") for s in stages if s["kind"] == "tee"]
    if (
        not isinstance(submitted, int | float)
        or not isinstance(released, int | float)
        or submitted > released
        or timestamps.get("executed_at") != (max(executed) if executed else None)
        or set(timestamps) != {"submitted_at", "executed_at", "released_at"}
    ):
        raise _refuse("timestamps", "the receipt's timestamps are out of order or not the enclave's")

    # 10. The result file.
    if result_bytes is not None and _sha256(bytes(result_bytes)) != result["sha256"]:
        raise _refuse("result_file", "the result file is not the released result (its SHA-256 differs)")

    # 11. The coordinator's countersignature, by the pinned key.
    named_key = coordinator.get("public_key")
    pinned = coordinator_key is not None
    if pinned:
        assert coordinator_key is not None
        if _key_hex(coordinator_key) != named_key:
            raise _refuse("coordinator_key", "the receipt is countersigned by another key than the coordinator's")
    if set(coordinator) != {"public_key"} or not _verifies(
        named_key, receipt.get("countersignature"), _signed_body(receipt)
    ):
        raise _refuse("countersignature", "the coordinator's countersignature does not verify over this receipt")

    return VerifiedReceipt(
        query_id=plan.query_id,
        plan_hash=plan_hash,
        analyst=plan.analyst,
        result_sha256=result["sha256"],
        parties=tuple(involved),
        simulated=simulated,
        evidence_appraised=appraisal is not None,
        claims=tuple(claims),
        coordinator_key=str(named_key),
        coordinator_key_pinned=pinned,
        result_file_checked=result_bytes is not None,
        suppressed_cells=len(disclosure["suppressed"]),
    )
