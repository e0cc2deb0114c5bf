"""How this worker obtains attestation evidence.

``[enclave] attester`` picks one, and the worker refuses to start with a hardware attester it
cannot reach (each constructor below obtains one report, and names the platform's measurement from
it, before the server listens):

- ``simulated``: no TEE. Reports are signed with a key certified by the dev root from ``sealroom dev
  init``; the measurement is a hash of the worker's code, libraries and configuration; everything
  is marked simulated.
- ``sev-snp`` and ``tdx``: a confidential VM's report through Linux configfs-tsm (kernel 6.7+):
  the worker creates its own report entry under ``tsm_path`` (``/sys/kernel/config/tsm/report``),
  writes the 64 report-data bytes to ``inblob`` and reads the signed report from ``outblob``; for
  SEV-SNP the certificate table in ``auxblob`` supplies the VCEK or VLEK (or ``snp_certificates``
  does, when the host does not provide it). ``generation`` must have moved by exactly our one write:
  anything else means another writer raced us and the report may not hold our report data.
- ``sgx``: a DCAP quote from Gramine's ``/dev/attestation`` pseudo-files (``user_report_data`` in,
  ``quote`` out).
- ``nitro``: an attestation document from the Nitro Secure Module (``/dev/nsm``, one ioctl per
  request, CBOR in and out), with the report data as ``user_data`` and the nonce as ``nonce``.

The report data is always :func:`~sealroom.attestation.report_data_for` over the job's public keys
and the relying party's nonce, so evidence binds the keys a party seals to.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave_worker.config import EnclaveConfig
from sealroom.attestation import Evidence, SimulatedAttester, cbor, enclave_measurement, load_dev_root
from sealroom.attestation.evidence import REPORT_DATA_BYTES
from sealroom.attestation.hardware import evidence_measurement, evidence_report_data
from sealroom.attestation.offline import load_certificate
from sealroom.attestation.platform import common_name
from sealroom.errors import AttestationError, ConfigError

log = logging.getLogger(__name__)

# configfs-tsm providers per platform, as the kernel names them in the entry's `provider` attribute.
TSM_PROVIDERS = {"sev-snp": "sev_guest", "tdx": "tdx_guest"}
# SEV-SNP certificate table GUIDs (GHCB specification, "SNP Extended Guest Request").
_SNP_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes: "vcek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes: "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes: "ark",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes: "vlek",
}
_MAX_BLOB = 1 << 20
_ATTRIBUTE_WAIT_SECONDS = 2.0


class Attester(Protocol):
    format: str
    simulated: bool
    measurement: str

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence: ...

    def close(self) -> None: ...


def _unreachable(platform: str, what: str, fix: str) -> ConfigError:
    return ConfigError(
        f"the {platform} attester cannot reach {what}; {fix}",
        details={"attester": platform},
    )


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")


class _Simulated:
    format = "simulated"
    simulated = True

    def __init__(self, config: EnclaveConfig):
        if config.dev_root is None:
            raise ConfigError("the simulated attester needs enclave.dev_root (run `sealroom dev init`)")
        self.measurement = enclave_measurement(config.measured())
        self._attester = SimulatedAttester(load_dev_root(config.dev_root), measurement=self.measurement)
        log.warning("SIMULATED attestation: this worker runs in no TEE; its evidence is marked simulated")

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        return self._attester.attest(report_data=report_data, nonce=nonce)

    def close(self) -> None:
        pass


# --- configfs-tsm (SEV-SNP, TDX) -------------------------------------------------------------


def _read(path: Path, limit: int = _MAX_BLOB) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AttestationError(f"{path.name} is larger than {limit} bytes", details={"check": "attester"})
    return data


def _write(path: Path, data: bytes) -> None:
    """One write to an existing attribute: no O_CREAT, no O_TRUNC (configfs attributes take neither)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.write(fd, data) != len(data):
            raise AttestationError(f"short write to {path.name}", details={"check": "attester"})
    finally:
        os.close(fd)


