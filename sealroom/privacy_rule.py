"""A dataset's output-privacy guarantee, chosen by its owner: the ``[privacy]`` table of its policy.

Two modes (docs/privacy.md):

- ``threshold`` (the default, and what a policy without ``[privacy]`` gets): exact aggregates under
  the minimum group size and dominance rules; no single query isolates a unit, but differencing
  *across* queries is not stopped;
- ``dp``: every release is (epsilon, delta)-differentially private for the dataset's privacy units,
  under contribution bounds the enclave enforces, and charged to a budget the owner's own agent
  keeps (``epsilon_budget`` per ``scope``, optionally refreshed over a rolling window).

This module only models and validates what an owner writes; how a query spends it is
:mod:`sealroom.planning.privacy`, who keeps the budget is the owner's agent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealroom.config import check_keys, key_error

PRIVACY_MODES = ("threshold", "dp")
BUDGET_SCOPES = ("analyst", "collaboration")
DEFAULT_DELTA = 1e-7
MAX_DELTA = 1e-3
DEFAULT_MAX_QUERY_EPSILON = 1.0
DEFAULT_MAX_GROUPS_PER_UNIT = 4
DEFAULT_MAX_ROWS_PER_UNIT = 10
# Contribution bounds above these make noise so large that no release is useful; refuse them early.
MAX_GROUPS_PER_UNIT = 1000
MAX_ROWS_PER_UNIT = 100_000

_KEYS = {
    "mode", "epsilon_budget", "scope", "refresh", "delta", "max_query_epsilon",
    "max_groups_per_unit", "max_rows_per_unit",
}  # fmt: skip
_DURATION = re.compile(r"^P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def duration_seconds(text: str) -> int | None:
    """Seconds of an ISO-8601 duration in weeks, days, hours, minutes and seconds (``P30D``,
    ``PT12H``, ``P1W``), or None when ``text`` is not one (years and months have no fixed length,
    so they are not accepted: write ``P365D``)."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None or text in ("P", "PT") or text.endswith("T"):
        return None
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    total = (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + seconds
    return total if total > 0 else None


@dataclass(frozen=True)
class PrivacyRule:
    """The ``[privacy]`` table of a dataset policy (see the module docstring; the keys and their
    defaults are documented in docs/privacy.md)."""

    mode: str = "threshold"
    epsilon_budget: float | None = None
    scope: str = "analyst"
    refresh: str = "never"
    delta: float = DEFAULT_DELTA
    max_query_epsilon: float = DEFAULT_MAX_QUERY_EPSILON
    max_groups_per_unit: int = DEFAULT_MAX_GROUPS_PER_UNIT
    max_rows_per_unit: int = DEFAULT_MAX_ROWS_PER_UNIT

    @property
    def is_dp(self) -> bool:
        return self.mode == "dp"

    @property
    def refresh_seconds(self) -> int | None:
        """The rolling window a budget covers, in seconds; None: the budget never refreshes."""
        return None if self.refresh == "never" else duration_seconds(self.refresh)

    def scope_key(self, analyst: str) -> str:
        """Whose budget a query of ``analyst`` spends: ``analyst:<name>`` or ``collaboration``."""
        return f"analyst:{analyst}" if self.scope == "analyst" else "collaboration"

    def to_dict(self) -> dict[str, Any]:
        if not self.is_dp:
            return {"mode": self.mode}
        return {
            "mode": self.mode,
            "epsilon_budget": self.epsilon_budget,
            "scope": self.scope,
            "refresh": self.refresh,
            "delta": self.delta,
            "max_query_epsilon": self.max_query_epsilon,
            "max_groups_per_unit": self.max_groups_per_unit,
            "max_rows_per_unit": self.max_rows_per_unit,
        }

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> PrivacyRule:
        """``[privacy]`` (``prefix`` ends with ``privacy.``), validated key by key; ConfigError names
        the file, the key and what is expected."""
        if not isinstance(doc, Mapping):
            raise key_error(source, prefix.rstrip("."), 'a table ([privacy] mode = "dp" ...)')
        check_keys(doc, _KEYS, source=source, prefix=prefix)
        mode = doc.get("mode", "threshold")
        if mode not in PRIVACY_MODES:
            raise key_error(source, f"{prefix}mode", f"one of {', '.join(PRIVACY_MODES)}")
        if mode == "threshold":
            extra = sorted(set(doc) - {"mode"})
            if extra:
                raise key_error(
                    source, f"{prefix}{extra[0]}", 'left out in threshold mode (it applies to mode = "dp" only)'
                )
            return cls()
        budget = doc.get("epsilon_budget")
        if not _positive(budget) or budget is None:
            raise key_error(
                source, f"{prefix}epsilon_budget", "a positive number (the total epsilon this dataset may spend)"
            )
        scope = doc.get("scope", "analyst")
        if scope not in BUDGET_SCOPES:
            raise key_error(source, f"{prefix}scope", f"one of {', '.join(BUDGET_SCOPES)}")
        refresh = doc.get("refresh", "never")
        if refresh != "never" and (not isinstance(refresh, str) or duration_seconds(refresh) is None):
            raise key_error(
                source, f"{prefix}refresh", '"never" or an ISO-8601 duration in weeks, days or hours, e.g. "P30D"'
            )
        delta = doc.get("delta", DEFAULT_DELTA)
        if not _positive(delta) or delta > MAX_DELTA:
            raise key_error(source, f"{prefix}delta", f"a number in (0, {MAX_DELTA:g}], e.g. 1e-7")
        cap = doc.get("max_query_epsilon", min(DEFAULT_MAX_QUERY_EPSILON, float(budget)))
        if not _positive(cap) or cap > budget:
            raise key_error(source, f"{prefix}max_query_epsilon", "a positive number, at most epsilon_budget")
        groups = doc.get("max_groups_per_unit", DEFAULT_MAX_GROUPS_PER_UNIT)
        if not _count(groups, MAX_GROUPS_PER_UNIT):
            raise key_error(source, f"{prefix}max_groups_per_unit", f"an integer in [1, {MAX_GROUPS_PER_UNIT}]")
        rows = doc.get("max_rows_per_unit", DEFAULT_MAX_ROWS_PER_UNIT)
        if not _count(rows, MAX_ROWS_PER_UNIT):
            raise key_error(source, f"{prefix}max_rows_per_unit", f"an integer in [1, {MAX_ROWS_PER_UNIT}]")
        return cls(
            mode="dp",
            epsilon_budget=float(budget),  # checked above: a positive number
            scope=str(scope),
            refresh=str(refresh),
            delta=float(delta),
            max_query_epsilon=float(cap),
            max_groups_per_unit=int(groups),
            max_rows_per_unit=int(rows),
        )


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _count(v: Any, most: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most
