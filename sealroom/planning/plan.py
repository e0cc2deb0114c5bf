"""Query plans, their canonical hash, and owners' approval signatures.

A plan is the unit every data owner approves: the SQL, the analyst, the stages, each party's input
(projected columns, the filter it applies itself, policy and its digest) and the owners' signing keys. Its hash is
SHA-256 over its canonical JSON; it includes the query id and a random salt, so an approval for one
query never verifies for another (replay). An approval is an Ed25519 signature over a
domain-separated message holding the plan hash.

The signatures over plans (approvals) and owners' messages live in :mod:`sealroom.signing`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError
from sealroom.planning.mpc_spec import StageSpec
from sealroom.planning.mpc_sql import MpcQuery, mpc_query
from sealroom.planning.privacy import PlanPrivacy
from sealroom.planning.resolve import OrderKey
from sealroom.planning.sql import Pushdown, PushedFilter, pushdown
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
class PartyHolder:
    """An owner's own MPC player, holding that owner's inputs of the stage (``datasets``)."""

    party: str
    datasets: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"party": self.party, "datasets": list(self.datasets)}


@dataclass(frozen=True)
class EnclaveHolder:
    """The enclave's MPC player, holding the partials of the TEE stage ``stage`` that feeds it."""

    stage: str

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}


@dataclass(frozen=True)
class HelperHolder:
    """A helper player holding no input, run by ``helper`` under identity ``key`` (Ed25519, hex;
    None in a plan from before helpers' keys were named)."""

    helper: str
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"helper": self.helper, **({"key": self.key} if self.key is not None else {})}


Holder = PartyHolder | EnclaveHolder | HelperHolder


def _holder_from_dict(d: Any) -> Holder:
    """One ``holders`` entry, exactly as :meth:`to_dict` writes it (so the plan hashes as before)."""
    if isinstance(d, dict):
        keys = set(d)
        if keys == {"party", "datasets"} and isinstance(d["party"], str) and isinstance(d["datasets"], list):
            if all(isinstance(x, str) for x in d["datasets"]):
                return PartyHolder(d["party"], tuple(d["datasets"]))
        elif keys == {"stage"} and isinstance(d["stage"], str):
            return EnclaveHolder(d["stage"])
        elif keys in ({"helper"}, {"helper", "key"}) and isinstance(d["helper"], str):
            if isinstance(d.get("key"), str | None):
                return HelperHolder(d["helper"], d.get("key"))
    raise InvalidQueryError("plan is inconsistent: malformed MPC stage")


def _holders_from_dict(d: Any) -> dict[int, Holder]:
    if not isinstance(d, dict) or not all(isinstance(k, str) and k.isdigit() and str(int(k)) == k for k in d):
        raise InvalidQueryError("plan is inconsistent: malformed MPC stage")
    return {int(k): _holder_from_dict(v) for k, v in d.items()}


