"""A relay on every link sees only TLS records: no token, SQL, plan or result (issue 13, "No TLS anywhere").

One real platform (enclave, coordinator, two party agents as processes on 127.0.0.1) with a recording
relay (tests/harness/relay.py) on every link: analyst -> coordinator, coordinator -> enclave (the
address the coordinator hands the agents too, so agent -> enclave), coordinator -> each agent (the
agent's advertised address), each agent -> coordinator (registration, witnessing), and the owner's
CLI -> its agent (a manual approval). The legitimate path runs (a join released after bank_b's owner
approved by hand); then every relay forwarded traffic, every connection opened with a TLS handshake
record, and none holds the analyst's token, the SQL, the plan's id, hash or column names, the
released values (ASCII and binary) or a party's source path.
"""

from __future__ import annotations

import struct
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sealroom.app.client import Client
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.policy import DatasetPolicy
from sealroom.spawn import python_command
from tests.harness.relay import Relay

pytestmark = pytest.mark.slow

ALIAS = "relay_canary_total_7f3a9c"
SEGMENT = "zq_canary_segment"
BALANCE = "zq_canary_balance"
SQL = (
    f"SELECT a.{SEGMENT}, SUM(a.{BALANCE}) AS {ALIAS} FROM bank_a.ledger a "
    f"JOIN bank_b.ledger b ON a.customer_id = b.customer_id GROUP BY a.{SEGMENT} ORDER BY a.{SEGMENT}"
)
AUTO = DatasetPolicy(privacy_unit="customer_id", min_group_size=3)
MANUAL = DatasetPolicy(privacy_unit="customer_id", min_group_size=3, approval="manual")


def _ledger(path) -> str:
    n = 40
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array(range(n), pa.int64()),
                SEGMENT: ["north"] * 25 + ["south"] * 15,
                # Distinctive sums: nothing like them occurs by chance in the traffic.
                BALANCE: pa.array([7919.37 + 131.071 * i for i in range(n)]),
            }
        ),
        path,
    )
    return str(path)


def _wait(check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def _encodings(value: float) -> list[bytes]:
    """How a released number could travel: its ASCII forms and its 8-byte little-endian encodings."""
    out = [struct.pack("<d", value), repr(value).encode(), f"{value:.2f}".encode()]
    if float(value).is_integer():
        out += [struct.pack("<q", int(value))]
    return out


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    d = tmp_path_factory.mktemp("relay")
    sources = {"bank_a": _ledger(d / "canary_source_a.parquet"), "bank_b": _ledger(d / "canary_source_b.parquet")}
    relays: dict[str, Relay] = {}

    def route(link: str, address: str) -> str:
        if link.startswith("coordinator->party-"):  # the agent advertises a host with its own port
            relays[link] = Relay(address, listen=f"127.0.0.2:{address.rsplit(':', 1)[1]}")
        else:
            relays[link] = Relay(address)
        return relays[link].address

    parties = [
        PartySpec("bank_a", (DatasetSpec("ledger", sources["bank_a"], AUTO),)),
        PartySpec("bank_b", (DatasetSpec("ledger", sources["bank_b"], MANUAL),)),
    ]
    cluster = Cluster(d / "state", parties, route=route)
    with cluster:
        relays["analyst->coordinator"] = Relay(cluster.coordinator_address)
        relays["owner->party-bank_b"] = Relay(cluster.addresses["party-bank_b"])
        client = Client(
            relays["analyst->coordinator"].address, analyst="analyst", token=cluster.token(), ca=cluster.ca_path
        )
        with client:
            qid = client.submit(SQL).query_id
            _wait(lambda: client.status(qid)["status"] == "pending_approval")
            command = cluster.approve_command(qid, "bank_b")
            command[command.index("--agent") + 1] = relays["owner->party-bank_b"].address
            approved = subprocess.run(
                python_command("sealroom.cli", *command), capture_output=True, text=True, timeout=120
            )
            assert approved.returncode == 0, approved.stderr
            result = client.query(qid).result(timeout=300)
        yield {"cluster": cluster, "relays": relays, "result": result, "qid": qid, "sources": sources}
    for relay in relays.values():
        relay.close()


def test_every_link_was_relayed_and_carried_tls(relayed):
    relays = relayed["relays"]
    assert set(relays) == {
        "analyst->coordinator",
        "coordinator->enclave",
        "coordinator->party-bank_a",
        "coordinator->party-bank_b",
        "party-bank_a->coordinator",
        "party-bank_b->coordinator",
        "owner->party-bank_b",
    }
    for link, relay in relays.items():
        assert relay.connections > 0, link
        assert relay.bytes_seen > 2000, (link, relay.bytes_seen)
        assert relay.openings and all(o[:2] == b"\x16\x03" for o in relay.openings), (link, relay.openings)
    # The sealed rows went through the enclave's relay (both agents stream there).
    assert relays["coordinator->enclave"].bytes_seen > relays["analyst->coordinator"].bytes_seen


def test_no_relay_sees_a_token_sql_plan_value_or_path(relayed):
    cluster, result = relayed["cluster"], relayed["result"]
    assert result.status == "released", result.error
    values = [v for v in result.table.column(ALIAS).to_pylist() if v is not None]
    assert len(values) == 2 and all(v > 100_000 for v in values)
    receipt = result.receipt or {}
    plan_hash = receipt["result"]["approvals"][0]["plan_hash"]  # what each owner signed
    assert len(plan_hash) == 64, receipt
    secrets: dict[str, bytes] = {
        "token": cluster.token().encode(),
        "sql": SQL.encode(),
        "alias": ALIAS.encode(),
        "segment column": SEGMENT.encode(),
        "balance column": BALANCE.encode(),
        "query id": relayed["qid"].encode(),
        **{f"source {p}": s.encode() for p, s in relayed["sources"].items()},
        **{f"value {i}": enc for i, v in enumerate(values) for enc in _encodings(v)},
    }
    secrets |= {"plan hash": plan_hash.encode(), "plan hash (binary)": bytes.fromhex(plan_hash)}
    for link, relay in relayed["relays"].items():
        seen = relay.seen()
        leaked = [name for name, secret in secrets.items() if secret in seen]
        assert not leaked, f"{link} saw {leaked}"
    # The search finds what is there: the server name a TLS ClientHello carries in clear (SNI).
    assert b"coordinator.sealroom" in relayed["relays"]["analyst->coordinator"].seen()
