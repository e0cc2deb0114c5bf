"""Query plans, their canonical hash, and owners' approval signatures.

A plan is the unit every data owner approves: the SQL, the analyst, the stages, each party's input
(projected columns, the filter it applies itself, policy and its digest) and the owners' signing keys. Its hash is
SHA-256 over its canonical JSON; it includes the query id and a random salt, so an approval for one
query never verifies for another (replay). An approval is an Ed25519 signature over a
domain-separated message holding the plan hash.

The signatures over plans (approvals) and owners' messages live in :mod:`sealroom.signing`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError
from sealroom.planning.sql import MpcQuery, Pushdown, PushedFilter, mpc_query, pushdown
from sealroom.policy import DatasetPolicy

PLAN_VERSION = 1
STAGE_KINDS = ("tee", "mpc")


@dataclass(frozen=True)
class PlanInput:
    """What one party contributes to a stage: a projection of one dataset, filtered by the party.

    ``columns`` are what the party seals and sends. ``filter`` is the predicate the party applies
    itself before sealing (DuckDB SQL over the dataset's own column names, see
    :func:`sealroom.planning.sql.pushdown`), or None; ``filter_columns`` are the columns it reads, which
    are not sent unless ``columns`` holds them too. Both are keys of the plan's JSON only when a
    filter is pushed, so a plan without one reads and hashes as before.
    """

    party: str
    dataset: str
    columns: tuple[str, ...]
    policy: DatasetPolicy
    table: str  # name of the input inside the enclave's engine
    filter: str | None = None
    filter_columns: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.party}.{self.dataset}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "party": self.party,
            "dataset": self.dataset,
            "columns": list(self.columns),
            "policy": self.policy.to_dict(),
            "policy_digest": self.policy.digest(),
            "table": self.table,
        }
        if self.filter is not None:
            d["filter"] = self.filter
            d["filter_columns"] = list(self.filter_columns)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanInput:
        policy = DatasetPolicy.from_dict(d["policy"], source="<plan>")
        if policy.digest() != d["policy_digest"]:
            raise InvalidQueryError("plan is inconsistent: a policy does not match its digest")
        flt = d.get("filter")
        filter_columns = tuple(d.get("filter_columns", ()))
        if flt is not None and not isinstance(flt, str):
            raise InvalidQueryError("plan is inconsistent: an input's filter is not SQL text")
        if flt is None and filter_columns:
            raise InvalidQueryError("plan is inconsistent: an input names filter columns but no filter")
        if not all(isinstance(c, str) for c in (*d["columns"], *filter_columns)):
            raise InvalidQueryError("plan is inconsistent: a column name is not a string")
        return cls(
            party=d["party"],
            dataset=d["dataset"],
            columns=tuple(d["columns"]),
            policy=policy,
            table=d["table"],
            filter=flt,
            filter_columns=filter_columns,
        )


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: ``tee`` (inside an attested enclave worker) or ``mpc`` (MPyC players).

    A TEE stage runs ``sql`` over its inputs and releases its outputs, unless it ``feeds`` an MPC
    stage: then it releases nothing and computes only its inputs' partial aggregates over the MPC
    stage's public group domain, and the enclave joins that MPC stage as the player holding them.

    An MPC stage carries ``mpc``, the public :class:`sealroom.planning.mpc_spec.StageSpec` as its ``to_dict()``
    (players, group domain, aggregates, measures' bounds, k, threshold: all covered by the plan
    hash, so an owner's approval covers them); ``holders``, which input each input-holding player
    holds (``{"<index>": {"party": p, "datasets": [...]}}`` for a party's own player over its inputs
    of this stage, ``{"<index>": {"stage": "s1"}}`` for the enclave holding the partials of the TEE
    stage that feeds it); and ``release``: how the opened cells become the output (``outputs``:
    ``[name, "group" | "aggregate", source]`` per output column, ``having`` over output names,
    applied to released cells only). The optional keys are in the plan's JSON only when set, so a
    plan without MPC reads and hashes as before.
    """

    id: str
    kind: str  # "tee" | "mpc"
    sql: str  # the analyst's query, normalised; the enclave compiles it itself
    inputs: tuple[PlanInput, ...]
    output_columns: tuple[str, ...]
    min_group_size: int  # strictest over inputs
    feeds: str | None = None  # a TEE stage whose partials feed this MPC stage
    mpc: dict[str, Any] | None = None  # StageSpec.to_dict()
    holders: dict[str, dict[str, Any]] | None = None  # player index (as text) -> what it holds
    release: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "sql": self.sql,
            "inputs": [i.to_dict() for i in self.inputs],
            "output_columns": list(self.output_columns),
            "min_group_size": self.min_group_size,
        }
        if self.feeds is not None:
            d["feeds"] = self.feeds
        # Copies: a caller editing the document must not change the (frozen) stage.
        if self.mpc is not None:
            d["mpc"] = copy.deepcopy(self.mpc)
        if self.holders is not None:
            d["holders"] = copy.deepcopy(self.holders)
        if self.release is not None:
            d["release"] = copy.deepcopy(self.release)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        kind = d["kind"]
        if kind not in STAGE_KINDS:
            raise InvalidQueryError(f"plan is inconsistent: unknown stage kind {kind!r}")
        mpc, holders, release, feeds = d.get("mpc"), d.get("holders"), d.get("release"), d.get("feeds")
        if (
            (kind == "mpc") != (mpc is not None)
            or (mpc is None) != (holders is None)
            or (mpc is None) != (release is None)
        ):
            raise InvalidQueryError("plan is inconsistent: an MPC stage needs mpc, holders and release, and only it")
        if feeds is not None and (kind != "tee" or not isinstance(feeds, str)):
            raise InvalidQueryError("plan is inconsistent: only a TEE stage feeds an MPC stage")
        if mpc is not None and not (
            isinstance(mpc, dict)
            and isinstance(holders, dict)
            and isinstance(release, dict)
            and all(isinstance(h, dict) for h in holders.values())
        ):
            raise InvalidQueryError("plan is inconsistent: malformed MPC stage")
        return cls(
            id=d["id"],
            kind=kind,
            sql=d["sql"],
            inputs=tuple(PlanInput.from_dict(i) for i in d["inputs"]),
            output_columns=tuple(d["output_columns"]),
            min_group_size=int(d["min_group_size"]),
            feeds=feeds,
            mpc=mpc,
            holders=holders,
            release=release,
        )