def snp_certificates_from_table(table: bytes) -> dict[str, bytes]:
    """The DER certificates of an SEV-SNP certificate table (``auxblob``), by kind (vcek, ask, ark, vlek).

    The table is a list of ``GUID (16) | offset (u32 LE) | length (u32 LE)`` entries ended by an
    all-zero entry; offsets count from the start of the table.
    """
    certs: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + 24 > len(table):
            raise AttestationError(
                "the SEV-SNP certificate table is not terminated by an all-zero entry", details={"check": "attester"}
            )
        guid = table[pos : pos + 16]
        offset = int.from_bytes(table[pos + 16 : pos + 20], "little")
        length = int.from_bytes(table[pos + 20 : pos + 24], "little")
        pos += 24
        if not any(guid) and offset == 0 and length == 0:
            return certs
        if offset < pos or offset + length > len(table):
            raise AttestationError(
                "an SEV-SNP certificate table entry points outside the table", details={"check": "attester"}
            )
        kind = _SNP_CERT_GUIDS.get(guid)
        if kind is not None:
            certs[kind] = table[offset : offset + length]


class _ConfigfsTsm:
    """One configfs-tsm report entry owned by this process; requests are serialised by a lock."""

    simulated = False

    def __init__(self, config: EnclaveConfig, platform: str):
        self.format = platform
        root = config.tsm_path
        provider = TSM_PROVIDERS[platform]
        if not root.is_dir():
            raise _unreachable(
                platform,
                f"configfs-tsm at {root}",
                "run the enclave worker in a confidential VM whose kernel (6.7 or newer) has the "
                f"{provider} driver loaded, with configfs mounted (mount -t configfs none /sys/kernel/config), "
                "or set enclave.tsm_path",
            )
        self._lock = threading.Lock()
        self._entry = root / f"sealroom-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._entry.mkdir()
        except OSError as exc:
            raise _unreachable(
                platform,
                f"configfs-tsm at {root} (creating a report entry failed: {_errno_name(exc)})",
                "run the worker as a user allowed to create entries there (root, or a udev/tmpfiles rule)",
            ) from None
        try:
            self._wait_for_attributes()
            found = _read(self._entry / "provider").decode("ascii", "replace").strip()
            if found != provider:
                raise _unreachable(
                    platform,
                    f"a {provider} provider (configfs-tsm reports {found!r})",
                    "set enclave.attester to the platform this VM runs on (sev_guest: sev-snp, tdx_guest: tdx)",
                )
            self._extra_certs: list[bytes] = []
            if platform == "sev-snp" and config.snp_certificates is not None:
                self._extra_certs = _snp_certificate_file(config.snp_certificates)
            probe = self.attest(report_data=bytes(REPORT_DATA_BYTES), nonce=bytes(16))
            self.measurement = _measurement_of(probe)
        except BaseException:
            self.close()
            raise
        log.info("attester %s: configfs-tsm entry %s, measurement %s", platform, self._entry, self.measurement)

    def _wait_for_attributes(self) -> None:
        deadline = time.monotonic() + _ATTRIBUTE_WAIT_SECONDS
        names = ("provider", "generation", "inblob", "outblob")
        while not all((self._entry / n).exists() for n in names):
            if time.monotonic() > deadline:
                raise _unreachable(
                    self.format,
                    f"the attributes of configfs-tsm entry {self._entry}",
                    "check that the kernel's TSM report interface is configfs (a plain directory is not)",
                )
            time.sleep(0.005)

    def _generation(self) -> int:
        text = _read(self._entry / "generation", 64).decode("ascii", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise AttestationError("configfs-tsm generation is not a number", details={"check": "attester"}) from None

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        _check_report_data(report_data)
        with self._lock:
            before = self._generation()
            _write(self._entry / "inblob", report_data)
            report = _read(self._entry / "outblob")
            aux = b""
            if self.format == "sev-snp":
                aux = self._snp_certificates(report)
            after = self._generation()
        if after != before + 1:
            raise AttestationError(
                f"configfs-tsm entry {self._entry.name} was written by another process while this report was "
                "requested; the report may not hold this request's report data, so it is not used",
                details={"check": "attester"},
            )
        if not report:
            raise AttestationError("configfs-tsm returned an empty report", details={"check": "attester"})
        return _answered(Evidence(format=self.format, evidence=report, aux=aux, nonce=nonce), report_data)

    def _snp_certificates(self, report: bytes) -> bytes:
        """DER certificates for the envelope's ``aux``: the report's signing key (VCEK, or VLEK for a
        VLEK-signed report) and its intermediate, from the host's table and the configured file."""
        leaf = "vlek" if len(report) > 0x48 and (report[0x48] >> 2) & 0b111 == 1 else "vcek"
        table = _read(self._entry / "auxblob")
        certs = snp_certificates_from_table(table) if table else {}
        chosen = [certs[k] for k in (leaf, "ask") if k in certs]
        chosen += [der for der in self._extra_certs if der not in chosen]
        if leaf in certs or any(kind == leaf for kind in _snp_kinds(self._extra_certs)):
            return b"".join(chosen)
        where = "/vlek/v1/<product>/ (with the ASVK)" if leaf == "vlek" else "/vcek/v1/<product>/<chip id>"
        raise _unreachable(
            "sev-snp",
            f"a {leaf.upper()} (the host supplied no certificate table holding one)",
            f"fetch it from AMD's KDS (https://kdsintf.amd.com{where}) and set enclave.snp_certificates "
            "to the DER or PEM file",
        )

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            try:
                self._entry.rmdir()
            except OSError as exc:
                log.warning("could not remove configfs-tsm entry %s (%s)", self._entry, type(exc).__name__)


def _snp_kinds(ders: list[bytes]) -> list[str]:
    """ "vcek", "vlek" or "other" for each DER certificate, by its common name."""
    roles = {"SEV-VCEK": "vcek", "SEV-VLEK": "vlek"}
    return [roles.get(common_name(load_certificate(der).subject), "other") for der in ders]


def _snp_certificate_file(path: Path) -> list[bytes]:
    """The DER of every certificate in ``path`` (PEM or DER)."""
    try:
        data = path.read_bytes()
    except OSError:
        raise ConfigError(f"enclave.snp_certificates: cannot read {path}", details={"file": str(path)}) from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [load_certificate(data)]
    except ValueError:
        raise ConfigError(
            f"enclave.snp_certificates: {path} holds no PEM or DER certificate", details={"file": str(path)}
        ) from None
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


# --- Gramine (SGX) ---------------------------------------------------------------------------


class _Gramine:
    format = "sgx"
    simulated = False

    def __init__(self, config: EnclaveConfig):
        self._dir = config.gramine_path
        kind_file = self._dir / "attestation_type"
        if not kind_file.exists():
            raise _unreachable(
                "sgx",
                f"Gramine's attestation interface at {self._dir}",
                'run the enclave worker under gramine-sgx with sgx.remote_attestation = "dcap" in its manifest',
            )
        kind = _read(kind_file, 64).decode("ascii", "replace").strip()
        if kind != "dcap":
            raise _unreachable(
                "sgx",
                f"DCAP attestation (Gramine reports attestation type {kind!r})",
                'set sgx.remote_attestation = "dcap" in the Gramine manifest',
            )
        self._lock = threading.Lock()
        self.measurement = _measurement_of(self.attest(report_data=bytes(REPORT_DATA_BYTES), nonce=bytes(16)))

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        _check_report_data(report_data)
        with self._lock:
            _write(self._dir / "user_report_data", report_data)
            quote = _read(self._dir / "quote")
        return _answered(Evidence(format="sgx", evidence=quote, aux=b"", nonce=nonce), report_data)

    def close(self) -> None:
        pass


# --- AWS Nitro Enclaves (NSM) ----------------------------------------------------------------


class _NsmIovec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _NsmMessage(ctypes.Structure):
    _fields_ = [("request", _NsmIovec), ("response", _NsmIovec)]


# _IOWR(NSM_MAGIC = 0x0A, 0, struct nsm_message) from the Linux nsm driver's uapi header.
NSM_IOCTL_REQUEST = (3 << 30) | (ctypes.sizeof(_NsmMessage) << 16) | (0x0A << 8) | 0
NSM_RESPONSE_MAX = 0x3000


def nsm_attestation_request(*, user_data: bytes, nonce: bytes) -> bytes:
    """The CBOR request the NSM answers with an attestation document."""
    return cbor.dumps({"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": None}})


