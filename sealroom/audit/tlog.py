"""The transparency log: an append-only Merkle tree of audit events, signed checkpoints, witnesses.

What it is (and which standard each part follows):

- **Tree.** RFC 6962 / RFC 9162 section 2.1: SHA-256, leaf hash ``SHA-256(0x00 || entry)``, node hash
  ``SHA-256(0x01 || left || right)``, the tree of ``n`` leaves split at the largest power of two
  smaller than ``n``; the empty tree's head is ``SHA-256("")``. Inclusion proofs (``PATH``) and
  consistency proofs (``PROOF``/``SUBPROOF``) are generated and verified exactly as RFC 9162
  sections 2.1.3 and 2.1.4 specify.
- **Checkpoints.** The C2SP ``tlog-checkpoint`` text (origin line, decimal tree size, base64 root
  hash, optional extension lines) as the text of a C2SP ``signed-note``: a blank line, then one
  line ``"— <key name> <base64(key id || Ed25519 signature)>"`` per signature, where the key id is
  ``SHA-256(key name || 0x0A || 0x01 || public key)[:4]``. Verifier keys are the usual
  ``<name>+<hex key id>+<base64(0x01 || public key)>`` strings.
- **Witnesses.** A party agent is a witness: it keeps the last checkpoint it co-signed, checks the
  next one is consistent with it (a consistency proof, or the same root at the same size), and adds
  its own signature line to the note. A verifier checks the log's signature and, optionally, a
  quorum of known witness keys; two different roots for one size anywhere is a fork.
- **Entries.** One canonical JSON object each: ``{"v": 1, "seq": n, "time_ms": t, "type": ...,
  "event": {...}}``. The event fields of each type are fixed and typed (identifiers, SHA-256
  digests, signatures, counts): the constructor refuses any other field, so an entry can hold no
  row value, no exact pre-suppression value, no free text and no secret key.
- **Storage.** :class:`LogStore` (append-only: nothing here updates or deletes);
  :class:`SQLiteLogStore` keeps three tables in a given SQLite connection or file. The whole log
  exports to one JSON document (:meth:`TransparencyLog.export`) that :func:`verify_log` checks with
  nothing else: every entry, every checkpoint, every receipt's hash. Edits made behind the class's
  back (an edited, deleted, reordered or truncated entry, a swapped receipt, a forked history) are
  detected and named there.

Every verification raises :class:`~sealroom.errors.AuditError` with ``details["check"]`` naming
the failed check; nothing returns a bool. Caller bugs (wrong types, sizes out of range) raise
``TypeError``/``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.canonical import canonical_json
from sealroom.errors import AuditError

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "inclusion_proof",
    "verify_inclusion",
    "consistency_proof",
    "verify_consistency",
    "CompactTree",
    "NoteSigner",
    "NoteVerifier",
    "NoteSignature",
    "Checkpoint",
    "SignedCheckpoint",
    "Witness",
    "WITNESS_SUFFIX",
    "witness_verifier",
    "EVENT_TYPES",
    "LogEntry",
    "LogStore",
    "SQLiteLogStore",
    "TransparencyLog",
    "EXPORT_FORMAT",
    "export_store",
    "is_ident",
    "LogReport",
    "load_export",
    "verify_log",
    "receipt_sha256",
]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()
ENTRY_VERSION = 1
EXPORT_FORMAT = "sealroom.audit.tlog-export"
EXPORT_VERSION = 1
MAX_NOTE_SIGNATURES = 100
ED25519_ALG = 0x01
EM_DASH = "\u2014"


def _refuse(check: str, message: str, **details: Any) -> AuditError:
    return AuditError(message, details={"check": check, **details})


# --------------------------------------------------------------------------------------------------
# Merkle tree hashing (RFC 6962 section 2.1, RFC 9162 section 2.1)


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf (an entry's canonical bytes)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"leaf data must be bytes, not {type(data).__name__}")
    return hashlib.sha256(LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _check_hashes(hashes: Sequence[bytes]) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ValueError(f"every hash must be {HASH_SIZE} bytes")


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH over the leaf hashes ``hashes[lo:hi]`` (non-empty), as RFC 9162 defines it."""
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _largest_power_of_two_below(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree head over these leaf hashes (``SHA-256("")`` for none)."""
    _check_hashes(leaf_hashes)
    return _mth(leaf_hashes, 0, len(leaf_hashes)) if leaf_hashes else EMPTY_ROOT


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 section 2.1.3.1 ``PATH(index, D[n])`` for the tree over all of ``leaf_hashes``."""
    _check_hashes(leaf_hashes)
    n = len(leaf_hashes)
    if not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of size {n}")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        size = hi - lo
        if size == 1:
            return []
        k = _largest_power_of_two_below(size)
        if m < k:
            return [*path(m, lo, lo + k), _mth(leaf_hashes, lo + k, hi)]
        return [*path(m - k, lo + k, hi), _mth(leaf_hashes, lo, lo + k)]

    return path(index, 0, n)


def verify_inclusion(leaf: bytes, *, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 section 2.1.3.2: raise ``AuditError(check="inclusion_proof")`` unless ``leaf`` (a
    leaf hash) is leaf ``index`` of the tree of ``size`` leaves whose head is ``root``."""
    _check_hashes([leaf, root, *proof])
    if not isinstance(index, int) or not isinstance(size, int) or size < 0 or index < 0:
        raise ValueError("index and size must be non-negative integers")

    def fail() -> AuditError:
        return _refuse(
            "inclusion_proof", f"the inclusion proof of leaf {index} in the tree of size {size} does not verify"
        )

    # 1. leaf_index must be smaller than tree_size.
    if index >= size:
        raise fail()
    # 2. fn = leaf_index, sn = tree_size - 1; 3. r = hash.
    fn, sn = index, size - 1
    r = leaf
    # 4. For each value p in the inclusion_path array:
    for p in proof:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise fail()
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # ii. If LSB(fn) is not set, right-shift both fn and sn equally until either LSB(fn) is
            # set or fn is 0.
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 5. Compare sn to 0 and r against the root hash.
    if sn != 0 or r != root:
        raise fail()


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 section 2.1.4.1 ``PROOF(old_size, D[n])`` for the tree over all of ``leaf_hashes``
    (empty when ``old_size`` is 0 or ``n``)."""
    _check_hashes(leaf_hashes)
    n = len(leaf_hashes)
    if not isinstance(old_size, int) or not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} is outside 0..{n}")
    if old_size in (0, n):
        return []

    def subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        size = hi - lo
        if m == size:
            return [] if b else [_mth(leaf_hashes, lo, hi)]
        k = _largest_power_of_two_below(size)
        if m <= k:
            return [*subproof(m, lo, lo + k, b), _mth(leaf_hashes, lo + k, hi)]
        return [*subproof(m - k, lo + k, hi, False), _mth(leaf_hashes, lo, lo + k)]

    return subproof(old_size, 0, n, True)


def verify_consistency(
    *, old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2: raise ``AuditError(check="consistency_proof")`` unless the tree of
    ``new_size`` leaves with head ``new_root`` extends the tree of ``old_size`` with ``old_root``.

    Sizes the RFC's algorithm leaves out: ``old_size == new_size`` needs an empty proof and equal
    roots; ``old_size == 0`` needs an empty proof (every tree extends the empty one)."""
    _check_hashes([old_root, new_root, *proof])
    if not isinstance(old_size, int) or not isinstance(new_size, int) or not 0 <= old_size <= new_size:
        raise ValueError(f"sizes must satisfy 0 <= old_size <= new_size (got {old_size}, {new_size})")

    def fail() -> AuditError:
        return _refuse(
            "consistency_proof",
            f"the tree of size {new_size} is not consistent with the tree of size {old_size}: the log's "
            "history was rewritten, or the proof is wrong",
            old_size=old_size,
            new_size=new_size,
        )

    if old_size == new_size:
        if proof or old_root != new_root:
            raise fail()
        return
    if old_size == 0:
        if proof:
            raise fail()
        return
    # 1. If consistency_path is an empty array, stop and fail the proof verification.
    if not proof:
        raise fail()
    path = list(proof)
    # 2. If first is an exact power of 2, then prepend first_hash to the consistency_path array.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3. Set fn to first - 1 and sn to second - 1.
    fn, sn = old_size - 1, new_size - 1
    # 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. Set both fr and sr to the first value in the consistency_path array.
    fr = sr = path[0]
    # 6. For each subsequent value c in the consistency_path array:
    for c in path[1:]:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            raise fail()
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # iii. If LSB(fn) is not set, then right-shift both fn and sn equally until either
            # LSB(fn) is set or fn is 0.
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        # c. Finally, right-shift both fn and sn one time.
        fn >>= 1
        sn >>= 1
    # 7. fr must equal first_hash, sr second_hash, and sn must be 0.
    if fr != old_root or sr != new_root or sn != 0:
        raise fail()


class CompactTree:
    """The leaf hashes of a growing tree and the perfect subtrees on its right edge: appending is
    O(log n) and :meth:`root` of the current size is O(log n) (so the root at every size of a log
    costs O(n log n) in all)."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self.leaves: list[bytes] = []
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, hash), sizes strictly decreasing
        for h in leaf_hashes:
            self.append(h)

    def __len__(self) -> int:
        return len(self.leaves)

    def append(self, leaf: bytes) -> None:
        _check_hashes([leaf])
        self.leaves.append(leaf)
        size, h = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            size, h = left_size + size, node_hash(left, h)
        self._stack.append((size, h))

    def copy(self) -> CompactTree:
        out = CompactTree()
        out.leaves = list(self.leaves)
        out._stack = list(self._stack)
        return out

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


# --------------------------------------------------------------------------------------------------
# C2SP signed notes (Ed25519) and tlog-checkpoint


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _strict_b64(value: str) -> bytes | None:
    """Decode standard, padded base64; None unless ``value`` is the one canonical encoding (so no
    byte of a note can change without changing what it means)."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    return raw if _b64(raw) == value else None


def _valid_key_name(name: str) -> bool:
    return bool(name) and all(c.isprintable() and not c.isspace() and c != "+" for c in name)


def _note_key_id(name: str, public_key: bytes) -> bytes:
    """signed-note key id: the first 4 bytes of ``SHA-256(name || "\\n" || 0x01 || public key)``."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ED25519_ALG]) + public_key).digest()[:4]


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note: key name, 4-byte key id, 64-byte Ed25519 signature."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        return f"{EM_DASH} {self.name} {_b64(self.key_id + self.signature)}\n"


@dataclass(frozen=True)
class NoteVerifier:
    """A signed-note verifier key: a name and an Ed25519 public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _valid_key_name(self.name):
            raise ValueError("a note key name must be non-empty, printable, without spaces or '+'")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> bytes:
        return _note_key_id(self.name, self.public_key)

    def vkey(self) -> str:
        """``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        return f"{self.name}+{self.key_id.hex()}+{_b64(bytes([ED25519_ALG]) + self.public_key)}"

    @classmethod
    def from_vkey(cls, text: str) -> NoteVerifier:
        """Parse a verifier key string; ``ValueError`` if it is malformed or its key id is wrong."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise ValueError("a verifier key is NAME+KEYID+BASE64KEY")
        name, hexid, b64key = parts
        raw = _strict_b64(b64key)
        if raw is None or len(raw) != 33 or raw[0] != ED25519_ALG or len(hexid) != 8:
            raise ValueError("the verifier key is not an Ed25519 key in signed-note encoding")
        verifier = cls(name, raw[1:])
        if verifier.key_id.hex() != hexid.lower():
            raise ValueError("the verifier key's id does not match its name and key")
        return verifier

    @classmethod
    def from_public_key(cls, name: str, key: Ed25519PublicKey | bytes | str) -> NoteVerifier:
        """From a key object, raw 32 bytes, or 64 hex characters."""
        if isinstance(key, Ed25519PublicKey):
            raw = _raw_public(key)
        elif isinstance(key, str):
            raw = bytes.fromhex(key)
        else:
            raw = bytes(key)
        return cls(name, raw)

    def verifies(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class NoteSigner:
    """Signs note texts with an Ed25519 key under a key name (the log's origin, or a witness name)."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("a note signer needs an Ed25519PrivateKey")
        self.verifier = NoteVerifier(name, _raw_public(key.public_key()))
        self.name = name
        self._key = key

    @classmethod
    def from_skey(cls, text: str) -> NoteSigner:
        """Parse a Go ``note`` private key string ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>``
        (interoperability and known-answer tests)."""
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ValueError("a signer key is PRIVATE+KEY+NAME+KEYID+BASE64KEY")
        raw = _strict_b64(parts[4])
        if raw is None or len(raw) != 33 or raw[0] != ED25519_ALG:
            raise ValueError("the signer key is not an Ed25519 key in signed-note encoding")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_id.hex() != parts[3].lower():
            raise ValueError("the signer key's id does not match its name and key")
        return signer

    def sign(self, text: str) -> NoteSignature:
        _check_note_text(text)
        return NoteSignature(self.name, self.verifier.key_id, self._key.sign(text.encode("utf-8")))


def _check_note_text(text: str) -> None:
    if not text.endswith("\n") or "\n\n" in text or text.startswith("\n"):
        raise ValueError("note text must be non-empty lines, each ending in a newline, with no blank line")
    if any((not c.isprintable() and c != "\n") for c in text):
        raise ValueError("note text must not hold control characters")


_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint body: origin, tree size, root hash, optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin or "\n" in self.origin:
            raise ValueError("a checkpoint's origin is one non-empty line")
        if type(self.size) is not int or self.size < 0:
            raise ValueError("a checkpoint's size is a non-negative int")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise ValueError(f"a checkpoint's root hash is {HASH_SIZE} bytes")
        for ext in self.extensions:
            if not isinstance(ext, str) or not ext or "\n" in ext:
                raise ValueError("a checkpoint extension is one non-empty line")

    def body(self) -> str:
        lines = [self.origin, str(self.size), _b64(self.root), *self.extensions]
        text = "".join(line + "\n" for line in lines)
        _check_note_text(text)
        return text

    @classmethod
    def from_body(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise _refuse("checkpoint_format", "a checkpoint body is origin, size and root hash lines")
        origin, size, root, *extensions = lines[:-1]
        raw = _strict_b64(root)
        if not origin or not _DECIMAL.fullmatch(size) or raw is None or len(raw) != HASH_SIZE:
            raise _refuse("checkpoint_format", "a checkpoint's size or root hash line is malformed")
        if any(not e for e in extensions):
            raise _refuse("checkpoint_format", "a checkpoint has an empty extension line")
        return cls(origin, int(size), raw, tuple(extensions))


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint with its signed-note signature lines (the log's, then witnesses')."""

    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]

    def to_text(self) -> str:
        return self.checkpoint.body() + "\n" + "".join(s.line() for s in self.signatures)

    @classmethod
    def from_text(cls, text: str | bytes) -> SignedCheckpoint:
        """Parse strictly; ``AuditError(check="checkpoint_format")`` for anything malformed."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise _refuse("checkpoint_format", "a checkpoint note is not UTF-8") from None
        if not isinstance(text, str):
            raise TypeError("a checkpoint note is text")
        body, sep, sigs = text.partition("\n\n")
        if not sep or not sigs.endswith("\n"):
            raise _refuse("checkpoint_format", "a checkpoint note is its body, a blank line and signature lines")
        body += "\n"
        try:
            _check_note_text(body)
        except ValueError:
            raise _refuse("checkpoint_format", "a checkpoint's text holds a blank line or control characters") from None
        lines = sigs[:-1].split("\n")
        if len(lines) > MAX_NOTE_SIGNATURES:
            raise _refuse("checkpoint_format", f"a checkpoint note carries more than {MAX_NOTE_SIGNATURES} signatures")
        signatures = []
        for line in lines:
            prefix, _, rest = line.partition(" ")
            name, _, b64sig = rest.partition(" ")
            raw = _strict_b64(b64sig)
            if prefix != EM_DASH or not _valid_key_name(name) or raw is None or len(raw) < 5:
                raise _refuse("checkpoint_format", "a checkpoint note has a malformed signature line")
            signatures.append(NoteSignature(name, raw[:4], raw[4:]))
        return cls(Checkpoint.from_body(body), tuple(signatures))

    def _signed_by(self, verifier: NoteVerifier) -> bool:
        """True when a line by this key verifies; AuditError when a line names the key and does not."""
        message = self.checkpoint.body().encode("utf-8")
        found = False
        for sig in self.signatures:
            if sig.name == verifier.name and sig.key_id == verifier.key_id:
                if not verifier.verifies(message, sig.signature):
                    raise _refuse(
                        "checkpoint_signature",
                        f"the signature of {verifier.name} on the checkpoint of size {self.checkpoint.size} "
                        "does not verify",
                        key=verifier.name,
                    )
                found = True
        return found

    def verify(
        self, log_key: NoteVerifier, *, witnesses: Sequence[NoteVerifier] = (), quorum: int | None = None
    ) -> tuple[str, ...]:
        """Check the log's signature and a quorum of witness co-signatures (default: every witness
        given). Returns the names of the witnesses whose signatures verified; raises
        ``AuditError`` (``checkpoint_origin``, ``checkpoint_signature``, ``witness_quorum``)."""
        if self.checkpoint.origin != log_key.name:
            raise _refuse(
                "checkpoint_origin",
                f"the checkpoint is for log {self.checkpoint.origin!r}, not {log_key.name!r}",
            )
        if not self._signed_by(log_key):
            raise _refuse(
                "checkpoint_signature",
                f"the checkpoint of size {self.checkpoint.size} carries no signature by the log key {log_key.name}",
            )
        need = len(witnesses) if quorum is None else quorum
        if need < 0 or need > len(witnesses):
            raise ValueError(f"a quorum of {need} of {len(witnesses)} witnesses cannot be met")
        signed = tuple(w.name for w in witnesses if self._signed_by(w))
        if len(signed) < need:
            missing = [w.name for w in witnesses if w.name not in signed]
            raise _refuse(
                "witness_quorum",
                f"the checkpoint of size {self.checkpoint.size} is co-signed by {len(signed)} of the "
                f"{need} witnesses required (missing: {', '.join(missing)})",
            )
        return signed

    def with_signature(self, signature: NoteSignature) -> SignedCheckpoint:
        """This checkpoint with one more signature line (replacing an earlier one by the same key)."""
        kept = tuple(s for s in self.signatures if not (s.name == signature.name and s.key_id == signature.key_id))
        return SignedCheckpoint(self.checkpoint, (*kept, signature))

    def merged(self, other: SignedCheckpoint) -> SignedCheckpoint:
        """Both notes' signature lines on one checkpoint (the same body)."""
        if other.checkpoint != self.checkpoint:
            raise ValueError("only notes of the same checkpoint merge")
        out = self
        for sig in other.signatures:
            if sig not in out.signatures:
                out = out.with_signature(sig)
        return out


WITNESS_SUFFIX = ".witness"


def witness_verifier(party: str, public_key: Ed25519PublicKey | bytes | str) -> NoteVerifier:
    """The verifier key of ``party``'s witness: key name ``"<party>.witness"``, and the party's own
    Ed25519 key (the owner key it registered and signs approvals with). A checkpoint body is
    printable text without a NUL byte, so it can never equal one of the party's other signed
    messages (each of which starts with a NUL-terminated ``sealroom/v1/...`` domain)."""
    return NoteVerifier.from_public_key(f"{party}{WITNESS_SUFFIX}", public_key)


class Witness:
    """A party agent's witness: co-signs a checkpoint only after checking it extends the last one it
    co-signed, so the coordinator cannot show two owners two different histories.

    Persist :meth:`state` (the last co-signed checkpoint's text) and pass it back to the
    constructor after a restart; a witness that forgets its state forgets what it promised."""

    def __init__(self, signer: NoteSigner, log_key: NoteVerifier, *, state: str | None = None) -> None:
        self.signer = signer
        self.log_key = log_key
        self.latest: SignedCheckpoint | None = None
        if state:
            latest = SignedCheckpoint.from_text(state)
            latest.verify(log_key)
            self.latest = latest

    def state(self) -> str:
        return self.latest.to_text() if self.latest is not None else ""

    def cosign(self, checkpoint: SignedCheckpoint, *, proof: Sequence[bytes] = ()) -> SignedCheckpoint:
        """Verify the log's signature on ``checkpoint`` and its consistency with the last checkpoint
        this witness co-signed (``proof``: the consistency proof from that size to this one), then
        return it with this witness's signature line added. Raises ``AuditError``: ``fork`` (same
        size, another root), ``rollback`` (smaller than what was co-signed), ``consistency_proof``."""
        checkpoint.verify(self.log_key)
        new = checkpoint.checkpoint
        old = self.latest.checkpoint if self.latest is not None else None
        if old is not None:
            if new.size < old.size:
                raise _refuse(
                    "rollback",
                    f"the log shows a checkpoint of size {new.size}, smaller than the size {old.size} this "
                    "witness already co-signed: it was rolled back or forked",
                )
            if new.size == old.size and new.root != old.root:
                raise _refuse(
                    "fork",
                    f"the log shows two different roots for size {new.size}: its history forked",
                )
            verify_consistency(old_size=old.size, new_size=new.size, old_root=old.root, new_root=new.root, proof=proof)
        cosigned = checkpoint.with_signature(self.signer.sign(new.body()))
        self.latest = cosigned
        return cosigned


# --------------------------------------------------------------------------------------------------
# Entries


_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}")
DECISIONS = ("accepted", "flagged", "withdrawn", "retained", "erased")

# type -> field -> kind; a trailing "?" marks an optional field. Kinds admit identifiers, digests,
# public signatures, counts and flags only: never free text, a value from the data, or a key.
EVENT_TYPES: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "dataset_registered": {
            "party": "ident",
            "dataset": "ident",
            "policy_digest": "sha256",
            "schema_sha256": "sha256?",
            "owner_key_sha256": "sha256?",
        },
        "query_submitted": {"query_id": "ident", "analyst": "ident", "sql_sha256": "sha256", "plan_hash": "sha256?"},
        "approved": {"query_id": "ident", "party": "ident", "plan_hash": "sha256", "signature": "hex?"},
        "rejected": {"query_id": "ident", "party": "ident", "plan_hash": "sha256?", "rule": "ident?"},
        "stage_executed": {
            "query_id": "ident",
            "stage": "ident",
            "kind": "stage_kind",
            "plan_hash": "sha256",
            "measurement": "hex?",
            "platform": "ident?",
            "simulated": "bool",
            "evidence_sha256": "sha256?",
            "result_doc_sha256": "sha256?",
            "players": "count?",
        },
        "released": {
            "query_id": "ident",
            "plan_hash": "sha256",
            "receipt_sha256": "sha256",
            "result_sha256": "sha256",
            "simulated": "bool",
            "suppressed_cells": "count",
        },
        "compliance_decision": {
            "query_id": "ident",
            "reviewer": "ident",
            "decision": "decision",
            "reason_sha256": "sha256?",
        },
        # The planner (or a policy) refused a submitted query: no plan exists. ``code`` is the error
        # code, ``rule`` the rule it named; ``party``/``dataset`` only when they are registered.
        "query_refused": {
            "query_id": "ident",
            "analyst": "ident",
            "sql_sha256": "sha256",
            "code": "ident",
            "rule": "ident?",
            "party": "ident?",
            "dataset": "ident?",
        },
        # An owner withdrew its stored approval before execution, with its own signed request
        # (``owner_signature`` over the owner-action message of ``issued_at_ms``: sealroom.planning.plan).
        "approval_revoked": {
            "query_id": "ident",
            "party": "ident",
            "plan_hash": "sha256",
            "issued_at_ms": "count?",
            "owner_signature": "hex?",
        },
        # A stored approval stopped counting: its expiry passed (``expired``), or the owner's agent no
        # longer holds it (``not_held_by_agent``: lapsed or revoked at the agent).
        "approval_lapsed": {"query_id": "ident", "party": "ident", "plan_hash": "sha256", "cause": "lapse_cause"},
        # The operator's declaration of the collaboration (``collaboration.json``, for the record of
        # processing) as published at the coordinator's start, when it changed.
        "collaboration_declared": {"declaration_sha256": "sha256"},
    }
)
LAPSE_CAUSES = ("expired", "not_held_by_agent")


