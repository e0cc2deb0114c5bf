"""An attacker's review of issue 13 once its parts were merged: the gaps found between the parts,
each as an attack that now fails while the legitimate path still works.

- A coordinator without ``[analysts]`` takes self-declared analyst names: on a non-loopback address
  anyone who reaches it could act as an analyst the owners allow (the allow-list of attack 1). It
  is refused there, as plaintext is (``coordinator.servicer.build_server``).
- Whoever runs the coordinator replays a released query: one ``query_submitted`` entry, owners'
  approvals that stay live for an hour, so it creates a second enclave job for the same plan, asks
  the agents to ``Contribute`` again (their data may have changed since: a difference of two
  releases) and calls ``Execute`` with the approvals and log position of the first release. An
  agent streams its data once per approved plan, and runs each MPC player of it once
  (``Approvals.claim``), so the log's one entry is one release
  (``tests/integration/test_log_bound.py``, with the platform of attack 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import servicer as coordinator_servicer
from coordinator.config import CoordinatorConfig
from sealroom import pki
from sealroom.auth import AnalystDirectory, generate_token, token_hash
from sealroom.errors import ConfigError
from sealroom.policy import TrustPolicy
from tests.harness.pki import tls_as


def _coordinator(tmp_path: Path, listen: str, analysts: AnalystDirectory | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        state_dir=tmp_path / "coordinator",
        enclave="127.0.0.1:9",
        trust=TrustPolicy(),
        listen=listen,
        analysts=analysts,
        tls=tls_as(pki.coordinator()),
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_unauthenticated_analysts_are_refused_outside_loopback(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        coordinator_servicer.build_server(_coordinator(tmp_path, listen, None))
    assert "[analysts]" in info.value.message and info.value.details == {"address": listen}


@pytest.mark.parametrize(
    ("listen", "analysts"),
    [("127.0.0.1:0", None), ("0.0.0.0:0", AnalystDirectory({"alice": token_hash(generate_token())}))],
)
def test_a_coordinator_with_analysts_or_on_loopback_still_serves(
    tmp_path: Path, listen: str, analysts: AnalystDirectory | None
) -> None:
    server, coordinator = coordinator_servicer.build_server(_coordinator(tmp_path, listen, analysts))
    server.start()
    try:
        assert server.port > 0
    finally:
        server.stop(0)
        coordinator.shutdown()
