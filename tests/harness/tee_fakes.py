"""Stand-ins for TEE hardware, for tests of the real attesters and verifiers.

- :class:`FakeAmdPki`: an ARK -> ASK -> VCEK chain shaped exactly like AMD's (RSA-PSS/SHA-384 links,
  a P-384 VCEK carrying the TCB and hwID extensions) under a test root, and SEV-SNP reports signed
  by its VCEK. The verifier accepts them only when a policy replaces the pinned AMD roots with this
  test ARK; with the built-in roots they are refused.
- :class:`FakeConfigfsTsm`: a configfs-tsm report directory in a temporary directory. Like the
  kernel, it populates an entry the moment it is created (``provider``, ``generation``,
  ``inblob``, ``outblob``, ``auxblob``) and produces a report when ``outblob`` is read: outblob and
  auxblob are FIFOs, written by a server thread once a reader opens them.
- :class:`FakeGramine`: Gramine's ``/dev/attestation`` files, likewise (``quote`` is a FIFO).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1"
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _der_int(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8 or 1, "big")  # room for the sign bit
    return bytes([0x02, len(body)]) + body


@dataclass
class FakeAmdPki:
    """A Milan-shaped AMD certificate chain under a test ARK, and the chip/TCB its VCEK certifies.

    With ``vlek=True`` the chain is ARK -> ASVK -> VLEK (as AMD issues to cloud providers): ``ask``
    holds the ASVK, ``vcek`` the VLEK, and reports say they are VLEK-signed.
    """

    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    chip_id: bytes
    tcb: dict[str, int]
    vlek: bool = False

    @classmethod
    def create(cls, *, tcb: dict[str, int] | None = None, vlek: bool = False) -> FakeAmdPki:
        tcb = tcb or {"bootloader": 3, "tee": 0, "snp": 20, "microcode": 209}
        now = datetime.now(UTC)
        valid = (now - timedelta(days=1), now + timedelta(days=365))
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        vcek_key = ec.generate_private_key(ec.SECP384R1())

        def build(subject: str, issuer: str, public: object, serial: int) -> x509.CertificateBuilder:
            return (
                x509.CertificateBuilder()
                .subject_name(_name(subject))
                .issuer_name(_name(issuer))
                .public_key(public)  # type: ignore[arg-type]
                .serial_number(serial)
                .not_valid_before(valid[0])
                .not_valid_after(valid[1])
            )

        ark = build("ARK-Milan", "ARK-Milan", ark_key.public_key(), 1).sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)
        mid, leaf = ("SEV-VLEK-Milan", "SEV-VLEK") if vlek else ("SEV-Milan", "SEV-VCEK")
        ask = build(mid, "ARK-Milan", ask_key.public_key(), 2).sign(ark_key, hashes.SHA384(), rsa_padding=_PSS)
        chip_id = hashlib.sha512(b"sealroom test chip").digest()
        vb = build(leaf, mid, vcek_key.public_key(), 3)
        for i, name in ((1, "bootloader"), (2, "tee"), (3, "snp"), (8, "microcode")):
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.3.{i}"), _der_int(tcb[name]))
            vb = vb.add_extension(ext, critical=False)
        if vlek:  # no hwID: a VLEK names the cloud provider (CSP_ID), not a chip
            csp = b"sealroom-test-cloud"
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.5"), bytes([0x0C, len(csp)]) + csp)
        else:
            ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{_AMD}.4"), bytes([0x04, 0x40]) + chip_id)
        vcek = vb.add_extension(ext, critical=False).sign(ask_key, hashes.SHA384(), rsa_padding=_PSS)
        return cls(ark, ask, vcek, vcek_key, chip_id, tcb, vlek)

    def ark_pem(self) -> bytes:
        return self.ark.public_bytes(serialization.Encoding.PEM)

    def der(self, cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.DER)

    def report(
        self,
        report_data: bytes,
        *,
        measurement: bytes,
        debug: bool = False,
        migration_agent: bool = False,
        vmpl: int = 0,
    ) -> bytes:
        """A version-2 SNP report signed by the VCEK, binding ``report_data`` (64 bytes)."""
        assert len(report_data) == 64 and len(measurement) == 48
        raw = bytearray(0x4A0)
        policy = (1 << 17) | (1 << 16) | (1 << 19 if debug else 0) | (1 << 18 if migration_agent else 0)
        struct.pack_into("<IIQ", raw, 0, 2, 0, policy)
        struct.pack_into("<II", raw, 0x30, vmpl, 1)  # VMPL, ECDSA P-384 with SHA-384
        t = self.tcb
        tcb = bytes([t["bootloader"], t["tee"], 0, 0, 0, 0, t["snp"], t["microcode"]])
        raw[0x38:0x40] = tcb  # current TCB
        struct.pack_into("<I", raw, 0x48, (1 if self.vlek else 0) << 2)  # SIGNING_KEY
        raw[0x50:0x90] = report_data
        raw[0x90:0xC0] = measurement
        raw[0x180:0x188] = tcb  # reported TCB
        raw[0x1A0:0x1E0] = self.chip_id
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
        raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
        raw[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(raw)

    def cert_table(self) -> bytes:
        """The certificate table a host hands the guest in ``auxblob``: VCEK and ASK (a VLEK alone, as
        a cloud provider's host would), then a zero entry."""
        leaf = self.der(self.vcek)
        if self.vlek:
            return VLEK_GUID + struct.pack("<II", 48, len(leaf)) + bytes(24) + leaf
        ask = self.der(self.ask)
        header = 24 * 3
        table = VCEK_GUID + struct.pack("<II", header, len(leaf))
        table += ASK_GUID + struct.pack("<II", header + len(leaf), len(ask))
        table += bytes(24)
        return table + leaf + ask


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path``'s content in one step: a reader never sees it empty or half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Device:
    """A request/response pseudo-file device: a write to the ``request`` FIFO produces one response
    on each ``responses`` FIFO, served in order once a reader opens it, as a kernel attribute would."""

    def __init__(self, request: Path, responses: list[tuple[Path, Callable[[bytes], bytes]]]):
        self.request = request
        self.responses = responses
        os.mkfifo(request)
        for path, _ in responses:
            os.mkfifo(path)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_request(self) -> bytes | None:
        fd = os.open(self.request, os.O_RDONLY)  # blocks until a writer opens it (or close() does)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return None if self._stop.is_set() else b"".join(chunks)
        finally:
            os.close(fd)

    def _respond(self, path: Path, data: bytes) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no reader yet
                    time.sleep(0.002)
                    continue
                raise
            try:
                os.set_blocking(fd, True)
                _write_all(fd, data)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
            return

    def _serve(self) -> None:
        while not self._stop.is_set():
            request = self._read_request()
            if request is None:
                return
            for path, produce in self.responses:
                self._respond(path, produce(request))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wake the server blocked in open(request)
            os.close(os.open(self.request, os.O_WRONLY | os.O_NONBLOCK))
        for t in self._threads:
            t.join(timeout=5)


class FakeConfigfsTsm:
    """A configfs-tsm ``report`` directory: entries are populated when created, like the kernel's."""

    def __init__(
        self,
        root: Path,
        *,
        provider: str = "sev_guest",
        make_report: Callable[[bytes], bytes],
        auxblob: bytes | None = None,
        extra_writes: int = 0,
    ):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.make_report = make_report
        self.auxblob = auxblob  # None: the entry has an auxblob the attester must not need (TDX)
        self.extra_writes = extra_writes  # another writer racing us: generation moves this much more
        self.requests: list[bytes] = []
        self._devices: list[_Device] = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="fake-tsm", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        seen: set[str] = set()
        while not self._stop.is_set():
            for entry in self.root.iterdir():
                if entry.is_dir() and entry.name not in seen:
                    seen.add(entry.name)
                    self._populate(entry)
            time.sleep(0.002)

    def _populate(self, entry: Path) -> None:
        def report(request: bytes) -> bytes:
            generation = int((entry / "generation").read_text()) + 1 + self.extra_writes
            _atomic_write(entry / "generation", f"{generation}\n")
            self.requests.append(request)
            return self.make_report(request)

        responses = [(entry / "outblob", report)]
        if self.auxblob is not None:
            aux = self.auxblob
            responses.append((entry / "auxblob", lambda _request: aux))
        else:
            (entry / "auxblob").write_bytes(b"")
        self._devices.append(_Device(entry / "inblob", responses))
        _atomic_write(entry / "provider", self.provider + "\n")
        _atomic_write(entry / "generation", "0\n")  # last: the attester waits for all attributes

    def entries(self) -> list[Path]:
        return [p for p in self.root.iterdir() if p.is_dir()]

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=5)
        for device in self._devices:
            device.close()


class FakeGramine:
    """Gramine's ``/dev/attestation``: ``attestation_type``, and ``user_report_data`` -> ``quote``."""

    def __init__(self, root: Path, *, quote: Callable[[bytes], bytes], attestation_type: str = "dcap"):
        root.mkdir(parents=True, exist_ok=True)
        (root / "attestation_type").write_text(attestation_type)
        self._device = _Device(root / "user_report_data", [(root / "quote", quote)])

    def close(self) -> None:
        self._device.close()
