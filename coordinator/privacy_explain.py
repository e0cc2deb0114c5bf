"""The analyst's side of output privacy in planning: the epsilon a query asks for, and what
``explain`` says about privacy before anything runs.

- :func:`check_epsilon`: an epsilon is a finite number > 0 (None: the default,
  :data:`sealroom.planning.privacy.DEFAULT_QUERY_EPSILON` capped at the strictest owner's
  ``max_query_epsilon``); :func:`refuse_epsilon_without_dp`: a query that reads no dp dataset does
  not take one (the analyst would believe the answer noised and budgeted when it is exact).
- :func:`dp_stage_lines`: per output column of a dp stage, the mechanism, the epsilon of its
  measurement, the sensitivity and the expected 95 % error; the contribution bounds and how the
  groups are chosen (public domain or partition selection with its threshold).
- :func:`privacy_lines`: what the plan spends of each dp dataset's budget (one line per dataset,
  where each owner's remaining budget is added), or, for a threshold plan, the one thing threshold
  mode does not protect against.

Everything is derived from the plan (:func:`sealroom.planning.privacy.dp_mechanism`, which the
agents and the enclave also compute), never from data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sealroom.errors import InvalidQueryError
from sealroom.planning.plan import Plan
from sealroom.planning.privacy import DpMechanism, Measurement, charges

__all__ = [
    "THRESHOLD_NOTE",
    "check_epsilon",
    "dp_stage_lines",
    "privacy_lines",
    "refuse_epsilon_without_dp",
]

THRESHOLD_NOTE = (
    "Privacy: threshold mode (exact answers, each cell checked on its own). It does not stop differencing "
    "across queries: answers to several queries can be combined to single out a unit; owners who need that "
    "protection choose dp mode (docs/privacy.md)."
)
_MECHANISM = {True: "discrete Laplace", False: "Laplace"}


def check_epsilon(epsilon: Any) -> None:
    """Refuse an epsilon that is not a finite number > 0 (rule ``epsilon``); None is the default."""
    if epsilon is None:
        return
    ok = isinstance(epsilon, int | float) and not isinstance(epsilon, bool) and math.isfinite(epsilon)
    if not ok or not epsilon > 0:
        raise InvalidQueryError(
            f"epsilon must be a number greater than 0, such as 0.5 (got {epsilon!r})",
            details={"rule": "epsilon", "suggestion": "--epsilon 0.5, or leave it out for the default"},
        )


def refuse_epsilon_without_dp(entries: Sequence[Any]) -> None:
    """A query over threshold datasets only (``entries``: anything with ``qualified``) was given an
    epsilon: refuse it (rule ``epsilon``), naming the datasets."""
    names = ", ".join(sorted({e.qualified for e in entries}))
    raise InvalidQueryError(
        f"no dataset of this query is in dp mode ({names} release exact answers under thresholds), so an "
        "epsilon buys nothing: leave --epsilon (epsilon=) out",
        details={"rule": "epsilon", "datasets": names, "suggestion": "leave --epsilon out"},
    )


def _scope_text(scope: str) -> str:
    return f"the budget of analyst {scope.split(':', 1)[1]}" if scope.startswith("analyst:") else "the shared budget"


def privacy_lines(plan: Plan, budget: Mapping[str, str] | None = None) -> list[str]:
    """The plan's privacy in words. For a dp plan: the epsilon and delta it spends, then one line
    per dp dataset with the scope charged; ``budget`` (party.dataset -> text, e.g. what is left of
    that owner's budget) is appended to the dataset's line. For a threshold plan: :data:`THRESHOLD_NOTE`."""
    if plan.privacy is None:
        return [THRESHOLD_NOTE]
    p = plan.privacy
    lines = [
        f"Privacy: differential privacy; this query spends epsilon {p.epsilon:g} and delta {p.delta:g} of each "
        "dp dataset's budget (its owner's agent refuses a query its budget cannot pay):"
    ]
    for charge in charges(plan.analyst, plan.inputs(), p):
        left = (budget or {}).get(charge.dataset)
        lines.append(
            f"  {charge.dataset}: epsilon {charge.epsilon:g}, delta {charge.delta:g} from {_scope_text(charge.scope)}"
            + (f"; {left}" if left else "")
        )
    return lines


def _aggregate_text(m: Measurement) -> str:
    arg = m.argument or "*"
    text = {"count": f"COUNT({arg})", "count_distinct": f"COUNT(DISTINCT {arg})", "sum": f"SUM({arg})"}[m.func]
    if m.func == "sum":
        text += f" clamped to [{m.lo:g}, {m.hi:g}]"
    return text + (f" where {m.condition}" if m.condition else "")


def _noise_text(m: Measurement) -> str:
    return (
        f"{_MECHANISM[m.discrete]} noise, epsilon {m.epsilon:.4g}, sensitivity {m.sensitivity:g}, scale {m.scale:.4g}"
    )


def dp_stage_lines(mech: DpMechanism, columns: Sequence[str]) -> list[str]:
    """Explain lines for a TEE stage released under dp, for its output ``columns`` in order."""
    lines = ["  outputs, their noise and the expected 95 % error (about 95 % of released values are that close):"]
    for name in columns:
        out = mech.output(name)
        if out is None:
            how = "public domain" if mech.domain is not None else "partition selection"
            lines.append(f"    {name}: group key ({how})")
            continue
        if out.func == "avg":
            s, c = (mech.measurement(k) for k in out.measurements)
            lines.append(
                f"    {name}: AVG = noisy {_aggregate_text(s)} / noisy {_aggregate_text(c)}, clamped to "
                f"[{out.lo:g}, {out.hi:g}]; sum: {_noise_text(s)}; count: {_noise_text(c)}; "
                f"expected error {mech.expected_error(name)}"
            )
            continue
        m = mech.measurement(out.measurements[0])
        error = mech.expected_error(name)
        lines.append(f"    {name}: {_aggregate_text(m)} with {_noise_text(m)}; expected error {error}")
    if any(m.discrete for m in mech.measurements):
        lines.append("  noisy counts are unbiased and may come out negative or zero")
    n = len(mech.measurements) + (1 if mech.selection is not None else 0)
    lines.append(
        f"  epsilon {mech.epsilon:g} split equally among {n} measurement{'s' if n != 1 else ''} (basic composition)"
    )
    bounds = "; ".join(
        f"{b.dataset}: at most {b.max_groups} groups and {b.max_rows} rows per group for each {b.unit}"
        for b in mech.bounds
    )
    lines.append(f"  contribution bounds (the enclave drops the rest of a unit's rows before aggregating): {bounds}")
    if not mech.group_columns:
        lines.append("  groups: one cell (no GROUP BY), always released with noise")
    elif mech.selection is None:
        assert mech.domain is not None
        lines.append(
            f"  groups: the public domain the owners declared: all {len(mech.domain):,} groups are released, "
            "empty ones too (with noise)"
        )
    else:
        sel = mech.selection
        lines.append(
            f"  groups: no public domain, so partition selection: a group is released only when its noisy count of "
            f"bounded rows reaches {sel.threshold} (Laplace scale {sel.scale:.4g}, epsilon {sel.epsilon:.4g}, "
            f"delta {sel.delta:g}); groups below it are dropped and never listed"
        )
    return lines
