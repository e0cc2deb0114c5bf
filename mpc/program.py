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

No per-party value and no value of a suppressed group is ever opened. Everything is vectorised
(secure arrays): one input per player and vector kind, one comparison batch, one opening batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sealroom.planning.mpc_spec import Layout, StageSpec


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


def _ints(a: Any) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


async def run(mpc: Any, spec: StageSpec, local: dict[str, Any] | None) -> dict[str, Any]:
    """The secure program for one session (``local`` is this player's input, None for a helper).
    Returns what this player writes: the opened pattern and the released values of passing groups."""
    lay: Layout = spec.layout
    g = len(spec.domain)
    senders = list(spec.input_players)
    secint = mpc.SecInt(lay.int_bits)
    seccmp = mpc.SecInt(max(lay.cmp_bits + 2, 16))

    # 1. One comparison per group of the summed capped counts with the cut; open the pattern.
    capped = _add_inputs(mpc, seccmp, local["cap"] if local else None, (g,), senders)
    below = mpc.np_sgn(capped - lay.cut, l=lay.cmp_bits, LT=True)
    rows = lay.rows
    matrix = extrema = fxp_in = None
    if rows:
        values = [local["values"][r] for r in rows] if local else None
        matrix = _add_inputs(mpc, secint, _flat(values), (len(rows), g), senders)
    if lay.extrema:
        ext_local = [local["extrema"][e] for e in lay.extrema] if local else None
        ext_shape = (len(lay.extrema), g)
        shared = mpc.input(_holder_array(secint, _flat(ext_local), ext_shape), senders)
        extrema = shared
    if lay.divided:
        fxp = mpc.SecFxp(lay.fxp_bits, lay.fxp_frac)
        div_rows = sorted({lay.count_of(c) for c in lay.divided} | {r for r in rows if r[2:] in lay.divided})
        div_local = [local["values"][r] for r in div_rows] if local else None
        fxp_in = (div_rows, _add_inputs(mpc, fxp, _flat(div_local), (len(div_rows), g), senders))
    pattern = np.asarray(await mpc.output(below)).reshape(-1)
    passing = np.flatnonzero(pattern == 0)
    out: dict[str, Any] = {"pattern": [int(x == 0) for x in pattern], "columns": {}}
    if len(passing) == 0:
        return out

    # 2. Only passing groups from here on.
    opened: dict[str, list[int]] = {}
    sel = None
    if matrix is not None:
        sel = matrix[:, passing]
        want = [rows.index(r) for r in lay.opened]
        var_num = []
        for c in sorted({a.column for a in spec.aggregates if a.column and a.func.startswith(("var", "stddev"))}):
            if lay.count_of(c) in lay.opened:  # count public: open n*q - s^2 and divide in the clear
                n, s, q = (sel[rows.index(r)] for r in (lay.count_of(c), f"s:{c}", f"q:{c}"))
                var_num.append((c, n * q - s * s))
        parts = [sel[want]] if want else []
        parts += [v.reshape(1, len(passing)) for _, v in var_num]
        if parts:
            both = parts[0] if len(parts) == 1 else mpc.np_vstack(parts)
            got = np.asarray(await mpc.output(both)).reshape(both.shape[0], len(passing))
            for i, r in enumerate(lay.opened):
                opened[r] = _ints(got[i])
            for j, (c, _) in enumerate(var_num):
                opened[f"d:{c}"] = _ints(got[len(want) + j])

    # NULL flags (public in the output) for measures whose count is not opened.
    flags: dict[str, list[int]] = {}
    if lay.null_flags and sel is not None:
        tests = []
        for c in lay.null_flags:
            n = sel[rows.index(lay.count_of(c))]
            tests.append(n)
            if any(a.column == c and a.func in ("var_samp", "stddev_samp") for a in spec.aggregates):
                tests.append(n * (n - 1))
        stacked = tests[0].reshape(1, -1) if len(tests) == 1 else mpc.np_vstack([t.reshape(1, -1) for t in tests])
        # Counts are below 2^count_bits (n*(n-1) below its square): a shorter test, same answer.
        eq = mpc.np_sgn(stacked, l=2 * lay.count_bits + 1, EQ=True)
        zero = np.asarray(await mpc.output(eq)).reshape(len(tests), len(passing))
        i = 0
        for c in lay.null_flags:
            flags[f"n:{c}"] = _ints(zero[i])
            i += 1
            if any(a.column == c and a.func in ("var_samp", "stddev_samp") for a in spec.aggregates):
                flags[f"n1:{c}"] = _ints(zero[i])
                i += 1

    # Divisions inside the MPC (count not opened): one fixed-point division per cell and quotient.
    quotients: dict[str, list[float]] = {}
    if fxp_in is not None:
        div_rows, fx = fxp_in
        fsel = fx[:, passing]
        nums, dens, keys = [], [], []
        for c in lay.divided:
            n, s = fsel[div_rows.index(lay.count_of(c))], fsel[div_rows.index(f"s:{c}")]
            zero_n = np.array(flags[f"n:{c}"], dtype=object)
            funcs = {a.func for a in spec.aggregates if a.column == c}
            if "avg" in funcs:
                nums.append(s)
                dens.append(n + zero_n)  # a public 1 where n == 0 (shown as NULL), never dividing by 0
                keys.append(f"avg:{c}")
            if funcs & {"var_pop", "stddev_pop"}:
                q = fsel[div_rows.index(f"q:{c}")]
                nums.append(n * q - s * s)
                dens.append(n * n + zero_n)
                keys.append(f"var_pop:{c}")
            if funcs & {"var_samp", "stddev_samp"}:
                q = fsel[div_rows.index(f"q:{c}")]
                nums.append(n * q - s * s)
                dens.append(n * (n - 1) + np.array(flags[f"n1:{c}"], dtype=object))
                keys.append(f"var_samp:{c}")
        num = nums[0].reshape(1, -1) if len(nums) == 1 else mpc.np_vstack([x.reshape(1, -1) for x in nums])
        den = dens[0].reshape(1, -1) if len(dens) == 1 else mpc.np_vstack([x.reshape(1, -1) for x in dens])
        q = np.asarray(await mpc.output(num / den)).reshape(len(keys), len(passing))
        for i, key in enumerate(keys):
            quotients[key] = [float(v) for v in q[i]]

    # MIN/MAX: elementwise over the holders' vectors (neutral fill where a holder lacks the group).
    ext_open: dict[str, list[int]] = {}
    if extrema is not None:
        per_kind = []
        for j, e in enumerate(lay.extrema):
            vs = [x[j, passing] for x in extrema]
            acc = vs[0]
            for v in vs[1:]:
                acc = mpc.np_minimum(acc, v) if e.startswith("min:") else mpc.np_maximum(acc, v)
            per_kind.append(acc.reshape(1, -1))
        both = per_kind[0] if len(per_kind) == 1 else mpc.np_vstack(per_kind)
        vals = np.asarray(await mpc.output(both)).reshape(len(lay.extrema), len(passing))
        for j, e in enumerate(lay.extrema):
            ext_open[e] = _ints(vals[j])

    out["columns"] = _finish(spec, len(passing), opened, flags, quotients, ext_open)
    return out


def _flat(values: list[list[Any]] | None) -> list[Any] | None:
    if values is None:
        return None
    return [int(v) for row in values for v in row]


def _finish(
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
