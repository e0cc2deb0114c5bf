"""Appraisal: does this evidence come from an enclave this relying party trusts, right now?

:func:`verify_evidence` is the one entry point. It dispatches on ``Evidence.format`` to a per-format
verifier (cryptography: certificate chain, signature) that returns normalised :class:`Claims`, then
appraises those claims against the relying party's own :class:`AppraisalPolicy` (nonce, report data,
measurement allowlist, debug, minimum TCB, freshness). It raises :class:`AttestationError` at the
first failed step, with ``details["check"]`` naming that step, and returns claims only when every
step passed. It never returns a bool.

Each step's failure says which check failed because evidence and claims are public (a measurement
is a hash of public code); an operator needs that to fix a deployment, and an attacker learns
nothing it did not send. Report data is secret-free too: a hash of public keys and the nonce.

Simulated evidence (no TEE) passes only under ``allow_simulated=True`` with its dev root pinned, and
every acceptance is logged at WARNING.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sealroom.attestation import hardware
from sealroom.attestation.appraisal import AppraisalPolicy
from sealroom.attestation.encoding import as_bytes, iso_utc
from sealroom.attestation.evidence import MIN_NONCE_BYTES, REPORT_DATA_BYTES, SIMULATED, Claims, Evidence
from sealroom.attestation.simulated import verify_simulated
from sealroom.errors import AttestationError

__all__ = ["AppraisalPolicy", "verify_evidence", "SUPPORTED_FORMATS"]

logger = logging.getLogger(__name__)


class FormatVerifier(Protocol):
    """``verifier(evidence, *, policy, now) -> Claims``: checks format-specific crypto, appraises nothing."""

    def __call__(self, evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims: ...


# The one registry of verifiers, one per format: each returns Claims whose report_data (and nonce,
# where the platform signs one) are the ones the hardware signed. Hardware formats verify against
# pinned vendor roots. The verifiers import the policy type; nothing they import points back here.
_VERIFIERS: Mapping[str, FormatVerifier] = {
    SIMULATED: verify_simulated,
    "sev-snp": hardware.verify_snp_evidence,
    "tdx": hardware.verify_tdx_evidence,
    "sgx": hardware.verify_sgx_evidence,
    "nitro": hardware.verify_nitro_evidence,
}
SUPPORTED_FORMATS: tuple[str, ...] = tuple(sorted(_VERIFIERS))


def _refuse(check: str, message: str) -> AttestationError:
    return AttestationError(message, details={"check": check})


def _seconds(delta: timedelta) -> str:
    return f"{delta.total_seconds():.0f} s"


def _appraise(
    claims: Claims,
    evidence: Evidence,
    *,
    policy: AppraisalPolicy,
    expected_report_data: bytes,
    expected_nonce: bytes,
    now: datetime,
) -> None:
    """Steps 5-11: check verified claims against the relying party's policy and expectations."""
    _check_simulated(claims, policy)
    _check_nonce(claims, evidence, expected_nonce)
    _check_report_data(claims, expected_report_data)
    _check_measurement(claims, policy)
    _check_named_measurements(claims, policy)
    _check_debug(claims, policy)
    _check_tcb(claims, policy)
    _check_freshness(claims, policy, now)


def _check_simulated(claims: Claims, policy: AppraisalPolicy) -> None:
    """Step 5 (defence in depth: a verifier for any format may report simulated claims)."""
    if claims.simulated and not policy.allow_simulated:
        raise _refuse(
            "simulated",
            "simulated evidence refused: the relying party's trust policy does not set allow_simulated = true",
        )


def _check_nonce(claims: Claims, evidence: Evidence, expected_nonce: bytes) -> None:
    """Step 6: the nonce the evidence signs is the one this relying party sent (and so is the envelope's)."""
    if not (hmac.compare_digest(claims.nonce, expected_nonce) and hmac.compare_digest(evidence.nonce, expected_nonce)):
        raise _refuse(
            "nonce",
            "the evidence answers a different nonce than the one this relying party sent: it is replayed"
            " or meant for another request; request fresh evidence with a new nonce",
        )


def _check_report_data(claims: Claims, expected_report_data: bytes) -> None:
    """Step 7: report data binds the keys the enclave presented (and the nonce) into the evidence."""
    if not hmac.compare_digest(claims.report_data, expected_report_data):
        raise _refuse(
            "report_data",
            "the evidence's report data does not match the enclave's presented keys and nonce: the keys"
            " offered are not the ones the attested enclave holds; do not send it data",
        )


def _check_measurement(claims: Claims, policy: AppraisalPolicy) -> None:
    """Step 8: measurement allowlist."""
    if not policy.measurements:
        raise _refuse(
            "measurement",
            f"enclave measurement {claims.measurement} refused: the trust policy's measurement allowlist is"
            " empty, so every enclave is refused; add the measurements you trust",
        )
    if claims.measurement not in policy.measurements:
        raise _refuse(
            "measurement",
            f"enclave measurement {claims.measurement} is not in the trust policy's allowlist; if you"
            " trust this enclave build, add it to the accepted measurements",
        )


def _check_named_measurements(claims: Claims, policy: AppraisalPolicy) -> None:
    """Step 8b: the named measurements this relying party pins for the platform (TDX RTMRs...)."""
    for key, accepted in policy.expect.items():
        platform, _, name = key.partition(".")
        if platform != claims.platform:
            continue
        reported = claims.measurements.get(name)
        if reported is None or reported not in accepted:
            raise _refuse(
                "measurement",
                f"the enclave's {name} is {reported or 'absent'}, not one the trust policy accepts ({key});"
                " if you trust this enclave image, add the value it reports",
            )


