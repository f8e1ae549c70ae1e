"""`start(settings)`: the trainer's gRPC server — onehop.v1.Trainer, OIP v2 inference and
health on `settings.trainer_grpc_port` — SERVING once the registry is open."""

from __future__ import annotations

import asyncio
import functools
import logging

from onehop.dataplane import DataClient
from onehop.server import GrpcServer, Running
from onehop.settings import Settings
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import trainer_pb2_grpc
from trainer_service.inference import Predictor
from trainer_service.jobs import FlightData, JobManager
from trainer_service.model import select_device
from trainer_service.oip import InferenceServicer
from trainer_service.registry import Registry
from trainer_service.servicer import TrainerServicer

log = logging.getLogger(__name__)


async def start(settings: Settings) -> Running:
    """Open the registry, start the servers; endpoints: {"grpc": host:port}.

    Training reads data through `settings.shard_address` (and the cache's addresses when
    set), one DataClient per job.
    """
    registry = await asyncio.to_thread(Registry, settings.service_dir("trainer") / "registry")
    device = select_device()
    predictor = Predictor(registry, device)
    jobs = JobManager(registry, FlightData(functools.partial(DataClient, settings)), device)
    ready = False

    server = GrpcServer(settings, settings.trainer_grpc_port)
    server.add(
        trainer_pb2_grpc.add_TrainerServicer_to_server,
        TrainerServicer(jobs, registry),
        "onehop.v1.Trainer",
    )
    server.add(
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(predictor, lambda: ready),
        "inference.GRPCInferenceService",
    )
    try:
        await server.start()
    except BaseException:
        await asyncio.to_thread(jobs.close)
        raise
    ready = True
    await server.set_serving(True)
    log.info("trainer: grpc %s, device %s, registry %s", server.address, device, registry.root)

    async def stop() -> None:
        nonlocal ready
        ready = False
        await server.stop()
        # Cancels running jobs between batches; their models are not registered.
        await asyncio.to_thread(jobs.close)
        predictor.close()

    return Running({"grpc": server.address}, stop)
