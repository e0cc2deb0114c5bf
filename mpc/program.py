"""The secure aggregation program, run by every player (imported only inside a player process).

Security model: MPyC's Shamir secret sharing among m players with threshold t < m/2, semi-honest
(players follow the protocol; any t of them together learn nothing beyond what is opened).

What it reveals, deliberately, and nothing else:
1. the pass/suppress pattern over the public group domain (one secure comparison per group of the
   summed capped counts with the minimum group size); it is public in the output anyway;
2. for passing groups only, the aggregates the query asked for; where a count is opened, an AVG or
   VAR is opened as the equivalent integer (sum, or ``n*q - s^2``) and divided in the clear, since
   that is a bijection given the public count; otherwise it is divided inside the MPC (fixed
   point) and only the quotient is opened; STDDEV is the clear square root of the opened variance;
3. for passing groups of a measure whose count is not opened, whether the measure has no non-null
   value (or, for VAR_SAMP, fewer than two): the output shows those cells as NULL anyway.

In a differentially private stage (``spec.dp``) there is no comparison and no suppression: each
input holder's vectors already carry its noise share (:mod:`mpc.partials`), and the players open
the noised vectors summed over the holders for every cell of the domain (:func:`run_dp`), nothing
else. No exact aggregate is opened.

No per-party value and no value of a suppressed group is ever opened. Everything is vectorised
(secure arrays): one input per player and vector kind, one comparison batch, one opening batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sealroom.planning.mpc_spec import Layout, StageSpec

# The aggregates whose variance is the sample variance (its denominator is n * (n - 1)).
_SAMPLE_VARIANCE = frozenset({"var_samp", "stddev_samp"})
_POPULATION_VARIANCE = frozenset({"var_pop", "stddev_pop"})


@dataclass(frozen=True)
class _SharedInputs:
    """Step 1's secure values: the comparison of every group with the cut, and the secret-shared
    vectors the later steps open for passing groups only (each None where the layout needs none)."""

    below: Any  # per group: the summed capped count is below the cut (still secret)
    matrix: Any | None  # the exact vectors (layout rows x groups), summed over the holders
    extrema: Any | None  # each holder's own MIN/MAX vectors (layout extrema x groups)
    fxp_rows: list[str]  # the layout rows shared as fixed point, for the divisions inside the MPC
    fxp: Any | None  # those rows x groups, summed over the holders


async def run(mpc: Any, spec: StageSpec, local: dict[str, Any] | None) -> dict[str, Any]:
    """The secure program for one session (``local`` is this player's input, None for a helper).
    Returns what this player writes: the opened pattern and the released values of passing groups.

    Every player runs the same steps in the same order (MPyC matches messages by a program
    counter): 1. share the inputs and compare each group with the cut, open the pattern; then, for
    passing groups only, 2. open the exact aggregates, 3. the NULL flags, 4. the quotients divided
    inside the MPC, 5. the extrema; finally compute the released columns in the clear."""
    if spec.dp is not None:
        return await run_dp(mpc, spec, local)
    shared = _share_inputs(mpc, spec, local)
    pattern = np.asarray(await mpc.output(shared.below)).reshape(-1)
    passing = np.flatnonzero(pattern == 0)
    out: dict[str, Any] = {"pattern": [int(x == 0) for x in pattern], "columns": {}}
    if len(passing) == 0:
        return out

    # Steps 2 to 5 see only the passing groups.
    lay = spec.layout
    sel = shared.matrix[:, passing] if shared.matrix is not None else None
    opened: dict[str, list[int]] = {}
    flags: dict[str, list[int]] = {}
    quotients: dict[str, list[float]] = {}
    extrema: dict[str, list[int]] = {}
    if sel is not None:
        opened = await _open_exact(mpc, spec, sel, len(passing))
        if lay.null_flags:
            flags = await _open_null_flags(mpc, spec, sel, len(passing))
    if shared.fxp is not None:
        quotients = await _open_quotients(mpc, spec, shared.fxp_rows, shared.fxp[:, passing], flags)
    if shared.extrema is not None:
        extrema = await _open_extrema(mpc, lay, shared.extrema, passing)
    out["columns"] = clear_columns(spec, len(passing), opened, flags, quotients, extrema)
    return out


async def run_dp(mpc: Any, spec: StageSpec, local: dict[str, Any] | None) -> dict[str, Any]:
    """A dp stage: share the noised vectors, add them over the holders, open them for every cell."""
    assert spec.dp is not None
    lay = spec.layout
    g = len(spec.domain)
    secint = mpc.SecInt(lay.int_bits)
    noised = list(lay.opened)
    total = _add_inputs(mpc, secint, _own(local, "values", noised), (len(noised), g), list(spec.input_players))
    got = np.asarray(await mpc.output(total)).reshape(len(noised), g)
    opened = {v: _ints(got[i]) for i, v in enumerate(noised)}
    counts = {v: opened[v] for v in noised if not v.startswith("s:")}
    return {"pattern": [1] * g, "columns": dp_columns(spec, opened), "noisy_counts": counts}


def dp_columns(spec: StageSpec, opened: dict[str, list[int]]) -> dict[str, list[Any]]:
    """A dp stage's released columns from the opened noisy vectors: COUNT as it is (may be
    negative), SUM in the measure's units, AVG = noisy sum / max(noisy count, 1) clamped to the
    measure's bounds."""
    cols: dict[str, list[Any]] = {}
    for a in spec.aggregates:
        if a.column is None:
            cols[a.name] = opened["rows"]
            continue
        ms = spec.measure(a.column)
        count = opened.get(spec.layout.count_of(a.column))
        if a.func == "count":
            assert count is not None
            cols[a.name] = count
        elif a.func == "sum":
            cols[a.name] = [s if ms.scale == 1 else s / ms.scale for s in opened[f"s:{a.column}"]]
        else:
            assert count is not None
            cols[a.name] = [
                min(max(s / max(n, 1) / ms.scale, ms.min), ms.max)
                for s, n in zip(opened[f"s:{a.column}"], count, strict=True)
            ]
    return cols


