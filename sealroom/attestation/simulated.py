"""Simulated attestation: a software attester signing reports with a local dev root. NOT A TEE.

There is no trusted hardware behind this format. :func:`dev_init` creates a self-signed ECDSA P-384
"dev root" on the developer's machine; a :class:`SimulatedAttester` holds a fresh attestation key
certified by that root and signs reports claiming whatever measurement it was given. Anyone with the
dev root's private key can therefore forge any claim: simulated evidence proves only "this came from
someone holding that dev root key". It exists so that the whole protocol (nonce, report-data binding,
chain, measurement allowlist, freshness) runs end to end on machines without a TEE.

Relying parties accept it only when their :class:`~sealroom.attestation.policy.AppraisalPolicy` sets
``allow_simulated=True`` *and* pins the dev root certificate; :func:`verify_simulated` is the
per-format verifier that :func:`~sealroom.attestation.policy.verify_evidence` dispatches to.

Wire format (all JSON canonical: sorted keys, no whitespace):

- report: ``{"version":1,"platform":"simulated","simulated":true,"measurement":hex,"debug":bool,
  "tcb":{...},"report_data":hex(64 bytes),"nonce":hex,"issued_at":"YYYY-MM-DDTHH:MM:SS.ffffffZ"}``
- ``Evidence.evidence``: ``{"report": b64(report), "signature": b64(ECDSA-P384-SHA384(report))}``
- ``Evidence.aux``: the certificate chain without the root, as concatenated DER certificates, leaf
  (attestation key) first. The attester sends just its leaf.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from sealroom.attestation.appraisal import AppraisalPolicy
from sealroom.attestation.encoding import (
    MAX_DER_CERTIFICATES,
    as_bytes,
    b64,
    b64decode_field,
    is_lower_hex,
    iso_utc,
    split_der_certificates,
    strict_json_object,
)
from sealroom.attestation.evidence import MIN_NONCE_BYTES, REPORT_DATA_BYTES, SIMULATED, Claims, Evidence, freeze_tcb
from sealroom.canonical import canonical_json
from sealroom.errors import AlreadyExistsError, AttestationError, ConfigError

__all__ = [
    "DEV_ROOT_CERT_FILE",
    "DEV_ROOT_KEY_FILE",
    "DEV_ROOT_COMMON_NAME",
    "ATTESTATION_KEY_COMMON_NAME",
    "REPORT_VERSION",
    "DevRoot",
    "dev_init",
    "load_dev_root",
    "load_root_certificate",
    "SimulatedAttester",
    "verify_simulated",
]

logger = logging.getLogger(__name__)

DEV_ROOT_CERT_FILE = "dev-root.crt"
DEV_ROOT_KEY_FILE = "dev-root.key"
DEV_ROOT_COMMON_NAME = "Sealroom SIMULATED dev attestation root — NOT A TEE"
ATTESTATION_KEY_COMMON_NAME = "Sealroom simulated attestation key"
REPORT_VERSION = 1

_ROOT_VALIDITY = timedelta(days=3652)  # 10 years
_KEY_VALIDITY = timedelta(days=30)
# Backdate notBefore so that a verifier whose clock lags a little still accepts a fresh certificate.
_BACKDATE = timedelta(hours=1)
_CURVE = ec.SECP384R1
_REPORT_KEYS = frozenset(
    {"version", "platform", "simulated", "measurement", "debug", "tcb", "report_data", "nonce", "issued_at"}
)
_EVIDENCE_KEYS = frozenset({"report", "signature"})


# --------------------------------------------------------------------------------------------------
# Dev root: creation and loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevRoot:
    """A simulated-attestation dev root: its certificate, private key, and where they are stored."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_root(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(_CURVE())
    name = _name(DEV_ROOT_COMMON_NAME)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _write_file_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a fresh temp file with ``mode`` in ``path``'s directory, then rename it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond `mode`
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dev_init(directory: Path, *, force: bool = False) -> DevRoot:
    """Create a simulated-attestation dev root in ``directory`` (``sealroom dev init``).

    Writes ``dev-root.crt`` (PEM, 0644: give it to relying parties to pin) and ``dev-root.key``
    (PEM PKCS#8, unencrypted, 0600). Creates ``directory`` with mode 0700 if it does not exist.
    Refuses to replace an existing root with :class:`AlreadyExistsError` unless ``force``: every
    relying party that pinned the old root would stop accepting this machine's evidence.
    """
    directory = Path(directory)
    cert_path = directory / DEV_ROOT_CERT_FILE
    key_path = directory / DEV_ROOT_KEY_FILE
    if not force:
        for existing in (cert_path, key_path):
            if existing.exists() or existing.is_symlink():
                raise AlreadyExistsError(
                    f"{existing} already exists: a simulated-attestation dev root is already set up in"
                    f" {directory}. Keep it, or pass force=True (`sealroom dev init --force`) to replace"
                    " it; relying parties that pinned the old dev-root.crt must then pin the new one",
                    details={"file": str(existing)},
                )
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)
    cert, key = _make_root(datetime.now(UTC))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file_atomically(key_path, key_pem, mode=0o600)
    _write_file_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    logger.warning(
        "created a SIMULATED attestation dev root in %s (no TEE: anyone with %s can forge evidence)",
        directory,
        key_path.name,
    )
    return DevRoot(certificate=cert, private_key=key, cert_path=cert_path, key_path=key_path)


