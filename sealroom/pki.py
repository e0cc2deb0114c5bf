"""Control-plane identities: a certificate authority and the certificates it issues.

Every Sealroom server and every caller of a restricted RPC is identified by an X.509 certificate
that a collaboration's CA issued. The certificate's subject common name *is* the identity:

- ``coordinator``: the coordinator (client of the agents and the enclave, server for analysts);
- ``party:<name>``: party ``<name>``'s agent (server for the coordinator, client of the enclave).

and its DNS names let a caller check it reached the identity it meant (:func:`server_name`):
``coordinator.sealroom`` and ``<name>.party.sealroom``, plus ``localhost`` and ``127.0.0.1`` for a
platform on one machine. The enclave worker's certificate is not issued here: it makes its own key
at start and its attestation evidence binds it (see docs/wire.md).

:func:`create_ca` and :func:`issue` are what ``sealroom dev init`` uses; operators may use any CA
that issues certificates with these names (docs/operations.md).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COORDINATOR = "coordinator"
ENCLAVE_SERVER_NAME = "enclave.sealroom"  # the DNS name in the enclave's self-made certificate
PARTY_PREFIX = "party:"
NAME_SUFFIX = ".sealroom"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=825)

# A CA's key usage: it signs certificates (and revocation lists) only. Also the MPC session CAs'.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: ``role`` is ``coordinator`` or ``party`` (``name`` its party name)."""

    role: str
    name: str = ""

    @property
    def common_name(self) -> str:
        return COORDINATOR if self.role == "coordinator" else PARTY_PREFIX + self.name

    @classmethod
    def parse(cls, common_name: str) -> Identity | None:
        """The identity a certificate's CN names, or None for a CN that names none."""
        if common_name == COORDINATOR:
            return cls("coordinator")
        if common_name.startswith(PARTY_PREFIX) and common_name[len(PARTY_PREFIX) :].isidentifier():
            return cls("party", common_name[len(PARTY_PREFIX) :])
        return None

    def __str__(self) -> str:
        return self.common_name


def coordinator() -> Identity:
    return Identity("coordinator")


def party(name: str) -> Identity:
    if not name.isidentifier():
        raise ValueError("party names are identifiers")
    return Identity("party", name)


def server_name(identity: Identity) -> str:
    """The DNS name a caller checks the server's certificate against (``ssl_target_name_override``)."""
    if identity.role == "coordinator":
        return "coordinator" + NAME_SUFFIX
    return f"{identity.name}.party{NAME_SUFFIX}"


def spki_sha256(cert_pem: bytes) -> bytes:
    """SHA-256 of a certificate's DER SubjectPublicKeyInfo: what the enclave's evidence binds."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def certificate_identity(cert_pem: bytes) -> Identity | None:
    """The identity a certificate's subject CN names (None: none, or not a certificate)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Identity.parse(str(names[0].value)) if len(names) == 1 else None


def cert_dns_name(cert_pem: bytes) -> str:
    """The first DNS name of a certificate (the name a caller pinning it checks), or ValueError."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise ValueError("the certificate names no DNS name")
    return str(names[0])


def self_signed(
    common_name: str, dns_name: str, *, validity: datetime.timedelta = LEAF_VALIDITY
) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for it naming ``dns_name`` (PEM cert, PEM key):
    the enclave's TLS identity, trusted only by pinning it after its evidence binds the key."""
    key, builder = _self_signed_builder(common_name, datetime.datetime.now(datetime.UTC), validity)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _self_signed_builder(
    common_name: str, now: datetime.datetime, validity: datetime.timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateBuilder]:
    """A new P-256 key and a certificate builder naming ``common_name`` as subject and issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
    )
    return key, builder


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = tmp.open("wb")
    try:
        tmp.chmod(mode)
        fd.write(data)
    finally:
        fd.close()
    tmp.replace(path)


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, cert_path: Path, key_path: Path) -> None:
        _write(key_path, _pem_key(self.key), 0o600)
        _write(cert_path, self.cert_pem, 0o644)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CA:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: the CA key must be an EC key")
        return cls(x509.load_pem_x509_certificate(Path(cert_path).read_bytes()), key)

    def issue(
        self,
        identity: Identity,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        now: datetime.datetime | None = None,
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> tuple[bytes, bytes]:
        """A new key and a certificate for ``identity`` (PEM cert, PEM key), for TLS server and client."""
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(server_name(identity))]
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def create_ca(common_name: str = "Sealroom development CA", *, now: datetime.datetime | None = None) -> CA:
    """A new CA (P-256), valid ten years, that signs end-entity certificates only."""
    key, builder = _self_signed_builder(common_name, now or datetime.datetime.now(datetime.UTC), CA_VALIDITY)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            CA_KEY_USAGE,
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


# -- the development CA (``sealroom dev init``) ---------------------------------------------------

DEV_CA_CERT = "ca.crt"
DEV_CA_KEY = "ca.key"


def cert_stem(identity: Identity) -> str:
    """The file stem of an identity's certificate in a development CA directory."""
    return COORDINATOR if identity.role == "coordinator" else f"party-{identity.name}"


@dataclass(frozen=True)
class DevPKI:
    """A development CA in ``directory`` (``ca.crt``, ``ca.key``) and the certificates it issued
    (``coordinator.crt``/``.key``, ``party-<name>.crt``/``.key``): what ``sealroom dev init`` writes."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / DEV_CA_CERT

    def cert(self, identity: Identity) -> Path:
        return self.directory / f"{cert_stem(identity)}.crt"

    def key(self, identity: Identity) -> Path:
        return self.directory / f"{cert_stem(identity)}.key"

    def ca(self, *, force: bool = False) -> CA:
        """The CA, created on first use. ``force``: replace it (every certificate it issued too)."""
        cert, key = self.ca_cert, self.directory / DEV_CA_KEY
        if cert.exists() and key.exists() and not force:
            return CA.load(cert, key)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = create_ca()
        ca.save(cert, key)
        return ca

    def issue(self, identity: Identity, *, force: bool = False, exist_ok: bool = True) -> bool:
        """Issue ``identity``'s certificate unless it exists (``force``: replace it; ``exist_ok=False``:
        FileExistsError instead of keeping it); True if written."""
        if self.cert(identity).exists() and self.key(identity).exists() and not force:
            if not exist_ok:
                raise FileExistsError(str(self.cert(identity)))
            return False
        cert, key = self.ca().issue(identity)
        _write(self.key(identity), key, 0o600)
        _write(self.cert(identity), cert, 0o644)
        return True
