"""C2SP signed notes (Ed25519), tlog-checkpoints, and the witnesses that co-sign them.

- **Checkpoints.** The C2SP ``tlog-checkpoint`` text (origin line, decimal tree size, base64 root
  hash, optional extension lines) as the text of a C2SP ``signed-note``: a blank line, then one
  line ``"— <key name> <base64(key id || Ed25519 signature)>"`` per signature, where the key id is
  ``SHA-256(key name || 0x0A || 0x01 || public key)[:4]``. Verifier keys are the usual
  ``<name>+<hex key id>+<base64(0x01 || public key)>`` strings.
- **Witnesses.** A party agent is a witness: it keeps the last checkpoint it co-signed, checks the
  next one is consistent with it (a consistency proof, or the same root at the same size), and adds
  its own signature line to the note. A verifier checks the log's signature and, optionally, a
  quorum of known witness keys; two different roots for one size anywhere is a fork.

Every verification raises :class:`~sealroom.errors.AuditError` with ``details["check"]`` naming
the failed check; nothing returns a bool (:meth:`NoteVerifier.verifies` answers one signature line,
for the callers that count co-signatures). Caller bugs raise ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.audit.merkle import HASH_SIZE, verify_consistency
from sealroom.audit.refusals import refuse

__all__ = [
    "NoteSigner",
    "NoteVerifier",
    "NoteSignature",
    "Checkpoint",
    "SignedCheckpoint",
    "Witness",
    "WITNESS_SUFFIX",
    "witness_verifier",
    "b64",
]

MAX_NOTE_SIGNATURES = 100
ED25519_ALG = 0x01
EM_DASH = "\u2014"


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    """Standard, padded base64 text (how notes, keys and exports write bytes)."""
    return base64.b64encode(data).decode("ascii")


def _strict_b64(value: str) -> bytes | None:
    """Decode standard, padded base64; None unless ``value`` is the one canonical encoding (so no
    byte of a note can change without changing what it means)."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    return raw if b64(raw) == value else None


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
        return f"{EM_DASH} {self.name} {b64(self.key_id + self.signature)}\n"


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
        return f"{self.name}+{self.key_id.hex()}+{b64(bytes([ED25519_ALG]) + self.public_key)}"

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
        lines = [self.origin, str(self.size), b64(self.root), *self.extensions]
        text = "".join(line + "\n" for line in lines)
        _check_note_text(text)
        return text

    @classmethod
    def from_body(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise refuse("checkpoint_format", "a checkpoint body is origin, size and root hash lines")
        origin, size, root, *extensions = lines[:-1]
        raw = _strict_b64(root)
        if not origin or not _DECIMAL.fullmatch(size) or raw is None or len(raw) != HASH_SIZE:
            raise refuse("checkpoint_format", "a checkpoint's size or root hash line is malformed")
        if any(not e for e in extensions):
            raise refuse("checkpoint_format", "a checkpoint has an empty extension line")
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
                raise refuse("checkpoint_format", "a checkpoint note is not UTF-8") from None
        if not isinstance(text, str):
            raise TypeError("a checkpoint note is text")
        body, sep, sigs = text.partition("\n\n")
        if not sep or not sigs.endswith("\n"):
            raise refuse("checkpoint_format", "a checkpoint note is its body, a blank line and signature lines")
        body += "\n"
        try:
            _check_note_text(body)
        except ValueError:
            raise refuse("checkpoint_format", "a checkpoint's text holds a blank line or control characters") from None
        lines = sigs[:-1].split("\n")
        if len(lines) > MAX_NOTE_SIGNATURES:
            raise refuse("checkpoint_format", f"a checkpoint note carries more than {MAX_NOTE_SIGNATURES} signatures")
        signatures = []
        for line in lines:
            prefix, _, rest = line.partition(" ")
            name, _, b64sig = rest.partition(" ")
            raw = _strict_b64(b64sig)
            if prefix != EM_DASH or not _valid_key_name(name) or raw is None or len(raw) < 5:
                raise refuse("checkpoint_format", "a checkpoint note has a malformed signature line")
            signatures.append(NoteSignature(name, raw[:4], raw[4:]))
        return cls(Checkpoint.from_body(body), tuple(signatures))

    def _signed_by(self, verifier: NoteVerifier) -> bool:
        """True when a line by this key verifies; AuditError when a line names the key and does not."""
        message = self.checkpoint.body().encode("utf-8")
        found = False
        for sig in self.signatures:
            if sig.name == verifier.name and sig.key_id == verifier.key_id:
                if not verifier.verifies(message, sig.signature):
                    raise refuse(
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
            raise refuse(
                "checkpoint_origin",
                f"the checkpoint is for log {self.checkpoint.origin!r}, not {log_key.name!r}",
            )
        if not self._signed_by(log_key):
            raise refuse(
                "checkpoint_signature",
                f"the checkpoint of size {self.checkpoint.size} carries no signature by the log key {log_key.name}",
            )
        need = len(witnesses) if quorum is None else quorum
        if need < 0 or need > len(witnesses):
            raise ValueError(f"a quorum of {need} of {len(witnesses)} witnesses cannot be met")
        signed = tuple(w.name for w in witnesses if self._signed_by(w))
        if len(signed) < need:
            missing = [w.name for w in witnesses if w.name not in signed]
            raise refuse(
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
                raise refuse(
                    "rollback",
                    f"the log shows a checkpoint of size {new.size}, smaller than the size {old.size} this "
                    "witness already co-signed: it was rolled back or forked",
                )
            if new.size == old.size and new.root != old.root:
                raise refuse(
                    "fork",
                    f"the log shows two different roots for size {new.size}: its history forked",
                )
            verify_consistency(old_size=old.size, new_size=new.size, old_root=old.root, new_root=new.root, proof=proof)
        cosigned = checkpoint.with_signature(self.signer.sign(new.body()))
        self.latest = cosigned
        return cosigned
