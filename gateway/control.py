"""The gateway's control plane: jobs, models, datasets and the cluster view.

One core (`GatewayControl`) serves both fronts: the HTTP bridge's `/v1` routes and the gRPC
`onehop.v1.Gateway` service (`GatewayServicer`, thin, below). Jobs and models are forwarded
to `onehop.v1.Trainer` with deadlines; the messages are the onehop.v1 contract the trainer
speaks, so they pass through unchanged and each front converts only at its own edge.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa
import pyarrow.flight as flight
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onehop.channels import aio_channel, flight_location, split_addresses
from onehop.dataplane import flight_client
from onehop.errors import Unavailable, from_rpc_error
from onehop.keys import validate_name
from onehop.settings import Settings
from protos.onehop.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    data_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

# Deadlines for calls to the trainer: reads answer from memory, StartJob only queues.
READ_TIMEOUT_SECONDS = 10.0
START_TIMEOUT_SECONDS = 30.0
# A health probe longer than this reads as UNREACHABLE: the cluster view must stay fast.
HEALTH_TIMEOUT_SECONDS = 1.0

if TYPE_CHECKING:
    from onehop.dataplane import DataClient


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    address: str
    # grpc.health.v1 status name: SERVING, NOT_SERVING, UNKNOWN, or UNREACHABLE.
    health: str


class GatewayControl:
    """Start, watch, cancel and list training jobs; list and promote models; list datasets;
    the cache's counters; probe the cluster."""

    def __init__(
        self,
        settings: Settings,
        trainer_channel: grpc.aio.Channel,
        data_client: DataClient,
        cache_channel: grpc.aio.Channel | None = None,
    ):
        self.settings = settings
        self._trainer = trainer_pb2_grpc.TrainerStub(trainer_channel)
        self._data = data_client
        self._cache = cache_pb2_grpc.CacheStub(cache_channel) if cache_channel else None

    # --- jobs ---------------------------------------------------------------------------

    async def start_job(self, request: trainer_pb2.StartJobRequest) -> str:
        """Queue a training job on the trainer; returns its id."""
        validate_name("dataset", request.dataset)
        validate_name("model", request.model_name)
        response = await _call(self._trainer.StartJob, request, START_TIMEOUT_SECONDS)
        return response.job_id

    async def get_job(self, job_id: str) -> trainer_pb2.JobStatus:
        request = trainer_pb2.GetJobRequest(job_id=job_id)
        return await _call(self._trainer.GetJob, request, READ_TIMEOUT_SECONDS)

    async def cancel_job(self, job_id: str) -> trainer_pb2.JobStatus:
        """Ask the trainer to stop a job; answers its status (terminal jobs stay as they are)."""
        request = trainer_pb2.CancelJobRequest(job_id=job_id)
        response = await _call(self._trainer.CancelJob, request, READ_TIMEOUT_SECONDS)
        return response.status

    async def list_jobs(self) -> list[trainer_pb2.JobStatus]:
        request = trainer_pb2.ListJobsRequest()
        response = await _call(self._trainer.ListJobs, request, READ_TIMEOUT_SECONDS)
        return list(response.jobs)

    async def watch_job(self, job_id: str) -> AsyncIterator[trainer_pb2.JobStatus]:
        """The trainer's progress stream for one job, until it ends (no deadline: a job
        runs as long as it runs; the caller's cancellation ends the stream)."""
        call = self._trainer.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id))
        try:
            async for status in call:
                yield status
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    # --- models and datasets ------------------------------------------------------------

    async def list_models(self) -> list[trainer_pb2.ModelInfo]:
        request = trainer_pb2.ListModelsRequest()
        response = await _call(self._trainer.ListModels, request, READ_TIMEOUT_SECONDS)
        return list(response.models)

    async def get_model(self, name: str, version: int = 0) -> trainer_pb2.ModelInfo:
        """One model version (0 = the serving one); its `features` are the input columns."""
        validate_name("model", name)
        request = trainer_pb2.GetModelRequest(name=name, version=version)
        return await _call(self._trainer.GetModel, request, READ_TIMEOUT_SECONDS)

    async def promote_model(self, name: str, version: int, pin: bool) -> trainer_pb2.ModelInfo:
        """Make `version` the serving one; the gateway's digest-keyed cache needs no flush."""
        validate_name("model", name)
        request = trainer_pb2.PromoteModelRequest(name=name, version=version, pin=pin)
        return await _call(self._trainer.PromoteModel, request, START_TIMEOUT_SECONDS)

    async def cache_stats(self) -> cache_pb2.GetStatsResponse:
        if self._cache is None:
            raise Unavailable("no cache is configured (ONEHOP_CACHE_ADDRESS)")
        request = cache_pb2.GetStatsRequest()
        return await _call(self._cache.GetStats, request, HEALTH_TIMEOUT_SECONDS)

    async def list_datasets(self) -> list[data_pb2.DatasetInfo]:
        # DataClient is a synchronous Flight client: keep it off the event loop.
        return list(await asyncio.to_thread(self._data.list_datasets))

    # --- cluster ------------------------------------------------------------------------

    def inner_services(self) -> list[tuple[str, str, str]]:
        """(name, address, protocol) of each inner service the settings name."""
        s = self.settings
        shard = (
            ("shard", s.shard_health_address, "grpc")
            if s.shard_health_address
            else ("shard", s.shard_address, "flight")
        )
        trainers = [("trainer", address, "grpc") for address in split_addresses(s.trainer_address)]
        caches = [("cache", address, "grpc") for address in split_addresses(s.cache_address)]
        listed = [*caches, shard, *trainers]
        return [entry for entry in listed if entry[1]]

    async def cluster_status(self) -> list[ServiceHealth]:
        """Probe every inner service at once, each with a short deadline."""
        services = self.inner_services()
        probes: list[Awaitable[str]] = []
        for _, address, protocol in services:
            if protocol == "grpc":
                probes.append(self._grpc_health(address))
            else:
                probes.append(asyncio.to_thread(_flight_health, address, self.settings))
        healths = await asyncio.gather(*probes)
        return [
            ServiceHealth(name, address, health)
            for (name, address, _), health in zip(services, healths, strict=True)
        ]

    async def _grpc_health(self, address: str) -> str:
        channel = aio_channel(address, self.settings)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_SECONDS
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "UNREACHABLE"
            return "UNKNOWN"
        finally:
            await channel.close()


