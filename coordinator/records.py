"""What the coordinator records for compliance besides the plain state changes.

The operator's collaboration declaration, published for the record of processing (sealroom.ropa):
at every start the coordinator writes ``<state_dir>/collaboration.json``: its ``[collaboration]``
(or null) and the names of the analysts it authenticates (or null). When that document differs from
the one the log last recorded, it appends ``collaboration_declared`` with the document's SHA-256, so
a reviewer can tell the declaration the record shows from one edited behind the log's back.

The ``query_refused`` entry of a query that the planner refused: identifiers only (the error code,
the rule, and the party and dataset when they are registered ones), never the message, the column
or anything else from the analyst's SQL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.store import CoordinatorStore
from sealroom.audit.entries import is_ident
from sealroom.audit.ropa import COLLABORATION_FILE, collaboration_document, declaration_sha256
from sealroom.errors import SealroomError

log = logging.getLogger(__name__)


def publish_collaboration(store: CoordinatorStore, config: CoordinatorConfig) -> str:
    """Write ``collaboration.json`` into the state directory and log its digest when it changed
    (nothing is logged for a coordinator that never declared a collaboration). Returns the digest."""
    analysts = config.analysts.names() if config.analysts is not None else None
    doc = collaboration_document(config.collaboration, analysts=analysts)
    digest = declaration_sha256(doc)
    path = Path(config.state_dir) / COLLABORATION_FILE
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    last = store.latest_event("collaboration_declared")
    logged = last.event.get("declaration_sha256") if last is not None else None
    if logged != digest and (last is not None or config.collaboration is not None):
        store.append_event("collaboration_declared", declaration_sha256=digest)
        log.info("logged the collaboration declaration %s", digest[:16])
    return digest


def refusal_event(err: SealroomError, *, analyst: str, sql: str, datasets: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The fields of ``query_refused`` (besides the query id) for a planner refusal. ``datasets``:
    the registered (party, dataset) pairs; a party or dataset the error names is recorded only when
    it is one of them (an unknown name comes from the analyst's SQL, which the log never holds)."""
    fields: dict[str, Any] = {
        "analyst": analyst,
        "sql_sha256": hashlib.sha256(sql.encode("utf-8")).hexdigest(),
        "code": err.code if is_ident(err.code) else "error",
    }
    rule = err.details.get("rule")
    if is_ident(rule):
        fields["rule"] = rule
    party, dataset = err.details.get("party"), err.details.get("dataset")
    if party is None and isinstance(dataset, str) and dataset.count(".") == 1:
        party, dataset = dataset.split(".")  # e.g. {"dataset": "bank_a.exposures"}
    registered = {(p, d) for p, d in datasets if is_ident(p) and is_ident(d)}
    if (party, dataset) in registered:
        fields["party"], fields["dataset"] = party, dataset
    elif party in {p for p, _ in registered}:
        fields["party"] = party
    return fields
