"""The record of processing (GDPR Article 30): the owners' [processing] declarations in their policies,
the operator's [collaboration], the log entries for refusals and withdrawn approvals, and the record
built from a coordinator's state as JSON, Markdown and HTML."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.store import SQLiteStore as Store
from sealroom.app.cli import main
from sealroom.app.demo import BANK_POLICY, HOSPITAL_POLICY
from sealroom.audit.entries import LogEntry
from sealroom.audit.events import describe, notable_events, query_history
from sealroom.audit.log import export_store
from sealroom.audit.notes import NoteVerifier
from sealroom.audit.report import ropa_html, ropa_markdown
from sealroom.audit.ropa import (
    Collaboration,
    CoordinatorState,
    build_ropa,
    ropa_json,
)
from sealroom.audit.state import read_catalog, read_declaration
from sealroom.audit.store import SQLiteLogStore
from sealroom.canonical import canonical_json
from sealroom.errors import ConfigError
from sealroom.keys import public_key_hex
from sealroom.policy import DatasetPolicy, ProcessingRecord, load_policy_file
from sealroom.signing import sign_owner_action, verify_owner_action
from tests.unit.kernel.test_policy_rules import POLICY_TOML

PROCESSING_TOML = """
[processing]
purposes = ["credit_risk_statistics", "stress_testing"]
legal_basis = "legitimate_interests"
data_subjects = ["retail customers"]
personal_data = ["credit exposure", "internal rating"]
retention = "10 years after the end of the relationship"
controller = "Bank A plc"
contact = "dpo@bank-a.example"
"""

COLLABORATION = {
    "name": "Cross-bank study",
    "purpose": "credit_risk_statistics",
    "contact": "study@consortium.example",
    "recipients": ["risk analysts of the banks"],
    "result_retention": "5 years",
    "log_retention": "10 years",
}


# -- the owners' [processing] ----------------------------------------------------------------------


def test_policies_without_processing_hash_as_before() -> None:
    """Known answers computed before [processing] existed: plans signed under these policies stay valid."""
    assert BANK_POLICY.digest() == "8d17810e2cc9a80fe4d8d76747799455a4c872b3052780923470c64d172a2b4b"
    assert DatasetPolicy().digest() == "8121ea06ac634daf2f4515e1e48e4aa47fb648189e23687c2f39e91747b3e48b"
    policy = DatasetPolicy.from_dict(tomllib.loads(POLICY_TOML))
    assert policy.digest() == "cb962e0b3c7493f92ad6a3b80da73d309c8c2a0390f94656e5dd2655b24ea1d2"
    assert b"processing" not in policy.canonical() and policy.processing is None
    assert HOSPITAL_POLICY.processing is None


def test_processing_is_part_of_the_policy_and_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "loans.toml"
    path.write_text(POLICY_TOML.replace("\n[columns]", PROCESSING_TOML + "\n[columns]"))
    policy = load_policy_file(path)
    assert policy.processing == ProcessingRecord(
        purposes=("credit_risk_statistics", "stress_testing"),
        legal_basis="legitimate_interests",
        data_subjects=("retail customers",),
        personal_data=("credit exposure", "internal rating"),
        retention="10 years after the end of the relationship",
        controller="Bank A plc",
        contact="dpo@bank-a.example",
    )
    assert policy.rule("segment").role == "dimension"  # [columns] still read after [processing]
    without = dataclasses.replace(policy, processing=None)
    assert policy.digest() != without.digest()
    assert json.loads(policy.canonical())["processing"]["legal_basis"] == "legitimate_interests"
    again = DatasetPolicy.from_json(policy.canonical())
    assert again == policy and again.digest() == policy.digest()
    written = tmp_path / "written.toml"
    written.write_text(policy.to_toml())
    assert load_policy_file(written) == policy and load_policy_file(written).digest() == policy.digest()
    # Special categories go with their Article 9(2) condition, listed in the canonical order.
    health = ProcessingRecord.from_dict(
        {
            "purposes": ["cohort_statistics"],
            "legal_basis": "public_task",
            "data_subjects": ["inpatients"],
            "personal_data": ["diagnosis group"],
            "special_categories": ["health", "genetic"],
            "special_category_condition": "archiving_research_or_statistics",
        },
        source="p.toml",
        prefix="processing.",
    )
    assert health.special_categories == ("genetic", "health")
    assert health.to_dict()["special_category_condition"] == "archiving_research_or_statistics"
    assert "retention" not in health.to_dict()


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        ({"purposes": []}, "processing.purposes", "non-empty list of distinct purpose identifiers"),
        ({"purposes": ["credit risk"]}, "processing.purposes", "purpose identifiers"),
        ({"purposes": ["a", "a"]}, "processing.purposes", "distinct"),
        ({"legal_basis": "because"}, "processing.legal_basis", "Article 6"),
        ({"data_subjects": []}, "processing.data_subjects", "non-empty list of categories of data subjects"),
        ({"personal_data": ["ok", " "]}, "processing.personal_data", "categories of personal data"),
        ({"personal_data": ["x" * 501]}, "processing.personal_data", "at most 500"),
        ({"special_categories": ["politics"]}, "processing.special_categories", "drawn from racial_or_ethnic"),
        ({"special_categories": ["health"]}, "processing.special_category_condition", "Article 9"),
        (
            {"special_categories": ["health"], "special_category_condition": "curiosity"},
            "processing.special_category_condition",
            "Article 9",
        ),
        ({"special_category_condition": "public_health"}, "processing.special_category_condition", "left out"),
        ({"retention": ""}, "processing.retention", "non-empty string"),
        ({"controller": 7}, "processing.controller", "non-empty string"),
        ({"recipients": ["x"]}, "processing.recipients", "unknown key"),
    ],
)
def test_malformed_processing_names_file_key_and_expectation(
    tmp_path: Path, change: dict[str, Any], key: str, expected: str
) -> None:
    doc = tomllib.loads(PROCESSING_TOML)["processing"] | change
    path = tmp_path / "bad.toml"
    lines = ["[processing]"] + [f"{k} = {json.dumps(v)}" for k, v in doc.items()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_policy_file(path)
    assert info.value.details == {"file": str(path), "key": key}
    assert str(path) in info.value.message


def test_processing_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('processing = "GDPR"\n')
    with pytest.raises(ConfigError) as info:
        load_policy_file(path)
    assert info.value.details == {"file": str(path), "key": "processing"}


# -- the operator's [collaboration] ----------------------------------------------------------------


def _coordinator_toml(tmp_path: Path, collaboration: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'[coordinator]\nstate_dir = "state"\nenclave = "127.0.0.1:9"\n[tls]\nplaintext = true\n\n'
        f"[collaboration]\n{collaboration}\n"
    )
    return path


def test_the_coordinator_config_reads_the_collaboration(tmp_path: Path) -> None:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in COLLABORATION.items())
    config = CoordinatorConfig.load(_coordinator_toml(tmp_path, lines))
    assert config.collaboration == Collaboration(
        name="Cross-bank study",
        purpose="credit_risk_statistics",
        contact="study@consortium.example",
        recipients=("risk analysts of the banks",),
        result_retention="5 years",
        log_retention="10 years",
    )
    assert Collaboration.from_dict(config.collaboration.to_dict()) == config.collaboration
    plain = tmp_path / "plain.toml"
    plain.write_text('[coordinator]\nstate_dir = "state"\nenclave = "127.0.0.1:9"\n[tls]\nplaintext = true\n')
    assert CoordinatorConfig.load(plain).collaboration is None


@pytest.mark.parametrize(
    ("collaboration", "key", "expected"),
    [
        ('purpose = "credit_risk_statistics"', "collaboration.name", "the collaboration's name"),
        ('name = "x"', "collaboration.purpose", "purpose identifier"),
        ('name = "x"\npurpose = "credit risk"', "collaboration.purpose", "purpose identifier"),
        ('name = "x"\npurpose = "p"\nrecipients = "analysts"', "collaboration.recipients", "categories of recipients"),
        ('name = "x"\npurpose = "p"\ntransfers = [""]', "collaboration.transfers", "third countries"),
        ('name = "x"\npurpose = "p"\nlog_retention = 10', "collaboration.log_retention", "non-empty string"),
        ('name = "x"\npurpose = "p"\ncontroller = "me"', "collaboration.controller", "unknown key"),
    ],
)
def test_a_malformed_collaboration_names_file_and_key(
    tmp_path: Path, collaboration: str, key: str, expected: str
) -> None:
    path = _coordinator_toml(tmp_path, collaboration)
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        CoordinatorConfig.load(path)
    assert info.value.details == {"file": str(path), "key": key}


# -- new log entries --------------------------------------------------------------------------------


def test_refusal_and_withdrawal_entries_hold_identifiers_only() -> None:
    good = [
        ("query_refused", {"query_id": "q_1", "analyst": "alice", "sql_sha256": "a" * 64, "code": "policy_refusal"}),
        (
            "query_refused",
            {
                "query_id": "q_1",
                "analyst": "alice",
                "sql_sha256": "a" * 64,
                "code": "policy_refusal",
                "rule": "column_role",
                "party": "bank_a",
                "dataset": "loans",
            },
        ),
        ("approval_revoked", {"query_id": "q_1", "party": "bank_a", "plan_hash": "b" * 64}),
        (
            "approval_revoked",
            {"query_id": "q", "party": "bank_a", "plan_hash": "b" * 64, "issued_at_ms": 17, "owner_signature": "ab"},
        ),
        ("approval_lapsed", {"query_id": "q_1", "party": "bank_a", "plan_hash": "b" * 64, "cause": "expired"}),
        ("approval_lapsed", {"query_id": "q", "party": "b", "plan_hash": "b" * 64, "cause": "not_held_by_agent"}),
        ("collaboration_declared", {"declaration_sha256": "c" * 64}),
    ]
    for type_, event in good:
        entry = LogEntry(0, 1, type_, event)
        assert LogEntry.from_bytes(entry.canonical()) == entry
    bad = [
        ("query_refused", {"query_id": "q", "analyst": "alice", "sql_sha256": "a" * 64}),  # code is required
        ("query_refused", {"query_id": "q", "analyst": "a", "sql_sha256": "a" * 64, "code": "x", "rule": "no way"}),
        ("query_refused", {"query_id": "q", "analyst": "a", "sql_sha256": "SELECT 1", "code": "x"}),
        ("query_refused", {"query_id": "q", "analyst": "a", "sql_sha256": "a" * 64, "code": "x", "column": "ssn"}),
        ("query_refused", {"query_id": "q", "analyst": "a", "sql_sha256": "a" * 64, "code": "x", "message": "m"}),
        ("approval_revoked", {"query_id": "q", "party": "bank_a"}),  # plan_hash is required
        ("approval_revoked", {"query_id": "q", "party": "b", "plan_hash": "b" * 64, "reason": "changed my mind"}),
        ("approval_revoked", {"query_id": "q", "party": "b", "plan_hash": "b" * 64, "owner_signature": "KEY"}),
        ("approval_revoked", {"query_id": "q", "party": "b", "plan_hash": "b" * 64, "issued_at_ms": -1}),
        ("approval_lapsed", {"query_id": "q", "party": "b", "plan_hash": "b" * 64, "cause": "it got old"}),
        ("approval_lapsed", {"query_id": "q", "party": "b", "plan_hash": "b" * 64}),
        ("collaboration_declared", {"declaration_sha256": "c" * 64, "name": "Cross-bank study"}),
    ]
    for type_, event in bad:
        with pytest.raises(ValueError):
            LogEntry(0, 1, type_, event)


def _schema() -> bytes:
    return pa.schema([("customer_id", pa.int64()), ("segment", pa.string()), ("amount", pa.float64())]).serialize()


def _policy(processing: bool = True, *, controller: str = "Bank A plc", purpose: str = "credit_risk_statistics"):
    doc: dict[str, Any] = {
        "privacy_unit": "customer_id",
        "min_group_size": 7,
        "dominance": {"n": 1, "k": 90},
        "columns": {
            "customer_id": "join_key",
            "segment": "dimension",
            "amount": {"role": "measure", "aggregates": ["sum"], "min": 0, "max": 100},
        },
    }
    if processing:
        doc["processing"] = tomllib.loads(PROCESSING_TOML)["processing"] | {
            "controller": controller,
            "purposes": [purpose],
        }
    return DatasetPolicy.from_dict(doc)


def _register(store: Store, party: str, policy: DatasetPolicy) -> str:
    key = Ed25519PrivateKey.generate()
    store.register_party(
        party,
        "127.0.0.1:1",
        public_key_hex(key),
        [
            {
                "name": "loans",
                "arrow_schema": _schema().to_pybytes(),
                "policy_json": policy.canonical(),
                "policy_digest": policy.digest(),
                "description": "loans per customer",
            }
        ],
    )
    return public_key_hex(key)


def _config(state: Path, **kw: Any) -> CoordinatorConfig:
    from sealroom.policy import TrustPolicy

    return CoordinatorConfig(state_dir=state, enclave="127.0.0.1:9", trust=TrustPolicy(), **kw)


def _entries(store: Store) -> list[dict[str, Any]]:
    assert store.log is not None
    return [json.loads(e) for e in store.log.store.entries()]


def test_the_coordinator_publishes_its_declaration_and_logs_each_change_once(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    collaboration = Collaboration.from_dict(COLLABORATION)
    for _ in range(2):  # a restart with the same declaration logs nothing new
        c = Coordinator(_config(state, collaboration=collaboration))
        logged = [e for e in _entries(c.store) if e["type"] == "collaboration_declared"]
        c.shutdown()
        doc = read_declaration(state)
        assert doc is not None and doc["collaboration"] == collaboration.to_dict() and doc["analysts"] is None
        digest = hashlib.sha256(canonical_json(doc)).hexdigest()
        assert [e["event"] for e in logged] == [{"declaration_sha256": digest}]
    changed = dataclasses.replace(collaboration, log_retention="12 years")
    c = Coordinator(_config(state, collaboration=changed))
    try:
        logged = [e for e in _entries(c.store) if e["type"] == "collaboration_declared"]
        assert len(logged) == 2 and logged[1]["event"]["declaration_sha256"] != digest
        assert "12 years" not in json.dumps(_entries(c.store))  # the log holds the digest only
    finally:
        c.shutdown()
    # A coordinator that never declared one logs nothing (and publishes a null declaration).
    other = Coordinator(_config(tmp_path / "other"))
    try:
        assert _entries(other.store) == []
        assert read_declaration(tmp_path / "other") == {
            "format": "sealroom.collaboration",
            "version": 1,
            "collaboration": None,
            "analysts": None,
        }
    finally:
        other.shutdown()


def test_a_planner_refusal_is_logged_with_identifiers_only(tmp_path: Path) -> None:
    c = Coordinator(_config(tmp_path / "state"))
    try:
        _register(c.store, "bank_a", _policy())
        sql = "SELECT segment, MAX(amount) FROM bank_a.loans WHERE segment <> 'SECRET-LITERAL-7' GROUP BY segment"
        qid, status = c.submit(sql, "alice")
        assert status == "refused" and c.store.query(qid).status == "refused"
        unknown_sql = "SELECT COUNT(*) FROM bank_zz.payroll_of_ceo"
        qid2, status2 = c.submit(unknown_sql, "alice")
        assert status2 == "refused"
        refused = [e for e in _entries(c.store) if e["type"] == "query_refused"]
        assert [e["event"]["query_id"] for e in refused] == [qid, qid2]
        first = refused[0]["event"]
        assert first["analyst"] == "alice" and first["sql_sha256"] == hashlib.sha256(sql.encode()).hexdigest()
        assert first["code"] == "policy_refusal" and first["rule"] == "column_role"
        assert (first["party"], first["dataset"]) == ("bank_a", "loans")
        assert set(first) == {"query_id", "analyst", "sql_sha256", "code", "rule", "party", "dataset"}
        # A name from the analyst's SQL that is not registered never reaches the log.
        assert "party" not in refused[1]["event"] and "dataset" not in refused[1]["event"]
        text = json.dumps(_entries(c.store))
        for secret in ("SECRET-LITERAL-7", "bank_zz", "payroll_of_ceo", "amount", "MAX"):
            assert secret not in text
    finally:
        c.shutdown()


def test_revoked_and_lapsed_approvals_are_logged_with_their_removal(tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.db", log_key=Ed25519PrivateKey.generate())
    try:
        key = Ed25519PrivateKey.generate()
        plan_hash = "ab" * 32
        store.add_approval("q_1", "bank_a", plan_hash, b"\x01" * 64)
        signature = sign_owner_action(
            key, "revoke", query_id="q_1", party="bank_a", plan_hash=plan_hash, issued_at_ms=5
        )
        assert store.delete_approval(
            "q_1", "bank_a", event="approval_revoked", issued_at_ms=5, owner_signature=signature.hex()
        )
        assert store.approvals("q_1") == {}
        # Nothing held: nothing removed, nothing logged.
        assert not store.delete_approval("q_1", "bank_a", event="approval_revoked")
        store.add_approval("q_1", "bank_b", plan_hash, b"\x02" * 64)
        assert store.delete_approval("q_1", "bank_b", event="approval_lapsed", cause="expired")
        log = _entries(store)
        assert [e["type"] for e in log] == ["approved", "approval_revoked", "approved", "approval_lapsed"]
        revoked = log[1]["event"]
        assert revoked == {
            "query_id": "q_1",
            "party": "bank_a",
            "plan_hash": plan_hash,
            "issued_at_ms": 5,
            "owner_signature": signature.hex(),
        }
        # A reviewer checks the owner's own signature over the revocation.
        verify_owner_action(
            public_key_hex(key),
            bytes.fromhex(revoked["owner_signature"]),
            "revoke",
            query_id="q_1",
            party="bank_a",
            plan_hash=plan_hash,
            issued_at_ms=5,
        )
        assert log[3]["event"] == {"query_id": "q_1", "party": "bank_b", "plan_hash": plan_hash, "cause": "expired"}
        # An event the log cannot record rolls the removal back with it.
        store.add_approval("q_1", "bank_c", plan_hash, b"\x03" * 64)
        with pytest.raises(Exception, match="cannot record"):
            store.delete_approval("q_1", "bank_c", event="approval_lapsed", cause="it got old")
        assert "bank_c" in store.approvals("q_1") and len(_entries(store)) == 5
        history = [describe(e) for e in log]
        assert history[1] == "bank_a revoked its approval (signed request)"
        assert history[3] == "the approval of bank_b lapsed: its expiry passed"
    finally:
        store.close()


# -- the record ------------------------------------------------------------------------------------

SQL = "SELECT a.segment, SUM(a.amount) FROM bank_a.loans a WHERE a.segment <> 'SECRET-LITERAL-9' GROUP BY 1"


def _receipt(qid: str, analyst: str, parties: list[str]) -> dict[str, Any]:
    """A hand-made receipt (it does not verify: the record must say so)."""
    return {
        "query": {"id": qid, "sql": SQL, "analyst": analyst, "plan_hash": "cd" * 32},
        "datasets": [{"party": p, "dataset": "loans", "stage": "s1"} for p in parties],
        "approvals": [{"party": p} for p in parties],
        "stages": [{"id": "s1", "kind": "tee", "format": "sev-snp", "measurement": "ee" * 48, "simulated": False}],
        "disclosure": {"suppressed": [{"stage": "s1", "group": {"segment": "SECRET-GROUP"}, "rule": "k"}]},
        "result": {"sha256": "ef" * 32, "rows": 4, "columns": ["segment", "total_9999"]},
        "simulated": False,
        "timestamps": {"submitted_at": 1_800_000_000.0, "released_at": 1_800_000_060.0},
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A coordinator's state: a declared collaboration; bank_a declares [processing] (with markup in its
    controller's name), bank_b declares another purpose, bank_c declares nothing; one release, one
    planner refusal, one revoked and one lapsed approval."""
    directory = tmp_path / "coordinator"
    c = Coordinator(_config(directory, collaboration=Collaboration.from_dict(COLLABORATION)))
    try:
        _register(c.store, "bank_a", _policy(controller="Bank <b>A</b> | plc"))
        _register(c.store, "bank_b", _policy(purpose="marketing"))
        _register(c.store, "bank_c", _policy(processing=False))
        c.submit("SELECT customer_id FROM bank_a.loans", "alice")
        c.store.add_approval("q_1", "bank_a", "cd" * 32, b"\x01" * 64)
        c.store.delete_approval("q_1", "bank_a", event="approval_revoked")
        c.store.add_approval("q_1", "bank_b", "cd" * 32, b"\x01" * 64)
        c.store.delete_approval("q_1", "bank_b", event="approval_lapsed", cause="not_held_by_agent")
        assert c.store.log is not None
        c.store.log.append_release(_receipt("q_1", "alice", ["bank_a", "bank_b"]))
    finally:
        c.shutdown()
    return directory