@dataclass(frozen=True)
class Plan:
    query_id: str
    sql: str
    analyst: str
    stages: tuple[Stage, ...]
    parties: dict[str, str]  # party -> Ed25519 public key (hex)
    salt: str
    created_at: float
    version: int = PLAN_VERSION
    _hash: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "query_id": self.query_id,
            "sql": self.sql,
            "analyst": self.analyst,
            "stages": [s.to_dict() for s in self.stages],
            "parties": dict(sorted(self.parties.items())),
            "salt": self.salt,
            "created_at": self.created_at,
        }

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        try:
            d = json.loads(data)
            if d.get("version") != PLAN_VERSION:
                raise InvalidQueryError(f"unsupported plan version {d.get('version')!r}")
            return cls(
                query_id=d["query_id"],
                sql=d["sql"],
                analyst=d["analyst"],
                stages=tuple(Stage.from_dict(s) for s in d["stages"]),
                parties=dict(d["parties"]),
                salt=d["salt"],
                created_at=float(d["created_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidQueryError):
                raise
            raise InvalidQueryError(f"malformed plan document ({type(exc).__name__})") from None

    def inputs(self) -> list[PlanInput]:
        return [i for s in self.stages for i in s.inputs]

    def involved_parties(self) -> list[str]:
        return sorted({i.party for i in self.inputs()})


def stage_pushdown(stage: Stage) -> Pushdown:
    """Recompute the stage's filter pushdown from its SQL, over the columns its inputs declare, and
    check every input's ``filter`` and ``filter_columns`` against it. The planner, the enclave and
    every party call this, so the coordinator can neither slip a predicate
    of its own to a party nor make the enclave run a residual query the filters do not complete.
    Raises InvalidQueryError.
    """
    views: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for inp in stage.inputs:
        if inp.qualified in views:
            raise InvalidQueryError("the plan names an input twice", details={"dataset": inp.qualified})
        views[inp.qualified] = (inp.columns, inp.filter_columns)
    try:
        pd = pushdown(stage.sql, views)
    except InvalidQueryError as err:
        # The planner checks that its plans resolve this way: this plan's inputs were changed.
        raise InvalidQueryError(
            "the plan is inconsistent: its SQL does not resolve over the columns and filter columns its "
            f"inputs declare ({err.message})",
            details={**err.details, "check": "filter"},
        ) from None
    _check_filters(stage.inputs, pd.filters)
    return pd


def _check_filters(inputs: Iterable[PlanInput], filters: Mapping[str, PushedFilter]) -> None:
    """Every input's filter is exactly the one its SQL implies (or none where it implies none)."""
    for inp in inputs:
        want = filters.get(inp.qualified)
        expected = (want.sql, want.columns) if want is not None else (None, ())
        if (inp.filter, inp.filter_columns) != expected:
            raise InvalidQueryError(
                f"the plan's filter for {inp.qualified} is not the one its SQL implies; a plan cannot "
                "push a predicate its SQL does not hold (re-plan the query, with the same Sealroom release "
                "everywhere)",
                details={"party": inp.party, "dataset": inp.dataset, "check": "filter"},
            )


def mpc_stage_query(plan: Plan, stage: Stage) -> MpcQuery:
    """Recompute what an MPC stage computes (:func:`sealroom.planning.sql.mpc_query`) from its SQL, over
    the columns its inputs and those of the TEE stages feeding it declare, and check that every
    such input's filter is the one the SQL implies and that together they are exactly the datasets
    the SQL reads. ``stage`` may be the MPC stage or a TEE stage feeding it. The planner, every
    party and the runtime call this. Raises InvalidQueryError."""
    if stage.feeds is not None:
        target = [s for s in plan.stages if s.id == stage.feeds and s.kind == "mpc"]
        if len(target) != 1:
            raise InvalidQueryError(f"plan is inconsistent: stage {stage.id} feeds no MPC stage of the plan")
        stage = target[0]
    if stage.kind != "mpc":
        raise InvalidQueryError(f"stage {stage.id} is not an MPC stage")
    feeding = [s for s in plan.stages if s.feeds == stage.id]
    inputs = [i for s in (stage, *feeding) for i in s.inputs]
    if any(s.sql != stage.sql for s in feeding):
        raise InvalidQueryError("plan is inconsistent: a TEE stage feeding an MPC stage has other SQL")
    # Every dataset resolves over the same columns (all that any input declares), so a UNION ALL of
    # SELECT * expands alike in every branch whatever each party filters on.
    names: list[str] = []
    for inp in inputs:
        for c in (*inp.columns, *inp.filter_columns):
            if c not in names:
                names.append(c)
    views: dict[str, list[str]] = {}
    for inp in inputs:
        if inp.qualified in views:
            raise InvalidQueryError("the plan names an input twice", details={"dataset": inp.qualified})
        views[inp.qualified] = names
    try:
        q = mpc_query(stage.sql, views)
    except InvalidQueryError as err:
        raise InvalidQueryError(
            f"the plan is inconsistent: its MPC stage's SQL does not resolve over its inputs ({err.message})",
            details={**err.details, "check": "filter"},
        ) from None
    if sorted(q.datasets) != sorted(views):
        raise InvalidQueryError("the plan is inconsistent: its MPC stage's inputs are not the datasets its SQL reads")
    _check_filters(inputs, q.filters)
    return q


def mpc_session(plan: Plan, stage_id: str) -> str:
    """What an MPC stage's player identities are bound to: this plan (its hash) and this stage."""
    return f"{plan.hash}:{stage_id}"


def mpc_player_keys(plan: Plan, stage: Stage) -> dict[int, str | None]:
    """Index -> the Ed25519 identity key (hex) the plan names for each player of MPC stage ``stage``,
    which every player checks each other player's offer against: an owner's player, the owner's key
    (``plan.parties``); a helper player, the key its ``holders`` entry names (the coordinator's);
    the enclave's player, None (its key is the attested job key, bound to the plan hash by evidence
    at run time). The plan hash covers them all, so every owner's approval covers who the players
    are. Raises InvalidQueryError when a player's entry is missing or names no usable key."""
    players = (stage.mpc or {}).get("players")
    holders = stage.holders or {}
    if (
        not isinstance(players, list)
        or set(holders) != {str(i) for i in range(len(players))}
        or not all(isinstance(h, dict) for h in holders.values())
    ):
        raise InvalidQueryError(f"plan is inconsistent: stage {stage.id}'s holders do not name every MPC player")
    out: dict[int, str | None] = {}
    for i, player in enumerate(players):
        h = holders[str(i)]
        holds = bool(isinstance(player, dict) and player.get("holds_input", True))
        if holds and "party" in h and h["party"] in plan.parties:
            out[i] = plan.parties[h["party"]]
        elif holds and "stage" in h:
            out[i] = None
        elif not holds and "helper" in h and _is_key_hex(h.get("key")):
            out[i] = str(h["key"])
        else:
            raise InvalidQueryError(
                f"plan is inconsistent: MPC player {i} of stage {stage.id} names no identity the players can verify "
                "(an owner of the plan, the enclave, or a helper with its key)",
                details={"stage": stage.id, "player": i},
            )
    named = [k for k in out.values() if k is not None]
    if len(named) != len(set(named)):
        # One key behind two players (say an owner's key as the helper's) would give one party two
        # shares of every input.
        raise InvalidQueryError(
            f"plan is inconsistent: stage {stage.id} names one identity key for two MPC players",
            details={"stage": stage.id, "check": "players"},
        )
    return out


def _is_key_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def declared_domains(
    columns: Sequence[str], policies: Sequence[tuple[str, DatasetPolicy]]
) -> list[tuple[str, tuple[Any, ...]]]:
    """The public group domain each GROUP BY column of an MPC stage takes from the owners'
    policies (``(party.dataset, policy)`` for every dataset the stage reads): ``("values", keys)``,
    the union of the declared values in first-declared order, or ``("bins", edges)`` when every
    owner declares the same bins. The planner and every party derive it alike. Raises
    InvalidQueryError (``details``: rule ``domain``, the column, the dataset, a suggestion)."""
    out: list[tuple[str, tuple[Any, ...]]] = []
    for col in columns:
        decls: list[tuple[str, tuple[str, tuple[Any, ...]]]] = []
        for qualified, policy in policies:
            dom = policy.rule(col).domain
            if dom is None:
                raise InvalidQueryError(
                    f"GROUP BY {col} needs its public domain, and {qualified}'s policy declares none",
                    details={
                        "rule": "domain",
                        "column": col,
                        "domain_dataset": qualified,
                        "suggestion": f"declare the domain of column {col} in {qualified}'s policy "
                        '(values = ["...", ...] or bins = [...])',
                    },
                )
            decls.append((qualified, dom))
        kinds = {kind: qualified for qualified, (kind, _) in decls}
        if len(kinds) > 1:
            raise InvalidQueryError(
                f"{col} is declared with values in {kinds['values']}'s policy and with bins in {kinds['bins']}'s",
                details={
                    "rule": "domain",
                    "column": col,
                    "suggestion": f"declare the domain of {col} the same way (values or bins) in every involved policy",
                },
            )
        if "bins" in kinds:
            edges = decls[0][1][1]
            differ = [q for q, (_, e) in decls if e != edges]
            if differ:
                raise InvalidQueryError(
                    f"the owners declare different bins for {col} ({decls[0][0]} and {differ[0]})",
                    details={
                        "rule": "domain",
                        "column": col,
                        "suggestion": f"declare the same bins for {col} in every involved policy",
                    },
                )
            out.append(("bins", tuple(edges)))
        else:
            values: list[Any] = []
            for _, (_, vs) in decls:
                values += [v for v in vs if v not in values]
            out.append(("values", tuple(values)))
    return out
