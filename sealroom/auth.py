"""Analyst authentication at the coordinator: one bearer token per analyst.

The coordinator's configuration holds only each token's SHA-256 (``[analysts] alice = "sha256:…"``);
``sealroom analyst token NAME`` makes a token and prints the line to add. Clients send the token as
``authorization: Bearer <token>`` metadata (use TLS between analysts and the coordinator outside
loopback: a bearer token is a password). Every analyst call is attributed to the authenticated name,
which the owners' ``analysts`` rules and every result record use.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

from sealroom.errors import AuthenticationError, ConfigError

METADATA_KEY = "authorization"
TOKEN_PREFIX = "srt_"  # noqa: S105 - a public marker, not a secret
HASH_PREFIX = "sha256:"


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((METADATA_KEY, f"Bearer {token}"),)


class AnalystDirectory:
    """Who the analysts are, by the hash of their token."""

    def __init__(self, hashes: Mapping[str, str], *, source: str = "<config>"):
        for name, h in hashes.items():
            if not name.isidentifier():
                raise ConfigError(f"{source}: analysts.{name}: analyst names must be identifiers")
            if not (isinstance(h, str) and h.startswith(HASH_PREFIX) and len(h) == len(HASH_PREFIX) + 64):
                raise ConfigError(
                    f'{source}: analysts.{name} must be "sha256:<64 hex>" (from `sealroom analyst token {name}`)',
                    details={"file": source, "key": f"analysts.{name}"},
                )
        self._hashes = {name: bytes.fromhex(h[len(HASH_PREFIX) :]) for name, h in hashes.items()}

    def names(self) -> list[str]:
        return sorted(self._hashes)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        """The analyst whose token the call carries; AuthenticationError otherwise."""
        token = None
        for key, value in metadata:
            if key == METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        if not token:
            raise AuthenticationError(
                "this coordinator requires an analyst token: pass --token (or SEALROOM_TOKEN), or "
                "Client(..., token=...)"
            )
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for name, h in self._hashes.items():  # compare with every entry, in constant time
            if hmac.compare_digest(digest, h):
                found = name
        if found is None:
            raise AuthenticationError("the analyst token is not valid for this coordinator")
        return found
