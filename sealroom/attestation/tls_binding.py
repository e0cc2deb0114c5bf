"""Evidence that binds the enclave's TLS key: one check for every caller that pins its certificate.

The enclave worker makes its TLS key at start (enclave_worker/tls.py) and every ``Attest`` binds the
SHA-256 of its certificate's SubjectPublicKeyInfo in the report data
(``report_data_for(..., tls_key_sha256=...)``). A caller pins the certificate the server presented,
asks for evidence over that pinned channel with a fresh nonce, and accepts the channel only if the
evidence binds that certificate's key: a relay, or any certificate not made inside the attested
worker, fails here (``check = "tls_binding"``). docs/wire.md.
"""

from __future__ import annotations

from sealroom.attestation.appraisal import AppraisalPolicy
from sealroom.attestation.evidence import Claims, Evidence, report_data_for
from sealroom.attestation.policy import verify_evidence
from sealroom.errors import AttestationError
from sealroom.pki import spki_sha256


def verify_enclave_evidence(
    evidence: Evidence,
    policy: AppraisalPolicy,
    *,
    hpke_public_key: bytes,
    signing_public_key: bytes,
    nonce: bytes,
    tls_cert: bytes | None,
    claimed_tls_key_sha256: bytes = b"",
) -> Claims:
    """Appraise ``evidence`` for a job's keys and ``nonce``; with ``tls_cert`` (the PEM certificate the
    caller's channel is pinned to) it must also bind that certificate's key. ``None``: a plaintext link,
    nothing to bind. ``claimed_tls_key_sha256`` (what the Attest answer says the evidence binds) only
    names the failure: evidence that binds another TLS key is refused with ``check = "tls_binding"``."""
    if tls_cert is not None and not tls_cert:
        raise AttestationError(
            "the enclave presented no TLS certificate to bind; refusing to send to it over this link",
            details={"check": "tls_binding"},
        )
    try:
        key_sha256 = spki_sha256(tls_cert) if tls_cert else None
    except ValueError:
        raise AttestationError("the enclave's TLS certificate is malformed", details={"check": "tls_binding"}) from None

    def verify(tls_key: bytes | None) -> Claims:
        expected = report_data_for(
            hpke_public_key=hpke_public_key, signing_public_key=signing_public_key, nonce=nonce, tls_key_sha256=tls_key
        )
        return verify_evidence(evidence, policy=policy, expected_report_data=expected, expected_nonce=nonce)

    try:
        return verify(key_sha256)
    except AttestationError as err:
        if key_sha256 is None or err.details.get("check") != "report_data" or not claimed_tls_key_sha256:
            raise
        if claimed_tls_key_sha256 == key_sha256:
            raise
        try:  # the evidence is genuine for these keys, but binds another TLS key: someone else answered
            verify(claimed_tls_key_sha256)
        except (AttestationError, ValueError):
            raise err from None
        raise AttestationError(
            "the enclave's evidence does not bind the TLS certificate this link is pinned to: another server "
            "(a relay, or a certificate not made inside the attested worker) answered; nothing was sent",
            details={"check": "tls_binding"},
        ) from None
