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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sealroom.attestation import AppraisalPolicy, load_root_certificate
from sealroom.errors import ConfigError

DEFAULT_MIN_GROUP_SIZE = 5
# Manual approval (a person signs each query) arrives with the approvals issue; until then a policy
# asking for it is refused at load rather than silently auto-approved.
APPROVAL_MODES = ("auto",)


def canonical_json(doc: Any) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class DatasetPolicy:
    """Disclosure rules for one dataset."""

    privacy_unit: str | None = None
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    analysts: tuple[str, ...] = ("*",)
    approval: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "privacy_unit": self.privacy_unit,
            "min_group_size": self.min_group_size,
            "analysts": list(self.analysts),
            "approval": self.approval,
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def allows_analyst(self, analyst: str) -> bool:
        return "*" in self.analysts or analyst in self.analysts

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "<policy>", prefix: str = "") -> DatasetPolicy:
        known = {"version", "privacy_unit", "min_group_size", "analysts", "approval"}
        for key in doc:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {prefix}{key}; expected one of {', '.join(sorted(known))}",
                    details={"file": source, "key": f"{prefix}{key}"},
                )
        unit = doc.get("privacy_unit")
        if unit is not None and (not isinstance(unit, str) or not unit):
            raise ConfigError(
                f"{source}: {prefix}privacy_unit must be a column name (a non-empty string)",
                details={"file": source, "key": f"{prefix}privacy_unit"},
            )
        k = doc.get("min_group_size", DEFAULT_MIN_GROUP_SIZE)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(
                f"{source}: {prefix}min_group_size must be an integer >= 1",
                details={"file": source, "key": f"{prefix}min_group_size"},
            )
        analysts = doc.get("analysts", ["*"])
        if not isinstance(analysts, list) or not analysts or not all(isinstance(a, str) and a for a in analysts):
            raise ConfigError(
                f'{source}: {prefix}analysts must be a non-empty list of analyst names (or ["*"])',
                details={"file": source, "key": f"{prefix}analysts"},
            )
        approval = doc.get("approval", "auto")
        if approval not in APPROVAL_MODES:
            raise ConfigError(
                f"{source}: {prefix}approval must be one of {', '.join(APPROVAL_MODES)} (manual approval is not "
                "available in this version)",
                details={"file": source, "key": f"{prefix}approval"},
            )
        return cls(privacy_unit=unit, min_group_size=k, analysts=tuple(analysts), approval=approval)

    @classmethod
    def from_json(cls, data: bytes) -> DatasetPolicy:
        return cls.from_dict(json.loads(data), source="<registered policy>")


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
    """Which enclaves a data owner's agent accepts (stays local to the owner)."""

    measurements: frozenset[str] = field(default_factory=frozenset)
    allow_simulated: bool = False
    dev_root: Path | None = None
    max_evidence_age_seconds: int = 300

    def appraisal(self) -> AppraisalPolicy:
        """The attestation appraisal policy this trust section stands for."""
        roots = (load_root_certificate(self.dev_root),) if self.allow_simulated and self.dev_root else ()
        return AppraisalPolicy(
            measurements=self.measurements,
            allow_simulated=self.allow_simulated,
            simulated_roots=roots,
            max_age=timedelta(seconds=self.max_evidence_age_seconds),
        )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str, base: Path) -> TrustPolicy:
        known = {"measurements", "allow_simulated", "dev_root", "max_evidence_age_seconds"}
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
                "`sealroom enclave measure` prints them)",
                details={"file": source, "key": "trust.measurements"},
            )
        allow = doc.get("allow_simulated", False)
        if not isinstance(allow, bool):
            raise ConfigError(
                f"{source}: trust.allow_simulated must be true or false",
                details={"file": source, "key": "trust.allow_simulated"},
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
        root_path = Path(root).expanduser() if root else None
        if root_path is not None and not root_path.is_absolute():
            root_path = base / root_path
        return cls(
            measurements=frozenset(m.lower() for m in ms),
            allow_simulated=allow,
            dev_root=root_path,
            max_evidence_age_seconds=age,
        )
