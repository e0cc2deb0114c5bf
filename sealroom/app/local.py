"""A whole Sealroom platform on this machine, for notebooks, tutorials and scripts.

    >>> import sealroom
    >>> platform = sealroom.local_platform("hospital")    # enclave worker, coordinator, party agents
    >>> client = platform.client                          # a sealroom.Client connected as the analyst
    >>> client.submit("SELECT diagnosis, COUNT(*) AS n FROM hospital_north.stays GROUP BY diagnosis").result()
    >>> platform.stop()                                   # or use it as a context manager

It is the platform ``sealroom demo`` runs (:mod:`sealroom.app.demo`'s scenarios, :mod:`sealroom.app.cluster`):
each component a real process serving gRPC on 127.0.0.1, with the scenario's seeded synthetic data,
the owners' policies, and SIMULATED attestation (there is no TEE on a laptop; every result says so).
Where an owner approves queries by hand (in the bank scenario, ``bank_c``), :meth:`LocalPlatform.approve`
plays that owner's data officer with the real ``sealroom approve`` command.
"""

from __future__ import annotations

import json
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sealroom.app.client import TERMINAL, Client, QueryHandle
from sealroom.app.cluster import Cluster
from sealroom.app.demo import SCENARIOS
from sealroom.errors import ApprovalError, ConfigError

__all__ = ["LocalPlatform", "local_platform"]


def _shutdown(client: Client | None, cluster: Cluster, tmp: tempfile.TemporaryDirectory[str] | None) -> None:
    try:
        if client is not None:
            client.close()
        cluster.stop()
    finally:
        if tmp is not None:
            tmp.cleanup()


class LocalPlatform:
    """A running local platform: ``client`` (connected as the analyst), ``cluster`` (its processes,
    addresses, keys and logs), ``scenario``, ``state_dir``. Stopped by :meth:`stop`, by leaving a
    ``with`` block, or when the Python process exits."""

    def __init__(
        self,
        scenario: str = "bank",
        *,
        state_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
        self.scenario = SCENARIOS[scenario]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sealroom-local-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir).resolve()
        parties = self.scenario.parties(self.state_dir / "data")
        self.cluster = Cluster(self.state_dir / "platform", parties, log=log or (lambda msg: None))
        self.client: Client | None = None
        self._finalizer: weakref.finalize[Any, LocalPlatform] | None = None

    def start(self) -> LocalPlatform:
        """Start every process and connect the analyst's client (about ten seconds)."""
        try:
            self.cluster.start()
            self.client = self.cluster.client()
        except BaseException:
            _shutdown(None, self.cluster, self._tmp)
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.client, self.cluster, self._tmp)
        return self

    def stop(self) -> None:
        """Stop every process and remove the temporary state (a given ``state_dir`` is kept)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> LocalPlatform:
        return self if self.client is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        running = self.client is not None and self._finalizer is not None and self._finalizer.alive
        where = f"coordinator {self.cluster.coordinator_address}" if running else "stopped"
        return f"<sealroom.LocalPlatform {self.scenario.name}: {where}, parties {', '.join(self.parties)}>"

    @property
    def parties(self) -> list[str]:
        return [p.name for p in self.cluster.parties]

    def manual_parties(self) -> list[str]:
        """The parties whose owners approve each query by hand (policy ``approval = "manual"``)."""
        return [p.name for p in self.cluster.parties if any(d.policy.approval == "manual" for d in p.datasets)]

    def approve(self, query: QueryHandle | str, party: str) -> dict[str, Any]:
        """Approve ``query`` as ``party``'s data officer would: ``sealroom approve QUERY_ID --party-config
        CONFIG --agent ADDRESS`` (the owner's own command, signed with its own key, over TLS with the
        party's certificate). Returns the command's
        JSON answer; raises :class:`~sealroom.errors.ApprovalError` if the agent refuses."""
        query_id = query.query_id if isinstance(query, QueryHandle) else query
        proc = self.cluster.approve_as_owner(query_id, party)
        if proc.returncode != 0:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise ApprovalError(f"{party} could not approve {query_id}: {reason}", details={"party": party})
        return dict(json.loads(proc.stdout))

    def approve_pending(self, query: QueryHandle | str, *, timeout: float = 120.0) -> list[str]:
        """Wait until ``query`` no longer waits for an owner, approving it as each owner it waits
        for by hand; return those parties. Returns as soon as the query runs or has ended."""
        assert self.client is not None, "start the platform first"
        handle = query if isinstance(query, QueryHandle) else self.client.query(query)
        approved: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            st = handle.status()
            if st["status"] in (*TERMINAL, "running"):
                return approved
            if st["status"] == "pending_approval":
                for party in st["awaiting"]:
                    if party not in approved:
                        self.approve(handle, party)
                        approved.append(party)
            if time.monotonic() > deadline:
                raise TimeoutError(f"query {handle.query_id} still {st['status']} after {timeout:.0f} s")
            time.sleep(0.1)


def local_platform(
    scenario: str = "bank",
    *,
    state_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> LocalPlatform:
    """Start a local platform for ``scenario`` (``"bank"``: three banks joined on a customer id;
    ``"hospital"``: three hospitals' stays) and return it, started, with ``.client`` connected.

    ``state_dir`` keeps keys, configs, data, the coordinator's state and each process's log there
    (default: a temporary directory, removed on stop). ``log`` receives startup messages.
    """
    platform = LocalPlatform(scenario, state_dir=state_dir, log=log)
    return platform.start()
