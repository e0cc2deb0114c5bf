"""Data owners' dataset policies (and, re-exported here, the trust policies of their agents).

A dataset policy is what its owner publishes (its digest is registered and bound into every plan);
a trust policy is what the owner's agent accepts as an enclave, and stays local. Both are frozen
dataclasses built from TOML tables and validated into a :class:`~sealroom.errors.ConfigError` that
names the file, the key, and what is expected. The parts live beside this module: column rules in
:mod:`sealroom.policy_roles`, the record of processing in :mod:`sealroom.processing`, enclave trust
(the dataset's and the agent's) in :mod:`sealroom.trust`.

Security model: the policy digest is part of the plan hash each owner signs, and the enclave
compiles the disclosure rules from the plan itself, so a coordinator that drops or weakens a rule
changes the hash and loses the owner's approval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealroom.canonical import canonical_json
from sealroom.config import check_keys, key_error, load_toml, toml_key, toml_value
from sealroom.defaults import DEFAULT_MIN_GROUP_SIZE
from sealroom.policy_roles import (
    DEFAULT_MEASURE_AGGREGATES,
    MAX_DOMAIN_VALUES,
    MEASURE_AGGREGATES,
    ROLES,
    ColumnRule,
)
from sealroom.privacy_rule import PrivacyRule
from sealroom.processing import (
    LEGAL_BASES,
    MAX_PROCESSING_TEXT,
    SPECIAL_CATEGORIES,
    SPECIAL_CATEGORY_CONDITIONS,
    ProcessingRecord,
    is_purpose,
)
from sealroom.trust import DatasetTrust, TrustPolicy

__all__ = [
    "APPROVAL_MODES",
    "DEFAULT_MEASURE_AGGREGATES",
    "DEFAULT_MIN_GROUP_SIZE",
    "LEGAL_BASES",
    "MAX_DOMAIN_VALUES",
    "MAX_PROCESSING_TEXT",
    "MEASURE_AGGREGATES",
    "ROLES",
    "SPECIAL_CATEGORIES",
    "SPECIAL_CATEGORY_CONDITIONS",
    "ColumnRule",
    "DatasetPolicy",
    "DatasetTrust",
    "Dominance",
    "PrivacyRule",
    "ProcessingRecord",
    "TrustPolicy",
    "is_purpose",
    "load_policy_file",
]

APPROVAL_MODES = ("auto", "manual")


@dataclass(frozen=True)
class Dominance:
    """(n, k) dominance: a SUM cell is suppressed when its n largest units contribute >= k % of it."""

    n: int
    k: float

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k}

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> Dominance:
        """``dominance = { n = 2, k = 80 }`` (``prefix`` ends with ``dominance.``)."""
        if not isinstance(doc, Mapping):
            raise key_error(source, prefix.rstrip("."), "a table { n = 2, k = 80 }")
        check_keys(doc, {"n", "k"}, source=source, prefix=prefix)
        n, kk = doc.get("n"), doc.get("k")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise key_error(source, f"{prefix}n", "an integer >= 1 (the number of largest units)")
        if not isinstance(kk, int | float) or isinstance(kk, bool) or not 0 < kk <= 100:
            raise key_error(source, f"{prefix}k", "a percentage in (0, 100]")
        return cls(n, float(kk))


@dataclass(frozen=True)
class DatasetPolicy:
    """Disclosure rules for one dataset (one TOML file per dataset; see docs/configuration.md)."""

    privacy_unit: str | None = None
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    analysts: tuple[str, ...] = ("*",)
    approval: str = "auto"
    columns: Mapping[str, ColumnRule] = field(default_factory=dict)
    default_role: str = "open"
    dominance: Dominance | None = None
    trust: DatasetTrust = field(default_factory=DatasetTrust)
    share_row_count: bool = False  # let explain show the dataset's row count, rounded
    processing: ProcessingRecord | None = None  # the record of processing ([processing]; GDPR Art. 30)
    # The parties ("bank_b") and datasets ("bank_c.loans") of other owners whose rows this dataset's
    # rows may meet in one query (joined, unioned, or computed over together in MPC); None: any, ():
    # none. The owner's own datasets always may (see allows_combination).
    combine_with: tuple[str, ...] | None = None
    # The owner's output-privacy guarantee ([privacy]; sealroom.privacy_rule): None when the policy has
    # no [privacy] table, which is threshold mode (and keeps the policy's digest as it was).
    privacy: PrivacyRule | None = None

    @property
    def dp(self) -> PrivacyRule | None:
        """The dataset's dp rule when its owner chose ``mode = "dp"``, else None (threshold mode)."""
        return self.privacy if self.privacy is not None and self.privacy.is_dp else None

    def __hash__(self) -> int:
        return hash(self.digest())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "privacy_unit": self.privacy_unit,
            "min_group_size": self.min_group_size,
            "analysts": list(self.analysts),
            "approval": self.approval,
            "columns": {name: rule.to_dict() for name, rule in sorted(self.columns.items())},
            "default_role": self.default_role,
            "dominance": self.dominance.to_dict() if self.dominance else None,
            **({"trust": self.trust.to_dict()} if self.trust != DatasetTrust() else {}),
            **({"share_row_count": True} if self.share_row_count else {}),
            **({"processing": self.processing.to_dict()} if self.processing is not None else {}),
            # Only when set, so a policy without it keeps its digest (and stored receipts verify).
            **({"combine_with": list(self.combine_with)} if self.combine_with is not None else {}),
            **({"privacy": self.privacy.to_dict()} if self.privacy is not None else {}),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def allows_analyst(self, analyst: str) -> bool:
        return "*" in self.analysts or analyst in self.analysts

    def allows_combination(self, party: str, other_party: str, other_dataset: str) -> bool:
        """Whether rows of this policy's dataset, owned by ``party``, may meet in one query those of
        ``other_party.other_dataset``: always for the owner's own datasets; otherwise when
        ``combine_with`` is unset, or lists the other party or that very dataset."""
        if other_party == party or self.combine_with is None:
            return True
        return other_party in self.combine_with or f"{other_party}.{other_dataset}" in self.combine_with

    def rule(self, column: str) -> ColumnRule:
        """The rule for ``column`` (columns the policy does not list take ``default_role``)."""
        rule = self.columns.get(column)
        if rule is not None:
            return rule
        if self.default_role == "measure":
            return ColumnRule("measure", DEFAULT_MEASURE_AGGREGATES)
        return ColumnRule(self.default_role)

    def columns_with_role(self, role: str, names: list[str]) -> list[str]:
        return [c for c in names if self.rule(c).role == role]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "<policy>", prefix: str = "") -> DatasetPolicy:
        """A policy from its TOML (or registered JSON) table, validated key by key in this order, each
        step raising ConfigError naming ``source`` and the key: 1. no unknown key; 2. version;
        3. privacy unit; 4. minimum group size; 5. analysts; 6. approval mode; 7. column rules;
        8. default role; 9. dominance; 10. the privacy unit's role; 11. trust; 12. share_row_count;
        13. the record of processing; 14. combine_with; 15. privacy."""
        check_keys(doc, _POLICY_KEYS, source=source, prefix=prefix)
        _check_version(doc, source=source, prefix=prefix)
        unit = _privacy_unit(doc, source=source, prefix=prefix)
        k = _min_group_size(doc, source=source, prefix=prefix)
        analysts = _analysts(doc, source=source, prefix=prefix)
        approval = _approval(doc, source=source, prefix=prefix)
        columns = _columns(doc, source=source, prefix=prefix)
        default_role = _default_role(doc, columns, source=source, prefix=prefix)
        dominance = (
            Dominance.from_dict(doc["dominance"], source=source, prefix=f"{prefix}dominance.")
            if doc.get("dominance") is not None
            else None
        )
        _check_unit_role(unit, columns, source=source, prefix=prefix)
        trust = (
            DatasetTrust.from_dict(doc["trust"], source=source, prefix=f"{prefix}trust.")
            if doc.get("trust") is not None
            else DatasetTrust()
        )
        share = doc.get("share_row_count", False)
        if not isinstance(share, bool):
            raise key_error(source, f"{prefix}share_row_count", "true or false")
        processing = (
            ProcessingRecord.from_dict(doc["processing"], source=source, prefix=f"{prefix}processing.")
            if doc.get("processing") is not None
            else None
        )
        combine_with = _combine_with(doc, source=source, prefix=prefix)
        privacy = (
            PrivacyRule.from_dict(doc["privacy"], source=source, prefix=f"{prefix}privacy.")
            if doc.get("privacy") is not None
            else None
        )
        if privacy is not None and privacy.is_dp and unit is None:
            raise key_error(
                source,
                f"{prefix}privacy_unit",
                'set in dp mode: differential privacy protects the units it names (e.g. privacy_unit = "customer_id")',
            )
        return cls(
            privacy_unit=unit,
            min_group_size=k,
            analysts=tuple(analysts),
            approval=approval,
            columns=columns,
            default_role=default_role,
            dominance=dominance,
            trust=trust,
            share_row_count=share,
            processing=processing,
            combine_with=combine_with,
            privacy=privacy,
        )

    @classmethod
    def from_json(cls, data: bytes) -> DatasetPolicy:
        return cls.from_dict(json.loads(data), source="<registered policy>")

    def to_toml(self) -> str:
        """The policy as a TOML policy file (``load_policy_file`` reads it back to an equal policy)."""
        doc = self.to_dict()
        lines = []
        for key in ("version", "privacy_unit", "min_group_size", "analysts", "approval", "default_role"):
            if doc[key] is not None:
                lines.append(f"{key} = {toml_value(doc[key])}")
        if doc["dominance"] is not None:
            lines.append(f"dominance = {toml_value(doc['dominance'])}")
        if "trust" in doc:
            lines.append(f"trust = {toml_value(doc['trust'])}")
        if doc.get("share_row_count"):
            lines.append("share_row_count = true")
        if "combine_with" in doc:
            lines.append(f"combine_with = {toml_value(doc['combine_with'])}")
        if "privacy" in doc:
            lines += ["", "[privacy]"]
            lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in doc["privacy"].items()]
        if "processing" in doc:
            lines += ["", "[processing]"]
            lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in doc["processing"].items()]
        if doc["columns"]:
            lines += ["", "[columns]"]
            lines += [f"{toml_key(name)} = {toml_value(rule)}" for name, rule in doc["columns"].items()]
        return "\n".join(lines) + "\n"


