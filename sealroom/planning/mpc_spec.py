"""The public description of one MPC stage, identical for every player, and what follows from it.

Nothing here is secret: the group domain, the aggregates asked for, the measures' declared bounds
and fixed-point scales, the rule, and the players. Every player derives the same :class:`Layout`
(which vectors each input-holding player secret-shares, their bit lengths, what is opened) from the
same :class:`StageSpec`, so the players run identical programs (MPyC matches messages by a program
counter).

Encoding. A measure value ``v`` is clamped to its declared ``[min, max]`` (before rounding, so the
bounds mean what they mean in the enclave) and encoded as the integer ``round(v * 10**decimals)``
(the *scale* is ``10**decimals``), then clamped again to ``[lo, hi]``, the declared bounds in
fixed point rounded *inward* (``ceil(min * scale)``, ``floor(max * scale)``): a unit never weighs
more than its owners allow. The planner chooses decimals that represent the bounds exactly
(:func:`bound_decimals`), so both clamps agree with the enclave's. Sums, sums of squares, minima
and maxima are exact on these integers. Bit lengths come from the declared bounds and
``max_rows`` (the most rows one party may hold in one group), never from the data, so they reveal
nothing and no sum can silently wrap; a party whose data exceeds ``max_rows`` is refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sealroom.canonical import canonical_json
from sealroom.defaults import DEFAULT_MIN_GROUP_SIZE

SPEC_VERSION = 1
# COUNT(col) counts non-null values of col; COUNT(*) is ``count`` without a column.
AGGREGATES = ("count", "sum", "avg", "var_samp", "var_pop", "stddev_samp", "stddev_pop", "min", "max")
# A party computes its partials with DuckDB in HUGEINT (signed 128 bits): keep every local partial
# within this many bits (a sum of squares of large, finely scaled values can exceed it: refused).
MAX_LOCAL_BITS = 120
# The secure program's integer type; generous, but a bound keeps a careless spec from asking for
# thousand-bit fields.
MAX_SECURE_BITS = 400
MAX_FIXED_POINT_BITS = 600
DEFAULT_MAX_ROWS = 2**32 - 1
# Relative precision (bits) of the few results divided inside the MPC (AVG/VAR with no count opened).
FRACTION_BITS = 40


def trust_assumption(players: Sequence[Player], threshold: int) -> str:
    """The trust assumption, in words, for plans, explain and release records."""
    m = len(players)
    colluders = threshold + 1
    helpers = [p.name for p in players if not p.holds_input]
    text = (
        f"semi-honest, honest majority: no {colluders} of the {m} players collude "
        f"(Shamir secret sharing, threshold t={threshold}, MPyC); players follow the protocol"
    )
    if helpers:
        text += f"; helper players holding no input: {', '.join(helpers)}"
    return text


@dataclass(frozen=True)
class Player:
    """One MPC player: ``name`` is the party (or helper) that runs it; ``holds_input`` is False for a
    helper player that only computes (it adds no input, so it cannot change the result)."""

    name: str
    holds_input: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "holds_input": self.holds_input}


@dataclass(frozen=True)
class Measure:
    """A measure column's public encoding: declared bounds (from the owners' policies, the
    strictest), the fixed-point scale ``10**decimals``, and whether it may hold NULLs."""

    column: str
    min: float
    max: float
    decimals: int = 0
    nullable: bool = True

    @property
    def scale(self) -> int:
        return 10**self.decimals

    @property
    def lo(self) -> int:
        """The lower bound in fixed point, rounded inward (up)."""
        return math.ceil(_fixed(self.min, self.decimals))

    @property
    def hi(self) -> int:
        """The upper bound in fixed point, rounded inward (down)."""
        return math.floor(_fixed(self.max, self.decimals))

    @property
    def exact(self) -> bool:
        """Whether both bounds are whole numbers of fixed-point units (then ``lo``/``hi`` are them)."""
        return _fixed(self.min, self.decimals) == self.lo and _fixed(self.max, self.decimals) == self.hi

    @property
    def magnitude(self) -> int:
        return max(abs(self.lo), abs(self.hi))

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "min": self.min,
            "max": self.max,
            "decimals": self.decimals,
            "nullable": self.nullable,
        }


MAX_DECIMALS = 12


def _fixed(x: float, decimals: int) -> Decimal:
    """``x * 10**decimals`` exactly, from the shortest decimal text of ``x`` (what the owner wrote)."""
    return Decimal(repr(float(x))).scaleb(decimals)


def bound_decimals(x: float) -> int:
    """The decimals needed to represent bound ``x`` exactly as written (2.5 -> 1, 3 -> 0), at most
    :data:`MAX_DECIMALS`."""
    exponent = Decimal(repr(float(x))).normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite bounds only
    return min(max(-exponent, 0), MAX_DECIMALS)


@dataclass(frozen=True)
class Aggregate:
    """One output column: ``func`` over ``column`` (None only for COUNT(*)), released as ``name``."""

    name: str
    func: str
    column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "func": self.func, "column": self.column}


@dataclass(frozen=True)
class GroupColumn:
    """A group-by column. ``bins`` (ascending edges) turns a numeric column into bins
    ``[e0, e1), [e1, e2), ...`` labelled ``"[e0, e1)"``; without bins the values are the keys."""

    name: str
    bins: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bins": list(self.bins) if self.bins is not None else None}

    def labels(self) -> list[str]:
        assert self.bins is not None
        return [bin_label(lo, hi) for lo, hi in zip(self.bins, self.bins[1:], strict=False)]


def bin_label(lo: float, hi: float) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(float(x))

    return f"[{fmt(lo)}, {fmt(hi)})"


# Noise scales above this many fixed-point units are refused: the shares are sampled as 64-bit integers.
MAX_NOISE_SCALE = 1e15
# Differentially private stages open only these (noisy) aggregates.
DP_AGGREGATES = ("count", "sum", "avg")


@dataclass(frozen=True)
class StageNoise:
    """How a differentially private MPC stage is noised (docs/mpc.md "Differential privacy"): every
    input holder bounds its own rows' contributions (at most ``max_rows`` rows per (unit, group),
    ``max_groups`` groups per unit) and adds a Pólya noise share, NB(r, p) - NB(r, p) with
    ``p = 1 - exp(-1/b)`` and ``r = 1 / honest``, to each vector of ``scales`` (layout row -> discrete
    Laplace scale b in fixed-point units) before sharing it; any ``honest`` holders' shares add up to
    one full discrete Laplace(b). ``privacy``: the mechanism as released (the stage's signed result
    carries it). Derived from the plan by :func:`sealroom.planning.privacy.mpc_noise`; every checker
    recomputes it."""

    scales: tuple[tuple[str, float], ...]
    honest: int
    max_groups: int
    max_rows: int
    privacy: Mapping[str, Any]

    @property
    def share_shape(self) -> float:
        """r: the negative binomial shape of one holder's share."""
        return 1.0 / self.honest

    def scale(self, vector: str) -> float:
        return dict(self.scales)[vector]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scales": [[v, b] for v, b in self.scales],
            "honest": self.honest,
            "max_groups": self.max_groups,
            "max_rows": self.max_rows,
            "privacy": dict(self.privacy),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageNoise:
        return cls(
            scales=tuple((str(v), float(b)) for v, b in d["scales"]),
            honest=int(d["honest"]),
            max_groups=int(d["max_groups"]),
            max_rows=int(d["max_rows"]),
            privacy=dict(d["privacy"]),
        )


