"""The opened result of an MPC stage, as a structure others sign and put in receipts.

:class:`MpcResult` holds only what the players opened: the released cells of passing groups (group
key -> requested aggregates), the keys of the suppressed groups (never a value of theirs), the
disclosure rule applied inside the MPC, the players, the threshold, and the trust assumption in
words. :meth:`MpcResult.canonical` is canonical JSON (sorted keys, no whitespace) and
:meth:`MpcResult.digest` its SHA-256: what a release record binds and what players or owners sign
(:meth:`MpcResult.sign` with an Ed25519 key, domain-separated).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealroom.canonical import canonical_json
from sealroom.planning.mpc_spec import StageSpec
from sealroom.signing import LogPosition

# 2: the result binds the query's transparency-log position ("log", docs/audit.md); 1: without it.
RESULT_VERSION = 2
SIGN_DOMAIN = b"sealroom/v1/mpc-result\x00"
SECURITY_MODEL = "mpyc-shamir-semi-honest"
MPYC_VERSION = "0.11"


@dataclass(frozen=True)
class MpcResult:
    session_id: str
    spec_digest: str
    group_by: tuple[str, ...]
    aggregates: tuple[str, ...]
    cells: tuple[tuple[tuple[Any, ...], dict[str, Any]], ...]
    suppressed: tuple[tuple[Any, ...], ...]
    rule: dict[str, Any]
    players: tuple[dict[str, Any], ...]
    threshold: int
    trust_assumption: str
    stats: dict[str, Any] = field(default_factory=dict, compare=False)
    # The query's log position, as each signer knows it (its owner's approval signs it; the enclave
    # had it with its approvals; the coordinator's helpers from its own log). None: version 1.
    log: LogPosition | None = None
    # A dp stage (spec.dp): the mechanism as released, and per aggregate the 95 % half-width of each
    # released cell, in the cells' order. None otherwise (the document is then as before).
    privacy: dict[str, Any] | None = None
    ci95: dict[str, list[float]] | None = None

    @classmethod
    def from_opened(
        cls,
        spec: StageSpec,
        opened: dict[str, Any],
        *,
        stats: dict[str, Any] | None = None,
        log: LogPosition | None = None,
    ) -> MpcResult:
        """Map a player's opened output (pattern over the domain, columns over passing groups) to keys;
        ``log``: the query's log position the signer binds into the result."""
        pattern = opened["pattern"]
        if len(pattern) != len(spec.domain):
            raise ValueError("the opened pattern does not cover the group domain")
        passing = [key for key, ok in zip(spec.domain, pattern, strict=True) if ok]
        columns = opened.get("columns", {})
        cells = tuple(
            (tuple(key), {a.name: columns[a.name][i] for a in spec.aggregates}) for i, key in enumerate(passing)
        )
        suppressed = tuple(tuple(key) for key, ok in zip(spec.domain, pattern, strict=True) if not ok)
        combine = "any_player" if spec.layout.cap == 1 and spec.threshold_on == "units" else "sum"
        rule = {
            "name": "min_group_size",
            "min_group_size": spec.min_group_size,
            "on": spec.threshold_on,
            "combine": combine,
            "applied": "inside the MPC (one secure comparison per group); only passing groups were opened",
        }
        privacy = ci95 = None
        if spec.dp is not None:
            rule = {
                "name": "dp",
                "min_group_size": 0,
                "on": spec.threshold_on,
                "combine": "noise",
                "applied": "differential privacy: every cell of the public domain opened with distributed noise; "
                "no threshold on exact counts",
            }
            privacy = dict(spec.dp.privacy)
            ci95 = dp_intervals(spec, [v for _, v in cells], opened.get("noisy_counts", {}))
        return cls(
            session_id=spec.session_id,
            spec_digest=spec.digest(),
            group_by=tuple(g.name for g in spec.group_by),
            aggregates=tuple(a.name for a in spec.aggregates),
            cells=cells,
            suppressed=suppressed,
            rule=rule,
            players=tuple({"index": i, **p.to_dict()} for i, p in enumerate(spec.players)),
            threshold=spec.t,
            trust_assumption=spec.trust_assumption(),
            stats=dict(stats or {}),
            log=log,
            privacy=privacy,
            ci95=ci95,
        )

    def as_dict(self) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Released cells by group key."""
        return {key: values for key, values in self.cells}

    def to_dict(self) -> dict[str, Any]:
        """Everything that is signed (``stats`` are not: they are timings of this run)."""
        bound = {"log": self.log.to_dict()} if self.log is not None else {}
        return {
            **bound,
            "version": RESULT_VERSION if self.log is not None else 1,
            "kind": "mpc",
            "security_model": SECURITY_MODEL,
            "mpyc_version": MPYC_VERSION,
            "session_id": self.session_id,
            "spec_digest": self.spec_digest,
            "group_by": list(self.group_by),
            "aggregates": list(self.aggregates),
            "cells": [{"key": list(k), "values": _json_values(v)} for k, v in self.cells],
            "suppressed": [list(k) for k in self.suppressed],
            "rule": self.rule,
            "players": list(self.players),
            "threshold": self.threshold,
            "trust_assumption": self.trust_assumption,
            **({"privacy": self.privacy, "ci95": self.ci95} if self.privacy is not None else {}),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def signing_message(self) -> bytes:
        return signing_message(self.to_dict())

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """An Ed25519 signature over the domain-separated digest (verify with ``signing_message()``)."""
        return key.sign(self.signing_message())

    def to_table(self) -> pa.Table:
        """The released cells as a pyarrow Table: the group-by columns, then the aggregates."""
        return _cells_table(self.group_by, self.aggregates, self.cells)


def dp_intervals(
    spec: StageSpec, cells: Sequence[Mapping[str, Any]], counts: Mapping[str, Sequence[int]]
) -> dict[str, list[float]]:
    """The 95 % half-width of each released cell of a dp stage, per aggregate: the quantile of the
    total noise of its vector (:func:`sealroom.planning.mpc_privacy.distributed_ci95`) for COUNT and
    SUM; for AVG = S / max(N, 1), (ci(S) + |AVG| ci(N)) / max(N, 1) (delta method), at most the
    measure's range."""
    from sealroom.planning.mpc_privacy import distributed_ci95  # noqa: PLC0415 - dp stages only

    assert spec.dp is not None
    shape = len(spec.input_players) / spec.dp.honest

    def ci(vector: str) -> float:
        unit = spec.measure(vector[2:]).scale if vector.startswith("s:") else 1
        return distributed_ci95(spec.dp.scale(vector), shape) / unit  # type: ignore[union-attr]

    out: dict[str, list[float]] = {}
    for a in spec.aggregates:
        if a.column is None:
            out[a.name] = [ci("rows")] * len(cells)
        elif a.func == "count":
            out[a.name] = [ci(spec.layout.count_of(a.column))] * len(cells)
        elif a.func == "sum":
            out[a.name] = [ci(f"s:{a.column}")] * len(cells)
        else:
            ms = spec.measure(a.column)
            count = spec.layout.count_of(a.column)
            ci_s, ci_n = ci(f"s:{a.column}"), ci(count)
            # The noisy count AVG divides by (a measurement of its own, opened with it).
            noisy = counts.get(count, [1] * len(cells))
            out[a.name] = [
                min((ci_s + abs(float(cell[a.name])) * ci_n) / max(float(n), 1.0), ms.max - ms.min)
                for cell, n in zip(cells, noisy, strict=True)
            ]
    return out


def _json_values(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def signing_message(doc: dict[str, Any]) -> bytes:
    """What a player signs for a result document (``MpcResult.to_dict()``, as it travels in JSON)."""
    return SIGN_DOMAIN + hashlib.sha256(canonical_json(doc)).digest()


def result_table(doc: dict[str, Any]) -> pa.Table:
    """The released cells of a result document as a pyarrow Table: group-by columns, then aggregates."""
    return _cells_table(doc["group_by"], doc["aggregates"], ((c["key"], c["values"]) for c in doc["cells"]))


def _cells_table(
    group_by: Sequence[str], aggregates: Sequence[str], cells: Iterable[tuple[Sequence[Any], Mapping[str, Any]]]
) -> pa.Table:
    cols: dict[str, list[Any]] = {g: [] for g in group_by}
    cols.update({a: [] for a in aggregates})
    for key, values in cells:
        for g, v in zip(group_by, key, strict=True):
            cols[g].append(v)
        for a in aggregates:
            cols[a].append(values[a])
    return pa.table(cols)