def load_policy_file(path: Path) -> DatasetPolicy:
    """Load a TOML dataset policy file."""
    return DatasetPolicy.from_dict(load_toml(path, what="policy file"), source=str(path))


# The steps of DatasetPolicy.from_dict, in its order.

_POLICY_KEYS = {
    "version", "privacy_unit", "min_group_size", "analysts", "approval", "columns", "default_role",
    "dominance", "trust", "share_row_count", "processing", "combine_with", "privacy",
}  # fmt: skip


def _check_version(doc: Mapping[str, Any], *, source: str, prefix: str) -> None:
    version = doc.get("version", 1)
    if isinstance(version, bool) or version != 1:
        raise key_error(source, f"{prefix}version", "1")


def _privacy_unit(doc: Mapping[str, Any], *, source: str, prefix: str) -> str | None:
    unit = doc.get("privacy_unit")
    if unit is not None and (not isinstance(unit, str) or not unit):
        raise key_error(source, f"{prefix}privacy_unit", "a column name (a non-empty string)")
    return unit


def _min_group_size(doc: Mapping[str, Any], *, source: str, prefix: str) -> int:
    k = doc.get("min_group_size", DEFAULT_MIN_GROUP_SIZE)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise key_error(source, f"{prefix}min_group_size", "an integer >= 1")
    return k


