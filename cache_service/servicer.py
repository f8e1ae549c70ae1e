"""`onehop.v1.Cache` over the store: protobuf in and out here, LMDB work on a thread pool
so the event loop never waits on a disk."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from cache_service.store import CacheStore, StoreStats
from onehop.errors import Unavailable
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

T = TypeVar("T")

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Thin: converts messages and calls the store. `store` may be attached after the
    server starts listening; until then every call is UNAVAILABLE."""

    def __init__(self, store: CacheStore | None = None, executor: Executor | None = None):
        self.store = store
        self._executor = executor

    async def _run(self, call: Callable[[CacheStore], T]) -> T:
        store = self.store
        if store is None:
            raise Unavailable("the cache is starting: its store is not open yet")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, store)

    async def Get(
        self, request: cache_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetResponse:
        key = request.key
        value = await self._run(lambda store: store.get(key))
        return cache_pb2.GetResponse(found=value is not None, value=value or b"")

    async def BatchGet(
        self, request: cache_pb2.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.BatchGetResponse:
        keys = list(request.keys)
        values = await self._run(lambda store: store.get_many(keys))
        return cache_pb2.BatchGetResponse(
            found=[value is not None for value in values],
            values=[value or b"" for value in values],
        )

    async def Contains(
        self, request: cache_pb2.ContainsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.ContainsResponse:
        keys = list(request.keys)
        found = await self._run(lambda store: store.contains_many(keys))
        return cache_pb2.ContainsResponse(found=found)

    async def Put(
        self, request: cache_pb2.PutRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.PutResponse:
        key, value, ttl = request.key, request.value, request.ttl_seconds
        await self._run(lambda store: store.put(key, value, ttl))
        return cache_pb2.PutResponse()

    async def BatchPut(
        self, request: cache_pb2.BatchPutRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.BatchPutResponse:
        items = [(entry.key, entry.value) for entry in request.entries]
        ttl = request.ttl_seconds
        written = await self._run(lambda store: store.put_many(items, ttl))
        return cache_pb2.BatchPutResponse(written=written)

    async def Delete(
        self, request: cache_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.DeleteResponse:
        keys = list(request.keys)
        deleted = await self._run(lambda store: store.delete_many(keys))
        return cache_pb2.DeleteResponse(deleted=deleted)

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetStatsResponse:
        return stats_to_proto(await self._run(lambda store: store.stats()))


def stats_to_proto(stats: StoreStats) -> cache_pb2.GetStatsResponse:
    response = cache_pb2.GetStatsResponse(
        capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes
    )
    for name, ns in stats.namespaces.items():
        response.namespaces[name].CopyFrom(
            cache_pb2.NamespaceStats(
                hits=ns.hits,
                misses=ns.misses,
                entries=ns.entries,
                bytes=ns.bytes,
                evictions=ns.evictions,
            )
        )
    return response