@dataclass(frozen=True)
class Release:
    """How an MPC stage's opened cells become its output: ``outputs`` (``(name, "group" |
    "aggregate", source)`` per output column), then ``having`` (over output names), ``order_by``
    and ``limit``, applied to released cells only."""

    outputs: tuple[tuple[str, str, str], ...]
    having: str | None
    order_by: tuple[OrderKey, ...]
    limit: int | None

    @classmethod
    def of(cls, q: MpcQuery) -> Release:
        """The release the SQL implies (the planner writes it; every checker compares with it)."""
        return cls(tuple(q.outputs), q.having, tuple(q.order_by), q.limit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outputs": [list(o) for o in self.outputs],
            "having": self.having,
            "order_by": [[o.column, o.descending, o.nulls_first] for o in self.order_by],
            "limit": self.limit,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Release:
        malformed = InvalidQueryError("plan is inconsistent: malformed MPC stage")
        if not isinstance(d, dict) or set(d) != {"outputs", "having", "order_by", "limit"}:
            raise malformed
        outputs, order_by, having, limit = d["outputs"], d["order_by"], d["having"], d["limit"]
        if not (
            isinstance(outputs, list)
            and all(isinstance(o, list) and len(o) == 3 and all(isinstance(x, str) for x in o) for o in outputs)
            and isinstance(order_by, list)
            and all(
                isinstance(o, list)
                and len(o) == 3
                and isinstance(o[0], str)
                and isinstance(o[1], bool)
                and isinstance(o[2], bool | None)
                for o in order_by
            )
            and isinstance(having, str | None)
            and (limit is None or (isinstance(limit, int) and not isinstance(limit, bool)))
        ):
            raise malformed
        return cls(
            tuple((o[0], o[1], o[2]) for o in outputs),
            having,
            tuple(OrderKey(o[0], o[1], o[2]) for o in order_by),
            limit,
        )


def _stage_doc(stage: TeeStage | MpcStage) -> dict[str, Any]:
    return {
        "id": stage.id,
        "kind": stage.kind,
        "sql": stage.sql,
        "inputs": [i.to_dict() for i in stage.inputs],
        "output_columns": list(stage.output_columns),
        "min_group_size": stage.min_group_size,
    }


@dataclass(frozen=True)
class TeeStage:
    """A stage run inside an attested enclave worker: it runs ``sql`` over its inputs and releases
    its outputs, unless it ``feeds`` an MPC stage: then it releases nothing and computes only its
    inputs' partial aggregates over the MPC stage's public group domain, and the enclave joins that
    MPC stage as the player holding them. ``feeds`` is in the plan's JSON only when set."""

    kind: ClassVar[str] = "tee"
    id: str
    sql: str  # the analyst's query, normalised; the enclave compiles it itself
    inputs: tuple[PlanInput, ...]
    output_columns: tuple[str, ...]
    min_group_size: int  # strictest over inputs
    feeds: str | None = None  # the MPC stage this stage's partials feed

    def to_dict(self) -> dict[str, Any]:
        d = _stage_doc(self)
        if self.feeds is not None:
            d["feeds"] = self.feeds
        return d


@dataclass(frozen=True)
class MpcStage:
    """A stage run by MPyC players over per-party partial aggregates.

    ``spec`` is its public :class:`sealroom.planning.mpc_spec.StageSpec` (players, group domain,
    aggregates, measures' bounds, k, threshold: all covered by the plan hash, so an owner's approval
    covers them), parsed once when the plan is read; ``holders``, what each input-holding player
    holds (by player index: an owner's own player over its inputs of this stage, the enclave holding
    the partials of the TEE stage that feeds it, or a helper holding nothing); ``release``: how the
    opened cells become the output. In the plan's JSON they are ``mpc`` (``spec.to_dict()``),
    ``holders`` (keyed by the index as text) and ``release``.
    """

    kind: ClassVar[str] = "mpc"
    id: str
    sql: str
    inputs: tuple[PlanInput, ...]
    output_columns: tuple[str, ...]
    min_group_size: int
    spec: StageSpec
    holders: Mapping[int, Holder]
    release: Release

    def holders_doc(self) -> dict[str, dict[str, Any]]:
        return {str(i): h.to_dict() for i, h in sorted(self.holders.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            **_stage_doc(self),
            "mpc": self.spec.to_dict(),
            "holders": self.holders_doc(),
            "release": self.release.to_dict(),
        }


Stage = TeeStage | MpcStage


def stage_from_dict(d: dict[str, Any]) -> Stage:
    """A stage from the plan's JSON; InvalidQueryError when it is inconsistent or malformed."""
    kind = d["kind"]
    if kind not in STAGE_KINDS:
        raise InvalidQueryError(f"plan is inconsistent: unknown stage kind {kind!r}")
    mpc, holders, release, feeds = d.get("mpc"), d.get("holders"), d.get("release"), d.get("feeds")
    if (kind == "mpc") != (mpc is not None) or (mpc is None) != (holders is None) or (mpc is None) != (release is None):
        raise InvalidQueryError("plan is inconsistent: an MPC stage needs mpc, holders and release, and only it")
    if feeds is not None and (kind != "tee" or not isinstance(feeds, str)):
        raise InvalidQueryError("plan is inconsistent: only a TEE stage feeds an MPC stage")
    common = {
        "id": d["id"],
        "sql": d["sql"],
        "inputs": tuple(PlanInput.from_dict(i) for i in d["inputs"]),
        "output_columns": tuple(d["output_columns"]),
        "min_group_size": int(d["min_group_size"]),
    }
    if kind == "tee":
        return TeeStage(**common, feeds=feeds)
    if not isinstance(mpc, dict):
        raise InvalidQueryError("plan is inconsistent: malformed MPC stage")
    spec = StageSpec.from_dict(mpc)
    if canonical_json(spec.to_dict()) != canonical_json(mpc):
        # What the owners sign is the plan as it reads back: a spec with other fields or types
        # would hash otherwise than it was written.
        raise InvalidQueryError("plan is inconsistent: malformed MPC stage spec (it does not read back as written)")
    return MpcStage(**common, spec=spec, holders=_holders_from_dict(holders), release=Release.from_dict(release))


@dataclass(frozen=True)
class Plan:
    query_id: str
    sql: str
    analyst: str
    stages: tuple[Stage, ...]
    parties: dict[str, str]  # party -> Ed25519 public key (hex)
    salt: str
    created_at: float
    # The privacy block of a plan reading dp datasets (sealroom.planning.privacy): the epsilon and
    # delta its release spends of every dp owner's budget. In the JSON only when set.
    privacy: PlanPrivacy | None = None
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
            **({"privacy": self.privacy.to_dict()} if self.privacy is not None else {}),
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
                stages=tuple(stage_from_dict(s) for s in d["stages"]),
                parties=dict(d["parties"]),
                salt=d["salt"],
                created_at=float(d["created_at"]),
                privacy=PlanPrivacy.from_dict(d["privacy"]) if "privacy" in d else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidQueryError):
                raise
            raise InvalidQueryError(f"malformed plan document ({type(exc).__name__})") from None

    def inputs(self) -> list[PlanInput]:
        return [i for s in self.stages for i in s.inputs]

    def involved_parties(self) -> list[str]:
        return sorted({i.party for i in self.inputs()})

    def tee_stages(self) -> list[TeeStage]:
        return [s for s in self.stages if isinstance(s, TeeStage)]

    def mpc_stages(self) -> list[MpcStage]:
        return [s for s in self.stages if isinstance(s, MpcStage)]

    def feeding(self, stage: MpcStage) -> list[TeeStage]:
        """The TEE stages whose partials feed MPC stage ``stage``."""
        return [s for s in self.tee_stages() if s.feeds == stage.id]

    def fed_stage(self, stage: TeeStage) -> MpcStage:
        """The MPC stage that TEE stage ``stage`` feeds; InvalidQueryError when the plan has none."""
        target = [s for s in self.mpc_stages() if s.id == stage.feeds]
        if stage.feeds is None or len(target) != 1:
            raise InvalidQueryError(f"plan is inconsistent: stage {stage.id} feeds no MPC stage of the plan")
        return target[0]

    def mpc_inputs(self, stage: MpcStage) -> list[PlanInput]:
        """Every input an MPC stage computes over: its own (held by owners' players) and those of the
        TEE stages feeding it (held by the enclave)."""
        return [*stage.inputs, *(i for s in self.feeding(stage) for i in s.inputs)]


def stage_pushdown(stage: TeeStage) -> Pushdown:
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
    """Recompute what an MPC stage computes (:func:`sealroom.planning.mpc_sql.mpc_query`) from its SQL, over
    the columns its inputs and those of the TEE stages feeding it declare, and check that every
    such input's filter is the one the SQL implies and that together they are exactly the datasets
    the SQL reads. ``stage`` may be the MPC stage or a TEE stage feeding it. The planner, every
    party and the runtime call this. Raises InvalidQueryError."""
    if isinstance(stage, TeeStage):
        if stage.feeds is None:
            raise InvalidQueryError(f"stage {stage.id} is not an MPC stage")
        stage = plan.fed_stage(stage)
    feeding = plan.feeding(stage)
    inputs = plan.mpc_inputs(stage)
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


def mpc_player_keys(plan: Plan, stage: MpcStage) -> dict[int, str | None]:
    """Index -> the Ed25519 identity key (hex) the plan names for each player of MPC stage ``stage``,
    which every player checks each other player's offer against: an owner's player, the owner's key
    (``plan.parties``); a helper player, the key its ``holders`` entry names (the coordinator's);
    the enclave's player, None (its key is the attested job key, bound to the plan hash by evidence
    at run time). The plan hash covers them all, so every owner's approval covers who the players
    are. Raises InvalidQueryError when a player's entry is missing or names no usable key."""
    players = stage.spec.players
    if set(stage.holders) != set(range(len(players))):
        raise InvalidQueryError(f"plan is inconsistent: stage {stage.id}'s holders do not name every MPC player")
    out: dict[int, str | None] = {}
    for i, player in enumerate(players):
        h = stage.holders[i]
        if player.holds_input and isinstance(h, PartyHolder) and h.party in plan.parties:
            out[i] = plan.parties[h.party]
        elif player.holds_input and isinstance(h, EnclaveHolder):
            out[i] = None
        elif not player.holds_input and isinstance(h, HelperHolder) and _is_key_hex(h.key):
            out[i] = str(h.key)
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
