"""The party agent as a witness of the coordinator's transparency log (docs/audit.md, "Witnesses").

Before the agent approves a plan (automatically, or on its owner's ``sealroom approve``), it
witnesses the log, in this order:

1. fetch the log's latest checkpoint (``GetCheckpoint``) and, when it is larger than the last
   checkpoint this agent co-signed, the consistency proof from that size (``GetConsistencyProof``);
2. check them with :class:`sealroom.audit.notes.Witness`: the log's signature under the log key this agent
   trusts (``checkpoint_origin``, ``checkpoint_signature``), no smaller size than it co-signed
   (``rollback``), no other root for the same size (``fork``), the proof (``consistency_proof``);
3. keep the new checkpoint on disk (atomically: a temporary file, fsync, rename, fsync of the
   directory), so that a restart does not forget what it co-signed;
4. send its co-signature to the coordinator (``SubmitCosignature``, signed like an owner action);

and only then signs the approval. A failure at any step refuses the approval.

No approval outside the log (:meth:`LogWitness.prove_included`): the coordinator sends, with the
plan, its ``query_submitted`` entry, the checkpoint it proved the entry in and the inclusion proof.
After witnessing, the agent checks that checkpoint (signed by the log key; equal to the one it
co-signed or, when older, proven a prefix of it by a consistency proof) and the inclusion proof; the
entry is then in a checkpoint this agent witnessed, and the position goes into its approval. So a coordinator that
shows two owners two different histories gets at most one of them co-signed by both, and an owner
that co-signed one history refuses every later checkpoint that does not extend it.

The log key: pinned (``[party] log_key``), or trusted on first use: fetched once, when the agent
first registers (or first witnesses), and kept in the state directory (``log.vkey``). A coordinator
that later signs with another key is refused (``checkpoint_origin``/``checkpoint_signature``).

What it reveals: nothing of the owner's data. It sends signatures over the coordinator's own
checkpoints, with the owner's key under the key name ``<party>.witness``: a checkpoint is printable
text without a NUL byte, so its signature can never pass for an approval, a stream header or an
owner action (each of those messages starts with a NUL-terminated domain).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from connectors.clock import MillisecondIssuer
from sealroom.audit.merkle import HASH_SIZE, leaf_hash, verify_consistency, verify_inclusion
from sealroom.audit.notes import WITNESS_SUFFIX, NoteSigner, NoteVerifier, SignedCheckpoint, Witness
from sealroom.errors import AuditError, ConfigError, SealroomError
from sealroom.signing import LogPosition, sign_owner_action
from sealroom.v1 import coordinator_pb2

log = logging.getLogger(__name__)

LOG_KEY_FILE = "log.vkey"  # the log key trusted on first use (absent when [party] log_key pins it)
STATE_FORMAT = "sealroom.witness-state"
STATE_VERSION = 1


def state_file(state_dir: Path, log_key: NoteVerifier) -> Path:
    """Where the witness state of one log lives: one file per log key, so that pinning another
    coordinator's key starts a new history instead of refusing the new log as a fork."""
    return state_dir / f"witness-{hashlib.sha256(log_key.vkey().encode()).hexdigest()[:16]}.json"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: after a crash it holds the old text or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _refuse(check: str, message: str) -> AuditError:
    return AuditError(message, details={"check": check})


