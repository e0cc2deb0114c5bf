"""gRPC plumbing shared by every Sealroom server and client.

- :func:`create_server` binds a server (port 0 picks a free port) and returns ``(server, port)``;
  the standard health service is registered and set to SERVING by :func:`start`, NOT_SERVING
  before a graceful stop.
- :func:`translate_errors` admits each call's caller by the table in :mod:`sealroom.callers` (who may
  call each method) before the method runs, and is the one translator: a servicer method that raises a
  :class:`~sealroom.errors.SealroomError` aborts with that error's gRPC status, its public
  message, and its public details (JSON in trailing metadata); anything else is logged here and
  sent as a generic INTERNAL error, so no internal message (which might hold data) crosses the wire.
- :func:`unwrap` turns a client-side ``grpc.RpcError`` back into the matching SealroomError.
- TLS: servers and channels take a :class:`TLSConfig` (a component's ``[tls]`` table); a caller names
  the identity it means to reach (``server_name``). Plaintext (no TLSConfig, or ``plaintext = true``)
  is refused on any address outside loopback. docs/wire.md says which link has which TLS.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
import logging
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sealroom import callers
from sealroom.callers import method_path
from sealroom.config import Table
from sealroom.errors import (
    AttestationError,
    ConfigError,
    InternalError,
    SealroomError,
    UnavailableError,
    from_code,
)
from sealroom.pki import ENCLAVE_SERVER_NAME, Identity, cert_dns_name, server_name

log = logging.getLogger(__name__)

ERROR_METADATA_KEY = "sealroom-error-bin"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    # A sealed stream's header (with the projected Arrow schema) travels in metadata; wide
    # projections exceed gRPC's 8 KiB default.
    ("grpc.max_metadata_size", 1024 * 1024),
]

F = TypeVar("F", bound=Callable[..., Any])


PLAINTEXT_WARNING = (
    "TLS is OFF ([tls] plaintext = true): calls, tokens and SQL travel in the clear; "
    "only for a platform on one machine (loopback)"
)


def is_loopback(address: str) -> bool:
    """True for a ``HOST:PORT`` whose host is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the TLS {what} {path} ({exc.strerror}); create the development certificates with "
            "`sealroom dev init` or point [tls] at your own (docs/operations.md, Certificates)",
            details={"file": str(path)},
        ) from None


