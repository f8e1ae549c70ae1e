"""`start(settings)`: the trainer's gRPC server — onehop.v1.Trainer, OIP v2 inference and
health on `settings.trainer_grpc_port` — SERVING once the registry is open and every
model's serving version is loaded and warmed.

`settings.trainer_role` splits the roles: "serve" replicas answer inference (job RPCs say
UNAVAILABLE), "train" replicas run jobs (no inference service), "all" does both. Replicas
that serve re-read the registry every `trainer_registry_refresh_seconds`, so versions and
promotions written by other processes sharing the directory serve without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from onehop.dataplane import DataClient
from onehop.server import GrpcServer, Running
from onehop.settings import Settings
from protos.inference import grpc_service_pb2_grpc
from protos.onehop.v1 import trainer_pb2_grpc
from trainer_service.inference import Batcher, BatchingConfig, Predictor
from trainer_service.jobs import FlightData, JobManager
from trainer_service.model import configure_threads, describe_device, select_device
from trainer_service.oip import InferenceServicer
from trainer_service.registry import Registry
from trainer_service.servicer import TrainerServicer

log = logging.getLogger(__name__)


async def follow_registry(predictor: Predictor, interval: float) -> None:
    """Every `interval` seconds, load and swap in what other processes registered or
    promoted (off the event loop); a failed round is logged and the next one tries again."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(predictor.refresh)
        except Exception:
            log.exception("re-reading the model registry failed")


def recover(jobs: JobManager) -> None:
    """Queue again the jobs a previous run left unfinished (logged, never raised: the
    server runs on without them)."""
    try:
        resumed = jobs.recover()
    except Exception:
        log.exception("resuming unfinished jobs failed")
        return
    if resumed:
        log.info("resuming %d unfinished job(s): %s", len(resumed), ", ".join(resumed))


async def start(settings: Settings) -> Running:
    """Open the registry, start the servers; endpoints: {"grpc": host:port}.

    Training reads data through `settings.shard_address` (and the cache's addresses when
    set), one DataClient per job.
    """
    root = settings.service_dir("trainer")
    role = settings.trainer_role
    # A serve-only replica shares the directory with writers: their writes in progress stay.
    registry = await asyncio.to_thread(Registry, root / "registry", role != "serve")
    device = select_device()
    threads = configure_threads(settings.trainer_torch_threads)
    jobs = None
    if role in ("all", "train"):
        jobs = JobManager(
            registry,
            FlightData(functools.partial(DataClient, settings)),
            device,
            workers=settings.trainer_job_workers,
            checkpoint_dir=root / "checkpoints",
        )
    ready = False

    server = GrpcServer(settings, settings.trainer_grpc_port)
    server.add(
        trainer_pb2_grpc.add_TrainerServicer_to_server,
        TrainerServicer(jobs, registry),
        "onehop.v1.Trainer",
    )
    predictor = batcher = None
    if role in ("all", "serve"):
        predictor = Predictor(registry, device)
        batcher = Batcher(
            predictor,
            BatchingConfig(
                max_batch_size=settings.trainer_max_batch_size,
                max_queue_delay=settings.trainer_max_queue_delay_ms / 1000.0,
                max_queue=settings.trainer_max_queue,
                instances=settings.trainer_batch_instances,
            ),
        )
        server.add(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(batcher, lambda: ready),
            "inference.GRPCInferenceService",
        )
    try:
        await server.start()
        if predictor is not None:
            # Every model's serving version loaded and warmed before the first request.
            await asyncio.to_thread(predictor.refresh)
    except BaseException:
        await server.stop()
        if jobs is not None:
            await asyncio.to_thread(jobs.close)
        raise
    ready = True
    await server.set_serving(True)
    # Jobs a previous run left unfinished continue from their checkpoints; off the start
    # path, since validating them asks the data plane.
    recovering = asyncio.create_task(asyncio.to_thread(recover, jobs)) if jobs else None
    following = (
        asyncio.create_task(follow_registry(predictor, settings.trainer_registry_refresh_seconds))
        if predictor is not None
        else None
    )
    log.info(
        "trainer (role %s): grpc %s, device %s, %d torch threads, registry %s",
        role,
        server.address,
        describe_device(device),
        threads,
        registry.root,
    )

    async def stop() -> None:
        nonlocal ready
        ready = False
        if following is not None:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        await server.stop()
        if recovering is not None:
            await asyncio.wait({recovering}, timeout=settings.grace_seconds)
        if batcher is not None:
            await batcher.close()
        # Cancels running jobs between batches; their models are not registered.
        if jobs is not None:
            await asyncio.to_thread(jobs.close)
        if predictor is not None:
            predictor.close()

    return Running({"grpc": server.address}, stop)
