"""The cache as a real process, started as `onehop up` starts it: zero-hop reads from this
(second) process with access hints sent back, SIGKILL and a warm restart that keeps every
acknowledged Put, and a garbage data file that stops the start without touching it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import grpc
import pytest

from cache_service.client import HintSender
from cache_service.store import CacheReader
from onehop.channels import aio_channel
from onehop.launcher import SERVICES, LaunchError, Mesh
from onehop.settings import Settings
from protos.onehop.v1 import cache_pb2, cache_pb2_grpc

pytestmark = pytest.mark.timeout(120)

CACHE = next(spec for spec in SERVICES if spec.name == "cache")
KiB = 1 << 10


def start_cache(settings: Settings) -> Mesh:
    mesh = Mesh(
        settings,
        services=(CACHE,),
        say=lambda _: None,
        start_timeout=60,
        env={"ONEHOP_CACHE_SIZE_BYTES": str(settings.cache_size_bytes)},
    )
    mesh.start()
    return mesh


@pytest.fixture
def cache_settings(settings: Settings) -> Iterator[Settings]:
    # 16 MiB: the smallest budget, so the sweep below evicts.
    yield settings.model_copy(update={"cache_size_bytes": 16 << 20})


async def test_zero_hop_reads_send_hints_that_protect_hot_keys(cache_settings: Settings) -> None:
    mesh = start_cache(cache_settings)
    try:
        address = mesh.children["cache"].endpoints["grpc"]
        async with aio_channel(address, cache_settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            hot = [f"pred/m/{i}".encode() for i in range(100)]
            await stub.BatchPut(
                cache_pb2.BatchPutRequest(
                    entries=[cache_pb2.Entry(key=key, value=os.urandom(KiB)) for key in hot]
                )
            )
            reader = CacheReader(cache_settings.data_dir / "cache")
            hints = HintSender(reader, channel, interval=3600, timeout=10)  # flushed by hand
            hints.start()
            try:
                for _ in range(3):
                    values = await asyncio.to_thread(reader.get_many, [*hot, b"pred/m/absent"])
                    assert None not in values[:-1] and values[-1] is None
                stats = await stub.GetStats(cache_pb2.GetStatsRequest())
                assert stats.namespaces["pred"].hits == 0  # the cache has not heard yet
                assert await hints.flush() == 300
                stats = await stub.GetStats(cache_pb2.GetStatsRequest())
                assert (stats.namespaces["pred"].hits, stats.namespaces["pred"].misses) == (300, 3)

                # An epoch of shards twice the budget, written through the service: the
                # keys read only from the memory map must survive it.
                for i in range(32):
                    await stub.Put(
                        cache_pb2.PutRequest(key=f"shard/d/{i}".encode(), value=bytes(1 << 20))
                    )
                values = await asyncio.to_thread(reader.get_many, hot)
                assert None not in values
                stats = await stub.GetStats(cache_pb2.GetStatsRequest())
                assert stats.namespaces["shard"].evictions > 0
                assert stats.namespaces["pred"].evictions == 0
                assert stats.used_bytes <= 16 << 20
            finally:
                await hints.close()
                reader.close()
            assert hints.sent == 400 and hints.dropped == 0
    finally:
        mesh.stop()


async def test_hints_to_a_stopped_cache_are_dropped_not_raised(
    cache_settings: Settings,
) -> None:
    mesh = start_cache(cache_settings)
    address = mesh.children["cache"].endpoints["grpc"]
    async with aio_channel(address, cache_settings) as channel:
        await cache_pb2_grpc.CacheStub(channel).Put(cache_pb2.PutRequest(key=b"pred/a", value=b"1"))
        with CacheReader(cache_settings.data_dir / "cache") as reader:
            mesh.stop()
            assert reader.get_many([b"pred/a"]) == [b"1"]  # the map outlives the service
            hints = HintSender(reader, channel, timeout=0.5)
            assert await hints.flush() == 0
            assert (hints.sent, hints.dropped) == (0, 1)


async def test_sigkill_then_restart_keeps_every_acknowledged_put(
    cache_settings: Settings,
) -> None:
    mesh = start_cache(cache_settings)
    process = mesh.children["cache"].process
    address = mesh.children["cache"].endpoints["grpc"]
    acknowledged: dict[bytes, bytes] = {}
    enough = asyncio.Event()

    async def writer(channel: grpc.aio.Channel, worker: int) -> None:
        stub = cache_pb2_grpc.CacheStub(channel)
        for i in range(10_000):
            key, value = f"pred/w{worker}/{i}".encode(), os.urandom(64)
            try:
                await stub.Put(cache_pb2.PutRequest(key=key, value=value), timeout=10)
            except grpc.aio.AioRpcError:
                return  # the server is gone: this Put was never acknowledged
            acknowledged[key] = value
            if len(acknowledged) >= 500:
                enough.set()

    try:
        async with aio_channel(address, cache_settings) as channel:
            writers = [asyncio.create_task(writer(channel, w)) for w in range(16)]
            await asyncio.wait_for(enough.wait(), 60)
            os.kill(process.pid, signal.SIGKILL)  # mid-stream, Puts in flight
            await asyncio.gather(*writers)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        mesh.stop()

    mesh = start_cache(cache_settings)
    try:
        address = mesh.children["cache"].endpoints["grpc"]
        async with aio_channel(address, cache_settings) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            keys = list(acknowledged)
            for start in range(0, len(keys), 200):
                batch = keys[start : start + 200]
                reply = await stub.BatchGet(cache_pb2.BatchGetRequest(keys=batch))
                assert all(reply.found), "an acknowledged Put was lost"
                assert list(reply.values) == [acknowledged[key] for key in batch]
    finally:
        mesh.stop()


def test_garbage_data_file_stops_the_process_and_is_left_untouched(
    cache_settings: Settings,
) -> None:
    data = cache_settings.service_dir("cache") / "data.mdb"
    garbage = os.urandom(256 * KiB)
    data.write_bytes(garbage)
    with pytest.raises(LaunchError, match="cache exited with code") as info:
        start_cache(cache_settings)
    assert "not a valid LMDB file" in str(info.value)
    assert data.read_bytes() == garbage
    assert sorted(os.listdir(data.parent)) in (["data.mdb"], ["data.mdb", "lock.mdb"])
