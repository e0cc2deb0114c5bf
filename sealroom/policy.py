"""Data owners' dataset policies and trust policies.

A dataset policy is what its owner publishes (its digest is registered and bound into every plan);
a trust policy is what the owner's agent accepts as an enclave, and stays local. Both are frozen
dataclasses built from TOML tables and validated into a :class:`~sealroom.errors.ConfigError` that
names the file, the key, and what is expected.

Security model: the policy digest is part of the plan hash each owner signs, and the enclave
compiles the disclosure rules from the plan itself, so a coordinator that drops or weakens a rule
changes the hash and loses the owner's approval.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.attestation.hardware import FORMATS as HARDWARE_FORMATS
from sealroom.canonical import canonical_json
from sealroom.config import toml_key, toml_value
from sealroom.defaults import DEFAULT_MIN_GROUP_SIZE
from sealroom.errors import AttestationError, ConfigError

APPROVAL_MODES = ("auto", "manual")

# Column roles. What each allows is decided in one place: sealroom.planning.disclosure.ALLOWED_USES.
ROLES = ("join_key", "dimension", "measure", "filter_only", "forbidden", "open")
MEASURE_AGGREGATES = ("count", "count_distinct", "sum", "avg", "min", "max", "var", "stddev")
DEFAULT_MEASURE_AGGREGATES = ("count", "sum", "avg", "var", "stddev")


def _err(source: str, key: str, expected: str) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {expected}", details={"file": source, "key": key})


def _check_keys(doc: Mapping[str, Any], known: set[str], *, source: str, prefix: str) -> None:
    for key in doc:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}; expected one of {', '.join(sorted(known))}",
                details={"file": source, "key": f"{prefix}{key}"},
            )


def _number(v: Any) -> bool:
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
            raise _err(source, prefix.rstrip("."), 'a role name or a table such as { role = "dimension" }')
        _check_keys(doc, {"role", "aggregates", "min", "max", "values", "bins"}, source=source, prefix=prefix)
        role = doc.get("role")
        if role not in ROLES:
            raise _err(source, f"{prefix}role", f"one of {', '.join(ROLES)}")
        if role not in ("dimension", "open"):
            for key in ("values", "bins"):
                if key in doc:
                    raise _err(
                        source, f"{prefix}{key}", f"left out: only a dimension declares {key} (its group domain)"
                    )
        if role != "measure":
            for key in ("aggregates", "min", "max"):
                if key in doc:
                    raise _err(source, f"{prefix}{key}", f"left out: only a measure has {key}")
            values, bins = _domain(doc, source=source, prefix=prefix)
            return cls(role, values=values, bins=bins)
        aggs = doc.get("aggregates", list(DEFAULT_MEASURE_AGGREGATES))
        if not isinstance(aggs, list) or not aggs or any(a not in MEASURE_AGGREGATES for a in aggs):
            raise _err(source, f"{prefix}aggregates", f"a non-empty list drawn from {', '.join(MEASURE_AGGREGATES)}")
        lo, hi = doc.get("min"), doc.get("max")
        for key, v in (("min", lo), ("max", hi)):
            if v is not None and not _number(v):
                raise _err(source, f"{prefix}{key}", "a number")
        if lo is not None and hi is not None and lo > hi:
            raise _err(source, f"{prefix}min", f"at most {prefix}max")
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
        raise _err(source, f"{prefix}bins", "left out when values is declared: a domain is values or bins, not both")
    out_values: tuple[Any, ...] | None = None
    out_bins: tuple[float, ...] | None = None
    if values is not None:
        if (
            not isinstance(values, list)
            or not 0 < len(values) <= MAX_DOMAIN_VALUES
            or not all((isinstance(v, str | int) and not isinstance(v, bool)) for v in values)
            or len({(type(v), v) for v in values}) != len(values)
        ):
            raise _err(
                source,
                f"{prefix}values",
                f"a non-empty list of distinct strings or integers (at most {MAX_DOMAIN_VALUES}): the group keys",
            )
        out_values = tuple(values)
    if bins is not None:
        if (
            not isinstance(bins, list)
            or not 2 <= len(bins) <= MAX_DOMAIN_VALUES + 1
            or not all(_number(b) for b in bins)
            or any(a >= b for a, b in zip(bins, bins[1:], strict=False))
        ):
            raise _err(source, f"{prefix}bins", "a list of at least two strictly ascending numbers (the bin edges)")
        out_bins = tuple(int(b) if float(b).is_integer() else float(b) for b in bins)
    return out_values, out_bins


@dataclass(frozen=True)
class Dominance:
    """(n, k) dominance: a SUM cell is suppressed when its n largest units contribute >= k % of it."""

    n: int
    k: float

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k}


@dataclass(frozen=True)
class DatasetTrust:
    """Which enclaves may receive this dataset, on top of the agent's own ``[trust]``.

    ``measurements``: if set, the enclave's measurement must also be one of these; ``allow_simulated
    = false`` refuses simulated evidence for this dataset even where the agent allows it;
    ``mpc_only``: the dataset never goes to any enclave (only MPC stages may use it).
    """

    measurements: tuple[str, ...] | None = None
    allow_simulated: bool | None = None
    mpc_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mpc_only": self.mpc_only}
        if self.measurements is not None:
            out["measurements"] = list(self.measurements)
        if self.allow_simulated is not None:
            out["allow_simulated"] = self.allow_simulated
        return out

    def check(self, claims: Any, *, dataset: str) -> None:
        """Raise AttestationError unless an enclave with ``claims`` may receive ``dataset``."""
        if self.mpc_only:
            raise AttestationError(
                f"{dataset} goes to no enclave: its policy says trust.mpc_only", details={"check": "mpc_only"}
            )
        if self.allow_simulated is False and claims.simulated:
            raise AttestationError(
                f"{dataset} refuses simulated attestation (its policy sets trust.allow_simulated = false)",
                details={"check": "simulated"},
            )
        if self.measurements is not None and claims.measurement not in self.measurements:
            raise AttestationError(
                f"the enclave's measurement {claims.measurement} is not among those {dataset}'s policy accepts "
                "(trust.measurements)",
                details={"check": "measurement"},
            )

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> DatasetTrust:
        if not isinstance(doc, Mapping):
            raise _err(
                source, prefix.rstrip("."), "a table { measurements = [...], allow_simulated = ..., mpc_only = ... }"
            )
        _check_keys(doc, {"measurements", "allow_simulated", "mpc_only"}, source=source, prefix=prefix)
        ms = doc.get("measurements")
        if ms is not None and (
            not isinstance(ms, list)
            or not all(
                isinstance(m, str) and len(m) in (64, 96) and all(c in "0123456789abcdefABCDEF" for c in m) for m in ms
            )
        ):
            raise _err(source, f"{prefix}measurements", "a list of hex measurements")
        allow = doc.get("allow_simulated")
        if allow is not None and not isinstance(allow, bool):
            raise _err(source, f"{prefix}allow_simulated", "true or false")
        mpc_only = doc.get("mpc_only", False)
        if not isinstance(mpc_only, bool):
            raise _err(source, f"{prefix}mpc_only", "true or false")
        return cls(tuple(m.lower() for m in ms) if ms is not None else None, allow, mpc_only)


# The record of processing (GDPR Article 30) that an owner declares per dataset in ``[processing]``.
# Lawful bases: Article 6(1)(a)-(f).
LEGAL_BASES = ("consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interests")
# Special categories (Article 9(1)) and criminal convictions and offences (Article 10).
SPECIAL_CATEGORIES = (
    "racial_or_ethnic_origin",
    "political_opinions",
    "religious_or_philosophical_beliefs",
    "trade_union_membership",
    "genetic",
    "biometric",
    "health",
    "sex_life_or_sexual_orientation",
    "criminal_convictions",
)
# The conditions of Article 9(2)(a)-(j) that allow processing special categories.
SPECIAL_CATEGORY_CONDITIONS = (
    "explicit_consent",
    "employment_and_social_security",
    "vital_interests",
    "not_for_profit_body",
    "made_public_by_subject",
    "legal_claims",
    "substantial_public_interest",
    "health_or_social_care",
    "public_health",
    "archiving_research_or_statistics",
)
MAX_PROCESSING_TEXT = 500  # characters of one declared text (a controller's name, a category, ...)
_PURPOSE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


def is_purpose(value: Any) -> bool:
    """A purpose identifier: 1-100 letters, digits and ``_ . : -``, starting with a letter or digit."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 100
        and value[0].isascii()
        and value[0].isalnum()
        and set(value) <= _PURPOSE_CHARS
    )


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_PROCESSING_TEXT


