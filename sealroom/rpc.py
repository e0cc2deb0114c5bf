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
- TLS: servers and channels take an optional :class:`TLSConfig`; without it they speak plaintext,
  which is only appropriate on loopback (the demo). Party data is sealed end to end either way.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sealroom import callers
from sealroom.callers import method_path
from sealroom.errors import (
    InternalError,
    SealroomError,
    UnavailableError,
    from_code,
)
from sealroom.pki import Identity

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


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for mutual or server-only TLS (PEM files)."""

    ca_cert: Path
    cert: Path | None = None
    key: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise SealroomError("a TLS server needs both cert and key")
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca_cert.read_bytes(),
            require_client_auth=False,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
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
    handlers: tuple[grpc.GenericRpcHandler, ...] = (),
) -> Server:
    """Bind a server at ``address`` (``host:0`` for a free port). Register servicers, then ``start()``."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=CHANNEL_OPTIONS,
        handlers=handlers,
    )
    if tls is not None:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
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


def open_channel(address: str, *, tls: TLSConfig | None = None) -> grpc.Channel:
    if tls is not None:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def wait_healthy(address: str, *, timeout: float = 30.0, tls: TLSConfig | None = None) -> None:
    """Wait until the server at ``address`` reports SERVING (UnavailableError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    with open_channel(address, tls=tls) as channel:
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
