"""Per-session TLS credentials for MPC players (mutual TLS, MPyC's ``--ssl``).

Each session gets its own CA (:class:`SessionCA`, ``CA:TRUE``, valid for hours, its key held only by
whoever issues the session's certificates); each player gets a certificate with the CN MPyC checks
(``MPyC party <i>``). A player's key can be generated where the player runs
(:func:`generate_player_key`) so that only its public key reaches the issuer. A certificate from
any other CA is refused by every peer.

MPyC checks the peer's name only on the connecting side; :mod:`mpc.player` adds the check where it
listens, so a certificate for ``MPyC party <j>`` is accepted only from a peer that announces index
``j``. Whoever holds a session CA's key can still issue a certificate for any index: only the
runner that starts every player (:func:`mpc.session.run_session`) holds one; see docs/mpc.md for
players run at different owners.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(hours=6)


def player_cn(index: int) -> str:
    return f"MPyC party {index}"


def generate_player_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for one player and one session."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class PlayerCredentials:
    """What one player needs for ``--ssl``: the session CA's certificate, its own certificate and key."""

    index: int
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def install(self, directory: Path) -> None:
        """Write ``directory/.config/{mpyc_ca.crt, party_<i>.crt, party_<i>.key}`` (key mode 0600)."""
        config = directory / ".config"
        config.mkdir(mode=0o700, parents=True, exist_ok=True)
        (config / "mpyc_ca.crt").write_bytes(self.ca_pem)
        (config / f"party_{self.index}.crt").write_bytes(self.cert_pem)
        path = config / f"party_{self.index}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)


class SessionCA:
    """A certificate authority for one MPC session."""

    def __init__(self, session_id: str, *, now: datetime.datetime | None = None):
        self._now = now or datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Sealroom MPC session {session_id}")])
        self._name = name
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def ca_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, index: int, public_key: ec.EllipticCurvePublicKey) -> bytes:
        """A certificate (PEM) for player ``index`` on ``public_key``, usable as TLS client and server.

        No subjectAltName: MPyC's peers check the name ``MPyC party <i>`` against the CN."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, player_cn(index))])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def credentials(self, index: int) -> PlayerCredentials:
        """Key and certificate for player ``index`` generated here (for players run on this host)."""
        key = generate_player_key()
        return PlayerCredentials(index, self.ca_pem, self.issue(index, key.public_key()), key_pem(key))