def _build(directory: Path, **kw: Any) -> dict[str, Any]:
    import sqlite3

    db = sqlite3.connect(f"{(directory / 'coordinator.db').as_uri()}?mode=ro", uri=True)
    try:
        vkey = NoteVerifier.from_vkey((directory / "log.vkey").read_text())
        export = export_store(SQLiteLogStore(db), origin=vkey.name, log_key=vkey)
    finally:
        db.close()
    datasets, parties = read_catalog(directory)
    return build_ropa(
        [
            CoordinatorState(
                directory=str(directory),
                export=export,
                declaration=read_declaration(directory),
                datasets=datasets,
                parties=parties,
                **kw,
            )
        ]
    )


def test_the_record_from_a_coordinators_state(state: Path) -> None:
    doc = _build(state, receipt_status={})
    assert doc["format"] == "sealroom.ropa" and doc["version"] == 1
    (rec,) = doc["records"]
    assert rec["collaboration"]["purpose"] == "credit_risk_statistics"
    assert rec["declaration"]["matches_log"] is True and rec["declaration"]["logged_entry"] == 0
    assert [(d["party"], d["releases"]) for d in rec["datasets"]] == [("bank_a", 1), ("bank_b", 1), ("bank_c", 0)]
    a = rec["datasets"][0]
    assert a["processing"]["legal_basis"] == "legitimate_interests" and a["registered_entry"] is not None
    assert a["safeguards"]["min_group_size"] == 7 and a["safeguards"]["dominance"] == {"n": 1, "k": 90.0}
    assert a["safeguards"]["bounded_measures"] == ["amount"]
    assert rec["controllers"][0]["controller"] == "Bank <b>A</b> | plc"
    assert rec["recipients"]["received_releases"] == [
        {"analyst": "alice", "releases": 1, "first": "2027-01-15T08:01:00Z", "last": "2027-01-15T08:01:00Z"}
    ]
    (activity,) = rec["activities"]
    assert activity["query_id"] == "q_1" and activity["purpose"] == "credit_risk_statistics"
    assert activity["cells_released"] == 4 and activity["cells_suppressed"] == 1
    assert activity["status"] == "not verified" and activity["execution"][0]["platform"] == "sev-snp"
    s = rec["summary"]
    assert (s["releases"], s["queries_refused"], s["approvals_revoked"], s["approvals_lapsed"]) == (1, 1, 1, 1)
    gaps = {(g["check"], g.get("party")) for g in rec["gaps"]}
    assert ("no_processing_record", "bank_c") in gaps and ("purpose_not_declared", "bank_b") in gaps
    assert ("no_controller", "bank_c") in gaps and ("analysts_not_authenticated", None) in gaps
    assert ("receipt_not_verified", None) in gaps
    assert ("purpose_not_declared", "bank_a") not in gaps and ("no_collaboration", None) not in gaps
    measures = " ".join(m["text"] for m in rec["measures"]["technical"])
    assert "at least 7 distinct customer_id values" in measures and "sev-snp" in measures

    # Canonical JSON; no SQL text, no literal, no suppressed group's label, no released column name.
    text = ropa_json(doc)
    assert text == canonical_json(json.loads(text)).decode() + "\n"
    for rendered in (text, ropa_markdown(doc), ropa_html(doc)):
        for secret in ("SECRET-LITERAL-9", "SECRET-GROUP", "SELECT", "total_9999"):
            assert secret not in rendered


