"""Column rules: what an analyst may do with each column of a dataset (part of a dataset policy).

A rule is a role (join key, dimension, measure, filter only, forbidden, open), with the aggregates and
value bounds of a measure and the public group domain of a dimension. What each role allows in a
query is decided in one place, :data:`sealroom.planning.disclosure.ALLOWED_USES`; this module only
models and validates the rules an owner writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealroom.config import check_keys, key_error

# Column roles. What each allows is decided in one place: sealroom.planning.disclosure.ALLOWED_USES.
ROLES = ("join_key", "dimension", "measure", "filter_only", "forbidden", "open")
MEASURE_AGGREGATES = ("count", "count_distinct", "sum", "avg", "min", "max", "var", "stddev")
DEFAULT_MEASURE_AGGREGATES = ("count", "sum", "avg", "var", "stddev")


def is_finite_number(v: Any) -> bool:
    """An int or a finite float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ColumnRule:
    """What an analyst may do with one column.

    - ``join_key``: may be joined on (and counted); never output, grouped by or filtered on.
    - ``dimension``: may be grouped by, output as a group key, filtered on, and counted.
    - ``measure``: may be aggregated with ``aggregates`` only; the enclave clamps its values to
      ``[min, max]`` before aggregating when bounds are declared.
    - ``filter_only``: may appear in WHERE only.
    - ``forbidden``: may not appear in a query at all.
    - ``open``: no restriction (the permissive default of ``sealroom local``).

    A ``dimension`` (or ``open``) column may declare its public *domain*, which MPC stages group
    over (so the groups a party holds are never revealed by which keys it contributes): either
    ``values`` (the enumerated group keys: strings or integers) or ``bins`` (ascending numeric
    edges ``[e0, e1, ...]``: an MPC stage grouping by the column groups it into ``[e0, e1), [e1,
    e2), ...``). Both are keys of the policy's JSON only when declared, so a policy without them
    reads and hashes as before.
    """

    role: str
    aggregates: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    values: tuple[str | int, ...] | None = None
    bins: tuple[float, ...] | None = None

    @property
    def domain(self) -> tuple[str, tuple[Any, ...]] | None:
        """``("values", keys)`` or ``("bins", edges)``, or None when the column declares no domain."""
        if self.values is not None:
            return ("values", self.values)
        if self.bins is not None:
            return ("bins", self.bins)
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role}
        if self.role == "measure":
            out["aggregates"] = list(self.aggregates)
            out["min"] = self.min
            out["max"] = self.max
        if self.values is not None:
            out["values"] = list(self.values)
        if self.bins is not None:
            out["bins"] = list(self.bins)
        return out

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> ColumnRule:
        if isinstance(doc, str):
            doc = {"role": doc}
        if not isinstance(doc, Mapping):
            raise key_error(source, prefix.rstrip("."), 'a role name or a table such as { role = "dimension" }')
        check_keys(doc, {"role", "aggregates", "min", "max", "values", "bins"}, source=source, prefix=prefix)
        role = doc.get("role")
        if role not in ROLES:
            raise key_error(source, f"{prefix}role", f"one of {', '.join(ROLES)}")
        if role not in ("dimension", "open"):
            for key in ("values", "bins"):
                if key in doc:
                    raise key_error(
                        source, f"{prefix}{key}", f"left out: only a dimension declares {key} (its group domain)"
                    )
        if role != "measure":
            for key in ("aggregates", "min", "max"):
                if key in doc:
                    raise key_error(source, f"{prefix}{key}", f"left out: only a measure has {key}")
            values, bins = _domain(doc, source=source, prefix=prefix)
            return cls(role, values=values, bins=bins)
        aggs = doc.get("aggregates", list(DEFAULT_MEASURE_AGGREGATES))
        if not isinstance(aggs, list) or not aggs or any(a not in MEASURE_AGGREGATES for a in aggs):
            raise key_error(
                source, f"{prefix}aggregates", f"a non-empty list drawn from {', '.join(MEASURE_AGGREGATES)}"
            )
        lo, hi = doc.get("min"), doc.get("max")
        for key, v in (("min", lo), ("max", hi)):
            if v is not None and not is_finite_number(v):
                raise key_error(source, f"{prefix}{key}", "a number")
        if lo is not None and hi is not None and lo > hi:
            raise key_error(source, f"{prefix}min", f"at most {prefix}max")
        return cls(
            "measure",
            tuple(sorted(set(aggs), key=MEASURE_AGGREGATES.index)),
            float(lo) if lo is not None else None,
            float(hi) if hi is not None else None,
        )


# The most group keys one column may declare (an MPC stage's domain is the product over its columns).
MAX_DOMAIN_VALUES = 10_000


def _domain(
    doc: Mapping[str, Any], *, source: str, prefix: str
) -> tuple[tuple[Any, ...] | None, tuple[float, ...] | None]:
    """``values`` or ``bins`` of a dimension: validated, at most one of them."""
    values, bins = doc.get("values"), doc.get("bins")
    if values is not None and bins is not None:
        raise key_error(
            source, f"{prefix}bins", "left out when values is declared: a domain is values or bins, not both"
        )
    out_values: tuple[Any, ...] | None = None
    out_bins: tuple[float, ...] | None = None
    if values is not None:
        if (
            not isinstance(values, list)
            or not 0 < len(values) <= MAX_DOMAIN_VALUES
            or not all((isinstance(v, str | int) and not isinstance(v, bool)) for v in values)
            or len({(type(v), v) for v in values}) != len(values)
        ):
            raise key_error(
                source,
                f"{prefix}values",
                f"a non-empty list of distinct strings or integers (at most {MAX_DOMAIN_VALUES}): the group keys",
            )
        out_values = tuple(values)
    if bins is not None:
        if (
            not isinstance(bins, list)
            or not 2 <= len(bins) <= MAX_DOMAIN_VALUES + 1
            or not all(is_finite_number(b) for b in bins)
            or any(a >= b for a, b in zip(bins, bins[1:], strict=False))
        ):
            raise key_error(
                source, f"{prefix}bins", "a list of at least two strictly ascending numbers (the bin edges)"
            )
        out_bins = tuple(int(b) if float(b).is_integer() else float(b) for b in bins)
    return out_values, out_bins
