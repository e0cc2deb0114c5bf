"""Player identities for MPC sessions whose players run at different owners (mpc.tls.PlayerIdentity).

Each player's CA is name-constrained to its own index and signed by its identity key; a real MPyC
session runs on the resulting credentials, and real TLS handshakes show that a player cannot use
its own CA to pose as another player.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from mpc.partials import local_partials
from mpc.session import run_session
from mpc.tls import PlayerIdentity, PlayerOffer, SessionCA, player_cn
from sealroom.errors import MpcError
from sealroom.planning.mpc_spec import Aggregate, Player
from tests.integration.test_mpc_session import make_spec, party_table

SESSION = "plan-0123:s2"


@pytest.fixture
def players() -> tuple[list[PlayerIdentity], list[Ed25519PrivateKey], list[PlayerOffer]]:
    identities = [PlayerIdentity(SESSION, i) for i in range(3)]
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    offers = [ident.offer(key.sign) for ident, key in zip(identities, keys, strict=True)]
    return identities, keys, offers


def _public(keys: list[Ed25519PrivateKey]) -> dict[int, object]:
    return {i: k.public_key() for i, k in enumerate(keys)}


def test_a_session_runs_on_identity_bound_credentials(players, tmp_path: Path) -> None:
    identities, keys, offers = players
    creds = {i: ident.credentials(offers, _public(keys)) for i, ident in enumerate(identities)}  # type: ignore[arg-type]
    assert all(c.ca_pem.count(b"BEGIN CERTIFICATE") == 3 for c in creds.values())
    parties = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(parties, (Aggregate("n", "count"),), session_id="identity")
    rng = np.random.default_rng(3)
    partials = {i: local_partials(party_table(rng, 30, boundary={}), spec, party=p.name) for i, p in enumerate(parties)}
    result = run_session(spec, partials, timeout=60, workdir=tmp_path, credentials=creds)
    assert len(result.cells) + len(result.suppressed) == len(spec.domain) and result.cells


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _handshake(
    tmp_path: Path, server: tuple[bytes, bytes], client: tuple[bytes, bytes], bundle: bytes, name: str
) -> None:
    """A TLS handshake as MPyC makes it (mutual, the bundle as CA file, ``name`` checked by the
    client); raises ssl.SSLError when a side refuses."""
    ca = _write(tmp_path, "bundle.pem", bundle)
    s_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    s_ctx.verify_mode = ssl.CERT_REQUIRED
    s_ctx.load_cert_chain(_write(tmp_path, "s.crt", server[0]), _write(tmp_path, "s.key", server[1]))
    c_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    c_ctx.load_cert_chain(_write(tmp_path, "c.crt", client[0]), _write(tmp_path, "c.key", client[1]))
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with s_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with (
            socket.create_connection(listener.getsockname()) as raw,
            c_ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            tls.sendall(b"x")
    finally:
        t.join(10)
        listener.close()
    if errors:
        raise errors[0]


def _forged_leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, index: int) -> tuple[bytes, bytes]:
    """A certificate for ``MPyC party <index>`` issued with another player's CA key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, player_cn(index))]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem


def test_a_player_cannot_pose_as_another_with_its_own_ca(players, tmp_path: Path) -> None:
    identities, keys, offers = players
    creds = [ident.credentials(offers, _public(keys)) for ident in identities]  # type: ignore[arg-type]
    bundle = creds[0].ca_pem
    # The real player 1 and player 2 shake hands.
    _handshake(
        tmp_path, (creds[1].cert_pem, creds[1].key_pem), (creds[2].cert_pem, creds[2].key_pem), bundle, player_cn(1)
    )
    # Player 0 issues itself a certificate for index 1 with its own CA: refused by TLS itself, as a
    # server (the client checks the chain) and as a client (the server checks the chain).
    forged = _forged_leaf(identities[0]._ca_key, identities[0].ca, 1)
    with pytest.raises(ssl.SSLError):
        _handshake(tmp_path, forged, (creds[2].cert_pem, creds[2].key_pem), bundle, player_cn(1))
    with pytest.raises(ssl.SSLError):
        _handshake(tmp_path, (creds[2].cert_pem, creds[2].key_pem), forged, bundle, player_cn(2))
    # Control: the same forgery under an unconstrained CA would pass (what the constraint prevents).
    loose = SessionCA("loose")
    loose_leaf = _forged_leaf(loose._key, loose.certificate, 1)
    loose_bundle = bundle + loose.ca_pem
    _handshake(tmp_path, loose_leaf, (creds[2].cert_pem, creds[2].key_pem), loose_bundle, player_cn(1))


def test_offers_are_verified_against_the_plans_identities(players) -> None:
    identities, keys, offers = players
    me = identities[0]
    # Signed by another key than the one the plan names for player 2.
    with pytest.raises(MpcError) as e:
        me.credentials(offers, {**_public(keys), 2: Ed25519PrivateKey.generate().public_key()})  # type: ignore[arg-type]
    assert e.value.details == {"reason": "identity", "player": 2}
    # Replayed from another session.
    other = PlayerIdentity("another-plan:s2", 1)
    with pytest.raises(MpcError, match="another session"):
        me.credentials([offers[0], other.offer(keys[1].sign), offers[2]], _public(keys))  # type: ignore[arg-type]
    # A CA that may issue certificates for any index (no name constraint), properly signed.
    loose = SessionCA("loose")
    from mpc.tls import offer_message

    der = loose.certificate.public_bytes(serialization.Encoding.DER)
    unconstrained = PlayerOffer(SESSION, 1, loose.ca_pem, keys[1].sign(offer_message(SESSION, 1, der)))
    with pytest.raises(MpcError, match="name constraint|other players"):
        me.credentials([offers[0], unconstrained, offers[2]], _public(keys))  # type: ignore[arg-type]
    # Missing, duplicated, or someone else's CA in this player's own slot.
    with pytest.raises(MpcError, match="missing"):
        me.credentials(offers[:2], _public(keys))  # type: ignore[arg-type]
    with pytest.raises(MpcError, match="twice"):
        me.credentials([*offers, offers[1]], _public(keys))  # type: ignore[arg-type]
    stranger = PlayerIdentity(SESSION, 0).offer(keys[0].sign)
    with pytest.raises(MpcError, match="own CA"):
        me.credentials([stranger, offers[1], offers[2]], _public(keys))  # type: ignore[arg-type]
    # Offers travel as JSON.
    assert PlayerOffer.from_dict(offers[1].to_dict()) == offers[1]


