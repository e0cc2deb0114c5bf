"""Release receipts: built from a real release (an in-process enclave worker, real sealed streams,
real approvals and simulated attestation), verified offline, and every change to one refused with
the check that names it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.tee_stage import VerifiedResult, verify_result
from mpc.result import SIGN_DOMAIN, MpcResult
from sealroom.attestation import AppraisalPolicy, dev_init, load_root_certificate
from sealroom.audit.receipt_stages import MPC_RESULT_DOMAIN
from sealroom.audit.receipts import (
    MpcStage,
    TeeStage,
    build_receipt,
    countersign,
    load_receipt,
    verify_receipt,
)
from sealroom.audit.receipts import (
    receipt_sha256 as receipt_digest,
)
from sealroom.canonical import canonical_json
from sealroom.errors import AuditError
from sealroom.keys import public_key_hex
from sealroom.planning.mpc_spec import Aggregate, GroupColumn, Player, StageSpec
from sealroom.planning.plan import HelperHolder, Holder, PartyHolder, Plan
from sealroom.planning.plan import MpcStage as MpcPlanStage
from sealroom.planning.plan import Release as StageRelease
from sealroom.signing import LogPosition, sign_approval
from tests.harness.enclave import (
    HARNESS_LOG,
    PartyData,
    approvals,
    loans_table,
    make_party,
    make_plan,
    start_enclave,
)

JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)


@dataclass
class Release:
    """One real release and its countersigned receipt."""

    plan: Plan
    parties: list[PartyData]
    verified: VerifiedResult
    receipt: dict[str, Any]
    coordinator_key: Ed25519PrivateKey
    appraisal: AppraisalPolicy
    dev_dir: Path

    @property
    def table(self) -> bytes:
        return self.verified.arrow_table


def release_once(
    enclave: Any,
    dev_dir: Path,
    coordinator_key: Ed25519PrivateKey,
    *,
    tag: str = "",
    offset: float = 0.0,
    submit: Callable[[Plan, list[PartyData]], LogPosition] | None = None,
) -> Release:
    """Two banks join their loans; one segment has a single customer and is suppressed. ``submit``
    logs the query and returns its log position (default: the harness's position, no log)."""
    rows_a = [(i, "retail" if i < 6 else "solo", 100.0 + i + offset) for i in range(7)]
    rows_b = [(i, "-", 10.0 * i) for i in range(7)]
    a = make_party("bank_a", loans_table(rows_a))
    b = make_party("bank_b", loans_table(rows_b))
    plan = make_plan(JOIN_SQL, [a, b], query_id=f"q_receipt{tag}{int(time.time() * 1000) % 100000}")
    submitted = time.time()
    job = enclave.create_job(plan)
    for p in (a, b):
        enclave.upload(job.seal(p))
    logged = submit(plan, [a, b]) if submit is not None else HARNESS_LOG
    resp = job.execute(approvals(plan, [a, b], logged), logged)
    verified = verify_result(
        resp, plan=plan, hpke_public=job.hpke_public, signing_public=job.signing_public, appraisal=enclave.appraisal
    )
    receipt = build_receipt(
        plan=plan,
        approvals={p.name: (plan.hash, sign_approval(p.key, plan.hash, logged)) for p in (a, b)},
        stages=[TeeStage(verified.result_json, verified.signature, verified.evidence)],
        submitted_at=submitted,
        released_at=time.time(),
        log_position=logged,
    )
    return Release(
        plan, [a, b], verified, countersign(receipt, coordinator_key), coordinator_key, enclave.appraisal, dev_dir
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    dev_dir = tmp_path_factory.mktemp("receipts") / "dev"
    dev_init(dev_dir)
    enclave, stop = start_enclave(dev_dir)
    try:
        yield release_once(enclave, dev_dir, Ed25519PrivateKey.generate())
    finally:
        stop()


@pytest.fixture
def r(real: Release) -> Release:
    return dataclasses.replace(real, receipt=copy.deepcopy(real.receipt))


def verify(rel: Release, receipt: dict[str, Any] | None = None, **kw: Any) -> Any:
    kw.setdefault("appraisal", rel.appraisal)
    kw.setdefault("coordinator_key", rel.coordinator_key.public_key())
    return verify_receipt(rel.receipt if receipt is None else receipt, **kw)


def refused(rel: Release, receipt: dict[str, Any] | None = None, **kw: Any) -> AuditError:
    with pytest.raises(AuditError) as info:
        verify(rel, receipt, **kw)
    return info.value


def test_a_real_receipt_verifies_offline(r: Release) -> None:
    out = verify(r, result_bytes=r.table)
    assert out.query_id == r.plan.query_id and out.plan_hash == r.plan.hash
    assert out.parties == ("bank_a", "bank_b") and out.simulated and out.evidence_appraised
    assert out.result_file_checked and out.coordinator_key_pinned and out.suppressed_cells == 1
    assert out.claims[0].measurement in r.appraisal.measurements
    assert out.result_sha256 == hashlib.sha256(r.table).hexdigest() == r.verified.doc["result_sha256"]
    receipt = r.receipt
    assert receipt["kind"] == "sealroom.receipt" and receipt["version"] == 2 and receipt["simulated"] is True
    assert receipt["log"] == HARNESS_LOG.to_dict() == r.verified.doc["log"] and out.log_position == HARNESS_LOG
    assert receipt["query"]["sql"] == r.plan.sql and receipt["query"]["analyst"] == "alice"
    assert [(d["party"], d["policy_digest"]) for d in receipt["datasets"]] == [
        (p.name, p.policies["loans"].digest()) for p in r.parties
    ]
    assert [a["public_key"] for a in receipt["approvals"]] == [p.public_key_hex for p in r.parties]
    assert receipt["disclosure"]["suppressed"] == [
        {
            "stage": "s1",
            "group": None,  # segment declares no public domain: the cell is counted, its key not shown
            "rule": "min_group_size",
            "reason": receipt["disclosure"]["suppressed"][0]["reason"],
        }
    ]
    # The receipt is canonical JSON all the way through, and round-trips through a file.
    assert load_receipt(json.dumps(receipt, indent=2)) == receipt
    assert receipt_digest(receipt) == hashlib.sha256(canonical_json(receipt)).hexdigest()
    # Never a row value: the released and the suppressed cells' values are nowhere in it.
    text = json.dumps(receipt)
    for value in ("106.0", "166.0", "1621", "1621.0"):
        assert value not in text
    # Without a pinned coordinator key or an appraisal policy, the result says so.
    loose = verify(r, appraisal=None, coordinator_key=None)
    assert not loose.evidence_appraised and not loose.coordinator_key_pinned and loose.claims == ()


def _leaves(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, (*path, i))
    else:
        yield path, doc


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if value is None:
        return 0
    if isinstance(value, str) and value and all(c in "0123456789abcdef" for c in value):
        return value[:-1] + ("0" if value[-1] != "0" else "1")  # still hex, one digit changed
    return value + "x"


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def test_every_field_change_is_refused(r: Release) -> None:
    paths = [p for p, _ in _leaves(r.receipt)]
    assert len(paths) > 100
    for path, value in _leaves(r.receipt):
        receipt = copy.deepcopy(r.receipt)
        _set(receipt, path, _changed(value))
        with pytest.raises(AuditError):
            verify(r, receipt)
    for key in list(r.receipt):
        receipt = copy.deepcopy(r.receipt)
        del receipt[key]
        assert refused(r, receipt).details["check"] == "format"


def _edit(path: tuple[Any, ...], value: Any = None) -> Callable[[dict[str, Any]], None]:
    def edit(receipt: dict[str, Any]) -> None:
        doc: Any = receipt
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = _changed(doc[path[-1]]) if value is None else value

    return edit


@pytest.mark.parametrize(
    ("edit", "check"),
    [
        (_edit(("kind",)), "format"),
        (_edit(("version",)), "format"),
        (_edit(("query", "plan_hash")), "plan_hash"),
        (_edit(("plan", "sql")), "plan_hash"),
        (_edit(("plan", "analyst"), "mallory"), "plan_hash"),
        (_edit(("plan", "salt")), "plan_hash"),
        (_edit(("query", "sql")), "plan_summary"),
        (_edit(("query", "analyst"), "mallory"), "plan_summary"),
        (_edit(("query", "id")), "plan_summary"),
        (_edit(("datasets", 0, "policy_digest")), "plan_summary"),
        (_edit(("datasets", 1, "columns"), ["customer_id", "exposure", "segment"]), "plan_summary"),
        (lambda rc: rc["approvals"].pop(), "approval_missing"),
        (_edit(("approvals", 0, "public_key")), "approval_key"),
        (_edit(("approvals", 0, "plan_hash")), "approval_plan_hash"),
        (_edit(("approvals", 0, "signature")), "approval_signature"),
        (_edit(("approvals", 1, "party"), "bank_c"), "approval_missing"),
        (_edit(("stages", 0, "id"), "s2"), "stages"),
        (_edit(("stages", 0, "signature")), "result_signature"),
        (_edit(("stages", 0, "result", "result_sha256")), "result_signature"),
        (_edit(("stages", 0, "result", "suppressed"), []), "result_signature"),
        (_edit(("stages", 0, "result", "signing_public_key")), "result_signature"),
        (_edit(("stages", 0, "evidence", "evidence"), "AAAA"), "result_evidence"),
        (_edit(("stages", 0, "measurement")), "stage_summary"),
        (_edit(("stages", 0, "format"), "sev-snp"), "stage_summary"),
        (_edit(("stages", 0, "simulated"), False), "stage_summary"),
        (_edit(("disclosure", "suppressed"), []), "disclosure"),
        (_edit(("disclosure", "suppressed", 0, "rule"), "dominance"), "disclosure"),
        (_edit(("disclosure", "rules", "s1", "min_group_size"), 1), "disclosure"),
        (_edit(("result", "sha256")), "result_hash"),
        (_edit(("result", "rows")), "result_hash"),
        (_edit(("result", "columns"), ["segment"]), "result_hash"),
        (_edit(("simulated",), False), "simulated_flag"),
        (_edit(("timestamps", "executed_at")), "timestamps"),
        (_edit(("timestamps", "submitted_at"), 4.0e9), "timestamps"),
        (_edit(("timestamps", "released_at")), "countersignature"),
        (_edit(("timestamps", "submitted_at"), 1.0), "countersignature"),
        (_edit(("coordinator", "public_key")), "coordinator_key"),
        (_edit(("countersignature",)), "countersignature"),
    ],
)
def test_a_changed_field_is_refused_by_the_check_that_covers_it(
    r: Release, edit: Callable[[dict[str, Any]], None], check: str
) -> None:
    edit(r.receipt)
    err = refused(r)
    assert err.details["check"] == check, err.message


def test_a_different_result_file_is_refused(r: Release) -> None:
    table = pa.ipc.open_stream(r.table).read_all()
    doctored = table.set_column(2, "total", pa.array([t + 1 for t in table["total"].to_pylist()]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, doctored.schema) as writer:
        writer.write_table(doctored)
    for other in (sink.getvalue().to_pybytes(), r.table + b"\x00", r.table[:-1], b""):
        err = refused(r, result_bytes=other)
        assert err.details["check"] == "result_file"


def test_a_forged_approval_is_refused(r: Release) -> None:
    mallory = Ed25519PrivateKey.generate()
    r.receipt["approvals"][0]["signature"] = sign_approval(mallory, r.plan.hash, HARNESS_LOG).hex()
    assert refused(r).details["check"] == "approval_signature"


def test_an_approval_under_a_substituted_owner_key_is_refused(r: Release) -> None:
    """The coordinator swaps bank_a's key in the plan for its own and signs bank_a's approval: the plan
    hash changes, and the enclave's signed result still names the plan the owners approved."""
    mallory = Ed25519PrivateKey.generate()
    plan = dataclasses.replace(r.plan, parties={**r.plan.parties, "bank_a": public_key_hex(mallory)})
    rc = r.receipt
    rc["plan"] = plan.to_dict()
    rc["query"]["plan_hash"] = plan.hash
    for a in rc["approvals"]:
        a["plan_hash"] = plan.hash
    rc["approvals"][0].update(
        public_key=public_key_hex(mallory), signature=sign_approval(mallory, plan.hash, HARNESS_LOG).hex()
    )
    rc["approvals"][1]["signature"] = sign_approval(r.parties[1].key, plan.hash, HARNESS_LOG).hex()
    assert refused(r).details["check"] == "result_plan"


def test_a_forged_countersignature_is_refused(r: Release) -> None:
    mallory = Ed25519PrivateKey.generate()
    forged = countersign(r.receipt, mallory)
    assert refused(r, forged).details["check"] == "coordinator_key"
    assert verify(r, forged, coordinator_key=None).coordinator_key == public_key_hex(mallory)  # only self-consistent
    forged["coordinator"]["public_key"] = r.receipt["coordinator"]["public_key"]
    assert refused(r, forged).details["check"] == "countersignature"
    assert refused(r, forged, coordinator_key=None).details["check"] == "countersignature"


def test_a_result_signed_by_a_key_the_evidence_does_not_bind_is_refused(r: Release) -> None:
    """A result document signed by another job key, presented with the real evidence (which binds the
    enclave's job key): the signature verifies, the evidence does not bind the key."""
    rogue = Ed25519PrivateKey.generate()
    doc = r.receipt["stages"][0]["result"]
    doc["signing_public_key"] = public_key_hex(rogue)
    r.receipt["stages"][0]["signature"] = rogue.sign(canonical_json(doc)).hex()
    err = refused(r)
    assert err.details["check"] == "evidence_binding" and err.details["attestation_check"] == "report_data"
    # Even countersigned by the (compromised) coordinator: only an appraisal checks the binding, and
    # without one the result says the evidence was not appraised.
    forged = countersign(r.receipt, r.coordinator_key)
    assert refused(r, forged).details["check"] == "evidence_binding"
    assert not verify(r, forged, appraisal=None).evidence_appraised


def test_evidence_for_another_plan_is_refused(r: Release) -> None:
    other = json.loads(json.dumps(r.receipt["stages"][0]["evidence"]))
    import base64

    other["nonce"] = base64.b64encode(bytes(32)).decode()
    r.receipt["stages"][0]["evidence"] = other
    assert refused(r).details["check"] == "result_evidence"


def test_simulated_evidence_needs_an_explicit_allow_and_the_dev_root(r: Release, tmp_path: Path) -> None:
    no_allow = dataclasses.replace(r.appraisal, allow_simulated=False)
    err = refused(r, appraisal=no_allow)
    assert err.details == {"check": "evidence", "attestation_check": "simulated", "stage": "s1"}
    dev_init(tmp_path / "other")
    other_root = dataclasses.replace(
        r.appraisal, simulated_roots=(load_root_certificate(tmp_path / "other" / "dev-root.crt"),)
    )
    assert refused(r, appraisal=other_root).details["attestation_check"] == "chain"
    untrusted = dataclasses.replace(r.appraisal, measurements=frozenset({"ab" * 48}))
    assert refused(r, appraisal=untrusted).details["attestation_check"] == "measurement"


def test_evidence_is_appraised_as_of_the_release_unless_told_otherwise(r: Release) -> None:
    from datetime import UTC, datetime, timedelta

    executed = datetime.fromtimestamp(r.receipt["stages"][0]["result"]["executed_at"], UTC)
    verify(r, now=executed + timedelta(seconds=10))
    assert refused(r, now=executed + timedelta(days=1)).details["attestation_check"] == "freshness"


def test_the_mpc_domain_is_the_players(r: Release) -> None:
    assert MPC_RESULT_DOMAIN == SIGN_DOMAIN


# --------------------------------------------------------------------------------------------------
# MPC stages: the players' signatures and trust assumption


def _mpc_release(r: Release, threshold: int = 1) -> tuple[Plan, MpcResult, dict[str, Ed25519PrivateKey]]:
    c = make_party("bank_c", loans_table([(1, "x", 1.0)]))
    keys = {"bank_a": r.parties[0].key, "bank_b": r.parties[1].key, "bank_c": c.key}
    players = [{"name": n, "holds_input": True} for n in sorted(keys)]
    # The plan's stage spec: the result must be its.
    stage_spec = StageSpec(
        session_id="m1",
        group_by=(GroupColumn("segment"),),
        domain=(("retail",), ("solo",)),
        aggregates=(Aggregate("n", "count"),),
        players=tuple(Player(n) for n in sorted(keys)),
        min_group_size=2,
        threshold=threshold,
    )
    spec = stage_spec.to_dict()
    holders: dict[int, Holder] = {i: PartyHolder(n, ()) for i, n in enumerate(sorted(keys))}
    tee = r.plan.stages[0]
    stage = MpcPlanStage(
        tee.id,
        tee.sql,
        tee.inputs,
        tee.output_columns,
        tee.min_group_size,
        stage_spec,
        holders,
        StageRelease((), None, (), None),
    )
    plan = dataclasses.replace(
        r.plan, stages=(stage,), parties={**r.plan.parties, "bank_c": c.public_key_hex}, query_id="q_mpc1"
    )
    result = MpcResult(
        session_id="m1",
        spec_digest=hashlib.sha256(canonical_json(spec)).hexdigest(),
        group_by=("segment",),
        aggregates=("n",),
        cells=((("retail",), {"n": 6}),),
        suppressed=(("solo",),),
        rule={"name": "min_group_size", "min_group_size": 2},
        players=tuple({"index": i, **p} for i, p in enumerate(players)),
        threshold=threshold,
        trust_assumption="semi-honest, honest majority: no 2 of the 3 players collude",
        log=HARNESS_LOG,
    )
    return plan, result, keys


def _mpc_receipt(r: Release, plan: Plan, result: MpcResult, keys: dict[str, Ed25519PrivateKey]) -> dict[str, Any]:
    sigs = {name: (public_key_hex(k), result.sign(k)) for name, k in keys.items()}
    receipt = build_receipt(
        plan=plan,
        approvals={
            p: (plan.hash, sign_approval(k, plan.hash, HARNESS_LOG))
            for p, k in keys.items()
            if p in plan.involved_parties()
        },
        stages=[MpcStage("s1", result.to_dict(), sigs)],
        submitted_at=1.0,
        released_at=2.0,
        log_position=HARNESS_LOG,
        result_sha256=hashlib.sha256(b"mpc table").hexdigest(),
    )
    return countersign(receipt, r.coordinator_key)


def test_an_mpc_receipt_binds_every_players_signature_and_the_trust_assumption(r: Release) -> None:
    plan, result, keys = _mpc_release(r)
    receipt = _mpc_receipt(r, plan, result, keys)
    out = verify(r, receipt, appraisal=None)
    assert not out.simulated and out.suppressed_cells == 1
    assert receipt["stages"][0]["trust_assumption"].startswith("semi-honest, honest majority")
    assert receipt["disclosure"]["suppressed"][0]["group"] == {"segment": "solo"}
    # A player's signature missing, forged, or by another key than its owner's.
    bad = copy.deepcopy(receipt)
    bad["stages"][0]["players"].pop()
    assert refused(r, bad).details["check"] == "mpc_signature"
    bad = copy.deepcopy(receipt)
    bad["stages"][0]["players"][1]["signature"] = result.sign(Ed25519PrivateKey.generate()).hex()
    assert refused(r, bad).details["check"] == "mpc_signature"
    mallory = Ed25519PrivateKey.generate()
    bad = copy.deepcopy(receipt)
    bad["stages"][0]["players"][0].update(public_key=public_key_hex(mallory), signature=result.sign(mallory).hex())
    assert refused(r, bad).details["check"] == "mpc_player_key"
    # An opened cell changed after the players signed.
    bad = copy.deepcopy(receipt)
    bad["stages"][0]["result"]["cells"][0]["values"]["n"] = 7
    assert refused(r, bad).details["check"] == "mpc_signature"
    # The trust assumption misstated.
    bad = copy.deepcopy(receipt)
    bad["stages"][0]["trust_assumption"] = "malicious security"
    assert refused(r, bad).details["check"] == "mpc_trust"
    # A genuinely signed result of another stage spec (other k, other session, other spec) than the plan's.
    for change in (
        {"spec_digest": "ab" * 32},
        {"session_id": "m2"},
        {"rule": {"name": "min_group_size", "min_group_size": 1}},
    ):
        other = dataclasses.replace(result, **change)
        assert refused(r, _mpc_receipt(r, plan, other, keys), appraisal=None).details["check"] == "mpc_plan"


def test_a_helper_player_signs_with_the_key_the_plan_names(r: Release) -> None:
    """bank_c's player replaced by the coordinator's helper: its signature must be by the key the
    plan's holders name for it, not by any key the receipt states."""
    plan, result, keys = _mpc_release(r)
    coordinator = Ed25519PrivateKey.generate()
    stage = plan.stages[0]
    assert isinstance(stage, MpcPlanStage)
    stage_spec = dataclasses.replace(stage.spec, players=(*stage.spec.players[:2], Player("coordinator", False)))
    spec = stage_spec.to_dict()
    players = spec["players"]
    holders = {**stage.holders, 2: HelperHolder("coordinator", public_key_hex(coordinator))}
    stage = dataclasses.replace(stage, spec=stage_spec, holders=holders)
    plan = dataclasses.replace(plan, stages=(stage,), parties={k: v for k, v in plan.parties.items() if k != "bank_c"})
    result = dataclasses.replace(
        result,
        spec_digest=hashlib.sha256(canonical_json(spec)).hexdigest(),
        players=tuple({"index": i, **p} for i, p in enumerate(players)),
    )
    signers = {"bank_a": keys["bank_a"], "bank_b": keys["bank_b"], "coordinator": coordinator}
    verify(r, _mpc_receipt(r, plan, result, signers), appraisal=None)
    mallory = {**signers, "coordinator": Ed25519PrivateKey.generate()}
    assert refused(r, _mpc_receipt(r, plan, result, mallory), appraisal=None).details["check"] == "mpc_player_key"
    # A plan from before helpers were named in its holders: the helper is the coordinator, so it
    # must have signed with the key that countersigns the receipt.
    legacy_stage = dataclasses.replace(stage, holders={k: v for k, v in holders.items() if k != 2})
    legacy = dataclasses.replace(plan, stages=(legacy_stage,))
    by_coordinator = {**signers, "coordinator": r.coordinator_key}
    verify(r, _mpc_receipt(r, legacy, result, by_coordinator), appraisal=None)
    assert refused(r, _mpc_receipt(r, legacy, result, signers), appraisal=None).details["check"] == "mpc_player_key"


def test_an_mpc_with_a_dishonest_majority_threshold_is_refused(r: Release) -> None:
    plan, result, keys = _mpc_release(r)
    receipt = _mpc_receipt(r, plan, result, keys)
    receipt["plan"]["stages"][0]["mpc"]["threshold"] = 2  # t = 2 of m = 3: two colluding players learn all
    assert refused(r, receipt, appraisal=None).details["check"] == "mpc_trust"


def test_build_receipt_refuses_parts_that_do_not_fit(r: Release) -> None:
    stage = TeeStage(r.verified.result_json, r.verified.signature, r.verified.evidence)
    common: dict[str, Any] = {
        "plan": r.plan,
        "approvals": {},
        "submitted_at": 1.0,
        "released_at": 2.0,
        "log_position": HARNESS_LOG,
    }
    with pytest.raises(ValueError):
        build_receipt(**common, stages=[])
    with pytest.raises(ValueError):
        build_receipt(**common, stages=[stage], result_sha256="0" * 64)
    with pytest.raises(ValueError):
        build_receipt(**common, stages=[dataclasses.replace(stage, result_json=r.verified.result_json + b" ")])
    with pytest.raises(TypeError):
        countersign(r.receipt, "not a key")  # type: ignore[arg-type]
    for bad in (b"{", b"[1]", json.dumps({"kind": "other"}).encode()):
        with pytest.raises(ValueError):
            load_receipt(bad)


def test_a_receipt_binds_the_log_position_its_approvals_and_enclave_signed(r: Release) -> None:
    """Version 2: the position is every approval's and the enclave's; moving it (to point at another
    entry) breaks the approvals, and a receipt without it is no version 2 receipt."""
    moved = copy.deepcopy(r.receipt)
    moved["log"]["leaf_index"] = 0 if HARNESS_LOG.leaf_index else 1
    moved["log"]["tree_size"] = 5
    assert refused(r, countersign(moved, r.coordinator_key)).details["check"] == "approval_signature"
    dropped = copy.deepcopy(r.receipt)
    del dropped["log"]
    assert refused(r, countersign(dropped, r.coordinator_key)).details["check"] == "format"
    bad = copy.deepcopy(r.receipt)
    bad["log"] = {"leaf_index": 3, "tree_size": 2, "root_hash": "00" * 32}
    assert refused(r, countersign(bad, r.coordinator_key)).details["check"] == "log_position"
    # Approvals re-signed for another position by the owners themselves: the enclave checked (and
    # signed) the first ones, at the first position.
    other = LogPosition(1, 2, b"\x01" * 32)
    resigned = copy.deepcopy(r.receipt)
    resigned["log"] = other.to_dict()
    for a, p in zip(resigned["approvals"], r.parties, strict=True):
        a["signature"] = sign_approval(p.key, r.plan.hash, other).hex()
    assert refused(r, countersign(resigned, r.coordinator_key)).details["check"] == "result_approvals"


def test_an_mpc_receipt_needs_the_players_to_sign_its_log_position(r: Release) -> None:
    plan, result, keys = _mpc_release(r)
    unbound = dataclasses.replace(result, log=None)  # players that signed no log position
    assert unbound.to_dict()["version"] == 1 and "log" not in unbound.to_dict()
    assert refused(r, _mpc_receipt(r, plan, unbound, keys), appraisal=None).details["check"] == "result_log"
    assert verify(r, _mpc_receipt(r, plan, result, keys), appraisal=None).log_position == HARNESS_LOG