def _check_debug(claims: Claims, policy: AppraisalPolicy) -> None:
    """Step 9: debug enclaves expose their memory to the host."""
    if claims.debug and not policy.allow_debug:
        raise _refuse(
            "debug",
            "the enclave runs in debug mode (its memory is readable by the host) and the trust policy"
            " does not set allow_debug = true; run the enclave in production mode",
        )


def _check_tcb(claims: Claims, policy: AppraisalPolicy) -> None:
    """Step 10: minimum TCB, component by component (a platform-qualified key only for that platform)."""
    for key, minimum in policy.min_tcb.items():
        platform, dot, component = key.rpartition(".")
        if dot and platform != claims.platform:
            continue
        actual = claims.tcb.get(component)
        if actual is None or actual < minimum:
            shown = "absent" if actual is None else str(actual)
            raise _refuse(
                "tcb",
                f"TCB component {component!r} is {shown}, below the trust policy's minimum {minimum};"
                " update the enclave platform's firmware/microcode or lower min_tcb",
            )


def _check_freshness(claims: Claims, policy: AppraisalPolicy, now: datetime) -> None:
    """Step 11: freshness, by the evidence's own (signed) issue time."""
    age = now - claims.issued_at
    if age > policy.max_age:
        raise _refuse(
            "freshness",
            f"the evidence was issued at {iso_utc(claims.issued_at)}, {_seconds(age)} before"
            f" {iso_utc(now)}, older than the policy's max_age of {_seconds(policy.max_age)};"
            " request fresh evidence",
        )
    if -age > policy.clock_skew:
        raise _refuse(
            "freshness",
            f"the evidence was issued at {iso_utc(claims.issued_at)}, {_seconds(-age)} after"
            f" {iso_utc(now)}, beyond the allowed clock skew of {_seconds(policy.clock_skew)};"
            " check the enclave host's and this machine's clocks",
        )


def verify_evidence(
    evidence: Evidence,
    *,
    policy: AppraisalPolicy,
    expected_report_data: bytes,
    expected_nonce: bytes,
    now: datetime | None = None,
) -> Claims:
    """Verify ``evidence`` and appraise it against ``policy``; return its claims or raise.

    ``expected_report_data`` is what the relying party computed itself (usually
    :func:`~sealroom.attestation.evidence.report_data_for` over the keys the enclave offered and the
    nonce); ``expected_nonce`` is the fresh nonce (>= 16 bytes) it sent. ``now`` (tz-aware) defaults
    to the current time.

    Steps, each raising :class:`AttestationError` with ``details["check"]``:

    1. ``format``: the format has a verifier;
    2. ``simulated``: simulated evidence only if the policy allows it;
    3. ``chain``: the signing key's certificate chains to a pinned root, valid at ``now``;
    4. ``signature``: the report's signature verifies under that key;
    5. ``simulated``: (again, on the normalised claims);
    6. ``nonce``: the signed nonce equals ``expected_nonce``;
    7. ``report_data``: the signed report data equals ``expected_report_data``;
    8. ``measurement``: the measurement is in the allowlist (an empty allowlist refuses all);
    9. ``debug``: not a debug enclave, unless allowed;
    10. ``tcb``: every ``min_tcb`` component is met;
    11. ``freshness``: issued no more than ``max_age`` before ``now`` and no more than
        ``clock_skew`` after it.

    Malformed evidence raises with ``check="envelope"``. Wrong argument types or lengths (a caller
    bug, not a refusal) raise ``TypeError``/``ValueError``.
    """
    # Step 0: arguments (caller bugs, not evidence failures).
    if not isinstance(evidence, Evidence):
        raise TypeError(f"evidence must be an Evidence, not {type(evidence).__name__}")
    if not isinstance(policy, AppraisalPolicy):
        raise TypeError(f"policy must be an AppraisalPolicy, not {type(policy).__name__}")
    expected_report_data = as_bytes("expected_report_data", expected_report_data)
    expected_nonce = as_bytes("expected_nonce", expected_nonce)
    if len(expected_report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"expected_report_data must be {REPORT_DATA_BYTES} bytes, got {len(expected_report_data)}")
    if len(expected_nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"expected_nonce must be at least {MIN_NONCE_BYTES} bytes, got {len(expected_nonce)}")
    if now is None:
        now = datetime.now(UTC)
    elif not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    now = now.astimezone(UTC)

    # Step 1: a verifier for this format.
    verifier = _VERIFIERS.get(evidence.format)
    if verifier is None:
        raise _refuse(
            "format",
            f"evidence format {evidence.format[:64]!r} is not supported yet (this verifier supports:"
            f" {', '.join(SUPPORTED_FORMATS)}); configure the enclave worker to produce a supported format",
        )

    # Steps 2-4: format-specific cryptography -> normalised claims.
    claims = verifier(evidence, policy=policy, now=now)

    # Steps 5-11: appraisal against this relying party's policy.
    _appraise(
        claims,
        evidence,
        policy=policy,
        expected_report_data=expected_report_data,
        expected_nonce=expected_nonce,
        now=now,
    )
    if claims.simulated:
        logger.warning(
            "accepted SIMULATED attestation evidence (measurement %s): no TEE protects this enclave;"
            " accepted only because the trust policy sets allow_simulated",
            claims.measurement,
        )
    return claims
