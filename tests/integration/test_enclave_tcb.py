"""The enclave worker's trusted computing base, measured on a real worker process.

DESIGN.md: the worker process loads only the kernel, ``enclave_worker`` and the libraries it needs
(grpcio, protobuf, pyarrow, DuckDB, cryptography, sqlglot, and OpenDP for a differentially private
release, loaded by such a job only); never pandas, the coordinator, connectors or MPyC. This starts
``sealroom enclave serve`` as its own process, runs a whole threshold job and a whole dp job through
it (so the lazily imported code paths are loaded too), then reads ``GetInfo``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from coordinator.tee_stage import verify_result
from enclave_worker.config import EnclaveConfig
from sealroom.attestation import enclave_measurement
from sealroom.policy import DatasetPolicy
from sealroom.rpc import wait_healthy_channel
from sealroom.v1 import common_pb2
from tests.harness.enclave import (
    SECRET,
    SECRET_NUMBER,
    EnclaveHandle,
    approvals,
    connect_enclave,
    make_party,
    make_plan,
    secret_loans,
    trusting,
)
from tests.harness.pki import enclave_tls

MUST_LOAD = ("duckdb", "pyarrow", "cryptography", "sqlglot", "grpc", "sealroom", "enclave_worker")
# Allowed in the enclave beyond MUST_LOAD: OpenDP (its vetted noise samplers), for dp jobs only.
DP_LOADS = ("opendp",)
JOIN_SQL = (
    "SELECT a.segment, COUNT(*) AS n, SUM(a.exposure + b.exposure) AS total "
    "FROM bank_a.loans a JOIN bank_b.loans b ON a.customer_id = b.customer_id GROUP BY a.segment"
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnclaveHandle, Path]]:
    from sealroom.attestation import dev_init

    base = tmp_path_factory.mktemp("enclave-process")
    dev_dir = base / "dev"
    dev_init(dev_dir)
    config = base / "enclave.toml"
    config.write_text(
        f'[enclave]\nlisten = "127.0.0.1:0"\nattester = "simulated"\ndev_root = {json.dumps(str(dev_dir))}\n'
        "memory_limit_mb = 256\n"
        f"[tls]\nca = {json.dumps(str(enclave_tls().ca))}\n"
    )
    port_file = base / "enclave.port"
    log_path = base / "enclave.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sealroom.cli",
                "--log-level",
                "debug",
                "enclave",
                "serve",
                "--config",
                str(config),
                "--port-file",
                str(port_file),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=base,
        )
    channel = None
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"the enclave worker exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the enclave worker did not start"
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        # The relying party computes the measurement it pins from the code and the configuration.
        measurement = enclave_measurement(EnclaveConfig.load(config).measured())
        handle = connect_enclave(address, trusting(dev_dir, measurement))
        channel = handle.channel
        wait_healthy_channel(channel, address, timeout=20)
        yield handle, log_path
    finally:
        if channel is not None:
            channel.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _numpy_needed_by_the_data_libraries() -> bool:
    """Does importing the worker's own libraries (pyarrow, duckdb) load numpy by itself?"""
    code = "import sys, pyarrow, pyarrow.compute, pyarrow.ipc, duckdb; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip() == "True"


@dataclass(frozen=True)
class Loaded:
    fresh: frozenset[str]  # top-level packages of the worker before any job
    after_job: frozenset[str]  # ... after a whole job ran through it
    log: str


@pytest.fixture(scope="module")
def loaded(worker: tuple[EnclaveHandle, Path]) -> Loaded:
    enclave, log_path = worker
    fresh = frozenset(enclave.stub.GetInfo(common_pb2.Empty(), timeout=10).loaded_packages)
    a = make_party("bank_a", secret_loans())
    b = make_party("bank_b", secret_loans(7))  # few customers in common: some cells are suppressed
    plan = make_plan(JOIN_SQL, [a, b])
    job = enclave.create_job(plan)
    for p in (a, b):
        enclave.upload(job.seal(p))
    resp = job.execute(approvals(plan, [a, b]))
    verified = verify_result(
        resp, plan=plan, hpke_public=job.hpke_public, signing_public=job.signing_public, appraisal=enclave.appraisal
    )
    assert pa.ipc.open_stream(verified.arrow_table).read_all().num_rows > 0
    assert verified.doc["suppressed"], "the job exercises the disclosure rules (some cells are suppressed)"
    _dp_job(enclave)
    info = enclave.stub.GetInfo(common_pb2.Empty(), timeout=10)
    assert info.simulated and info.attestation_format == "simulated"
    assert info.measurement in enclave.appraisal.measurements
    return Loaded(fresh, frozenset(info.loaded_packages), log_path.read_text(errors="replace"))


def _dp_job(enclave: EnclaveHandle) -> None:
    """A whole dp job (noise from OpenDP) through the worker."""
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "columns": {
                "customer_id": "join_key",
                "segment": {"role": "dimension", "values": ["seg-0", "seg-1"]},
                "exposure": {"role": "measure", "min": 0, "max": 100},
            },
            "privacy": {"mode": "dp", "epsilon_budget": 4.0},
        },
        source="test.toml",
    )
    a = make_party("bank_a", secret_loans(), policy=policy)
    plan = make_plan("SELECT segment, COUNT(*) AS n, SUM(exposure) AS total FROM bank_a.loans GROUP BY segment", [a])
    assert plan.privacy is not None
    job = enclave.create_job(plan)
    enclave.upload(job.seal(a))
    resp = job.execute(approvals(plan, [a]))
    verified = verify_result(
        resp, plan=plan, hpke_public=job.hpke_public, signing_public=job.signing_public, appraisal=enclave.appraisal
    )
    assert verified.doc["privacy"]["mode"] == "dp" and set(verified.doc["ci95"]) == {"n", "total"}


def test_worker_loads_opendp_for_dp_jobs_only(loaded: Loaded) -> None:
    assert not set(DP_LOADS) & loaded.fresh, "a fresh worker loads OpenDP only when a dp job needs it"
    assert set(DP_LOADS) <= loaded.after_job


@pytest.mark.parametrize("when", ["fresh", "after_job"])
def test_worker_loads_no_component_and_no_mpc(when: str, loaded: Loaded) -> None:
    packages = getattr(loaded, when)
    forbidden = {"coordinator", "connectors", "mpyc", "mpc"}
    assert not packages & forbidden, f"the enclave worker loaded {sorted(packages & forbidden)}"


def test_worker_loads_the_libraries_it_needs(loaded: Loaded) -> None:
    assert set(MUST_LOAD) <= loaded.after_job, f"missing: {sorted(set(MUST_LOAD) - loaded.after_job)}"


def test_fresh_worker_has_not_loaded_pandas(loaded: Loaded) -> None:
    assert "pandas" not in loaded.fresh


def test_worker_has_not_loaded_pandas_after_a_job(loaded: Loaded) -> None:
    assert "pandas" not in loaded.after_job


def test_numpy_is_loaded_only_because_pyarrow_needs_it(loaded: Loaded) -> None:
    """numpy is not forbidden by name in DESIGN.md but is not needed either: pyarrow imports it
    whenever it is installed. Accept it only in that case."""
    if "numpy" in loaded.after_job:
        assert _numpy_needed_by_the_data_libraries(), "numpy is loaded by something other than pyarrow/duckdb"


def test_worker_log_holds_no_row_value(loaded: Loaded) -> None:
    """Invariant 7 on a real worker process logging at DEBUG."""
    assert "executed" in loaded.log
    assert SECRET not in loaded.log and str(SECRET_NUMBER) not in loaded.log
