"""The cache process: LMDB store, `onehop.v1.Cache` + health on gRPC, cached shards on
Arrow Flight. Health turns SERVING only once the store is open."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from cache_service.flight import CacheFlightServer
from cache_service.servicer import SERVICE_NAME, CacheServicer
from cache_service.store import CacheStore
from onehop.channels import flight_location
from onehop.server import GrpcServer, Running, flight_server_options
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2_grpc

log = logging.getLogger(__name__)

# Threads for the LMDB work that may wait on the disk: large reads, preparing large writes,
# deletes. Puts wait for their group commit without a thread (see the servicer). Fewer than
# the store's share of reader slots (half of MAX_READERS), with Flight's threads on top.
IO_THREADS = 16
# LMDB's reader table, for this process and the zero-hop readers on the host.
MAX_READERS = 254


class CacheServer:
    """The cache's servers in two steps: `listen` (gRPC up, health NOT_SERVING, calls
    UNAVAILABLE) then `open` (store open, Flight up, SERVING)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cache-io")
        self.servicer = CacheServicer(executor=self.executor)
        self.grpc = GrpcServer(settings, settings.cache_grpc_port)
        self.grpc.add(cache_pb2_grpc.add_CacheServicer_to_server, self.servicer, SERVICE_NAME)
        self.store: CacheStore | None = None
        self.flight: CacheFlightServer | None = None
        self._stopped = False

    async def listen(self) -> str:
        await self.grpc.start()
        return self.grpc.address

    async def open(self) -> dict[str, str]:
        settings = self.settings
        loop = asyncio.get_running_loop()

        def writer_died() -> None:  # on the dead writer's thread: writes now fail fast
            asyncio.run_coroutine_threadsafe(self.grpc.set_serving(False), loop)

        # Opened here, in the serving process (after any fork), off the event loop: the
        # index scan of a large warm cache takes a while.
        store = self.store = await asyncio.to_thread(
            lambda: CacheStore(
                settings.service_dir("cache"),
                settings.cache_size_bytes,
                MAX_READERS,
                on_writer_death=writer_died,
            )
        )
        location = flight_location(f"{settings.host}:{settings.cache_flight_port}", settings)
        self.flight = await asyncio.to_thread(
            lambda: CacheFlightServer(store, location, **flight_server_options(settings))
        )
        self.servicer.store = self.store
        await self.grpc.set_serving(True)
        log.info("cache serving: %s", self.endpoints)
        return self.endpoints

    @property
    def endpoints(self) -> dict[str, str]:
        endpoints = {"grpc": self.grpc.address}
        if self.flight is not None:
            endpoints["flight"] = f"{self.settings.host}:{self.flight.port}"
        return endpoints

    async def stop(self) -> None:
        """NOT_SERVING, drain gRPC, stop Flight, finish queued writes, close LMDB."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.stop()
        if self.flight is not None:
            await asyncio.to_thread(self.flight.shutdown)
        await asyncio.to_thread(self.executor.shutdown, True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)


async def start(settings: Settings) -> Running:
    server = CacheServer(settings)
    await server.listen()
    try:
        endpoints = await server.open()
    except BaseException:
        await server.stop()
        raise
    return Running(endpoints, server.stop)
