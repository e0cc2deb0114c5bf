"""From the owners' policies to an MPC stage's public parameters (for the planner).

The strictest rule wins: a measure's bounds are the intersection of every involved owner's
declared ``[min, max]`` (and are required: MPC sums without bounds could overflow silently), and
the minimum group size is the largest any owner asks for
(:func:`sealroom.planning.checks.strictest_min_group_size`). Whether a planned MPC stage applies
each owner's rules is :func:`sealroom.planning.checks.stage_rule_violation`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sealroom.errors import InvalidQueryError
from sealroom.planning.mpc_spec import Measure, bound_decimals
from sealroom.policy import ColumnRule


def measure_from_rules(
    column: str, rules: Iterable[tuple[str, ColumnRule]], *, decimals: int = 0, nullable: bool = True
) -> Measure:
    """The :class:`Measure` for ``column`` from ``(party.dataset, rule)`` pairs of every owner
    holding it. Raises InvalidQueryError naming the dataset whose policy declares no bounds, or
    whose bounds leave nothing in common."""
    lo: float | None = None
    hi: float | None = None
    for dataset, rule in rules:
        if rule.role != "open" and (rule.min is None or rule.max is None):
            raise InvalidQueryError(
                f"{dataset}.{column} has no declared bounds (min and max in its policy): an MPC stage needs them "
                "to choose bit lengths that cannot overflow; ask the owner to declare them",
                details={"dataset": dataset, "column": column, "rule": "bounds", "stage": "mpc"},
            )
        if rule.min is not None:
            lo = rule.min if lo is None else max(lo, rule.min)
        if rule.max is not None:
            hi = rule.max if hi is None else min(hi, rule.max)
    if lo is None or hi is None or lo > hi:
        raise InvalidQueryError(
            f"the owners' bounds for {column} leave no common range (or none is declared): an MPC stage needs one",
            details={"column": column, "rule": "bounds", "stage": "mpc"},
        )
    return Measure(column, lo, hi, decimals, nullable)


def representing_decimals(rules: Iterable[ColumnRule], decimals: int) -> int:
    """``decimals`` (from the column's type) raised to those of every declared bound in ``rules``
    (max = 2.5 on an integer column: 1), so that clamping in fixed point clamps to the declared
    bounds, not to bounds rounded to whole units (at most 12)."""
    for rule in rules:
        for bound in (rule.min, rule.max):
            if bound is not None and math.isfinite(bound):
                decimals = max(decimals, bound_decimals(bound))
    return decimals