@dataclass(frozen=True)
class TLSConfig:
    """Where a server's or caller's TLS material is (PEM files, read at each use so a replaced file
    is picked up by the next channel and at restart for servers), or ``plaintext`` (loopback only).

    - ``ca``: the bundle of CA certificates this side trusts (the collaboration CA);
    - ``cert``/``key``: this side's own certificate from that CA (a server's identity, and the client
      certificate it presents when it calls a server that requires one);
    - ``identity``: an in-memory (cert PEM, key PEM) pair used instead of ``cert``/``key`` (the
      enclave's self-made certificate);
    - ``pin``: trust exactly this server certificate (PEM) instead of ``ca`` (a caller of the enclave).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    plaintext: bool = False
    identity: tuple[bytes, bytes] | None = field(default=None, repr=False)  # holds a private key
    pin: bytes | None = field(default=None, repr=False)

    @classmethod
    def off(cls) -> TLSConfig:
        """Plaintext: only on loopback (:meth:`check_addresses`)."""
        return cls(plaintext=True)

    @classmethod
    def from_table(
        cls, t: Table, *, role: str, own_cert: bool = True, addresses: dict[str, str] | None = None
    ) -> TLSConfig:
        """The ``[tls]`` table of a component's config file (docs/configuration.md): ``ca``, ``cert``,
        ``key`` (``own_cert=False``: refused, e.g. the enclave makes its own), or ``plaintext = true``,
        refused unless every address in ``addresses`` (``{"key": "HOST:PORT"}``) is on loopback."""
        t.check_keys({"ca", "cert", "key", "plaintext"})
        needs = "ca, cert and key" if own_cert else "ca"
        if not t.doc:
            raise ConfigError(
                f"{t.source}: no [tls] table: the {role} needs [tls] {needs} (PEM files; `sealroom dev init` "
                "makes development ones, docs/configuration.md), or plaintext = true on loopback only",
                details={"file": t.source, "key": "tls"},
            )
        if t.bool("plaintext", False):
            if any(k in t.doc for k in ("ca", "cert", "key")):
                raise t.key_error("plaintext", "alone: plaintext = true turns TLS off, so ca, cert and key must go")
            tls = cls.off()
            tls.check_addresses(addresses or {}, source=t.source)
            return tls
        hint = (
            f"the path of a PEM file (the {role}'s [tls] needs {needs}; `sealroom dev init` makes "
            "development ones; or set plaintext = true on loopback only)"
        )
        if not own_cert:
            for k in ("cert", "key"):
                if k in t.doc:
                    raise ConfigError(
                        f"{t.source}: {t.prefix}{k} is not used: the {role} makes its own TLS key and "
                        "certificate at start, which its attestation evidence binds (docs/wire.md)",
                        details={"file": t.source, "key": f"{t.prefix}{k}"},
                    )
            return cls(ca=cls._path(t, "ca", hint))
        return cls(ca=cls._path(t, "ca", hint), cert=cls._path(t, "cert", hint), key=cls._path(t, "key", hint))

    @staticmethod
    def _path(t: Table, key: str, hint: str) -> Path:
        if not isinstance(t.doc.get(key), str) or not t.doc[key]:
            raise t.key_error(key, hint)
        return t.path(key)

    def check_addresses(self, addresses: dict[str, str], *, source: str = "") -> None:
        """Plaintext is refused on any address outside loopback (ConfigError naming it); logged loudly."""
        if not self.plaintext:
            return
        for name, address in addresses.items():
            if not is_loopback(address):
                raise ConfigError(
                    f"{source + ': ' if source else ''}[tls] plaintext = true is refused: {name} {address} is not "
                    "a loopback address; configure [tls] ca, cert and key (docs/operations.md, Certificates)",
                    details={"key": "tls.plaintext", "address": address},
                )
        log.warning(PLAINTEXT_WARNING)

    def with_identity(self, cert_pem: bytes, key_pem: bytes) -> TLSConfig:
        return replace(self, identity=(cert_pem, key_pem))

    def pinned(self, cert_pem: bytes) -> TLSConfig:
        """The same client identity, trusting exactly the server certificate ``cert_pem``."""
        return replace(self, pin=cert_pem)

    def own_identity(self) -> tuple[bytes, bytes] | None:
        if self.identity is not None:
            return self.identity
        if self.cert is not None and self.key is not None:
            return _read(self.cert, "certificate"), _read(self.key, "key")
        return None

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        """This server's certificate; with ``require_client_auth`` callers must present a certificate
        of the CA (mutual TLS), else the handshake fails."""
        own = self.own_identity()
        if own is None:
            raise ConfigError("a TLS server needs its certificate and key ([tls] cert and key)")
        if require_client_auth and self.ca is None:
            raise ConfigError("a server that requires client certificates needs [tls] ca")
        return grpc.ssl_server_credentials(
            [(own[1], own[0])],
            root_certificates=_read(self.ca, "CA bundle") if require_client_auth and self.ca else None,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        own = self.own_identity()
        if self.pin is not None:
            roots = self.pin
        elif self.ca is not None:
            roots = _read(self.ca, "CA bundle")
        else:
            raise ConfigError("a TLS caller needs the CA bundle to check servers against ([tls] ca, or --ca)")
        return grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=own[1] if own else None,
            certificate_chain=own[0] if own else None,
        )


class Server:
    """A bound gRPC server with its health service."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer):
        self.grpc = server
        self.port = port
        self.health = health_servicer

    def start(self) -> None:
        self.grpc.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()

    def serve_until_signalled(self, on_stop: Callable[[], None] | None = None) -> None:
        """Block until SIGINT/SIGTERM, then stop gracefully."""
        stop = threading.Event()

        def _handler(signum: int, frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        # Wake up regularly: Python runs signal handlers in the main thread between bytecodes, and an
        # untimed wait can leave a SIGTERM unhandled for as long as the process stays busy elsewhere.
        while not stop.wait(0.2):
            pass
        log.info("stopping")
        if on_stop is not None:
            on_stop()
        self.stop()


def create_server(
    address: str,
    *,
    max_workers: int = 16,
    tls: TLSConfig | None = None,
    require_client_auth: bool = False,
    handlers: tuple[grpc.GenericRpcHandler, ...] = (),
) -> Server:
    """Bind a server at ``address`` (``host:0`` for a free port). Register servicers, then ``start()``.

    ``tls``: None or plaintext listens in the clear (loopback only); ``require_client_auth``: callers
    must present a certificate of ``tls.ca`` (mutual TLS)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=CHANNEL_OPTIONS,
        handlers=handlers,
    )
    if tls is not None and not tls.plaintext:
        port = server.add_secure_port(address, tls.server_credentials(require_client_auth=require_client_auth))
    else:
        _check_plaintext(address)
        port = server.add_insecure_port(address)
    if port == 0:
        raise UnavailableError(f"cannot listen on {address}: the address is in use or not local")
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return Server(server, port, health_servicer)


def caller_identity(context: grpc.ServicerContext) -> Identity | None:
    """Who called, by the client certificate the TLS handshake verified against the CA (None: a
    caller without one, or a plaintext server)."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    if len(names) != 1:
        return None
    try:
        return Identity.parse(names[0].decode())
    except UnicodeDecodeError:
        return None


def _check_plaintext(address: str) -> None:
    if not is_loopback(address):
        raise ConfigError(
            f"refusing plaintext gRPC to or on {address}: it is not a loopback address; configure [tls] "
            "(docs/operations.md, Certificates)",
            details={"address": address},
        )


def open_channel(address: str, *, tls: TLSConfig | None = None, server_name: str | None = None) -> grpc.Channel:
    """A channel to ``address``. ``tls`` None or plaintext: in the clear (loopback only). Otherwise the
    server must present a certificate of ``tls.ca`` (or exactly ``tls.pin``) naming ``server_name``
    (``pki.server_name(identity)``: the identity the caller means to reach); without ``server_name``
    the address's host is checked, as TLS does by default."""
    if tls is None or tls.plaintext:
        _check_plaintext(address)
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


Peer = Identity | bytes
"""Whom a caller means to reach: an identity of the collaboration CA (the server's certificate must
name it), or exactly one server certificate (PEM bytes, pinned: the enclave's, which its evidence
binds; empty on a plaintext link)."""


def dial(address: str, tls: TLSConfig | None, peer: Peer) -> grpc.Channel:
    """A channel to ``address`` that reaches ``peer`` or fails in the TLS handshake."""
    if tls is None or tls.plaintext:
        return open_channel(address)
    if isinstance(peer, Identity):
        return open_channel(address, tls=tls, server_name=server_name(peer))
    if not peer:
        raise AttestationError(
            "the enclave offered no TLS certificate (a plaintext enclave) to a caller that requires TLS",
            details={"check": "tls_binding"},
        )
    try:
        name = cert_dns_name(peer)
    except ValueError:
        raise AttestationError(
            "the enclave's TLS certificate names no DNS name", details={"check": "tls_binding"}
        ) from None
    return open_channel(address, tls=tls.pinned(peer), server_name=name)


def fetch_server_certificate(
    address: str, tls: TLSConfig | None, *, peer: str = "the enclave", timeout: float = 10.0
) -> bytes:
    """The certificate the server at ``address`` presents (PEM), UNVERIFIED: the caller pins it, then
    trusts it only once attestation evidence binds its key (the enclave's; docs/wire.md). Empty on a
    plaintext link."""
    if tls is None or tls.plaintext:
        return b""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # noqa: S504 - fetched to be pinned and checked against evidence
    ctx.set_alpn_protocols(["h2"])
    own = tls.own_identity()
    if own is not None:
        with tempfile.TemporaryDirectory() as d:  # ssl loads a client certificate from files only
            (Path(d) / "c.pem").write_bytes(own[0] + b"\n" + own[1])
            ctx.load_cert_chain(Path(d) / "c.pem")
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=ENCLAVE_SERVER_NAME) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except (OSError, ValueError) as exc:
        raise UnavailableError(f"{peer} unreachable at {address} ({type(exc).__name__}); is it running?") from None
    if not der:
        raise UnavailableError(f"{peer} at {address} presented no TLS certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def wait_healthy(
    address: str, *, timeout: float = 30.0, tls: TLSConfig | None = None, server_name: str | None = None
) -> None:
    """Wait until the server at ``address`` reports SERVING (UnavailableError after ``timeout``)."""
    with open_channel(address, tls=tls, server_name=server_name) as channel:
        wait_healthy_channel(channel, address, timeout=timeout)