@dataclass(frozen=True)
class ProcessingRecord:
    """What the owner declares about this dataset for the record of processing (GDPR Article 30):
    the purposes it may be used for (identifiers a collaboration names), the lawful basis, the
    categories of data subjects and of personal data, any special categories with the Article 9(2)
    condition that allows them, the retention of the source data, and who the controller is.

    It is part of the policy, so of its digest and of every plan the owner signs; a policy without
    ``[processing]`` reads and hashes as before. It is public like the rest of the policy, and never
    enters the transparency log (whose entries hold only the policy digest).
    """

    purposes: tuple[str, ...]
    legal_basis: str
    data_subjects: tuple[str, ...]
    personal_data: tuple[str, ...]
    special_categories: tuple[str, ...] = ()
    special_category_condition: str | None = None
    retention: str | None = None
    controller: str | None = None
    contact: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "purposes": list(self.purposes),
            "legal_basis": self.legal_basis,
            "data_subjects": list(self.data_subjects),
            "personal_data": list(self.personal_data),
        }
        if self.special_categories:
            out["special_categories"] = list(self.special_categories)
            out["special_category_condition"] = self.special_category_condition
        for key in ("retention", "controller", "contact"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, doc: Any, *, source: str, prefix: str) -> ProcessingRecord:
        if not isinstance(doc, Mapping):
            raise _err(source, prefix.rstrip("."), 'a table [processing] with purposes = [...], legal_basis = "..."')
        _check_keys(
            doc,
            {
                "purposes", "legal_basis", "data_subjects", "personal_data", "special_categories",
                "special_category_condition", "retention", "controller", "contact",
            },
            source=source,
            prefix=prefix,
        )  # fmt: skip
        purposes = doc.get("purposes")
        if (
            not isinstance(purposes, list)
            or not purposes
            or not all(is_purpose(p) for p in purposes)
            or len(set(purposes)) != len(purposes)
        ):
            raise _err(
                source,
                f"{prefix}purposes",
                "a non-empty list of distinct purpose identifiers (letters, digits and _ . : -, e.g. "
                '"credit_risk_statistics"): the purposes a collaboration may use this dataset for',
            )
        basis = doc.get("legal_basis")
        if basis not in LEGAL_BASES:
            raise _err(source, f"{prefix}legal_basis", f"one of {', '.join(LEGAL_BASES)} (GDPR Article 6(1))")
        lists: dict[str, tuple[str, ...]] = {}
        for key, what in (("data_subjects", "data subjects"), ("personal_data", "personal data")):
            value = doc.get(key)
            if not isinstance(value, list) or not value or not all(_text(v) for v in value):
                raise _err(
                    source,
                    f"{prefix}{key}",
                    f"a non-empty list of categories of {what} (non-empty strings of at most "
                    f"{MAX_PROCESSING_TEXT} characters)",
                )
            lists[key] = tuple(value)
        special = doc.get("special_categories", [])
        if (
            not isinstance(special, list)
            or not all(c in SPECIAL_CATEGORIES for c in special)
            or len(set(special)) != len(special)
        ):
            raise _err(
                source,
                f"{prefix}special_categories",
                "a list of distinct special categories (GDPR Articles 9 and 10) drawn from "
                + ", ".join(SPECIAL_CATEGORIES),
            )
        condition = doc.get("special_category_condition")
        if special and condition not in SPECIAL_CATEGORY_CONDITIONS:
            raise _err(
                source,
                f"{prefix}special_category_condition",
                f"one of {', '.join(SPECIAL_CATEGORY_CONDITIONS)} (GDPR Article 9(2)), since special_categories "
                "is not empty",
            )
        if not special and condition is not None:
            raise _err(source, f"{prefix}special_category_condition", "left out: special_categories is empty")
        texts: dict[str, str | None] = {}
        for key in ("retention", "controller", "contact"):
            value = doc.get(key)
            if value is not None and not _text(value):
                raise _err(source, f"{prefix}{key}", f"a non-empty string of at most {MAX_PROCESSING_TEXT} characters")
            texts[key] = value
        return cls(
            purposes=tuple(purposes),
            legal_basis=basis,
            data_subjects=lists["data_subjects"],
            personal_data=lists["personal_data"],
            special_categories=tuple(sorted(special, key=SPECIAL_CATEGORIES.index)),
            special_category_condition=condition,
            retention=texts["retention"],
            controller=texts["controller"],
            contact=texts["contact"],
        )


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
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def allows_analyst(self, analyst: str) -> bool:
        return "*" in self.analysts or analyst in self.analysts

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
        known = {
            "version", "privacy_unit", "min_group_size", "analysts", "approval", "columns", "default_role",
            "dominance", "trust", "share_row_count", "processing",
        }  # fmt: skip
        _check_keys(doc, known, source=source, prefix=prefix)
        version = doc.get("version", 1)
        if isinstance(version, bool) or version != 1:
            raise _err(source, f"{prefix}version", "1")
        unit = doc.get("privacy_unit")
        if unit is not None and (not isinstance(unit, str) or not unit):
            raise _err(source, f"{prefix}privacy_unit", "a column name (a non-empty string)")
        k = doc.get("min_group_size", DEFAULT_MIN_GROUP_SIZE)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise _err(source, f"{prefix}min_group_size", "an integer >= 1")
        analysts = doc.get("analysts", ["*"])
        if not isinstance(analysts, list) or not analysts or not all(isinstance(a, str) and a for a in analysts):
            raise _err(source, f"{prefix}analysts", 'a non-empty list of analyst names (or ["*"])')
        approval = doc.get("approval", "auto")
        if approval not in APPROVAL_MODES:
            raise _err(source, f"{prefix}approval", f"one of {', '.join(APPROVAL_MODES)}")
        raw_columns = doc.get("columns", {})
        if not isinstance(raw_columns, Mapping):
            raise _err(source, f"{prefix}columns", "a table of column rules ([columns] amount = { role = ... })")
        columns = {
            str(name): ColumnRule.from_dict(rule, source=source, prefix=f"{prefix}columns.{name}.")
            for name, rule in raw_columns.items()
        }
        # A policy that lists columns protects the ones it does not list; one that lists none is open.
        default_role = doc.get("default_role", "forbidden" if columns else "open")
        if default_role not in ROLES:
            raise _err(source, f"{prefix}default_role", f"one of {', '.join(ROLES)}")
        dominance = None
        if doc.get("dominance") is not None:
            d = doc["dominance"]
            if not isinstance(d, Mapping):
                raise _err(source, f"{prefix}dominance", "a table { n = 2, k = 80 }")
            _check_keys(d, {"n", "k"}, source=source, prefix=f"{prefix}dominance.")
            n, kk = d.get("n"), d.get("k")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise _err(source, f"{prefix}dominance.n", "an integer >= 1 (the number of largest units)")
            if not isinstance(kk, int | float) or isinstance(kk, bool) or not 0 < kk <= 100:
                raise _err(source, f"{prefix}dominance.k", "a percentage in (0, 100]")
            dominance = Dominance(n, float(kk))
        if unit is not None and unit in columns and columns[unit].role in ("measure", "forbidden"):
            raise _err(
                source, f"{prefix}columns.{unit}.role", "join_key, dimension or filter_only for the privacy unit"
            )
        trust = (
            DatasetTrust.from_dict(doc["trust"], source=source, prefix=f"{prefix}trust.")
            if doc.get("trust") is not None
            else DatasetTrust()
        )
        share = doc.get("share_row_count", False)
        if not isinstance(share, bool):
            raise _err(source, f"{prefix}share_row_count", "true or false")
        processing = (
            ProcessingRecord.from_dict(doc["processing"], source=source, prefix=f"{prefix}processing.")
            if doc.get("processing") is not None
            else None
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
        if "processing" in doc:
            lines += ["", "[processing]"]
            lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in doc["processing"].items()]
        if doc["columns"]:
            lines += ["", "[columns]"]
            lines += [f"{toml_key(name)} = {toml_value(rule)}" for name, rule in doc["columns"].items()]
        return "\n".join(lines) + "\n"