def _flight_health(address: str, settings: Settings) -> str:
    """Without `shard_health_address` only the Flight port is known, and it has no
    grpc.health.v1: any answer to ListActions, even "not implemented", means it is up."""
    client = flight_client(flight_location(address, settings), settings)
    try:
        options = flight.FlightCallOptions(timeout=HEALTH_TIMEOUT_SECONDS)
        list(client.list_actions(options=options))
        return "SERVING"
    except (flight.FlightUnavailableError, flight.FlightTimedOutError):
        return "UNREACHABLE"
    except (flight.FlightError, pa.ArrowException):
        return "SERVING"  # it answered, only not with a list
    finally:
        client.close()


async def _call(method: Callable[..., Any], request: Any, timeout: float) -> Any:
    """One unary call to a downstream onehop service; its status maps through the table."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


# --- gRPC front ---------------------------------------------------------------------------


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """onehop.v1.Gateway over `GatewayControl`; errors map through the ErrorInterceptor."""

    def __init__(self, control: GatewayControl):
        self._control = control

    async def StartJob(self, request, context):
        return trainer_pb2.StartJobResponse(job_id=await self._control.start_job(request))

    async def WatchJob(self, request, context):
        async for status in self._control.watch_job(request.job_id):
            yield status

    async def GetJob(self, request, context):
        return await self._control.get_job(request.job_id)

    async def CancelJob(self, request, context):
        return trainer_pb2.CancelJobResponse(status=await self._control.cancel_job(request.job_id))

    async def PromoteModel(self, request, context):
        return await self._control.promote_model(request.name, request.version, request.pin)

    async def GetCacheStats(self, request, context):
        return await self._control.cache_stats()

    async def ListJobs(self, request, context):
        return trainer_pb2.ListJobsResponse(jobs=await self._control.list_jobs())

    async def ListModels(self, request, context):
        return trainer_pb2.ListModelsResponse(models=await self._control.list_models())

    async def GetModel(self, request, context):
        return await self._control.get_model(request.name, request.version)

    async def ListDatasets(self, request, context):
        return data_pb2.ListDatasetsResponse(datasets=await self._control.list_datasets())

    async def GetClusterStatus(self, request, context):
        services = await self._control.cluster_status()
        return gateway_pb2.GetClusterStatusResponse(
            services=[
                gateway_pb2.ServiceStatus(name=s.name, address=s.address, health=s.health)
                for s in services
            ]
        )