def wait_healthy_channel(channel: grpc.Channel, address: str, *, timeout: float = 30.0) -> None:
    """Wait until the server on ``channel`` reports SERVING (UnavailableError naming ``address``)."""
    deadline = time.monotonic() + timeout
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise UnavailableError(f"no healthy server at {address} after {timeout:.0f} s")
        time.sleep(0.1)


def abort(context: grpc.ServicerContext, err: SealroomError) -> None:
    """Abort the call with ``err``'s status, public message and public details."""
    context.set_trailing_metadata(((ERROR_METADATA_KEY, err.to_json().encode()),))
    context.abort(err.grpc_status, err.message)


def _handle(context: grpc.ServicerContext, name: str, exc: BaseException) -> None:
    if isinstance(exc, SealroomError):
        log.info("%s refused: %s", name, exc.code)
        abort(context, exc)
    else:
        # Internal errors are logged by type only at INFO and with traceback at DEBUG: a
        # third-party message can quote data (DuckDB conversion errors do), so it stays out of
        # the default log and never crosses the wire.
        log.error("%s failed with %s", name, type(exc).__name__)
        log.debug("%s traceback", name, exc_info=exc)
        abort(context, InternalError())


def translate_errors(cls: type) -> type:
    """Class decorator for servicers: each RPC method of the service (found in the generated base
    class's descriptor) first admits its caller by the table in :mod:`sealroom.callers`, then runs
    under the error translator. A method the class leaves to the generated base stays unimplemented."""
    service = _service_of(cls)
    for method in service.methods:
        fn = getattr(cls, method.name)
        if getattr(fn, "_sealroom_translated", False) or fn.__module__.endswith("_pb2_grpc"):
            continue
        setattr(cls, method.name, _wrap(method_path(service.full_name, method.name), fn))
    return cls


