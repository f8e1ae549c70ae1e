"""onehop.v1.Trainer over the job manager and the registry: protobuf stops here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from onehop.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from protos.onehop.v1 import trainer_pb2, trainer_pb2_grpc
from trainer_service.jobs import JobManager, JobRequest, JobStatus
from trainer_service.registry import ModelRecord, Registry

log = logging.getLogger(__name__)


def job_request(request: trainer_pb2.StartJobRequest) -> JobRequest:
    hp = request.hyperparameters
    return JobRequest(
        dataset=request.dataset,
        dataset_version=request.dataset_version,
        target=request.target,
        model_name=request.model_name,
        features=tuple(request.features),
        hidden=tuple(request.model.hidden),
        dropout=request.model.dropout,
        activation=request.model.activation,
        task=request.model.task,
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        lr=hp.lr,
        val_split=hp.val_split,
        seed=hp.seed,
        optimizer=hp.optimizer,
        weight_decay=hp.weight_decay,
        momentum=hp.momentum,
        lr_schedule=hp.lr_schedule,
        warmup_steps=hp.warmup_steps,
        early_stopping_patience=hp.early_stopping_patience,
        checkpoint_every_steps=hp.checkpoint_every_steps,
    )


def job_status(status: JobStatus) -> trainer_pb2.JobStatus:
    return trainer_pb2.JobStatus(
        job_id=status.job_id,
        state=int(status.state),  # type: ignore[arg-type]
        epoch=status.epoch,
        epochs=status.epochs,
        step=status.step,
        total_steps=status.total_steps,
        loss=status.loss,
        metrics=status.metrics,
        samples_per_second=status.samples_per_second,
        data_wait_share=status.data_wait_share,
        elapsed_seconds=status.elapsed,
        message=status.message,
        model_name=status.model_name,
        model_version=status.model_version,
        dataset=status.dataset,
        cpu_seconds=status.cpu_seconds,
        gpu_seconds=status.gpu_seconds,
        bytes_read=status.bytes_read,
        device=status.device,
        history=[
            trainer_pb2.EpochMetrics(
                epoch=entry["epoch"],
                loss=entry["loss"],
                metrics=entry["metrics"],
                samples_per_second=entry["samples_per_second"],
                data_wait_share=entry["data_wait_share"],
            )
            for entry in status.history
        ],
        stopped_early=status.stopped_early,
    )


def model_info(
    record: ModelRecord, versions: list[int], serving: int = 0, pinned: bool = False
) -> trainer_pb2.ModelInfo:
    return trainer_pb2.ModelInfo(
        name=record.name,
        version=record.version,
        weights_digest=record.weights_digest,
        features=list(record.features),
        target=record.target,
        dataset=record.dataset,
        dataset_version=record.dataset_version,
        metrics=record.metrics,
        versions=versions,
        spec=trainer_pb2.ModelSpec(
            hidden=list(record.spec.hidden),
            # The proto's convention: 0 would read as "the default", negative as "none".
            dropout=record.spec.dropout or -1.0,
            activation=record.spec.activation,
            task=record.spec.task,
        ),
        created_unix=record.created,
        serving_version=serving,
        pinned=pinned,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """`jobs` is None on a serve-only replica: job RPCs answer UNAVAILABLE there."""

    def __init__(self, jobs: JobManager | None, registry: Registry):
        self._job_manager = jobs
        self._registry = registry

    @property
    def _jobs(self) -> JobManager:
        if self._job_manager is None:
            raise Unavailable(
                "this trainer replica only serves (role serve); send jobs to one "
                "with role train or all"
            )
        return self._job_manager

    async def StartJob(
        self, request: trainer_pb2.StartJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartJobResponse:
        # Validation asks the data plane for the dataset's columns: off the event loop.
        job_id = await asyncio.to_thread(self._jobs.start, job_request(request))
        return trainer_pb2.StartJobResponse(job_id=job_id)

    async def WatchJob(
        self, request: trainer_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.JobStatus]:
        async for status in self._jobs.watch(request.job_id):
            yield job_status(status)

    async def GetJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.JobStatus:
        return job_status(self._jobs.get(request.job_id))

    async def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.CancelJobResponse:
        return trainer_pb2.CancelJobResponse(status=job_status(self._jobs.cancel(request.job_id)))

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=[job_status(s) for s in self._jobs.list()])

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListModelsResponse:
        return await asyncio.to_thread(self._list_models)

    def _list_models(self) -> trainer_pb2.ListModelsResponse:
        models = []
        for name in self._registry.names():
            try:
                models.append(self._model(name, 0))
            except (NotFound, FailedPrecondition) as exc:  # removed or broken meanwhile
                log.warning("listing model %s: %s", name, exc.message)
        return trainer_pb2.ListModelsResponse(models=models)

    async def GetModel(
        self, request: trainer_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ModelInfo:
        return await asyncio.to_thread(self._model, request.name, request.version)

    async def PromoteModel(
        self, request: trainer_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ModelInfo:
        if not request.version:
            raise InvalidArgument("version: name the version to promote")
        await asyncio.to_thread(self._registry.promote, request.name, request.version, request.pin)
        return await asyncio.to_thread(self._model, request.name, request.version)

    def _model(self, name: str, version: int) -> trainer_pb2.ModelInfo:
        record = self._registry.record(name, version)
        return model_info(
            record,
            self._registry.versions(name),
            self._registry.serving_version(name),
            self._registry.pinned(name),
        )