def test_the_record_as_markdown_and_html_escapes_what_owners_declared(state: Path) -> None:
    doc = _build(state)
    md = ropa_markdown(doc)
    assert md.startswith("# Record of processing activities (GDPR Article 30)")
    for heading in ("### Controllers", "### Datasets and categories of data", "### Recipients", "### Transfers",
                    "### Technical and organisational measures", "### Gaps"):  # fmt: skip
        assert heading in md
    assert r"Bank \<b\>A\</b\> \| plc" in md and "<b>" not in md
    assert "| `bank_a.loans` | `credit_risk_statistics` |" in md
    page = ropa_html(doc)
    assert "Bank &lt;b&gt;A&lt;/b&gt; | plc" in page and "<b>A" not in page
    assert "<script" not in page and not re.search(r"""(src|href)\s*=""", page)
    assert page.count("<section") == 1 and "purpose_not_declared" in page


def test_the_record_of_a_state_that_declares_nothing(tmp_path: Path) -> None:
    c = Coordinator(_config(tmp_path / "coordinator"))
    c.shutdown()
    (rec,) = _build(tmp_path / "coordinator")["records"]
    assert rec["collaboration"] is None and rec["activities"] == [] and rec["datasets"] == []
    assert {g["check"] for g in rec["gaps"]} == {"no_collaboration", "analysts_not_authenticated"}
    assert "Undeclared collaboration" in ropa_markdown(_build(tmp_path / "coordinator"))


