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
from typing import Any

from sealroom.attestation.evidence import REPORT_DATA_BYTES, Claims, Evidence
from sealroom.attestation.platform import PlatformClaims
from sealroom.errors import AttestationError

FORMATS = ("sev-snp", "tdx", "sgx", "nitro")


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


def _roots(policy: Any, fmt: str) -> list[Any] | None:
    """The relying party's replacement roots for ``fmt``, or None for the pinned vendor roots."""
    roots = policy.platform_roots.get(fmt) if policy is not None else None
    return list(roots) if roots else None


def _with_collateral(
    verify: Callable[..., PlatformClaims], fmt: str, evidence: Evidence, policy: Any, now: datetime
) -> PlatformClaims:
    """A DCAP quote verified, and appraised against Intel's collateral where the policy holds some."""
    collateral = policy.intel_collateral.get(fmt) if policy is not None else None
    pc = verify(evidence.evidence, roots=_roots(policy, fmt), now=now, collateral=collateral)
    if collateral is not None:
        from sealroom.attestation.collateral import check_tcb_status

        check_tcb_status(pc.details, allow_out_of_date=policy.allow_out_of_date, how_to_allow="trust.allow_out_of_date")
    return pc


def _snp(evidence: Evidence, *, policy: Any, now: datetime) -> Claims:
    from sealroom.attestation.offline import load_certificate, verify_snp_with
    from sealroom.attestation.simulated import _split_der_certificates

    try:
        certs = [load_certificate(der) for der in _split_der_certificates(evidence.aux)]
    except ValueError:
        raise AttestationError(
            "SEV-SNP evidence must carry its VCEK (and optionally the ASK), or its VLEK and ASVK, as DER "
            "certificates in aux",
            details={"check": "envelope"},
        ) from None
    pc = verify_snp_with(evidence.evidence, certs, roots=_roots(policy, "sev-snp"), now=now)
    if policy is not None:
        _snp_guest_policy(pc, policy)
    return _claims(pc, evidence, now)


def _snp_guest_policy(pc: PlatformClaims, policy: Any) -> None:
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


def _tdx(evidence: Evidence, *, policy: Any, now: datetime) -> Claims:
    from sealroom.attestation.tdx import verify_tdx

    return _claims(_with_collateral(verify_tdx, "tdx", evidence, policy, now), evidence, now)


def _sgx(evidence: Evidence, *, policy: Any, now: datetime) -> Claims:
    from sealroom.attestation.sgx import verify_sgx

    return _claims(_with_collateral(verify_sgx, "sgx", evidence, policy, now), evidence, now)


def _nitro(evidence: Evidence, *, policy: Any, now: datetime) -> Claims:
    from sealroom.attestation.nitro import verify_nitro

    return _claims(verify_nitro(evidence.evidence, roots=_roots(policy, "nitro"), now=now), evidence, now)


VERIFIERS: dict[str, Callable[..., Claims]] = {"sev-snp": _snp, "tdx": _tdx, "sgx": _sgx, "nitro": _nitro}


def evidence_measurement(evidence: Evidence) -> str:
    """The launch measurement in hardware ``evidence``, parsed but NOT verified.

    For an enclave worker naming its own measurement at start-up (what it logs and reports in
    ``GetInfo``); a relying party learns the measurement only from :func:`verify_evidence`.
    """
    from sealroom.attestation import nitro, sgx, snp, tdx

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
    from sealroom.attestation import dcap, nitro, snp, tdx

    raw = evidence.evidence
    if evidence.format == "sev-snp":
        return snp._parse(raw).report_data
    if evidence.format == "tdx":
        q = tdx.parse_tdx_quote(raw)
        off, size = tdx._FIELDS["report_data"]
        return q.body[off : off + size]
    if evidence.format == "sgx":
        q = dcap.parse_quote(raw, label="SGX", version=3, tee_type=dcap.TEE_TYPE_SGX, body_size=dcap.SGX_REPORT_SIZE)
        return q.body[0x140:0x180]
    if evidence.format == "nitro":
        _, _, _, payload = nitro._decode(raw)
        user_data = payload.get("user_data")
        return user_data if isinstance(user_data, bytes) else b""
    raise AttestationError(f"{evidence.format!r} is not a hardware format", details={"check": "format"})
