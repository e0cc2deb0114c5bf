"""Fixtures of the integration tests: a dev attestation root and in-process enclave workers (the
harness itself is :mod:`tests.harness.enclave`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sealroom.attestation import dev_init
from tests.harness.enclave import EnclaveHandle, start_enclave


@pytest.fixture
def dev_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    dev_init(d)
    return d


@pytest.fixture
def enclave_factory(dev_dir: Path) -> Iterator[Callable[..., EnclaveHandle]]:
    """Start in-process enclave workers with any EnclaveConfig overrides; all are stopped after."""
    stops: list[Callable[[], None]] = []

    def factory(**config: Any) -> EnclaveHandle:
        handle, stop = start_enclave(dev_dir, **config)
        stops.append(stop)
        return handle

    yield factory
    for stop in reversed(stops):
        stop()


@pytest.fixture
def enclave(enclave_factory: Callable[..., EnclaveHandle]) -> EnclaveHandle:
    return enclave_factory()
