"""Attestation: evidence envelopes, per-format verifiers, and per-relying-party appraisal.

A relying party (a data owner's agent) sends a fresh nonce, receives :class:`Evidence` with the
enclave's public keys, computes :func:`report_data_for` over those keys and the nonce, and calls
:func:`verify_evidence` with its own :class:`AppraisalPolicy`. It gets :class:`Claims` back, or an
:class:`~sealroom.errors.AttestationError` whose ``details["check"]`` names the failed step.

Formats: ``simulated`` (:mod:`sealroom.attestation.simulated`: no TEE, for development, refused
unless a policy sets ``allow_simulated``), and the hardware formats ``sev-snp``, ``tdx``, ``sgx``
and ``nitro`` (:mod:`sealroom.attestation.hardware`), verified offline against pinned vendor roots.
"""

from sealroom.attestation.appraisal import AppraisalPolicy
from sealroom.attestation.evidence import SIMULATED, Claims, Evidence, report_data_for
from sealroom.attestation.measurement import enclave_measurement
from sealroom.attestation.policy import verify_evidence
from sealroom.attestation.simulated import (
    DevRoot,
    SimulatedAttester,
    dev_init,
    load_dev_root,
    load_root_certificate,
)
from sealroom.attestation.tls_binding import verify_enclave_evidence

__all__ = [
    "SIMULATED",
    "Evidence",
    "Claims",
    "report_data_for",
    "AppraisalPolicy",
    "verify_evidence",
    "verify_enclave_evidence",
    "DevRoot",
    "dev_init",
    "load_dev_root",
    "load_root_certificate",
    "SimulatedAttester",
    "enclave_measurement",
]