def load_policy_file(path: Path) -> DatasetPolicy:
    """Load a TOML dataset policy file."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"policy file not found: {path}", details={"file": str(path)}) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", details={"file": str(path)}) from None
    return DatasetPolicy.from_dict(doc, source=str(path))


@dataclass(frozen=True)
class TrustPolicy:
    """Which enclaves a data owner's agent accepts (stays local to the owner).

    ``measurements`` is the allowlist; ``allow_simulated`` (with ``dev_root``) admits software
    attestation for development; ``allow_debug`` admits debug-mode TEEs, whose memory the host can
    read; ``min_tcb`` maps ``"<platform>.<component>"`` (or a bare component, for every platform) to
    the lowest security version accepted; ``roots`` replaces the built-in vendor roots of a hardware
    format with certificates from PEM files (a private PKI; normally left empty).
    """

    measurements: frozenset[str] = field(default_factory=frozenset)
    allow_simulated: bool = False
    dev_root: Path | None = None
    max_evidence_age_seconds: int = 300
    allow_debug: bool = False
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    roots: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    expect: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    snp_allow_migration_agent: bool = False
    snp_max_vmpl: int = 0
    intel_collateral: Mapping[str, Path] = field(default_factory=dict)
    allow_out_of_date: bool = False

    def appraisal(self) -> AppraisalPolicy:
        """The attestation appraisal policy this trust section stands for."""
        roots = (load_root_certificate(self.dev_root),) if self.allow_simulated and self.dev_root else ()
        return AppraisalPolicy(
            measurements=self.measurements,
            allow_simulated=self.allow_simulated,
            simulated_roots=roots,
            max_age=timedelta(seconds=self.max_evidence_age_seconds),
            allow_debug=self.allow_debug,
            min_tcb=self.min_tcb,
            platform_roots={
                fmt: tuple(_load_root_pem(path, fmt) for path in paths) for fmt, paths in self.roots.items()
            },
            expect={key: frozenset(values) for key, values in self.expect.items()},
            snp_allow_migration_agent=self.snp_allow_migration_agent,
            snp_max_vmpl=self.snp_max_vmpl,
            intel_collateral={fmt: _load_collateral(path, fmt) for fmt, path in self.intel_collateral.items()},
            allow_out_of_date=self.allow_out_of_date,
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str, base: Path) -> TrustPolicy:
        known = {
            "measurements",
            "allow_simulated",
            "dev_root",
            "max_evidence_age_seconds",
            "allow_debug",
            "min_tcb",
            "roots",
            "expect",
            "snp_allow_migration_agent",
            "snp_max_vmpl",
            "intel_collateral",
            "allow_out_of_date",
        }
        for key in doc:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key trust.{key}; expected one of {', '.join(sorted(known))}",
                    details={"file": source, "key": f"trust.{key}"},
                )
        ms = doc.get("measurements", [])
        if not isinstance(ms, list) or not all(
            isinstance(m, str) and len(m) in (64, 96) and all(c in "0123456789abcdefABCDEF" for c in m) for m in ms
        ):
            raise ConfigError(
                f"{source}: trust.measurements must be a list of hex measurements (SHA-256 or SHA-384, as "
                "`sealroom enclave measure` or `sealroom attest verify` print them)",
                details={"file": source, "key": "trust.measurements"},
            )
        allow = doc.get("allow_simulated", False)
        if not isinstance(allow, bool):
            raise ConfigError(
                f"{source}: trust.allow_simulated must be true or false",
                details={"file": source, "key": "trust.allow_simulated"},
            )
        allow_debug = doc.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise ConfigError(
                f"{source}: trust.allow_debug must be true or false",
                details={"file": source, "key": "trust.allow_debug"},
            )
        allow_ma = doc.get("snp_allow_migration_agent", False)
        if not isinstance(allow_ma, bool):
            raise _err(source, "trust.snp_allow_migration_agent", "true or false")
        vmpl = doc.get("snp_max_vmpl", 0)
        if not isinstance(vmpl, int) or isinstance(vmpl, bool) or not 0 <= vmpl <= 3:
            raise _err(source, "trust.snp_max_vmpl", "an integer from 0 to 3")
        allow_ood = doc.get("allow_out_of_date", False)
        if not isinstance(allow_ood, bool):
            raise _err(source, "trust.allow_out_of_date", "true or false")
        collateral = doc.get("intel_collateral", {})
        if not isinstance(collateral, Mapping) or not all(
            fmt in ("tdx", "sgx") and isinstance(v, str) and v for fmt, v in collateral.items()
        ):
            raise _err(
                source,
                "trust.intel_collateral",
                'a table { tdx = "DIR_OR_FILE", sgx = "DIR_OR_FILE" } of Intel collateral from the PCS or a PCCS',
            )
        root = doc.get("dev_root")
        if root is not None and (not isinstance(root, str) or not root):
            raise ConfigError(
                f"{source}: trust.dev_root must be the path of the dev root certificate",
                details={"file": source, "key": "trust.dev_root"},
            )
        if allow and not root:
            raise ConfigError(
                f"{source}: trust.allow_simulated = true needs trust.dev_root (the dev root certificate "
                "that `sealroom dev init` wrote)",
                details={"file": source, "key": "trust.dev_root"},
            )
        age = doc.get("max_evidence_age_seconds", 300)
        if not isinstance(age, int) or isinstance(age, bool) or age <= 0:
            raise ConfigError(
                f"{source}: trust.max_evidence_age_seconds must be a positive integer",
                details={"file": source, "key": "trust.max_evidence_age_seconds"},
            )

        def resolve(value: str) -> Path:
            path = Path(value).expanduser()
            return path if path.is_absolute() else base / path

        root_path = resolve(root) if root else None
        return cls(
            measurements=frozenset(m.lower() for m in ms),
            allow_simulated=allow,
            dev_root=root_path,
            max_evidence_age_seconds=age,
            allow_debug=allow_debug,
            min_tcb=_min_tcb(doc.get("min_tcb", {}), source=source),
            roots=_trust_roots(doc.get("roots", {}), source=source, resolve=resolve),
            expect=_expect(doc.get("expect", {}), source=source),
            snp_allow_migration_agent=allow_ma,
            snp_max_vmpl=vmpl,
            intel_collateral={fmt: resolve(v) for fmt, v in collateral.items()},
            allow_out_of_date=allow_ood,
        )


def _expect(doc: object, *, source: str) -> dict[str, tuple[str, ...]]:
    """``[trust.expect.<platform>]``: ``name = ["hex", ...]`` named measurements to pin."""
    example = 'e.g. [trust.expect.tdx] rtmr1 = ["<96 hex digits>"]'
    if not isinstance(doc, Mapping):
        raise _err(source, "trust.expect", f"a table of platforms, {example}")
    out: dict[str, tuple[str, ...]] = {}
    for platform, names in doc.items():
        if platform not in HARDWARE_FORMATS or not isinstance(names, Mapping):
            raise _err(
                source, f"trust.expect.{platform}", f"a table for a platform ({', '.join(HARDWARE_FORMATS)}), {example}"
            )
        for name, values in names.items():
            if (
                not isinstance(values, list)
                or not values
                or not all(
                    isinstance(v, str) and v and len(v) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in v)
                    for v in values
                )
            ):
                raise _err(source, f"trust.expect.{platform}.{name}", f"a non-empty list of hex values, {example}")
            out[f"{platform}.{name}"] = tuple(v.lower() for v in values)
    return out


_TCB_EXAMPLE = 'e.g. [trust.min_tcb] "sev-snp" = { snp = 22, microcode = 213 }'


def _min_tcb(doc: object, *, source: str) -> dict[str, int]:
    """``[trust.min_tcb]``: ``platform = { component = n }`` tables, or ``component = n`` for all platforms."""
    if not isinstance(doc, Mapping):
        raise _err(source, "trust.min_tcb", f"a table of minimum security versions, {_TCB_EXAMPLE}")
    out: dict[str, int] = {}

    def put(key: str, value: object, shown: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _err(source, shown, f"a non-negative integer security version, {_TCB_EXAMPLE}")
        out[key] = value

    for name, value in doc.items():
        if isinstance(value, Mapping):
            if name not in HARDWARE_FORMATS:
                raise _err(source, f"trust.min_tcb.{name}", f"a platform: one of {', '.join(HARDWARE_FORMATS)}")
            for component, n in value.items():
                put(f"{name}.{component}", n, f"trust.min_tcb.{name}.{component}")
        else:
            put(name, value, f"trust.min_tcb.{name}")
    return out


def _trust_roots(doc: object, *, source: str, resolve: Callable[[str], Path]) -> dict[str, tuple[Path, ...]]:
    """``[trust.roots]``: ``platform = ["root.pem", ...]`` replacing that platform's built-in roots."""
    if not isinstance(doc, Mapping):
        raise _err(source, "trust.roots", 'a table such as { "sev-snp" = ["ark.pem"] }')
    out: dict[str, tuple[Path, ...]] = {}
    for fmt, paths in doc.items():
        if fmt not in HARDWARE_FORMATS:
            raise _err(source, f"trust.roots.{fmt}", f"a platform: one of {', '.join(HARDWARE_FORMATS)}")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise _err(source, f"trust.roots.{fmt}", "a non-empty list of PEM certificate paths")
        out[fmt] = tuple(resolve(p) for p in paths)
    return out


def _load_collateral(path: Path, fmt: str) -> Any:
    from sealroom.attestation.collateral import load_collateral

    if not path.exists():
        raise ConfigError(f"trust.intel_collateral.{fmt}: not found: {path}", details={"file": str(path)})
    try:
        return load_collateral(path)
    except AttestationError as exc:
        raise ConfigError(
            f"trust.intel_collateral.{fmt}: {path} is not usable Intel collateral ({exc.message})",
            details={"file": str(path), "key": f"trust.intel_collateral.{fmt}"},
        ) from None


def _load_root_pem(path: Path, fmt: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"trust.roots.{fmt}: root certificate file not found: {path}", details={"file": str(path)}
        ) from None
    except ValueError:
        raise ConfigError(f"trust.roots.{fmt}: {path} is not a PEM certificate", details={"file": str(path)}) from None
