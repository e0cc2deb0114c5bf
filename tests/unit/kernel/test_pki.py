"""The control plane's identities: certificates from the collaboration CA name who calls."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from sealroom import pki, rpc


@pytest.fixture()
def certs(tmp_path: Path) -> Path:
    ca = pki.create_ca()
    ca.save(tmp_path / "ca.crt", tmp_path / "ca.key")
    for ident, stem in [(pki.coordinator(), "coordinator"), (pki.party("bank_a"), "bank_a")]:
        cert, key = ca.issue(ident)
        (tmp_path / f"{stem}.crt").write_bytes(cert)
        (tmp_path / f"{stem}.key").write_bytes(key)
    other = pki.create_ca("another CA")
    cert, key = other.issue(pki.coordinator())
    (tmp_path / "forged.crt").write_bytes(cert)
    (tmp_path / "forged.key").write_bytes(key)
    return tmp_path


@pytest.fixture()
def server(certs: Path) -> Iterator[tuple[int, list[pki.Identity | None]]]:
    seen: list[pki.Identity | None] = []

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(rpc.caller_identity(context))
        return b"ok"

    handler = grpc.method_handlers_generic_handler("t.T", {"Who": grpc.unary_unary_rpc_method_handler(whoami)})
    srv = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    creds = grpc.ssl_server_credentials(
        [((certs / "bank_a.key").read_bytes(), (certs / "bank_a.crt").read_bytes())],
        root_certificates=(certs / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    yield port, seen
    srv.stop(0)


def _call(port: int, certs: Path, stem: str | None, target: pki.Identity) -> bytes:
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(),
        (certs / f"{stem}.key").read_bytes() if stem else None,
        (certs / f"{stem}.crt").read_bytes() if stem else None,
    )
    options = [("grpc.ssl_target_name_override", pki.server_name(target))]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        return channel.unary_unary("/t.T/Who")(b"", timeout=10)


def test_the_caller_is_named_by_its_certificate(server, certs: Path) -> None:
    port, seen = server
    assert _call(port, certs, "coordinator", pki.party("bank_a")) == b"ok"
    assert seen == [pki.coordinator()]


def test_a_server_with_another_name_is_refused(server, certs: Path) -> None:
    port, _ = server
    with pytest.raises(grpc.RpcError):
        _call(port, certs, "coordinator", pki.party("bank_b"))


@pytest.mark.parametrize("stem", [None, "forged"])
def test_a_caller_without_a_certificate_of_the_ca_is_refused_in_the_handshake(server, certs: Path, stem) -> None:
    port, seen = server
    with pytest.raises(grpc.RpcError):
        _call(port, certs, stem, pki.party("bank_a"))
    assert seen == []


@pytest.mark.parametrize("cn", ["coordinator", "party:bank_a", "party:", "party:a b", "analyst", ""])
def test_identity_parse_round_trips_and_refuses_other_names(cn: str) -> None:
    ident = pki.Identity.parse(cn)
    if cn in ("coordinator", "party:bank_a"):
        assert ident is not None and ident.common_name == cn
    else:
        assert ident is None
