"""Verification of an exported transparency log, with nothing else, in numbered steps.

:func:`verify_log` reads the document :func:`sealroom.audit.log.export_store` writes and checks
every entry, every checkpoint and every receipt's hash; edits made behind the log's back (an edited,
deleted, reordered or truncated entry, a swapped receipt, a forked history) are detected and named.
As sigstore's ``Verifier.verify`` does, each numbered step is one named helper that raises
:class:`~sealroom.errors.AuditError` with ``details["check"]`` naming the failed check; nothing
returns a bool. :class:`LogReport` says what was established.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from sealroom.audit.budget import verify_budgets
from sealroom.audit.entries import LogEntry
from sealroom.audit.merkle import EMPTY_ROOT, CompactTree, root_hash
from sealroom.audit.notes import WITNESS_SUFFIX, NoteVerifier, SignedCheckpoint, b64
from sealroom.audit.receipts import receipt_sha256
from sealroom.audit.refusals import refuse
from sealroom.errors import AuditError, AuthenticationError, SealroomError
from sealroom.signing import LogPosition, Registration

__all__ = ["LogReport", "verify_log"]

# A checkpoint with its position in the export's list (how errors name it).
Numbered = tuple[int, SignedCheckpoint]


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
    # Per dp dataset and budget scope: what the log's privacy_charge entries spent (step 10).
    budgets: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verified": True,
            "origin": self.origin,
            "size": self.size,
            "root": b64(self.root),
            "checkpoints": self.checkpoints,
            "entries_by_type": dict(self.entries_by_type),
            "receipts": self.receipts,
            "witnessed_size": self.witnessed_size,
            "log_key_pinned": self.log_key_pinned,
            "releases": [dict(r) for r in self.releases],
            "witnesses": [dict(w) for w in self.witnesses],
            "cosigned": [{"size": c["size"], "witnesses": list(c["witnesses"])} for c in self.cosigned],
            "unverified_cosignatures": self.unverified_cosignatures,
            "budgets": [dict(b) for b in self.budgets],
        }


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
    which must be an owner key that the log's ``party_registered`` entries (or the
    ``owner_key_sha256`` of its ``dataset_registered`` entries) record for its party; a pinned key of
    the same name takes precedence). ``trusted``: checkpoints obtained elsewhere (from a
    witness, a party agent, an earlier audit): each must be a checkpoint of this very history, which
    exposes a log that was rolled back or forked since. ``verify_receipt`` is called on every
    release's receipt (e.g. :func:`sealroom.audit.receipts.verify_receipt` with the keys pinned); its
    ``AuditError`` is reported against the entry.

    0. ``export_format``/``checkpoint_origin``: the export names its origin, and the log key is for it;
    1. ``entry_format``/``entry_sequence``: every entry parses, carries only its type's fields, and
       its sequence number is its position;
    2. ``checkpoint_format``/``checkpoint_origin``/``checkpoint_signature``: every checkpoint note
       parses and is signed by the log key;
    3. ``fork``: no two checkpoints give one size different roots;
    4. ``truncated``: no checkpoint covers more entries than the log holds;
    5. ``checkpoint_root``: the entries reproduce every checkpoint's root (the first entry past the
       last good checkpoint is named);
    6. ``unsigned_entries``/``entry_time``: every entry is covered by a signed checkpoint, and time
       does not run backwards; ``registration_signature``/``registration_replay``/
       ``registration_change``: every ``party_registered`` entry is signed by the key it registers,
       is newer than the party's previous one, and says truly whether the name or key is new;
    7. ``witness_key``/``witness_signature``: every exported witness key is an owner key the log
       records, and every co-signature by a known witness key verifies (the report lists who
       co-signed which checkpoint); ``witness_quorum``: the latest checkpoint carries the
       witnesses' quorum;
    8. ``fork``/``rollback``: every trusted checkpoint is a checkpoint of this history;
    9. ``receipt_missing``/``receipt_orphan``/``receipt_hash``/``receipt``: every release has its
       receipt, whose hash is the one the entry records, and which verifies; ``release_log_position``:
       a version 2 receipt's log position (no release outside the log) names this log's
       ``query_submitted`` entry of the query, its plan hash and analyst, in a tree of this history
       (the size's root is this log's) that precedes the release. Version 1 receipts bind no position:
       their release rows say ``"log_bound": false``.
    10. ``privacy_charge``/``privacy_budget``: the charges are their releases' and within budget (:mod:`.budget`).
    """
    origin, key, pinned = _establish_log_key(export, log_key)  # 0
    entries = _parse_entries(export)  # 1
    checkpoints = _verify_checkpoint_signatures(export, key)  # 2
    by_size = _one_root_per_size(checkpoints)  # 3
    n = len(entries)
    _verify_not_truncated(checkpoints, n)  # 4
    roots, good = _verify_checkpoint_roots(entries, by_size)  # 5
    _verify_signed_and_in_order(entries, good)  # 6
    _verify_registrations(entries)  # 6b
    known = _known_witnesses(export, entries, witnesses)  # 7a
    cosigned_by, unverified = _verify_cosignatures(checkpoints, key, known)  # 7b
    witnessed = _verify_witness_quorum(checkpoints, n, key, witnesses, quorum)  # 7c
    _verify_trusted(trusted, entries, roots, key)  # 8
    releases = _verify_receipts(export, entries, verify_receipt)  # 9

    return LogReport(
        origin=origin,
        size=n,
        root=roots[n] if n in roots else root_hash([e.leaf_hash() for e in entries]),
        checkpoints=len(checkpoints),
        entries_by_type=MappingProxyType(Counter(entry.type for entry in entries)),
        receipts=len(releases),
        witnessed_size=witnessed,
        log_key_pinned=pinned,
        releases=tuple(releases),
        witnesses=tuple(_witness_rows(known, cosigned_by)),
        cosigned=tuple({"size": size, "witnesses": sorted(cosigned_by[size])} for size in sorted(cosigned_by)),
        unverified_cosignatures=unverified,
        budgets=tuple(b.to_dict() for b in verify_budgets(entries, export.get("receipts", {}))),  # 10
    )


