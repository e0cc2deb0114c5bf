"""Step 5 of :func:`sealroom.audit.receipts.verify_receipt`: one stage of a receipt, TEE or MPC.

A TEE stage is the enclave's signed result document and the attestation evidence that binds its job
key: the signature, the plan, the approvals the enclave checked, the evidence and (with the
reviewer's appraisal policy) the evidence's appraisal as of the time the enclave signed. An MPC
stage is the opened result and every player's signature, each by the identity the plan names for
that player, for the plan's own stage spec, under an honest-majority trust assumption. Every
failure raises :class:`~sealroom.errors.AuditError` naming the check (``details["check"]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sealroom.attestation import SIMULATED, AppraisalPolicy, Claims, Evidence, report_data_for, verify_evidence
from sealroom.audit.refusals import refuse
from sealroom.canonical import canonical_json
from sealroom.errors import AttestationError, AuditError, SealroomError
from sealroom.planning.plan import HelperHolder, Plan, mpc_player_keys
from sealroom.planning.plan import MpcStage as PlannedMpcStage

__all__ = [
    "RESULT_KIND",
    "MPC_RESULT_DOMAIN",
    "signature_verifies",
    "required_field",
    "verify_tee_stage",
    "verify_mpc_stage",
]

RESULT_KIND = "sealroom.result"
# The MPC players' signing domain (mpc.result.SIGN_DOMAIN; the kernel does not import mpc, a test
# checks the two agree).
MPC_RESULT_DOMAIN = b"sealroom/v1/mpc-result\x00"


def signature_verifies(public_key_hex: Any, signature_hex: Any, message: bytes) -> bool:
    """Whether an Ed25519 signature (hex) by a public key (hex) verifies over ``message``; False for
    malformed keys or signatures (each caller refuses with its own check)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def required_field(doc: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``doc[key]`` when ``doc`` is a mapping holding a ``kind`` there; ``format`` refusal otherwise."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get(key), kind):
        raise refuse("format", f"the receipt's {where}{key} is missing or malformed")
    return doc[key]


def verify_tee_stage(
    stage: Mapping[str, Any],
    *,
    plan: Plan,
    approvals: Sequence[Mapping[str, Any]],
    appraisal: AppraisalPolicy | None,
    now: datetime | None,
) -> Claims | None:
    """Step 5 for a TEE stage: 5a-5c the enclave's signed result, 5d its evidence, 5e the stage's
    summary, 5f (with an appraisal policy) the appraisal of the evidence, whose claims it returns."""
    sid = stage.get("id")
    doc = required_field(stage, "result", dict, f"stage {sid} ")
    signature = required_field(stage, "signature", str, f"stage {sid} ")
    envelope = required_field(stage, "evidence", dict, f"stage {sid} ")
    _verify_tee_result(doc, signature, sid=sid, plan=plan, approvals=approvals)
    att = doc.get("attestation") if isinstance(doc.get("attestation"), dict) else {}
    evidence = _tee_evidence(envelope, att, sid=sid, plan=plan)
    _verify_tee_summary(stage, doc, att, evidence, sid=sid)
    if appraisal is None:
        return None
    return _appraise_tee_evidence(doc, att, evidence, sid=sid, plan=plan, appraisal=appraisal, now=now)


def _verify_tee_result(
    doc: Mapping[str, Any], signature: str, *, sid: Any, plan: Plan, approvals: Sequence[Mapping[str, Any]]
) -> None:
    """Steps 5a-5c: the enclave signed this result document with its job key, for this plan, query
    and stage, having checked exactly the approvals this receipt shows."""
    # 5a. The enclave signed this result document with its job key.
    if not signature_verifies(doc.get("signing_public_key"), signature, canonical_json(doc)):
        raise refuse(
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
        raise refuse("result_plan", f"stage {sid}: the enclave's result is for another plan, query or stage", stage=sid)
    # 5c. ...having checked exactly the approvals this receipt shows.
    seen = sorted((a.get("party"), a.get("plan_hash"), a.get("signature")) for a in doc.get("approvals", []))
    shown = sorted((a.get("party"), a.get("plan_hash"), a.get("signature")) for a in approvals)
    if seen != shown:
        raise refuse(
            "result_approvals",
            f"stage {sid}: the approvals the enclave checked are not the ones this receipt shows",
            stage=sid,
        )


def _tee_evidence(envelope: Mapping[str, Any], att: Mapping[str, Any], *, sid: Any, plan: Plan) -> Evidence:
    """Step 5d: the evidence is the one the result names, answering the plan-hash nonce."""
    try:
        evidence = Evidence.from_bytes(canonical_json(envelope))
    except AttestationError:
        raise refuse("result_evidence", f"stage {sid}: the evidence envelope is malformed", stage=sid) from None
    if att.get("evidence_sha256") != evidence.digest().hex():
        raise refuse(
            "result_evidence", f"stage {sid}: the result names other attestation evidence than the receipt's", stage=sid
        )
    if evidence.nonce != bytes.fromhex(plan.hash):
        raise refuse(
            "evidence_binding", f"stage {sid}: the evidence answers another nonce than this plan's hash", stage=sid
        )
    return evidence


def _verify_tee_summary(
    stage: Mapping[str, Any], doc: Mapping[str, Any], att: Mapping[str, Any], evidence: Evidence, *, sid: Any
) -> None:
    """Step 5e: the stage's summary fields agree with what the enclave signed."""
    simulated = bool(doc.get("simulated")) or evidence.format == SIMULATED or bool(att.get("simulated"))
    if (
        stage.get("format") != att.get("format")
        or stage.get("format") != evidence.format
        or stage.get("measurement") != att.get("measurement")
        or stage.get("simulated") is not simulated
    ):
        raise refuse(
            "stage_summary",
            f"stage {sid}: its format, measurement or simulated flag differs from what the enclave signed",
            stage=sid,
        )


def _appraise_tee_evidence(
    doc: Mapping[str, Any],
    att: Mapping[str, Any],
    evidence: Evidence,
    *,
    sid: Any,
    plan: Plan,
    appraisal: AppraisalPolicy,
    now: datetime | None,
) -> Claims:
    """Step 5f: the evidence binds the job keys (and the nonce) and passes the reviewer's appraisal,
    as of the time the enclave signed (evidence is long expired when a receipt is audited)."""
    nonce = bytes.fromhex(plan.hash)
    try:
        hpke = bytes.fromhex(doc.get("hpke_public_key", ""))
        job_key: Any = doc.get("signing_public_key")
        signing = bytes.fromhex(job_key)
        expected = report_data_for(hpke_public_key=hpke, signing_public_key=signing, nonce=nonce)
    except (ValueError, TypeError):
        raise refuse("evidence_binding", f"stage {sid}: the result names malformed job keys", stage=sid) from None
    at = now
    if at is None:
        executed = doc.get("executed_at")
        if not isinstance(executed, int | float):
            raise refuse("format", f"stage {sid}: the result has no executed_at time")
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
        raise refuse(
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


def verify_mpc_stage(
    stage: Mapping[str, Any], *, plan: Plan, job_keys: Sequence[str], coordinator_key: Any = None
) -> None:
    sid = stage.get("id")
    result = required_field(stage, "result", dict, f"stage {sid} ")
    players = required_field(stage, "players", list, f"stage {sid} ")
    message = MPC_RESULT_DOMAIN + hashlib.sha256(canonical_json(result)).digest()
    named = [str(p.get("name")) for p in result.get("players", []) if isinstance(p, dict)]
    signers = {str(p.get("name")): p for p in players if isinstance(p, dict)}
    if not named or sorted(named) != sorted(signers):
        raise refuse("mpc_signature", f"stage {sid}: not every MPC player signed the result", stage=sid)
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
        raise refuse("mpc_plan", f"stage {sid}: the plan names no identity for every MPC player", stage=sid)
    for i, name in enumerate(named):
        sig = signers[name]
        expected = named_keys[i]
        if expected is None:
            expected = job_keys[0] if len(job_keys) == 1 else None
            if expected is None:
                raise refuse("mpc_player_key", f"stage {sid}: no attested job key for the enclave player", stage=sid)
        if expected != sig.get("public_key"):
            raise refuse(
                "mpc_player_key", f"stage {sid}: player {name} signed with a key that is not its own", stage=sid
            )
        if not signature_verifies(sig.get("public_key"), sig.get("signature"), message):
            raise refuse("mpc_signature", f"stage {sid}: the signature of player {name} does not verify", stage=sid)
    # The opened result is the one of this plan's MPC stage: its spec (players, domain, aggregates,
    # bounds, k, threshold) is the one the owners approved, as part of the plan hash.
    planned = planned_stage
    if planned is None:
        raise refuse("mpc_plan", f"stage {sid}: the plan has no such MPC stage", stage=sid)
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
        raise refuse(
            "mpc_plan",
            f"stage {sid}: the MPC result is not the one of this plan's stage (spec, session, k, threshold or players "
            "differ)",
            stage=sid,
        )
    m = len(named)
    t = result.get("threshold")
    if stage.get("trust_assumption") != result.get("trust_assumption") or type(t) is not int or m < 3 or not 2 * t < m:
        raise refuse(
            "mpc_trust",
            f"stage {sid}: the MPC's trust assumption is misstated or not an honest majority (t < m/2, m >= 3)",
            stage=sid,
        )
    if stage.get("simulated") is not False:
        raise refuse("stage_summary", f"stage {sid}: an MPC stage is never simulated", stage=sid)