def _read_file(path: Path, *, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: {what} not found; create a dev root with `sealroom dev init`"
            " or point the configuration at the right file",
            details={"file": str(path)},
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})", details={"file": str(path)}) from None


def _parse_certificate(data: bytes, path: Path) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError(
            f"{path}: not a PEM or DER X.509 certificate; use the dev-root.crt written by `sealroom dev init`",
            details={"file": str(path)},
        ) from None


def load_root_certificate(path: Path) -> x509.Certificate:
    """Load a root certificate to pin (what a relying party gets: only ``dev-root.crt``).

    Raises :class:`ConfigError` naming the file if it is missing, malformed, or not a CA certificate.
    """
    path = Path(path)
    cert = _parse_certificate(_read_file(path, what="root certificate"), path)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(
            f"{path}: certificate is not a CA (BasicConstraints CA:TRUE missing), so it cannot be an"
            " attestation root; pin the dev-root.crt written by `sealroom dev init`",
            details={"file": str(path)},
        )
    return cert


def load_dev_root(directory: Path) -> DevRoot:
    """Load the dev root that :func:`dev_init` wrote to ``directory`` (certificate and key).

    Raises :class:`ConfigError` naming the file if either is missing or malformed, or if the key does
    not belong to the certificate.
    """
    directory = Path(directory)
    cert_path = directory / DEV_ROOT_CERT_FILE
    key_path = directory / DEV_ROOT_KEY_FILE
    cert = load_root_certificate(cert_path)
    key_data = _read_file(key_path, what="dev root private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):  # TypeError: encrypted key without a password
        raise ConfigError(
            f"{key_path}: not an unencrypted PEM private key; recreate the dev root with `sealroom dev init --force`",
            details={"file": str(key_path)},
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise ConfigError(
            f"{key_path}: the dev root key must be an ECDSA P-384 key; recreate it with `sealroom dev init --force`",
            details={"file": str(key_path)},
        )
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"{key_path}: this private key does not match the certificate {cert_path.name}; the two"
            " files come from different `sealroom dev init` runs",
            details={"file": str(key_path)},
        )
    try:
        if key_path.stat().st_mode & 0o077:
            logger.warning("%s is readable by other users; run chmod 600 on it", key_path)
    except OSError:  # pragma: no cover - it was just read
        pass
    return DevRoot(certificate=cert, private_key=key, cert_path=cert_path, key_path=key_path)


# --------------------------------------------------------------------------------------------------
# Attester
# --------------------------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _normalise_measurement(measurement: object) -> str:
    if not isinstance(measurement, str):
        raise TypeError(f"measurement must be a hex str, not {type(measurement).__name__}")
    value = measurement.lower()
    if not is_lower_hex(value):
        raise ValueError("measurement must be a non-empty, even-length hex string")
    return value


class SimulatedAttester:
    """Software attester for machines without a TEE. Evidence it makes is marked simulated.

    Holds a fresh ECDSA P-384 attestation key, certified by ``root`` for 30 days from creation, and
    signs reports claiming ``measurement``, ``debug`` and ``tcb``. ``clock`` (UTC-aware datetimes)
    is injectable for tests; it dates both the certificate and every report.
    """

    format = SIMULATED

    def __init__(
        self,
        root: DevRoot,
        *,
        measurement: str,
        debug: bool = False,
        tcb: Mapping[str, int] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not isinstance(root, DevRoot):
            raise TypeError(f"root must be a DevRoot, not {type(root).__name__}")
        if root.private_key.public_key() != root.certificate.public_key():
            raise ValueError("the DevRoot's private key does not match its certificate")
        if type(debug) is not bool:
            raise TypeError("debug must be bool")
        self._measurement = _normalise_measurement(measurement)
        self._debug = debug
        self._tcb = freeze_tcb(tcb or {})
        self._clock = clock or _utc_now
        now = self._now()
        self._key = ec.generate_private_key(_CURVE())
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(ATTESTATION_KEY_COMMON_NAME))
            .issuer_name(root.certificate.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _KEY_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.private_key.public_key()),
                critical=False,
            )
            .sign(root.private_key, hashes.SHA384())
        )
        logger.warning(
            "SIMULATED attestation in use (measurement %s): no TEE protects this enclave",
            self._measurement,
        )

    @property
    def measurement(self) -> str:
        return self._measurement

    @property
    def certificate(self) -> x509.Certificate:
        """The attestation key's certificate (sent as ``aux``)."""
        return self._certificate

    def _now(self) -> datetime:
        now = self._clock()
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise ValueError("the attester's clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        """Sign a report binding ``report_data`` (64 bytes) and the relying party's ``nonce``."""
        report_data = as_bytes("report_data", report_data)
        nonce = as_bytes("nonce", nonce)
        if len(report_data) != REPORT_DATA_BYTES:
            raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")
        if len(nonce) < MIN_NONCE_BYTES:
            raise ValueError(f"nonce must be at least {MIN_NONCE_BYTES} bytes, got {len(nonce)}")
        report = canonical_json(
            {
                "version": REPORT_VERSION,
                "platform": SIMULATED,
                "simulated": True,
                "measurement": self._measurement,
                "debug": self._debug,
                "tcb": dict(self._tcb),
                "report_data": report_data.hex(),
                "nonce": nonce.hex(),
                "issued_at": iso_utc(self._now()),
            },
            allow_nan=False,
        )
        signature = self._key.sign(report, ec.ECDSA(hashes.SHA384()))
        return Evidence(
            format=SIMULATED,
            evidence=canonical_json({"report": b64(report), "signature": b64(signature)}, allow_nan=False),
            aux=self._certificate.public_bytes(serialization.Encoding.DER),
            nonce=nonce,
        )


# --------------------------------------------------------------------------------------------------
# Per-format verifier
# --------------------------------------------------------------------------------------------------


def _refuse(check: str, message: str) -> AttestationError:
    return AttestationError(message, details={"check": check})


def _require_leaf_basic_constraints(
    _policy: verification.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints | None
) -> None:
    if ext is None or ext.ca:
        raise ValueError("the attestation key certificate must have BasicConstraints CA:FALSE")


def _require_leaf_key_usage(_policy: verification.Policy, _cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is None or not ext.digital_signature:
        raise ValueError("the attestation key certificate must allow digitalSignature")


def _verify_chain(aux: bytes, roots: tuple[x509.Certificate, ...], now: datetime) -> x509.Certificate:
    """Step 3: ``aux`` chains to one of the pinned ``roots`` and every certificate is valid at ``now``."""
    if not roots:
        raise _refuse(
            "chain",
            "simulated evidence refused: the trust policy pins no simulated root; add the dev-root.crt"
            " of the enclave host (written by `sealroom dev init`) to simulated_roots",
        )
    try:
        der_certs = split_der_certificates(aux)
        certs = [x509.load_der_x509_certificate(der) for der in der_certs]
    except ValueError as exc:
        raise _refuse(
            "chain", f"the evidence's certificate chain (aux) is not a list of DER certificates ({exc})"
        ) from None
    leaf, intermediates = certs[0], certs[1:]
    ee_policy = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_leaf_basic_constraints)
        .require_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _require_leaf_key_usage)
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(now)
        .max_chain_depth(MAX_DER_CERTIFICATES)
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise _refuse(
            "chain",
            "the attestation key certificate does not chain to a pinned simulated root valid at"
            f" {iso_utc(now)} ({exc}); pin the dev-root.crt of the enclave host, or, if it expired,"
            " restart the enclave worker to get a fresh attestation key",
        ) from None
    pinned = {hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).digest() for r in roots}
    anchor = verified.chain[-1]
    if hashlib.sha256(anchor.public_bytes(serialization.Encoding.DER)).digest() not in pinned:
        raise _refuse("chain", "the certificate chain ends at a root that the trust policy does not pin")
    return leaf