def _analysts(doc: Mapping[str, Any], *, source: str, prefix: str) -> list[str]:
    analysts = doc.get("analysts", ["*"])
    if not isinstance(analysts, list) or not analysts or not all(isinstance(a, str) and a for a in analysts):
        raise key_error(source, f"{prefix}analysts", 'a non-empty list of analyst names (or ["*"])')
    return analysts


def _approval(doc: Mapping[str, Any], *, source: str, prefix: str) -> str:
    approval = doc.get("approval", "auto")
    if approval not in APPROVAL_MODES:
        raise key_error(source, f"{prefix}approval", f"one of {', '.join(APPROVAL_MODES)}")
    return str(approval)


def _columns(doc: Mapping[str, Any], *, source: str, prefix: str) -> dict[str, ColumnRule]:
    raw_columns = doc.get("columns", {})
    if not isinstance(raw_columns, Mapping):
        raise key_error(source, f"{prefix}columns", "a table of column rules ([columns] amount = { role = ... })")
    return {
        str(name): ColumnRule.from_dict(rule, source=source, prefix=f"{prefix}columns.{name}.")
        for name, rule in raw_columns.items()
    }


def _default_role(doc: Mapping[str, Any], columns: Mapping[str, ColumnRule], *, source: str, prefix: str) -> str:
    # A policy that lists columns protects the ones it does not list; one that lists none is open.
    default_role = doc.get("default_role", "forbidden" if columns else "open")
    if default_role not in ROLES:
        raise key_error(source, f"{prefix}default_role", f"one of {', '.join(ROLES)}")
    return str(default_role)


def _check_unit_role(unit: str | None, columns: Mapping[str, ColumnRule], *, source: str, prefix: str) -> None:
    if unit is not None and unit in columns and columns[unit].role in ("measure", "forbidden"):
        raise key_error(
            source, f"{prefix}columns.{unit}.role", "join_key, dimension or filter_only for the privacy unit"
        )


def _combine_with(doc: Mapping[str, Any], *, source: str, prefix: str) -> tuple[str, ...] | None:
    """``combine_with``: a list of parties (``bank_b``) and datasets (``bank_c.loans``), kept sorted
    and once each (one canonical form, one digest); absent: None (no restriction)."""
    value = doc.get("combine_with")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and _is_party_or_dataset(v) for v in value):
        raise key_error(
            source,
            f"{prefix}combine_with",
            'a list of parties and datasets, e.g. ["bank_b", "bank_c.loans"] ([] for none)',
        )
    return tuple(sorted(set(value)))


def _is_party_or_dataset(name: str) -> bool:
    parts = name.split(".")
    return len(parts) <= 2 and all(p.isidentifier() for p in parts)
