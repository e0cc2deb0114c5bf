from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


DEFAULT_COORDINATOR = "127.0.0.1:7100"


class UsageError(Exception):
    """Unusable arguments (exit 2)."""


def coordinator_address(args: argparse.Namespace) -> str:
    address = args.coordinator or os.environ.get("SEALROOM_COORDINATOR") or DEFAULT_COORDINATOR
    return parse_address(address, "coordinator")


def parse_address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"the {what} address must be HOST:PORT (got {value!r})")
    return value


def emit(doc: Any) -> None:
    from sealroom.app.render import jsonable

    print(json.dumps(jsonable(doc), indent=2, sort_keys=False))


def client_for(args: argparse.Namespace) -> Any:
    from sealroom.app.client import Client

    token = args.token or os.environ.get("SEALROOM_TOKEN") or None
    return Client(coordinator_address(args), analyst=args.analyst, token=token)


def agent_address(args: argparse.Namespace) -> str:
    address = args.agent or os.environ.get("SEALROOM_PARTY_AGENT")
    if not address:
        raise UsageError("give the party agent's address with --agent HOST:PORT (or set SEALROOM_PARTY_AGENT)")
    return parse_address(address, "party agent")


def when(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        parts = key.split(".")
        if not sep or not val or len(parts) != 2 or not all(p.isidentifier() for p in parts):
            raise UsageError(f"{flag} expects PARTY.NAME=VALUE with identifier names (got {v!r})")
        if key in out:
            raise UsageError(f"{flag} given twice for {key}")
        out[key] = val
    return out


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def ed25519_hex(value: str, flag: str) -> str:
    """An Ed25519 public key given as 64 hex characters, a signed-note verifier key (NAME+ID+KEY), a
    PEM public key, or a file holding one of these; returned as hex."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sealroom.audit.notes import NoteVerifier

    text = value.strip()
    if not (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)) and "+" not in text:
        text = read_file(value, f"{flag} key").decode("utf-8", "replace").strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            key = None
        if isinstance(key, Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    try:
        return NoteVerifier.from_vkey(text).public_key.hex()
    except ValueError:
        raise UsageError(
            f"{flag} must be an Ed25519 public key: 64 hex characters, a verifier key NAME+KEYID+KEY, "
            "a PEM public key, or a file holding one"
        ) from None


def print_refusal(args: argparse.Namespace, err: Any) -> int:
    check = err.details.get("check", "")
    print(f"sealroom: refused ({check}): {err.message}", file=sys.stderr)
    if args.json:
        emit({"verified": False, "check": check, "reason": err.to_dict()})
    return EXIT_FAILED


def iso_time(ts: Any) -> str:
    from datetime import UTC, datetime

    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
