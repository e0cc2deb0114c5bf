"""Which enclaves a data owner accepts: the agent's :class:`TrustPolicy` (local to the owner) and
each dataset's own :class:`DatasetTrust` (published in its policy, on top of the agent's).

A trust policy is read from the agent's ``[trust]`` TOML section and stands for an attestation
:class:`~sealroom.attestation.AppraisalPolicy`; every refusal is a
:class:`~sealroom.errors.ConfigError` that names the file and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from sealroom.attestation import AppraisalPolicy, Claims, load_root_certificate
from sealroom.attestation.collateral import Collateral, load_collateral
from sealroom.attestation.platform import HARDWARE_FORMATS
from sealroom.config import check_keys, key_error
from sealroom.errors import AttestationError, ConfigError


def is_hex_measurement(value: object) -> bool:
    """A SHA-256 or SHA-384 measurement in hex (either case)."""
    return isinstance(value, str) and len(value) in (64, 96) and all(c in "0123456789abcdefABCDEF" for c in value)


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

    def check(self, claims: Claims, *, dataset: str) -> None:
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
            raise key_error(
                source, prefix.rstrip("."), "a table { measurements = [...], allow_simulated = ..., mpc_only = ... }"
            )
        check_keys(doc, {"measurements", "allow_simulated", "mpc_only"}, source=source, prefix=prefix)
        ms = doc.get("measurements")
        if ms is not None and (not isinstance(ms, list) or not all(is_hex_measurement(m) for m in ms)):
            raise key_error(source, f"{prefix}measurements", "a list of hex measurements")
        allow = doc.get("allow_simulated")
        if allow is not None and not isinstance(allow, bool):
            raise key_error(source, f"{prefix}allow_simulated", "true or false")
        mpc_only = doc.get("mpc_only", False)
        if not isinstance(mpc_only, bool):
            raise key_error(source, f"{prefix}mpc_only", "true or false")
        return cls(tuple(m.lower() for m in ms) if ms is not None else None, allow, mpc_only)


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
        check_keys(doc, known, source=source, prefix="trust.")
        ms = doc.get("measurements", [])
        if not isinstance(ms, list) or not all(is_hex_measurement(m) for m in ms):
            raise key_error(
                source,
                "trust.measurements",
                "a list of hex measurements (SHA-256 or SHA-384, as `sealroom enclave measure` or "
                "`sealroom attest verify` print them)",
            )
        allow = doc.get("allow_simulated", False)
        if not isinstance(allow, bool):
            raise key_error(source, "trust.allow_simulated", "true or false")
        allow_debug = doc.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise key_error(source, "trust.allow_debug", "true or false")
        allow_ma = doc.get("snp_allow_migration_agent", False)
        if not isinstance(allow_ma, bool):
            raise key_error(source, "trust.snp_allow_migration_agent", "true or false")
        vmpl = doc.get("snp_max_vmpl", 0)
        if not isinstance(vmpl, int) or isinstance(vmpl, bool) or not 0 <= vmpl <= 3:
            raise key_error(source, "trust.snp_max_vmpl", "an integer from 0 to 3")
        allow_ood = doc.get("allow_out_of_date", False)
        if not isinstance(allow_ood, bool):
            raise key_error(source, "trust.allow_out_of_date", "true or false")
        collateral = doc.get("intel_collateral", {})
        if not isinstance(collateral, Mapping) or not all(
            fmt in ("tdx", "sgx") and isinstance(v, str) and v for fmt, v in collateral.items()
        ):
            raise key_error(
                source,
                "trust.intel_collateral",
                'a table { tdx = "DIR_OR_FILE", sgx = "DIR_OR_FILE" } of Intel collateral from the PCS or a PCCS',
            )
        root = doc.get("dev_root")
        if root is not None and (not isinstance(root, str) or not root):
            raise key_error(source, "trust.dev_root", "the path of the dev root certificate")
        if allow and not root:
            raise ConfigError(
                f"{source}: trust.allow_simulated = true needs trust.dev_root (the dev root certificate "
                "that `sealroom dev init` wrote)",
                details={"file": source, "key": "trust.dev_root"},
            )
        age = doc.get("max_evidence_age_seconds", 300)
        if not isinstance(age, int) or isinstance(age, bool) or age <= 0:
            raise key_error(source, "trust.max_evidence_age_seconds", "a positive integer")

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
        raise key_error(source, "trust.expect", f"a table of platforms, {example}")
    out: dict[str, tuple[str, ...]] = {}
    for platform, names in doc.items():
        if platform not in HARDWARE_FORMATS or not isinstance(names, Mapping):
            raise key_error(
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
                raise key_error(source, f"trust.expect.{platform}.{name}", f"a non-empty list of hex values, {example}")
            out[f"{platform}.{name}"] = tuple(v.lower() for v in values)
    return out


_TCB_EXAMPLE = 'e.g. [trust.min_tcb] "sev-snp" = { snp = 22, microcode = 213 }'


def _min_tcb(doc: object, *, source: str) -> dict[str, int]:
    """``[trust.min_tcb]``: ``platform = { component = n }`` tables, or ``component = n`` for all platforms."""
    if not isinstance(doc, Mapping):
        raise key_error(source, "trust.min_tcb", f"a table of minimum security versions, {_TCB_EXAMPLE}")
    out: dict[str, int] = {}

    def put(key: str, value: object, shown: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise key_error(source, shown, f"a non-negative integer security version, {_TCB_EXAMPLE}")
        out[key] = value

    for name, value in doc.items():
        if isinstance(value, Mapping):
            if name not in HARDWARE_FORMATS:
                raise key_error(source, f"trust.min_tcb.{name}", f"a platform: one of {', '.join(HARDWARE_FORMATS)}")
            for component, n in value.items():
                put(f"{name}.{component}", n, f"trust.min_tcb.{name}.{component}")
        else:
            put(name, value, f"trust.min_tcb.{name}")
    return out


def _trust_roots(doc: object, *, source: str, resolve: Callable[[str], Path]) -> dict[str, tuple[Path, ...]]:
    """``[trust.roots]``: ``platform = ["root.pem", ...]`` replacing that platform's built-in roots."""
    if not isinstance(doc, Mapping):
        raise key_error(source, "trust.roots", 'a table such as { "sev-snp" = ["ark.pem"] }')
    out: dict[str, tuple[Path, ...]] = {}
    for fmt, paths in doc.items():
        if fmt not in HARDWARE_FORMATS:
            raise key_error(source, f"trust.roots.{fmt}", f"a platform: one of {', '.join(HARDWARE_FORMATS)}")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise key_error(source, f"trust.roots.{fmt}", "a non-empty list of PEM certificate paths")
        out[fmt] = tuple(resolve(p) for p in paths)
    return out


def _load_collateral(path: Path, fmt: str) -> Collateral:
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