def _parse_report(report: bytes) -> Claims:
    """Parse a signed report into claims. Only ever called after the signature verified."""
    what = "the signed simulated report"
    obj = strict_json_object(report, what=what, check="envelope")
    if set(obj) != _REPORT_KEYS:
        raise _refuse("envelope", f"{what} must have exactly the keys {sorted(_REPORT_KEYS)}")
    if type(obj["version"]) is not int or obj["version"] != REPORT_VERSION:
        raise _refuse("envelope", f"{what} has version {obj['version']!r}; expected {REPORT_VERSION}")
    if obj["platform"] != SIMULATED or obj["simulated"] is not True:
        raise _refuse("envelope", f"{what} must claim platform 'simulated' and simulated true")
    try:
        measurement = obj["measurement"]
        if not isinstance(measurement, str) or not is_lower_hex(measurement):
            raise ValueError("measurement must be lowercase hex")
        if type(obj["debug"]) is not bool:
            raise ValueError("debug must be a boolean")
        tcb: Any = obj["tcb"]
        if not isinstance(tcb, dict):
            raise ValueError("tcb must be an object")
        issued: Any = obj["issued_at"]
        if not isinstance(issued, str) or not issued.endswith("Z"):
            raise ValueError("issued_at must be an ISO 8601 UTC time ending in Z")
        issued_at = datetime.fromisoformat(issued)
        if issued_at.utcoffset() != timedelta(0):
            raise ValueError("issued_at must be UTC")
        hex_fields: dict[str, bytes] = {}
        for key in ("report_data", "nonce"):
            value = obj[key]
            if not isinstance(value, str) or (value and not is_lower_hex(value)):
                raise ValueError(f"{key} must be lowercase hex")
            hex_fields[key] = bytes.fromhex(value)
        return Claims(
            platform=SIMULATED,
            measurement=measurement,
            debug=obj["debug"],
            tcb=tcb,
            report_data=hex_fields["report_data"],
            nonce=hex_fields["nonce"],
            issued_at=issued_at,
            simulated=True,
        )
    except (TypeError, ValueError) as exc:
        raise _refuse("envelope", f"{what} is malformed: {exc}") from None