def is_ident(value: Any) -> bool:
    """True when ``value`` can be an entry's identifier field (party, dataset, analyst, query id, rule)."""
    return isinstance(value, str) and _IDENT.fullmatch(value) is not None


def _valid(kind: str, value: Any) -> bool:
    if kind == "ident":
        return isinstance(value, str) and _IDENT.fullmatch(value) is not None
    if kind == "sha256":
        return isinstance(value, str) and _SHA256.fullmatch(value) is not None
    if kind == "hex":
        return isinstance(value, str) and _HEX.fullmatch(value) is not None
    if kind == "bool":
        return type(value) is bool
    if kind == "count":
        return type(value) is int and 0 <= value < 1 << 53
    if kind == "stage_kind":
        return value in ("tee", "mpc")
    if kind == "decision":
        return value in DECISIONS
    if kind == "lapse_cause":
        return value in LAPSE_CAUSES
    raise AssertionError(kind)


@dataclass(frozen=True)
class LogEntry:
    """One event of the log. Refuses unknown types, unknown or missing fields and ill-typed values
    (``ValueError``); ``event`` is frozen."""

    seq: int
    time_ms: int
    type: str
    event: Mapping[str, Any]

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 0:
            raise ValueError("an entry's seq is a non-negative int")
        if type(self.time_ms) is not int or self.time_ms < 0:
            raise ValueError("an entry's time_ms is a non-negative int (unix milliseconds)")
        spec = EVENT_TYPES.get(self.type) if isinstance(self.type, str) else None
        if spec is None:
            raise ValueError(f"unknown event type {self.type!r}; known: {', '.join(EVENT_TYPES)}")
        if not isinstance(self.event, Mapping):
            raise TypeError("an entry's event is a mapping of its fields")
        unknown = sorted(str(k) for k in self.event if k not in spec)
        if unknown:
            raise ValueError(
                f"a {self.type} event has no field {', '.join(unknown)}: the log holds only the fields "
                f"{', '.join(spec)} (never a value from the data, free text or a key)"
            )
        for name, kind in spec.items():
            optional = kind.endswith("?")
            if name not in self.event:
                if optional:
                    continue
                raise ValueError(f"a {self.type} event needs {name}")
            if not _valid(kind.rstrip("?"), self.event[name]):
                raise ValueError(f"the {name} of a {self.type} event must be a {kind.rstrip('?')}")
        object.__setattr__(self, "event", MappingProxyType(dict(self.event)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": ENTRY_VERSION,
            "seq": self.seq,
            "time_ms": self.time_ms,
            "type": self.type,
            "event": dict(self.event),
        }

    def canonical(self) -> bytes:
        """The leaf data: canonical JSON of :meth:`to_dict`."""
        return canonical_json(self.to_dict())

    def leaf_hash(self) -> bytes:
        return leaf_hash(self.canonical())

    @property
    def query_id(self) -> str | None:
        value = self.event.get("query_id")
        return value if isinstance(value, str) else None

    def label(self) -> str:
        """``entry 17 (released, query q_...)``: how errors and reports name this entry."""
        extra = f", query {self.query_id}" if self.query_id else ""
        return f"entry {self.seq} ({self.type}{extra})"

    @classmethod
    def from_dict(cls, doc: Any) -> LogEntry:
        if not isinstance(doc, Mapping) or set(doc) != {"v", "seq", "time_ms", "type", "event"}:
            raise ValueError("an entry is an object with exactly v, seq, time_ms, type and event")
        if doc["v"] != ENTRY_VERSION or type(doc["v"]) is not int:
            raise ValueError(f"entry version {doc['v']!r} is not {ENTRY_VERSION}")
        return cls(doc["seq"], doc["time_ms"], doc["type"], doc["event"])

    @classmethod
    def from_bytes(cls, data: bytes) -> LogEntry:
        """Parse stored bytes, which must be exactly the entry's canonical encoding."""
        try:
            entry = cls.from_dict(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"not a JSON entry ({type(exc).__name__})") from None
        if entry.canonical() != data:
            raise ValueError("the stored entry is not in canonical form")
        return entry


def receipt_sha256(receipt: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a receipt's canonical JSON: what a ``released`` entry records."""
    return hashlib.sha256(canonical_json(dict(receipt))).hexdigest()


# --------------------------------------------------------------------------------------------------
# Storage


class LogStore(Protocol):
    """Where a log keeps its entries, checkpoint notes and receipts. Append-only by contract: there
    is no method to change or remove anything (and :func:`verify_log` detects it when someone does
    behind the store's back)."""

    def size(self) -> int: ...

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]: ...

    def checkpoints(self, size: int | None = None) -> list[str]:
        """Every stored checkpoint note in the order stored (only those of ``size`` when given)."""
        ...

    def receipts(self) -> dict[int, bytes]: ...

    def append(self, entry: bytes, *, checkpoint: str, receipt: bytes | None = None) -> None:
        """Append one entry (at index ``size()``), its new signed checkpoint and, for a release,
        its receipt: all or nothing."""
        ...

    def add_checkpoint(self, text: str) -> None: ...


TABLES = """
CREATE TABLE IF NOT EXISTS tlog_entries (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_checkpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL,
    note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tlog_receipts (seq INTEGER PRIMARY KEY, receipt BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS tlog_checkpoints_size ON tlog_checkpoints(size);
"""


class SQLiteLogStore:
    """:class:`LogStore` in SQLite: tables ``tlog_entries``, ``tlog_checkpoints``, ``tlog_receipts``
    in the given connection (e.g. the coordinator's own database) or a file. Writes use a
    SAVEPOINT, so they nest inside a caller's transaction and are atomic on their own."""

    def __init__(self, db: sqlite3.Connection | Path | str) -> None:
        if isinstance(db, sqlite3.Connection):
            self._db = db
            self._owned = False
        else:
            self._db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._owned = True
        self._lock = threading.RLock()
        with self._lock:
            for statement in TABLES.strip().split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def close(self) -> None:
        if self._owned:
            self._db.close()

    def size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM tlog_entries").fetchone()[0])

    def entries(self, start: int = 0, end: int | None = None) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM tlog_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                (start, end if end is not None else 1 << 62),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def checkpoints(self, size: int | None = None) -> list[str]:
        query = "SELECT note FROM tlog_checkpoints" + (" WHERE size = ?" if size is not None else "") + " ORDER BY id"
        with self._lock:
            return [r[0] for r in self._db.execute(query, () if size is None else (size,)).fetchall()]

    def receipts(self) -> dict[int, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT seq, receipt FROM tlog_receipts ORDER BY seq").fetchall()
        return {int(r[0]): bytes(r[1]) for r in rows}

    def _write(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        with self._lock:
            self._db.execute("SAVEPOINT tlog_write")
            try:
                fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK TO tlog_write")
                self._db.execute("RELEASE tlog_write")
                raise
            self._db.execute("RELEASE tlog_write")

    def append(self, entry: bytes, *, checkpoint: str, receipt: bytes | None = None) -> None:
        size = SignedCheckpoint.from_text(checkpoint).checkpoint.size

        def write(db: sqlite3.Connection) -> None:
            seq = int(db.execute("SELECT COUNT(*) FROM tlog_entries").fetchone()[0])
            if size != seq + 1:
                raise ValueError("the checkpoint appended with an entry must cover it")
            db.execute("INSERT INTO tlog_entries(seq, entry) VALUES (?, ?)", (seq, entry))
            db.execute("INSERT INTO tlog_checkpoints(size, note) VALUES (?, ?)", (size, checkpoint))
            if receipt is not None:
                db.execute("INSERT INTO tlog_receipts(seq, receipt) VALUES (?, ?)", (seq, receipt))

        self._write(write)

    def add_checkpoint(self, text: str) -> None:
        size = SignedCheckpoint.from_text(text).checkpoint.size

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tlog_checkpoints(size, note) VALUES (?, ?)", (size, text))

        self._write(write)


# --------------------------------------------------------------------------------------------------
# The log


class TransparencyLog:
    """The writer's side (the coordinator): appends events, signs a checkpoint after every append,
    serves proofs, records witnesses' co-signatures and exports the whole log.

    ``signer``'s name is the log's origin (e.g. ``"sealroom.example.org/log"``): a checkpoint's
    first line. The same Ed25519 key may countersign receipts (:mod:`sealroom.audit.receipts` signs a
    domain-separated digest, which no note text can equal)."""

    def __init__(self, store: LogStore, signer: NoteSigner, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self._lock = threading.RLock()
        self._tree = CompactTree(leaf_hash(e) for e in store.entries())

    @property
    def origin(self) -> str:
        return self.signer.name

    @property
    def size(self) -> int:
        return len(self._tree)

    def _sign(self, size: int, root: bytes) -> SignedCheckpoint:
        cp = Checkpoint(self.origin, size, root)
        return SignedCheckpoint(cp, (self.signer.sign(cp.body()),))

    def append(self, type: str, *, receipt: Mapping[str, Any] | None = None, **fields: Any) -> LogEntry:
        """Append one event (``ValueError`` for an unknown type or field) with the next sequence
        number and the current time, and sign the new checkpoint. A ``released`` event must come
        with its ``receipt`` (whose hash it records: pass ``receipt_sha256`` or let it be filled)."""
        if (type == "released") != (receipt is not None):
            raise ValueError("a released event, and only one, carries its receipt")
        receipt_bytes = None
        if receipt is not None:
            receipt_bytes = canonical_json(dict(receipt))
            digest = hashlib.sha256(receipt_bytes).hexdigest()
            if fields.setdefault("receipt_sha256", digest) != digest:
                raise ValueError("receipt_sha256 is not the hash of the receipt given")
        with self._lock:
            entry = LogEntry(self.size, int(self.clock() * 1000), type, fields)
            data = entry.canonical()
            tree = self._tree.copy()
            tree.append(leaf_hash(data))
            signed = self._sign(len(tree), tree.root())
            self.store.append(data, checkpoint=signed.to_text(), receipt=receipt_bytes)
            self._tree = tree
        return entry

    def append_release(self, receipt: Mapping[str, Any]) -> LogEntry:
        """The ``released`` event of a receipt (see :mod:`sealroom.audit.receipts`), with the receipt."""
        return self.append(
            "released",
            receipt=receipt,
            query_id=receipt["query"]["id"],
            plan_hash=receipt["query"]["plan_hash"],
            result_sha256=receipt["result"]["sha256"],
            simulated=bool(receipt["simulated"]),
            suppressed_cells=len(receipt["disclosure"]["suppressed"]),
        )

    def checkpoint(self) -> SignedCheckpoint:
        """The latest checkpoint, with every co-signature recorded for it."""
        with self._lock:
            size, root = self.size, self._tree.root()
        signed = self._sign(size, root)
        for text in self.store.checkpoints(size):
            try:
                other = SignedCheckpoint.from_text(text)
            except AuditError:
                continue
            if other.checkpoint == signed.checkpoint:
                signed = signed.merged(other)
        return signed

    def root(self, size: int | None = None) -> bytes:
        leaves = self._tree.leaves
        n = len(leaves) if size is None else size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return root_hash(leaves[:n])

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        leaves = self._tree.leaves
        n = len(leaves) if size is None else size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return inclusion_proof(leaves[:n], index)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        leaves = self._tree.leaves
        n = len(leaves) if new_size is None else new_size
        if not 0 <= n <= len(leaves):
            raise ValueError(f"size {n} is outside 0..{len(leaves)}")
        return consistency_proof(leaves[:n], old_size)

    def add_cosigned(self, cosigned: SignedCheckpoint) -> None:
        """Record a witness's co-signed copy of one of this log's checkpoints."""
        cp = cosigned.checkpoint
        cosigned.verify(self.signer.verifier)
        if cp.size > self.size or self.root(cp.size) != cp.root:
            raise _refuse("fork", f"the co-signed checkpoint of size {cp.size} is not one of this log's")
        self.store.add_checkpoint(cosigned.to_text())

    def export(self) -> dict[str, Any]:
        """The whole log as one JSON-ready document (:func:`verify_log` reads it with nothing else)."""
        return export_store(self.store, origin=self.origin, log_key=self.signer.verifier)


def export_store(
    store: LogStore, *, origin: str, log_key: NoteVerifier, witnesses: Sequence[NoteVerifier] = ()
) -> dict[str, Any]:
    """The export document of a stored log, without its private key: what a reviewer builds from a
    copy of the coordinator's database and the log's published verifier key.

    ``witnesses``: the witnesses' verifier keys (the registered parties' owner keys, see
    :func:`witness_verifier`), exported as ``"witnesses"`` so that :func:`verify_log` can check
    their co-signatures; it binds each to the owner key hash the log's own entries record."""
    entries = []
    for data in store.entries():
        try:
            entries.append(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entries.append({"unreadable": _b64(data)})  # exported as it is; verification names it
    receipts: dict[str, Any] = {}
    for seq, data in store.receipts().items():
        try:
            receipts[str(seq)] = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            receipts[str(seq)] = {"unreadable": _b64(data)}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "origin": origin,
        "log_key": log_key.vkey(),
        "entries": entries,
        "checkpoints": store.checkpoints(),
        "receipts": receipts,
    } | ({"witnesses": sorted(w.vkey() for w in witnesses)} if witnesses else {})


# --------------------------------------------------------------------------------------------------
# Verification of an exported log


@dataclass(frozen=True)
class LogReport:
    """What :func:`verify_log` established."""

    origin: str
    size: int
    root: bytes
    checkpoints: int
    entries_by_type: Mapping[str, int]
    receipts: int
    witnessed_size: int  # the largest size co-signed by the witness quorum (0 without witnesses)
    log_key_pinned: bool
    releases: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    # Per witness whose key was known (pinned, or exported and bound to the log's owner keys):
    # {"name", "pinned", "checkpoints" (sizes it co-signed), "latest_size"}.
    witnesses: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    # Per checkpoint size with verified co-signatures: {"size", "witnesses": [names]}.
    cosigned: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    # Co-signature lines by keys the verifier does not know, left unchecked (and uncounted).
    unverified_cosignatures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": True,
            "origin": self.origin,
            "size": self.size,
            "root": _b64(self.root),
            "checkpoints": self.checkpoints,
            "entries_by_type": dict(self.entries_by_type),
            "receipts": self.receipts,
            "witnessed_size": self.witnessed_size,
            "log_key_pinned": self.log_key_pinned,
            "releases": [dict(r) for r in self.releases],
            "witnesses": [dict(w) for w in self.witnesses],
            "cosigned": [{"size": c["size"], "witnesses": list(c["witnesses"])} for c in self.cosigned],
            "unverified_cosignatures": self.unverified_cosignatures,
        }


def load_export(data: bytes | str) -> dict[str, Any]:
    """Parse an export file; ``ValueError`` when it is not one (unusable input, not a refusal)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError("the log file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"the file is not a Sealroom log export (format {EXPORT_FORMAT})")
    if doc.get("version") != EXPORT_VERSION:
        raise ValueError(f"log export version {doc.get('version')!r} is not {EXPORT_VERSION}")
    for key, kind in (("origin", str), ("entries", list), ("checkpoints", list), ("receipts", dict)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"the log export's {key} is missing or malformed")
    return doc


def verify_log(
    export: Mapping[str, Any],
    *,
    log_key: NoteVerifier | None,
    witnesses: Sequence[NoteVerifier] = (),
    quorum: int | None = None,
    trusted: Sequence[SignedCheckpoint] = (),
    verify_receipt: Callable[[Mapping[str, Any]], None] | None = None,
) -> LogReport:
    """Verify an exported log with nothing else, in numbered steps; raise ``AuditError`` naming
    the first entry or checkpoint that fails (``details``: ``check``, and ``entry``/``checkpoint``).

    ``log_key`` pins the log's key; None takes the key the export names (self-consistency only:
    the report says ``log_key_pinned=False``). ``witnesses`` and ``quorum`` (default: all) require
    co-signatures on the latest checkpoint. Every co-signature by a known witness key is checked:
    ``witnesses`` (pinned), and the export's ``"witnesses"`` (the registered owners' keys, each of
    which must hash to an ``owner_key_sha256`` that the log's ``dataset_registered`` entries record
    for its party; a pinned key of the same name takes precedence). ``trusted``: checkpoints obtained elsewhere (from a
    witness, a party agent, an earlier audit): each must be a checkpoint of this very history, which
    exposes a log that was rolled back or forked since. ``verify_receipt`` is called on every
    release's receipt (e.g. :func:`sealroom.audit.receipts.verify_receipt` with the keys pinned); its
    ``AuditError`` is reported against the entry.

    1. ``entry_format``/``entry_sequence``: every entry parses, carries only its type's fields, and
       its sequence number is its position;
    2. ``checkpoint_format``/``checkpoint_origin``/``checkpoint_signature``: every checkpoint note
       parses and is signed by the log key;
    3. ``fork``: no two checkpoints give one size different roots;
    4. ``truncated``: no checkpoint covers more entries than the log holds;
    5. ``checkpoint_root``: the entries reproduce every checkpoint's root (the first entry past the
       last good checkpoint is named);
    6. ``unsigned_entries``/``entry_time``: every entry is covered by a signed checkpoint, and time
       does not run backwards;
    7. ``witness_key``/``witness_signature``: every exported witness key is an owner key the log
       records, and every co-signature by a known witness key verifies (the report lists who
       co-signed which checkpoint); ``witness_quorum``: the latest checkpoint carries the
       witnesses' quorum;
    8. ``fork``/``rollback``: every trusted checkpoint is a checkpoint of this history;
    9. ``receipt_missing``/``receipt_orphan``/``receipt_hash``/``receipt``: every release has its
       receipt, whose hash is the one the entry records, and which verifies.
    """
    origin = export.get("origin")
    if not isinstance(origin, str):
        raise _refuse("export_format", "the log export names no origin")
    pinned = log_key is not None
    if log_key is None:
        try:
            log_key = NoteVerifier.from_vkey(str(export.get("log_key", "")))
        except ValueError:
            raise _refuse("export_format", "the log export's log_key is malformed; pin the log key instead") from None
    if log_key.name != origin:
        raise _refuse("checkpoint_origin", f"the log key is for {log_key.name!r}, the export for {origin!r}")

    # 1. Entries.
    entries: list[LogEntry] = []
    raw_entries = list(export.get("entries", []))
    for i, doc in enumerate(raw_entries):
        try:
            entry = LogEntry.from_dict(doc)
        except (ValueError, TypeError) as exc:
            raise _refuse("entry_format", f"entry {i} is malformed: {exc}", entry=i) from None
        if entry.seq != i:
            gap = f"entry {i} is missing or out of place: " if entry.seq > i else ""
            raise _refuse(
                "entry_sequence",
                f"{gap}{entry.label()} is at position {i}: entries were deleted, inserted or reordered",
                entry=i,
            )
        entries.append(entry)

    # 2. Checkpoints: format and the log's signature.
    checkpoints: list[tuple[int, SignedCheckpoint]] = []
    for k, text in enumerate(export.get("checkpoints", [])):
        if not isinstance(text, str):
            raise _refuse("checkpoint_format", f"checkpoint {k} is not a note text", checkpoint=k)
        try:
            signed = SignedCheckpoint.from_text(text)
            signed.verify(log_key)
        except AuditError as err:
            raise _refuse(err.details["check"], f"checkpoint {k}: {err.message}", checkpoint=k) from None
        checkpoints.append((k, signed))

    # 3. One root per size.
    by_size: dict[int, tuple[int, bytes]] = {}
    for k, signed in checkpoints:
        cp = signed.checkpoint
        seen = by_size.setdefault(cp.size, (k, cp.root))
        if seen[1] != cp.root:
            raise _refuse(
                "fork",
                f"checkpoints {seen[0]} and {k} both sign size {cp.size} with different roots: the log forked",
                checkpoint=k,
            )

    # 4. Nothing signed was removed.
    n = len(entries)
    for k, signed in checkpoints:
        if signed.checkpoint.size > n:
            raise _refuse(
                "truncated",
                f"checkpoint {k} signs {signed.checkpoint.size} entries but the log holds {n}: entries were removed",
                checkpoint=k,
            )

    # 5. Every checkpoint's root, from the entries.
    tree = CompactTree()
    roots: dict[int, bytes] = {0: EMPTY_ROOT}
    sizes = sorted(by_size)
    good = 0
    for size in sizes:
        while len(tree) < size:
            tree.append(entries[len(tree)].leaf_hash())
        roots[size] = tree.root()
        k, root = by_size[size]
        if roots[size] != root:
            bad = entries[good]
            span = f" (or a later one up to entry {size - 1})" if size - good > 1 else ""
            raise _refuse(
                "checkpoint_root",
                f"{bad.label()}{span}: leaf hash not in the tree of checkpoint {k}; the entry was changed",
                entry=bad.seq,
                checkpoint=k,
                query_id=bad.query_id,
            )
        good = size

    # 6. No unsigned tail.
    if good < n:
        raise _refuse(
            "unsigned_entries",
            f"{entries[good].label()} is not covered by any signed checkpoint: it was added behind the log's back",
            entry=good,
        )
    # 6b. Signed entries in order: time never runs backwards.
    for prev, entry in itertools.pairwise(entries):
        if entry.time_ms < prev.time_ms:
            raise _refuse("entry_time", f"{entry.label()} is dated before the entry it follows", entry=entry.seq)

    # 7a. Witness keys: pinned ones, and the export's, bound to the owner keys the log records.
    known = _known_witnesses(export, entries, witnesses)
    # 7b. Every co-signature by a known witness key verifies (a forged or altered one is named).
    cosigned_by: dict[int, set[str]] = {}
    unverified = 0
    for k, signed in checkpoints:
        body = signed.checkpoint.body().encode("utf-8")
        for sig in signed.signatures:
            if sig.name == log_key.name and sig.key_id == log_key.key_id:
                continue
            verifier = known.get(sig.name, (None, False))[0]
            if verifier is None or verifier.key_id != sig.key_id:
                unverified += 1
                continue
            if not verifier.verifies(body, sig.signature):
                raise _refuse(
                    "witness_signature",
                    f"checkpoint {k} (size {signed.checkpoint.size}): the co-signature of {sig.name} does not "
                    "verify; it was forged, or the checkpoint was changed after it was co-signed",
                    checkpoint=k,
                    witness=sig.name,
                )
            cosigned_by.setdefault(signed.checkpoint.size, set()).add(sig.name)
    witness_rows = []
    for name in sorted(known):
        sizes = [size for size, names in cosigned_by.items() if name in names]
        witness_rows.append(
            {"name": name, "pinned": known[name][1], "checkpoints": len(sizes), "latest_size": max(sizes, default=0)}
        )

    # 7c. Witnesses on the latest checkpoint.
    witnessed = 0
    if witnesses:
        need = len(witnesses) if quorum is None else quorum
        best: SignedCheckpoint | None = None
        for _, signed in checkpoints:
            if signed.checkpoint.size == n:
                best = signed if best is None else best.merged(signed)
        if best is None:
            raise _refuse("witness_quorum", "the log has no checkpoint of its full size for witnesses to co-sign")
        for _, signed in checkpoints:
            try:
                signed.verify(log_key, witnesses=witnesses, quorum=need)
            except AuditError:
                continue
            witnessed = max(witnessed, signed.checkpoint.size)
        best.verify(log_key, witnesses=witnesses, quorum=need)

    # 8. Checkpoints seen elsewhere belong to this history.
    for signed in trusted:
        signed.verify(log_key)
        cp = signed.checkpoint
        if cp.size > n:
            raise _refuse(
                "rollback",
                f"a trusted checkpoint signs {cp.size} entries; this log holds {n}: it was rolled back",
            )
        if cp.size not in roots:
            roots[cp.size] = root_hash([e.leaf_hash() for e in entries[: cp.size]])
        if roots[cp.size] != cp.root:
            raise _refuse(
                "fork",
                f"a trusted checkpoint of size {cp.size} has another root than this log: the log forked",
            )

    # 9. Receipts.
    raw_receipts = export.get("receipts", {})
    releases = []
    for entry in entries:
        if entry.type != "released":
            continue
        receipt = raw_receipts.get(str(entry.seq))
        if not isinstance(receipt, Mapping):
            raise _refuse("receipt_missing", f"{entry.label()}: its receipt is missing", entry=entry.seq)
        if receipt_sha256(receipt) != entry.event["receipt_sha256"]:
            raise _refuse(
                "receipt_hash",
                f"{entry.label()}: the receipt stored with it is not the one it records (receipt_sha256 differs)",
                entry=entry.seq,
                query_id=entry.query_id,
            )
        query = receipt.get("query")
        if not isinstance(query, Mapping) or query.get("id") != entry.query_id:
            raise _refuse("receipt_hash", f"{entry.label()}: its receipt is for another query", entry=entry.seq)
        # What the entry summarises (and listings show) is what its receipt says.
        result_doc = receipt.get("result")
        result: Mapping[str, Any] = result_doc if isinstance(result_doc, Mapping) else {}
        disclosure_doc = receipt.get("disclosure")
        disclosure: Mapping[str, Any] = disclosure_doc if isinstance(disclosure_doc, Mapping) else {}
        suppressed = disclosure.get("suppressed")
        if (
            entry.event.get("plan_hash") != query.get("plan_hash")
            or entry.event.get("result_sha256") != result.get("sha256")
            or entry.event.get("simulated") != bool(receipt.get("simulated"))
            or entry.event.get("suppressed_cells") != (len(suppressed) if isinstance(suppressed, list) else None)
        ):
            raise _refuse(
                "receipt_hash",
                f"{entry.label()}: the entry's plan hash, result hash, simulated flag or suppressed count differs "
                "from its receipt's",
                entry=entry.seq,
                query_id=entry.query_id,
            )
        if verify_receipt is not None:
            try:
                verify_receipt(receipt)
            except AuditError as err:
                raise AuditError(
                    f"{entry.label()}: its receipt does not verify ({err.details.get('check')}): {err.message}",
                    details={
                        "check": "receipt",
                        "receipt_check": err.details.get("check"),
                        "entry": entry.seq,
                        "query_id": entry.query_id,
                    },
                ) from None
        releases.append(
            {
                "entry": entry.seq,
                "query_id": entry.query_id,
                "receipt_sha256": entry.event["receipt_sha256"],
                "simulated": entry.event["simulated"],
            }
        )
    released = {str(e.seq) for e in entries if e.type == "released"}
    for key in raw_receipts:
        if key not in released:
            raise _refuse("receipt_orphan", f"a receipt is stored under entry {key}, which is no release")

    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.type] = counts.get(entry.type, 0) + 1
    return LogReport(
        origin=origin,
        size=n,
        root=roots.get(n, tree.root()),
        checkpoints=len(checkpoints),
        entries_by_type=MappingProxyType(counts),
        receipts=len(releases),
        witnessed_size=witnessed,
        log_key_pinned=pinned,
        releases=tuple(releases),
        witnesses=tuple(witness_rows),
        cosigned=tuple({"size": size, "witnesses": sorted(cosigned_by[size])} for size in sorted(cosigned_by)),
        unverified_cosignatures=unverified,
    )


def _known_witnesses(
    export: Mapping[str, Any], entries: Sequence[LogEntry], pinned: Sequence[NoteVerifier]
) -> dict[str, tuple[NoteVerifier, bool]]:
    """name -> (verifier, pinned): the export's witness keys, each of which must be ``<party>.witness``
    with a key whose SHA-256 the log's ``dataset_registered`` entries record as the party's owner key
    (``witness_key`` otherwise), then the pinned keys (which replace an exported key of the same name)."""
    owner_keys: dict[str, set[str]] = {}
    for e in entries:
        if e.type == "dataset_registered" and "owner_key_sha256" in e.event:
            owner_keys.setdefault(str(e.event["party"]), set()).add(str(e.event["owner_key_sha256"]))
    raw = export.get("witnesses", [])
    if not isinstance(raw, list):
        raise _refuse("witness_key", "the log export's witnesses are not a list of verifier keys")
    known: dict[str, tuple[NoteVerifier, bool]] = {}
    for i, text in enumerate(raw):
        try:
            verifier = NoteVerifier.from_vkey(text) if isinstance(text, str) else None
        except ValueError:
            verifier = None
        if verifier is None:
            raise _refuse("witness_key", f"witness key {i} of the log export is not a verifier key")
        party = verifier.name.removesuffix(WITNESS_SUFFIX)
        digest = hashlib.sha256(verifier.public_key).hexdigest()
        if party == verifier.name or digest not in owner_keys.get(party, set()):
            raise _refuse(
                "witness_key",
                f"the log export's key for witness {verifier.name} is not an owner key that the log's "
                f"dataset_registered entries record for {party}",
                witness=verifier.name,
            )
        known[verifier.name] = (verifier, False)
    for verifier in pinned:
        known[verifier.name] = (verifier, True)
    return known
