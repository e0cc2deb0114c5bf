"""The transparency log: RFC 6962/9162 Merkle hashing and proofs against known vectors and a reference
implementation, C2SP signed notes and checkpoints, witnesses, entries, the SQLite store, and every way
of tampering with a stored or exported log, each detected and named."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.audit.entries import EVENT_TYPES, LogEntry
from sealroom.audit.log import TransparencyLog, load_export
from sealroom.audit.merkle import (
    EMPTY_ROOT,
    CompactTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from sealroom.audit.notes import Checkpoint, NoteSigner, NoteVerifier, SignedCheckpoint, Witness
from sealroom.audit.receipts import receipt_sha256
from sealroom.audit.store import SQLiteLogStore
from sealroom.audit.verify import verify_log
from sealroom.errors import AuditError

# --------------------------------------------------------------------------------------------------
# A reference implementation, written from RFC 9162 section 2.1's definitions over the leaves
# themselves (not leaf hashes), sharing no code with sealroom.audit.


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


# transparency-dev/merkle testonly/constants.go: the RFC 6962 leaves and the roots of every prefix.
VECTOR_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
VECTOR_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Leaf hashes at level 0 (constants.go NodeHashes()[0]).
VECTOR_LEAF_HASHES = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
]

LEAVES_64 = [f"leaf {i}".encode() * (i % 3 + 1) for i in range(64)]
HASHES_64 = [leaf_hash(d) for d in LEAVES_64]


def test_published_rfc6962_vectors() -> None:
    hashes = [leaf_hash(d) for d in VECTOR_LEAVES]
    assert [h.hex() for h in hashes] == VECTOR_LEAF_HASHES
    for n, root in enumerate(VECTOR_ROOTS):
        assert root_hash(hashes[:n]).hex() == root
        assert CompactTree(hashes[:n]).root().hex() == root
    assert EMPTY_ROOT.hex() == VECTOR_ROOTS[0]
    assert node_hash(hashes[0], hashes[1]).hex() == "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"


def test_roots_match_the_reference_for_every_size_up_to_64() -> None:
    tree = CompactTree()
    for n in range(65):
        assert root_hash(HASHES_64[:n]) == ref_mth(LEAVES_64[:n]) == tree.root()
        if n < 64:
            tree.append(HASHES_64[n])


def test_inclusion_proofs_for_every_leaf_of_every_size_up_to_64() -> None:
    for n in range(1, 65):
        root = ref_mth(LEAVES_64[:n])
        for i in range(n):
            proof = inclusion_proof(HASHES_64[:n], i)
            assert proof == ref_path(i, LEAVES_64[:n])
            verify_inclusion(HASHES_64[i], index=i, size=n, proof=proof, root=root)


def test_consistency_proofs_for_every_pair_of_sizes_up_to_64() -> None:
    for n in range(1, 65):
        new_root = ref_mth(LEAVES_64[:n])
        for m in range(0, n + 1):
            proof = consistency_proof(HASHES_64[:n], m)
            assert proof == ([] if m in (0, n) else ref_subproof(m, LEAVES_64[:n], True))
            verify_consistency(old_size=m, new_size=n, old_root=ref_mth(LEAVES_64[:m]), new_root=new_root, proof=proof)


def _flipped(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 32, 33, 64])
def test_inclusion_proofs_that_must_fail(n: int) -> None:
    hashes, root = HASHES_64[:n], root_hash(HASHES_64[:n])
    for i in range(n):
        proof = inclusion_proof(hashes, i)
        bad: list[tuple[bytes, int, int, list[bytes], bytes]] = [
            (hashes[i], i, n, proof, _flipped(root)),  # another root
            (_flipped(hashes[i]), i, n, proof, root),  # another leaf
            (hashes[i], i, n + 1, proof, root_hash(HASHES_64[: n + 1])),  # the next tree
            (hashes[i], n, n, proof, root),  # index past the end
            (hashes[i], i, n, [*proof, root], root),  # an extra element
        ]
        if proof:
            bad.append((hashes[i], i, n, proof[:-1], root))  # one element short
            bad.append((hashes[i], i, n, [_flipped(proof[0]), *proof[1:]], root))
        if n > 1:
            bad.append((hashes[i], (i + 1) % n, n, proof, root))  # another index
        for leaf, index, size, p, r in bad:
            with pytest.raises(AuditError) as info:
                verify_inclusion(leaf, index=index, size=size, proof=p, root=r)
            assert info.value.details["check"] == "inclusion_proof"


def test_consistency_proofs_that_must_fail() -> None:
    for n, m in itertools.product(range(2, 20), range(1, 20)):
        if m >= n:
            continue
        old, new = root_hash(HASHES_64[:m]), root_hash(HASHES_64[:n])
        proof = consistency_proof(HASHES_64[:n], m)
        cases = [
            (m, n, _flipped(old), new, proof),
            (m, n, old, _flipped(new), proof),
            (m, n, old, new, [*proof, new]),
            (m, n, old, new, proof[:-1]),
            (m, n, old, new, [_flipped(proof[0]), *proof[1:]]),
            (m + 1, n, old, new, proof) if m + 1 < n else (m, n, old, new, []),
        ]
        for om, nn, o, r, p in cases:
            with pytest.raises(AuditError) as info:
                verify_consistency(old_size=om, new_size=nn, old_root=o, new_root=r, proof=p)
            assert info.value.details["check"] == "consistency_proof"
    root = root_hash(HASHES_64[:5])
    verify_consistency(old_size=5, new_size=5, old_root=root, new_root=root, proof=[])
    with pytest.raises(AuditError):
        verify_consistency(old_size=5, new_size=5, old_root=root, new_root=_flipped(root), proof=[])
    with pytest.raises(AuditError):
        verify_consistency(old_size=0, new_size=5, old_root=EMPTY_ROOT, new_root=root, proof=[root])


def test_proof_arguments_out_of_range_are_caller_bugs() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(HASHES_64[:4], 4)
    with pytest.raises(ValueError):
        consistency_proof(HASHES_64[:4], 5)
    with pytest.raises(ValueError):
        verify_consistency(old_size=5, new_size=4, old_root=EMPTY_ROOT, new_root=EMPTY_ROOT, proof=[])
    with pytest.raises(ValueError):
        root_hash([b"short"])
    with pytest.raises(TypeError):
        leaf_hash("text")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Signed notes and checkpoints

# golang.org/x/mod/sumdb/note note_test.go (TestSign): a signed-note known answer.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"


def test_signed_note_known_answer_from_go() -> None:
    signer = NoteSigner.from_skey(GO_SKEY)
    assert signer.verifier == NoteVerifier.from_vkey(GO_VKEY)
    assert signer.verifier.key_id.hex() == "c74f20a3"
    assert signer.verifier.vkey() == GO_VKEY
    assert signer.sign(GO_TEXT).line() == GO_SIG
    for bad in (GO_VKEY.replace("c74f20a3", "c74f20a4"), GO_VKEY[:-1], "PeterNeumann+c74f20a3", GO_VKEY + "A"):
        with pytest.raises(ValueError):
            NoteVerifier.from_vkey(bad)


def _signer(name: str) -> NoteSigner:
    return NoteSigner(name, Ed25519PrivateKey.generate())


LOG_NAME = "sealroom.test/log"


@pytest.fixture
def log_signer() -> NoteSigner:
    return _signer(LOG_NAME)


def test_checkpoint_text_format(log_signer: NoteSigner) -> None:
    root = root_hash(HASHES_64[:5])
    cp = Checkpoint(LOG_NAME, 5, root)
    signed = SignedCheckpoint(cp, (log_signer.sign(cp.body()),))
    text = signed.to_text()
    import base64

    lines = text.split("\n")
    assert lines[:4] == [LOG_NAME, "5", base64.b64encode(root).decode(), ""]
    assert lines[4].startswith("— sealroom.test/log ") and lines[5] == ""
    raw = base64.b64decode(lines[4].split(" ")[2])
    assert raw[:4] == log_signer.verifier.key_id and len(raw) == 68
    assert SignedCheckpoint.from_text(text) == signed
    assert signed.verify(log_signer.verifier) == ()


def test_every_single_byte_change_of_a_cosigned_checkpoint_is_refused(log_signer: NoteSigner) -> None:
    witness = _signer("bank_a.witness")
    cp = Checkpoint(LOG_NAME, 17, root_hash(HASHES_64[:17]))
    signed = SignedCheckpoint(cp, (log_signer.sign(cp.body()),))
    signed = signed.with_signature(witness.sign(cp.body()))
    data = signed.to_text().encode()
    assert SignedCheckpoint.from_text(data).verify(log_signer.verifier, witnesses=[witness.verifier]) == (
        "bank_a.witness",
    )
    for i in range(len(data)):
        for flip in (0x01, 0x20):
            changed = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
            with pytest.raises(AuditError):
                SignedCheckpoint.from_text(changed).verify(log_signer.verifier, witnesses=[witness.verifier])


def test_checkpoint_signed_by_another_key_or_for_another_log_is_refused(log_signer: NoteSigner) -> None:
    cp = Checkpoint(LOG_NAME, 3, root_hash(HASHES_64[:3]))
    impostor = _signer(LOG_NAME)
    signed = SignedCheckpoint(cp, (impostor.sign(cp.body()),))
    with pytest.raises(AuditError) as info:
        signed.verify(log_signer.verifier)
    assert info.value.details["check"] == "checkpoint_signature"
    other = _signer("other.log")
    with pytest.raises(AuditError) as info:
        SignedCheckpoint(cp, (log_signer.sign(cp.body()),)).verify(other.verifier)
    assert info.value.details["check"] == "checkpoint_origin"


def test_witness_quorum(log_signer: NoteSigner) -> None:
    ws = [_signer(f"w{i}") for i in range(3)]
    cp = Checkpoint(LOG_NAME, 2, root_hash(HASHES_64[:2]))
    signed = SignedCheckpoint(cp, (log_signer.sign(cp.body()),))
    signed = signed.with_signature(ws[0].sign(cp.body())).with_signature(ws[2].sign(cp.body()))
    verifiers = [w.verifier for w in ws]
    assert signed.verify(log_signer.verifier, witnesses=verifiers, quorum=2) == ("w0", "w2")
    with pytest.raises(AuditError) as info:
        signed.verify(log_signer.verifier, witnesses=verifiers)
    assert info.value.details["check"] == "witness_quorum" and "w1" in info.value.message


# --------------------------------------------------------------------------------------------------
# Entries


def _registration_fields() -> dict[str, Any]:
    return {
        "party": "bank_a",
        "owner_key": "ab" * 32,
        "address_sha256": "c" * 64,
        "datasets_sha256": "d" * 64,
        "datasets": 1,
        "issued_at_ms": 1,
        "signature": "ee" * 64,
        "change": "enrolled",
    }


def test_entries_refuse_unknown_fields_types_and_values() -> None:
    LogEntry(0, 1, "party_registered", _registration_fields())  # the well-formed one
    ok = LogEntry(0, 1, "released", _released_fields("q_1"))
    assert json.loads(ok.canonical())["event"]["query_id"] == "q_1"
    with pytest.raises(ValueError, match="no field value"):
        LogEntry(0, 1, "released", {**_released_fields("q_1"), "value": 12.5})
    with pytest.raises(ValueError, match="no field"):
        LogEntry(
            0,
            1,
            "stage_executed",
            {
                "query_id": "q",
                "stage": "s1",
                "kind": "tee",
                "plan_hash": "a" * 64,
                "simulated": True,
                "pre_suppression_total": 3,
            },
        )
    with pytest.raises(ValueError, match="unknown event type"):
        LogEntry(0, 1, "row_uploaded", {})
    with pytest.raises(ValueError, match="needs"):
        LogEntry(0, 1, "approved", {"query_id": "q", "party": "bank_a"})
    bad_values: list[tuple[str, dict[str, Any]]] = [
        ("query_submitted", {"query_id": "q 1", "analyst": "alice", "sql_sha256": "a" * 64}),  # free text
        ("query_submitted", {"query_id": "q", "analyst": "alice", "sql_sha256": "SELECT 1"}),
        ("released", {**_released_fields("q"), "suppressed_cells": 1.5}),
        ("released", {**_released_fields("q"), "simulated": "yes"}),
        ("compliance_decision", {"query_id": "q", "reviewer": "rev", "decision": "looks fine to me"}),
        ("approved", {"query_id": "q", "party": "bank_a", "plan_hash": "a" * 64, "signature": "PRIVATE KEY"}),
        ("party_registered", {**_registration_fields(), "owner_key": "ab" * 64}),  # no public key: too long
        ("party_registered", {**_registration_fields(), "change": "rewritten by the operator"}),
    ]
    for type_, event in bad_values:
        with pytest.raises(ValueError):
            LogEntry(0, 1, type_, event)
    for spec in EVENT_TYPES.values():
        assert all(
            kind.rstrip("?")
            in {
                "ident",
                "sha256",
                "hex",
                "bool",
                "count",
                "stage_kind",
                "decision",
                "lapse_cause",
                "public_key",
                "registration_change",
                "number",
            }
            for kind in spec.values()
        )


def test_stored_entries_must_be_canonical() -> None:
    entry = LogEntry(3, 5, "query_submitted", {"query_id": "q", "analyst": "a", "sql_sha256": "b" * 64})
    assert LogEntry.from_bytes(entry.canonical()) == entry
    with pytest.raises(ValueError):
        LogEntry.from_bytes(entry.canonical().replace(b",", b", ", 1))


# --------------------------------------------------------------------------------------------------
# The log, its store, its export, and tampering


def _released_fields(qid: str) -> dict[str, Any]:
    return {
        "query_id": qid,
        "plan_hash": hashlib.sha256(qid.encode()).hexdigest(),
        "receipt_sha256": "0" * 64,
        "result_sha256": "1" * 64,
        "simulated": True,
        "suppressed_cells": 1,
    }


def _receipt(qid: str) -> dict[str, Any]:
    """A stand-in for a release receipt: the log stores and hashes it, sealroom.audit.receipts verifies it."""
    return {
        "kind": "sealroom.receipt",
        "query": {"id": qid, "plan_hash": hashlib.sha256(qid.encode()).hexdigest()},
        "result": {"sha256": hashlib.sha256(b"table " + qid.encode()).hexdigest()},
        "simulated": True,
        "disclosure": {"suppressed": [{"group": {"segment": "solo"}, "rule": "min_group_size"}]},
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def __call__(self) -> float:
        self.t += 1.5
        return self.t


def _fill(log: TransparencyLog, queries: int = 4) -> None:
    log.append("dataset_registered", party="bank_a", dataset="loans", policy_digest="c" * 64)
    log.append("dataset_registered", party="bank_b", dataset="loans", policy_digest="d" * 64)
    for q in range(queries):
        qid = f"q_{q:04d}"
        plan_hash = hashlib.sha256(qid.encode()).hexdigest()
        log.append("query_submitted", query_id=qid, analyst="alice", sql_sha256="e" * 64, plan_hash=plan_hash)
        log.append("approved", query_id=qid, party="bank_a", plan_hash=plan_hash, signature="ab" * 64)
        log.append("approved", query_id=qid, party="bank_b", plan_hash=plan_hash, signature="cd" * 64)
        log.append(
            "stage_executed",
            query_id=qid,
            stage="s1",
            kind="tee",
            plan_hash=plan_hash,
            measurement="12" * 48,
            platform="simulated",
            simulated=True,
            evidence_sha256="f" * 64,
        )
        log.append_release(_receipt(qid))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(str(tmp_path / "coordinator.db"), isolation_level=None)
    yield conn
    conn.close()


@pytest.fixture
def other_db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    yield conn
    conn.close()


@pytest.fixture
def log(db: sqlite3.Connection, log_signer: NoteSigner) -> TransparencyLog:
    log = TransparencyLog(SQLiteLogStore(db), log_signer, clock=Clock())
    _fill(log)
    return log


def _verify(log: TransparencyLog, **kw: Any) -> Any:
    export = load_export(json.dumps(log.export()))
    return verify_log(export, log_key=log.signer.verifier, **kw)


def _refused(log: TransparencyLog | dict[str, Any], verifier: NoteVerifier, **kw: Any) -> AuditError:
    export = log.export() if isinstance(log, TransparencyLog) else log
    with pytest.raises(AuditError) as info:
        verify_log(load_export(json.dumps(export)), log_key=verifier, **kw)
    return info.value


def test_a_clean_log_verifies_and_proves_inclusion_and_consistency(log: TransparencyLog) -> None:
    report = _verify(log)
    assert report.size == log.size == 22 and report.checkpoints == 22 and report.receipts == 4
    assert report.entries_by_type["released"] == 4 and report.log_key_pinned
    assert report.root == log.checkpoint().checkpoint.root
    leaves = [leaf_hash(e) for e in log.store.entries()]
    cp = log.checkpoint().checkpoint
    for i in range(log.size):
        verify_inclusion(leaves[i], index=i, size=cp.size, proof=log.inclusion_proof(i), root=cp.root)
    for m in range(log.size + 1):
        verify_consistency(
            old_size=m, new_size=cp.size, old_root=log.root(m), new_root=cp.root, proof=log.consistency_proof(m)
        )
    # A restarted writer continues the same tree from its store.
    again = TransparencyLog(log.store, log.signer, clock=Clock())
    assert again.checkpoint().checkpoint == cp
    # The store offers no way to change or remove anything.
    assert not any(hasattr(log.store, name) for name in ("update", "delete", "remove", "truncate", "replace"))


def test_an_unpinned_log_key_verifies_only_self_consistency(log: TransparencyLog) -> None:
    report = verify_log(load_export(json.dumps(log.export())), log_key=None)
    assert not report.log_key_pinned
    assert _refused(log, _signer(LOG_NAME).verifier).details["check"] == "checkpoint_signature"


def _sql(db: sqlite3.Connection, statement: str, *args: Any) -> None:
    db.execute(statement, args)


def test_an_edited_entry_is_named(log: TransparencyLog, db: sqlite3.Connection) -> None:
    entry = json.loads(log.store.entries(9, 10)[0])
    entry["event"]["party"] = "bank_c"
    _sql(
        db,
        "UPDATE tlog_entries SET entry = ? WHERE seq = 9",
        json.dumps(entry, sort_keys=True, separators=(",", ":")).encode(),
    )
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "checkpoint_root" and err.details["entry"] == 9
    assert err.message.startswith("entry 9 (approved, query q_0001): leaf hash not in the tree of checkpoint 9")


def test_any_byte_of_a_stored_entry_changed_is_detected(log: TransparencyLog, db: sqlite3.Connection) -> None:
    original = log.store.entries(12, 13)[0]
    for i in range(0, len(original), 7):
        changed = original[:i] + bytes([original[i] ^ 0x01]) + original[i + 1 :]
        _sql(db, "UPDATE tlog_entries SET entry = ? WHERE seq = 12", changed)
        err = _refused(log, log.signer.verifier)
        assert err.details.get("entry") == 12, err.message
    _sql(db, "UPDATE tlog_entries SET entry = ? WHERE seq = 12", original)
    _verify(log)


def test_a_deleted_entry_is_named(log: TransparencyLog, db: sqlite3.Connection) -> None:
    _sql(db, "DELETE FROM tlog_entries WHERE seq = 5")
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "entry_sequence" and err.details["entry"] == 5
    assert err.message.startswith(
        "entry 5 is missing or out of place: entry 6 (released, query q_0000) is at position 5"
    )


def test_reordered_entries_are_named(log: TransparencyLog) -> None:
    export = log.export()
    export["entries"][3], export["entries"][4] = export["entries"][4], export["entries"][3]
    err = _refused(export, log.signer.verifier)
    assert err.details["check"] == "entry_sequence" and err.details["entry"] == 3
    # Renumbered to hide the reordering: the signed roots no longer match.
    for i in (3, 4):
        export["entries"][i]["seq"] = i
    err = _refused(export, log.signer.verifier)
    assert err.details["check"] == "checkpoint_root" and err.details["entry"] == 3


def test_a_truncated_log_is_named(log: TransparencyLog, db: sqlite3.Connection) -> None:
    _sql(db, "DELETE FROM tlog_entries WHERE seq = 21")
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "truncated" and "signs 22 entries but the log holds 21" in err.message


def test_a_truncated_log_with_its_checkpoints_is_caught_by_a_trusted_checkpoint(
    log: TransparencyLog, db: sqlite3.Connection
) -> None:
    seen = log.checkpoint()  # e.g. what a party agent (witness) holds
    _sql(db, "DELETE FROM tlog_receipts WHERE seq = 21")
    _sql(db, "DELETE FROM tlog_entries WHERE seq = 21")
    _sql(db, "DELETE FROM tlog_checkpoints WHERE size = 22")
    assert _verify(log).size == 21  # consistent on its own...
    err = _refused(log, log.signer.verifier, trusted=[seen])
    assert err.details["check"] == "rollback"  # ...but not with what a witness saw


def test_an_entry_added_behind_the_logs_back_is_named(log: TransparencyLog, db: sqlite3.Connection) -> None:
    extra = LogEntry(
        22, int(2e12), "compliance_decision", {"query_id": "q_0000", "reviewer": "rev", "decision": "accepted"}
    )
    _sql(db, "INSERT INTO tlog_entries(seq, entry) VALUES (22, ?)", extra.canonical())
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "unsigned_entries" and err.details["entry"] == 22


def test_swapped_receipts_are_named(log: TransparencyLog, db: sqlite3.Connection) -> None:
    receipts = log.store.receipts()
    (a, ra), (b, rb) = list(receipts.items())[:2]
    _sql(db, "DELETE FROM tlog_receipts WHERE seq IN (?, ?)", a, b)
    _sql(db, "INSERT INTO tlog_receipts(seq, receipt) VALUES (?, ?), (?, ?)", a, rb, b, ra)
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "receipt_hash" and err.details["entry"] == a
    assert err.message.startswith(f"entry {a} (released, query q_0000): the receipt stored with it is not the one")


def test_a_missing_or_orphan_receipt_is_named(log: TransparencyLog) -> None:
    export = log.export()
    key = next(iter(export["receipts"]))
    moved = export["receipts"].pop(key)
    assert _refused(export, log.signer.verifier).details["check"] == "receipt_missing"
    export["receipts"][key] = moved
    export["receipts"]["0"] = moved
    assert _refused(export, log.signer.verifier).details["check"] == "receipt_orphan"


def test_the_receipt_hook_runs_on_every_receipt(log: TransparencyLog) -> None:
    seen: list[str] = []
    _verify(log, verify_receipt=lambda r: seen.append(r["query"]["id"]))
    assert seen == ["q_0000", "q_0001", "q_0002", "q_0003"]

    def refuse(receipt: Any) -> None:
        if receipt["query"]["id"] == "q_0002":
            raise AuditError("the countersignature does not verify", details={"check": "countersignature"})

    err = _refused(log, log.signer.verifier, verify_receipt=refuse)
    assert err.details == {"check": "receipt", "receipt_check": "countersignature", "entry": 16, "query_id": "q_0002"}
    assert receipt_sha256(_receipt("q_0002")) == json.loads(log.store.entries(16, 17)[0])["event"]["receipt_sha256"]


def test_a_forked_history_is_named(log: TransparencyLog, other_db: sqlite3.Connection) -> None:
    # The coordinator signs a second history of the same size (other events from entry 17 on).
    forked = TransparencyLog(SQLiteLogStore(other_db), log.signer, clock=Clock())
    _fill(forked, queries=3)
    forked.append("compliance_decision", query_id="q_0002", reviewer="rev", decision="withdrawn")
    for _ in range(4):
        forked.append("compliance_decision", query_id="q_0002", reviewer="rev", decision="flagged")
    assert forked.size == log.size and forked.checkpoint().checkpoint.root != log.checkpoint().checkpoint.root
    log.store.add_checkpoint(forked.checkpoint().to_text())
    err = _refused(log, log.signer.verifier)
    assert err.details["check"] == "fork" and "both sign size 22 with different roots" in err.message


def test_a_history_shown_to_one_witness_is_not_consistent_with_another(
    log: TransparencyLog, other_db: sqlite3.Connection
) -> None:
    """Witnesses refuse a checkpoint that does not extend what they co-signed; a reviewer holding one
    party's checkpoint refuses the other history."""
    signer = log.signer
    bank_a = Witness(_signer("bank_a.witness"), signer.verifier)
    bank_b = Witness(_signer("bank_b.witness"), signer.verifier)
    cp10 = SignedCheckpoint(
        Checkpoint(LOG_NAME, 10, log.root(10)), (signer.sign(Checkpoint(LOG_NAME, 10, log.root(10)).body()),)
    )
    log.add_cosigned(bank_a.cosign(cp10))
    log.add_cosigned(bank_b.cosign(cp10))
    # bank_a sees the real history grow: consistent.
    latest = log.checkpoint()
    log.add_cosigned(bank_a.cosign(latest, proof=log.consistency_proof(10)))
    # bank_b is shown a rewritten history of the same length.
    other = TransparencyLog(SQLiteLogStore(other_db), signer, clock=Clock())
    _fill(other, queries=1)
    for _ in range(latest.checkpoint.size - other.size):
        other.append("compliance_decision", query_id="q_0000", reviewer="rev", decision="accepted")
    rewritten = other.checkpoint()
    with pytest.raises(AuditError) as info:
        bank_b.cosign(rewritten, proof=other.consistency_proof(10))
    assert info.value.details["check"] == "consistency_proof"
    with pytest.raises(AuditError) as info:
        bank_a.cosign(rewritten, proof=[])
    assert info.value.details["check"] == "fork"
    with pytest.raises(AuditError) as info:
        bank_a.cosign(cp10)
    assert info.value.details["check"] == "rollback"
    # The witnesses' state survives a restart.
    restored = Witness(bank_a.signer, signer.verifier, state=bank_a.state())
    assert restored.latest == bank_a.latest
    # A reviewer with both witnesses' keys: the real log carries the quorum on its latest checkpoint...
    witnesses = [bank_a.signer.verifier, bank_b.signer.verifier]
    report = _verify(log, witnesses=witnesses, quorum=1)
    assert report.witnessed_size == log.size
    assert _refused(log, signer.verifier, witnesses=witnesses).details["check"] == "witness_quorum"
    # ...and the rewritten history is refused against bank_a's co-signed checkpoint.
    err = _refused(other, signer.verifier, trusted=[bank_a.latest] if bank_a.latest else [])
    assert err.details["check"] == "fork"