def _two_cn_leaf(ca_key, ca: x509.Certificate, own: int, claimed: int) -> tuple[bytes, bytes]:
    """A leaf from player ``own``'s CA whose subject is ``CN=MPyC party <own>, CN=MPyC party <claimed>``:
    inside the CA's name constraint (a prefix match), and OpenSSL's hostname check accepts any CN."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, player_cn(own)),
            x509.NameAttribute(NameOID.COMMON_NAME, player_cn(claimed)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(ca_key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem


@pytest.mark.parametrize("where", ["connecting", "listening"])
def test_a_certificate_naming_two_players_is_refused(players, tmp_path: Path, where: str) -> None:
    """Player 1's CA may issue ``CN=MPyC party 1, CN=MPyC party <j>``. Presented by whoever answers
    at player 2's address (checked where players 0 and 1 connect), or by a peer connecting to others
    (checked where they listen): each player requires exactly one name, the peer's own."""
    from mpc.tls import PlayerCredentials

    identities, keys, offers = players
    creds = {i: ident.credentials(offers, _public(keys)) for i, ident in enumerate(identities)}  # type: ignore[arg-type]
    if where == "connecting":  # the listener at player 2's address presents "party 1, party 2"
        cert, key = _two_cn_leaf(identities[1]._ca_key, identities[1].ca, 1, 2)
        creds[2] = PlayerCredentials(2, creds[2].ca_pem, cert, key)
        blamed = 2
    else:  # player 0 (it only connects) presents "party 1, party 0"
        cert, key = _two_cn_leaf(identities[1]._ca_key, identities[1].ca, 1, 0)
        creds[0] = PlayerCredentials(0, creds[0].ca_pem, cert, key)
        blamed = 0
    parties = (Player("bank_a"), Player("bank_b"), Player("bank_c"))
    spec = make_spec(parties, (Aggregate("n", "count"),), session_id=f"two-cn-{where}")
    rng = np.random.default_rng(4)
    partials = {i: local_partials(party_table(rng, 30, boundary={}), spec, party=p.name) for i, p in enumerate(parties)}
    with pytest.raises(MpcError) as e:
        run_session(spec, partials, timeout=30, start_timeout=3, workdir=tmp_path, credentials=creds)
    assert e.value.details["reason"] == "tls_refused" and e.value.details["player"] == blamed


ROGUE = """
import os, pickle, sys

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + {marker!r},))

_dumps = pickle.dumps
pickle.dumps = lambda obj, *a, **k: _dumps(Payload())  # every pickle this player sends runs code on unpickling
from mpc.player import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_peer_cannot_run_code_in_other_players_through_pickles(tmp_path: Path) -> None:
    """MPyC unpickles what peers send: a player whose pickles carry a callable must not get it run by
    the other players (they accept plain values only, and arrays travel as field bytes)."""
    import os
    import subprocess
    import sys
    import time

    from mpc.session import PlayerProcess, free_ports
    from sealroom.planning.mpc_spec import Player as P

    players = (P("bank_a"), P("bank_b"), P("bank_c"))
    spec = make_spec(players, (Aggregate("n", "count"),), session_id="pickle")
    rng = np.random.default_rng(5)
    partials = {i: local_partials(party_table(rng, 30, boundary={}), spec, party=p.name) for i, p in enumerate(players)}
    ca = SessionCA(spec.session_id)
    addresses = [("127.0.0.1", port) for port in free_ports(3)]
    marker = tmp_path / "EXECUTED"
    honest = [
        PlayerProcess(
            spec,
            i,
            addresses=addresses,
            credentials=ca.credentials(i),
            partials=partials[i],
            directory=tmp_path / f"p{i}",
            start_timeout=10,
            run_timeout=20,
        )
        for i in (0, 2)
    ]
    # The rogue is player 1, with the certificate the session CA issued to it: its spec as the runner lays it out.
    rogue = PlayerProcess(
        spec,
        1,
        addresses=addresses,
        credentials=ca.credentials(1),
        partials=partials[1],
        directory=tmp_path / "p1",
        start_timeout=10,
        run_timeout=20,
    )
    rogue.start()
    rogue.kill()
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE.format(marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script), "spec.json", "out.json"],
        cwd=tmp_path / "p1",
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(partials[1].to_input(spec)).encode())  # its input, by pipe as PlayerProcess does
    proc.stdin.close()
    try:
        for h in honest:
            h.start()
        outcomes = []
        for h in honest:
            try:
                h.wait(30)
                outcomes.append("ok")
            except MpcError as exc:
                outcomes.append(exc.details["reason"])
    finally:
        proc.kill()
        proc.wait()
        for h in honest:
            h.close()
        rogue.close()
    time.sleep(0.2)
    assert not marker.exists(), "an MPC peer ran code in another player"
    assert "ok" not in outcomes  # the honest players refused the session; nothing was released
