"""Fixtures of the planning tests: an in-process enclave job registry (the enclave's admission)."""

from __future__ import annotations

import pytest

from enclave_worker.attester import make_attester
from enclave_worker.config import EnclaveConfig
from enclave_worker.jobs import JobRegistry
from sealroom.attestation import dev_init


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> JobRegistry:
    dev = tmp_path_factory.mktemp("dev")
    dev_init(dev)
    cfg = EnclaveConfig(attester="simulated", dev_root=dev)
    return JobRegistry(cfg, make_attester(cfg))