def _establish_log_key(export: Mapping[str, Any], log_key: NoteVerifier | None) -> tuple[str, NoteVerifier, bool]:
    """Step 0: the export's origin, the log key (pinned, or the one the export names) and whether it
    was pinned."""
    origin = export.get("origin")
    if not isinstance(origin, str):
        raise refuse("export_format", "the log export names no origin")
    pinned = log_key is not None
    if log_key is None:
        try:
            log_key = NoteVerifier.from_vkey(str(export.get("log_key", "")))
        except ValueError:
            raise refuse("export_format", "the log export's log_key is malformed; pin the log key instead") from None
    if log_key.name != origin:
        raise refuse("checkpoint_origin", f"the log key is for {log_key.name!r}, the export for {origin!r}")
    return origin, log_key, pinned


def _parse_entries(export: Mapping[str, Any]) -> list[LogEntry]:
    """Step 1: every entry parses, and its sequence number is its position."""
    entries: list[LogEntry] = []
    for i, doc in enumerate(list(export.get("entries", []))):
        try:
            entry = LogEntry.from_dict(doc)
        except (ValueError, TypeError) as exc:
            raise refuse("entry_format", f"entry {i} is malformed: {exc}", entry=i) from None
        if entry.seq != i:
            gap = f"entry {i} is missing or out of place: " if entry.seq > i else ""
            raise refuse(
                "entry_sequence",
                f"{gap}{entry.label()} is at position {i}: entries were deleted, inserted or reordered",
                entry=i,
            )
        entries.append(entry)
    return entries


def _verify_checkpoint_signatures(export: Mapping[str, Any], log_key: NoteVerifier) -> list[Numbered]:
    """Step 2: every checkpoint note parses and is signed by the log key."""
    checkpoints: list[Numbered] = []
    for k, text in enumerate(export.get("checkpoints", [])):
        if not isinstance(text, str):
            raise refuse("checkpoint_format", f"checkpoint {k} is not a note text", checkpoint=k)
        try:
            signed = SignedCheckpoint.from_text(text)
            signed.verify(log_key)
        except AuditError as err:
            raise refuse(err.details["check"], f"checkpoint {k}: {err.message}", checkpoint=k) from None
        checkpoints.append((k, signed))
    return checkpoints


def _one_root_per_size(checkpoints: Sequence[Numbered]) -> dict[int, tuple[int, bytes]]:
    """Step 3: no two checkpoints give one size different roots. Returns size -> (the first
    checkpoint of that size, its root)."""
    by_size: dict[int, tuple[int, bytes]] = {}
    for k, signed in checkpoints:
        cp = signed.checkpoint
        seen = by_size.setdefault(cp.size, (k, cp.root))
        if seen[1] != cp.root:
            raise refuse(
                "fork",
                f"checkpoints {seen[0]} and {k} both sign size {cp.size} with different roots: the log forked",
                checkpoint=k,
            )
    return by_size


