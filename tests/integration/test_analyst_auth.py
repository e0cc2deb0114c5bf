"""Analysts are authenticated by their tokens; owners' analyst rules and every record use that name."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.config import CoordinatorConfig
from sealroom.app.client import Client
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.auth import AnalystDirectory, generate_token, token_hash
from sealroom.errors import AuthenticationError, ConfigError, NotFoundError, PolicyRefusalError
from sealroom.policy import DatasetPolicy

pytestmark = pytest.mark.slow
SQL = "SELECT segment, COUNT(*) AS n FROM bank_a.loans GROUP BY segment"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    pq.write_table(
        pa.table({"customer_id": pa.array(range(20), pa.int64()), "segment": ["retail"] * 20}), d / "a.parquet"
    )
    policy = DatasetPolicy(privacy_unit="customer_id", analysts=("alice",))
    parties = [PartySpec("bank_a", (DatasetSpec("loans", str(d / "a.parquet"), policy),))]
    with Cluster(d / "state", parties, analysts=("alice", "bob")) as cluster:
        yield cluster


def test_calls_without_a_valid_token_are_refused(platform):
    with Client(platform.coordinator_address, ca=platform.ca_path) as anonymous:
        with pytest.raises(AuthenticationError, match="requires an analyst token"):
            anonymous.datasets()
    with Client(platform.coordinator_address, token=generate_token(), ca=platform.ca_path) as forger:
        with pytest.raises(AuthenticationError, match="not valid"):
            forger.submit(SQL)


def test_a_token_cannot_claim_another_analyst(platform):
    with Client(platform.coordinator_address, analyst="alice", token=platform.token("bob"), ca=platform.ca_path) as c:
        with pytest.raises(AuthenticationError, match="bob's; it cannot act as alice"):
            c.explain(SQL)


def test_owners_analyst_rules_apply_to_the_authenticated_name(platform):
    with platform.client("alice") as alice, platform.client("bob") as bob:
        released = alice.run(SQL, timeout=60)
        assert released.status == "released" and alice.status(released.query_id)["analyst"] == "alice"
        assert released.plan["analyst"] == "alice"
        with pytest.raises(PolicyRefusalError, match="may not be queried by analyst bob") as info:
            bob.explain(SQL)
        assert info.value.details["rule"] == "analysts"
        refused = bob.run(SQL, timeout=60)
        assert refused.status == "refused" and refused.error.details["party"] == "bank_a"


def test_analysts_see_only_their_own_queries(platform):
    with platform.client("alice") as alice, platform.client("bob") as bob:
        mine = alice.submit(SQL).query_id
        with pytest.raises(NotFoundError):
            bob.status(mine)
        with pytest.raises(NotFoundError):
            bob.result(mine)
        assert mine not in {q["query_id"] for q in bob.queries()}
        assert mine in {q["query_id"] for q in alice.queries()}


def test_token_command_prints_a_line_the_coordinator_accepts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sealroom.cli", "analyst", "token", "carol", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(proc.stdout)
    assert doc["config_line"] == f'carol = "{token_hash(doc["token"])}"'
    cfg = tmp_path / "coordinator.toml"
    head = '[coordinator]\nstate_dir = "s"\nenclave = "127.0.0.1:1"\n[tls]\nplaintext = true\n'
    cfg.write_text(f"{head}[analysts]\n{doc['config_line']}\n")
    directory = CoordinatorConfig.load(cfg).analysts
    assert directory is not None
    assert directory.authenticate([("authorization", f"Bearer {doc['token']}")]) == "carol"


@pytest.mark.parametrize("value", ['"sha256:abc"', '"plain-token"', "5"])
def test_malformed_analyst_entries_are_config_errors(tmp_path, value):
    cfg = tmp_path / "coordinator.toml"
    head = '[coordinator]\nstate_dir = "s"\nenclave = "127.0.0.1:1"\n[tls]\nplaintext = true\n'
    cfg.write_text(f"{head}[analysts]\ncarol = {value}\n")
    with pytest.raises(ConfigError, match="analysts.carol"):
        CoordinatorConfig.load(cfg)
    assert AnalystDirectory({}).names() == []
