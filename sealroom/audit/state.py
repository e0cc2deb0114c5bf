"""A coordinator's state directory, read the way a reviewer reads it: read-only, from the files the
coordinator publishes there (``log.vkey``, ``log.json``, ``collaboration.json``) and its database
``coordinator.db`` (opened read-only: the log, the catalog, the registered parties' keys).

What cannot be read is unusable input, not a refusal: a :class:`~sealroom.errors.ConfigError` that
names the directory or file (the reviewer's commands print its message as a usage error). Whether
what was read verifies is :mod:`sealroom.audit.verify`'s and :mod:`sealroom.audit.review`'s business.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealroom.audit.log import export_store
from sealroom.audit.notes import NoteVerifier, witness_verifier
from sealroom.audit.ropa import COLLABORATION_FILE, COLLABORATION_FORMAT, COLLABORATION_VERSION, Collaboration
from sealroom.audit.store import SQLiteLogStore
from sealroom.errors import ConfigError

__all__ = [
    "StateLog",
    "state_dirs",
    "load_state_log",
    "read_parties",
    "read_declaration",
    "read_catalog",
]

DATABASE = "coordinator.db"
LOG_DESCRIPTION = "log.json"
LOG_KEY = "log.vkey"


@dataclass(frozen=True)
class StateLog:
    """One coordinator's log as its state directory holds it: the export of the log in its database
    (:func:`sealroom.audit.log.export_store`, with the registered owners' witness keys) and the log
    key it published (hex)."""

    directory: Path
    export: dict[str, Any]
    published_key: str

    @property
    def origin(self) -> str:
        return str(self.export["origin"])


def state_dirs(state_dir: str) -> list[Path]:
    """The coordinator state directories under ``state_dir`` (itself, or e.g. the demo's
    ``DIR/<scenario>/coordinator``): each holds ``coordinator.db`` and the published ``log.json``."""
    root = Path(state_dir)
    if not root.is_dir():
        raise ConfigError(f"--state-dir {state_dir} is not a directory")
    if (root / LOG_DESCRIPTION).is_file() and (root / DATABASE).is_file():
        return [root]
    found = sorted(p.parent for p in root.glob(f"**/{LOG_DESCRIPTION}") if (p.parent / DATABASE).is_file())
    if not found:
        raise ConfigError(
            f"{state_dir} holds no coordinator state (coordinator.db with log.json); give the coordinator's "
            "state_dir, or a directory above it"
        )
    return found


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _open_read_only(directory: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{(directory / DATABASE).resolve().as_uri()}?mode=ro", uri=True)


def read_parties(db: sqlite3.Connection) -> dict[str, str]:
    """The registered parties of a coordinator database: name -> Ed25519 signing key (hex), by name."""
    return dict(db.execute("SELECT name, signing_public_key FROM parties ORDER BY name").fetchall())


def load_state_log(directory: Path) -> StateLog:
    """The export of the log in ``directory``'s database (opened read-only), and the published log
    key from ``log.vkey``."""
    try:
        vkey = NoteVerifier.from_vkey(_read(directory / LOG_KEY, "log key").decode("utf-8"))
        info = json.loads(_read(directory / LOG_DESCRIPTION, "log description"))
    except ConfigError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{directory}: the published log key or log.json is malformed: {exc}") from None
    if not isinstance(info, dict) or info.get("origin") != vkey.name:
        raise ConfigError(f"{directory}: log.json and log.vkey name different logs")
    try:
        db = _open_read_only(directory)
        try:
            # The registered owners' keys go along as the witnesses' keys; verify_log binds each to
            # the owner key hash that the log's own dataset_registered entries record.
            witnesses = [witness_verifier(name, key) for name, key in read_parties(db).items()]
            export = export_store(SQLiteLogStore(db), origin=vkey.name, log_key=vkey, witnesses=witnesses)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{directory / DATABASE}: cannot read the log: {exc}") from None
    return StateLog(directory=directory, export=export, published_key=vkey.public_key.hex())


def read_declaration(directory: Path) -> dict[str, Any] | None:
    """The published ``collaboration.json`` (None when the coordinator published none: a state
    directory from before it). ``ValueError`` when it is malformed."""
    path = Path(directory) / COLLABORATION_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not JSON") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != COLLABORATION_FORMAT
        or doc.get("version") != COLLABORATION_VERSION
        or set(doc) != {"format", "version", "collaboration", "analysts"}
    ):
        raise ValueError(f"{path} is not a {COLLABORATION_FORMAT} document of version {COLLABORATION_VERSION}")
    if doc["collaboration"] is not None:
        Collaboration.from_dict(doc["collaboration"], source=str(path))  # ConfigError when malformed
    analysts = doc["analysts"]
    if analysts is not None and (not isinstance(analysts, list) or not all(isinstance(a, str) for a in analysts)):
        raise ValueError(f"{path}: analysts must be a list of names or null")
    return doc


def read_catalog(directory: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The datasets (party, name, description, policy_json, policy_digest) and the parties (name ->
    signing key hex) in ``directory/coordinator.db``, opened read-only."""
    db = _open_read_only(Path(directory))
    try:
        rows = db.execute(
            "SELECT party, name, description, policy_json, policy_digest FROM datasets ORDER BY party, name"
        ).fetchall()
        parties = read_parties(db)
    finally:
        db.close()
    datasets = [
        {"party": r[0], "name": r[1], "description": r[2], "policy_json": bytes(r[3]), "policy_digest": r[4]}
        for r in rows
    ]
    return datasets, parties