class LogWitness:
    """One party agent's witness of its coordinator's log. Thread-safe: one witnessing at a time.

    ``call(method, request)`` calls the coordinator (the agent's own client; it raises the
    coordinator's :class:`SealroomError`). ``log_key``: the pinned log key, or None to trust the
    coordinator's key on first use. ``issued_at()`` stamps each co-signature request (the agent's own
    :class:`~connectors.clock.MillisecondIssuer`, shared with its other signed messages; a fresh one
    by default). Raises ``ConfigError`` when the state directory holds a state
    that cannot be read: it is what this owner promised, so it is never replaced silently."""

    def __init__(
        self,
        *,
        party: str,
        key: Ed25519PrivateKey,
        state_dir: Path,
        log_key: NoteVerifier | None,
        call: Callable[[str, Any], Any],
        issued_at: Callable[[], int] | None = None,
    ) -> None:
        self.party = party
        self.state_dir = Path(state_dir)
        self.pinned = log_key is not None
        self._key = key
        self._signer = NoteSigner(f"{party}{WITNESS_SUFFIX}", key)
        self._call = call
        self._issued_at = issued_at or MillisecondIssuer().issue
        self._lock = threading.Lock()
        self._witness: Witness | None = None
        self.log_key: NoteVerifier | None = log_key if log_key is not None else self._read_trusted_key()
        if self.log_key is not None:
            self._witness = self._load(self.log_key)

    @property
    def verifier(self) -> NoteVerifier:
        """This witness's verifier key (``<party>.witness``, the owner's public key)."""
        return self._signer.verifier

    @property
    def latest(self) -> SignedCheckpoint | None:
        """The last checkpoint this witness co-signed (None before the first)."""
        return self._witness.latest if self._witness is not None else None

    # -- state ---------------------------------------------------------------------------------

    def _read_trusted_key(self) -> NoteVerifier | None:
        path = self.state_dir / LOG_KEY_FILE
        if not path.exists():
            return None
        try:
            return NoteVerifier.from_vkey(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise ConfigError(
                f"{path}: the log key this agent trusted on first use is unreadable; restore it (or pin the "
                "coordinator's key with [party] log_key)",
                details={"file": str(path), "key": "party.state_dir"},
            ) from None

    def _load(self, log_key: NoteVerifier) -> Witness:
        path = state_file(self.state_dir, log_key)
        if not path.exists():
            return Witness(self._signer, log_key)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if (
                not isinstance(doc, dict)
                or doc.get("format") != STATE_FORMAT
                or doc.get("version") != STATE_VERSION
                or doc.get("log_key") != log_key.vkey()
                or not isinstance(doc.get("checkpoint"), str)
            ):
                raise ValueError("not this log's witness state")
            return Witness(self._signer, log_key, state=doc["checkpoint"])
        except (OSError, UnicodeDecodeError, ValueError, AuditError):
            raise ConfigError(
                f"{path}: this agent's witness state (the last checkpoint it co-signed) is unreadable or not "
                "signed by the log key; restore it from a backup, or move it away to start witnessing afresh",
                details={"file": str(path), "key": "party.state_dir"},
            ) from None

    def _save(self, witness: Witness) -> None:
        assert self.log_key is not None
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "log_key": self.log_key.vkey(),
            "checkpoint": witness.state(),
            "saved_at": int(time.time()),
        }
        write_atomically(state_file(self.state_dir, self.log_key), json.dumps(doc, indent=1) + "\n")

    def _trust(self, vkey: str) -> None:
        """Under _lock: adopt the coordinator's log key on first use, and keep it."""
        try:
            key = NoteVerifier.from_vkey(vkey)
        except ValueError:
            raise _refuse("log_key", "the coordinator's log key is malformed") from None
        write_atomically(self.state_dir / LOG_KEY_FILE, key.vkey() + "\n")
        self.log_key = key
        self._witness = self._load(key)
        log.warning(
            "trusting the coordinator's transparency log key on first use; it is kept in %s (pin it with "
            "[party] log_key for an independent check)",
            self.state_dir / LOG_KEY_FILE,
        )

    # -- witnessing ----------------------------------------------------------------------------

    def trust_on_first_use(self) -> None:
        """At registration: fetch and keep the log's key, unless one is pinned or kept already."""
        with self._lock:
            if self.log_key is None:
                resp = self._call("GetCheckpoint", coordinator_pb2.GetCheckpointRequest(party=self.party))
                self._trust(resp.log_key)

    def witness(self, *, query_id: str = "") -> SignedCheckpoint:
        """Check the coordinator's latest checkpoint against what this witness co-signed, keep it,
        and send the co-signature (see the module's steps). Returns the co-signed checkpoint.

        Raises ``AuditError`` naming the check (``checkpoint_format``, ``checkpoint_origin``,
        ``checkpoint_signature``, ``rollback``, ``fork``, ``consistency_proof``, ``witness_state``,
        ``cosignature_refused``); the coordinator's own errors (unreachable...) as they are."""
        with self._lock:
            # 1. The latest checkpoint (and the log key, on first use).
            resp = self._call("GetCheckpoint", coordinator_pb2.GetCheckpointRequest(party=self.party))
            if self.log_key is None:
                self._trust(resp.log_key)
            witness = self._witness
            assert witness is not None
            signed = SignedCheckpoint.from_text(resp.checkpoint)
            before = witness.latest
            proof: list[bytes] = []
            if before is not None and 0 < before.checkpoint.size < signed.checkpoint.size:
                got = self._call(
                    "GetConsistencyProof",
                    coordinator_pb2.ConsistencyProofRequest(
                        old_size=before.checkpoint.size, new_size=signed.checkpoint.size, party=self.party
                    ),
                )
                proof = [bytes(h) for h in got.hashes]
                if any(len(h) != HASH_SIZE for h in proof):
                    raise _refuse(
                        "consistency_proof", f"the consistency proof holds a hash that is not {HASH_SIZE} bytes"
                    )
            # 2. The checks; the witness remembers the new checkpoint only when they pass.
            cosigned = witness.cosign(signed, proof=proof)
            # 3. Kept before anything is promised to anyone.
            try:
                self._save(witness)
            except OSError as exc:
                witness.latest = before
                raise _refuse(
                    "witness_state",
                    f"the witness state could not be written to {self.state_dir} "
                    f"({exc.strerror or type(exc).__name__})",
                ) from None
            # 4. The co-signature, with the log's signature line and this witness's only.
            assert self.log_key is not None
            keep = {(self.log_key.name, self.log_key.key_id), (self.verifier.name, self.verifier.key_id)}
            lines = tuple(s for s in cosigned.signatures if (s.name, s.key_id) in keep)
            note = SignedCheckpoint(cosigned.checkpoint, lines)
            issued = self._issued_at()
            request = coordinator_pb2.SubmitCosignatureRequest(
                party=self.party,
                checkpoint=note.to_text(),
                query_id=query_id,
                issued_at_ms=issued,
                owner_signature=sign_owner_action(
                    self._key,
                    "cosign",
                    query_id=query_id,
                    party=self.party,
                    plan_hash=hashlib.sha256(note.checkpoint.body().encode("utf-8")).hexdigest(),
                    issued_at_ms=issued,
                ),
            )
            try:
                self._call("SubmitCosignature", request)
            except SealroomError as err:
                raise _refuse(
                    "cosignature_refused",
                    f"the coordinator did not take this witness's co-signature of size {note.checkpoint.size} "
                    f"({err.code}: {err.message})",
                ) from None
            return cosigned

    def prove_included(
        self, entry: bytes, index: int, checkpoint: str, proof: Sequence[bytes], *, query_id: str = ""
    ) -> LogPosition:
        """Witness the log (:meth:`witness`), then check that ``entry`` is leaf ``index`` of
        ``checkpoint`` (the log's signed note the coordinator proved it in) and that this checkpoint
        is the one just co-signed or a prefix of it (a consistency proof). Returns the position
        (index, and the proven checkpoint's size and root): the entry is in a checkpoint this agent
        witnessed. Raises ``AuditError`` (``inclusion_checkpoint``, ``inclusion_proof``,
        ``consistency_proof``, or a check of :meth:`witness`)."""
        witnessed = self.witness(query_id=query_id).checkpoint
        assert self.log_key is not None
        try:
            signed = SignedCheckpoint.from_text(checkpoint)
            signed.verify(self.log_key)
        except AuditError as err:
            raise _refuse("inclusion_checkpoint", f"the checkpoint of the inclusion proof: {err.message}") from None
        cp = signed.checkpoint
        if cp.size > witnessed.size:
            raise _refuse(
                "inclusion_checkpoint",
                f"the inclusion proof is against a checkpoint of size {cp.size}, larger than the log's latest "
                f"({witnessed.size})",
            )
        between: list[bytes] = []
        if 0 < cp.size < witnessed.size:
            got = self._call(
                "GetConsistencyProof",
                coordinator_pb2.ConsistencyProofRequest(old_size=cp.size, new_size=witnessed.size, party=self.party),
            )
            between = [bytes(h) for h in got.hashes]
        hashes = [bytes(h) for h in proof]
        if any(len(h) != HASH_SIZE for h in (*between, *hashes)):
            raise _refuse("inclusion_proof", f"a proof holds a hash that is not {HASH_SIZE} bytes")
        verify_consistency(
            old_size=cp.size, new_size=witnessed.size, old_root=cp.root, new_root=witnessed.root, proof=between
        )
        if not 0 <= index < cp.size:
            raise _refuse("inclusion_proof", f"leaf {index} is not in the checkpoint of size {cp.size}")
        verify_inclusion(leaf_hash(entry), index=index, size=cp.size, proof=hashes, root=cp.root)
        return LogPosition(index, cp.size, cp.root)