def test_export_is_all_a_verifier_needs(log: TransparencyLog, tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log.export(), indent=1))
    export = load_export(path.read_bytes())
    assert set(export) == {"format", "version", "origin", "log_key", "entries", "checkpoints", "receipts"}
    report = verify_log(export, log_key=NoteVerifier.from_vkey(export["log_key"]))
    assert report.size == 22
    for bad in (b"{", b"[]", json.dumps({"format": "other"}).encode()):
        with pytest.raises(ValueError):
            load_export(bad)


def test_the_sqlite_store_appends_atomically(tmp_path: Path, log_signer: NoteSigner) -> None:
    store = SQLiteLogStore(tmp_path / "log.db")
    log = TransparencyLog(store, log_signer, clock=Clock())
    log.append("query_submitted", query_id="q", analyst="alice", sql_sha256="a" * 64)
    with pytest.raises(ValueError):
        log.append("query_submitted", query_id="q", analyst="alice", sql_sha256="a" * 64, rows=3)
    with pytest.raises(ValueError):  # a release needs its receipt
        log.append("released", **_released_fields("q"))
    assert store.size() == 1 and len(store.checkpoints()) == 1
    store.close()
    reopened = TransparencyLog(SQLiteLogStore(tmp_path / "log.db"), log_signer, clock=Clock())
    assert reopened.size == 1
    assert verify_log(reopened.export(), log_key=log_signer.verifier).size == 1


@pytest.mark.parametrize("field", ["plan_hash", "result_sha256", "simulated", "suppressed_cells"])
def test_a_released_entry_must_summarise_its_receipt(log: TransparencyLog, field: str) -> None:
    """The log's signer wrote a `released` entry whose summary (what listings show) differs from the
    receipt it stores: the receipt's hash matches, the summary does not."""
    receipt = _receipt("q_9999")
    fields = {
        "query_id": "q_9999",
        "plan_hash": receipt["query"]["plan_hash"],
        "result_sha256": receipt["result"]["sha256"],
        "simulated": True,
        "suppressed_cells": 1,
    }
    fields[field] = {"plan_hash": "0" * 64, "result_sha256": "1" * 64, "simulated": False, "suppressed_cells": 0}[field]
    log.append("released", receipt=receipt, **fields)
    with pytest.raises(AuditError) as info:
        _verify(log)
    assert info.value.details["check"] == "receipt_hash" and "differs from its receipt" in info.value.message