def _service_of(cls: type) -> Any:
    """The service descriptor behind a servicer class (its generated ``<Service>Servicer`` base)."""
    for base in cls.__mro__:
        if base.__module__.endswith("_pb2_grpc") and base.__name__.endswith("Servicer"):
            messages = importlib.import_module(base.__module__.removesuffix("_grpc"))
            return messages.DESCRIPTOR.services_by_name[base.__name__.removesuffix("Servicer")]
    raise TypeError(f"{cls.__name__} is not a servicer of a generated service")


def _admit(path: str, servicer: Any, request: Any, context: grpc.ServicerContext) -> None:
    """Refuse the call unless the table admits its caller (sealroom.callers): the transport identity
    here, the proof a request carries (a token, an owner's signature) by the servicer's hook."""
    rule = callers.admit(path, caller_identity(context))
    if rule in callers.SIGNED:
        callers.require_signed(path, request)
    if rule in callers.PROVED_BY_SERVICER:
        prove = getattr(servicer, "prove_caller", None)
        if prove is None:
            raise callers.unprovable(path)
        prove(rule, path, request, context)


def _wrap(path: str, fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _admit(path, self, request, context)
            return fn(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one translator
            if _is_abort(exc):
                raise
            _handle(context, path, exc)

    wrapper._sealroom_translated = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a plain Exception subclass internal to grpc; let it through.
    return type(exc).__module__.startswith("grpc")


def raw_stream_handler(
    service: str, method: str, fn: Callable[[Iterator[bytes], grpc.ServicerContext], bytes]
) -> grpc.GenericRpcHandler:
    """A client-streaming method over raw bytes (no protobuf copy), its caller admitted by the table
    in :mod:`sealroom.callers` before ``fn`` reads a frame, with the error translator."""
    path = method_path(service, method)

    def behaviour(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            _admit(path, None, None, context)
            return fn(request_iterator, context)
        except Exception as exc:  # noqa: BLE001 - the one translator
            if _is_abort(exc):
                raise
            _handle(context, path, exc)
            raise AssertionError("unreachable") from exc

    return grpc.method_handlers_generic_handler(
        service,
        {method: grpc.stream_unary_rpc_method_handler(behaviour)},
    )


def unwrap(exc: grpc.RpcError, *, peer: str = "server") -> SealroomError:
    """Turn a client-side RpcError into the SealroomError the server meant."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            try:
                doc = json.loads(value)
                return from_code(doc.get("code", "internal"), doc.get("message", ""), doc.get("details"))
            except (ValueError, TypeError):
                break
    code = exc.code() if hasattr(exc, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(f"{peer} unreachable or too slow ({code.name.lower()}); is it running?")
    if code == grpc.StatusCode.CANCELLED:
        return UnavailableError(f"call to {peer} was cancelled")
    return InternalError(f"{peer} failed ({code.name if code else 'unknown'})")


def call(peer: str, method: Callable[..., Any], request: Any, *, timeout: float | None = 60.0, **kw: Any) -> Any:
    """Invoke a unary stub method, converting gRPC failures to SealroomError."""
    try:
        return method(request, timeout=timeout, **kw)
    except grpc.RpcError as exc:
        raise unwrap(exc, peer=peer) from None