def _share_inputs(mpc: Any, spec: StageSpec, local: dict[str, Any] | None) -> _SharedInputs:
    """1. One input per vector kind from every holder, and one comparison per group of the summed
    capped counts with the cut (opened by :func:`run` as the pattern)."""
    lay: Layout = spec.layout
    g = len(spec.domain)
    senders = list(spec.input_players)
    secint = mpc.SecInt(lay.int_bits)
    seccmp = mpc.SecInt(max(lay.cmp_bits + 2, 16))
    capped = _add_inputs(mpc, seccmp, local["cap"] if local else None, (g,), senders)
    below = mpc.np_sgn(capped - lay.cut, l=lay.cmp_bits, LT=True)
    rows = lay.rows
    matrix = extrema = fxp = None
    if rows:
        matrix = _add_inputs(mpc, secint, _own(local, "values", rows), (len(rows), g), senders)
    if lay.extrema:
        ext_shape = (len(lay.extrema), g)
        extrema = mpc.input(_holder_array(secint, _own(local, "extrema", lay.extrema), ext_shape), senders)
    fxp_rows: list[str] = []
    if lay.divided:
        secfxp = mpc.SecFxp(lay.fxp_bits, lay.fxp_frac)
        fxp_rows = sorted({lay.count_of(c) for c in lay.divided} | {r for r in rows if r[2:] in lay.divided})
        fxp = _add_inputs(mpc, secfxp, _own(local, "values", fxp_rows), (len(fxp_rows), g), senders)
    return _SharedInputs(below, matrix, extrema, fxp_rows, fxp)