def _verify_not_truncated(checkpoints: Sequence[Numbered], n: int) -> None:
    """Step 4: nothing signed was removed."""
    for k, signed in checkpoints:
        if signed.checkpoint.size > n:
            raise refuse(
                "truncated",
                f"checkpoint {k} signs {signed.checkpoint.size} entries but the log holds {n}: entries were removed",
                checkpoint=k,
            )


def _verify_checkpoint_roots(
    entries: Sequence[LogEntry], by_size: Mapping[int, tuple[int, bytes]]
) -> tuple[dict[int, bytes], int]:
    """Step 5: the entries reproduce every checkpoint's root. Returns the root at every checkpoint
    size (and at 0) and the largest size a checkpoint covers."""
    tree = CompactTree()
    roots: dict[int, bytes] = {0: EMPTY_ROOT}
    good = 0
    for size in sorted(by_size):
        while len(tree) < size:
            tree.append(entries[len(tree)].leaf_hash())
        roots[size] = tree.root()
        k, root = by_size[size]
        if roots[size] != root:
            bad = entries[good]
            span = f" (or a later one up to entry {size - 1})" if size - good > 1 else ""
            raise refuse(
                "checkpoint_root",
                f"{bad.label()}{span}: leaf hash not in the tree of checkpoint {k}; the entry was changed",
                entry=bad.seq,
                checkpoint=k,
                query_id=bad.query_id,
            )
        good = size
    return roots, good


def _verify_signed_and_in_order(entries: Sequence[LogEntry], good: int) -> None:
    """Step 6: no unsigned tail, and time never runs backwards."""
    if good < len(entries):
        raise refuse(
            "unsigned_entries",
            f"{entries[good].label()} is not covered by any signed checkpoint: it was added behind the log's back",
            entry=good,
        )
    for prev, entry in itertools.pairwise(entries):
        if entry.time_ms < prev.time_ms:
            raise refuse("entry_time", f"{entry.label()} is dated before the entry it follows", entry=entry.seq)


def _verify_cosignatures(
    checkpoints: Sequence[Numbered], log_key: NoteVerifier, known: Mapping[str, tuple[NoteVerifier, bool]]
) -> tuple[dict[int, set[str]], int]:
    """Step 7b: every co-signature by a known witness key verifies (a forged or altered one is
    named). Returns size -> the witnesses who co-signed it, and the count of co-signatures by keys
    not known here (left unchecked)."""
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
                raise refuse(
                    "witness_signature",
                    f"checkpoint {k} (size {signed.checkpoint.size}): the co-signature of {sig.name} does not "
                    "verify; it was forged, or the checkpoint was changed after it was co-signed",
                    checkpoint=k,
                    witness=sig.name,
                )
            cosigned_by.setdefault(signed.checkpoint.size, set()).add(sig.name)
    return cosigned_by, unverified


def _witness_rows(
    known: Mapping[str, tuple[NoteVerifier, bool]], cosigned_by: Mapping[int, set[str]]
) -> list[dict[str, Any]]:
    """The report's row per known witness: pinned or not, how many checkpoints it co-signed, the latest."""
    rows = []
    for name in sorted(known):
        sizes = [size for size, names in cosigned_by.items() if name in names]
        rows.append(
            {"name": name, "pinned": known[name][1], "checkpoints": len(sizes), "latest_size": max(sizes, default=0)}
        )
    return rows


def _verify_witness_quorum(
    checkpoints: Sequence[Numbered],
    n: int,
    log_key: NoteVerifier,
    witnesses: Sequence[NoteVerifier],
    quorum: int | None,
) -> int:
    """Step 7c: the latest checkpoint (all its notes merged) carries the witnesses' quorum. Returns
    the largest size co-signed by the quorum (0 without pinned witnesses)."""
    if not witnesses:
        return 0
    need = len(witnesses) if quorum is None else quorum
    best: SignedCheckpoint | None = None
    for _, signed in checkpoints:
        if signed.checkpoint.size == n:
            best = signed if best is None else best.merged(signed)
    if best is None:
        raise refuse("witness_quorum", "the log has no checkpoint of its full size for witnesses to co-sign")
    witnessed = 0
    for _, signed in checkpoints:
        try:
            signed.verify(log_key, witnesses=witnesses, quorum=need)
        except AuditError:
            continue
        witnessed = max(witnessed, signed.checkpoint.size)
    best.verify(log_key, witnesses=witnesses, quorum=need)
    return witnessed


