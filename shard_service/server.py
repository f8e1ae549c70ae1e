"""`start(settings)`: the shard service's Flight server plus a gRPC health endpoint."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from onehop.dataplane import CacheNodes
from onehop.server import GrpcServer, Running
from onehop.settings import Settings
from shard_service.catalog import Catalog
from shard_service.flight import ShardFlightServer, WriteThrough
from shard_service.sources import Sources

log = logging.getLogger(__name__)


async def start(settings: Settings) -> Running:
    """Open the catalog, start Flight and health; SERVING once both listen on an open catalog.

    endpoints: {"grpc": health host:port, "flight": Flight host:port}.
    """
    catalog = await asyncio.to_thread(
        Catalog.open, settings.service_dir("shard"), settings.default_shards
    )
    cache_nodes = CacheNodes.from_settings(settings)
    write_through = (
        WriteThrough(cache_nodes, settings.max_pending_writebacks, settings=settings)
        if cache_nodes
        else None
    )
    sources = Sources(
        Path(settings.source_root) if settings.source_root else settings.data_dir,
        tuple(s.strip().lower() for s in settings.source_schemes.split(",") if s.strip()),
    )
    flight_server = ShardFlightServer(catalog, settings, write_through, sources)
    health = GrpcServer(settings, settings.shard_grpc_port)
    try:
        await health.start()
    except BaseException:
        await asyncio.to_thread(flight_server.shutdown)
        raise
    await health.set_serving(True)
    log.info("shard service: flight %s, health %s", flight_server.address, health.address)

    async def stop() -> None:
        await health.set_serving(False)
        # shutdown() blocks until in-flight Flight calls have finished.
        await asyncio.to_thread(flight_server.shutdown)
        await health.stop()
        if write_through is not None:
            await asyncio.to_thread(write_through.close, settings.grace_seconds)

    return Running({"grpc": health.address, "flight": flight_server.address}, stop)
