"""The enclave worker's TLS identity: a key it makes at start, in its own memory, and a certificate
it signs itself. No CA vouches for it: its attestation evidence binds the SHA-256 of the
certificate's public key (``report_data_for(..., tls_key_sha256=...)``, docs/wire.md), and a caller
that checked that evidence pins exactly this certificate. An operator-issued certificate, or a relay
in front of the worker, presents another key, which no evidence of the attested worker binds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sealroom import pki


@dataclass(frozen=True)
class EnclaveIdentity:
    cert_pem: bytes
    key_pem: bytes = b""

    @property
    def key_sha256(self) -> bytes:
        """What the worker's evidence binds (SHA-256 of the certificate's SubjectPublicKeyInfo)."""
        return pki.spki_sha256(self.cert_pem) if self.cert_pem else b""


def make_identity() -> EnclaveIdentity:
    """A fresh key and its self-signed certificate naming ``enclave.sealroom``."""
    cert, key = pki.self_signed("sealroom enclave worker", pki.ENCLAVE_SERVER_NAME)
    return EnclaveIdentity(cert, key)
