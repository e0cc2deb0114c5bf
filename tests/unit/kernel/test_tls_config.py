"""The one ``[tls]`` loader (rpc.TLSConfig.from_table) of the coordinator, the agent and the enclave:
TLS unless ``plaintext = true``, which is logged loudly and refused outside loopback; and the report
data that binds the enclave's TLS key without changing the value for old inputs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from connectors.agent.config import PartyConfig
from coordinator.config import CoordinatorConfig
from enclave_worker.config import EnclaveConfig
from enclave_worker.tls import make_identity
from sealroom import pki
from sealroom.attestation import report_data_for
from sealroom.errors import ConfigError
from sealroom.rpc import TLSConfig, create_server, is_loopback, open_channel

COORDINATOR = '[coordinator]\nstate_dir = "s"\nlisten = "{listen}"\nenclave = "{peer}"\n'
PARTY = '[party]\nname = "bank_a"\nsigning_key = "k.key"\nlisten = "{listen}"\ncoordinator = "{peer}"\n'
PARTY_TAIL = '[[dataset]]\nname = "loans"\nsource = "a.csv"\n'
ENCLAVE = '[enclave]\ndev_root = "dev"\nlisten = "{listen}"\n'
PLAINTEXT = "[tls]\nplaintext = true\n"


def _load(tmp_path: Path, role: str, text: str):
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    if role == "coordinator":
        return CoordinatorConfig.load(path)
    if role == "party":
        return PartyConfig.load(path)
    return EnclaveConfig.load(path)


def _doc(role: str, listen: str, peer: str, tls: str) -> str:
    head = {"coordinator": COORDINATOR, "party": PARTY, "enclave": ENCLAVE}[role].format(listen=listen, peer=peer)
    return head + tls + (PARTY_TAIL if role == "party" else "")


@pytest.mark.parametrize("role", ["coordinator", "party", "enclave"])
def test_plaintext_on_loopback_is_accepted_and_logged_loudly(
    tmp_path: Path, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        config = _load(tmp_path, role, _doc(role, "127.0.0.1:0", "localhost:7100", PLAINTEXT))
    assert config.tls.plaintext
    assert any("TLS is OFF" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    ("role", "listen", "peer", "named"),
    [
        ("coordinator", "0.0.0.0:7100", "127.0.0.1:7300", "coordinator.listen"),
        ("coordinator", "127.0.0.1:7100", "enclave.internal:7300", "coordinator.enclave"),
        ("party", "127.0.0.1:0", "10.0.0.5:7100", "party.coordinator"),
        ("party", "[::]:7200", "127.0.0.1:7100", "party.listen"),
        ("enclave", "192.168.1.4:7300", "", "enclave.listen"),
    ],
)
def test_plaintext_is_refused_outside_loopback(tmp_path: Path, role: str, listen: str, peer: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"plaintext = true is refused: {named}"):
        _load(tmp_path, role, _doc(role, listen, peer, PLAINTEXT))


@pytest.mark.parametrize("role", ["coordinator", "party", "enclave"])
def test_a_config_without_tls_says_what_to_add(tmp_path: Path, role: str) -> None:
    with pytest.raises(ConfigError, match=r"no \[tls\] table.*sealroom dev init.*plaintext = true"):
        _load(tmp_path, role, _doc(role, "127.0.0.1:0", "127.0.0.1:1", ""))


def test_the_tls_table_names_its_files_and_the_enclave_makes_its_own(tmp_path: Path) -> None:
    tls = '[tls]\nca = "tls/ca.crt"\ncert = "tls/coordinator.crt"\nkey = "tls/coordinator.key"\n'
    config = _load(tmp_path, "coordinator", _doc("coordinator", "0.0.0.0:7100", "10.0.0.5:7300", tls))
    assert config.tls == TLSConfig(
        ca=tmp_path / "tls/ca.crt", cert=tmp_path / "tls/coordinator.crt", key=tmp_path / "tls/coordinator.key"
    )
    with pytest.raises(ConfigError, match="tls.cert"):
        _load(tmp_path, "party", _doc("party", "127.0.0.1:0", "127.0.0.1:1", '[tls]\nca = "ca.crt"\n'))
    with pytest.raises(ConfigError, match="makes its own TLS key"):
        _load(tmp_path, "enclave", _doc("enclave", "0.0.0.0:7300", "", tls))
    enclave = _load(tmp_path, "enclave", _doc("enclave", "0.0.0.0:7300", "", '[tls]\nca = "ca.crt"\n'))
    assert enclave.tls == TLSConfig(ca=tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="plaintext"):
        _load(tmp_path, "enclave", _doc("enclave", "127.0.0.1:0", "", '[tls]\nca = "ca.crt"\nplaintext = true\n'))


def test_plaintext_servers_and_channels_refuse_addresses_outside_loopback() -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        open_channel("10.1.2.3:7100")
    with pytest.raises(ConfigError, match="not a loopback address"):
        create_server("0.0.0.0:0", tls=TLSConfig.off())
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("coordinator.internal:1")


def test_missing_certificate_files_say_how_to_make_them(tmp_path: Path) -> None:
    tls = TLSConfig(ca=tmp_path / "ca.crt", cert=tmp_path / "c.crt", key=tmp_path / "c.key")
    with pytest.raises(ConfigError, match="sealroom dev init"):
        tls.channel_credentials()


def test_report_data_binds_the_tls_key_and_keeps_old_values() -> None:
    keys = {"hpke_public_key": b"h" * 32, "signing_public_key": b"s" * 32, "nonce": b"n" * 32}
    old = report_data_for(**keys)
    assert report_data_for(**keys, tls_key_sha256=None) == old  # stored receipts verify unchanged
    identity = make_identity()
    bound = report_data_for(**keys, tls_key_sha256=identity.key_sha256)
    assert bound != old and bound != report_data_for(**keys, tls_key_sha256=make_identity().key_sha256)
    spki = identity.key_sha256
    assert spki == pki.spki_sha256(identity.cert_pem) and len(spki) == 32
    assert pki.cert_dns_name(identity.cert_pem) == pki.ENCLAVE_SERVER_NAME
    with pytest.raises(ValueError, match="SHA-256"):
        report_data_for(**keys, tls_key_sha256=hashlib.sha1(b"x").digest())  # noqa: S324


def test_dev_pki_issues_once_and_names_identities(tmp_path: Path) -> None:
    dev = pki.DevPKI(tmp_path / "tls")
    assert dev.issue(pki.party("bank_a"))
    first = dev.cert(pki.party("bank_a")).read_bytes()
    assert not dev.issue(pki.party("bank_a")) and dev.cert(pki.party("bank_a")).read_bytes() == first
    with pytest.raises(FileExistsError):
        dev.issue(pki.party("bank_a"), exist_ok=False)
    assert dev.issue(pki.party("bank_a"), force=True) and dev.cert(pki.party("bank_a")).read_bytes() != first
    assert pki.certificate_identity(dev.cert(pki.party("bank_a")).read_bytes()) == pki.party("bank_a")
    assert oct(dev.key(pki.party("bank_a")).stat().st_mode & 0o777) == "0o600"