async def _open_exact(mpc: Any, spec: StageSpec, sel: Any, n_cells: int) -> dict[str, list[int]]:
    """2. One opening: the exact vectors the layout opens and, for each VAR/STDDEV measure whose
    count is opened, the integer ``n*q - s^2`` (divided in the clear by :func:`clear_columns`)."""
    lay = spec.layout
    rows = lay.rows
    want = [rows.index(r) for r in lay.opened]
    var_num = []
    for c in sorted({a.column for a in spec.aggregates if a.column and a.func.startswith(("var", "stddev"))}):
        if lay.count_of(c) in lay.opened:  # count public: open n*q - s^2 and divide in the clear
            n, s, q = (sel[rows.index(r)] for r in (lay.count_of(c), f"s:{c}", f"q:{c}"))
            var_num.append((c, n * q - s * s))
    parts = [sel[want]] if want else []
    parts += [v.reshape(1, n_cells) for _, v in var_num]
    opened: dict[str, list[int]] = {}
    if parts:
        both = _stack(mpc, parts)
        got = np.asarray(await mpc.output(both)).reshape(both.shape[0], n_cells)
        for i, r in enumerate(lay.opened):
            opened[r] = _ints(got[i])
        for j, (c, _) in enumerate(var_num):
            opened[f"d:{c}"] = _ints(got[len(want) + j])
    return opened


async def _open_null_flags(mpc: Any, spec: StageSpec, sel: Any, n_cells: int) -> dict[str, list[int]]:
    """3. One comparison batch and one opening: the NULL flags (public in the output) of the
    measures whose count is not opened: ``n == 0`` and, for a sample variance, ``n * (n - 1) == 0``."""
    lay = spec.layout
    tests = []
    for c in lay.null_flags:
        n = sel[lay.rows.index(lay.count_of(c))]
        tests.append(n)
        if _has_sample_variance(spec, c):
            tests.append(n * (n - 1))
    stacked = _stack(mpc, [t.reshape(1, -1) for t in tests])
    # Counts are below 2^count_bits (n*(n-1) below its square): a shorter test, same answer.
    eq = mpc.np_sgn(stacked, l=2 * lay.count_bits + 1, EQ=True)
    zero = np.asarray(await mpc.output(eq)).reshape(len(tests), n_cells)
    flags: dict[str, list[int]] = {}
    i = 0
    for c in lay.null_flags:
        flags[f"n:{c}"] = _ints(zero[i])
        i += 1
        if _has_sample_variance(spec, c):
            flags[f"n1:{c}"] = _ints(zero[i])
            i += 1
    return flags


async def _open_quotients(
    mpc: Any, spec: StageSpec, fxp_rows: list[str], fsel: Any, flags: dict[str, list[int]]
) -> dict[str, list[float]]:
    """4. Divisions inside the MPC (count not opened): one fixed-point division per cell and
    quotient, one opening. A group whose count is 0 (shown as NULL) divides by a public 1, never by 0."""
    lay = spec.layout

    def row(name: str) -> Any:
        return fsel[fxp_rows.index(name)]

    nums, dens, keys = [], [], []
    for c in lay.divided:
        n, s = row(lay.count_of(c)), row(f"s:{c}")
        zero_n = np.array(flags[f"n:{c}"], dtype=object)
        funcs = {a.func for a in spec.aggregates if a.column == c}
        if "avg" in funcs:
            nums.append(s)
            dens.append(n + zero_n)  # a public 1 where n == 0 (shown as NULL), never dividing by 0
            keys.append(f"avg:{c}")
        if funcs & _POPULATION_VARIANCE:
            q = row(f"q:{c}")
            nums.append(n * q - s * s)
            dens.append(n * n + zero_n)
            keys.append(f"var_pop:{c}")
        if funcs & _SAMPLE_VARIANCE:
            q = row(f"q:{c}")
            nums.append(n * q - s * s)
            dens.append(n * (n - 1) + np.array(flags[f"n1:{c}"], dtype=object))
            keys.append(f"var_samp:{c}")
    num = _stack(mpc, [x.reshape(1, -1) for x in nums])
    den = _stack(mpc, [x.reshape(1, -1) for x in dens])
    q = np.asarray(await mpc.output(num / den)).reshape(len(keys), fsel.shape[1])
    return {key: [float(v) for v in q[i]] for i, key in enumerate(keys)}


