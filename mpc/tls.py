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
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealroom.canonical import canonical_json
from sealroom.errors import MpcError
from sealroom.pki import CA_KEY_USAGE

VALIDITY = datetime.timedelta(hours=6)


def player_cn(index: int) -> str:
    return f"MPyC party {index}"


def _player_name(index: int) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, player_cn(index))])


def _validity(now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    """A certificate's not-before and not-after: from five minutes ago (clock skew) for VALIDITY."""
    return now - datetime.timedelta(minutes=5), now + VALIDITY


def _ca_certificate(
    name: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    *,
    constraints: x509.NameConstraints | None = None,
) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only (path length 0),
    optionally name-constrained."""
    not_before, not_after = _validity(now)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.add_extension(CA_KEY_USAGE, critical=True).sign(key, hashes.SHA256())


def _player_certificate(
    index: int,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> x509.Certificate:
    """Player ``index``'s certificate, usable as TLS client and server. No subjectAltName: MPyC's
    peers check the name ``MPyC party <i>`` against the CN."""
    not_before, not_after = _validity(now)
    return (
        x509.CertificateBuilder()
        .subject_name(_player_name(index))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


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
        self.certificate = _ca_certificate(name, self._key, self._now)

    @property
    def ca_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, index: int, public_key: ec.EllipticCurvePublicKey) -> bytes:
        """A certificate (PEM) for player ``index`` on ``public_key``, usable as TLS client and server.

        No subjectAltName: MPyC's peers check the name ``MPyC party <i>`` against the CN."""
        cert = _player_certificate(index, public_key, self._name, self._key, self._now)
        return cert.public_bytes(serialization.Encoding.PEM)

    def credentials(self, index: int) -> PlayerCredentials:
        """Key and certificate for player ``index`` generated here (for players run on this host)."""
        key = generate_player_key()
        return PlayerCredentials(index, self.ca_pem, self.issue(index, key.public_key()), key_pem(key))


# --- players at different owners: one name-constrained CA per player, signed by its identity key ----

OFFER_DOMAIN = b"sealroom/v1/mpc-player-ca\x00"


def _identity_error(index: int, what: str) -> MpcError:
    return MpcError(
        f"MPC player {index}'s certificate offer {what}; the session cannot start",
        details={"reason": "identity", "player": index},
    )


def offer_message(session: str, index: int, ca_der: bytes) -> bytes:
    """What a player's identity key signs: the session (plan hash and stage), its index, its CA."""
    body = {"session": session, "index": index, "ca_sha256": hashlib.sha256(ca_der).hexdigest()}
    return OFFER_DOMAIN + canonical_json(body)


@dataclass(frozen=True)
class PlayerOffer:
    """A player's public offer: its own CA certificate (PEM), signed by the player's identity key
    (an owner's Ed25519 key, the enclave's attested job key, the coordinator's key)."""

    session: str
    index: int
    ca_pem: bytes
    signature: bytes

    def to_dict(self) -> dict[str, object]:
        return {
            "session": self.session,
            "index": self.index,
            "ca_pem": self.ca_pem.decode("ascii"),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PlayerOffer:
        return cls(
            str(doc["session"]), int(doc["index"]), str(doc["ca_pem"]).encode("ascii"), bytes.fromhex(doc["signature"])
        )


class PlayerIdentity:
    """Where one player runs: its own CA, *name-constrained* to ``MPyC party <index>`` (so it can
    issue a certificate for no other player), and its TLS key and certificate under that CA.

    The player's identity key signs :meth:`offer`; :meth:`credentials` verifies every player's
    offer against the identity keys the plan names and returns the credentials MPyC needs, with
    the bundle of all players' CAs as ``mpyc_ca.crt``. No party can then pose as another player:
    a peer's certificate must chain to that peer's own CA (name constraints), must name the index
    the peer announces (checked where players connect and, by :mod:`mpc.player`, where they
    listen), and every CA in the bundle is signed by the identity the plan gives that index.
    """

    def __init__(self, session: str, index: int, *, now: datetime.datetime | None = None):
        self.session = session
        self.index = index
        now = now or datetime.datetime.now(datetime.UTC)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._key = generate_player_key()
        ca_name = _ca_name(session, index)
        only_this_player = x509.NameConstraints(
            permitted_subtrees=[x509.DirectoryName(_player_name(index))], excluded_subtrees=None
        )
        self.ca = _ca_certificate(ca_name, self._ca_key, now, constraints=only_this_player)
        self.certificate = _player_certificate(index, self._key.public_key(), ca_name, self._ca_key, now)

    def offer(self, sign: Callable[[bytes], bytes]) -> PlayerOffer:
        """This player's offer, signed with ``sign`` (the identity key's ``sign`` method)."""
        ca_der = self.ca.public_bytes(serialization.Encoding.DER)
        pem = self.ca.public_bytes(serialization.Encoding.PEM)
        return PlayerOffer(self.session, self.index, pem, sign(offer_message(self.session, self.index, ca_der)))

    def credentials(
        self, offers: Sequence[PlayerOffer], identities: Mapping[int, Ed25519PublicKey]
    ) -> PlayerCredentials:
        """Verify every player's offer against ``identities`` (index -> the identity key the plan
        names) and return this player's credentials with the bundle of verified CAs. Raises
        :class:`MpcError` naming the first player whose offer does not verify."""
        by_index: dict[int, PlayerOffer] = {}
        for offer in offers:
            if offer.index in by_index:
                raise _identity_error(offer.index, "is given twice")
            by_index[offer.index] = offer
        if set(by_index) != set(identities):
            missing = sorted(set(identities) - set(by_index)) or sorted(set(by_index) - set(identities))
            raise _identity_error(missing[0], "is missing (or not expected)")
        bundle = []
        for index in sorted(by_index):
            bundle.append(verify_offer(by_index[index], session=self.session, identity=identities[index]))
        own = self.ca.public_bytes(serialization.Encoding.PEM)
        if by_index[self.index].ca_pem.strip() != own.strip():
            raise _identity_error(self.index, "is not this player's own CA")
        return PlayerCredentials(
            self.index,
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle),
            self.certificate.public_bytes(serialization.Encoding.PEM),
            key_pem(self._key),
        )


def identity_keys(
    named: Mapping[int, str | None], enclave: Ed25519PublicKey | None = None
) -> dict[int, Ed25519PublicKey]:
    """Index -> the key each player's offer must be signed with: the key (hex) the plan names for an
    owner's player or a helper (``sealroom.planning.plan.mpc_player_keys``), and ``enclave``, the attested job
    key, for the enclave's player (None in ``named``). Raises MpcError naming a player without one."""
    out: dict[int, Ed25519PublicKey] = {}
    for i, key in named.items():
        if key is not None:
            out[i] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
        elif enclave is not None:
            out[i] = enclave
        else:
            raise _identity_error(i, "is the enclave's, and no attested job key was given for it")
    return out


def _ca_name(session: str, index: int) -> x509.Name:
    """A player CA's exact subject (a common name is at most 64 characters: the session by its digest)."""
    tag = hashlib.sha256(session.encode()).hexdigest()[:16]
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Sealroom MPC player {index} CA {tag}")])


def verify_offer(offer: PlayerOffer, *, session: str, identity: Ed25519PublicKey) -> x509.Certificate:
    """The offer's CA certificate, once its signature, session and name constraint are checked."""
    if offer.session != session:
        raise _identity_error(offer.index, "is for another session")
    try:
        ca = x509.load_pem_x509_certificate(offer.ca_pem)
    except ValueError:
        raise _identity_error(offer.index, "carries no PEM certificate") from None
    try:
        identity.verify(
            offer.signature, offer_message(session, offer.index, ca.public_bytes(serialization.Encoding.DER))
        )
    except InvalidSignature:
        raise _identity_error(offer.index, "is not signed by the identity the plan names for it") from None
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
        basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _identity_error(offer.index, "carries a CA without the name constraint to its own index") from None
    expected = [x509.DirectoryName(_player_name(offer.index))]
    if ca.subject != _ca_name(session, offer.index) or ca.issuer != ca.subject:
        raise _identity_error(offer.index, "carries a CA with another name than this session gives player's CA")
    if (
        not constraints.critical
        or list(constraints.value.permitted_subtrees or []) != expected
        or constraints.value.excluded_subtrees
        or not basic.ca
        or basic.path_length != 0
    ):
        raise _identity_error(offer.index, "carries a CA that may issue certificates for other players")
    return ca