def verify_simulated(evidence: Evidence, *, policy: AppraisalPolicy, now: datetime) -> Claims:
    """Per-format verifier for ``simulated``: steps 2-4 of :func:`verify_evidence`.

    2. simulated allowed by the policy (before reading anything else);
    3. the attestation key certificate chains to a pinned simulated root, valid at ``now``;
    4. the report's ECDSA P-384/SHA-384 signature verifies under that key.

    Returns the report's claims, unappraised (nonce, report data, measurement... are the caller's).
    """
    # Step 2: simulated evidence is refused unless the relying party opted in.
    if not policy.allow_simulated:
        raise _refuse(
            "simulated",
            "simulated evidence refused: the relying party's trust policy does not set"
            " allow_simulated = true (simulated attestation has no TEE behind it; allow it only for"
            " development)",
        )
    obj = strict_json_object(evidence.evidence, what="simulated evidence", check="envelope")
    if set(obj) != _EVIDENCE_KEYS:
        raise _refuse("envelope", f"simulated evidence must have exactly the keys {sorted(_EVIDENCE_KEYS)}")
    report = b64decode_field(obj, "report", what="simulated evidence", check="envelope")
    signature = b64decode_field(obj, "signature", what="simulated evidence", check="envelope")

    # Step 3: certificate chain to a pinned root, every certificate valid at `now`.
    leaf = _verify_chain(evidence.aux, policy.simulated_roots, now)

    # Step 4: report signature under the attestation key.
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, _CURVE):
        raise _refuse("signature", "the attestation key must be an ECDSA P-384 key")
    try:
        public_key.verify(signature, report, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise _refuse(
            "signature",
            "the simulated report's signature does not verify under the attestation key: the report or"
            " its signature was altered in transit; request fresh evidence",
        ) from None
    return _parse_report(report)