def _verify_trusted(
    trusted: Sequence[SignedCheckpoint], entries: Sequence[LogEntry], roots: dict[int, bytes], log_key: NoteVerifier
) -> None:
    """Step 8: every checkpoint seen elsewhere is a checkpoint of this history (``roots`` gains
    the root at each trusted size)."""
    n = len(entries)
    for signed in trusted:
        signed.verify(log_key)
        cp = signed.checkpoint
        if cp.size > n:
            raise refuse(
                "rollback",
                f"a trusted checkpoint signs {cp.size} entries; this log holds {n}: it was rolled back",
            )
        if cp.size not in roots:
            roots[cp.size] = root_hash([e.leaf_hash() for e in entries[: cp.size]])
        if roots[cp.size] != cp.root:
            raise refuse(
                "fork",
                f"a trusted checkpoint of size {cp.size} has another root than this log: the log forked",
            )


def _verify_receipts(
    export: Mapping[str, Any],
    entries: Sequence[LogEntry],
    verify_receipt: Callable[[Mapping[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Step 9: every release has its receipt, which is the one it records and verifies, and no
    receipt is stored under an entry that is no release. Returns the report's release rows."""
    raw_receipts = export.get("receipts", {})
    releases = []
    for entry in entries:
        if entry.type != "released":
            continue
        receipt = raw_receipts.get(str(entry.seq))
        if not isinstance(receipt, Mapping):
            raise refuse("receipt_missing", f"{entry.label()}: its receipt is missing", entry=entry.seq)
        _verify_release_receipt(entry, receipt, verify_receipt)
        bound = _verify_release_log(entry, receipt, entries)
        releases.append(
            {
                "entry": entry.seq,
                "query_id": entry.query_id,
                "receipt_sha256": entry.event["receipt_sha256"],
                "simulated": entry.event["simulated"],
                "receipt_version": receipt.get("version"),
                "log_bound": bound,
            }
        )
    released = {str(e.seq) for e in entries if e.type == "released"}
    for key in raw_receipts:
        if key not in released:
            raise refuse("receipt_orphan", f"a receipt is stored under entry {key}, which is no release")
    return releases


def _verify_release_receipt(
    entry: LogEntry, receipt: Mapping[str, Any], verify_receipt: Callable[[Mapping[str, Any]], None] | None
) -> None:
    """Step 9, one release: the receipt hashes to what the entry records, is for its query, says
    what the entry summarises (what listings show), and verifies."""
    if receipt_sha256(receipt) != entry.event["receipt_sha256"]:
        raise refuse(
            "receipt_hash",
            f"{entry.label()}: the receipt stored with it is not the one it records (receipt_sha256 differs)",
            entry=entry.seq,
            query_id=entry.query_id,
        )
    query = receipt.get("query")
    if not isinstance(query, Mapping) or query.get("id") != entry.query_id:
        raise refuse("receipt_hash", f"{entry.label()}: its receipt is for another query", entry=entry.seq)
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
        raise refuse(
            "receipt_hash",
            f"{entry.label()}: the entry's plan hash, result hash, simulated flag or suppressed count differs "
            "from its receipt's",
            entry=entry.seq,
            query_id=entry.query_id,
        )
    if verify_receipt is None:
        return
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


def _verify_release_log(entry: LogEntry, receipt: Mapping[str, Any], entries: Sequence[LogEntry]) -> bool:
    """Step 9, one release: its receipt's log position (version 2) holds the query's
    ``query_submitted`` entry in this very log. Returns whether the receipt binds a position."""
    version = receipt.get("version")
    if "log" not in receipt and not (type(version) is int and version >= 2):
        return False  # a receipt from before the binding (version 1): reported as such, never as bound

    def fail(why: str) -> AuditError:
        return refuse(
            "release_log_position",
            f"{entry.label()}: {why}; a release must be bound to the query's submission in this log",
            entry=entry.seq,
            query_id=entry.query_id,
        )

    try:
        position = LogPosition.from_dict(receipt.get("log"))
    except SealroomError:
        raise fail("its receipt names no well-formed log position") from None
    if position.tree_size > entry.seq:
        raise fail(f"its log position (a tree of size {position.tree_size}) does not precede the release")
    submitted = entries[position.leaf_index]
    query = receipt.get("query")
    query = query if isinstance(query, Mapping) else {}
    if (
        submitted.type != "query_submitted"
        or submitted.query_id != entry.query_id
        or submitted.event.get("plan_hash") != entry.event.get("plan_hash")
        or submitted.event.get("analyst") != query.get("analyst")
    ):
        raise fail(f"its log position names {submitted.label()}, not the query_submitted entry of this query")
    if root_hash([e.leaf_hash() for e in entries[: position.tree_size]]) != position.root_hash:
        raise fail(f"the log's tree of size {position.tree_size} has another root than the one its approvals sign")
    return True


def _known_witnesses(
    export: Mapping[str, Any], entries: Sequence[LogEntry], pinned: Sequence[NoteVerifier]
) -> dict[str, tuple[NoteVerifier, bool]]:
    """name -> (verifier, pinned): the export's witness keys, each of which must be ``<party>.witness``
    with a key whose SHA-256 the log's ``party_registered`` (or ``dataset_registered``) entries record
    as the party's owner key
    (``witness_key`` otherwise), then the pinned keys (which replace an exported key of the same name)."""
    owner_keys: dict[str, set[str]] = {}
    for e in entries:
        key = _owner_key_sha256(e)
        if key is not None:
            owner_keys.setdefault(str(e.event["party"]), set()).add(key)
    raw = export.get("witnesses", [])
    if not isinstance(raw, list):
        raise refuse("witness_key", "the log export's witnesses are not a list of verifier keys")
    known: dict[str, tuple[NoteVerifier, bool]] = {}
    for i, text in enumerate(raw):
        try:
            verifier = NoteVerifier.from_vkey(text) if isinstance(text, str) else None
        except ValueError:
            verifier = None
        if verifier is None:
            raise refuse("witness_key", f"witness key {i} of the log export is not a verifier key")
        party = verifier.name.removesuffix(WITNESS_SUFFIX)
        digest = hashlib.sha256(verifier.public_key).hexdigest()
        if party == verifier.name or digest not in owner_keys.get(party, set()):
            raise refuse(
                "witness_key",
                f"the log export's key for witness {verifier.name} is not an owner key that the log's "
                f"party_registered or dataset_registered entries record for {party}",
                witness=verifier.name,
            )
        known[verifier.name] = (verifier, False)
    for verifier in pinned:
        known[verifier.name] = (verifier, True)
    return known


def _owner_key_sha256(entry: LogEntry) -> str | None:
    """The SHA-256 of the owner key an entry records for its party (None: it records none)."""
    if entry.type == "party_registered":
        return hashlib.sha256(bytes.fromhex(str(entry.event["owner_key"]))).hexdigest()
    if entry.type == "dataset_registered" and "owner_key_sha256" in entry.event:
        return str(entry.event["owner_key_sha256"])
    return None


def _verify_registrations(entries: Sequence[LogEntry]) -> None:
    """Step 6b: every ``party_registered`` entry carries the party's own signature over what it
    records (:class:`sealroom.signing.Registration`), is dated after the party's previous
    registration, and its ``change`` agrees with the owner key the log recorded for the party before
    it: ``enrolled`` only for a name never registered, ``key_changed`` only to another key,
    ``updated`` only under the same key (or a party registered before registrations were signed)."""
    key_of: dict[str, str] = {}  # party -> SHA-256 of the owner key the log last recorded for it
    last: dict[str, int] = {}  # party -> issued_at_ms of its last party_registered entry
    for e in entries:
        party = str(e.event.get("party", ""))
        key = _owner_key_sha256(e)
        if e.type == "party_registered":
            ev = e.event
            try:
                Registration(**{f.name: ev[f.name] for f in fields(Registration)}).verify(
                    bytes.fromhex(str(ev["signature"]))
                )
            except AuthenticationError:
                raise refuse(
                    "registration_signature",
                    f"{e.label()}: the registration of {party} is not signed by the key it registers",
                    entry=e.seq,
                ) from None
            if party in last and ev["issued_at_ms"] <= last[party]:
                raise refuse(
                    "registration_replay",
                    f"{e.label()}: the registration of {party} is not newer than its previous one",
                    entry=e.seq,
                )
            last[party] = int(ev["issued_at_ms"])
            known = key_of.get(party)
            agrees = {
                "enrolled": known is None,
                "key_changed": known is not None and known != key,
                "updated": known is None or known == key,
            }[str(ev["change"])]
            if not agrees:
                raise refuse(
                    "registration_change",
                    f"{e.label()}: it says {party}'s registration is {ev['change']}, but the log recorded "
                    f"{'no' if known is None else 'the same' if known == key else 'another'} key for {party} before it",
                    entry=e.seq,
                )
        if key is not None:
            key_of[party] = key
