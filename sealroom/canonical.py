"""The one canonical JSON encoding of everything Sealroom hashes or signs.

Plans, policies, receipts, log entries, evidence envelopes, MPC stage specs and certificate offers
are all hashed or signed over these bytes, so there is exactly one encoder: a second one with other
flags would make two components disagree about the bytes of the same document.

The encoding: keys sorted, no whitespace (``","`` and ``":"``), non-ASCII text as UTF-8 (not
``\\uXXXX`` escapes), and a non-finite float as Python writes it (``NaN``, ``Infinity``: a released
cell of a float column may hold one, and its result hash has always covered it so). For a document
whose strings are all ASCII (DEL, 0x7f, aside) this is byte for byte what every encoder Sealroom
used before this module wrote; the only documents the older ASCII-escaping encoders (evidence
envelopes, MPC certificate offers, the simulated measurement's config) could have written
differently are ones holding non-ASCII text or DEL, which none of them ever held (hex, base64 and
identifier names only).

Documents that must never hold a non-finite number (evidence envelopes, simulated reports, the
measured enclave configuration: their old encoder refused one) pass ``allow_nan=False``: a NaN or
infinity there raises ``ValueError`` instead of being written. That changes no byte of any document
the encoder accepts. tests/unit/kernel/test_canonical.py pins all of this, and fails if a module
other than this one encodes canonical JSON itself.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(doc: Any, *, allow_nan: bool = True) -> bytes:
    """``doc`` as canonical JSON bytes (sorted keys, compact, UTF-8).

    ``allow_nan=False`` refuses a NaN or infinity anywhere in ``doc`` (``ValueError``) instead of
    writing it; the bytes of every document it accepts are the same either way.
    """
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan).encode()
