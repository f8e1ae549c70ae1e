"""`onehop.v1.Cache` over the store: protobuf in and out here, nothing else.

Small reads run on the event loop: a hit is a lookup in the memory map plus a copy, a few
microseconds per key, far less than the hand-off to a thread and back (which was the
largest share of a `Get`). Writes are queued for the store's writer and awaited without a
thread, so every concurrent Put joins the next group commit. Large reads (which may touch
pages not in memory yet), preparing large writes, deletes and hints run on the thread pool,
so the loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from cache_service.store import CacheStore, StoreStats, check_key
from onehop.errors import InvalidArgument, ResourceExhausted, Unavailable
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

T = TypeVar("T")

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name
# Reads of at most this many keys run on the event loop (see the module docstring).
INLINE_READ_KEYS = 256
# Writes of at most this many value bytes are prepared on the event loop.
INLINE_WRITE_BYTES = 256 << 10
# StreamGet sends values in pieces of this size.
STREAM_CHUNK_BYTES = 1 << 20
UINT64_MAX = (1 << 64) - 1


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Thin: converts messages and calls the store. `store` may be attached after the
    server starts listening; until then every call is UNAVAILABLE."""

    def __init__(self, store: CacheStore | None = None, executor: Executor | None = None):
        self.store = store
        self._executor = executor

    def _store(self) -> CacheStore:
        store = self.store
        if store is None:
            raise Unavailable("the cache is starting: its store is not open yet")
        return store

    async def _run(self, call: Callable[[CacheStore], T]) -> T:
        store = self._store()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, store)

    async def _read(self, n_keys: int, call: Callable[[CacheStore], T]) -> T:
        if n_keys <= INLINE_READ_KEYS:
            return call(self._store())
        return await self._run(call)

    async def _write(self, items: Sequence[tuple[bytes, Any]], ttl: int) -> int:
        """Queue the items for the store's writer and wait for their commit without holding
        a thread: every concurrent Put then joins the same group commit. Checksumming and
        copying a large request runs on the pool, a small one here."""
        store = self._store()
        if sum(len(value) for _, value in items) <= INLINE_WRITE_BYTES:
            future = store.submit_put_many(items, ttl)
        else:
            future = await self._run(lambda store: store.submit_put_many(items, ttl))
        return await asyncio.wrap_future(future)

    async def Get(
        self, request: cache_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetResponse:
        key = request.key
        value = await self._read(1, lambda store: store.get(key))
        return cache_pb2.GetResponse(found=value is not None, value=value or b"")

    async def BatchGet(
        self, request: cache_pb2.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.BatchGetResponse:
        keys = request.keys
        if request.packed:
            packed = await self._read(len(keys), lambda store: store.get_packed(keys))
            return cache_pb2.BatchGetResponse(
                found=packed.found, sizes=packed.sizes, packed_values=packed.data
            )
        values = await self._read(len(keys), lambda store: store.get_many(keys))
        return cache_pb2.BatchGetResponse(
            found=[value is not None for value in values],
            values=[value or b"" for value in values],
        )

    async def Contains(
        self, request: cache_pb2.ContainsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.ContainsResponse:
        keys = request.keys
        # From the in-memory index: never a disk read, whatever the batch size.
        return cache_pb2.ContainsResponse(found=self._store().contains_many(keys))

    async def Put(
        self, request: cache_pb2.PutRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.PutResponse:
        await self._write([(request.key, request.value)], request.ttl_seconds)
        return cache_pb2.PutResponse()

    async def BatchPut(
        self, request: cache_pb2.BatchPutRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.BatchPutResponse:
        items = [(entry.key, entry.value) for entry in request.entries]
        written = await self._write(items, request.ttl_seconds)
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
        return stats_to_proto(self._store().stats())

    async def Touch(
        self, request: cache_pb2.TouchRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.TouchResponse:
        hits, misses, dropped = request.hits, dict(request.misses), request.dropped
        # Up to thousands of keys under the store's lock: off the event loop.
        applied = await self._run(lambda store: store.note_remote_reads(hits, misses, dropped))
        return cache_pb2.TouchResponse(applied=applied)

    async def StreamGet(
        self, request: cache_pb2.StreamGetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.StreamGetResponse]:
        key = request.key
        value = await self._run(lambda store: store.get(key))
        if value is None:
            yield cache_pb2.StreamGetResponse(found=False)
            return
        view = memoryview(value)
        for start in range(0, max(len(view), 1), STREAM_CHUNK_BYTES):
            yield cache_pb2.StreamGetResponse(
                found=True,
                total_bytes=len(view),
                chunk=bytes(view[start : start + STREAM_CHUNK_BYTES]),
            )

    async def StreamPut(
        self,
        request_iterator: AsyncIterator[cache_pb2.StreamPutRequest],
        context: grpc.aio.ServicerContext,
    ) -> cache_pb2.StreamPutResponse:
        store = self._store()
        key: bytes | None = None
        ttl = 0
        value = bytearray()
        async for message in request_iterator:
            if key is None:
                key, ttl = check_key(message.key), message.ttl_seconds
            elif message.key and message.key != key:
                raise InvalidArgument("StreamPut names its key in the first message only")
            value += message.chunk
            if len(value) > store.capacity_bytes:  # refuse before buffering all of it
                raise ResourceExhausted(
                    f"a value over {store.capacity_bytes} bytes cannot fit the cache budget"
                )
        if key is None:
            raise InvalidArgument("StreamPut needs at least one message naming the key")
        await self._write([(key, value)], ttl)
        return cache_pb2.StreamPutResponse(bytes=len(value))


def stats_to_proto(stats: StoreStats) -> cache_pb2.GetStatsResponse:
    """The stats as sent. Counters saturate at the uint64 maximum: the store's are Python
    ints, and one past the field's range would fail every GetStats from then on."""
    response = cache_pb2.GetStatsResponse(
        capacity_bytes=stats.capacity_bytes,
        used_bytes=stats.used_bytes,
        commits=_saturated(stats.commits),
        hints_dropped=_saturated(stats.hints_dropped),
    )
    for name, ns in stats.namespaces.items():
        response.namespaces[name].CopyFrom(
            cache_pb2.NamespaceStats(
                hits=_saturated(ns.hits),
                misses=_saturated(ns.misses),
                entries=ns.entries,
                bytes=ns.bytes,
                evictions=_saturated(ns.evictions),
                corrupt=_saturated(ns.corrupt),
                expired=_saturated(ns.expired),
            )
        )
    return response


def _saturated(count: int) -> int:
    return min(count, UINT64_MAX)
