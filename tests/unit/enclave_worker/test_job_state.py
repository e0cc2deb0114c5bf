"""The enclave job's one state field: every transition from a wrong state raises the error callers
have always seen, and the terminal states stay terminal."""

from __future__ import annotations

import pytest

from enclave_worker.attester import make_attester
from enclave_worker.config import EnclaveConfig
from enclave_worker.job import InputState, Job, JobState
from enclave_worker.jobs import JobRegistry
from sealroom.attestation import dev_init
from sealroom.errors import JobFailedError, NotFoundError
from sealroom.policy import DatasetPolicy
from tests.harness.enclave import make_party, make_plan, secret_loans

SQL = (
    "SELECT a.segment, COUNT(*) AS n FROM bank_a.loans a JOIN bank_b.loans b "
    "ON a.customer_id = b.customer_id GROUP BY a.segment"
)
POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2, analysts=("alice",))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> JobRegistry:
    dev = tmp_path_factory.mktemp("dev")
    dev_init(dev)
    cfg = EnclaveConfig(attester="simulated", dev_root=dev)
    return JobRegistry(cfg, make_attester(cfg))


@pytest.fixture
def job(registry: JobRegistry) -> Job:
    parties = [make_party(p, secret_loans(10), policy=POLICY) for p in ("bank_a", "bank_b")]
    return registry.create(make_plan(SQL, parties).to_json())


def test_a_new_job_receives_its_inputs(job: Job) -> None:
    assert job.state is JobState.RECEIVING and job.failed is None and not job.held_by_a_call
    assert {i.state for i in job.inputs.values()} == {InputState.WAITING}
    job.check_receiving()
    job.check_alive()


def test_a_job_is_executed_once(job: Job) -> None:
    job.begin()
    assert job.state is JobState.EXECUTING and job.held_by_a_call
    with pytest.raises(JobFailedError, match="the job is already executing"):
        job.begin()
    with pytest.raises(JobFailedError, match="the job has ended or is executing; nothing more is accepted"):
        job.check_receiving()
    job.end()
    assert job.state is JobState.DONE
    with pytest.raises(JobFailedError, match="the job is already executing"):
        job.begin()
    with pytest.raises(JobFailedError, match="the job ended while this stream was in flight"):
        job.check_alive()
    assert job.fail(JobFailedError("late")) is False and job.failed is None


def test_the_mpc_player_runs_only_once_prepared(job: Job) -> None:
    with pytest.raises(JobFailedError, match=r"no prepared MPC player \(PrepareMpc comes first\)"):
        job.run_player()
    with pytest.raises(JobFailedError, match="prepared outside PrepareMpc"):
        job.prepared()
    job.begin()
    job.prepared()
    assert job.state is JobState.PREPARED and not job.held_by_a_call  # the reaper may end it
    with pytest.raises(JobFailedError, match="nothing more is accepted"):
        job.check_receiving()
    job.run_player()
    assert job.state is JobState.RUNNING_MPC and job.held_by_a_call
    with pytest.raises(JobFailedError, match="the job's MPC player is already running"):
        job.run_player()


def test_a_failed_job_stays_failed_with_its_first_error(job: Job) -> None:
    first = JobFailedError("the first failure")
    assert job.fail(first) is True
    assert job.state is JobState.FAILED and job.failed is first
    assert job.fail(JobFailedError("a second failure")) is False and job.failed is first
    with pytest.raises(JobFailedError, match="the first failure"):
        job.check_alive()
    with pytest.raises(JobFailedError, match="the first failure"):
        job.raise_if_failed()
    job.begin()  # the call goes on to report the failure (its readiness check raises it)
    job.prepared()  # an abort while PrepareMpc ran: the job stays failed
    job.end()
    assert job.state is JobState.FAILED and job.failed is first
    with pytest.raises(JobFailedError, match="no prepared MPC player"):
        job.run_player()


def test_a_wiped_job_holds_no_rows_and_no_keys(job: Job) -> None:
    job.fail(JobFailedError("stop"))
    job.wipe()
    assert job.hpke_key is None and job.signing_key is None and job.held_bytes == 0
    assert all(i.table is None for i in job.inputs.values())


def test_registry_refuses_to_run_a_tee_job_as_a_player(registry: JobRegistry, job: Job) -> None:
    with pytest.raises(JobFailedError, match="no prepared MPC player"):
        registry.run_mpc(job.id, [], token=job.token, timeout_seconds=5)
    assert registry.job(job.id) is job and job.state is JobState.RECEIVING  # refused before it took the job
    registry.abort(job.id, job.token)
    assert registry.job(job.id) is None and job.failed is not None
    with pytest.raises(NotFoundError):
        registry.execute(job.id, {}, job.token)
