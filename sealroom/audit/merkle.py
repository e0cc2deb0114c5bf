"""Merkle tree hashing and proofs of the transparency log (RFC 6962 / RFC 9162 section 2.1).

SHA-256, leaf hash ``SHA-256(0x00 || entry)``, node hash ``SHA-256(0x01 || left || right)``, the tree
of ``n`` leaves split at the largest power of two smaller than ``n``; the empty tree's head is
``SHA-256("")``. Inclusion proofs (``PATH``) and consistency proofs (``PROOF``/``SUBPROOF``) are
generated and verified exactly as RFC 9162 sections 2.1.3 and 2.1.4 specify.

A proof that does not verify raises :class:`~sealroom.errors.AuditError` with ``details["check"]``
naming it (``inclusion_proof``, ``consistency_proof``); nothing returns a bool. Caller bugs (wrong
types, sizes out of range) raise ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from sealroom.audit.refusals import refuse
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
    "check_hashes",
]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf (an entry's canonical bytes)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"leaf data must be bytes, not {type(data).__name__}")
    return hashlib.sha256(LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def check_hashes(hashes: Sequence[bytes]) -> None:
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
    check_hashes(leaf_hashes)
    return _mth(leaf_hashes, 0, len(leaf_hashes)) if leaf_hashes else EMPTY_ROOT


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 section 2.1.3.1 ``PATH(index, D[n])`` for the tree over all of ``leaf_hashes``."""
    check_hashes(leaf_hashes)
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
    check_hashes([leaf, root, *proof])
    if not isinstance(index, int) or not isinstance(size, int) or size < 0 or index < 0:
        raise ValueError("index and size must be non-negative integers")

    def fail() -> AuditError:
        return refuse(
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
    check_hashes(leaf_hashes)
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
    check_hashes([old_root, new_root, *proof])
    if not isinstance(old_size, int) or not isinstance(new_size, int) or not 0 <= old_size <= new_size:
        raise ValueError(f"sizes must satisfy 0 <= old_size <= new_size (got {old_size}, {new_size})")

    def fail() -> AuditError:
        return refuse(
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
        check_hashes([leaf])
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
