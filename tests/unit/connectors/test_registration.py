"""The agent's side of registration: ``[party] enrolment_token`` (the token, or a file holding it),
and the registration it sends, signed by its own key over exactly what it registers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.agent import PartyAgent, PartyConfig
from sealroom.auth import generate_token
from sealroom.config import file_table
from sealroom.errors import AuthenticationError, ConfigError
from sealroom.keys import generate_signing_key, save_signing_key
from sealroom.signing import Registration


def config_file(tmp_path: Path, token_line: str) -> Path:
    pq.write_table(pa.table({"customer_id": pa.array([1, 2, 3], pa.int64())}), tmp_path / "a.parquet")
    if not (tmp_path / "bank_a.key").exists():
        save_signing_key(generate_signing_key(), tmp_path / "bank_a.key")
    path = tmp_path / "party.toml"
    path.write_text(
        '[tls]\nplaintext = true\n[party]\nname = "bank_a"\ncoordinator = "127.0.0.1:9"\nsigning_key = "bank_a.key"\n'
        f"{token_line}\n"
        '[[dataset]]\nname = "loans"\nsource = "a.parquet"\n'
    )
    return path


def load(path: Path) -> PartyConfig:
    return PartyConfig.from_table(file_table(path))


def test_the_enrolment_token_is_given_inline_or_in_a_file(tmp_path: Path) -> None:
    token = generate_token()
    assert load(config_file(tmp_path, f'enrolment_token = "{token}"')).enrolment_token == token
    (tmp_path / "bank_a.enrolment").write_text(token + "\n")
    config = load(config_file(tmp_path, 'enrolment_token = "bank_a.enrolment"'))  # relative to the config file
    assert config.enrolment_token == token and token not in repr(config)
    assert load(config_file(tmp_path, "")).enrolment_token == ""
    for bad in ('enrolment_token = "missing.file"', 'enrolment_token = "a.parquet"'):
        with pytest.raises(ConfigError, match="enrolment_token is neither an enrolment token") as caught:
            load(config_file(tmp_path, bad))
        assert caught.value.details["key"] == "party.enrolment_token"


def test_the_agent_signs_what_it_registers(tmp_path: Path) -> None:
    token = generate_token()
    agent = PartyAgent(load(config_file(tmp_path, f'enrolment_token = "{token}"')))
    first = agent.registration("127.0.0.1:7300")
    second = agent.registration("127.0.0.1:7300")
    assert second.issued_at_ms > first.issued_at_ms and first.enrolment_token == token
    for request in (first, second):
        reg = Registration.of(
            party="bank_a",
            owner_key=agent.public_key_hex,
            address=request.party.address,
            datasets=request.datasets,
            issued_at_ms=request.issued_at_ms,
        )
        reg.verify(bytes(request.signature))
    # The same signature over another address, or another dataset list, does not verify.
    for address, datasets in (("10.6.6.6:443", first.datasets), ("127.0.0.1:7300", [])):
        moved = Registration.of(
            party="bank_a",
            owner_key=agent.public_key_hex,
            address=address,
            datasets=datasets,
            issued_at_ms=first.issued_at_ms,
        )
        with pytest.raises(AuthenticationError, match="not signed by the key it registers"):
            moved.verify(bytes(first.signature))
