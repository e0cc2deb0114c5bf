"""One development CA for the whole test session, and TLS as any identity it issues.

Servers that tests start in-process (tests/harness/enclave.py, tests/integration/*) run over TLS like
the real platform: the coordinator's and agents' certificates come from this CA (issued on first
use), the enclave makes its own. ``dev_pki`` (tests/conftest.py, session scope) is the same object.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from sealroom import pki
from sealroom.pki import DevPKI, Identity
from sealroom.rpc import TLSConfig


@functools.cache
def session_pki() -> DevPKI:
    directory = Path(tempfile.mkdtemp(prefix="sealroom-test-ca-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return DevPKI(directory / "tls")


def tls_as(identity: Identity | None = None) -> TLSConfig:
    """TLS presenting ``identity``'s certificate of the session CA (None: no client certificate)."""
    dev = session_pki()
    if identity is None:
        return TLSConfig(ca=dev.ca_cert)
    dev.issue(identity)
    return TLSConfig(ca=dev.ca_cert, cert=dev.cert(identity), key=dev.key(identity))


def enclave_tls() -> TLSConfig:
    """An enclave worker's [tls]: the session CA only (it makes its own certificate)."""
    dev = session_pki()
    dev.ca()
    return TLSConfig(ca=dev.ca_cert)


def as_coordinator() -> TLSConfig:
    return tls_as(pki.coordinator())