def nsm_attestation_document(response: bytes) -> bytes:
    """The attestation document in an NSM response, or AttestationError naming the NSM's error."""
    try:
        decoded = cbor.loads(response)
    except cbor.CBORError:
        raise AttestationError("the NSM's response is not CBOR", details={"check": "attester"}) from None
    if isinstance(decoded, dict) and "Error" in decoded:
        raise AttestationError(
            f"the NSM refused the request ({str(decoded['Error'])[:64]})", details={"check": "attester"}
        )
    body = decoded.get("Attestation") if isinstance(decoded, dict) else None
    document = body.get("document") if isinstance(body, dict) else None
    if not isinstance(document, bytes) or not document:
        raise AttestationError("the NSM's response carries no attestation document", details={"check": "attester"})
    return document


def _nsm_ioctl(fd: int, request: bytes) -> bytes:
    req = ctypes.create_string_buffer(request, len(request))
    resp = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
    msg = _NsmMessage(
        _NsmIovec(ctypes.addressof(req), len(request)), _NsmIovec(ctypes.addressof(resp), NSM_RESPONSE_MAX)
    )
    fcntl.ioctl(fd, NSM_IOCTL_REQUEST, msg)  # type: ignore[call-overload]
    return resp.raw[: msg.response.len]


class _Nitro:
    format = "nitro"
    simulated = False

    def __init__(self, config: EnclaveConfig, *, transport: Callable[[int, bytes], bytes] = _nsm_ioctl):
        self._lock = threading.Lock()
        self._transport = transport
        try:
            self._fd = os.open(config.nsm_device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _unreachable(
                "nitro",
                f"the Nitro Secure Module at {config.nsm_device} ({_errno_name(exc)})",
                "run the enclave worker inside a Nitro Enclave (the nsm driver provides /dev/nsm)",
            ) from None
        try:
            self.measurement = _measurement_of(self.attest(report_data=bytes(REPORT_DATA_BYTES), nonce=bytes(16)))
        except BaseException:
            self.close()
            raise

    def attest(self, *, report_data: bytes, nonce: bytes) -> Evidence:
        _check_report_data(report_data)
        request = nsm_attestation_request(user_data=report_data, nonce=nonce)
        with self._lock:
            try:
                response = self._transport(self._fd, request)
            except OSError as exc:
                raise AttestationError(
                    f"the NSM request failed ({_errno_name(exc)})",
                    details={"check": "attester"},
                ) from None
        return _answered(
            Evidence(format="nitro", evidence=nsm_attestation_document(response), aux=b"", nonce=nonce), report_data
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# ---------------------------------------------------------------------------------------------


def _answered(evidence: Evidence, report_data: bytes) -> Evidence:
    """``evidence``, once it is checked to bind the report data this request wrote: another process
    writing to the same interface (configfs-tsm, Gramine's files, the NSM) between our write and our
    read would otherwise hand us a report that binds someone else's keys."""
    if evidence_report_data(evidence) != report_data:
        raise AttestationError(
            f"the {evidence.format} report does not bind the report data this request wrote (another process "
            "used the attestation interface at the same time); it is not used",
            details={"check": "attester"},
        )
    return evidence


def _measurement_of(evidence: Evidence) -> str:
    """The platform's launch measurement in this worker's own evidence (parsed, not verified)."""
    return evidence_measurement(evidence)


def make_attester(config: EnclaveConfig) -> Attester:
    """The configured attester, after one successful report; ConfigError if it cannot be reached."""
    if config.attester == "simulated":
        return _Simulated(config)
    if config.attester in TSM_PROVIDERS:
        return _ConfigfsTsm(config, config.attester)
    if config.attester == "sgx":
        return _Gramine(config)
    if config.attester == "nitro":
        return _Nitro(config)
    raise ConfigError(f"attester {config.attester!r} is not supported by this build")