def test_audit_ropa_and_the_events_in_list_and_show(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            main(list(args))
        out, err = capsys.readouterr()
        return int(info.value.code or 0), out, err

    code, out, _ = run("audit", "ropa", "--state-dir", str(state), "--format", "json")
    assert code == 0
    doc = json.loads(out)
    (rec,) = doc["records"]
    # The hand-made receipt does not verify, and the record says so.
    assert rec["log"]["status"].startswith("refused") and rec["activities"][0]["status"].startswith("refused")
    assert {"log_not_verified", "receipt_not_verified"} <= {g["check"] for g in rec["gaps"]}
    output = state.parent / "ropa.html"
    code, out, err = run("audit", "ropa", "--state-dir", str(state), "--format", "html", "-o", str(output), "--json")
    assert code == 0 and json.loads(out)["records"][0]["gaps"] and output.read_text().startswith("<!DOCTYPE html>")
    code, _, err = run("audit", "ropa", "--state-dir", str(state), "--format", "md", "--json")
    assert code == 2 and "-o FILE" in err

    code, out, _ = run("audit", "list", "--state-dir", str(state), "--json")
    events = json.loads(out)["events"]
    assert [e["type"] for e in events] == ["query_refused", "approval_revoked", "approval_lapsed"]
    assert events[0]["analyst"] == "alice" and events[2]["rule"] == "not_held_by_agent"
    code, out, _ = run("audit", "list", "--state-dir", str(state), "--dataset", "bank_b.loans")
    assert "refused queries and withdrawn approvals (1)" in out and "bank_b" in out
    refused = events[0]["query_id"]
    code, out, err = run("audit", "show", refused, "--state-dir", str(state))
    assert code == 1 and f"no release {refused}" in err
    assert "refused by the planner" in out and "submitted by alice" in out
    code, out, _ = run("audit", "show", "q_1", "--state-dir", str(state))
    assert code == 0 and "log history:" in out and "bank_a revoked its approval" in out


def test_event_histories_from_an_export(state: Path) -> None:
    import sqlite3

    db = sqlite3.connect(f"{(state / 'coordinator.db').as_uri()}?mode=ro", uri=True)
    try:
        vkey = NoteVerifier.from_vkey((state / "log.vkey").read_text())
        export = export_store(SQLiteLogStore(db), origin=vkey.name, log_key=vkey)
    finally:
        db.close()
    assert [h["type"] for h in query_history(export, "q_1")] == [
        "approved",
        "approval_revoked",
        "approved",
        "approval_lapsed",
        "released",
    ]
    assert [e["type"] for e in notable_events(export)] == ["query_refused", "approval_revoked", "approval_lapsed"]
