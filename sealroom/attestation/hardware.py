"""Hardware evidence inside the relying party's appraisal: the per-format verifiers of
:func:`sealroom.attestation.verify_evidence` for ``sev-snp``, ``tdx``, ``sgx`` and ``nitro``.

Each one verifies the raw evidence (``Evidence.evidence``) with the platform's offline verifier,
against the built-in pinned vendor roots, and normalises the result to :class:`Claims` for the
shared appraisal (nonce, report data, measurement allowlist, debug, minimum TCB, freshness).

Freshness and the nonce: SEV-SNP, TDX and SGX reports carry no nonce and no time. The enclave puts
``report_data_for(job keys, nonce)`` into their 64-byte report data, so the report-data check is
what binds the relying party's fresh nonce; the envelope's nonce must match too, and the claims'
issue time is the verification time. Nitro documents carry both a nonce and a signed timestamp,
and must carry the 64 report-data bytes as ``user_data``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from cryptography import x509

from sealroom.attestation import nitro, sgx, snp, tdx
from sealroom.attestation.appraisal import AppraisalPolicy
from sealroom.attestation.collateral import check_tcb_status
from sealroom.attestation.encoding import split_der_certificates
from sealroom.attestation.evidence import REPORT_DATA_BYTES, Claims, Evidence
from sealroom.attestation.offline import load_certificate, verify_snp_with
from sealroom.attestation.platform import PlatformClaims
from sealroom.errors import AttestationError

__all__ = [
    "verify_snp_evidence",
    "verify_tdx_evidence",
    "verify_sgx_evidence",
    "verify_nitro_evidence",
    "evidence_measurement",
    "evidence_report_data",
]


def _claims(pc: PlatformClaims, evidence: Evidence, now: datetime) -> Claims:
    if len(pc.report_data) != REPORT_DATA_BYTES:
        raise AttestationError(
            f"the {pc.platform} evidence binds {len(pc.report_data)} bytes of report data, not the "
            f"{REPORT_DATA_BYTES} the enclave's keys and the nonce take",
            details={"check": "report_data"},
        )
    return Claims(
        platform=pc.platform,
        measurement=pc.measurement,
        debug=pc.debug,
        tcb=dict(pc.tcb),
        report_data=pc.report_data,
        nonce=pc.nonce if pc.nonce is not None else evidence.nonce,
        issued_at=pc.issued_at or now,
        simulated=False,
        measurements=pc.measurements,
    )


def _roots(policy: AppraisalPolicy, fmt: str) -> list[x509.Certificate] | None:
    """The relying party's replacement roots for ``fmt``, or None for the pinned vendor roots."""
    roots = policy.platform_roots.get(fmt)
    return list(roots) if roots else None


def _with_collateral(
    verify: Callable[..., PlatformClaims], fmt: str, evidence: Evidence, policy: AppraisalPolicy, now: datetime
) -> PlatformClaims:
    """A DCAP quote verified, and appraised against Intel's collateral where the policy holds some."""
    collateral = policy.intel_collateral.get(fmt)
    pc = verify(evidence.evidence, roots=_roots(policy, fmt), now=now, collateral=collateral)
    if collateral is not None:
        check_tcb_status(pc.details, allow_out_of_date=policy.allow_out_of_date, how_to_allow="trust.allow_out_of_date")
    return pc


def verify_snp_evidence(evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims:
    """An SEV-SNP report with its VCEK (or VLEK) chain in ``aux``, and the policy's guest-policy bits."""
    try:
        certs = [load_certificate(der) for der in split_der_certificates(evidence.aux)]
    except ValueError:
        raise AttestationError(
            "SEV-SNP evidence must carry its VCEK (and optionally the ASK), or its VLEK and ASVK, as DER "
            "certificates in aux",
            details={"check": "envelope"},
        ) from None
    pc = verify_snp_with(evidence.evidence, certs, roots=_roots(policy, "sev-snp"), now=now)
    _snp_guest_policy(pc, policy)
    return _claims(pc, evidence, now)


def _snp_guest_policy(pc: PlatformClaims, policy: AppraisalPolicy) -> None:
    """The SEV-SNP guest policy bits and VMPL the relying party's policy governs."""
    if pc.details.get("migration_agent") and not policy.snp_allow_migration_agent:
        raise AttestationError(
            "the SEV-SNP guest policy admits a migration agent, which can export the guest's memory; the trust"
            " policy does not set snp_allow_migration_agent = true",
            details={"check": "migration_agent"},
        )
    vmpl = pc.details.get("vmpl", 0)
    if vmpl > policy.snp_max_vmpl:
        raise AttestationError(
            f"the SEV-SNP report was requested at VMPL {vmpl}, above the trust policy's snp_max_vmpl"
            f" {policy.snp_max_vmpl}: a more privileged layer runs below the enclave",
            details={"check": "vmpl"},
        )


def verify_tdx_evidence(evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims:
    """A TDX quote, with Intel's collateral where the policy holds some."""
    return _claims(_with_collateral(tdx.verify_tdx, "tdx", evidence, policy, now), evidence, now)


def verify_sgx_evidence(evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims:
    """An SGX quote, with Intel's collateral where the policy holds some."""
    return _claims(_with_collateral(sgx.verify_sgx, "sgx", evidence, policy, now), evidence, now)


def verify_nitro_evidence(evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims:
    """A Nitro attestation document (COSE_Sign1), which signs its own nonce and time."""
    return _claims(nitro.verify_nitro(evidence.evidence, roots=_roots(policy, "nitro"), now=now), evidence, now)


def evidence_measurement(evidence: Evidence) -> str:
    """The launch measurement in hardware ``evidence``, parsed but NOT verified.

    For an enclave worker naming its own measurement at start-up (what it logs and reports in
    ``GetInfo``); a relying party learns the measurement only from :func:`verify_evidence`.
    """
    parsers: dict[str, Callable[[bytes], str]] = {
        "sev-snp": snp.report_measurement,
        "tdx": tdx.quote_measurement,
        "sgx": sgx.quote_measurement,
        "nitro": nitro.document_measurement,
    }
    parse = parsers.get(evidence.format)
    if parse is None:
        raise AttestationError(f"{evidence.format!r} is not a hardware format", details={"check": "format"})
    return parse(evidence.evidence)


def evidence_report_data(evidence: Evidence) -> bytes:
    """The report data bound into hardware ``evidence`` (SNP/TDX/SGX report data, Nitro user_data),
    parsed but NOT verified: for an attester checking that the platform answered its request."""
    parsers: dict[str, Callable[[bytes], bytes]] = {
        "sev-snp": snp.report_report_data,
        "tdx": tdx.quote_report_data,
        "sgx": sgx.quote_report_data,
        "nitro": nitro.document_user_data,
    }
    parse = parsers.get(evidence.format)
    if parse is None:
        raise AttestationError(f"{evidence.format!r} is not a hardware format", details={"check": "format"})
    return parse(evidence.evidence)
