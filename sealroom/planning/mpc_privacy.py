"""Differential privacy on MPC stages: the same guarantee as the enclave's, with distributed noise.

An MPC stage over datasets whose owners chose ``mode = "dp"`` releases every cell of its public
group domain with noise; nothing is compared with a threshold on exact counts (docs/mpc.md
"Differential privacy"). The mechanism is the enclave's (:func:`sealroom.planning.privacy.dp_mechanism`
over the stage's SQL and inputs, with the stage's domain as the public domain, so no partition
selection and no delta): the same measurements, epsilon split, contribution bounds and
sensitivities. What differs is who adds the noise and how:

- every input holder (an owner's player, the enclave's player on the hybrid path) bounds its own
  rows per privacy unit (at most ``max_rows_per_unit`` rows per (unit, group) and
  ``max_groups_per_unit`` groups per unit, chosen at random) before computing its partials;
- it adds a Pólya noise share to each noised vector before secret-sharing it: NB(r, p) - NB(r, p)
  with p = 1 - e^{-1/b} and r = 1 / (H - t), for H input holders of whom at most t may collude.
  The negative binomial is infinitely divisible: any H - t honest shares add up to
  NB(1, p) - NB(1, p), one full discrete Laplace of scale b, so the guarantee holds even if t holders
  drop (or subtract) their shares; all H shares add up to NB(H/(H-t), p) - NB(H/(H-t), p);
- b is the enclave's scale in the vector's units: counts as they are, sums in fixed-point units
  (the measurement's scale times 10^decimals; the clamp to the bounds is exact, see "Encoding");
- helpers (players without input) add nothing; the opened values are the noisy sums, AVG is the
  noisy sum over max(noisy count, 1), clamped to the measure's bounds.

:func:`distributed_ci95` gives the 95 % half-width of the released noise (all H shares), from the
exact probability mass function of the difference of two negative binomials (see its docstring).
Every checker derives :class:`sealroom.planning.mpc_spec.StageNoise` from the plan with
:func:`mpc_noise` and refuses a stage whose noise differs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from sealroom.canonical import canonical_json
from sealroom.errors import InvalidQueryError, PolicyRefusalError
from sealroom.planning.mpc_spec import StageNoise, StageSpec
from sealroom.planning.privacy import CONFIDENCE, DpMechanism, PlanPrivacy, charges, dp_mechanism, laplace_ci95

__all__ = ["distributed_ci95", "mpc_noise", "noise_mismatch"]

# Below this scale the quantile is computed from the exact pmf; above it, scaled from the one at
# this scale (the law of noise / b converges to a difference of two gammas; relative error ~1/b).
EXACT_SCALE = 2048.0


def mpc_noise(
    sql: str,
    inputs: Sequence[Any],
    privacy: PlanPrivacy,
    spec: StageSpec,
    *,
    analyst: str,
    plan_inputs: Sequence[Any],
) -> tuple[DpMechanism, StageNoise]:
    """The dp mechanism of an MPC stage running ``sql`` over ``inputs`` (the plan's MPC inputs, those
    feeding it through the enclave included) with domain, aggregates and layout of ``spec``, and the
    noise every input holder adds. ``analyst`` and ``plan_inputs`` (every input of the plan) give the
    charges the release carries. Deterministic: the planner, the agents and the enclave compute the
    same. Raises PolicyRefusalError for what dp mode does not release."""
    if privacy.delta != 0:
        raise InvalidQueryError(
            "plan is inconsistent: an MPC stage releases its public domain and spends no delta; re-plan the query",
            details={"rule": "privacy_mode"},
        )
    mech = dp_mechanism(sql, inputs, privacy, public_domain=spec.domain)
    holders = len(spec.input_players)
    honest = max(holders - spec.t, 1)
    scales, vector_of = _vector_scales(mech, spec)
    total_shape = holders / honest
    mechanisms = []
    for m in mech.measurements:
        vector = vector_of[m.key]
        unit = spec.measure(vector[2:]).scale if vector.startswith("s:") else 1
        b = scales[vector]
        mechanisms.append(
            {
                "key": m.key,
                "aggregate": m.func,
                "mechanism": "distributed_discrete_laplace",
                "sensitivity": m.sensitivity,
                "epsilon": m.epsilon,
                "scale": b / unit,
                "fixed_point_scale": b,
                "ci95_half_width": distributed_ci95(b, total_shape) / unit,
            }
        )
    released = {
        **mech.to_dict(),
        "mechanisms": mechanisms,
        "distributed_noise": {
            "holders": holders,
            "tolerated_dropouts": holders - honest,
            "share": f"NB(r, 1 - exp(-1/b)) - NB(r, 1 - exp(-1/b)), r = 1/{honest}",
            "total": f"NB({total_shape:g}, p) - NB({total_shape:g}, p)",
        },
        "charges": [c.to_dict() for c in charges(analyst, plan_inputs, privacy)],
    }
    noise = StageNoise(
        scales=tuple((v, scales[v]) for v in spec.layout.rows if v in scales),
        honest=honest,
        max_groups=mech.max_groups,
        max_rows=mech.max_rows,
        privacy=released,
    )
    return mech, noise


def _vector_scales(mech: DpMechanism, spec: StageSpec) -> tuple[dict[str, float], dict[str, str]]:
    """The discrete Laplace scale of each noised vector of ``spec``'s layout (in its units: fixed
    point for sums), and the vector of each measurement of ``mech``. Two measurements on one vector
    (COUNT(*) and COUNT(col) of a column without NULLs) noise it once, at the larger scale."""
    lay = spec.layout
    scales: dict[str, float] = {}
    vector_of: dict[str, str] = {}
    for a in spec.aggregates:
        out = mech.output(a.name)
        if a.func == "count":
            vectors = ["rows" if a.column is None else lay.count_of(a.column)]
        elif a.func == "sum":
            vectors = [f"s:{a.column}"]
        elif a.func == "avg" and a.column is not None:
            vectors = [f"s:{a.column}", lay.count_of(a.column)]
        else:
            raise PolicyRefusalError(
                f"{a.func.upper()} is not released in dp mode: use COUNT, SUM or AVG",
                details={"rule": "dp_aggregate", "output": a.name},
            )
        if out is None or len(out.measurements) != len(vectors) or out.func not in (a.func, "count"):
            raise InvalidQueryError(
                f"plan is inconsistent: the MPC stage's output {a.name} is not the query's", details={"rule": "dp"}
            )
        for vector, key in zip(vectors, out.measurements, strict=True):
            m = mech.measurement(key)
            if m.condition is not None:
                raise PolicyRefusalError(
                    "an MPC stage releases no conditional aggregate", details={"rule": "dp_aggregate"}
                )
            unit = spec.measure(vector[2:]).scale if vector.startswith("s:") else 1
            scales[vector] = max(scales.get(vector, 0.0), m.scale * unit)
            vector_of[key] = vector
    return scales, vector_of


def noise_mismatch(spec: StageSpec, expected: StageNoise) -> bool:
    """Whether ``spec`` carries other noise than ``expected`` (compared as canonical JSON)."""
    return spec.dp is None or canonical_json(spec.dp.to_dict()) != canonical_json(expected.to_dict())


def distributed_ci95(scale: float, shape: float) -> float:
    """Half-width t (an integer, in the vector's units) of the 95 % interval of the total noise
    NB(shape, p) - NB(shape, p), p = 1 - e^{-1/scale}: the smallest t with P(|noise| > t) <= 5 %.
    shape = 1 is the discrete Laplace (closed form, :func:`sealroom.planning.privacy.laplace_ci95`);
    otherwise the exact pmf (log-space recurrence, autocorrelation by FFT) for scales up to
    :data:`EXACT_SCALE`, and above it that quantile scaled by the ratio of the standard deviations
    (the law of noise / sd converges as the scale grows; relative error of order 1/scale)."""
    if scale <= 0:
        return 0.0
    if shape == 1:
        return laplace_ci95(scale, discrete=True)
    if scale <= EXACT_SCALE:
        return float(_nb_difference_quantile(float(scale), float(shape)))
    ref = _nb_difference_quantile(EXACT_SCALE, float(shape))
    return float(math.ceil(ref * _sd_unit(scale) / _sd_unit(EXACT_SCALE)))


def _sd_unit(scale: float) -> float:
    q = math.exp(-1.0 / scale)
    return math.sqrt(q) / -math.expm1(-1.0 / scale)


@functools.lru_cache(maxsize=256)
def _nb_difference_quantile(scale: float, shape: float) -> int:
    import numpy as np  # noqa: PLC0415 - only where a dp MPC stage is planned or released

    log_q = -1.0 / scale
    p = -math.expm1(log_q)
    q = math.exp(log_q)
    mean = shape * q / p
    sd = math.sqrt(shape * q) / p
    n = int(mean + 60 * sd + 64)
    k = np.arange(n - 1, dtype=float)
    steps = np.log(k + shape) - np.log(k + 1) + log_q
    log_pmf = shape * math.log(p) + np.concatenate(([0.0], np.cumsum(steps)))
    a = np.exp(log_pmf)
    size = 1 << (2 * n).bit_length()
    f = np.fft.rfft(a, size)
    corr = np.clip(np.fft.irfft(f * np.conj(f), size)[:n], 0.0, None)  # P(noise = y), y >= 0
    inside = corr[0] + 2 * np.cumsum(corr[1:])  # [t - 1]: P(|noise| <= t)
    if corr[0] >= CONFIDENCE:
        return 0
    return int(np.argmax(inside >= CONFIDENCE)) + 1
