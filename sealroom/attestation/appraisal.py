"""A relying party's appraisal policy for enclave evidence: what it trusts, stated once.

:class:`AppraisalPolicy` is plain data, validated on construction (safe defaults: refuse what is not
allowed). The per-format verifiers read the parts that concern their platform (replacement roots,
Intel collateral, SEV-SNP guest policy bits); :func:`sealroom.attestation.policy.verify_evidence`
appraises the normalised claims against the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealroom.attestation.collateral import Collateral
from sealroom.attestation.encoding import is_lower_hex
from sealroom.attestation.evidence import freeze_tcb
from sealroom.attestation.platform import HARDWARE_FORMATS

__all__ = ["AppraisalPolicy"]


def _measurements(value: object) -> frozenset[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError("measurements must be a set of hex strings (not a single string)")
    out: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"each measurement must be a hex str, not {type(item).__name__}")
        normalised = item.strip().lower()
        if not is_lower_hex(normalised):
            raise ValueError(f"measurement {item!r} is not a non-empty, even-length hex string")
        out.add(normalised)
    return frozenset(out)


@dataclass(frozen=True, kw_only=True)
class AppraisalPolicy:
    """One relying party's trust policy for enclave evidence. Safe defaults: refuse what is not allowed.

    - ``measurements``: allowlist of enclave measurements (hex, case-insensitive). Required. An empty
      allowlist is accepted at construction but refuses every enclave (check ``measurement``).
    - ``allow_simulated``: accept ``simulated`` evidence (no TEE!). Off by default.
    - ``simulated_roots``: dev root certificates pinned for simulated evidence (matched by the
      SHA-256 fingerprint of their DER).
    - ``allow_debug``: accept enclaves running in debug mode (memory readable by the host). Off.
    - ``min_tcb``: every key listed must be present in the claims' TCB with a value ``>=`` this. A key
      ``"<platform>.<component>"`` (``"sev-snp.snp"``) applies only to evidence of that platform; a
      bare ``"<component>"`` applies to every platform.
    - ``expect``: named measurements besides the primary one, ``"<platform>.<name>"`` -> accepted
      values (``"tdx.rtmr1"``, ``"tdx.rtmr2"``, ``"sev-snp.host_data"``, ``"nitro.pcr2"``...); each one
      listed for the evidence's platform must be present with one of the accepted values. On TDX the
      primary measurement (MRTD) covers the firmware only: pin RTMR1 and RTMR2 to pin the kernel,
      initrd and command line (and through a dm-verity root hash there, the enclave worker's code).
    - ``snp_allow_migration_agent``: accept SEV-SNP guests whose policy admits a migration agent (which
      can export the guest's memory to another host). Off.
    - ``snp_max_vmpl``: the highest VMPL an SEV-SNP report may be requested from (0: the guest's most
      privileged level; a higher one means a more privileged layer, e.g. a paravisor, sits below).
    - ``intel_collateral``: per format (``"tdx"``, ``"sgx"``), Intel collateral (TCB info, QE identity,
      CRLs; a :class:`~sealroom.attestation.collateral.Collateral`) evaluated with every quote: the
      PCK chain must not be revoked and the platform's TCB status must not be out of date (unless
      ``allow_out_of_date``); Revoked is always refused. Without it, quotes are verified but Intel's
      view of the platform's patch level is not consulted.
    - ``platform_roots``: per hardware format (``"sev-snp"``, ``"tdx"``, ``"sgx"``, ``"nitro"``), root
      certificates that replace the vendor roots built in and pinned (for a private PKI or tests).
    - ``max_age``: evidence older than this (by its own ``issued_at``) is refused.
    - ``clock_skew``: evidence dated more than this in the future is refused.
    """

    measurements: frozenset[str]
    allow_simulated: bool = False
    simulated_roots: tuple[x509.Certificate, ...] = ()
    allow_debug: bool = False
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    max_age: timedelta = timedelta(minutes=5)
    clock_skew: timedelta = timedelta(seconds=30)
    platform_roots: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    expect: Mapping[str, frozenset[str]] = field(default_factory=dict)
    snp_allow_migration_agent: bool = False
    snp_max_vmpl: int = 0
    intel_collateral: Mapping[str, Collateral] = field(default_factory=dict)
    allow_out_of_date: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", _measurements(self.measurements))
        if type(self.snp_max_vmpl) is not int or not 0 <= self.snp_max_vmpl <= 3:
            raise ValueError("snp_max_vmpl must be an int from 0 to 3")
        for fmt in self.intel_collateral:
            if fmt not in ("tdx", "sgx"):
                raise ValueError(f"intel_collateral applies to tdx and sgx quotes, not {fmt!r}")
        object.__setattr__(self, "intel_collateral", MappingProxyType(dict(self.intel_collateral)))
        for name in ("allow_simulated", "allow_debug", "snp_allow_migration_agent", "allow_out_of_date"):
            if type(getattr(self, name)) is not bool:
                raise TypeError(f"{name} must be bool")
        roots = self.simulated_roots
        if isinstance(roots, x509.Certificate):
            raise TypeError("simulated_roots must be a tuple of certificates, not one certificate")
        roots = tuple(roots)
        for root in roots:
            if not isinstance(root, x509.Certificate):
                raise TypeError(f"simulated_roots must hold x509.Certificate, not {type(root).__name__}")
        object.__setattr__(self, "simulated_roots", roots)
        object.__setattr__(self, "min_tcb", freeze_tcb(self.min_tcb, name="min_tcb"))
        platform_roots: dict[str, tuple[x509.Certificate, ...]] = {}
        for fmt, certs in dict(self.platform_roots).items():
            if fmt not in HARDWARE_FORMATS:
                raise ValueError(f"platform_roots names {fmt!r}; hardware formats are {', '.join(HARDWARE_FORMATS)}")
            certs = (certs,) if isinstance(certs, x509.Certificate) else tuple(certs)
            if not certs or not all(isinstance(c, x509.Certificate) for c in certs):
                raise TypeError(f"platform_roots[{fmt!r}] must be a non-empty tuple of x509.Certificate")
            platform_roots[fmt] = certs
        object.__setattr__(self, "platform_roots", MappingProxyType(platform_roots))
        expect: dict[str, frozenset[str]] = {}
        for key, values in dict(self.expect).items():
            platform, dot, name = key.partition(".")
            if not dot or not name or platform not in HARDWARE_FORMATS:
                raise ValueError(f"expect key {key!r} must be '<platform>.<measurement name>', e.g. 'tdx.rtmr1'")
            expect[key] = _measurements(values)
        object.__setattr__(self, "expect", MappingProxyType(expect))
        if not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0):
            raise ValueError("max_age must be a positive timedelta")
        if not isinstance(self.clock_skew, timedelta) or self.clock_skew < timedelta(0):
            raise ValueError("clock_skew must be a non-negative timedelta")

    def simulated_root_fingerprints(self) -> frozenset[str]:
        """SHA-256 fingerprints (hex) of the DER of the pinned simulated roots."""
        return frozenset(
            hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).hexdigest() for r in self.simulated_roots
        )