@dataclass(frozen=True)
class StageSpec:
    """Everything public about one MPC stage (see the module docstring).

    - ``domain``: the ordered, public group keys (tuples, one value per group-by column); every
      input-holding player contributes a vector over exactly this domain.
    - ``min_group_size`` (k) and ``threshold_on``: ``"rows"`` compares each group's total row count
      with k; ``"units"`` compares distinct privacy units (``unit_column``). Distinct units add up
      across players only if no unit appears at two players: set ``units_disjoint`` then;
      otherwise a group passes only if some single player holds at least k units in it (a safe
      lower bound on the true distinct count).
    - ``threshold``: Shamir threshold t (at most t players may collude); default ``(m - 1) // 2``.
    """

    session_id: str
    group_by: tuple[GroupColumn, ...]
    domain: tuple[tuple[Any, ...], ...]
    aggregates: tuple[Aggregate, ...]
    players: tuple[Player, ...]
    measures: tuple[Measure, ...] = ()
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    threshold_on: str = "rows"
    unit_column: str | None = None
    units_disjoint: bool = False
    max_rows: int = DEFAULT_MAX_ROWS
    threshold: int | None = None
    fraction_bits: int = FRACTION_BITS
    # Differential privacy (a plan reading dp datasets): no threshold, every cell opened with noise.
    dp: StageNoise | None = None
    _layout: Layout | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.threshold is None:
            object.__setattr__(self, "threshold", (len(self.players) - 1) // 2)
        object.__setattr__(self, "_layout", _validate(self))

    @property
    def t(self) -> int:
        assert self.threshold is not None  # set in __post_init__
        return self.threshold

    @property
    def layout(self) -> Layout:
        assert self._layout is not None
        return self._layout

    @property
    def input_players(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.players) if p.holds_input)

    def measure(self, column: str) -> Measure:
        for m in self.measures:
            if m.column == column:
                return m
        raise KeyError(column)

    def trust_assumption(self) -> str:
        return trust_assumption(self.players, self.t)

    def explain(self) -> dict[str, Any]:
        """Who sees what, for ``explain`` and plans: players (helpers marked), the threshold and
        the assumption in words, the rule applied inside the MPC, and what is opened."""
        lay = self.layout
        if self.dp is not None:
            return self._explain_dp()
        opened = ["the pass/suppress pattern over the public group domain"]
        for a in self.aggregates:
            what = f"{a.func.upper()}({a.column or '*'})"
            if a.column in lay.divided and a.func not in ("count", "sum", "min", "max"):
                what += " (divided inside the MPC; only the quotient is opened)"
            opened.append(f"{what} of passing groups, as {a.name}")
        if lay.null_flags:
            opened.append(f"whether {', '.join(lay.null_flags)} has no value in a passing group (shown as NULL)")
        return {
            "kind": "mpc",
            "players": [{"index": i, **p.to_dict()} for i, p in enumerate(self.players)],
            "threshold": self.t,
            "trust_assumption": self.trust_assumption(),
            "rule": {
                "min_group_size": self.min_group_size,
                "on": self.threshold_on,
                "combine": "any_player" if lay.cap == 1 and self.threshold_on == "units" else "sum",
            },
            "groups": len(self.domain),
            "opened": opened,
            "never_opened": "any party's own partials; any value of a suppressed group",
            "transport": "mutual TLS with per-session certificates (MPyC --ssl)",
        }

    def _explain_dp(self) -> dict[str, Any]:
        assert self.dp is not None
        return {
            "kind": "mpc",
            "players": [{"index": i, **p.to_dict()} for i, p in enumerate(self.players)],
            "threshold": self.t,
            "trust_assumption": self.trust_assumption(),
            "rule": {"name": "dp", "min_group_size": None, "on": self.threshold_on, "combine": "noise"},
            "groups": len(self.domain),
            "opened": [
                f"{a.func.upper()}({a.column or '*'}) of every group of the public domain, with noise, as {a.name}"
                for a in self.aggregates
            ],
            "never_opened": "any party's own partials or noise share; any exact value",
            "privacy": dict(self.dp.privacy),
            "transport": "mutual TLS with per-session certificates (MPyC --ssl)",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SPEC_VERSION,
            "session_id": self.session_id,
            "group_by": [g.to_dict() for g in self.group_by],
            "domain": [list(k) for k in self.domain],
            "aggregates": [a.to_dict() for a in self.aggregates],
            "players": [p.to_dict() for p in self.players],
            "measures": [m.to_dict() for m in self.measures],
            "min_group_size": self.min_group_size,
            "threshold_on": self.threshold_on,
            "unit_column": self.unit_column,
            "units_disjoint": self.units_disjoint,
            "max_rows": self.max_rows,
            "threshold": self.t,
            "fraction_bits": self.fraction_bits,
            **({"dp": self.dp.to_dict()} if self.dp is not None else {}),
        }

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StageSpec:
        """The spec a plan carries (``to_dict()``); InvalidQueryError when it is malformed or invalid."""
        if not isinstance(doc, Mapping) or doc.get("version") != SPEC_VERSION:
            raise _refuse(f"MPC stage spec version must be {SPEC_VERSION}", rule="version")
        try:
            return cls._from_dict(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if type(exc).__name__ == "InvalidQueryError":
                raise
            raise _refuse(f"plan is inconsistent: malformed MPC stage spec ({type(exc).__name__})") from None

    @classmethod
    def _from_dict(cls, doc: Mapping[str, Any]) -> StageSpec:
        return cls(
            session_id=str(doc["session_id"]),
            group_by=tuple(
                GroupColumn(g["name"], tuple(g["bins"]) if g.get("bins") is not None else None) for g in doc["group_by"]
            ),
            domain=tuple(tuple(k) for k in doc["domain"]),
            aggregates=tuple(Aggregate(a["name"], a["func"], a.get("column")) for a in doc["aggregates"]),
            players=tuple(Player(p["name"], bool(p["holds_input"])) for p in doc["players"]),
            measures=tuple(
                Measure(m["column"], m["min"], m["max"], int(m["decimals"]), bool(m["nullable"]))
                for m in doc["measures"]
            ),
            min_group_size=int(doc["min_group_size"]),
            threshold_on=str(doc["threshold_on"]),
            unit_column=doc.get("unit_column"),
            units_disjoint=bool(doc["units_disjoint"]),
            max_rows=int(doc["max_rows"]),
            threshold=int(doc["threshold"]),
            fraction_bits=int(doc["fraction_bits"]),
            dp=StageNoise.from_dict(doc["dp"]) if doc.get("dp") is not None else None,
        )


@dataclass(frozen=True)
class Layout:
    """What the secure program does, derived from a :class:`StageSpec` (identical at every player).

    - ``counts``: for each measure, the vector that counts its non-null values (``"rows"`` when
      the measure is not nullable, so an opened COUNT(*) makes its AVG/VAR cheap);
    - ``rows``: names of the exact integer vectors each input holder shares, stacked as one
      ``len(rows) x groups`` matrix: ``"rows"`` (row count), ``"n:c"`` (non-null count of c),
      ``"s:c"`` (sum), ``"q:c"`` (sum of squares); ``extrema``: ``"min:c"``/``"max:c"`` vectors.
    - ``cap``/``cut``/``cmp_bits``: each holder shares ``min(its count, cap)`` (or, with
      ``cap == 1``, whether its own units reach k); a group passes when the sum reaches ``cut``.
      Capping keeps the one comparison per group short (``cmp_bits``) without changing its outcome.
    - ``opened``: exact vectors opened for passing groups; ``divided``: measures whose AVG/VAR is
      divided inside the MPC because their count is not opened; ``null_flags``: measures whose
      all-NULL flag must be computed (an all-NULL cell shows as NULL in the output anyway).
    - ``int_bits``/``fxp_bits``: bit lengths of the secure types (from the declared bounds).
    """

    counts: tuple[tuple[str, str], ...]
    rows: tuple[str, ...]
    extrema: tuple[str, ...]
    cap: int
    cut: int
    cmp_bits: int
    int_bits: int
    opened: tuple[str, ...]
    divided: tuple[str, ...]
    null_flags: tuple[str, ...]
    fxp_bits: int
    fxp_frac: int
    count_bits: int

    def count_of(self, column: str) -> str:
        return dict(self.counts)[column]


def _refuse(message: str, **details: Any) -> Exception:
    from sealroom.errors import InvalidQueryError  # here: a player process need not load gRPC

    return InvalidQueryError(message, details={"stage": "mpc", **details})


def _validate(spec: StageSpec) -> Layout:
    """Check ``spec`` rule by rule, in order, and derive the layout every player runs from it."""
    holders = _check_players(spec)
    _check_domain(spec)
    _check_rule(spec)
    measures = _check_measures(spec)
    vectors = _aggregate_vectors(spec, measures)
    rows = _row_vectors(vectors)
    opened, divided, null_flags = _openings(spec, measures, vectors)
    if spec.dp is not None:
        opened, divided, null_flags = _check_dp(spec, rows), [], []
    bits = _bit_lengths(spec, measures, vectors.need, rows, holders=len(holders))
    if spec.dp is not None:
        # Room for the noise: |noise| stays below 64 b per holder share except with probability
        # below e^-60; a sum outside would wrap, so leave far more.
        noise = len(holders) * 64 * max(1, math.ceil(max(b for _, b in spec.dp.scales)))
        bits = _Bits(
            bits.total_rows, bits.cap, bits.cmp_bits, max(bits.int_bits, bits.int_bits + noise.bit_length() + 2)
        )
    fxp_frac = _fixed_point_fraction(spec, bits, divided)
    return Layout(
        counts=tuple((c, _count_of(measures, c)) for c in sorted(vectors.need)),
        rows=tuple(rows),
        extrema=tuple(vectors.extrema),
        cap=bits.cap,
        cut=bits.cap,
        cmp_bits=bits.cmp_bits,
        int_bits=bits.int_bits,
        opened=tuple(r for r in rows if r in opened),
        divided=tuple(divided),
        null_flags=tuple(null_flags),
        fxp_bits=2 * fxp_frac,
        fxp_frac=fxp_frac,
        count_bits=bits.total_rows.bit_length(),
    )


def _check_dp(spec: StageSpec, rows: Sequence[str]) -> set[str]:
    """A dp stage: COUNT, SUM and AVG only, privacy units counted, one positive finite scale per
    noised vector (each a shared one). Returns the vectors opened (the noised ones)."""
    assert spec.dp is not None
    for a in spec.aggregates:
        if a.func not in DP_AGGREGATES:
            raise _refuse(
                f"{a.func.upper()} is not released by a differentially private MPC stage (COUNT, SUM and AVG are)",
                rule="dp_aggregate",
                aggregate=a.name,
            )
    if spec.threshold_on != "units" or not spec.unit_column:
        raise _refuse(
            "a differentially private MPC stage bounds each privacy unit: it needs the unit column", rule="dp"
        )
    names = [v for v, _ in spec.dp.scales]
    if not names or len(set(names)) != len(names) or not set(names) <= set(rows):
        raise _refuse("plan is inconsistent: the dp stage's noised vectors are not its shared vectors", rule="dp")
    if any(not (math.isfinite(b) and 0 < b <= MAX_NOISE_SCALE) for _, b in spec.dp.scales):
        raise _refuse(
            f"a noise scale of the dp MPC stage is not in (0, {MAX_NOISE_SCALE:g}] fixed-point units: ask for a "
            "larger epsilon, or use fewer decimals or narrower bounds",
            rule="overflow",
        )
    if spec.dp.honest < 1 or spec.dp.max_groups < 1 or spec.dp.max_rows < 1:
        raise _refuse("plan is inconsistent: malformed dp noise of the MPC stage", rule="dp")
    return set(names)


def _check_players(spec: StageSpec) -> list[Player]:
    """At least 3 distinctly named players, one holding input, and a threshold 1 <= t < m/2 (honest
    majority). Returns the input-holding players."""
    m = len(spec.players)
    if m < 3:
        raise _refuse(
            f"an MPC stage needs at least 3 players (honest majority); it has {m}: add helper players",
            rule="players",
        )
    names = [p.name for p in spec.players]
    if len(set(names)) != m:
        raise _refuse("MPC players must have distinct names", rule="players")
    holders = [p for p in spec.players if p.holds_input]
    if not holders:
        raise _refuse("an MPC stage needs at least one player holding input", rule="players")
    t = spec.t
    if not 1 <= t or 2 * t >= m:
        raise _refuse(f"threshold t={t} must satisfy 1 <= t < m/2 for m={m} players", rule="threshold")
    return holders


def _check_domain(spec: StageSpec) -> None:
    """A non-empty public group domain, one value per group-by column in each key, no key twice."""
    if not spec.group_by or not spec.domain:
        raise _refuse("an MPC stage needs GROUP BY columns and a non-empty public group domain", rule="domain")
    if any(len(k) != len(spec.group_by) for k in spec.domain):
        raise _refuse("every group key in the domain needs one value per group-by column", rule="domain")
    if len(set(spec.domain)) != len(spec.domain):
        raise _refuse("the group domain lists a key twice", rule="domain")


def _check_rule(spec: StageSpec) -> None:
    """The release rule: k and max_rows at least 1, counted on rows or on named privacy units."""
    if spec.min_group_size < 1 or spec.max_rows < 1:
        raise _refuse("min_group_size and max_rows must be at least 1", rule="min_group_size")
    if spec.threshold_on not in ("rows", "units"):
        raise _refuse('threshold_on must be "rows" or "units"', rule="threshold_on")
    if spec.threshold_on == "units" and not spec.unit_column:
        raise _refuse("threshold_on = units needs the privacy unit column", rule="threshold_on")


def _check_measures(spec: StageSpec) -> dict[str, Measure]:
    """Aggregates with distinct names; each measure declared once, with finite bounds and 0..12
    decimals. Returns the measures by column."""
    if not spec.aggregates or len({a.name for a in spec.aggregates}) != len(spec.aggregates):
        raise _refuse("an MPC stage needs aggregates with distinct output names", rule="aggregates")
    measures = {ms.column: ms for ms in spec.measures}
    if len(measures) != len(spec.measures):
        raise _refuse("a measure is declared twice", rule="measures")
    for ms in spec.measures:
        if not (math.isfinite(ms.min) and math.isfinite(ms.max)) or ms.min > ms.max:
            raise _refuse(f"measure {ms.column} needs finite bounds min <= max", column=ms.column, rule="bounds")
        if not 0 <= ms.decimals <= MAX_DECIMALS:
            raise _refuse(f"measure {ms.column}: decimals must be 0..{MAX_DECIMALS}", column=ms.column, rule="bounds")
        if ms.lo > ms.hi:
            raise _refuse(
                f"measure {ms.column}: no value with {ms.decimals} decimals lies in [{ms.min!r}, {ms.max!r}]; "
                "use more decimals",
                column=ms.column,
                rule="bounds",
            )
    return measures


def _count_of(measures: Mapping[str, Measure], column: str) -> str:
    """The count of a measure's non-null values: the row count itself when it is not nullable."""
    return f"n:{column}" if measures[column].nullable else "rows"


@dataclass(frozen=True)
class _Vectors:
    """What the aggregates need: the measures aggregated (``need``), the vectors each input holder
    shares, the extrema computed, and the vectors an aggregate opens as it is (``public``)."""

    need: frozenset[str]
    shared: frozenset[str]
    extrema: tuple[str, ...]
    public: frozenset[str]


def _aggregate_vectors(spec: StageSpec, measures: Mapping[str, Measure]) -> _Vectors:
    """Each aggregate is one MPC stages compute, over a declared measure; the vectors it needs."""
    need: set[str] = set()
    vectors: set[str] = set()
    extrema: list[str] = []
    public: set[str] = set()
    for a in spec.aggregates:
        if a.func not in AGGREGATES:
            raise _refuse(
                f"{a.func.upper()} is not computed by MPC stages (they take {', '.join(AGGREGATES)})",
                rule="aggregate",
                aggregate=a.name,
            )
        if a.column is None:
            if a.func != "count":
                raise _refuse(f"{a.func.upper()} needs a column", rule="aggregate", aggregate=a.name)
            vectors.add("rows")
            public.add("rows")
            continue
        if a.column not in measures:
            raise _refuse(
                f"{a.func.upper()}({a.column}) needs {a.column} declared as a measure with bounds (the owners' "
                "policies give min and max): MPC sums without declared bounds could overflow silently",
                column=a.column,
                rule="bounds",
            )
        c = a.column
        need.add(c)
        if a.func not in ("sum", "min", "max") or measures[c].nullable:
            # SUM/MIN/MAX of a non-nullable measure over a passing group (>= 1 row) needs no count.
            vectors.add(_count_of(measures, c))
        if a.func == "count":
            public.add(_count_of(measures, c))
        elif a.func == "sum":
            vectors.add(f"s:{c}")
            public.add(f"s:{c}")
        elif a.func == "avg":
            vectors.add(f"s:{c}")
        elif a.func in ("var_samp", "var_pop", "stddev_samp", "stddev_pop"):
            vectors |= {f"s:{c}", f"q:{c}"}
        else:
            extrema.append(f"{a.func}:{c}")
    return _Vectors(frozenset(need), frozenset(vectors), tuple(extrema), frozenset(public))


def _row_vectors(vectors: _Vectors) -> list[str]:
    """The shared vectors in their fixed order: rows, then per measure (sorted) n, s, q."""
    rows: list[str] = ["rows"] if "rows" in vectors.shared else []
    for c in sorted(vectors.need):
        rows += [f"{kind}:{c}" for kind in ("n", "s", "q") if f"{kind}:{c}" in vectors.shared]
    return rows


_RATIOS = ("avg", "var_samp", "var_pop", "stddev_samp", "stddev_pop")


def _openings(
    spec: StageSpec, measures: Mapping[str, Measure], vectors: _Vectors
) -> tuple[set[str], list[str], list[str]]:
    """(the vectors opened for passing cells, the measures divided inside the MPC, the measures
    whose null flag is computed)."""
    divided: list[str] = []
    null_flags: list[str] = []
    opened = set(vectors.public)
    for c in sorted(vectors.need):
        n_public = _count_of(measures, c) in vectors.public
        if not n_public and any(a.column == c and a.func in _RATIOS for a in spec.aggregates):
            divided.append(c)
        if not n_public and _count_of(measures, c) in vectors.shared and (measures[c].nullable or c in divided):
            null_flags.append(c)
        if n_public and any(a.column == c and a.func == "avg" for a in spec.aggregates):
            opened.add(f"s:{c}")  # AVG = SUM / COUNT with the count public: the sum is a bijection of it
    return opened, divided, null_flags


@dataclass(frozen=True)
class _Bits:
    """Bit lengths from declared bounds only (never from the data)."""

    total_rows: int  # the most rows all input holders may hold in one group
    cap: int  # each holder's count is capped at (and compared with) this
    cmp_bits: int
    int_bits: int


def _bit_lengths(
    spec: StageSpec, measures: Mapping[str, Measure], need: frozenset[str], rows: Sequence[str], *, holders: int
) -> _Bits:
    """The bit lengths of the shared integers (``need``: the measures aggregated, ``rows``: the shared
    vectors); refuses bounds that would overflow them."""
    total_rows = holders * spec.max_rows
    k = spec.min_group_size
    cap = 1 if spec.threshold_on == "units" and not spec.units_disjoint else k
    cmp_bits = (holders * cap).bit_length() + 1
    bits = total_rows.bit_length() + 1
    local = spec.max_rows.bit_length()
    for c in sorted(need):
        mag = max(measures[c].magnitude, 1)
        bits = max(bits, (total_rows * mag).bit_length() + 1)
        local = max(local, (spec.max_rows * mag).bit_length() + 1)
        if f"q:{c}" in rows:
            bits = max(bits, (total_rows * mag * mag).bit_length() + 1)
            # var numerator n*q - s^2
            bits = max(bits, (total_rows * total_rows * mag * mag).bit_length() + 2)
            local = max(local, (spec.max_rows * mag * mag).bit_length() + 1)
        if local > MAX_LOCAL_BITS or bits > MAX_SECURE_BITS:
            ms = measures[c]
            raise _refuse(
                f"the declared bounds of {c} (min {ms.min}, max {ms.max}, {ms.decimals} decimals) with up to "
                f"{spec.max_rows} rows per party and group need {max(local, bits)} bits, more than MPC stages "
                f"allow ({MAX_LOCAL_BITS} per party, {MAX_SECURE_BITS} in total): narrow the bounds, use fewer "
                "decimals or lower max_rows",
                column=c,
                rule="overflow",
            )
    return _Bits(total_rows, cap, cmp_bits, max(bits, 32))


def _fixed_point_fraction(spec: StageSpec, bits: _Bits, divided: Sequence[str]) -> int:
    """The fractional bits of the fixed point dividing inside the MPC (0: nothing divided)."""
    if not divided:
        return 0
    # MPyC's fixed-point division needs l = 2f; the quotient's relative error is about
    # denominator * 2^-f, and numerators (up to 2^bits) must stay below 2^(f-1).
    fxp_frac = max(bits.int_bits + 2, 2 * (bits.total_rows.bit_length() + 1) + spec.fraction_bits)
    if 2 * fxp_frac > MAX_FIXED_POINT_BITS:
        raise _refuse(
            f"dividing inside the MPC with these bounds needs {2 * fxp_frac}-bit fixed point, more than "
            f"{MAX_FIXED_POINT_BITS}: narrow the bounds, lower max_rows, or also ask for the count",
            rule="overflow",
        )
    return fxp_frac
