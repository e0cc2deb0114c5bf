"""The coordinator's store writes the transparency log in its own SQLite transactions: what it logs
(and what it does not), atomicity with the store's own writes, and the coordinator's log key and
published verifier files."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from coordinator.store import SQLiteStore, log_origin
from sealroom.audit.log import export_store
from sealroom.audit.notes import NoteVerifier
from sealroom.audit.store import SQLiteLogStore
from sealroom.audit.verify import verify_log
from sealroom.errors import ConfigError, InvalidQueryError
from sealroom.keys import public_key_hex, save_signing_key
from sealroom.policy import TrustPolicy

DIGEST = "ab" * 32


def dataset(name: str = "loans", digest: str = DIGEST, schema: bytes = b"schema-1") -> dict[str, Any]:
    return {
        "name": name,
        "arrow_schema": schema,
        "policy_json": b"{}",
        "policy_digest": digest,
        "description": "free text that must stay out of the log",
    }


def entries(store: SQLiteStore) -> list[dict[str, Any]]:
    assert store.log is not None
    return [json.loads(e) for e in store.log.store.entries()]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SQLiteStore(tmp_path / "coordinator.db", log_key=Ed25519PrivateKey.generate())
    yield s
    s.close()


def test_registration_is_logged_when_new_or_changed(store: SQLiteStore) -> None:
    key = "11" * 32
    store.register_party("bank_a", "127.0.0.1:1", key, [dataset()])
    store.register_party("bank_a", "127.0.0.1:2", key, [dataset()])  # an agent restart: nothing new
    store.register_party("bank_a", "127.0.0.1:2", key, [dataset(digest="cd" * 32)])  # a new policy
    log = entries(store)
    assert [e["type"] for e in log] == ["dataset_registered", "dataset_registered"]
    assert log[0]["event"] == {
        "party": "bank_a",
        "dataset": "loans",
        "policy_digest": DIGEST,
        "schema_sha256": hashlib.sha256(b"schema-1").hexdigest(),
        "owner_key_sha256": hashlib.sha256(bytes.fromhex(key)).hexdigest(),
    }
    assert log[1]["event"]["policy_digest"] == "cd" * 32
    assert "free text" not in json.dumps(log) and "127.0.0.1" not in json.dumps(log)


def test_an_event_the_log_cannot_record_rolls_the_registration_back(store: SQLiteStore) -> None:
    store.register_party("bank_a", "127.0.0.1:1", "11" * 32, [dataset()])
    with pytest.raises(InvalidQueryError, match="audit log cannot record"):
        store.register_party("_bank", "127.0.0.1:1", "22" * 32, [dataset()])
    assert "_bank" not in store.parties()
    assert len(entries(store)) == 1
    # The log's tree followed the rollback: the next entry is number 1 and the log verifies.
    store.add_approval("q_1", "bank_a", DIGEST, b"\x01" * 64)
    assert [e["seq"] for e in entries(store)] == [0, 1]
    assert store.log is not None
    verify_log(store.log.export(), log_key=store.log.signer.verifier)


def test_approvals_are_logged_once_each(store: SQLiteStore) -> None:
    store.add_approval("q_1", "bank_a", DIGEST, b"\x01" * 64)
    store.add_approval("q_1", "bank_a", DIGEST, b"\x01" * 64)  # the same approval, refreshed
    store.delete_approval("q_1", "bank_a")
    store.add_approval("q_1", "bank_a", DIGEST, b"\x01" * 64)  # approved again after a revocation
    log = entries(store)
    assert [(e["type"], e["event"]["party"]) for e in log] == [("approved", "bank_a")] * 2
    assert log[0]["event"]["signature"] == "01" * 64 and log[0]["event"]["plan_hash"] == DIGEST


def test_a_release_with_a_log_needs_its_receipt(store: SQLiteStore) -> None:
    store.create_query("q_1", "SELECT 1", "alice")
    with pytest.raises(ValueError, match="needs its receipt"):
        store.release(
            "q_1", arrow_table=b"", suppressed=[], result_json=b"{}", signature=b"", evidence=b"", simulated=True
        )
    assert store.get_release("q_1") is None and store.query("q_1").status == "planning"


def test_a_store_from_before_receipts_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(str(tmp_path / "coordinator.db"))
    db.execute(
        "CREATE TABLE releases (query_id TEXT PRIMARY KEY, arrow_table BLOB NOT NULL, suppressed_json TEXT NOT NULL, "
        "result_json BLOB NOT NULL, signature BLOB NOT NULL, evidence BLOB NOT NULL, simulated INTEGER NOT NULL, "
        "released_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO releases VALUES ('q_old', x'00', '[]', x'7b7d', x'', x'', 1, 1.0)")
    db.commit()
    db.close()
    store = SQLiteStore(tmp_path / "coordinator.db", log_key=Ed25519PrivateKey.generate())
    try:
        old = store.get_release("q_old")
        assert old is not None and old.receipt is None
    finally:
        store.close()


def config(state_dir: Path, **kw: Any) -> CoordinatorConfig:
    return CoordinatorConfig(state_dir=state_dir, enclave="127.0.0.1:9", trust=TrustPolicy(), **kw)


def test_the_coordinator_makes_its_log_key_once_and_publishes_it(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    first = Coordinator(config(state))
    origin = first.store.log.origin if first.store.log else ""
    first.shutdown()
    key_file = state / "log.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    vkey = NoteVerifier.from_vkey((state / "log.vkey").read_text())
    info = json.loads((state / "log.json").read_text())
    assert vkey.name == origin == info["origin"] and origin.startswith("sealroom.coordinator/")
    assert info["log_key"] == vkey.vkey() and info["database"] == "coordinator.db"

    again = Coordinator(config(state))  # a restart keeps the key and the origin
    try:
        assert again.store.log is not None and again.store.log.origin == origin
        again.store.append_event("compliance_decision", query_id="q_1", reviewer="dpo", decision="accepted")
    finally:
        again.shutdown()
    db = sqlite3.connect(f"{(state / 'coordinator.db').as_uri()}?mode=ro", uri=True)
    try:
        report = verify_log(export_store(SQLiteLogStore(db), origin=origin, log_key=vkey), log_key=vkey)
    finally:
        db.close()
    assert report.size == 1 and report.log_key_pinned


def test_a_configured_log_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    save_signing_key(key, tmp_path / "operator.key")
    c = Coordinator(config(tmp_path / "state", log_key=tmp_path / "operator.key"))
    try:
        assert c.store.log is not None and c.store.log.origin == log_origin(key)
        assert json.loads((tmp_path / "state" / "log.json").read_text())["public_key"] == public_key_hex(key)
        assert not (tmp_path / "state" / "log.key").exists()
    finally:
        c.shutdown()
    with pytest.raises(ConfigError, match="not found"):
        Coordinator(config(tmp_path / "other", log_key=tmp_path / "missing.key"))


def test_submit_refuses_an_analyst_name_the_log_cannot_record(tmp_path: Path) -> None:
    c = Coordinator(config(tmp_path / "state"))
    try:
        with pytest.raises(InvalidQueryError, match="analyst names"):
            c.submit("SELECT COUNT(*) FROM bank_a.loans", "alice smith")
        assert c.store.queries() == []
    finally:
        c.shutdown()