async def _open_extrema(mpc: Any, lay: Layout, extrema: Any, passing: Any) -> dict[str, list[int]]:
    """5. MIN/MAX: elementwise over the holders' vectors (neutral fill where a holder lacks the
    group), one opening."""
    per_kind = []
    for j, e in enumerate(lay.extrema):
        vs = [x[j, passing] for x in extrema]
        acc = vs[0]
        for v in vs[1:]:
            acc = mpc.np_minimum(acc, v) if e.startswith("min:") else mpc.np_maximum(acc, v)
        per_kind.append(acc.reshape(1, -1))
    both = _stack(mpc, per_kind)
    vals = np.asarray(await mpc.output(both)).reshape(len(lay.extrema), len(passing))
    return {e: _ints(vals[j]) for j, e in enumerate(lay.extrema)}


def _own(local: dict[str, Any] | None, kind: str, names: Sequence[str]) -> list[int] | None:
    """This player's vectors ``names`` of ``kind`` (``values`` or ``extrema``) as one flat list
    (None for a helper)."""
    return _flat([local[kind][n] for n in names]) if local else None


def _flat(values: list[list[Any]] | None) -> list[int] | None:
    if values is None:
        return None
    return [int(v) for row in values for v in row]


def _holder_array(stype: Any, values: list[Any] | None, shape: tuple[int, ...]) -> Any:
    if values is None:  # a placeholder of the right shape: a non-sender's array is never read
        return stype.array(np.zeros(shape, dtype=object))
    return stype.array(np.array(values, dtype=object).reshape(shape))


def _add_inputs(mpc: Any, stype: Any, values: list[Any] | None, shape: tuple[int, ...], senders: list[int]) -> Any:
    shared = mpc.input(_holder_array(stype, values, shape), senders)
    total = shared[0]
    for x in shared[1:]:
        total = total + x
    return total


def _stack(mpc: Any, parts: list[Any]) -> Any:
    """The row blocks ``parts`` as one secure matrix (one opening for all of them)."""
    return parts[0] if len(parts) == 1 else mpc.np_vstack(parts)


def _ints(a: Any) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _has_sample_variance(spec: StageSpec, column: str) -> bool:
    return any(a.column == column and a.func in _SAMPLE_VARIANCE for a in spec.aggregates)


def clear_columns(
    spec: StageSpec,
    n_cells: int,
    opened: dict[str, list[int]],
    flags: dict[str, list[int]],
    quotients: dict[str, list[float]],
    extrema: dict[str, list[int]],
) -> dict[str, list[Any]]:
    """The requested aggregates of the passing groups, from what was opened (the clear part)."""
    cols: dict[str, list[Any]] = {}
    for a in spec.aggregates:
        c = a.column
        if c is None:
            cols[a.name] = opened["rows"]
            continue
        scale = spec.measure(c).scale
        n_pub = opened.get(spec.layout.count_of(c))
        if n_pub is not None:
            null = [int(n == 0) for n in n_pub]
        else:
            null = flags.get(f"n:{c}", [0] * n_cells)
        col: list[Any] = []
        for i in range(n_cells):
            if a.func == "count":
                col.append(opened[spec.layout.count_of(c)][i])
                continue
            if null[i]:
                col.append(None)
                continue
            if a.func == "sum":
                s = opened[f"s:{c}"][i]
                col.append(s if scale == 1 else s / scale)
            elif a.func in ("min", "max"):
                v = extrema[f"{a.func}:{c}"][i]
                col.append(v if scale == 1 else v / scale)
            elif a.func == "avg":
                if n_pub is not None:
                    col.append(opened[f"s:{c}"][i] / n_pub[i] / scale)
                else:
                    col.append(quotients[f"avg:{c}"][i] / scale)
            else:
                samp = a.func.endswith("_samp")
                if n_pub is not None:
                    n = n_pub[i]
                    if samp and n < 2:
                        col.append(None)
                        continue
                    var = opened[f"d:{c}"][i] / (n * (n - 1) if samp else n * n) / (scale * scale)
                else:
                    if samp and flags[f"n1:{c}"][i]:
                        col.append(None)
                        continue
                    var = quotients[f"{'var_samp' if samp else 'var_pop'}:{c}"][i] / (scale * scale)
                var = max(var, 0.0)  # fixed-point rounding can dip just below 0 for a constant column
                col.append(math.sqrt(var) if a.func.startswith("stddev") else var)
        cols[a.name] = col
    return cols
