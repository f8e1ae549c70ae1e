"""Kill -9 matrix: each service SIGKILLed under load (predictions, shard reads, an ingest,
cache Puts, a training job); the launcher restarts it. In-flight calls end with
UNAVAILABLE / DEADLINE_EXCEEDED or succeed, never past their deadline; no acknowledged
write is lost; nothing is left corrupt; the mesh is healthy again and serves every kind."""

from __future__ import annotations

import time

import grpc
import pytest
from harness import (
    DATASET,
    SERVICE_NAMES,
    Clients,
    Faults,
    Load,
    MeshUnderTest,
    Report,
    Workloads,
    assert_calls_behaved,
    start_load,
)

from onehop.dataset import TARGET
from protos.onehop.v1 import trainer_pb2

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_kill_9_under_load(
    service: str,
    mesh: MeshUnderTest,
    workloads: Workloads,
    faults: Faults,
    load: Load,
    recovered,  # type: ignore[no-untyped-def]
) -> None:
    kinds = start_load(load, workloads)
    load.wait_ok(kinds, load.mark())

    old = faults.kill(service)
    mesh.wait_restarted(service, old)
    mesh.wait_healthy()
    load.wait_ok(kinds, load.mark())  # every kind of work succeeds again after the restart
    load.stop()

    assert_calls_behaved(load)
    recovered()


def test_trainer_killed_mid_job(
    mesh: MeshUnderTest,
    clients: Clients,
    workloads: Workloads,
    faults: Faults,
    report: Report,
    recovered,  # type: ignore[no-untyped-def]
) -> None:
    """A job SIGKILLed with its trainer mid-epoch (checkpoints every few steps) never stays
    RUNNING forever and leaves no partial model version; whether the restarted trainer
    knows the job (resumed from its checkpoint) or forgot it is reported."""
    hp = trainer_pb2.Hyperparameters(epochs=40, batch_size=16)
    if "checkpoint_every_steps" in trainer_pb2.Hyperparameters.DESCRIPTOR.fields_by_name:
        hp.checkpoint_every_steps = 10
    request = trainer_pb2.StartJobRequest(
        dataset=DATASET, target=TARGET, model_name="mid-job", hyperparameters=hp
    )
    job_id = clients.gateway.StartJob(request, timeout=10).job_id

    def status() -> trainer_pb2.JobStatus:
        return clients.gateway.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10)

    deadline = time.monotonic() + 120
    while status().step < 30:
        assert time.monotonic() < deadline, f"job never got going: {status()}"
        time.sleep(0.2)
    mesh.wait_restarted("trainer", faults.kill("trainer"))
    mesh.wait_healthy()

    deadline = time.monotonic() + 180
    while True:
        try:
            state = status().state
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the gateway reconnecting
                assert time.monotonic() < deadline, exc
                time.sleep(0.5)
                continue
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            report.finding(
                "test_trainer_killed_mid_job",
                "a job in flight when its trainer is killed is forgotten by the restarted "
                "trainer (GetJob NOT_FOUND); its checkpoint stays on disk and only "
                "`trainer_service.train --resume` continues it",
                "trainer_service/jobs.py JobManager (no job table or resume across restarts)",
            )
            break
        if state in (
            trainer_pb2.JOB_STATE_SUCCEEDED,
            trainer_pb2.JOB_STATE_FAILED,
            trainer_pb2.JOB_STATE_CANCELLED,
        ):
            break
        assert time.monotonic() < deadline, f"job stuck after the restart: {status()}"
        time.sleep(0.5)
    recovered()
