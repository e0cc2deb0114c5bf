"""Owners' column rules applied to a query: what each role allows, and refusals that explain
themselves.

The coordinator's planner calls :func:`check_uses` before anything runs, and the enclave calls it
again on the SQL it compiled itself, with the policies carried in the signed plan (it does not
trust the planner). A refusal is a :class:`PolicyRefusalError` (PERMISSION_DENIED) whose message
and details name the party, the dataset, the column, the rule, and the smallest change that would
make the query acceptable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sealroom.errors import PolicyRefusalError
from sealroom.policy import DatasetPolicy

COUNTS = frozenset({"aggregate:count", "aggregate:count_distinct"})
# Uses: see sealroom.planning.resolve.column_uses. Inside an aggregate, "aggregate_filter" (the
# column selects or compares rows: a CASE/IF condition, FILTER (WHERE ...), NULLIF, GREATEST, %...)
# and "aggregate_combined" (combined with another joined dataset's columns where that could weight
# single rows) are allowed only where the column could be grouped by anyway: a filter-only column
# restricts the rows of WHERE and nothing else, so it never reaches an aggregate's value.
ALLOWED_USES: dict[str, frozenset[str] | None] = {
    "open": None,  # anything
    "join_key": frozenset({"join"}) | COUNTS,
    "dimension": frozenset({"group", "filter", "aggregate_filter", "aggregate_combined"}) | COUNTS,
    "filter_only": frozenset({"filter"}),
    "forbidden": frozenset(),
    # "measure": the aggregates its rule lists (see _allowed)
}
ROLE_TEXT = {
    "join_key": "a join key",
    "dimension": "a dimension",
    "measure": "a measure",
    "filter_only": "a filter-only column",
    "forbidden": "forbidden",
    "open": "open",
}
_VERB = {
    "join": "joined on",
    "filter": "used in WHERE",
    "group": "grouped by or output",
    "aggregate_filter": "used to select or compare rows inside an aggregate (a CASE/IF condition, FILTER (WHERE "
    "...), or a function such as NULLIF, GREATEST/LEAST, %, //, /, round or a cast)",
    "aggregate_combined": "combined with another dataset's columns inside one aggregate (a product, or "
    "MIN/MAX/VAR/STDDEV of a sum across datasets)",
}


def _allowed(policy: DatasetPolicy, column: str) -> frozenset[str] | None:
    rule = policy.rule(column)
    if rule.role == "measure":
        return frozenset(f"aggregate:{a}" for a in rule.aggregates)
    return ALLOWED_USES[rule.role]


def _verb(use: str) -> str:
    if use.startswith("aggregate:"):
        return f"aggregated with {use.split(':', 1)[1].upper().replace('_', ' ')}"
    return _VERB[use]


def _suggestion(
    party: str, dataset: str, column: str, role: str, use: str, policy: DatasetPolicy, names: Sequence[str]
) -> str:
    dims = policy.columns_with_role("dimension", list(names)) + policy.columns_with_role("open", list(names))
    keys = policy.columns_with_role("join_key", list(names)) + policy.columns_with_role("open", list(names))
    ask = f"or ask {party} to make {column} a"
    if role == "forbidden":
        return f"remove {column} from the query: {party} does not share it"
    if use == "group":
        if column == policy.privacy_unit:
            hint = f"group by a dimension such as {dims[0]}" if dims else "group by a dimension"
            return f"{hint}: {column} is the privacy unit of {party}.{dataset}, which is never grouped by"
        if role == "measure":
            aggs = ", ".join(a.upper() for a in policy.rule(column).aggregates)
            return f"aggregate {column} ({aggs}) instead, {ask} dimension"
        hint = f"group by a dimension such as {dims[0]}" if dims else "group by a dimension"
        return f"{hint}, {ask} dimension"
    if use == "join":
        hint = f"join on a join key such as {keys[0]}" if keys else "join on a join key"
        return f"{hint}, {ask} join key"
    if use == "filter":
        return f"remove the condition on {column}, {ask} dimension or filter-only column"
    if use == "aggregate_filter":
        if role == "filter_only":
            return (
                f"move the condition on {column} out of the aggregate into WHERE (a filter-only column may restrict "
                f"the rows a query reads, never select rows inside an aggregate), {ask} dimension"
            )
        if role == "measure":
            aggs = ", ".join(a.upper() for a in policy.rule(column).aggregates)
            return (
                f"aggregate {column} itself ({aggs} of the plain column, or of CASE WHEN <condition on dimensions> "
                f"THEN {column} END) without comparing its values inside the aggregate, {ask} dimension"
            )
        return (
            f"use {column} inside an aggregate only as COUNT({column}) or COUNT(DISTINCT {column}), without a "
            f"condition or function on it, {ask} dimension"
        )
    if use == "aggregate_combined":
        return (
            f"aggregate {column} on its own and combine the results outside the aggregates (e.g. SUM(a.x) + "
            f"SUM(b.y), not SUM(a.x * b.y) or MAX(a.x + b.y)): another party's column in the same aggregate could "
            f"weight or offset single rows of {party}.{dataset}"
        )
    agg = use.split(":", 1)[1].upper().replace("_", " ")
    if role == "measure":
        aggs = ", ".join(a.upper() for a in policy.rule(column).aggregates)
        return f"use one of {aggs} on {column}, or ask {party} to allow {agg} on it"
    if role in ("join_key", "dimension"):
        return f"use COUNT or COUNT(DISTINCT) on {column}, {ask} measure"
    return f"use {column} only in WHERE, {ask} measure"


def check_uses(
    uses: Mapping[str, Mapping[str, frozenset[str]]],
    policies: Mapping[str, DatasetPolicy],
    schemas: Mapping[str, Sequence[str]],
) -> None:
    """Raise PolicyRefusalError at the first column use an owner's policy does not allow."""
    for qualified in sorted(uses):
        party, dataset = qualified.split(".", 1)
        policy = policies[qualified]
        for column in sorted(uses[qualified]):
            allowed = _allowed(policy, column)
            if allowed is None:
                continue
            for use in sorted(uses[qualified][column]):
                if use in allowed:
                    continue
                role = policy.rule(column).role
                suggestion = _suggestion(party, dataset, column, role, use, policy, schemas[qualified])
                raise PolicyRefusalError(
                    f"{qualified}.{column} is {ROLE_TEXT[role]} and cannot be {_verb(use)}: {suggestion}",
                    details={
                        "party": party,
                        "dataset": dataset,
                        "column": column,
                        "rule": "column_role",
                        "role": role,
                        "use": use,
                        "suggestion": suggestion,
                    },
                )
